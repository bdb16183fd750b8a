//! The decode loop (no KV cache: every step recomputes every canvas row) over any
//! `StepBackend`. Each step packs the canvases of all active sequences into one `RowBatch`
//! (positions 0..len, cache rows back to back), asks for the logits of the rows that predict
//! eligible slots (the slot's own row; for shifted models the row before it, row 0 for a slot
//! at position 0), lets the backend pick the commits, applies them, advances blocks and stop
//! rules, records per-step timings and calls the step callback. Finished sequences leave the
//! batch; the loop ends when every sequence is done.
use std::time::Instant;

use crate::batch::{RowBatch, SeqSpan};
use crate::error::{Error, Result};

use super::canvas::Canvas;
use super::policy::Policy;
use super::sampling::Sampling;
use super::step::{Commit, SeqWork, SlotScores, StepBackend};

/// One sequence in the decode loop: its canvas, how it decodes, and what happened so far.
#[derive(Clone, Debug)]
pub struct SeqState {
    pub canvas: Canvas,
    pub policy: Policy,
    pub sampling: Sampling,
    /// RNG key parts (`RngKey { seed, seq: seq_id, .. }`).
    pub seed: u64,
    pub seq_id: u32,
    /// Slots committed at each of this sequence's steps.
    pub commits_per_step: Vec<u32>,
    /// Wall time of each step this sequence took part in (the whole batch's step), ms.
    pub step_ms: Vec<f64>,
}

impl SeqState {
    pub fn new(canvas: Canvas, policy: Policy, sampling: Sampling, seed: u64, seq_id: u32) -> Self {
        SeqState { canvas, policy, sampling, seed, seq_id, commits_per_step: Vec::new(), step_ms: Vec::new() }
    }
}

/// What the step callback sees, once per sequence per step, after the commits are applied.
#[derive(Clone, Copy)]
pub struct StepEvent<'a> {
    /// Index of the sequence in the slice given to `run`.
    pub index: usize,
    /// The sequence's step number (0 for its first step).
    pub step: u32,
    /// Index of the batch step (counts every forward of this run).
    pub batch_step: u32,
    pub canvas: &'a Canvas,
    /// Positions that were eligible at this step, ascending.
    pub eligible: &'a [u32],
    /// Candidate and confidence of each eligible slot (same order as `eligible`).
    pub scores: &'a SlotScores,
    /// The slots that took their candidate, in rank order.
    pub commits: &'a [Commit],
    /// Wall time of the batch step, ms.
    pub ms: f64,
}

/// The canvas row whose logits predict the slot at `pos`.
pub fn logit_row(pos: u32, shifted: bool) -> u32 {
    if shifted {
        pos.saturating_sub(1)
    } else {
        pos
    }
}

/// Packs the full canvases of `seqs` (all rows live, positions 0..len) and the work of each:
/// eligible slots and, per slot, the index into `logit_rows` of the row predicting it. Rows
/// shared by two slots (shifted, empty prompt: slots 0 and 1 both read row 0) appear once.
pub fn build_step(seqs: &[&SeqState], shifted: bool) -> (RowBatch, Vec<SeqWork>) {
    let mut b = RowBatch::default();
    let mut work = Vec::with_capacity(seqs.len());
    let mut base = 0u32;
    for s in seqs {
        let c = &s.canvas;
        let start = b.tokens.len() as u32;
        let len = c.len() as u32;
        b.tokens.extend_from_slice(c.tokens());
        b.positions.extend(0..len);
        b.seqs.push(SeqSpan { row_start: start, row_count: len, cache_base: base, kv_len: len });
        base += len;
        let eligible = c.eligible();
        let mut logit_index = Vec::with_capacity(eligible.len());
        let mut last: Option<u32> = None;
        for &p in &eligible {
            let row = start + logit_row(p, shifted);
            if last != Some(row) {
                b.logit_rows.push(row);
                last = Some(row);
            }
            logit_index.push(b.logit_rows.len() as u32 - 1);
        }
        work.push(SeqWork {
            eligible,
            logit_index,
            policy: s.policy,
            ctx: c.ctx(),
            sampling: s.sampling,
            seed: s.seed,
            seq_id: s.seq_id,
            step: c.steps(),
        });
    }
    (b, work)
}

/// Decodes every sequence of `seqs` to completion on `backend`. With a callback, each step
/// also asks the backend for the eligible slots' scores and reports every sequence's step.
pub fn run(
    backend: &mut dyn StepBackend,
    seqs: &mut [SeqState],
    mut callback: Option<&mut dyn FnMut(&StepEvent)>,
) -> Result<()> {
    let shifted = backend.config().shifted();
    let vocab = backend.config().vocab;
    let mut batch_step = 0u32;
    loop {
        let t0 = Instant::now();
        let active: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].canvas.is_done()).collect();
        if active.is_empty() {
            return Ok(());
        }
        let refs: Vec<&SeqState> = active.iter().map(|&i| &seqs[i]).collect();
        let (batch, work) = build_step(&refs, shifted);
        let (commits, scores) = if callback.is_some() {
            backend.step_scored(&batch, &work)?
        } else {
            (backend.step(&batch, &work)?, Vec::new())
        };
        if commits.len() != work.len() || (callback.is_some() && scores.len() != work.len()) {
            return Err(Error::bad_input(format!(
                "step backend returned {} commit lists and {} score lists for {} sequences",
                commits.len(),
                scores.len(),
                work.len()
            )));
        }
        for (k, &i) in active.iter().enumerate() {
            seqs[i].canvas.apply(&commits[k], vocab).map_err(|e| match e {
                Error::BadInput(m) => Error::bad_input(format!("sequence {i}: {m}")),
                other => other,
            })?;
            seqs[i].commits_per_step.push(commits[k].len() as u32);
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        for (k, &i) in active.iter().enumerate() {
            seqs[i].step_ms.push(ms);
            if let Some(cb) = callback.as_mut() {
                let s = &seqs[i];
                cb(&StepEvent {
                    index: i,
                    step: s.canvas.steps() - 1,
                    batch_step,
                    canvas: &s.canvas,
                    eligible: &work[k].eligible,
                    scores: &scores[k],
                    commits: &commits[k],
                    ms,
                });
            }
        }
        batch_step += 1;
    }
}
