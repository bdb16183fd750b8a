//! `swiglu_bf16` (kernels/swiglu.cu): `out = bf16(bf16(silu(gate)) * up)` over `[rows, 2*ffn]`
//! (gate | up per row) into `[rows, ffn]`.
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

const OP: &str = "swiglu";
/// Block size (`SW_THREADS` in the kernel), halved when the grid would not cover the SMs twice.
const THREADS: u32 = 256;
/// 16-byte output vectors per thread (`SW_VPT`).
const VPT: usize = 2;

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
pub fn swiglu(
    gpu: &Gpu,
    rows: usize,
    gu: &DTensor<bf16>,
    out: &mut DTensor<bf16>,
) -> Result<()> {
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
    let vpr = ffn / 8;
    let threads = if rows * vpr.div_ceil(THREADS as usize * VPT) >= 2 * gpu.sm_count {
        THREADS
    } else {
        THREADS / 2
    };
    let chunks = vpr.div_ceil(threads as usize * VPT);
    if rows > i32::MAX as usize || 2 * ffn > i32::MAX as usize || chunks > 65535 {
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
    let (symbol, grid_dim) = ("swiglu_bf16", (rows as u32, chunks as u32, 1));
    // The kernel waits for its predecessor (pdl_wait) before touching memory, so it may be
    // launched early (PDL).
    let lc = LaunchEx {
        grid: grid_dim,
        block: (threads, 1, 1),
        smem: 0,
        cluster: None,
        pdl: true,
    };
    // SAFETY: params mirror SwigluParams; gu holds >= rows rows of 2*ffn and out >= rows rows
    // of ffn (checked above); block (r, c) touches row r < rows only, vectors < ffn / 8 only
    // (the kernel checks), so every access is in bounds.
    unsafe { launch_ex(gpu, "swiglu", symbol, lc, &params) }
}
