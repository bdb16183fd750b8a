//! The per-row activation quantiser of the W8A8 paths (kernels/gemm_fp8.cu
//! `quantize_rows_vec_fp8_bf16` / `quantize_rows_fp8_bf16`): `q[r, :] = e4m3(x[r, :] / s[r])`,
//! `s[r] = max|x[r, :]| / 448` (1 for a zero row), as the host quantiser.
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

/// Block size and 16-byte vectors per thread of `quantize_rows_vec_fp8_bf16` (`QV_THREADS`,
/// `QV_VPT`).
const QV_THREADS: usize = 512;
const QV_VPT: usize = 8;

/// Mirrors `struct RowQuantParams` in kernels/gemm_fp8.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RowQuantParams {
    x: u64, // const bf16* [>= t, k]
    q: u64, // uint8_t* [>= t, k]
    s: u64, // float* [>= t]
    t: i32, // int
    k: i32, // int
}
// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for RowQuantParams {}

/// Quantises rows `0..t` of `x` (`[>= t, k]` bf16) into `q` (at least `t · k` codes, row
/// stride k) and `s` (at least `t` scales).
pub fn quantize_rows(gpu: &Gpu, t: usize, x: &DTensor<bf16>, q: &mut DTensor<u8>, s: &mut DTensor<f32>) -> Result<()> {
    let k = x.row_len();
    if x.rows() < t || x.dims.len() != 2 {
        return Err(Error::shape("quantize_rows_fp8", "x", &[t, k], &x.dims));
    }
    if q.len() < t * k {
        return Err(Error::shape("quantize_rows_fp8", "q", &[t, k], &q.dims));
    }
    if s.len() < t {
        return Err(Error::shape("quantize_rows_fp8", "s", &[t], &s.dims));
    }
    if t == 0 {
        return Ok(());
    }
    let (ti, ki) = (i32::try_from(t), i32::try_from(k));
    let (Ok(ti), Ok(ki)) = (ti, ki) else {
        return Err(Error::bad_input(format!("quantize_rows_fp8: [{t}, {k}] is too large")));
    };
    let params = RowQuantParams { x: x.ptr(gpu), q: q.ptr_mut(gpu), s: s.ptr_mut(gpu), t: ti, k: ki };
    // The vector kernel (16-byte loads, the row held in registers) where k % 8 == 0 and the
    // row fits its QV_THREADS × QV_VPT vectors; both give the same codes and scales.
    let vec = k.is_multiple_of(8) && k <= 8 * QV_THREADS * QV_VPT && x.ptr(gpu).is_multiple_of(16) && q.ptr(gpu).is_multiple_of(8);
    let (sym, threads) = if vec { ("quantize_rows_vec_fp8_bf16", QV_THREADS as u32) } else { ("quantize_rows_fp8_bf16", 256) };
    // The kernels wait for their predecessor (pdl_wait) before the first load: launched early
    // (PDL), the launch latency hides behind the kernel that writes x.
    let lc = LaunchEx { grid: (t as u32, 1, 1), block: (threads, 1, 1), smem: 0, cluster: None, pdl: true };
    // SAFETY: params mirror RowQuantParams; x holds >= t rows of k, q >= t·k bytes, s >= t
    // floats (checked); one block per row; the vector kernel only with k % 8 == 0 (rows of
    // whole 16-byte vectors, 16-byte aligned x, 8-byte aligned q) and k within its registers.
    unsafe { launch_ex(gpu, "gemm_fp8", sym, lc, &params) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn params_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<super::RowQuantParams>(), 32); // 3 pointers + 2 ints
    }
}
