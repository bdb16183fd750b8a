//! Linear layers `Y[t, n] = X[t, k] · W[n, k]ᵀ (+ bias[n])` with a selectable implementation:
//! cuBLASLt (`crate::gpu::gemm`) or the hand-written skinny GEMM of `kernels/gemm_skinny.cu`
//! (t ≤ 64 rows, memory-bound decode steps), and the dispatch between them ([`GemmVariant`]).
//!
//! The skinny kernel splits W into row slabs of `warps · 32` rows (grid x) and, for narrow
//! shapes, k into `splits` ranges (grid y) whose f32 partials go to a caller-provided scratch
//! buffer and are summed in a fixed order by `gemm_skinny_reduce_bf16` (deterministic).
use std::str::FromStr;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::gemm::{GemmOut, OutType};
use crate::gpu::{drv, DTensor, Gpu};

const OP: &str = "gemm_skinny";

/// Most rows the skinny kernel accepts.
pub const SKINNY_ROW_LIMIT: usize = 64;
/// `Auto` uses the skinny kernel up to this many rows, cuBLASLt above. 0: never. Measured on
/// the H100 (2026-11-25, criterion `linear/bf16/*/32x…`): at 32 rows cuBLASLt is faster on
/// every LLaDA-8B shape (QKV 39 vs 65 µs, O 17.6 vs 22.0, gate|up 73.9 vs 101.8, down 41.7 vs
/// 62.4, LM head 366 vs 407), so the skinny kernel stays a selectable variant until it wins.
pub const SKINNY_MAX_ROWS: usize = 0;

/// W rows per warp (2 mma m-tiles), as `WROWS` in the kernel.
const WARP_ROWS: usize = 32;
/// k columns per pipeline stage; split boundaries are multiples of it (`STAGE_K`).
const STAGE_K: usize = 64;
/// Default warps per block.
const DEFAULT_WARPS: u32 = 4;
/// Blocks aimed at per SM when choosing the split count (all resident in one wave).
const TARGET_BLOCKS_PER_SM: usize = 2;
/// Fewest k columns per split.
const MIN_SPLIT_K: usize = 256;
/// Most k splits.
const MAX_SPLITS: usize = 16;
/// Bound on splits × row slabs (this bounds the scratch: see [`skinny_scratch_len`]).
const SPLIT_BLOCKS_CAP: usize = 1024;
/// Largest row slab (8 warps) that the scratch bound must cover.
const MAX_SLAB_ROWS: usize = 8 * WARP_ROWS;

/// Which implementation runs a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmVariant {
    /// cuBLASLt (autotuned per shape at its first call).
    Cublaslt,
    /// `gemm_skinny*_bf16`: t ≤ 64, k % 8 == 0.
    Skinny,
    /// Skinny when t ≤ [`SKINNY_MAX_ROWS`] and the shape allows it, else cuBLASLt.
    Auto,
}

impl GemmVariant {
    pub const ALL: [GemmVariant; 3] = [
        GemmVariant::Cublaslt,
        GemmVariant::Skinny,
        GemmVariant::Auto,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GemmVariant::Cublaslt => "cublaslt",
            GemmVariant::Skinny => "skinny",
            GemmVariant::Auto => "auto",
        }
    }

    /// The implementation that runs `t` rows of a `[n, k]` weight (never `Auto`).
    pub fn resolve(self, t: usize, k: usize) -> GemmVariant {
        match self {
            GemmVariant::Auto if t <= SKINNY_MAX_ROWS && k.is_multiple_of(8) => GemmVariant::Skinny,
            GemmVariant::Auto => GemmVariant::Cublaslt,
            v => v,
        }
    }
}

impl FromStr for GemmVariant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        GemmVariant::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                Error::bad_input(format!(
                    "unknown GEMM variant `{s}` (expected cublaslt, skinny or auto)"
                ))
            })
    }
}

impl std::fmt::Display for GemmVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `y[0..t] = x[0..t] · wᵀ (+ bias)` by `variant`. `w` is [n, k] bf16, `x` at least [t, k],
/// `y` at least [t, n] (bf16 or f32), `bias` [n]; rows of `y` from t on are not written.
/// `scratch` holds the skinny kernel's split-K partials (see [`skinny_scratch_len`]); cuBLASLt
/// ignores it.
#[allow(clippy::too_many_arguments)]
pub fn linear<Y: GemmOut>(
    gpu: &Gpu,
    variant: GemmVariant,
    t: usize,
    x: &DTensor<bf16>,
    w: &DTensor<bf16>,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
    scratch: &mut DTensor<f32>,
) -> Result<()> {
    let k = w.dims.get(1).copied().unwrap_or(0);
    match variant.resolve(t, k) {
        GemmVariant::Cublaslt => crate::gpu::gemm::linear(gpu, t, x, w, bias, y),
        _ => skinny_linear(gpu, &SkinnyConfig::default(), t, x, w, bias, y, scratch),
    }
}

/// f32 elements of scratch that let the skinny kernel use its preferred split count for every
/// shape with t ≤ `max_t`, n ≤ `max_n`, k ≤ `max_k` (a smaller scratch only lowers the split
/// count). Zero when no split can happen.
pub fn skinny_scratch_len(max_t: usize, max_n: usize, max_k: usize) -> usize {
    let smax = (max_k / MIN_SPLIT_K).clamp(1, MAX_SPLITS);
    if smax <= 1 {
        return 0;
    }
    max_t.min(SKINNY_ROW_LIMIT) * (max_n * smax).min(SPLIT_BLOCKS_CAP * MAX_SLAB_ROWS)
}

/// Launch shape of the skinny kernel. `Default` is what [`linear`] uses; the fields are
/// overrides for tuning sweeps.
#[derive(Clone, Copy, Debug)]
pub struct SkinnyConfig {
    /// Warps per block (1..=8); a block owns `warps · 32` W rows.
    pub warps: u32,
    /// Number of k splits; `None` picks one from the SM count (always clamped to what the
    /// scratch holds and to k / 64).
    pub splits: Option<usize>,
}

impl Default for SkinnyConfig {
    fn default() -> Self {
        SkinnyConfig {
            warps: DEFAULT_WARPS,
            splits: None,
        }
    }
}

/// How a skinny GEMM is cut: `blocks_n` row slabs × `splits` k ranges of `k_split` columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyPlan {
    pub warps: u32,
    pub blocks_n: usize,
    pub splits: usize,
    pub k_split: usize,
}

/// The plan for `t` rows of a `[n, k]` weight on `sm_count` SMs with `scratch_len` f32 of
/// scratch. Enough blocks to give every SM about [`TARGET_BLOCKS_PER_SM`] at once; split-K only
/// when the row slabs alone are too few (narrow O / down projections).
pub fn skinny_plan(
    cfg: &SkinnyConfig,
    sm_count: usize,
    t: usize,
    n: usize,
    k: usize,
    scratch_len: usize,
) -> SkinnyPlan {
    let warps = cfg.warps.clamp(1, 8);
    let blocks_n = n.div_ceil(warps as usize * WARP_ROWS).max(1);
    let target = sm_count.max(1) * TARGET_BLOCKS_PER_SM * DEFAULT_WARPS as usize / warps as usize;
    let want = cfg.splits.unwrap_or_else(|| {
        if blocks_n >= target {
            1
        } else {
            target
                .div_ceil(blocks_n)
                .min(k / MIN_SPLIT_K)
                .min(MAX_SPLITS)
                .min(SPLIT_BLOCKS_CAP / blocks_n)
        }
    });
    let fits = scratch_len / (t * n).max(1);
    let s = want.min(fits).min(k.div_ceil(STAGE_K)).max(1);
    let k_split = k.div_ceil(s).div_ceil(STAGE_K) * STAGE_K;
    SkinnyPlan {
        warps,
        blocks_n,
        splits: k.div_ceil(k_split),
        k_split,
    }
}

/// Mirrors `struct SkinnyParams` in kernels/gemm_skinny.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SkinnyParams {
    x: u64,       // const bf16* [>= t, k]
    w: u64,       // const bf16* [n, k]
    bias: u64,    // const bf16* [n] or nullptr
    y: u64,       // void* [>= t, n], bf16 or f32
    partial: u64, // float* [splits, t, n]
    t: i32,       // int
    n: i32,       // int
    k: i32,       // int
    k_split: i32, // int
    splits: i32,  // int
    out_f32: i32, // int
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no padding).
unsafe impl cudarc::driver::DeviceRepr for SkinnyParams {}

/// Entry point and dynamic shared memory for `t` rows: NT = ceil(t/8) rounded up to 1, 2, 4, 8
/// n-tiles; two X buffers of NT·8 rows × (KC + 32) bf16 (KC as `XChunk` in the kernel).
fn kernel_for(t: usize) -> (&'static str, u32) {
    let (sym, nt, kc) = match t {
        0..=8 => ("gemm_skinny8_bf16", 1, 512),
        9..=16 => ("gemm_skinny16_bf16", 2, 512),
        17..=32 => ("gemm_skinny32_bf16", 4, 256),
        _ => ("gemm_skinny64_bf16", 8, 128),
    };
    (sym, (2 * nt * 8 * (kc + 32) * 2) as u32)
}

/// The skinny kernel with an explicit launch shape (see [`linear`] for the operands).
#[allow(clippy::too_many_arguments)]
pub fn skinny_linear<Y: GemmOut>(
    gpu: &Gpu,
    cfg: &SkinnyConfig,
    t: usize,
    x: &DTensor<bf16>,
    w: &DTensor<bf16>,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
    scratch: &mut DTensor<f32>,
) -> Result<()> {
    if w.dims.len() != 2 {
        return Err(Error::shape(OP, "w", &[0, 0], &w.dims));
    }
    let (n, k) = (w.dims[0], w.dims[1]);
    if n == 0 || k == 0 || !k.is_multiple_of(8) {
        return Err(Error::bad_input(format!(
            "{OP}: tensor `w` {:?}: needs n > 0 and k a nonzero multiple of 8",
            w.dims
        )));
    }
    if n > i32::MAX as usize || k > i32::MAX as usize {
        return Err(Error::bad_input(format!(
            "{OP}: tensor `w` {:?} is too large",
            w.dims
        )));
    }
    if t > SKINNY_ROW_LIMIT {
        return Err(Error::bad_input(format!(
            "{OP}: {t} rows; the skinny GEMM takes at most {SKINNY_ROW_LIMIT} (use cuBLASLt)"
        )));
    }
    x.check_rows(OP, "x", t, k)?;
    y.check_rows(OP, "y", t, n)?;
    if let Some(b) = bias {
        if b.len() != n {
            return Err(Error::shape(OP, "bias", &[n], &b.dims));
        }
    }
    if t == 0 {
        return Ok(());
    }
    let plan = skinny_plan(cfg, gpu.sm_count, t, n, k, scratch.len());
    let params = SkinnyParams {
        x: x.ptr(gpu),
        w: w.ptr(gpu),
        bias: bias.map_or(0, |b| b.ptr(gpu)),
        y: y.ptr_mut(gpu),
        partial: scratch.ptr_mut(gpu),
        t: t as i32,
        n: n as i32,
        k: k as i32,
        k_split: plan.k_split as i32,
        splits: plan.splits as i32,
        out_f32: (Y::OUT == OutType::F32) as i32,
    };
    let (sym, smem) = kernel_for(t);
    let cfg = LaunchConfig {
        grid_dim: (plan.blocks_n as u32, plan.splits as u32, 1),
        block_dim: (plan.warps * 32, 1, 1),
        shared_mem_bytes: smem,
    };
    let f = gpu.func("gemm_skinny", sym)?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: params mirror SkinnyParams; x holds >= t rows of k, w is [n, k], y >= t rows of
    // n, bias [n] (checked above); k % 8 == 0 keeps every 16-byte access of a row in bounds;
    // splits > 1 only when scratch holds splits·t·n f32 (skinny_plan clamps to its length).
    unsafe { b.launch(cfg) }.map_err(drv(sym))?;
    gpu.after_launch(sym)?;
    if plan.splits > 1 {
        const THREADS: u32 = 256;
        let blocks = (t * n)
            .div_ceil(THREADS as usize)
            .clamp(1, gpu.sm_count.max(1) * 8);
        let rcfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.func("gemm_skinny", "gemm_skinny_reduce_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&params);
        // SAFETY: as above; the reduce reads partial[0 .. splits·t·n) written by the launch
        // before it on the same stream and writes y[0 .. t·n).
        unsafe { b.launch(rcfg) }.map_err(drv("gemm_skinny_reduce_bf16"))?;
        gpu.after_launch("gemm_skinny_reduce_bf16")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_round_trip() {
        for v in GemmVariant::ALL {
            assert_eq!(v.name().parse::<GemmVariant>().unwrap(), v);
        }
        assert!("cublas".parse::<GemmVariant>().is_err());
        // Auto is cuBLASLt at every row count while SKINNY_MAX_ROWS is 0 (measured slower).
        for t in [1, 32, 64, 512] {
            let want = if t <= SKINNY_MAX_ROWS { GemmVariant::Skinny } else { GemmVariant::Cublaslt };
            assert_eq!(GemmVariant::Auto.resolve(t, 4096), want, "t = {t}");
        }
        assert_eq!(GemmVariant::Auto.resolve(SKINNY_MAX_ROWS + 1, 4096), GemmVariant::Cublaslt);
        assert_eq!(GemmVariant::Auto.resolve(1, 4100), GemmVariant::Cublaslt);
        assert_eq!(GemmVariant::Skinny.resolve(100, 4096), GemmVariant::Skinny);
    }

    #[test]
    fn plans_cover_k_and_fit_scratch() {
        let shapes = [
            (12288, 4096),
            (4096, 4096),
            (24576, 4096),
            (4096, 12288),
            (126464, 4096),
            (4608, 3584),
            (3584, 18944),
            (1000, 136),
            (13, 8),
        ];
        for &(n, k) in &shapes {
            for t in [1, 19, 32, 64] {
                let scratch = skinny_scratch_len(64, n, k);
                let p = skinny_plan(&SkinnyConfig::default(), 132, t, n, k, scratch);
                assert!(
                    p.splits >= 1 && p.k_split.is_multiple_of(STAGE_K),
                    "{n}x{k}: {p:?}"
                );
                assert!(
                    p.k_split * p.splits >= k && p.k_split * (p.splits - 1) < k,
                    "{n}x{k}: {p:?}"
                );
                assert!(
                    p.splits == 1 || p.splits * t * n <= scratch,
                    "{n}x{k} t={t}: {p:?} scratch {scratch}"
                );
                assert!(
                    p.blocks_n * p.splits >= 132 || p.splits == 1 || k / MIN_SPLIT_K <= p.splits,
                    "{n}x{k}: {p:?}"
                );
                // No scratch: never split.
                assert_eq!(
                    skinny_plan(&SkinnyConfig::default(), 132, t, n, k, 0).splits,
                    1
                );
            }
        }
        // LLaDA O projection at 32 rows: 32 slabs of 128 rows, split 8 ways over k = 4096.
        let p = skinny_plan(&SkinnyConfig::default(), 132, 32, 4096, 4096, usize::MAX);
        assert_eq!((p.blocks_n, p.splits, p.k_split), (32, 8, 512));
    }
}
