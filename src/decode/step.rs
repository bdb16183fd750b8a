//! One decoding step as a backend sees it: a forward over a `RowBatch`, then for each
//! sequence a candidate and confidence per eligible slot and the policy's selection.
//! The CPU backend implements it with `cpu::forward` + `sampling::candidate` +
//! `Policy::select`; the GPU backend with the confidence and commit kernels.
use crate::batch::RowBatch;
use crate::error::Result;

use super::policy::{Policy, StepCtx};
use super::sampling::Sampling;

/// What one sequence asks of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqWork {
    /// Canvas positions of the eligible slots (masked, not fixed, in the current block),
    /// ascending.
    pub eligible: Vec<u32>,
    /// For each eligible slot, the index into `batch.logit_rows` of the row predicting it
    /// (the slot's own row for LLaDA; the row before it for shifted models).
    pub logit_index: Vec<u32>,
    pub policy: Policy,
    pub ctx: StepCtx,
    pub sampling: Sampling,
    /// RNG key parts: the request's seed and sequence id, and the sequence's step number.
    pub seed: u64,
    pub seq_id: u32,
    pub step: u32,
}

/// A slot that took its candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    pub pos: u32,
    pub token: u32,
}

/// Candidates and confidences of every eligible slot (for parity tests and visualisation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotScores {
    pub tokens: Vec<u32>,
    pub conf: Vec<f32>,
}

pub trait StepBackend {
    /// Runs the forward over `batch` (whose logit rows cover every eligible slot of `work`)
    /// and returns, per sequence of `work` (same order), the commits in rank order.
    fn step(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<Vec<Vec<Commit>>>;

    /// Like `step` but also returns every eligible slot's candidate and confidence.
    fn step_scored(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)>;

    /// Model-level facts the scheduler needs.
    fn config(&self) -> &crate::config::ModelConfig;
}
