//! `add_rmsnorm_bf16` (kernels/norm.cu): fused residual add + RMSNorm, one block per row.
//! `residual = bf16(residual + delta)` (when a delta is given, stored back), then
//! `out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))` with x = residual in f32.
//! [`add_rmsnorm_quant`] (`add_rmsnorm_quant_bf16`) also writes the E4M3 codes and row scales
//! of `out` for the skinny W8A8 GEMM that reads it, exactly as `ops::gemm_w8a8::quantize_rows`.
//! [`add_rmsnorm_deferred`] (`add_rmsnorm{,_quant}_scaled_bf16`) takes a delta that still needs
//! the scale epilogue of the W8A8 GEMM that wrote it ([`DeltaScale`]) and applies it on the fly.
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
/// Largest block of the scaled-delta kernels (`NORM_SCALED_THREADS`).
const MAX_SCALED_THREADS: usize = 512;
/// Largest hidden size of [`add_rmsnorm_deferred`].
pub const MAX_SCALED_HIDDEN: usize = MAX_SCALED_THREADS * MAX_VPT * 8;

/// The scale epilogue a W8A8 `split-scale` GEMM left to the residual add that consumes its
/// output (`ops::gemm_w8a8::W8a8::take_deferred` hands it out): the output `y` `[rows, n]`
/// holds the unscaled product D, and the value to add is
/// `bf16(sx[r]·sw[c]·D[r, c] (+ bias[c]))`, bit for bit what `w8a8_scale_bf16` writes.
/// Made only by `ops::gemm_w8a8`, which checked the addresses against the shapes: sx holds
/// `rows` floats, sw `n` floats (16-byte aligned), bias `n` bf16 (16-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaScale {
    pub(crate) y: u64,
    pub(crate) rows: usize,
    pub(crate) n: usize,
    pub(crate) sx: u64,
    pub(crate) sw: u64,
    pub(crate) bias: Option<u64>,
}

impl DeltaScale {
    /// The epilogue `bf16(sx[r]·sw[c]·y[r, c] (+ bias[c]))` of rows `0..rows` of `y`
    /// (`[>= rows, n]`): checks `sx` (`>= rows`), `sw` and `bias` (`[n]`) and the 16-byte
    /// alignment the kernel's vector loads need. The W8A8 GEMM makes these itself; this is
    /// for callers that hold such an output and its scales (and for tests).
    pub fn new(gpu: &Gpu, y: &DTensor<bf16>, rows: usize, sx: &DTensor<f32>, sw: &DTensor<f32>, bias: Option<&DTensor<bf16>>) -> Result<Self> {
        let n = y.row_len();
        y.check_rows(OP, "delta", rows, n)?;
        if sx.len() < rows {
            return Err(Error::shape(OP, "sx", &[rows], &sx.dims));
        }
        if sw.len() != n {
            return Err(Error::shape(OP, "sw", &[n], &sw.dims));
        }
        if let Some(b) = bias {
            if b.len() != n {
                return Err(Error::shape(OP, "bias", &[n], &b.dims));
            }
        }
        let d = DeltaScale { y: y.ptr(gpu), rows, n, sx: sx.ptr(gpu), sw: sw.ptr(gpu), bias: bias.map(|b| b.ptr(gpu)) };
        d.check_aligned()?;
        Ok(d)
    }

    pub(crate) fn check_aligned(&self) -> Result<()> {
        if !(self.sw.is_multiple_of(16) && self.bias.unwrap_or(0).is_multiple_of(16)) {
            return Err(Error::bad_input(format!("{OP}: the deferred scales sw and bias must be 16-byte aligned")));
        }
        Ok(())
    }
}

/// Mirrors `NormParams` in kernels/norm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct NormParams {
    residual: u64, // bf16*
    delta: u64,    // const bf16* (0 = no add)
    weight: u64,   // const bf16*
    out: u64,      // bf16*
    dsx: u64,      // const float* (0 = delta as it is)
    dsw: u64,      // const float*
    dbias: u64,    // const bf16* (0 = no bias)
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
    norm_impl(gpu, rows, residual, delta, None, weight, eps, out, None)
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
    check_codes(rows, weight.len(), q, s)?;
    norm_impl(gpu, rows, residual, delta, None, weight, eps, out, Some((q, s)))
}

/// [`add_rmsnorm`] (with `quant`: [`add_rmsnorm_quant`]) where `delta` is the output of a
/// W8A8 GEMM whose scale epilogue was deferred to this add: the added value is
/// `bf16(sx[r]·sw[c]·delta[r, c] (+ bias[c]))` (see [`DeltaScale`]), bit for bit the same
/// as the epilogue followed by the plain add. `hidden <= MAX_SCALED_HIDDEN`; `scale` must
/// describe exactly `delta` and these rows.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_deferred(
    gpu: &Gpu,
    rows: usize,
    residual: &mut DTensor<bf16>,
    delta: &DTensor<bf16>,
    scale: &DeltaScale,
    weight: &DTensor<bf16>,
    eps: f32,
    out: &mut DTensor<bf16>,
    quant: Option<(&mut DTensor<u8>, &mut DTensor<f32>)>,
) -> Result<()> {
    let hidden = weight.len();
    if scale.y != delta.ptr(gpu) || scale.rows != rows || scale.n != hidden {
        return Err(Error::bad_input(format!(
            "{OP}: the deferred W8A8 scales describe {} rows of {} columns at another tensor, not `delta` ({rows} rows of {hidden})",
            scale.rows, scale.n
        )));
    }
    if hidden > MAX_SCALED_HIDDEN {
        return Err(Error::bad_input(format!("{OP}: a scaled delta needs hidden <= {MAX_SCALED_HIDDEN}, got {hidden}")));
    }
    match quant {
        None => norm_impl(gpu, rows, residual, Some(delta), Some(scale), weight, eps, out, None),
        Some((q, s)) => {
            check_codes(rows, hidden, q, s)?;
            norm_impl(gpu, rows, residual, Some(delta), Some(scale), weight, eps, out, Some((q, s)))
        }
    }
}

/// The E4M3 outputs of the quantising norms: 16-byte code rows (hidden % 16 == 0), `q` holding
/// `rows · hidden` codes and `s` `rows` scales.
fn check_codes(rows: usize, hidden: usize, q: &DTensor<u8>, s: &DTensor<f32>) -> Result<()> {
    if !hidden.is_multiple_of(16) {
        return Err(Error::bad_input(format!("{OP}: E4M3 rows need hidden % 16 == 0, got {hidden}")));
    }
    if q.len() < rows * hidden {
        return Err(Error::shape(OP, "q", &[rows, hidden], &q.dims));
    }
    if s.len() < rows {
        return Err(Error::shape(OP, "s", &[rows], &s.dims));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn norm_impl(
    gpu: &Gpu,
    rows: usize,
    residual: &mut DTensor<bf16>,
    delta: Option<&DTensor<bf16>>,
    dscale: Option<&DeltaScale>,
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
    let threads = vecs.div_ceil(MAX_VPT).next_multiple_of(32).min(if dscale.is_some() { MAX_SCALED_THREADS } else { MAX_THREADS });
    let params = NormParams {
        residual: residual.ptr_mut(gpu),
        delta: delta.map_or(0, |d| d.ptr(gpu)),
        weight: weight.ptr(gpu),
        out: out.ptr_mut(gpu),
        dsx: dscale.map_or(0, |d| d.sx),
        dsw: dscale.map_or(0, |d| d.sw),
        dbias: dscale.and_then(|d| d.bias).unwrap_or(0),
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
    // (checked above and in add_rmsnorm_quant / add_rmsnorm_deferred); a DeltaScale's sx,
    // sw and bias hold rows, hidden and hidden values (checked where it was made, its rows
    // and n against these in add_rmsnorm_deferred); threads * MAX_VPT * 8 >= hidden by
    // construction (hidden <= MAX_SCALED_HIDDEN with a scale); with PDL the kernel waits
    // for its predecessor before its first load.
    let (plain, quantised) = match dscale {
        None => ("add_rmsnorm_bf16", "add_rmsnorm_quant_bf16"),
        Some(_) => ("add_rmsnorm_scaled_bf16", "add_rmsnorm_quant_scaled_bf16"),
    };
    match quant {
        None => unsafe { launch_ex(gpu, "norm", plain, lc, &params) },
        Some((q, s)) => {
            let qp = NormQuantParams { n: params, q: q.ptr_mut(gpu), s: s.ptr_mut(gpu) };
            unsafe { launch_ex(gpu, "norm", quantised, lc, &qp) }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn params_match_the_c_layout() {
        // 7 pointers, 2 ints, a float (+ 4 bytes of tail padding); then 2 pointers.
        assert_eq!(std::mem::size_of::<super::NormParams>(), 72);
        assert_eq!(std::mem::size_of::<super::NormQuantParams>(), 88);
    }
}
