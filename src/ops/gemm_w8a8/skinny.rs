//! The `skinny` W8A8 path for decode-sized row counts (t ≤ 64): the rows quantised to E4M3
//! (`quantize_rows`), then kernels/gemm_w8a8_skinny.cu multiplies the codes on the E4M3
//! tensor cores (`mma.sync` m16n8k32) straight from shared memory, with the scales, the bias and
//! (gate|up) SwiGLU in its epilogue: one GEMM launch where `split-scale` takes two, and the
//! weight streamed by the skinny GEMMs' design (128-row slabs, cluster split-K). Measured on
//! the H100 (benches/RESULTS.md v0.12) it streams at 1.6–2.4 TB/s, like the W8A16 kernel, and
//! W1 steps run faster on `split-scale`, so it runs only when selected (`DEMASK_W8A8=skinny`).
//!
//! Output: `y[r, c] = bf16(f32(sx[r]·sw[c])·Σ + bias[c])` (Σ the f32 sum of code products), so
//! one rounding where `split-scale` rounds the unscaled product to bf16 first; the gate|up entry
//! points write `act = bf16(bf16(silu(g))·u)`, g and u the bf16-rounded scaled sums.
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::gemm::{GemmOut, OutType};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};
use crate::ops::gemm::{skinny_plan, SkinnyConfig, SKINNY_ROW_LIMIT};
use crate::ops::gemm_fp8::Fp8Weight;
use crate::quant::ScaleLayout;

const OP: &str = "gemm_w8a8_skinny";
const THREADS: u32 = 256;
/// k columns per pipeline stage (`BK`); split boundaries are multiples of it.
const STAGE_K: usize = 128;
/// W rows per block (`BN`).
const BLOCK_ROWS: usize = 128;

/// Mirrors `struct W8a8SkinnyParams` in kernels/fp8.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct W8a8SkinnyParams {
    x: u64,       // const uint8_t* [>= t, k]
    sx: u64,      // const float* [>= t]
    w: u64,       // const uint8_t* [n, k]
    scales: u64,  // const float* [n]
    bias: u64,    // const bf16* [n] or nullptr
    y: u64,       // void* [>= t, n] (swiglu: n/2)
    t: i32,       // int
    n: i32,       // int
    k: i32,       // int
    k_split: i32, // int
    out_f32: i32, // int
    pad: i32,     // int
}
// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for W8a8SkinnyParams {}

impl W8a8SkinnyParams {
    /// The block for `t` rows of an `[n, k]` weight (`w` codes, `scales` per channel), unsplit.
    pub(super) fn new(ops: &Operands, w: u64, scales: u64, t: usize, n: usize, k: usize, out_f32: bool) -> Self {
        W8a8SkinnyParams {
            x: ops.xq,
            sx: ops.sx,
            w,
            scales,
            bias: ops.bias.unwrap_or(0),
            y: ops.y,
            t: t as i32,
            n: n as i32,
            k: k as i32,
            k_split: k as i32,
            out_f32: out_f32 as i32,
            pad: 0,
        }
    }
}

/// (entry point, dynamic shared memory) for `t ≤ 64` rows: NT = 1, 2, 4, 8 n-tiles of 8 rows,
/// STAGES × (128·128 W codes + 8·NT·128 X codes) (`TileQ<NT>`).
fn kernel_for(t: usize, swiglu: bool) -> (&'static str, u32) {
    use crate::ops::gemm::{by_row_tiles, row_tiles};
    let nt = row_tiles(t);
    let stages = match nt {
        1 | 2 => 6,
        4 => 5,
        _ => 4,
    };
    let smem = (stages * (BLOCK_ROWS * STAGE_K + 8 * nt * STAGE_K)) as u32;
    let sym = if swiglu {
        by_row_tiles(nt, ["gemm_w8a8_skinny8_swiglu_bf16", "gemm_w8a8_skinny16_swiglu_bf16", "gemm_w8a8_skinny32_swiglu_bf16", "gemm_w8a8_skinny64_swiglu_bf16"])
    } else {
        by_row_tiles(nt, ["gemm_w8a8_skinny8_bf16", "gemm_w8a8_skinny16_bf16", "gemm_w8a8_skinny32_bf16", "gemm_w8a8_skinny64_bf16"])
    };
    (sym, smem)
}

/// Why the skinny kernel cannot run `t` rows of `w` on a GPU of compute capability
/// `cc_major`.x (`None`: it can). Hopper only: the build's other targets (sm_80 SASS, PTX)
/// carry a trapping body instead of the E4M3 MMA.
pub(super) fn refusal(cc_major: i32, t: usize, w: &Fp8Weight) -> Option<String> {
    let (n, k) = (w.n(), w.k());
    if cc_major != 9 {
        Some(format!("needs an sm_90 GPU (Hopper; this is compute capability {cc_major}.x)"))
    } else if t > SKINNY_ROW_LIMIT {
        Some(format!("takes at most {SKINNY_ROW_LIMIT} rows"))
    } else if w.layout != ScaleLayout::Channel {
        Some(format!("needs channel scales (the weight has {} scales)", w.layout.name()))
    } else if n == 0 || k == 0 || !k.is_multiple_of(16) || n > i32::MAX as usize || k > i32::MAX as usize {
        Some("needs n > 0 and k a nonzero multiple of 16 (below 2^31)".to_string())
    } else {
        None
    }
}

/// Device addresses of one skinny W8A8 launch: the quantised rows and their scales, the bias
/// and the output (`[>= t, n]`, or `[>= t, n/2]` for SwiGLU).
pub(super) struct Operands {
    pub xq: u64,
    pub sx: u64,
    pub bias: Option<u64>,
    pub y: u64,
}

/// Launches the kernel for `t ≤ 64` quantised rows (`splits`: k splits, `None` from the SM count;
/// SwiGLU never splits). The caller checked the operands' shapes and [`refusal`].
pub(super) fn launch(gpu: &Gpu, t: usize, w: &Fp8Weight, ops: &Operands, out_f32: bool, swiglu: bool, splits: Option<usize>) -> Result<()> {
    if t == 0 {
        return Ok(());
    }
    let (n, k) = (w.n(), w.k());
    let clusters = crate::ops::attention::split_kv_supported(gpu)?;
    let cfg = SkinnyConfig { splits: if swiglu { Some(1) } else { splits }, k128: true };
    let plan = skinny_plan(&cfg, gpu.sm_count, clusters, n, k);
    debug_assert!(plan.k_split.is_multiple_of(STAGE_K));
    let params = W8a8SkinnyParams {
        k_split: plan.k_split as i32,
        ..W8a8SkinnyParams::new(ops, w.q.ptr(gpu), w.scales.ptr(gpu), t, n, k, out_f32)
    };
    let (sym, smem) = kernel_for(t, swiglu);
    let lc = LaunchEx {
        grid: (plan.blocks_n as u32, plan.splits as u32, 1),
        block: (THREADS, 1, 1),
        smem,
        cluster: (plan.splits > 1).then_some((1, plan.splits as u32, 1)),
        pdl: true,
    };
    // SAFETY: params mirror W8a8SkinnyParams; the caller checked xq >= t rows of k codes, sx >=
    // t, y >= t rows of n (n/2 for SwiGLU), w [n, k] with k % 16 == 0 and channel scales [n],
    // bias [n]; t ≤ 64; clusters only where supported.
    unsafe { launch_ex(gpu, "gemm_w8a8_skinny", sym, lc, &params) }
}

/// The kernel on its own, for tests and sweeps: `y[0..t] = sx·sw·(xq · wᵀ) (+ bias)` from rows
/// already quantised (`xq` `[>= t, k]` codes, `sx` `[>= t]`), with an explicit split count.
#[allow(clippy::too_many_arguments)]
pub fn skinny_w8a8<Y: GemmOut>(
    gpu: &Gpu,
    splits: Option<usize>,
    t: usize,
    xq: &DTensor<u8>,
    sx: &DTensor<f32>,
    w: &Fp8Weight,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
) -> Result<()> {
    check_quantized(OP, refusal(gpu.cc_major, t, w), t, xq, sx, w, bias)?;
    y.check_rows(OP, "y", t, w.n())?;
    let ops = Operands { xq: xq.ptr(gpu), sx: sx.ptr(gpu), bias: bias.map(|b| b.ptr(gpu)), y: y.ptr_mut(gpu) };
    launch(gpu, t, w, &ops, Y::OUT == OutType::F32, false, splits)
}

/// The operand checks of the kernel-level entry points (`skinny_w8a8`, `stream_w8a8`): the
/// kernel's `refusal` of the shape (`why`), `xq` `[>= t, k]`, `sx` `[>= t]`, channel scales
/// `[n]` and the bias `[n]`. Each names the operand it refuses.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_quantized(
    op: &str,
    why: Option<String>,
    t: usize,
    xq: &DTensor<u8>,
    sx: &DTensor<f32>,
    w: &Fp8Weight,
    bias: Option<&DTensor<bf16>>,
) -> Result<()> {
    let (n, k) = (w.n(), w.k());
    if let Some(why) = why {
        return Err(Error::bad_input(format!("{op}: [{n}, {k}] weight, {t} rows: {why}")));
    }
    xq.check_rows(op, "xq", t, k)?;
    if sx.len() < t {
        return Err(Error::shape(op, "sx", &[t], &sx.dims));
    }
    if w.scales.dims != [n] {
        return Err(Error::shape(op, "scales", &[n], &w.scales.dims));
    }
    match bias {
        Some(b) if b.len() != n => Err(Error::shape(op, "bias", &[n], &b.dims)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<W8a8SkinnyParams>(), 72); // 6 pointers + 6 ints
        assert_eq!(kernel_for(32, false), ("gemm_w8a8_skinny32_bf16", 5 * (16384 + 32 * 128)));
        assert_eq!(kernel_for(1, true), ("gemm_w8a8_skinny8_swiglu_bf16", 6 * (16384 + 8 * 128)));
        for t in [1, 9, 17, 33, 64] {
            let smem = kernel_for(t, false).1;
            // Two blocks per SM on an H100 (228 KB of shared memory per SM, 1 KB reserved each),
            // and the k-group reduction tile (2 × 8·NT × 128 f32) fits the ring.
            assert!(2 * (smem + 1024) <= 228 << 10, "t={t}: {smem} bytes");
            let nt = t.div_ceil(8).next_power_of_two();
            assert!(smem as usize >= 2 * 8 * nt * 128 * 4, "t={t}");
        }
    }

    #[test]
    fn entry_points_follow_the_row_tiles() {
        for t in 1..=64usize {
            let rows = 8 * t.div_ceil(8).next_power_of_two();
            assert_eq!(kernel_for(t, false).0, format!("gemm_w8a8_skinny{rows}_bf16"), "t={t}");
            assert_eq!(kernel_for(t, true).0, format!("gemm_w8a8_skinny{rows}_swiglu_bf16"), "t={t}");
        }
    }
}
