//! W8A8 for large row counts (a full-canvas step, batched decoding): the activations are
//! quantised per row to E4M3 (`quantize_rows_fp8_bf16` in kernels/gemm_fp8.cu, scale
//! `max|x[r, :]| / 448`, as the host quantiser) and multiplied with the FP8 weight by
//! cuBLASLt's FP8 tensor-core GEMM with per-row × per-channel outer-vector scales
//! (`gpu::gemm_fp8lt`). [`W8a8`] owns the quantised-activation scratch (allocated once, for
//! the model's row capacity) and the cuBLASLt plans.
//!
//! Channel-scaled weights and bf16 output only. Block-scaled weights, f32 output, or a
//! cuBLASLt without outer-vector FP8 scaling (found at the first call: [`W8a8::supported`])
//! take the W8A16 kernel in 64-row chunks instead (`ops::gemm_fp8`).
use cudarc::driver::PushKernelArg;
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::gemm::{GemmOut, OutType};
use crate::gpu::gemm_fp8lt::Fp8Lt;
use crate::gpu::{drv, DTensor, Gpu};
use crate::ops::gemm_fp8::Fp8Weight;
use crate::quant::ScaleLayout;

const OP: &str = "gemm_w8a8";

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
    let f = gpu.func("gemm_fp8", "quantize_rows_fp8_bf16")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&params);
    let cfg = cudarc::driver::LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: params mirror RowQuantParams; x holds >= t rows of k, q >= t·k bytes, s >= t
    // floats (checked); one block per row.
    unsafe { b.launch(cfg) }.map_err(drv("quantize_rows_fp8_bf16"))?;
    gpu.after_launch("quantize_rows_fp8_bf16")
}

/// Scratch and cuBLASLt state of the W8A8 path for up to `rows` rows of up to `k_max` columns.
pub struct W8a8 {
    lt: Fp8Lt,
    xq: DTensor<u8>,
    sx: DTensor<f32>,
    k_max: usize,
    /// Without and with the bias epilogue: `None` until the first GEMM of that kind;
    /// `Some(false)` when cuBLASLt has no FP8 algorithm with outer-vector scales for it (then
    /// those calls fall back to the chunked W8A16 kernel).
    supported: [Option<bool>; 2],
}

impl W8a8 {
    pub fn new(gpu: &Gpu, rows: usize, k_max: usize) -> Result<Self> {
        Ok(W8a8 { lt: Fp8Lt::new(gpu)?, xq: gpu.alloc(&[rows.max(1), k_max])?, sx: gpu.alloc(&[rows.max(1)])?, k_max, supported: [None; 2] })
    }

    /// Whether the cuBLASLt FP8 path runs here, without a bias (`None`: not tried yet).
    pub fn supported(&self) -> Option<bool> {
        self.supported[0]
    }
    /// The same with the bias epilogue (Dream's q|k|v projection).
    pub fn supported_with_bias(&self) -> Option<bool> {
        self.supported[1]
    }

    /// Whether [`W8a8::linear`] takes `t` rows of `w` into a `Y` output, with a bias or not
    /// (else the caller uses the W8A16 kernel).
    pub fn takes<Y: GemmOut>(&self, t: usize, w: &Fp8Weight, bias: bool) -> bool {
        self.supported[bias as usize] != Some(false)
            && w.layout == ScaleLayout::Channel
            && Y::OUT == OutType::Bf16
            && t <= self.sx.len()
            && w.k() <= self.k_max
    }

    /// `y[0..t] = x[0..t] · dequant(w)ᵀ (+ bias)` with x quantised per row. Returns
    /// `Ok(false)` (nothing launched) when cuBLASLt turns out to have no algorithm for it.
    pub fn linear<Y: GemmOut>(
        &mut self,
        gpu: &Gpu,
        t: usize,
        x: &DTensor<bf16>,
        w: &Fp8Weight,
        bias: Option<&DTensor<bf16>>,
        y: &mut DTensor<Y>,
    ) -> Result<bool> {
        let (n, k) = (w.n(), w.k());
        let bi = bias.is_some() as usize;
        if !self.takes::<Y>(t, w, bias.is_some()) {
            return Err(Error::bad_input(format!(
                "{OP}: {t} rows of a {:?} weight [{n}, {k}] into {:?} output: needs channel scales, bf16 output, \
                 t <= {} and k <= {}",
                w.layout,
                Y::OUT,
                self.sx.len(),
                self.k_max
            )));
        }
        x.check_rows(OP, "x", t, k)?;
        y.check_rows(OP, "y", t, n)?;
        if w.scales.dims != [n] {
            return Err(Error::shape(OP, "scales", &[n], &w.scales.dims));
        }
        if let Some(b) = bias {
            if b.len() != n {
                return Err(Error::shape(OP, "bias", &[n], &b.dims));
            }
        }
        if !k.is_multiple_of(16) {
            return Err(Error::bad_input(format!("{OP}: k = {k} must be a multiple of 16")));
        }
        quantize_rows(gpu, t, x, &mut self.xq, &mut self.sx)?;
        let r = self.lt.matmul_raw(
            gpu,
            t,
            n,
            k,
            self.xq.ptr(gpu),
            w.q.ptr(gpu),
            self.sx.ptr(gpu),
            w.scales.ptr(gpu),
            bias.map(|b| b.ptr(gpu)),
            y.ptr_mut(gpu),
        );
        match r {
            Ok(()) => {
                self.supported[bi] = Some(true);
                Ok(true)
            }
            // No algorithm at the first plan: remember, and let the caller fall back.
            Err(Error::Driver { op, .. }) if op.starts_with("cublasLtMatmulAlgoGetHeuristic") && self.supported[bi].is_none() => {
                self.supported[bi] = Some(false);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
