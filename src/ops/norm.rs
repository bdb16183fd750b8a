//! `add_rmsnorm_bf16` (kernels/norm.cu): fused residual add + RMSNorm, one block per row.
//! `residual = bf16(residual + delta)` (when a delta is given, stored back), then
//! `out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))` with x = residual in f32.
//! [`add_rmsnorm_quant`] (`add_rmsnorm_quant_bf16`) also writes the E4M3 codes and row scales
//! of `out` for the skinny W8A8 GEMM that reads it, exactly as `ops::gemm_w8a8::quantize_rows`.
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

const OP: &str = "add_rmsnorm";
/// 16-byte vectors per thread held in registers (`NORM_MAX_VPT` in the kernel).
const MAX_VPT: usize = 4;
/// Largest block (`NORM_MAX_THREADS`, the kernel's `__launch_bounds__`).
const MAX_THREADS: usize = 768;
/// Largest supported hidden size.
pub const MAX_HIDDEN: usize = MAX_THREADS * MAX_VPT * 8;

/// Mirrors `NormParams` in kernels/norm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct NormParams {
    residual: u64, // bf16*
    delta: u64,    // const bf16* (0 = no add)
    weight: u64,   // const bf16*
    out: u64,      // bf16*
    rows: i32,     // int
    hidden: i32,   // int
    eps: f32,      // float
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32/f32 scalars).
unsafe impl cudarc::driver::DeviceRepr for NormParams {}

/// Mirrors `NormQuantParams` in kernels/norm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct NormQuantParams {
    n: NormParams,
    q: u64, // uint8_t* [rows, hidden]
    s: u64, // float* [rows]
}

// SAFETY: plain-old-data mirror of the C struct (NormParams padded to 8 bytes, then pointers).
unsafe impl cudarc::driver::DeviceRepr for NormQuantParams {}

/// For the first `rows` rows of `residual` (`[>= rows, hidden]`, hidden = `weight.len()`):
/// adds `delta` (same shape) into `residual` when given, then writes the RMSNorm of the
/// (updated) residual times `weight` into `out` (`[>= rows, hidden]`).
/// `hidden % 8 == 0`, `hidden <= MAX_HIDDEN`.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm(
    gpu: &Gpu,
    rows: usize,
    residual: &mut DTensor<bf16>,
    delta: Option<&DTensor<bf16>>,
    weight: &DTensor<bf16>,
    eps: f32,
    out: &mut DTensor<bf16>,
) -> Result<()> {
    norm_impl(gpu, rows, residual, delta, weight, eps, out, None)
}

/// [`add_rmsnorm`], and rows `0..rows` of `out` quantised to E4M3 per row into `q`
/// (`[>= rows, hidden]`, hidden % 16 == 0) and `s` (`>= rows` scales): bit for bit
/// `add_rmsnorm` followed by `ops::gemm_w8a8::quantize_rows(out)`, in one launch.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_quant(
    gpu: &Gpu,
    rows: usize,
    residual: &mut DTensor<bf16>,
    delta: Option<&DTensor<bf16>>,
    weight: &DTensor<bf16>,
    eps: f32,
    out: &mut DTensor<bf16>,
    q: &mut DTensor<u8>,
    s: &mut DTensor<f32>,
) -> Result<()> {
    let hidden = weight.len();
    if !hidden.is_multiple_of(16) {
        return Err(Error::bad_input(format!("{OP}: E4M3 rows need hidden % 16 == 0, got {hidden}")));
    }
    if q.len() < rows * hidden {
        return Err(Error::shape(OP, "q", &[rows, hidden], &q.dims));
    }
    if s.len() < rows {
        return Err(Error::shape(OP, "s", &[rows], &s.dims));
    }
    norm_impl(gpu, rows, residual, delta, weight, eps, out, Some((q, s)))
}

#[allow(clippy::too_many_arguments)]
fn norm_impl(
    gpu: &Gpu,
    rows: usize,
    residual: &mut DTensor<bf16>,
    delta: Option<&DTensor<bf16>>,
    weight: &DTensor<bf16>,
    eps: f32,
    out: &mut DTensor<bf16>,
    quant: Option<(&mut DTensor<u8>, &mut DTensor<f32>)>,
) -> Result<()> {
    let hidden = weight.len();
    if hidden == 0 || !hidden.is_multiple_of(8) || hidden > MAX_HIDDEN {
        return Err(Error::bad_input(format!(
            "{OP}: tensor `weight` {:?}: hidden must be a nonzero multiple of 8 and <= {MAX_HIDDEN}",
            weight.dims
        )));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::bad_input(format!(
            "{OP}: eps {eps} must be finite and >= 0"
        )));
    }
    residual.check_rows(OP, "residual", rows, hidden)?;
    if let Some(d) = delta {
        d.check_rows(OP, "delta", rows, hidden)?;
    }
    out.check_rows(OP, "out", rows, hidden)?;
    if rows == 0 {
        return Ok(());
    }
    if rows > i32::MAX as usize {
        return Err(Error::bad_input(format!("{OP}: {rows} rows is too many")));
    }
    let vecs = hidden / 8;
    // This block size fixes the kernel's reduction order (see kernels/norm.cu): keep it.
    let threads = vecs.div_ceil(MAX_VPT).next_multiple_of(32).min(MAX_THREADS);
    let params = NormParams {
        residual: residual.ptr_mut(gpu),
        delta: delta.map_or(0, |d| d.ptr(gpu)),
        weight: weight.ptr(gpu),
        out: out.ptr_mut(gpu),
        rows: rows as i32,
        hidden: hidden as i32,
        eps,
    };
    // The kernel waits for its predecessor (pdl_wait) before touching memory, so it may be
    // launched early (PDL).
    let lc = LaunchEx {
        grid: (rows as u32, 1, 1),
        block: (threads as u32, 1, 1),
        smem: 0,
        cluster: None,
        pdl: true,
    };
    // SAFETY: params mirror NormParams / NormQuantParams; residual, delta and out hold >= rows
    // rows of hidden, weight holds hidden, q >= rows·hidden codes and s >= rows scales
    // (checked above and in add_rmsnorm_quant); threads * MAX_VPT * 8 >= hidden by
    // construction; with PDL the kernel waits for its predecessor before its first load.
    match quant {
        None => unsafe { launch_ex(gpu, "norm", "add_rmsnorm_bf16", lc, &params) },
        Some((q, s)) => {
            let qp = NormQuantParams { n: params, q: q.ptr_mut(gpu), s: s.ptr_mut(gpu) };
            unsafe { launch_ex(gpu, "norm", "add_rmsnorm_quant_bf16", lc, &qp) }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn params_match_the_c_layout() {
        // 4 pointers, 2 ints, a float (+ 4 bytes of tail padding); then 2 pointers.
        assert_eq!(std::mem::size_of::<super::NormParams>(), 48);
        assert_eq!(std::mem::size_of::<super::NormQuantParams>(), 64);
    }
}
