//! `add_rmsnorm_bf16` (kernels/norm.cu): fused residual add + RMSNorm, one block per row.
//! `residual = bf16(residual + delta)` (when a delta is given, stored back), then
//! `out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))` with x = residual in f32.
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
    let symbol = "add_rmsnorm_bf16";
    // SAFETY: params mirror NormParams; residual, delta and out hold >= rows rows of hidden,
    // weight holds hidden (checked above); threads * MAX_VPT * 8 >= hidden by construction;
    // with PDL the kernel waits for its predecessor before its first load.
    unsafe { launch_ex(gpu, "norm", symbol, lc, &params) }
}
