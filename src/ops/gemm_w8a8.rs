//! W8A8 for large row counts (a full-canvas step, batched decoding): the activations are
//! quantised per row to E4M3 (`quantize_rows_fp8_bf16` in kernels/gemm_fp8.cu, scale
//! `sx[r] = max|x[r, :]| / 448`, as the host quantiser) and multiplied with the channel-scaled
//! FP8 weight on cuBLASLt's FP8 tensor cores. Since the row scale and the channel scale factor
//! out of the dot product, `y[r, c] = sx[r] · sw[c] · Σ_k qx[r, k] · qw[c, k] (+ bias[c])`, and
//! [`W8a8`] runs it by the first of these paths ([`W8a8Path`]) that takes it:
//!
//! 0. `skinny` (t ≤ 64, Hopper; only when selected: `DEMASK_W8A8=skinny`):
//!    kernels/gemm_w8a8_skinny.cu, the E4M3 codes on `mma.sync` m16n8k32 with scales, bias and
//!    SwiGLU in its epilogue (see `gemm_w8a8::skinny`). Measured slower than `split-scale` in
//!    W1 decode steps on the H100, so `auto` leaves it out.
//!    `stream` (t ≤ 64, k % 128 == 0, Hopper; only when selected: `DEMASK_W8A8=stream`): the
//!    same contract in kernels/gemm_w8a8_stream.cu on the warpgroup MMA, the weight streamed
//!    stream-K by one persistent block per SM through TMA copies (see `gemm_w8a8::stream`;
//!    faster than `split-scale` back to back, slower in W1 decode steps on the H100).
//! 1. `outer-vec`: one cuBLASLt call with sx and sw as outer-vector scales and the bias in its
//!    epilogue (`gpu::gemm_fp8lt::Fp8Lt::matmul_raw`; cuBLAS ≥ 12.9, and not on every GPU: the
//!    H100 with the CUDA 13.0 cuBLASLt has no algorithm for it).
//! 2. `split-scale`: cuBLASLt's plain FP8 GEMM (no scales, no bias) writes
//!    `D = bf16(qx · qwᵀ)` into the output buffer itself, then `w8a8_scale_bf16`
//!    (kernels/gemm_w8a8.cu) rewrites it in place as `bf16(sx[r]·sw[c]·D + bias[c])`; for the
//!    gate|up projection `w8a8_scale_swiglu_bf16` applies the scales and SwiGLU in one pass
//!    into `act` (bit-identical to the scale kernel followed by `ops::swiglu`). Three of these
//!    passes can be fused into the kernel that reads their output (same bits; off with
//!    [`W8a8::set_fused_epilogues`]): [`W8a8::linear_deferred`] leaves the scale to the next
//!    residual add (`ops::norm::add_rmsnorm_deferred`, through [`W8a8::take_deferred`]), and
//!    [`W8a8::linear_swiglu_for`] has the SwiGLU pass quantise `act` for the down projection
//!    (`w8a8_scale_swiglu_quant_bf16`, module `epilogue`), which then skips its quantiser.
//! 3. Neither (block-scaled weights, an f32 output, k or n not as cuBLASLt's FP8 kernels need,
//!    or no algorithm): [`W8a8::linear`] launches nothing and the caller runs the W8A16 kernel
//!    in 64-row chunks (`ops::gemm_fp8`), reading W ⌈t/64⌉ times.
//!
//! Which row counts come here is [`W8a8::min_rows`] (`DEMASK_W8A8_MIN_ROWS`, default
//! [`W8A8_MIN_ROWS`]): `ops::gemm_fp8::linear_any` sends fewer rows to the W8A16 kernel.
//!
//! Each path's support is probed at its first call (a cuBLASLt heuristic query) and
//! remembered; [`W8a8Select`] (`DEMASK_W8A8=auto|outer-vec|split-scale|w8a16`, or
//! [`W8a8::select`]) restricts the choice to one path, for tests and side-by-side timing.
//!
//! Why D is bf16 in the output buffer rather than f32 in a scratch buffer (LLaDA-8B, W2 batch
//! 64: 64 × 32 = 2048 live rows; per layer the GEMMs write 25.2 M (QKV) + 8.4 M (O) + 50.3 M
//! (gate|up) + 8.4 M (down) = 92.3 M values):
//! - f32 D: the GEMM writes 4 B per value, the epilogue reads 4 and writes 2 (gate|up: reads 4
//!   per value, writes `act`, half as many values, at 2): 503 MB of epilogue traffic per layer,
//!   16.1 GB per step, ≈ 5.3 ms at 3.03 TB/s; plus a scratch of t × 24576 × 4 B (201 MB at
//!   2048 rows, 3.2 GB for the 32768-row full-canvas steps of the same workload).
//! - bf16 D: 2 B written by the GEMM (what the fused outer-vec path writes too), the epilogue
//!   reads 2 and writes 2 in place (gate|up: the same bytes as the `ops::swiglu` pass that the
//!   bf16 path runs anyway): 319 MB per layer, 10.2 GB per step, ≈ 3.4 ms, no scratch at all.
//!   Against the bf16 model's own SwiGLU pass that is ≈ 1.8 ms more per 2048-row step, and
//!   ≈ 3.7 ms for f32, on FP8 GEMMs of ≈ 19–20 ms (28.6 TFLOP at about twice the measured
//!   735 TFLOP/s of bf16).
//! - Precision: bf16 D rounds twice (the product, then the scaled value; ≤ 2⁻⁸ relative each)
//!   where f32 D (and a fused outer-vector epilogue) rounds once. Both are far below the E4M3
//!   rounding of the activations (≤ 2⁻⁴ relative per element) that W8A8 already accepts.
//!
//! So bf16 (≈ 2 ms per step and all the scratch memory saved, for one extra bf16 rounding).
//! [`W8a8`] owns the quantised-activation scratch (allocated once, for the model's row
//! capacity) and the cuBLASLt handle, workspace and plans; a call allocates nothing and is
//! CUDA-graph capturable once its shape has run eagerly (plans made and timed).

use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::gemm::{GemmOut, OutType};
use crate::gpu::gemm_fp8lt::{no_algorithm, Fp8Lt};
use crate::gpu::{DTensor, Gpu};
use crate::ops::gemm_fp8::Fp8Weight;
use crate::ops::norm::DeltaScale;
use crate::quant::ScaleLayout;

const OP: &str = "gemm_w8a8";

pub use crate::quant::{w8a8_min_rows_from_env as min_rows_from_env, W8A8_MIN_ROWS};

mod epilogue;
mod paths;
mod quant;
mod skinny;
mod stream;
mod swiglu;
use epilogue::{aligned16, scale_raw};
pub use epilogue::{scale_rows_cols, scale_swiglu, scale_swiglu_quant};
pub use paths::{W8a8Path, W8a8Select};
pub use quant::quantize_rows;
pub use skinny::skinny_w8a8;
pub use stream::{stream_w8a8, stream_w8a8_swiglu, StreamScratch};


/// Scratch and cuBLASLt state of the W8A8 path for up to `rows` rows of up to `k_max` columns.
pub struct W8a8 {
    lt: Fp8Lt,
    xq: DTensor<u8>,
    sx: DTensor<f32>,
    k_max: usize,
    select: W8a8Select,
    /// The GPU's compute capability major version (`skinny` needs 9).
    cc_major: i32,
    /// The fewest rows a GEMM must have to take the W8A8 path (`linear_any`); fewer run the
    /// W8A16 kernel. Default [`W8A8_MIN_ROWS`], `DEMASK_W8A8_MIN_ROWS` overrides.
    min_rows: usize,
    /// `outer-vec` without and with the bias epilogue, then `split-scale`: `None` until the
    /// path's first GEMM; `Some(false)` when cuBLASLt had no algorithm for that first GEMM.
    supported: [Option<bool>; 3],
    /// The path of the last call (`None`: it fell back).
    last: Option<W8a8Path>,
    /// (address, rows) of an input whose codes and scales are already in `xq` / `sx` (written
    /// by `ops::norm::add_rmsnorm_quant`): the next GEMM on exactly that input skips the
    /// quantiser. Cleared by every GEMM.
    prequantized: Option<(u64, usize)>,
    /// The scale epilogue of the last [`W8a8::linear_deferred`], left to the residual add
    /// that reads its output ([`W8a8::take_deferred`]). Any other GEMM before it is taken is
    /// an error: its quantiser would overwrite the row scales.
    deferred: Option<DeltaScale>,
    /// Whether the `split-scale` epilogues may be fused into their consumers
    /// ([`W8a8::linear_deferred`], [`W8a8::linear_swiglu_for`]); off: each GEMM finishes its
    /// own output (the same values, more launches; for side-by-side tests and timing).
    fuse: bool,
    /// Why the last path refused the last call that fell back through it (cuBLASLt's message).
    refused: Option<String>,
    /// The `stream` kernel's workspace: allocated on Hopper once a selection allows `stream`
    /// (4.3 MB on an H100), never otherwise.
    stream: Option<StreamScratch>,
}

impl W8a8 {
    /// Scratch for `rows` rows of up to `k_max` columns; paths from `DEMASK_W8A8` (default
    /// `auto`).
    pub fn new(gpu: &Gpu, rows: usize, k_max: usize) -> Result<Self> {
        let mut m = W8a8 {
            lt: Fp8Lt::new(gpu)?,
            xq: gpu.alloc(&[rows.max(1), k_max])?,
            sx: gpu.alloc(&[rows.max(1)])?,
            k_max,
            select: W8a8Select::from_env()?,
            cc_major: gpu.cc_major,
            min_rows: min_rows_from_env()?,
            supported: [None; 3],
            last: None,
            prequantized: None,
            deferred: None,
            fuse: true,
            refused: None,
            stream: None,
        };
        m.select(gpu, m.select)?;
        Ok(m)
    }

    /// The fewest rows a GEMM needs for `linear_any` / `linear_swiglu_any` to send it here.
    pub fn min_rows(&self) -> usize {
        self.min_rows
    }

    /// Sets [`W8a8::min_rows`] (at least 1): W8A8 from `rows` rows up, W8A16 below.
    pub fn set_min_rows(&mut self, rows: usize) -> Result<()> {
        if rows == 0 {
            return Err(Error::bad_input("W8A8 minimum row count: must be at least 1"));
        }
        self.min_rows = rows;
        Ok(())
    }

    /// Whether `linear_any` / `linear_swiglu_any` will send `t` rows of `w` here (any W8A8
    /// path), so the producer of their input may quantise it itself
    /// ([`W8a8::quant_scratch`], then [`W8a8::set_prequantized`]).
    pub fn takes_prequantized(&self, t: usize, w: &crate::ops::gemm_fp8::LinearWeight) -> bool {
        match w {
            crate::ops::gemm_fp8::LinearWeight::Fp8(w) => t >= self.min_rows && self.takes::<bf16>(t, w, false),
            crate::ops::gemm_fp8::LinearWeight::Bf16(_) => false,
        }
    }

    /// The activation codes and row scales the next GEMM reads (`[rows, k_max]`, `[rows]`).
    pub fn quant_scratch(&mut self) -> (&mut DTensor<u8>, &mut DTensor<f32>) {
        (&mut self.xq, &mut self.sx)
    }

    /// Declares that [`W8a8::quant_scratch`] holds the quantised rows `0..t` of `x` with row
    /// stride `x.row_len()` (as `quantize_rows` writes them): the next GEMM whose input is `x`
    /// with `t` rows does not quantise again. Any GEMM clears it.
    pub fn set_prequantized(&mut self, gpu: &Gpu, x: &DTensor<bf16>, t: usize) {
        self.prequantized = Some((x.ptr(gpu), t));
    }

    /// Drops a [`W8a8::set_prequantized`] mark that no GEMM consumed.
    pub fn clear_prequantized(&mut self) {
        self.prequantized = None;
    }

    /// Lets the `split-scale` epilogues fuse into their consumers (default on; see
    /// [`W8a8::linear_deferred`] and [`W8a8::linear_swiglu_for`]).
    pub fn set_fused_epilogues(&mut self, on: bool) {
        self.fuse = on;
    }
    pub fn fused_epilogues(&self) -> bool {
        self.fuse
    }

    /// Restricts the paths (see [`W8a8Select`]). A selection that allows `stream` on Hopper
    /// allocates its workspace the first time (an error when the device is out of memory).
    pub fn select(&mut self, gpu: &Gpu, s: W8a8Select) -> Result<()> {
        if s.allows_stream() && self.cc_major == 9 && self.stream.is_none() {
            self.stream = Some(StreamScratch::new(gpu)?);
        }
        self.select = s;
        Ok(())
    }

    /// Whether the `stream` workspace is allocated (tests).
    pub fn has_stream_scratch(&self) -> bool {
        self.stream.is_some()
    }
    pub fn selected(&self) -> W8a8Select {
        self.select
    }

    /// The probe slot of a cuBLASLt path (`None` for `skinny` and `stream`, which need no
    /// probe).
    fn probe_index(path: W8a8Path, bias: bool) -> Option<usize> {
        match path {
            W8a8Path::Skinny | W8a8Path::Stream => None,
            W8a8Path::OuterVec => Some(bias as usize),
            W8a8Path::SplitScale => Some(2),
        }
    }

    /// Whether `path` runs here (`None`: not tried yet); `bias` asks about the outer-vec
    /// path's bias epilogue (the split path adds the bias itself). `skinny`, `stream`: whether
    /// this GPU runs it (known up front).
    pub fn supported(&self, path: W8a8Path, bias: bool) -> Option<bool> {
        match Self::probe_index(path, bias) {
            Some(i) => self.supported[i],
            None => Some(self.cc_major == 9),
        }
    }

    /// Whether `skinny` runs `t` rows of `w` (selected, and the kernel takes the shape here).
    fn skinny_takes(&self, t: usize, w: &Fp8Weight) -> bool {
        self.select.allows_skinny() && skinny::refusal(self.cc_major, t, w).is_none()
    }

    /// Whether `stream` runs `t` rows of `w` (selected, and the kernel takes the shape here).
    fn stream_takes(&self, t: usize, w: &Fp8Weight) -> bool {
        self.select.allows_stream() && self.stream.is_some() && stream::refusal(self.cc_major, t, w).is_none()
    }

    /// The path of the last GEMM offered here (`W8a8::linear*`, or `ops::gemm_fp8::linear_any`
    /// and its kin with this `W8a8`): `None` when it ran on the W8A16 kernel (below
    /// [`W8a8::min_rows`], refused, or no cuBLASLt algorithm).
    pub fn last_path(&self) -> Option<W8a8Path> {
        self.last
    }

    /// Records that the last GEMM offered here ran on the W8A16 kernel ([`W8a8::last_path`]).
    pub fn note_w8a16(&mut self) {
        self.last = None;
    }

    /// cuBLASLt's reason for the last refusal of a path (no algorithm), if any.
    pub fn refusal_reason(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// The paths that may run an `[n, k]` GEMM (shape rules of `split-scale`: n % 16 == 0;
    /// both need k % 16 == 0, checked in [`W8a8::refusal`]).
    fn candidates(&self, n: usize, bias: bool) -> impl Iterator<Item = W8a8Path> + '_ {
        self.select.paths().iter().copied().filter(move |&p| {
            self.supported(p, bias) != Some(false) && (p != W8a8Path::SplitScale || n.is_multiple_of(16))
        })
    }

    /// Why [`W8a8::linear`] would not take `t` rows of `w` into a `Y` output with a bias or not
    /// (`None`: it takes them, though cuBLASLt may still turn out to have no algorithm).
    pub fn refusal<Y: GemmOut>(&self, t: usize, w: &Fp8Weight, bias: bool) -> Option<String> {
        let (n, k) = (w.n(), w.k());
        let why = if w.layout != ScaleLayout::Channel {
            format!("needs channel scales (the weight has {} scales)", w.layout.name())
        } else if Y::OUT != OutType::Bf16 {
            "needs a bf16 output".to_string()
        } else if t > self.sx.len() || k > self.k_max {
            format!("needs t <= {} and k <= {} (its scratch)", self.sx.len(), self.k_max)
        } else if !k.is_multiple_of(16) {
            "the FP8 GEMMs need k to be a multiple of 16".to_string()
        } else if self.skinny_takes(t, w) || self.stream_takes(t, w) {
            return None;
        } else if self.select == W8a8Select::Skinny {
            format!("skinny: {}", skinny::refusal(self.cc_major, t, w).unwrap_or_default())
        } else if self.select == W8a8Select::Stream {
            format!("stream: {}", stream::refusal(self.cc_major, t, w).unwrap_or_default())
        } else if self.candidates(n, bias).next().is_none() {
            let open: Vec<String> = self
                .select
                .paths()
                .iter()
                .map(|&p| match (p, self.supported(p, bias)) {
                    (_, Some(false)) => format!("{}: cuBLASLt has no algorithm here", p.name()),
                    (W8a8Path::SplitScale, _) => format!("{}: needs n to be a multiple of 16", p.name()),
                    _ => format!("{}: refused", p.name()),
                })
                .collect();
            if open.is_empty() {
                format!("path selection `{}` runs the W8A16 kernel", self.select)
            } else {
                format!("no W8A8 path takes it ({})", open.join("; "))
            }
        } else {
            return None;
        };
        Some(format!("{OP}: {t} rows of a {} weight [{n}, {k}] into a {:?} output: {why}", w.layout.name(), Y::OUT))
    }

    /// Whether [`W8a8::linear`] takes `t` rows of `w` into a `Y` output, with a bias or not
    /// (else the caller uses the W8A16 kernel).
    pub fn takes<Y: GemmOut>(&self, t: usize, w: &Fp8Weight, bias: bool) -> bool {
        self.refusal::<Y>(t, w, bias).is_none()
    }

    /// Whether [`W8a8::linear_swiglu`] takes `t` rows of the gate|up weight `w`.
    pub fn takes_swiglu(&self, t: usize, w: &Fp8Weight) -> bool {
        w.n().is_multiple_of(16) && self.takes::<bf16>(t, w, false)
    }

    /// Checks the operands, quantises `x[0..t]` and runs the GEMM by the first path that
    /// takes it: `Some(Skinny)` and `Some(Stream)` wrote the finished `y` (or, with `act`, SwiGLU's output there
    /// and nothing in `y`), `Some(OuterVec)` the finished `y`, `Some(SplitScale)` the unscaled
    /// product (`y` then needs its epilogue), `None` nothing (every path refused).
    #[allow(clippy::too_many_arguments)]
    fn gemm<Y: GemmOut>(
        &mut self,
        gpu: &Gpu,
        t: usize,
        x: &DTensor<bf16>,
        w: &Fp8Weight,
        bias: Option<&DTensor<bf16>>,
        y_name: &str,
        y: &mut DTensor<Y>,
        act: Option<u64>,
    ) -> Result<Option<W8a8Path>> {
        if let Some(d) = self.deferred {
            return Err(Error::bad_input(format!(
                "{OP}: the deferred scale epilogue of a [{}, {}] output was never applied (ops::norm::add_rmsnorm_deferred must take it before the next W8A8 GEMM)",
                d.rows, d.n
            )));
        }
        let pre = self.prequantized.take();
        let (n, k) = (w.n(), w.k());
        if let Some(why) = self.refusal::<Y>(t, w, bias.is_some()) {
            return Err(Error::bad_input(why));
        }
        x.check_rows(OP, "x", t, k)?;
        y.check_rows(OP, y_name, t, n)?;
        if w.scales.dims != [n] {
            return Err(Error::shape(OP, "scales", &[n], &w.scales.dims));
        }
        if let Some(b) = bias {
            if b.len() != n {
                return Err(Error::shape(OP, "bias", &[n], &b.dims));
            }
        }
        let (wq, sw, bp, yp) = (w.q.ptr(gpu), w.scales.ptr(gpu), bias.map(|b| b.ptr(gpu)), y.ptr_mut(gpu));
        if !aligned16(&[wq, sw, bp.unwrap_or(0), yp]) {
            return Err(Error::bad_input(format!("{OP}: w, its scales, the bias and `{y_name}` must be 16-byte aligned")));
        }
        if pre != Some((x.ptr(gpu), t)) {
            quantize_rows(gpu, t, x, &mut self.xq, &mut self.sx)?;
        }
        let (xq, sx) = (self.xq.ptr(gpu), self.sx.ptr(gpu));
        if self.skinny_takes(t, w) {
            let ops = skinny::Operands { xq, sx, bias: bp, y: act.unwrap_or(yp) };
            skinny::launch(gpu, t, w, &ops, Y::OUT == OutType::F32, act.is_some(), None)?;
            self.last = Some(W8a8Path::Skinny);
            return Ok(Some(W8a8Path::Skinny));
        }
        if self.stream_takes(t, w) {
            let ops = skinny::Operands { xq, sx, bias: bp, y: act.unwrap_or(yp) };
            let scratch = self.stream.as_mut().expect("stream_takes checked the scratch");
            stream::launch(gpu, scratch, t, w, &ops, Y::OUT == OutType::F32, act.is_some(), None)?;
            self.last = Some(W8a8Path::Stream);
            return Ok(Some(W8a8Path::Stream));
        }
        let paths: [Option<W8a8Path>; 2] = {
            let mut c = self.candidates(n, bias.is_some());
            [c.next(), c.next()]
        };
        for path in paths.into_iter().flatten() {
            let r = match path {
                W8a8Path::Skinny | W8a8Path::Stream => unreachable!("{} is not a cuBLASLt candidate", path.name()),
                W8a8Path::OuterVec => self.lt.matmul_raw(gpu, t, n, k, xq, wq, sx, sw, bp, yp),
                W8a8Path::SplitScale => self.lt.matmul_unscaled_raw(gpu, t, n, k, xq, wq, yp),
            };
            let probe = Self::probe_index(path, bias.is_some()).expect("a cuBLASLt path");
            match r {
                Ok(()) => {
                    self.supported[probe] = Some(true);
                    self.last = Some(path);
                    return Ok(Some(path));
                }
                // No algorithm: never for this path if it is its first plan, and the next path
                // (or the caller's fallback) for this call.
                Err(e) if no_algorithm(&e) => {
                    self.supported[probe].get_or_insert(false);
                    self.refused = Some(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        self.last = None;
        Ok(None)
    }

    /// `y[0..t] = x[0..t] · dequant(w)ᵀ (+ bias)` with x quantised per row. Returns the path
    /// that ran, or `None` (nothing launched beyond the quantiser) when cuBLASLt turns out to
    /// have no algorithm on any allowed path: the caller then runs the W8A16 kernel. Errors
    /// when [`W8a8::refusal`] refuses the call or a shape is wrong.
    pub fn linear<Y: GemmOut>(
        &mut self,
        gpu: &Gpu,
        t: usize,
        x: &DTensor<bf16>,
        w: &Fp8Weight,
        bias: Option<&DTensor<bf16>>,
        y: &mut DTensor<Y>,
    ) -> Result<Option<W8a8Path>> {
        self.linear_impl(gpu, t, x, w, bias, y, None)
    }

    /// [`W8a8::linear`] for an output that only a residual add reads next: where the GEMM
    /// takes the `split-scale` path, `y` is left holding the unscaled product and the scale
    /// epilogue is handed to that add ([`W8a8::take_deferred`], then
    /// `ops::norm::add_rmsnorm_deferred`), which saves its launch and its pass over `y`. The
    /// caller must take it before the next GEMM on this `W8a8` (which errors otherwise).
    pub fn linear_deferred(
        &mut self,
        gpu: &Gpu,
        t: usize,
        x: &DTensor<bf16>,
        w: &Fp8Weight,
        bias: Option<&DTensor<bf16>>,
        y: &mut DTensor<bf16>,
    ) -> Result<Option<W8a8Path>> {
        self.linear_impl(gpu, t, x, w, bias, y, Some(crate::ops::norm::MAX_SCALED_HIDDEN))
    }

    /// [`W8a8::linear_deferred`] for a consumer other than the residual add, which takes
    /// outputs of up to `max_n` columns: `ops::rope::rope_kv_store_scaled` takes the QKV
    /// projection's (any width).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_deferred_to(
        &mut self,
        gpu: &Gpu,
        t: usize,
        x: &DTensor<bf16>,
        w: &Fp8Weight,
        bias: Option<&DTensor<bf16>>,
        y: &mut DTensor<bf16>,
        max_n: usize,
    ) -> Result<Option<W8a8Path>> {
        self.linear_impl(gpu, t, x, w, bias, y, Some(max_n))
    }

    /// [`W8a8::linear`] (`defer` None) and [`W8a8::linear_deferred_to`] (`defer`: the
    /// consumer's widest output): the GEMM, then the `split-scale` epilogue run here or handed
    /// on (deferring needs a bf16 output, which every W8A8 path requires, the fusions on and n
    /// within the consumer's reach).
    #[allow(clippy::too_many_arguments)]
    fn linear_impl<Y: GemmOut>(
        &mut self,
        gpu: &Gpu,
        t: usize,
        x: &DTensor<bf16>,
        w: &Fp8Weight,
        bias: Option<&DTensor<bf16>>,
        y: &mut DTensor<Y>,
        defer: Option<usize>,
    ) -> Result<Option<W8a8Path>> {
        let path = self.gemm(gpu, t, x, w, bias, "y", y, None)?;
        if path == Some(W8a8Path::SplitScale) {
            let (yp, sxp, swp, bp) = (y.ptr_mut(gpu), self.sx.ptr(gpu), w.scales.ptr(gpu), bias.map(|b| b.ptr(gpu)));
            if defer.is_some_and(|max_n| w.n() <= max_n) && self.fuse && Y::OUT == OutType::Bf16 && t > 0 {
                self.deferred = Some(DeltaScale { y: yp, rows: t, n: w.n(), sx: sxp, sw: swp, bias: bp });
            } else {
                scale_raw(gpu, t, w.n(), yp, sxp, swp, bp)?;
            }
        }
        Ok(path)
    }

    /// The deferred scale epilogue of `y` ([`W8a8::linear_deferred`]), if one is pending:
    /// `Ok(None)` when none is, an error when the pending one belongs to another tensor.
    pub fn take_deferred(&mut self, gpu: &Gpu, y: &DTensor<bf16>) -> Result<Option<DeltaScale>> {
        match self.deferred {
            None => Ok(None),
            Some(d) if d.y == y.ptr(gpu) => Ok(self.deferred.take()),
            Some(d) => Err(Error::bad_input(format!(
                "{OP}: a deferred W8A8 scale epilogue is pending for another tensor ([{}, {}]) than the one read here",
                d.rows, d.n
            ))),
        }
    }

    /// Drops every pending mark (a prequantized input, a deferred epilogue): the start of a
    /// forward, after an earlier one may have stopped half way on an error.
    pub fn reset_pending(&mut self) {
        self.prequantized = None;
        self.deferred = None;
    }

    /// Runs a deferred epilogue `d` (taken with [`W8a8::take_deferred`]) as its own launch,
    /// for a consumer that cannot fuse it.
    pub fn apply_deferred(gpu: &Gpu, d: &DeltaScale) -> Result<()> {
        epilogue::scale_raw(gpu, d.rows, d.n, d.y, d.sx, d.sw, d.bias)
    }

    /// Whether a [`W8a8::linear_deferred`] epilogue is waiting to be taken.
    pub fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_parse_by_name() {
        for s in W8a8Select::ALL {
            assert_eq!(s.name().parse::<W8a8Select>().unwrap(), s);
        }
        let e = "cublaslt".parse::<W8a8Select>().unwrap_err().to_string();
        assert!(e.contains("split-scale"), "{e}");
        assert_eq!(W8a8Select::Auto.paths(), &[W8a8Path::OuterVec, W8a8Path::SplitScale]);
        assert!(!W8a8Select::Auto.allows_skinny() && W8a8Select::Skinny.allows_skinny());
        assert!(!W8a8Select::Auto.allows_stream() && W8a8Select::Stream.allows_stream() && !W8a8Select::Skinny.allows_stream());
        assert!(W8a8Select::Stream.paths().is_empty());
        assert_eq!(W8a8Path::Stream.name(), "stream");
        assert!(W8a8Select::Skinny.paths().is_empty() && !W8a8Select::SplitScale.allows_skinny());
        assert!(W8a8Select::W8a16.paths().is_empty());
        assert_eq!(W8a8Path::SplitScale.name(), "split-scale");
    }
}
