//! The `split-scale` epilogues of the W8A8 path (kernels/gemm_w8a8.cu): the scale pass, the
//! scale + SwiGLU pass, and the scale + SwiGLU + per-row quantisation pass that feeds the
//! down projection. Launch wrappers on raw addresses (the W8A8 GEMM checked the operands)
//! and checked entry points for the tests.
use half::bf16;

#[cfg(doc)]
use super::quantize_rows;
use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

/// Block size of the epilogue kernels (`W8_THREADS`), halved when the grid is small.
const THREADS: u32 = 256;
/// 16-byte vectors per thread (`W8_VPT`).
const VPT: usize = 2;

/// Mirrors `struct W8a8ScaleParams` in kernels/gemm_w8a8.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ScaleParams {
    y: u64,    // bf16* [>= t, n]
    sx: u64,   // const float* [>= t]
    sw: u64,   // const float* [n]
    bias: u64, // const bf16* [n] or nullptr
    t: i32,    // int
    n: i32,    // int
}
// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for ScaleParams {}

/// Mirrors `struct W8a8SwigluParams` in kernels/gemm_w8a8.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SwigluParams {
    gu: u64,  // const bf16* [>= t, 2·ffn]
    act: u64, // bf16* [>= t, ffn]
    sx: u64,  // const float* [>= t]
    sw: u64,  // const float* [2·ffn]
    t: i32,   // int
    ffn: i32, // int
}
// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for SwigluParams {}

/// Mirrors `struct W8a8SwigluQuantParams` in kernels/gemm_w8a8.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SwigluQuantParams {
    gu: u64,  // const bf16* [>= t, 2·ffn]
    act: u64, // bf16* [>= t, ffn] or nullptr
    q: u64,   // uint8_t* [>= t, ffn]
    s: u64,   // float* [>= t]: in sx, out act's row scales
    sw: u64,  // const float* [2·ffn]
    t: i32,   // int
    ffn: i32, // int
}
// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for SwigluQuantParams {}

/// 16-byte vectors per thread and blocks per row (one cluster) of
/// `w8a8_scale_swiglu_quant_bf16` (`WQ_VPT`, `WQ_MAX_SPLIT`; blocks of at most 512 threads).
const WQ_VPT: usize = 2;
const WQ_MAX_SPLIT: usize = 8;
/// Largest ffn of the fused SwiGLU + quantisation epilogue (a cluster of 8 blocks of 512).
pub(super) const WQ_MAX_FFN: usize = 8 * 512 * WQ_VPT * WQ_MAX_SPLIT;

/// Threads per block and blocks per row of the fused epilogue for `t` rows of `vpr` vectors,
/// or `None` where it cannot run (a row needs a cluster and the GPU has none: sm_90+ only).
/// 256-thread blocks (512 where a row would need more than a cluster of them), halved while
/// the grid has under two blocks per SM and the row still fits one cluster.
fn swiglu_quant_shape(t: usize, vpr: usize, sm_count: usize, clusters: bool) -> Option<(usize, usize)> {
    let split = |threads: usize| vpr.div_ceil(threads * WQ_VPT);
    let mut threads = if split(256) > WQ_MAX_SPLIT { 512 } else { 256 };
    while threads > 64 && t * split(threads) < 2 * sm_count && split(threads / 2) <= WQ_MAX_SPLIT {
        threads /= 2;
    }
    let s = split(threads);
    (s <= WQ_MAX_SPLIT && (s == 1 || clusters)).then_some((threads, s))
}

/// Whether the fused SwiGLU + quantisation epilogue runs `t` rows of `ffn` on this GPU.
pub(super) fn swiglu_quant_runs(gpu: &Gpu, t: usize, ffn: usize) -> bool {
    ffn.is_multiple_of(8) && ffn <= WQ_MAX_FFN && swiglu_quant_shape(t, ffn / 8, gpu.sm_count, gpu.cc_major >= 9).is_some()
}

/// The `split-scale` SwiGLU epilogue followed by the per-row quantisation of its output:
/// act's codes into `q` (row stride ffn) and its row scales into `s`, which holds the GEMM's
/// row scales on entry; `act` written too when given. Same codes and scales as
/// [`scale_swiglu_raw`] then [`quantize_rows`] on act. The caller checks shapes,
/// `ffn % 8 == 0`, [`swiglu_quant_runs`], 16-byte aligned gu, act, sw and 8-byte aligned q.
#[allow(clippy::too_many_arguments)]
pub(super) fn scale_swiglu_quant_raw(gpu: &Gpu, t: usize, ffn: usize, gu: u64, act: Option<u64>, q: u64, s: u64, sw: u64) -> Result<()> {
    if t == 0 {
        return Ok(());
    }
    let shape = swiglu_quant_shape(t, ffn / 8, gpu.sm_count, gpu.cc_major >= 9);
    let Some((threads, split)) = shape.filter(|_| t <= i32::MAX as usize && ffn <= WQ_MAX_FFN) else {
        return Err(Error::bad_input(format!(
            "w8a8_scale_swiglu_quant: {t} rows of ffn {ffn} do not fit (ffn <= {WQ_MAX_FFN}; above {} a row needs a thread-block cluster, sm_90+)",
            8 * 512 * WQ_VPT
        )));
    };
    let lc = LaunchEx {
        grid: (t as u32, split as u32, 1),
        block: (threads as u32, 1, 1),
        smem: 0,
        cluster: (split > 1).then_some((1, split as u32, 1)),
        pdl: true,
    };
    let params = SwigluQuantParams { gu, act: act.unwrap_or(0), q, s, sw, t: t as i32, ffn: ffn as i32 };
    // SAFETY: params mirror W8a8SwigluQuantParams; the caller checked gu >= t rows of 2·ffn,
    // act (if any) >= t rows of ffn, q >= t·ffn codes, s >= t, sw 2·ffn, the alignment and
    // ffn % 8 == 0; split · threads · WQ_VPT >= ffn / 8 (swiglu_quant_shape), so the blocks of
    // row r cover its vectors; clusters (split > 1) only on sm_90+; block (r, ·) touches row
    // r only, and s[r] is read by all of them before the cluster barrier after which block 0
    // writes it.
    unsafe { launch_ex(gpu, "gemm_w8a8", "w8a8_scale_swiglu_quant_bf16", lc, &params) }
}

/// Grid and block of an epilogue over `t` rows of `vpr` 16-byte vectors (as `ops::swiglu`).
fn epilogue_launch(gpu: &Gpu, sym: &str, t: usize, vpr: usize) -> Result<LaunchEx> {
    let threads = if t * vpr.div_ceil(THREADS as usize * VPT) >= 2 * gpu.sm_count { THREADS } else { THREADS / 2 };
    let chunks = vpr.div_ceil(threads as usize * VPT);
    if t > i32::MAX as usize || 16 * vpr > i32::MAX as usize || chunks > 65535 {
        return Err(Error::bad_input(format!("{sym}: {t} rows of {} values is too large", 8 * vpr)));
    }
    Ok(LaunchEx { grid: (t as u32, chunks as u32, 1), block: (threads, 1, 1), smem: 0, cluster: None, pdl: true })
}

/// `y[r, c] = bf16(sx[r]·sw[c]·y[r, c] (+ bias[c]))` in place for rows `0..t` (addresses:
/// y `[>= t, n]` bf16, sx `[>= t]`, sw `[n]` f32, bias `[n]` bf16). The caller checks shapes,
/// `n % 8 == 0` and 16-byte alignment.
pub(super) fn scale_raw(gpu: &Gpu, t: usize, n: usize, y: u64, sx: u64, sw: u64, bias: Option<u64>) -> Result<()> {
    if t == 0 {
        return Ok(());
    }
    let sym = "w8a8_scale_bf16";
    let lc = epilogue_launch(gpu, sym, t, n / 8)?;
    let params = ScaleParams { y, sx, sw, bias: bias.unwrap_or(0), t: t as i32, n: n as i32 };
    // SAFETY: params mirror W8a8ScaleParams; the caller checked y >= t rows of n (n % 8 == 0,
    // 16-byte aligned), sx >= t, sw and bias n; block (r, c) touches row r < t and vectors
    // < n / 8 only (the kernel checks).
    unsafe { launch_ex(gpu, "gemm_w8a8", sym, lc, &params) }
}

/// `act[r, j] = bf16(bf16(silu(g))·u)` with `g = bf16(sx[r]·sw[j]·gu[r, j])`,
/// `u = bf16(sx[r]·sw[ffn + j]·gu[r, ffn + j])` for rows `0..t` (addresses: gu `[>= t, 2·ffn]`,
/// act `[>= t, ffn]` bf16, sx `[>= t]`, sw `[2·ffn]`). The caller checks shapes,
/// `ffn % 8 == 0` and alignment.
pub(super) fn scale_swiglu_raw(gpu: &Gpu, t: usize, ffn: usize, gu: u64, act: u64, sx: u64, sw: u64) -> Result<()> {
    if t == 0 {
        return Ok(());
    }
    let sym = "w8a8_scale_swiglu_bf16";
    let lc = epilogue_launch(gpu, sym, t, ffn / 8)?;
    let params = SwigluParams { gu, act, sx, sw, t: t as i32, ffn: ffn as i32 };
    // SAFETY: params mirror W8a8SwigluParams; the caller checked gu >= t rows of 2·ffn, act
    // >= t rows of ffn (ffn % 8 == 0, 16-byte aligned), sx >= t, sw 2·ffn; block (r, c)
    // touches row r < t and vectors < ffn / 8 only.
    unsafe { launch_ex(gpu, "gemm_w8a8", sym, lc, &params) }
}

pub(super) fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

fn check_scales(op: &str, t: usize, n: usize, sx: &DTensor<f32>, sw: &DTensor<f32>) -> Result<()> {
    if sx.len() < t {
        return Err(Error::shape(op, "sx", &[t], &sx.dims));
    }
    if sw.len() != n {
        return Err(Error::shape(op, "sw", &[n], &sw.dims));
    }
    Ok(())
}

/// The `split-scale` epilogue on its own (tests): `y[0..t] = bf16(sx[r]·sw[c]·y + bias[c])` in
/// place; y `[>= t, n]` with n % 8 == 0, sx `[>= t]`, sw `[n]`, bias `[n]`.
pub fn scale_rows_cols(
    gpu: &Gpu,
    t: usize,
    y: &mut DTensor<bf16>,
    sx: &DTensor<f32>,
    sw: &DTensor<f32>,
    bias: Option<&DTensor<bf16>>,
) -> Result<()> {
    const SOP: &str = "w8a8_scale";
    let n = y.row_len();
    if n == 0 || !n.is_multiple_of(8) {
        return Err(Error::bad_input(format!("{SOP}: tensor `y` {:?}: rows must be a nonzero multiple of 8", y.dims)));
    }
    y.check_rows(SOP, "y", t, n)?;
    check_scales(SOP, t, n, sx, sw)?;
    if let Some(b) = bias {
        if b.len() != n {
            return Err(Error::shape(SOP, "bias", &[n], &b.dims));
        }
    }
    let (yp, sxp, swp, bp) = (y.ptr_mut(gpu), sx.ptr(gpu), sw.ptr(gpu), bias.map(|b| b.ptr(gpu)));
    if !aligned16(&[yp, swp, bp.unwrap_or(0)]) {
        return Err(Error::bad_input(format!("{SOP}: y, sw and bias must be 16-byte aligned")));
    }
    scale_raw(gpu, t, n, yp, sxp, swp, bp)
}

/// The fused `split-scale` SwiGLU epilogue on its own (tests): `act[0..t]` from the unscaled
/// gate|up product `gu` `[>= t, 2·ffn]`, sx `[>= t]`, sw `[2·ffn]`; ffn % 8 == 0.
pub fn scale_swiglu(
    gpu: &Gpu,
    t: usize,
    gu: &DTensor<bf16>,
    sx: &DTensor<f32>,
    sw: &DTensor<f32>,
    act: &mut DTensor<bf16>,
) -> Result<()> {
    const SOP: &str = "w8a8_scale_swiglu";
    let ffn = act.row_len();
    if ffn == 0 || !ffn.is_multiple_of(8) {
        return Err(Error::bad_input(format!("{SOP}: tensor `act` {:?}: ffn must be a nonzero multiple of 8", act.dims)));
    }
    act.check_rows(SOP, "act", t, ffn)?;
    gu.check_rows(SOP, "gu", t, 2 * ffn)?;
    check_scales(SOP, t, 2 * ffn, sx, sw)?;
    let (gp, ap, sxp, swp) = (gu.ptr(gpu), act.ptr_mut(gpu), sx.ptr(gpu), sw.ptr(gpu));
    if !aligned16(&[gp, ap, swp]) {
        return Err(Error::bad_input(format!("{SOP}: gu, act and sw must be 16-byte aligned")));
    }
    scale_swiglu_raw(gpu, t, ffn, gp, ap, sxp, swp)
}

/// The fused `split-scale` SwiGLU + quantisation epilogue on its own (tests): from the
/// unscaled gate|up product `gu` `[>= t, 2·ffn]`, the GEMM's row scales `s` (`>= t`, replaced
/// by act's row scales) and `sw` `[2·ffn]`, writes act's E4M3 codes into `q` (`>= t·ffn`, row
/// stride ffn) and, when given, act itself (`[>= t, ffn]`). The same codes and scales as
/// [`scale_swiglu`] followed by [`quantize_rows`] on act.
#[allow(clippy::too_many_arguments)]
pub fn scale_swiglu_quant(
    gpu: &Gpu,
    t: usize,
    gu: &DTensor<bf16>,
    sw: &DTensor<f32>,
    act: Option<&mut DTensor<bf16>>,
    q: &mut DTensor<u8>,
    s: &mut DTensor<f32>,
) -> Result<()> {
    const SOP: &str = "w8a8_scale_swiglu_quant";
    let ffn = gu.row_len() / 2;
    if ffn == 0 || !ffn.is_multiple_of(8) || gu.row_len() != 2 * ffn || ffn > WQ_MAX_FFN {
        return Err(Error::bad_input(format!(
            "{SOP}: tensor `gu` {:?}: rows must be 2·ffn with ffn a nonzero multiple of 8 up to {WQ_MAX_FFN}",
            gu.dims
        )));
    }
    if !swiglu_quant_runs(gpu, t, ffn) {
        return Err(Error::bad_input(format!("{SOP}: ffn {ffn} needs thread-block clusters (sm_90+) on this GPU")));
    }
    gu.check_rows(SOP, "gu", t, 2 * ffn)?;
    check_scales(SOP, t, 2 * ffn, s, sw)?;
    if q.len() < t * ffn {
        return Err(Error::shape(SOP, "q", &[t, ffn], &q.dims));
    }
    let ap = match act {
        Some(a) => {
            a.check_rows(SOP, "act", t, ffn)?;
            if a.row_len() != ffn {
                return Err(Error::shape(SOP, "act", &[t, ffn], &a.dims));
            }
            Some(a.ptr_mut(gpu))
        }
        None => None,
    };
    let (gp, swp, qp) = (gu.ptr(gpu), sw.ptr(gpu), q.ptr_mut(gpu));
    if !aligned16(&[gp, swp, ap.unwrap_or(0)]) || !qp.is_multiple_of(8) {
        return Err(Error::bad_input(format!("{SOP}: gu, act and sw must be 16-byte aligned, q 8-byte aligned")));
    }
    scale_swiglu_quant_raw(gpu, t, ffn, gp, ap, qp, s.ptr_mut(gpu), swp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<ScaleParams>(), 40); // 4 pointers + 2 ints
        assert_eq!(std::mem::size_of::<SwigluParams>(), 40); // 4 pointers + 2 ints
        assert_eq!(std::mem::size_of::<SwigluQuantParams>(), 48); // 5 pointers + 2 ints
        assert_eq!(WQ_MAX_FFN, 65536);
    }

    #[test]
    fn swiglu_quant_blocks_cover_every_row() {
        for &(t, vpr) in &[(1, 1), (1, 1536), (32, 1536), (32, 2368), (7, 4096), (2048, 1536), (2048, 4096), (300, 125), (3, 8192)] {
            let (threads, split) = swiglu_quant_shape(t, vpr, 132, true).unwrap();
            assert!((1..=WQ_MAX_SPLIT).contains(&split) && split * threads * WQ_VPT >= vpr, "{t} {vpr}: {threads} {split}");
            assert!([64, 128, 256, 512].contains(&threads), "{t} {vpr}: {threads}");
            // Without clusters: one block per row, or nothing.
            match swiglu_quant_shape(t, vpr, 132, false) {
                Some((th, 1)) => assert!(th * WQ_VPT >= vpr),
                Some(other) => panic!("{t} {vpr}: {other:?} without clusters"),
                None => assert!(vpr > 64 * WQ_VPT),
            }
        }
        // LLaDA's 32-row step: 6 blocks of 128 per row (192 blocks); W2's 2048 rows: 3 of 256.
        assert_eq!(swiglu_quant_shape(32, 1536, 132, true), Some((128, 6)));
        assert_eq!(swiglu_quant_shape(2048, 1536, 132, true), Some((256, 3)));
        assert_eq!(swiglu_quant_shape(1, 8193, 132, true), None);
    }
}
