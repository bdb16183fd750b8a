//! `GpuStepper`: the GPU `StepBackend`. One step = the GPU forward (`model::GpuModel`) →
//! `confidence_f32` (candidate + confidence of every eligible slot, straight from the device
//! logits) → `commit_u32` (each sequence's policy; committed tokens written into the device
//! canvas) → one download of the compact commit lists. Logits never come to the host.
//!
//! Device canvas: `u32 [seqs, canvas_stride]`, row `i` belonging to `work[i]` of the step
//! (canvas_stride = the model's max_seq_len). The stepper only writes committed slots; callers
//! that keep their canvas on the device load it with [`GpuStepper::load_canvas`].
//! Every buffer is allocated in `new`; a step allocates nothing on the device.
//!
//! When a step's batch shape repeats (dual cache inside a block, `none` every step), the
//! forward replays one CUDA graph (see `model.rs`, `gpu::graph`); confidence and commit stay
//! eager launches after it, since their slot counts change from step to step.
use std::sync::Arc;

use crate::batch::RowBatch;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gpu::{drv, DTensor, Gpu};
use crate::model::{Capacity, GpuModel, GpuWeights};
use crate::ops::commit::{commit, parse_commits, parse_commits_into, CommitWs, CountCtx, CountRule, SeqCommitParams};
use crate::ops::confidence::{confidence, ConfidenceWs, SlotParams};
use crate::weights::HostWeights;

use super::policy::{Policy, StepCtx};
use super::sampling::RngKey;
use super::step::{Commit, SeqWork, SlotScores, StepBackend, StepCommits};

pub struct GpuStepper {
    model: GpuModel,
    conf_ws: ConfidenceWs,
    commit_ws: CommitWs,
    /// Candidate token and confidence per slot (`[max_slots]`).
    slot_tokens: DTensor<u32>,
    slot_conf: DTensor<f32>,
    canvas: DTensor<u32>,
    canvas_stride: usize,
    /// Commit counts and lists (`[seqs + 2 * max_slots]`, layout of `CommitWs::out_len`).
    out: DTensor<u32>,
    max_slots: usize,
    // Host staging, reused every step.
    host_slots: Vec<SlotParams>,
    host_seqs: Vec<SeqCommitParams>,
    host_pos: Vec<u32>,
    host_out: Vec<u32>,
}

impl GpuStepper {
    /// Uploads `weights` and allocates the model workspace for `cap` plus the decode buffers.
    pub fn new(gpu: Arc<Gpu>, weights: &HostWeights, cap: Capacity) -> Result<Self> {
        let w = GpuWeights::upload(&gpu, weights)?;
        Self::with_weights(gpu, weights.cfg.clone(), w, cap)
    }

    /// As `new`, over weights already on the device.
    pub fn with_weights(gpu: Arc<Gpu>, cfg: ModelConfig, weights: GpuWeights, cap: Capacity) -> Result<Self> {
        // A slot maps to one logit row, but two slots may share one (Dream: positions 0 and 1
        // both read row 0), so allow one extra slot per sequence.
        let max_slots = cap.logit_rows + cap.seqs;
        let canvas_stride = cfg.max_seq_len;
        let mut model = GpuModel::new(gpu.clone(), cfg, weights, cap)?;
        // LM head on every live row of a small step: fixed shapes within a block, so the
        // forward's CUDA graph replays (slots are mapped with `GpuModel::logits_row`).
        model.set_full_logits(true);
        let g = &*gpu;
        let mut canvas = g.alloc::<u32>(&[cap.seqs, canvas_stride])?;
        g.stream.memset_zeros(&mut canvas.buf).map_err(drv("cuMemsetD8"))?;
        let mut conf_ws = ConfidenceWs::new(g, max_slots)?;
        // The mask token is never a candidate (its logit reads as MASK_LOGIT, as on the CPU).
        conf_ws.set_exclude_token(Some(model.cfg.mask_id));
        Ok(GpuStepper {
            conf_ws,
            commit_ws: CommitWs::new(g, cap.seqs, max_slots)?,
            slot_tokens: g.alloc(&[max_slots])?,
            slot_conf: g.alloc(&[max_slots])?,
            canvas,
            canvas_stride,
            out: g.alloc(&[cap.seqs + 2 * max_slots])?,
            max_slots,
            host_slots: Vec::with_capacity(max_slots),
            host_seqs: Vec::with_capacity(cap.seqs),
            host_pos: Vec::with_capacity(max_slots),
            host_out: vec![0; cap.seqs + 2 * max_slots],
            model,
        })
    }

    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut GpuModel {
        &mut self.model
    }

    /// The device canvas `u32 [seqs, canvas_stride]`.
    pub fn canvas(&self) -> &DTensor<u32> {
        &self.canvas
    }

    pub fn canvas_stride(&self) -> usize {
        self.canvas_stride
    }

    /// Copies `tokens` into canvas row `row` (positions `0..tokens.len()`).
    pub fn load_canvas(&mut self, row: usize, tokens: &[u32]) -> Result<()> {
        if row >= self.canvas.rows() || tokens.len() > self.canvas_stride {
            return Err(Error::bad_input(format!(
                "canvas: row {row} / {} tokens outside [{}, {}]",
                tokens.len(),
                self.canvas.rows(),
                self.canvas_stride
            )));
        }
        let gpu = self.model.gpu.clone();
        let start = row * self.canvas_stride;
        let mut dst = self.canvas.buf.slice_mut(start..start + tokens.len());
        gpu.stream.memcpy_htod(tokens, &mut dst).map_err(drv("cuMemcpyHtoD"))
    }

    /// Checks `work` against `batch` and builds the slot and sequence records.
    fn stage(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<()> {
        let cfg = &self.model.cfg;
        if work.len() > self.canvas.rows() {
            return Err(Error::bad_input(format!(
                "step: {} sequences, the stepper was sized for {}",
                work.len(),
                self.canvas.rows()
            )));
        }
        let n_slots: usize = work.iter().map(|w| w.eligible.len()).sum();
        if n_slots > self.max_slots {
            return Err(Error::bad_input(format!(
                "step: {n_slots} eligible slots, the stepper was sized for {}",
                self.max_slots
            )));
        }
        let logit_rows = batch.logit_rows.len();
        self.host_slots.clear();
        self.host_seqs.clear();
        self.host_pos.clear();
        for (si, w) in work.iter().enumerate() {
            if w.logit_index.len() != w.eligible.len() {
                return Err(Error::bad_input(format!(
                    "step: sequence {si} has {} eligible slots but {} logit indices",
                    w.eligible.len(),
                    w.logit_index.len()
                )));
            }
            if let Some(&li) = w.logit_index.iter().find(|&&li| li as usize >= logit_rows) {
                return Err(Error::bad_input(format!(
                    "step: sequence {si} reads logit row {li}, the batch computes {logit_rows}"
                )));
            }
            let t_ok = w.sampling.temperature.is_finite() && w.sampling.temperature >= 0.0;
            if !t_ok || w.sampling.top_p.is_nan() || w.sampling.top_p <= 0.0 || w.sampling.top_p > 1.0 {
                return Err(Error::bad_input(format!(
                    "step: sequence {si} has bad sampling {:?}",
                    w.sampling
                )));
            }
            let rule = commit_rule(&w.policy).map_err(|e| match e {
                Error::BadInput(m) => Error::bad_input(format!("step: sequence {si}: {m}")),
                other => other,
            })?;
            let kind = w.policy.conf_kind();
            self.host_seqs.push(SeqCommitParams::new(
                rule,
                count_ctx(w.ctx),
                self.host_pos.len(),
                w.eligible.len(),
                si,
            ));
            for (&pos, &li) in w.eligible.iter().zip(&w.logit_index) {
                let key = RngKey {
                    seed: w.seed,
                    seq: w.seq_id,
                    step: w.step,
                    slot: pos,
                };
                let row = self.model.logits_row(batch, li as usize);
                self.host_slots.push(SlotParams::new(row, kind, &w.sampling, key).with_dist(w.policy.conf_dist()));
                self.host_pos.push(pos);
            }
        }
        let gpu = self.model.gpu.clone();
        self.conf_ws.set_slots(&gpu, &self.host_slots, cfg.vocab)?;
        self.commit_ws
            .set_seqs(&gpu, &self.host_seqs, &self.host_pos, self.canvas_stride)
    }

    /// forward → confidence → commit, leaving the commit lists in `out` (no host sync).
    fn launch(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<()> {
        // The engine may have moved to another thread since the last step: make the device's
        // context current here (raw launches below do not bind it themselves).
        self.model.gpu.bind_to_thread()?;
        // Uploads first, while the stream is idle, so their copies wait on nothing.
        self.stage(batch, work)?;
        self.model.forward(batch)?;
        let gpu = self.model.gpu.clone();
        // The mask token is never a candidate: `conf_ws` excludes its column (see `with_weights`).
        let (logits, rows) = self.model.logits();
        confidence(
            &gpu,
            logits,
            rows,
            &mut self.conf_ws,
            &mut self.slot_tokens,
            &mut self.slot_conf,
        )?;
        commit(
            &gpu,
            &mut self.commit_ws,
            &self.slot_tokens,
            &self.slot_conf,
            &mut self.canvas,
            &mut self.out,
        )
    }

    /// Downloads the commit lists (`n_seqs + 2 · slots` u32): the step's one host
    /// synchronisation. Returns how many words arrived in `host_out`.
    fn download_commits(&mut self) -> Result<usize> {
        let gpu = self.model.gpu.clone();
        let n = self.commit_ws.out_len();
        if n > 0 {
            gpu.stream
                .memcpy_dtoh(&self.out.buf.slice(0..n), &mut self.host_out[..n])
                .map_err(drv("cuMemcpyDtoH"))?;
            gpu.synchronize()?;
        }
        Ok(n)
    }

    fn read_commits(&mut self) -> Result<Vec<Vec<Commit>>> {
        let n = self.download_commits()?;
        parse_commits(&self.host_out[..n], &self.host_seqs)
    }
}

impl StepBackend for GpuStepper {
    /// One step with a single host synchronisation: the download of the commit lists
    /// (`n_seqs + 2 · eligible slots` u32). Uploads of the batch and slot records happen before
    /// any kernel runs.
    fn step(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<Vec<Vec<Commit>>> {
        self.launch(batch, work)?;
        self.read_commits()
    }

    /// As `step`, parsing into the runner's reusable commit lists (no host allocation).
    fn step_into(&mut self, batch: &RowBatch, work: &[SeqWork], out: &mut StepCommits) -> Result<()> {
        self.launch(batch, work)?;
        let n = self.download_commits()?;
        parse_commits_into(&self.host_out[..n], &self.host_seqs, out)
    }

    /// As `step`, then also downloads every slot's candidate token and confidence.
    fn step_scored(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
        self.launch(batch, work)?;
        let commits = self.read_commits()?;
        let gpu = self.model.gpu.clone();
        let n = self.host_pos.len();
        let tokens = self.slot_tokens.to_host_n(&gpu, n)?;
        let conf = self.slot_conf.to_host_n(&gpu, n)?;
        let mut scores = Vec::with_capacity(work.len());
        let mut at = 0;
        for w in work {
            let k = w.eligible.len();
            scores.push(SlotScores {
                tokens: tokens[at..at + k].to_vec(),
                conf: conf[at..at + k].to_vec(),
            });
            at += k;
        }
        Ok((commits, scores))
    }

    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
}

/// The commit kernel's count rule for `policy` (the kernel knows no policy; ranking is the
/// same for all of them: by confidence, which `Random` and Dream's algorithms set). Every
/// policy has a rule; the `Result` is for a policy a future kernel cannot count.
pub fn commit_rule(policy: &Policy) -> Result<CountRule> {
    Ok(match *policy {
        Policy::Schedule { steps } | Policy::Random { steps } => CountRule::Schedule { steps },
        Policy::Threshold { tau } => CountRule::Threshold { tau },
        Policy::Confident { tau, steps } => CountRule::ThresholdOrSchedule { tau, steps },
        Policy::Factor { f } => CountRule::FactorPrefix { f },
        Policy::Dream { steps, .. } => CountRule::DreamCount { steps },
        Policy::Llada2 { tau, steps } => CountRule::MaxAboveSchedule { tau, steps },
        Policy::Edit { .. } => {
            return Err(Error::bad_input(format!(
                "policy `{policy}` runs on the CPU backend only in this build (the GPU commit kernel cannot re-write committed slots)"
            )))
        }
    })
}

/// The commit kernel's view of a step context.
pub fn count_ctx(ctx: StepCtx) -> CountCtx {
    CountCtx { step: ctx.step, block_masked: ctx.block_masked, masked: ctx.masked, block_len: ctx.block_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::decode::policy::DreamAlg;

    #[test]
    fn commit_rule_translates_every_policy() {
        let rule = |p: &str| commit_rule(&p.parse::<Policy>().unwrap()).unwrap();
        assert_eq!(rule("llada2:0.95,8"), CountRule::MaxAboveSchedule { tau: 0.95, steps: 8 });
        assert_eq!(rule("llada2:0,32"), CountRule::MaxAboveSchedule { tau: 0.0, steps: 32 });
        assert_eq!(rule("threshold:0.5"), CountRule::Threshold { tau: 0.5 });
        assert_eq!(rule("schedule:4"), CountRule::Schedule { steps: 4 });
        assert_eq!(rule("random:3"), CountRule::Schedule { steps: 3 });
        assert_eq!(rule("confident:0.9,6"), CountRule::ThresholdOrSchedule { tau: 0.9, steps: 6 });
        assert_eq!(rule("factor:0.4"), CountRule::FactorPrefix { f: 0.4 });
        assert_eq!(rule("dream:entropy,5"), CountRule::DreamCount { steps: 5 });
        // The record the kernel reads: rule 6 with τ and S, the step context as given.
        let ctx = StepCtx { step: 2, block_masked: 29, masked: 20, block_len: 32 };
        let rec = SeqCommitParams::new(rule("llada2:0.9,8"), count_ctx(ctx), 3, 20, 1);
        assert_eq!((rec.policy, rec.tau, rec.steps), (6, 0.9, 8));
        assert_eq!((rec.ctx_step, rec.block_masked, rec.masked, rec.block_len), (2, 29, 20, 32));
        assert_eq!((rec.slot_offset, rec.slot_count, rec.canvas_row), (3, 20, 1));
        let dream = Policy::Dream { alg: DreamAlg::Origin, steps: 4 };
        assert_eq!(SeqCommitParams::new(commit_rule(&dream).unwrap(), count_ctx(ctx), 0, 1, 0).policy, 5);
        let e = commit_rule(&Policy::Edit { tau_m: 0.7, tau_e: 0.5, post: 16 }).unwrap_err().to_string();
        assert!(e.contains("edit:0.7,0.5,16") && e.contains("CPU backend only"), "{e}");
    }
}
