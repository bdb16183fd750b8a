//! The CPU step backend: `CpuModel::forward` (f32) over the batch, then on the host a
//! candidate and confidence per eligible slot (`sampling::candidate`) and the policy's
//! selection (`Policy::select`). `score_and_select` is that host half on its own, usable
//! with any logits (scripted logits in the semantics tests, GPU logits in parity tests).
//!
//! The mask token is never a candidate: its logit is treated as −1e30 (no probability mass,
//! never the argmax or a sample), so a committed slot always leaves the mask state and every
//! step makes progress.
use rayon::prelude::*;

use crate::batch::RowBatch;
use crate::config::ModelConfig;
use crate::cpu::forward::{ActQuant, CpuKvCache, CpuModel};
use crate::error::{Error, Result};
use crate::weights::HostWeights;

use super::policy::{select_edits, Policy};
use super::sampling::{candidate, RngKey, FILTERED_LOGIT};
use super::step::{Commit, SeqWork, SlotScores, StepBackend};

/// The logit the mask token gets before candidates are drawn (finite, so entropies stay
/// finite: exp underflows to exactly 0): the value every excluded logit reads as, the same one
/// Dream's filter gives the logits it drops.
pub const MASK_LOGIT: f32 = FILTERED_LOGIT;

/// Candidates, confidences and commits of every sequence of `work`, given the logits of the
/// batch's logit rows (`[n_logit_rows, vocab]`, row-major).
pub fn score_and_select(
    logits: &[f32],
    vocab: usize,
    mask_id: u32,
    work: &[SeqWork],
) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
    if vocab == 0 || !logits.len().is_multiple_of(vocab) {
        return Err(Error::shape("score_and_select", "logits", &[logits.len() / vocab.max(1), vocab], &[logits.len()]));
    }
    let n_rows = logits.len() / vocab;
    for (si, w) in work.iter().enumerate() {
        if w.logit_index.len() != w.eligible.len() {
            return Err(Error::bad_input(format!(
                "sequence {si}: {} logit indices for {} eligible slots",
                w.logit_index.len(),
                w.eligible.len()
            )));
        }
        if let Some(&r) = w.logit_index.iter().find(|&&r| r as usize >= n_rows) {
            return Err(Error::bad_input(format!("sequence {si}: logit index {r} is not below {n_rows} logit rows")));
        }
        if w.policy.edit_budget().is_some() && w.current.len() != w.eligible.len() {
            return Err(Error::bad_input(format!(
                "sequence {si}: policy `{}` needs the current token of each of its {} scored slots, got {}",
                w.policy,
                w.eligible.len(),
                w.current.len()
            )));
        }
    }
    let scores: Vec<SlotScores> = work
        .par_iter()
        .map(|w| {
            let (kind, dist) = (w.policy.conf_kind(), w.policy.conf_dist());
            let (tokens, conf): (Vec<u32>, Vec<f32>) = w
                .eligible
                .par_iter()
                .zip(w.logit_index.par_iter())
                .map(|(&pos, &r)| {
                    let mut row = logits[r as usize * vocab..(r as usize + 1) * vocab].to_vec();
                    if let Some(m) = row.get_mut(mask_id as usize) {
                        *m = MASK_LOGIT;
                    }
                    let key = RngKey { seed: w.seed, seq: w.seq_id, step: w.step, slot: pos };
                    candidate(&row, &w.sampling, kind, key, dist)
                })
                .unzip();
            SlotScores { tokens, conf }
        })
        .collect();
    let commits = work
        .iter()
        .zip(&scores)
        .map(|(w, s)| {
            // `edit:` scores committed slots too: only the masked ones go to the count rule.
            let masked = |i: &usize| w.policy.edit_budget().is_none() || w.current[*i] == mask_id;
            let pairs: Vec<(u32, f32)> = (0..w.eligible.len()).filter(masked).map(|i| (w.eligible[i], s.conf[i])).collect();
            let mut commits: Vec<Commit> = w
                .policy
                .select(w.ctx, &pairs)
                .into_iter()
                .map(|pos| {
                    let i = w.eligible.binary_search(&pos).expect("select returns eligible positions");
                    Commit { pos, token: s.tokens[i] }
                })
                .collect();
            if let Policy::Edit { tau_e, .. } = w.policy {
                let edits = select_edits(tau_e, mask_id, &w.eligible, &w.current, &s.tokens, &s.conf);
                commits.extend(edits.map(|(pos, token)| Commit { pos, token }));
            }
            commits
        })
        .collect();
    Ok((commits, scores))
}

/// `StepBackend` over the f32 CPU model with a KV cache that persists across steps (cached
/// rows of the KV-cache schemes are read from it). The cache is sized at construction or by
/// [`CpuStepper::reserve`] before a decode loop; a step never resizes it and refuses a batch
/// that needs more rows.
pub struct CpuStepper {
    model: CpuModel,
    cache: CpuKvCache,
}

impl CpuStepper {
    /// Converts the weights to f32 and preallocates `capacity_rows` cache rows.
    pub fn new(w: &HostWeights, capacity_rows: usize) -> Result<Self> {
        let model = CpuModel::new(w)?;
        let cache = model.new_cache(capacity_rows);
        Ok(CpuStepper { model, cache })
    }

    /// The stepper with its model's activation quantisation set (`ActQuant::Fp8Row` on
    /// `fp8_fidelity::fake_quant` weights: the W8A8 reference, e.g. for `commit_agreement`).
    pub fn with_act_quant(mut self, q: ActQuant) -> Self {
        self.model.set_act_quant(q);
        self
    }

    pub fn model(&self) -> &CpuModel {
        &self.model
    }

    /// The KV cache (post-RoPE K and V of every layer, `[capacity, kv_dim]` f32 each).
    pub fn cache(&self) -> &CpuKvCache {
        &self.cache
    }

    /// Bytes one cache row takes: K and V of every layer, f32.
    pub fn cache_row_bytes(&self) -> u64 {
        (2 * self.model.cfg.n_layers * self.model.cfg.kv_dim() * std::mem::size_of::<f32>()) as u64
    }

    /// Makes sure the cache holds at least `rows` rows. Growing keeps every row it held (rows
    /// keep their indices), so active sequences' cached K/V survive; it allocates, so the
    /// scheduler calls it only at step boundaries when admitting.
    pub fn reserve(&mut self, rows: usize) {
        if rows > self.cache.capacity {
            let n = rows * self.model.cfg.kv_dim();
            for l in self.cache.k.iter_mut().chain(self.cache.v.iter_mut()) {
                l.resize(n, 0.0);
            }
            self.cache.capacity = rows;
        }
    }
}

impl StepBackend for CpuStepper {
    fn step(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<Vec<Vec<Commit>>> {
        Ok(self.step_scored(batch, work)?.0)
    }

    fn step_scored(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
        if work.len() != batch.seqs.len() {
            return Err(Error::bad_input(format!(
                "step: {} work items for {} sequences in the batch",
                work.len(),
                batch.seqs.len()
            )));
        }
        let need = batch.cache_rows_needed();
        if need > self.cache.capacity {
            return Err(Error::bad_input(format!(
                "step: the batch needs {need} KV-cache rows, the CPU cache holds {} (reserve them before decoding)",
                self.cache.capacity
            )));
        }
        let logits = self.model.forward(batch, &mut self.cache)?;
        let cfg = &self.model.cfg;
        score_and_select(&logits, cfg.vocab, cfg.mask_id, work)
    }

    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::policy::StepCtx;
    use crate::decode::sampling::Sampling;

    #[test]
    fn mask_token_is_never_a_candidate() {
        // vocab 4, mask id 3 has the largest logit.
        let logits = [0.0f32, 1.0, 0.5, 9.0];
        let w = SeqWork {
            eligible: vec![7],
            current: vec![3],
            logit_index: vec![0],
            policy: Policy::Threshold { tau: 0.5 },
            ctx: StepCtx { step: 0, block_masked: 1, masked: 1, block_len: 1 },
            sampling: Sampling::default(),
            seed: 1,
            seq_id: 0,
            step: 0,
        };
        let (c, s) = score_and_select(&logits, 4, 3, &[w]).unwrap();
        assert_eq!(c, [vec![Commit { pos: 7, token: 1 }]]);
        // p(1) over the three non-mask tokens.
        let z = 1.0 + (-1.0f64).exp() + (-0.5f64).exp();
        assert!((s[0].conf[0] as f64 - 1.0 / z).abs() < 1e-6, "{:?}", s[0].conf);
    }

    #[test]
    fn edit_commits_masked_slots_and_rewrites_committed_ones() {
        // vocab 4, mask 3. Slot 10 masked (argmax 1, p ≈ 0.79), slot 11 holds 2 but its argmax
        // is 0 (p ≈ 0.79: an edit), slot 12 holds 1 and agrees (no edit).
        let logits = [0.0f32, 2.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0];
        let mut w = SeqWork {
            eligible: vec![10, 11, 12],
            current: vec![3, 2, 1],
            logit_index: vec![0, 1, 2],
            policy: Policy::Edit { tau_m: 0.95, tau_e: 0.5, post: 4 },
            ctx: StepCtx { step: 1, block_masked: 3, masked: 1, block_len: 3 },
            sampling: Sampling::default(),
            seed: 1,
            seq_id: 0,
            step: 0,
        };
        let (c, _) = score_and_select(&logits, 4, 3, std::slice::from_ref(&w)).unwrap();
        // 10 is below τm but the only masked slot: committed anyway; then the edit of 11.
        assert_eq!(c, [vec![Commit { pos: 10, token: 1 }, Commit { pos: 11, token: 0 }]]);
        w.policy = Policy::Edit { tau_m: 0.95, tau_e: 0.9, post: 4 };
        let (c, _) = score_and_select(&logits, 4, 3, std::slice::from_ref(&w)).unwrap();
        assert_eq!(c, [vec![Commit { pos: 10, token: 1 }]], "p ≈ 0.79 is below τe = 0.9");
        w.current.pop();
        let e = score_and_select(&logits, 4, 3, &[w]).unwrap_err().to_string();
        assert!(e.contains("current token of each of its 3 scored slots, got 2"), "{e}");
    }
}
