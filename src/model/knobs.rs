//! The knobs of a [`GpuModel`] that tests, `demask bench` / `profile` / `fidelity` and the
//! engine turn between forwards: CUDA graphs, per-op profiling, the residual-stream capture,
//! the MoE expert tally and the FP8 W8A8 row threshold.
use super::GpuModel;
use crate::error::{Error, Result};
use crate::gpu::graph::GraphStats;
use crate::ops::gemm_w8a8::W8a8Select;
use crate::gpu::{drv, Gpu};
use crate::ops::prefetch::L2Prefetch;

impl GpuModel {
    /// Counts, from now on, the experts each MoE layer's routing touches (for the floor of
    /// `demask bench`: a block of mask rows routes alike, so a decode step reads far fewer
    /// experts than random rows would). Resets the tally and drops captured graphs (the tally
    /// launch is part of the forward). An error for a dense model.
    pub fn set_expert_stats(&mut self, on: bool) -> Result<()> {
        let st = self.ws.moe.as_mut().ok_or_else(|| Error::bad_input("expert statistics need an MoE model"))?;
        st.tally.write(&self.gpu, &[0, 0])?;
        st.tally_on = on;
        self.graphs.clear();
        Ok(())
    }

    /// `(experts touched, layer forwards)` summed since `set_expert_stats(true)` (one host
    /// sync); `None` for a dense model.
    pub fn expert_stats(&self) -> Result<Option<(u64, u64)>> {
        let Some(st) = &self.ws.moe else { return Ok(None) };
        let v = st.tally.to_host(&self.gpu)?;
        Ok(Some((v[0] as u64, v[1] as u64)))
    }

    /// Turns CUDA graph replay of repeated batch shapes on or off (default on; the environment
    /// variable `DEMASK_GRAPHS=0` starts a model with it off). Graphs already captured are kept
    /// while off and used again when turned back on.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs_on = on;
    }

    pub fn graphs_enabled(&self) -> bool {
        self.graphs_on
    }

    /// (captures, replays, eager forwards) since the model was built.
    pub fn graph_stats(&self) -> (u64, u64, u64) {
        let s = self.graphs.stats();
        (s.captures, s.replays, s.eager)
    }

    /// Every graph counter, failed captures included.
    pub fn graph_counters(&self) -> GraphStats {
        self.graphs.stats()
    }

    /// Why the last failed capture failed (its shape then runs eagerly).
    pub fn graph_failure(&self) -> Option<&str> {
        self.graphs.last_failure()
    }

    /// Drops every captured graph (shapes start over at eager).
    pub fn clear_graphs(&mut self) {
        self.graphs.clear();
    }

    /// With `on`, every forward (eager: no CUDA graph) also copies the residual stream after
    /// each transformer block into a buffer of `n_layers × rows` hidden states (allocated
    /// here, freed when turned off), which `layer_hidden` reads back: per-layer error
    /// measurements (`fp8_fidelity::compare_layers`, `demask fidelity`). Off by default; a
    /// forward without it copies nothing.
    pub fn set_layer_capture(&mut self, on: bool) -> Result<()> {
        self.layer_capture = if on {
            Some(self.gpu.alloc(&[self.cfg.n_layers * self.cap.rows, self.cfg.hidden])?)
        } else {
            None
        };
        self.captured_rows = None;
        Ok(())
    }

    /// The residual stream after every layer of the last forward (with `set_layer_capture`
    /// on), as f32: `[n_layers][rows * hidden]` (synchronising). An error when capture is off
    /// or no forward ran since it was turned on.
    pub fn layer_hidden(&self) -> Result<Vec<Vec<f32>>> {
        let (Some(c), Some(rows)) = (self.layer_capture.as_ref(), self.captured_rows) else {
            return Err(Error::bad_input("layer_hidden: set_layer_capture(true), then a forward"));
        };
        let (per, n) = (self.cap.rows * self.cfg.hidden, rows * self.cfg.hidden);
        let all = c.to_host(&self.gpu)?;
        Ok(all.chunks(per).map(|l| l[..n].iter().map(|v| v.to_f32()).collect()).collect())
    }

    /// Turns per-op event timing on (every forward then ends with a host sync) or off.
    pub fn enable_profiling(&mut self, on: bool) -> Result<()> {
        self.profiler =
            if on { Some(crate::gpu::profile::OpProfiler::new(&self.gpu, 16 * self.cfg.n_layers + 8)?) } else { None };
        Ok(())
    }

    /// FP8 (channel scales) only: linear layers of at least `rows` rows run on the W8A8 path
    /// (activations quantised per row, FP8 tensor cores), fewer on the W8A16 kernel. Default
    /// 17 (`ops::gemm_w8a8::W8A8_MIN_ROWS`: W8A16 only for steps of up to 16 rows, where its
    /// kernel is faster) or `DEMASK_W8A8_MIN_ROWS`; 65 keeps decode steps weights-only
    /// (docs/fp8.md). Drops captured graphs.
    /// An error for a model without channel-scaled FP8 weights, or for 0.
    pub fn set_w8a8_min_rows(&mut self, rows: usize) -> Result<()> {
        let m = self.ws.w8a8.as_mut().ok_or_else(|| Error::bad_input("W8A8 row threshold: the model has no channel-scaled FP8 weights"))?;
        m.set_min_rows(rows)?;
        self.graphs.clear();
        Ok(())
    }

    /// The W8A8 row threshold (`None`: no channel-scaled FP8 weights, W8A8 never runs).
    pub fn w8a8_min_rows(&self) -> Option<usize> {
        self.ws.w8a8.as_ref().map(|m| m.min_rows())
    }

    /// Adds (`on`) or drops an E4M3 copy of the LM head (channel scales), used for steps of up
    /// to `quant::FP8_LM_HEAD_MAX_ROWS` logit rows (a decode step's live rows); more rows use
    /// the bf16 LM head. Costs `vocab · hidden` bytes (LLaDA-8B: 0.52 GB) and fidelity
    /// (docs/fp8.md); saves about half the LM head's read (≈ 0.17 ms of a W1 step on an H100).
    /// `DEMASK_FP8_LM_HEAD=1` turns it on for FP8 models when they are made. Drops captured
    /// graphs.
    pub fn set_fp8_lm_head(&mut self, on: bool) -> Result<()> {
        self.weights.set_fp8_lm_head(&self.gpu, on)?;
        self.graphs.clear();
        Ok(())
    }

    /// Whether the model has the E4M3 LM head of [`GpuModel::set_fp8_lm_head`].
    pub fn fp8_lm_head(&self) -> bool {
        self.weights.lm_head_fp8.is_some()
    }

    /// Whether the W8A8 `split-scale` epilogues fuse into their consumers (default on: the
    /// O and down scales into the next residual add, the down projection's quantiser into
    /// the SwiGLU pass). Off gives the same values with more launches (tests, timing). Drops
    /// captured graphs. An error for a model without channel-scaled FP8 weights.
    pub fn set_w8a8_fused_epilogues(&mut self, on: bool) -> Result<()> {
        let m = self.ws.w8a8.as_mut().ok_or_else(|| Error::bad_input("W8A8 epilogues: the model has no channel-scaled FP8 weights"))?;
        m.set_fused_epilogues(on);
        self.graphs.clear();
        Ok(())
    }

    /// Restricts the W8A8 paths (`ops::gemm_w8a8::W8a8Select`; `w8a16`: never W8A8). Drops
    /// captured graphs. An error for a model without channel-scaled FP8 weights.
    pub fn set_w8a8_select(&mut self, s: W8a8Select) -> Result<()> {
        let m = self.ws.w8a8.as_mut().ok_or_else(|| Error::bad_input("W8A8 paths: the model has no channel-scaled FP8 weights"))?;
        m.select(&self.gpu, s)?;
        self.graphs.clear();
        Ok(())
    }
}

/// Ops a forward can leave out, for timing only (`demask profile --ablate`): the time a
/// replayed graph saves without an op is what that op costs inside the forward, its overlap
/// with its neighbours (programmatic dependent launch) included, which per-op event timing of
/// an eager forward cannot show. A forward with an op left out computes nothing meaningful;
/// the ops around it run as they would, except that a hand-off to a left-out GEMM is dropped:
/// the down projection after a left-out gate|up quantises its own input (on `split-scale` the
/// gate|up epilogue would have), one launch more than the real forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ablate(u8);

impl Ablate {
    /// The ops that can be left out, by name.
    pub const OPS: [&'static str; 7] = ["qkv", "o", "gate_up", "down", "attention", "rope", "head"];

    /// Nothing left out (every forward outside `demask profile --ablate`).
    pub const NONE: Ablate = Ablate(0);

    /// The set of the named ops, e.g. `o` or `qkv+o`.
    pub fn parse(s: &str) -> Result<Ablate> {
        let mut bits = 0u8;
        for name in s.split('+') {
            let i = Self::OPS.iter().position(|o| *o == name).ok_or_else(|| {
                Error::bad_input(format!("unknown op `{name}` to leave out (expected one of {} or several joined by +)", Self::OPS.join(", ")))
            })?;
            bits |= 1 << i;
        }
        Ok(Ablate(bits))
    }

    /// Whether the op named `name` (one of [`Ablate::OPS`]) runs.
    pub fn runs(self, name: &str) -> bool {
        debug_assert!(Self::OPS.contains(&name), "`{name}` is not an op `Ablate` knows");
        Self::OPS.iter().position(|o| *o == name).is_none_or(|i| self.0 & (1 << i) == 0)
    }

    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl std::fmt::Display for Ablate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = Self::OPS.iter().enumerate().filter(|(i, _)| self.0 & (1 << i) != 0).map(|(_, n)| *n).collect();
        f.write_str(if names.is_empty() { "none" } else { "" })?;
        f.write_str(&names.join("+"))
    }
}

impl GpuModel {
    /// Leaves the ops of `a` out of every forward from now on ([`Ablate`]: timing only, the
    /// outputs are not a model's); [`Ablate::NONE`] restores the full forward. Drops captured
    /// graphs.
    pub fn set_ablate(&mut self, a: Ablate) {
        self.ablate = a;
        self.graphs.clear();
    }

    pub fn ablate(&self) -> Ablate {
        self.ablate
    }

    /// Sets the forward's L2 prefetches (`ops::prefetch::L2Prefetch`: after each QKV GEMM the O
    /// weight then gate|up, after each down GEMM the next QKV weight, up to the given bytes;
    /// in line or on a side branch). A hint: the outputs are the same with any setting. Off by
    /// default, or `DEMASK_L2_PREFETCH` when the model is made. Drops captured graphs; the
    /// first side-branch setting creates the second stream and its two events.
    pub fn set_l2_prefetch(&mut self, p: L2Prefetch) -> Result<()> {
        if p.side && self.side.is_none() {
            self.side = Some(SideBranch::new(&self.gpu)?);
        }
        self.l2_prefetch = p;
        self.graphs.clear();
        Ok(())
    }

    pub fn l2_prefetch(&self) -> L2Prefetch {
        self.l2_prefetch
    }

    /// Whether attention copies the cache keys outside this forward's live rows before it
    /// waits for the kernels before it (RoPE, which writes the live rows' keys), so that those
    /// copies overlap them (`ops::attention::attention`'s `fresh`). The same values either way.
    /// On by default, off with `DEMASK_KV_PRELOAD=0` when the model is made. Drops captured
    /// graphs.
    pub fn set_kv_preload(&mut self, on: bool) {
        self.kv_preload = on;
        self.graphs.clear();
    }

    pub fn kv_preload(&self) -> bool {
        self.kv_preload
    }
}

/// `DEMASK_KV_PRELOAD`: unset or `1` on, `0` off; anything else an error naming the variable.
pub(crate) fn kv_preload_from_env() -> Result<bool> {
    match std::env::var("DEMASK_KV_PRELOAD").as_deref() {
        Err(_) | Ok("1") => Ok(true),
        Ok("0") => Ok(false),
        Ok(v) => Err(Error::bad_input(format!("DEMASK_KV_PRELOAD must be 0 or 1, not `{v}`"))),
    }
}

/// The second stream that side-branch prefetches run on, and the events that fork it from the
/// GPU's stream and join it back (captured into a graph as a branch and its join).
pub(crate) struct SideBranch {
    pub(crate) stream: std::sync::Arc<cudarc::driver::CudaStream>,
    fork: cudarc::driver::CudaEvent,
    join: cudarc::driver::CudaEvent,
}

impl SideBranch {
    pub(crate) fn new(gpu: &Gpu) -> Result<Self> {
        let ev = || gpu.ctx.new_event(None).map_err(drv("cuEventCreate"));
        Ok(SideBranch { stream: gpu.ctx.new_stream().map_err(drv("cuStreamCreate"))?, fork: ev()?, join: ev()? })
    }

    /// The side stream waits for everything launched on the GPU's stream so far.
    pub(crate) fn fork(&self, gpu: &Gpu) -> Result<()> {
        self.fork.record(&gpu.stream).map_err(drv("cuEventRecord"))?;
        self.stream.wait(&self.fork).map_err(drv("cuStreamWaitEvent"))
    }

    /// The GPU's stream waits for everything launched on the side stream so far.
    pub(crate) fn join(&self, gpu: &Gpu) -> Result<()> {
        self.join.record(&self.stream).map_err(drv("cuEventRecord"))?;
        gpu.stream.wait(&self.join).map_err(drv("cuStreamWaitEvent"))
    }
}

#[cfg(test)]
mod tests {
    use super::Ablate;

    #[test]
    fn ablate_parses_names_and_refuses_unknown_ones() {
        let a = Ablate::parse("qkv+down").unwrap();
        assert!(!a.runs("qkv") && !a.runs("down") && a.runs("o") && a.runs("attention"));
        assert_eq!(a.to_string(), "qkv+down");
        assert!(Ablate::NONE.runs("head") && Ablate::NONE.is_none());
        assert_eq!(Ablate::NONE.to_string(), "none");
        let e = Ablate::parse("qkv+norm").unwrap_err().to_string();
        assert!(e.contains("`norm`") && e.contains("gate_up"), "{e}");
    }
}
