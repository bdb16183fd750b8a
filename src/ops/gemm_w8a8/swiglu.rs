//! The gate|up projection with SwiGLU on the W8A8 paths ([`W8a8::linear_swiglu`]), and the
//! fusion of its `split-scale` epilogue with the down projection's quantiser
//! ([`W8a8::linear_swiglu_for`]).
use half::bf16;

use super::epilogue::{aligned16, scale_swiglu_quant_raw, scale_swiglu_raw, swiglu_quant_runs};
use super::{W8a8, W8a8Path, OP};
use crate::error::{Error, Result};
use crate::gpu::{DTensor, Gpu};
use crate::ops::gemm_fp8::Fp8Weight;

impl W8a8 {
    /// Whether a GEMM of `t` rows of `w` will surely run on a W8A8 path, with no fallback
    /// to the W8A16 kernel: `skinny` takes it, or the first cuBLASLt path has a plan for the
    /// shape that has already run (cuBLASLt had an algorithm).
    fn runs_without_fallback(&self, t: usize, w: &Fp8Weight) -> bool {
        if !(t >= self.min_rows && self.takes::<bf16>(t, w, false)) {
            return false;
        }
        if self.skinny_takes(t, w) || self.stream_takes(t, w) {
            return true;
        }
        match self.candidates(w.n(), false).next() {
            Some(W8a8Path::OuterVec) => self.lt.has_plan(t, w.n(), w.k(), true),
            Some(W8a8Path::SplitScale) => self.lt.has_plan(t, w.n(), w.k(), false),
            _ => false,
        }
    }

    /// The gate|up projection with SwiGLU: `act[0..t] = SwiGLU(x[0..t] · dequant(w_gate_up)ᵀ)`,
    /// `gu` `[>= t, 2·ffn]` the GEMM's output (scratch), `act` `[>= t, ffn]`. `skinny` writes
    /// `act` from its epilogue (`gu` untouched); `outer-vec` runs `ops::swiglu` after the GEMM;
    /// `split-scale` applies scales and SwiGLU in one pass.
    /// Returns as [`W8a8::linear`].
    pub fn linear_swiglu(
        &mut self,
        gpu: &Gpu,
        t: usize,
        x: &DTensor<bf16>,
        w_gate_up: &Fp8Weight,
        gu: &mut DTensor<bf16>,
        act: &mut DTensor<bf16>,
    ) -> Result<Option<W8a8Path>> {
        self.linear_swiglu_for(gpu, t, x, w_gate_up, gu, act, None)
    }

    /// [`W8a8::linear_swiglu`] followed by the down projection `down` (which must be the next
    /// GEMM on this `W8a8`, reading `act`): where the GEMM takes
    /// the `split-scale` path and `down` will take `act` on a W8A8 path, the epilogue also
    /// quantises `act` for it (`w8a8_scale_swiglu_quant_bf16`; the down GEMM then skips its
    /// quantiser), and once the down GEMM's plan is known to run (no fallback to the W8A16
    /// kernel, which would read `act`) `act` itself is not written at all.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_swiglu_for(
        &mut self,
        gpu: &Gpu,
        t: usize,
        x: &DTensor<bf16>,
        w_gate_up: &Fp8Weight,
        gu: &mut DTensor<bf16>,
        act: &mut DTensor<bf16>,
        down: Option<&Fp8Weight>,
    ) -> Result<Option<W8a8Path>> {
        let n = w_gate_up.n();
        let ffn = n / 2;
        if !n.is_multiple_of(16) {
            return Err(Error::bad_input(format!(
                "{OP}: SwiGLU needs the gate|up weight's row count to be a multiple of 16, got {:?}",
                w_gate_up.q.dims
            )));
        }
        act.check_rows(OP, "act", t, ffn)?;
        let ap = act.ptr_mut(gpu);
        let path = self.gemm(gpu, t, x, w_gate_up, None, "gu", gu, Some(ap))?;
        match path {
            Some(W8a8Path::Skinny | W8a8Path::Stream) => {}
            Some(W8a8Path::OuterVec) => crate::ops::swiglu::swiglu(gpu, t, gu, act)?,
            Some(W8a8Path::SplitScale) => {
                let sw = w_gate_up.scales.ptr(gpu);
                if !aligned16(&[ap]) {
                    return Err(Error::bad_input(format!("{OP}: `act` must be 16-byte aligned")));
                }
                let (xq, sx) = (self.xq.ptr_mut(gpu), self.sx.ptr_mut(gpu));
                match down.filter(|d| self.fuse && d.k() == ffn && swiglu_quant_runs(gpu, t, ffn) && act.row_len() == ffn && xq.is_multiple_of(8)) {
                    Some(d) if t >= self.min_rows && self.takes::<bf16>(t, d, false) => {
                        let write_act = !self.runs_without_fallback(t, d);
                        scale_swiglu_quant_raw(gpu, t, ffn, gu.ptr(gpu), write_act.then_some(ap), xq, sx, sw)?;
                        self.prequantized = Some((ap, t));
                    }
                    _ => scale_swiglu_raw(gpu, t, ffn, gu.ptr(gpu), ap, sx, sw)?,
                }
            }
            None => {}
        }
        Ok(path)
    }
}
