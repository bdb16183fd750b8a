//! `swiglu_bf16` (kernels/swiglu.cu): `out = bf16(bf16(silu(gate)) * up)` over `[rows, 2*ffn]`
//! (gate | up per row) into `[rows, ffn]`.
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::{drv, DTensor, Gpu};

const OP: &str = "swiglu";
const THREADS: u32 = 256;

/// Mirrors `SwigluParams` in kernels/swiglu.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SwigluParams {
    gu: u64,   // const bf16*
    out: u64,  // bf16*
    rows: i32, // int
    ffn: i32,  // int
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars).
unsafe impl cudarc::driver::DeviceRepr for SwigluParams {}

/// SwiGLU of the first `rows` rows: `gu` is `[>= rows, 2*ffn]`, `out` is `[>= rows, ffn]`,
/// `ffn % 8 == 0` with `ffn = out.row_len()`.
pub fn swiglu(gpu: &Gpu, rows: usize, gu: &DTensor<bf16>, out: &mut DTensor<bf16>) -> Result<()> {
    let ffn = out.row_len();
    if ffn == 0 || !ffn.is_multiple_of(8) {
        return Err(Error::bad_input(format!(
            "{OP}: tensor `out` {:?}: ffn must be a nonzero multiple of 8",
            out.dims
        )));
    }
    out.check_rows(OP, "out", rows, ffn)?;
    gu.check_rows(OP, "gu", rows, 2 * ffn)?;
    if rows == 0 {
        return Ok(());
    }
    let vecs = rows * ffn / 8;
    if vecs > i32::MAX as usize || 2 * ffn > i32::MAX as usize {
        return Err(Error::bad_input(format!(
            "{OP}: {rows} rows of {ffn} is too large"
        )));
    }
    let params = SwigluParams {
        gu: gu.ptr(gpu),
        out: out.ptr_mut(gpu),
        rows: rows as i32,
        ffn: ffn as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: ((vecs as u32).div_ceil(THREADS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.func("swiglu", "swiglu_bf16")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: params mirror SwigluParams; gu holds >= rows rows of 2*ffn and out >= rows rows
    // of ffn (checked above), so every 16-byte access is in bounds.
    unsafe { b.launch(cfg) }.map_err(drv("swiglu_bf16"))?;
    gpu.after_launch("swiglu_bf16")
}
