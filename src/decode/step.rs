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
    /// Canvas positions of the slots the step scores, ascending: the eligible ones (masked,
    /// not fixed, in the current block); for `edit:` every slot of the block that is not fixed
    /// (committed ones may be re-written).
    pub eligible: Vec<u32>,
    /// The canvas token of each scored slot (the mask id for a masked one), same order as
    /// `eligible`. `edit:` needs it; other policies may leave it empty.
    pub current: Vec<u32>,
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

/// The commit lists of one step, one per sequence of the step's `work` (same order), stored
/// flat (every list back to back) so a caller that keeps one value across steps refills it
/// without allocating once its capacity has grown to the largest step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepCommits {
    commits: Vec<Commit>,
    /// One past the last commit of each closed list, in `commits`.
    ends: Vec<usize>,
}

impl StepCommits {
    /// Empties every list, keeping the capacity.
    pub fn clear(&mut self) {
        self.commits.clear();
        self.ends.clear();
    }

    /// Makes room for `seqs` lists holding `commits` commits in all beyond the current
    /// contents, so filling them allocates nothing.
    pub fn reserve(&mut self, seqs: usize, commits: usize) {
        self.ends.reserve(seqs);
        self.commits.reserve(commits);
    }

    /// Appends `c` to the list being built (the one the next [`end_seq`](Self::end_seq)
    /// closes).
    pub fn push(&mut self, c: Commit) {
        self.commits.push(c);
    }

    /// Closes the list being built: it becomes sequence `len() - 1`'s.
    pub fn end_seq(&mut self) {
        self.ends.push(self.commits.len());
    }

    /// Appends one whole sequence's list.
    pub fn push_seq(&mut self, list: &[Commit]) {
        self.commits.extend_from_slice(list);
        self.end_seq();
    }

    /// Replaces the contents with `lists` (one per sequence).
    pub fn set_lists(&mut self, lists: &[Vec<Commit>]) {
        self.clear();
        for l in lists {
            self.push_seq(l);
        }
    }

    /// Closed lists (sequences).
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Sequence `k`'s commits, in rank order.
    pub fn seq(&self, k: usize) -> &[Commit] {
        let start = if k == 0 { 0 } else { self.ends[k - 1] };
        &self.commits[start..self.ends[k]]
    }

    /// Every closed list, in sequence order.
    pub fn iter(&self) -> impl Iterator<Item = &[Commit]> + '_ {
        (0..self.len()).map(|k| self.seq(k))
    }

    /// The lists as owned vectors (allocates; for tests and the `step` API).
    pub fn to_lists(&self) -> Vec<Vec<Commit>> {
        self.iter().map(<[Commit]>::to_vec).collect()
    }
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

    /// As `step`, writing the commit lists into `out` (cleared first). A caller that keeps
    /// `out` across steps (the runner does) then allocates nothing for them. The default goes
    /// through `step` and copies; a backend whose step allocates nothing overrides it.
    fn step_into(&mut self, batch: &RowBatch, work: &[SeqWork], out: &mut StepCommits) -> Result<()> {
        let lists = self.step(batch, work)?;
        out.set_lists(&lists);
        Ok(())
    }

    /// Like `step` but also returns every eligible slot's candidate and confidence.
    fn step_scored(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)>;

    /// Model-level facts the scheduler needs.
    fn config(&self) -> &crate::config::ModelConfig;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_commits_keep_lists_apart_and_refill() {
        let c = |pos, token| Commit { pos, token };
        let lists = vec![vec![c(5, 1), c(3, 2)], vec![], vec![c(9, 4)]];
        let mut s = StepCommits::default();
        s.set_lists(&lists);
        assert_eq!(s.len(), 3);
        assert_eq!(s.seq(0), [c(5, 1), c(3, 2)]);
        assert!(s.seq(1).is_empty());
        assert_eq!(s.seq(2), [c(9, 4)]);
        assert_eq!(s.to_lists(), lists);
        s.clear();
        assert!(s.is_empty());
        s.push(c(7, 8));
        s.end_seq();
        s.push_seq(&[c(1, 2)]);
        assert_eq!(s.to_lists(), [vec![c(7, 8)], vec![c(1, 2)]]);
    }
}
