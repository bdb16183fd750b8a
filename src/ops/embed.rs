//! `embed_bf16` (kernels/embed.cu): row gather `out[r, :] = table[ids[r], :]`, for the token
//! embedding and for gathering the rows that go through the LM head.

use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

const OP: &str = "gather_rows";
const THREADS: u32 = 256;

/// Mirrors `EmbedParams` in kernels/embed.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct EmbedParams {
    ids: u64,        // const uint32_t*
    table: u64,      // const bf16*
    out: u64,        // bf16*
    n: i32,          // int
    row_len: i32,    // int
    table_rows: i32, // int
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars).
unsafe impl cudarc::driver::DeviceRepr for EmbedParams {}

/// `out[r, :] = table[ids[r], :]` for `r < n`. `table` is `[table_rows, row_len]` with
/// `row_len % 8 == 0`; `out` holds at least `n` rows of `row_len`. Ids must be < table_rows
/// (validated by the caller on the host; the kernel traps otherwise).
pub fn gather_rows(
    gpu: &Gpu,
    n: usize,
    ids: &DTensor<u32>,
    table: &DTensor<bf16>,
    out: &mut DTensor<bf16>,
) -> Result<()> {
    let row_len = table.row_len();
    if table.dims.len() != 2
        || row_len == 0
        || !row_len.is_multiple_of(8)
        || table.rows() > i32::MAX as usize
    {
        return Err(Error::bad_input(format!("{OP}: tensor `table` {:?} must be 2-D with a row length that is a nonzero multiple of 8", table.dims)));
    }
    if ids.len() < n {
        return Err(Error::shape(OP, "ids", &[n], &ids.dims));
    }
    out.check_rows(OP, "out", n, row_len)?;
    if n == 0 {
        return Ok(());
    }
    if n * row_len / 8 > i32::MAX as usize {
        return Err(Error::bad_input(format!(
            "{OP}: {n} rows of {row_len} is too large"
        )));
    }
    let params = EmbedParams {
        ids: ids.ptr(gpu),
        table: table.ptr(gpu),
        out: out.ptr_mut(gpu),
        n: n as i32,
        row_len: row_len as i32,
        table_rows: table.rows() as i32,
    };
    let vecs = (n * row_len / 8) as u32;
    let lc = LaunchEx {
        grid: (vecs.div_ceil(THREADS), 1, 1),
        block: (THREADS, 1, 1),
        smem: 0,
        cluster: None,
        pdl: true,
    };
    // SAFETY: params mirror EmbedParams; ids holds >= n entries, out >= n rows of row_len,
    // table is [table_rows, row_len] (checked above); the kernel traps on an id >= table_rows
    // and waits for its predecessor (pdl_wait) before touching memory.
    unsafe { launch_ex(gpu, "embed", "embed_bf16", lc, &params) }
}
