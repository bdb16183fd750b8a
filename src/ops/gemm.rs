//! Linear layers `Y[t, n] = X[t, k] · W[n, k]ᵀ (+ bias[n])` with a selectable implementation:
//! cuBLASLt (`crate::gpu::gemm`) or the hand-written skinny GEMM of `kernels/gemm_skinny.cu`
//! (t ≤ 64 rows, memory-bound decode steps), and the dispatch between them ([`GemmVariant`]).
//!
//! The skinny kernel splits W into row slabs of 128 rows (grid x) and, for narrow shapes, k
//! into `splits` ranges (grid y) that run as one thread-block cluster per slab and sum their
//! partials in rank order through distributed shared memory (sm_90+; deterministic, one
//! launch, no scratch). Without clusters (sm_80) it never splits.
use std::str::FromStr;

use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::gemm::{GemmOut, OutType};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

const OP: &str = "gemm_skinny";

/// Most rows the skinny kernel accepts.
pub const SKINNY_ROW_LIMIT: usize = 64;
/// `Auto` uses the skinny kernel up to this many rows (cuBLASLt above); `None`: never. Measured
/// on the H100 (2026-11-25, benches/RESULTS.md v0.4): the skinny kernel matches cuBLASLt in
/// isolation (0.96–1.06× at 32 rows) but a 32-row LLaDA-8B decode forward is 6.67 ms with it
/// against 6.62 ms with cuBLASLt, so it stays a selectable variant until it wins in situ.
pub const AUTO_SKINNY_ROWS: Option<usize> = None;

/// W rows per block (`BN` in the kernel).
const BLOCK_ROWS: usize = 128;
/// k columns per pipeline stage; split boundaries are multiples of it (`BK`).
const STAGE_K: usize = 64;
/// Threads per block (`THREADS`).
const THREADS: u32 = 256;
/// Fewest k columns per split.
const MIN_SPLIT_K: usize = 512;
/// Most k splits (the portable thread-block cluster size).
pub const MAX_SPLITS: usize = 8;

/// Which implementation runs a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmVariant {
    /// cuBLASLt (autotuned per shape at its first call).
    Cublaslt,
    /// `gemm_skinny*_bf16`: t ≤ 64, k % 8 == 0.
    Skinny,
    /// Skinny when t ≤ [`AUTO_SKINNY_ROWS`] and the shape allows it, else cuBLASLt.
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

    /// The implementation that runs `t` rows of a `[n, k]` weight (never `Auto`). `Skinny`
    /// applies where the kernel can (t ≤ [`SKINNY_ROW_LIMIT`], k % 8 == 0) and leaves the rest
    /// (a full-canvas refresh step, say) to cuBLASLt.
    pub fn resolve(self, t: usize, k: usize) -> GemmVariant {
        let fits = k.is_multiple_of(8);
        match self {
            GemmVariant::Auto if AUTO_SKINNY_ROWS.is_some_and(|m| t <= m) && fits => GemmVariant::Skinny,
            GemmVariant::Skinny if t <= SKINNY_ROW_LIMIT && fits => GemmVariant::Skinny,
            GemmVariant::Cublaslt => GemmVariant::Cublaslt,
            _ => GemmVariant::Cublaslt,
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
/// `y` at least `[t, n]` (bf16 or f32), `bias` `[n]`; rows of `y` from t on are not written.
#[allow(clippy::too_many_arguments)]
pub fn linear<Y: GemmOut>(
    gpu: &Gpu,
    variant: GemmVariant,
    t: usize,
    x: &DTensor<bf16>,
    w: &DTensor<bf16>,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
) -> Result<()> {
    let k = w.dims.get(1).copied().unwrap_or(0);
    match variant.resolve(t, k) {
        GemmVariant::Cublaslt => crate::gpu::gemm::linear(gpu, t, x, w, bias, y),
        _ => skinny_linear(gpu, &SkinnyConfig::default(), t, x, w, bias, y),
    }
}

/// Launch-shape overrides for tuning sweeps; `Default` is what [`linear`] uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct SkinnyConfig {
    /// Number of k splits; `None` picks one from the SM count. Always clamped to
    /// [`MAX_SPLITS`], to k / 64, and to 1 without thread-block clusters.
    pub splits: Option<usize>,
    /// 128-column pipeline stages (`gemm_skinny*_k128_bf16`, one block per SM) instead of 64.
    pub k128: bool,
}

/// How a skinny GEMM is cut: `blocks_n` slabs of 128 W rows × `splits` k ranges of `k_split`
/// columns (the `splits` blocks of one slab form a cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyPlan {
    pub blocks_n: usize,
    pub splits: usize,
    pub k_split: usize,
}

/// The plan for a `[n, k]` weight on `sm_count` SMs. Memory-bound: enough SMs must stream, so
/// narrow shapes (fewer slabs than half the SMs: LLaDA's O and down projections) split k
/// until there are about 0.6 blocks per SM; each block keeps 3–4 stages of 16 KB in flight.
pub fn skinny_plan(cfg: &SkinnyConfig, sm_count: usize, clusters: bool, n: usize, k: usize) -> SkinnyPlan {
    let blocks_n = n.div_ceil(BLOCK_ROWS).max(1);
    // Measured on the H100 (tests/gpu_gemm_skinny.rs sweep): about 0.6 blocks per SM is
    // enough to stream W; more splits only add reduction and cluster overhead.
    let want = cfg.splits.unwrap_or_else(|| {
        if 2 * blocks_n >= sm_count {
            1
        } else {
            (sm_count * 5 / 8).div_ceil(blocks_n).min(k / MIN_SPLIT_K)
        }
    });
    let stage_k = if cfg.k128 { 2 * STAGE_K } else { STAGE_K };
    let s = if clusters { want.clamp(1, MAX_SPLITS).min(k.div_ceil(stage_k)) } else { 1 };
    let k_split = k.div_ceil(s).div_ceil(stage_k) * stage_k;
    SkinnyPlan { blocks_n, splits: k.div_ceil(k_split), k_split }
}

/// Mirrors `struct SkinnyParams` in kernels/gemm_skinny.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SkinnyParams {
    x: u64,       // const bf16* [>= t, k]
    w: u64,       // const bf16* [n, k]
    bias: u64,    // const bf16* [n] or nullptr
    y: u64,       // void* [>= t, n], bf16 or f32
    t: i32,       // int
    n: i32,       // int
    k: i32,       // int
    k_split: i32, // int
    out_f32: i32,  // int
    pad: i32,      // int (struct tail)
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for SkinnyParams {}

/// Row tiles (8 rows each: 1, 2, 4 or 8) of the skinny kernels' entry point for `t` rows; every
/// skinny family (bf16, FP8 W8A16 `mma`/`wgmma`, W8A8) has one entry point per tile count.
pub(crate) fn row_tiles(t: usize) -> usize {
    match t {
        0..=8 => 1,
        9..=16 => 2,
        17..=32 => 4,
        _ => 8,
    }
}

/// The entry point of `nt` row tiles from a family's four, `names` ordered 8, 16, 32, 64 rows.
pub(crate) fn by_row_tiles(nt: usize, names: [&'static str; 4]) -> &'static str {
    names[(nt.trailing_zeros() as usize).min(3)]
}

/// Entry point and dynamic shared memory for `t` rows: NT = ceil(t/8) rounded up to 1, 2, 4, 8
/// n-tiles; STAGES ring slots of (128 + 8·NT) rows × BK bf16 (`Tile<NT, BK>` in the kernel).
/// `swiglu`: the gate|up entry points with SwiGLU in the epilogue (64-column stages).
fn kernel_for(t: usize, k128: bool, swiglu: bool) -> (&'static str, u32) {
    let nt = row_tiles(t);
    let k128 = k128 && !swiglu;
    let sym = match (swiglu, k128) {
        (true, _) => by_row_tiles(nt, ["gemm_skinny8_swiglu_bf16", "gemm_skinny16_swiglu_bf16", "gemm_skinny32_swiglu_bf16", "gemm_skinny64_swiglu_bf16"]),
        (_, true) => by_row_tiles(nt, ["gemm_skinny8_k128_bf16", "gemm_skinny16_k128_bf16", "gemm_skinny32_k128_bf16", "gemm_skinny64_k128_bf16"]),
        _ => by_row_tiles(nt, ["gemm_skinny8_bf16", "gemm_skinny16_bf16", "gemm_skinny32_bf16", "gemm_skinny64_bf16"]),
    };
    let (bk, stages) = match (k128, nt == 8) {
        (false, false) => (STAGE_K, 5),
        (false, true) => (STAGE_K, 4),
        (true, false) => (2 * STAGE_K, 4),
        (true, true) => (2 * STAGE_K, 3),
    };
    (sym, (stages * (BLOCK_ROWS + 8 * nt) * bk * 2) as u32)
}

/// The gate|up projection followed by SwiGLU: `act[0..t] = SwiGLU(x[0..t] · w_gate_upᵀ)`, with
/// `w_gate_up` `[2·ffn, k]` (gate rows, then up rows), `act` `[>= t, ffn]`, SwiGLU exactly as
/// `ops::swiglu` over the bf16 GEMM output. Where `variant` resolves to the skinny kernel, one
/// launch does both (`gemm_skinny*_swiglu_bf16`: each block pairs 64 gate rows with their up
/// rows and writes the activation in its epilogue — bit-identical to the two-step path);
/// otherwise the GEMM writes `gu` (`[>= t, 2·ffn]`) and `ops::swiglu` reads it.
#[allow(clippy::too_many_arguments)]
pub fn linear_swiglu(
    gpu: &Gpu,
    variant: GemmVariant,
    t: usize,
    x: &DTensor<bf16>,
    w_gate_up: &DTensor<bf16>,
    gu: &mut DTensor<bf16>,
    act: &mut DTensor<bf16>,
) -> Result<()> {
    let k = w_gate_up.dims.get(1).copied().unwrap_or(0);
    match variant.resolve(t, k) {
        GemmVariant::Skinny => skinny_impl(gpu, &SkinnyConfig::default(), t, x, true, w_gate_up, None, act),
        _ => {
            linear(gpu, GemmVariant::Cublaslt, t, x, w_gate_up, None, gu)?;
            crate::ops::swiglu::swiglu(gpu, t, gu, act)
        }
    }
}

/// [`linear_swiglu`]'s skinny path with an explicit launch shape (tests and tuning).
pub fn skinny_linear_swiglu(
    gpu: &Gpu,
    cfg: &SkinnyConfig,
    t: usize,
    x: &DTensor<bf16>,
    w_gate_up: &DTensor<bf16>,
    act: &mut DTensor<bf16>,
) -> Result<()> {
    skinny_impl(gpu, cfg, t, x, true, w_gate_up, None, act)
}

/// The skinny kernel with an explicit launch shape (see [`linear`] for the operands).
pub fn skinny_linear<Y: GemmOut>(
    gpu: &Gpu,
    cfg: &SkinnyConfig,
    t: usize,
    x: &DTensor<bf16>,
    w: &DTensor<bf16>,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
) -> Result<()> {
    skinny_impl(gpu, cfg, t, x, false, w, bias, y)
}

/// Shared by the plain entry points and the SwiGLU-epilogue ones (`swiglu`: `w` is
/// `[2·ffn, k]`, no bias, `y` is the bf16 activation `[t, ffn]`, never split over k).
#[allow(clippy::too_many_arguments)]
fn skinny_impl<Y: GemmOut>(
    gpu: &Gpu,
    cfg: &SkinnyConfig,
    t: usize,
    x: &DTensor<bf16>,
    swiglu: bool,
    w: &DTensor<bf16>,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
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
    if swiglu {
        if !n.is_multiple_of(2) || bias.is_some() || Y::OUT != OutType::Bf16 {
            return Err(Error::bad_input(format!(
                "{OP}: SwiGLU epilogue needs an even row count of `w` {:?}, no bias and bf16 output",
                w.dims
            )));
        }
        y.check_rows(OP, "act", t, n / 2)?;
    } else {
        y.check_rows(OP, "y", t, n)?;
    }
    if let Some(b) = bias {
        if b.len() != n {
            return Err(Error::shape(OP, "bias", &[n], &b.dims));
        }
    }
    if t == 0 {
        return Ok(());
    }
    let clusters = crate::ops::attention::split_kv_supported(gpu)?;
    // The SwiGLU epilogue pairs gate and up rows inside one block: never split k.
    let cfg = if swiglu { SkinnyConfig { splits: Some(1), k128: false } } else { *cfg };
    let plan = skinny_plan(&cfg, gpu.sm_count, clusters, n, k);
    let params = SkinnyParams {
        x: x.ptr(gpu),
        w: w.ptr(gpu),
        bias: bias.map_or(0, |b| b.ptr(gpu)),
        y: y.ptr_mut(gpu),
        t: t as i32,
        n: n as i32,
        k: k as i32,
        k_split: plan.k_split as i32,
        out_f32: (Y::OUT == OutType::F32) as i32,
        pad: 0,
    };
    let (sym, smem) = kernel_for(t, cfg.k128, swiglu);
    let lc = LaunchEx {
        grid: (plan.blocks_n as u32, plan.splits as u32, 1),
        block: (THREADS, 1, 1),
        smem,
        cluster: (plan.splits > 1).then_some((1, plan.splits as u32, 1)),
        pdl: true,
    };
    // SAFETY: params mirror SkinnyParams; x holds >= t rows of k, w is [n, k], y >= t rows of
    // n, bias [n] (checked above); k % 8 == 0 keeps every 16-byte access of a row in bounds;
    // clusters (splits > 1) only where the device supports them.
    unsafe { launch_ex(gpu, "gemm_skinny", sym, lc, &params) }
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
        // Auto is cuBLASLt at every row count while AUTO_SKINNY_ROWS is None (measured slower).
        for t in [1, 32, 64, 512] {
            let want = if AUTO_SKINNY_ROWS.is_some_and(|m| t <= m) { GemmVariant::Skinny } else { GemmVariant::Cublaslt };
            assert_eq!(GemmVariant::Auto.resolve(t, 4096), want, "t = {t}");
        }
        assert_eq!(GemmVariant::Auto.resolve(AUTO_SKINNY_ROWS.unwrap_or(64) + 1, 4096), GemmVariant::Cublaslt);
        assert_eq!(GemmVariant::Auto.resolve(1, 4100), GemmVariant::Cublaslt);
        assert_eq!(GemmVariant::Skinny.resolve(64, 4096), GemmVariant::Skinny);
        assert_eq!(GemmVariant::Skinny.resolve(65, 4096), GemmVariant::Cublaslt);
        assert_eq!(GemmVariant::Skinny.resolve(8, 4100), GemmVariant::Cublaslt);
    }

    #[test]
    fn plans_cover_k() {
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
            for clusters in [true, false] {
                for (splits, k128) in [(None, false), (Some(1), true), (Some(3), false), (Some(8), true), (Some(100), false)] {
                    let p = skinny_plan(&SkinnyConfig { splits, k128 }, 132, clusters, n, k);
                    let ctx = format!("{n}x{k} clusters={clusters} splits={splits:?}: {p:?}");
                    assert!(p.k_split.is_multiple_of(if k128 { 2 * STAGE_K } else { STAGE_K }), "{ctx}");
                    assert!((1..=MAX_SPLITS).contains(&p.splits), "{ctx}");
                    assert!(p.k_split * p.splits >= k && p.k_split * (p.splits - 1) < k, "{ctx}");
                    assert_eq!(p.blocks_n, n.div_ceil(BLOCK_ROWS), "{ctx}");
                    if !clusters {
                        assert_eq!(p.splits, 1, "{ctx}");
                    }
                }
            }
        }
        // LLaDA O projection: 32 slabs of 128 rows, split 3 ways (96 blocks on 132 SMs).
        let p = skinny_plan(&SkinnyConfig::default(), 132, true, 4096, 4096);
        assert_eq!((p.blocks_n, p.splits, p.k_split), (32, 3, 1408));
        // QKV (96 slabs), gate|up and the LM head: enough slabs, no split.
        assert_eq!(skinny_plan(&SkinnyConfig::default(), 132, true, 12288, 4096).splits, 1);
        assert_eq!(skinny_plan(&SkinnyConfig::default(), 132, true, 24576, 4096).splits, 1);
        assert_eq!(skinny_plan(&SkinnyConfig::default(), 132, true, 126464, 4096).splits, 1);
    }

    #[test]
    fn params_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<SkinnyParams>(), 56); // 4 pointers + 6 ints
        assert_eq!(kernel_for(32, false, false), ("gemm_skinny32_bf16", 5 * (128 + 32) * 64 * 2));
        assert_eq!(kernel_for(7, true, false), ("gemm_skinny8_k128_bf16", 4 * (128 + 8) * 128 * 2));
        assert_eq!(kernel_for(40, true, true), ("gemm_skinny64_swiglu_bf16", 4 * (128 + 64) * 64 * 2));
        for t in [1, 9, 17, 33, 64] {
            for (k128, sw) in [(false, false), (true, false), (false, true)] {
                assert!(kernel_for(t, k128, sw).1 <= 227 << 10, "t={t} k128={k128} swiglu={sw}");
            }
        }
    }

    #[test]
    fn entry_points_follow_the_row_tiles() {
        for t in 1..=80usize {
            let rows = 8 * t.div_ceil(8).next_power_of_two().min(8);
            assert_eq!(kernel_for(t, false, false).0, format!("gemm_skinny{rows}_bf16"), "t={t}");
            assert_eq!(kernel_for(t, true, false).0, format!("gemm_skinny{rows}_k128_bf16"), "t={t}");
            for k128 in [false, true] {
                assert_eq!(kernel_for(t, k128, true).0, format!("gemm_skinny{rows}_swiglu_bf16"), "t={t}");
            }
        }
    }
}
