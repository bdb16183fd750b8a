//! `add_rmsnorm_bf16` (kernels/norm.cu): fused residual add + RMSNorm, one block per row.
//! `residual = bf16(residual + delta)` (when a delta is given, stored back), then
//! `out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))` with x = residual in f32.
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::{drv, DTensor, Gpu};

const OP: &str = "add_rmsnorm";
/// 16-byte vectors per thread held in registers (`NORM_MAX_VPT` in the kernel).
const MAX_VPT: usize = 4;
const MAX_THREADS: usize = 1024;
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
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.func("norm", "add_rmsnorm_bf16")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: params mirror NormParams; residual, delta and out hold >= rows rows of hidden,
    // weight holds hidden (checked above); threads * MAX_VPT * 8 >= hidden by construction.
    unsafe { b.launch(cfg) }.map_err(drv("add_rmsnorm_bf16"))?;
    gpu.after_launch("add_rmsnorm_bf16")
}
