//! One sequence's canvas (DESIGN.md §4): [prompt | gen_len slots], the gen region cut into
//! semi-autoregressive blocks of `block_len`. Owns the block state machine: which slots are
//! eligible (masked, not fixed, in the current block), the policy context (`StepCtx`), applying
//! commits, advancing past finished blocks (skipping blocks with nothing masked), and the
//! stop-at-EOS rule.
use crate::config::ModelConfig;
use crate::error::{Error, Result};

use super::policy::{Policy, StepCtx};
use super::step::Commit;

/// Lengths and rules of one canvas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanvasSpec {
    pub gen_len: u32,
    pub block_len: u32,
    /// A finished block containing EOS/EOT ends the sequence; later masked slots become EOS.
    pub stop_at_eos: bool,
}

/// Checks lengths against each other and the model; the error names the offending values.
pub fn check_lengths(prompt_len: usize, gen_len: u32, block_len: u32, cfg: &ModelConfig) -> Result<()> {
    if gen_len == 0 {
        return Err(Error::bad_input("gen_len must be > 0"));
    }
    if block_len == 0 {
        return Err(Error::bad_input("block_len must be > 0"));
    }
    if !gen_len.is_multiple_of(block_len) {
        return Err(Error::bad_input(format!("gen_len {gen_len} is not a multiple of block_len {block_len}")));
    }
    let total = prompt_len + gen_len as usize;
    if total > cfg.max_seq_len {
        return Err(Error::bad_input(format!(
            "prompt ({prompt_len} tokens) + gen_len ({gen_len}) = {total} exceeds the model's context of {} tokens",
            cfg.max_seq_len
        )));
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct Canvas {
    tokens: Vec<u32>,
    /// Per canvas position: fixed by the prompt or a prior (never eligible).
    fixed: Vec<bool>,
    prompt_len: u32,
    spec: CanvasSpec,
    mask_id: u32,
    stop_ids: [u32; 2],
    eos_id: u32,
    /// Current block index (== number of blocks when done).
    block: u32,
    /// Steps taken in the current block.
    block_step: u32,
    /// Masked slots of the current block when it started.
    block_masked: u32,
    /// Steps taken by this sequence so far.
    step: u32,
    stopped_at_eos: bool,
}

impl Canvas {
    /// A canvas over `prompt` with gen slots masked except those `prior` fixes (`prior` is
    /// `gen_len` long, or empty for none). Validates lengths and token ids, then moves to the
    /// first block with a masked slot.
    pub fn new(prompt: &[u32], prior: &[Option<u32>], spec: CanvasSpec, cfg: &ModelConfig) -> Result<Self> {
        check_lengths(prompt.len(), spec.gen_len, spec.block_len, cfg)?;
        if let Some((i, &t)) = prompt.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab) {
            return Err(Error::bad_input(format!(
                "prompt token id {t} at index {i} is not below the vocabulary size {}",
                cfg.vocab
            )));
        }
        if !prior.is_empty() && prior.len() != spec.gen_len as usize {
            return Err(Error::bad_input(format!(
                "prior covers {} slots but gen_len is {}",
                prior.len(),
                spec.gen_len
            )));
        }
        let p = prompt.len();
        let mut tokens = prompt.to_vec();
        let mut fixed = vec![true; p];
        for i in 0..spec.gen_len as usize {
            match prior.get(i).copied().flatten() {
                Some(t) => {
                    if t as usize >= cfg.vocab || t == cfg.mask_id {
                        return Err(Error::bad_input(format!("prior fixes gen slot {i} to invalid token {t}")));
                    }
                    tokens.push(t);
                    fixed.push(true);
                }
                None => {
                    tokens.push(cfg.mask_id);
                    fixed.push(false);
                }
            }
        }
        let mut c = Canvas {
            tokens,
            fixed,
            prompt_len: p as u32,
            spec,
            mask_id: cfg.mask_id,
            stop_ids: [cfg.eos_id, cfg.eot_id],
            eos_id: cfg.eos_id,
            block: 0,
            block_step: 0,
            block_masked: 0,
            step: 0,
            stopped_at_eos: false,
        };
        c.block_masked = c.masked_in_block();
        c.settle();
        Ok(c)
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn prompt_len(&self) -> u32 {
        self.prompt_len
    }
    pub fn spec(&self) -> &CanvasSpec {
        &self.spec
    }
    /// The gen region.
    pub fn gen(&self) -> &[u32] {
        &self.tokens[self.prompt_len as usize..]
    }
    /// Whether the gen slot at offset `i` is fixed by the prior.
    pub fn is_fixed_gen(&self, i: usize) -> bool {
        self.fixed[self.prompt_len as usize + i]
    }
    pub fn mask_id(&self) -> u32 {
        self.mask_id
    }
    pub fn n_blocks(&self) -> u32 {
        self.spec.gen_len / self.spec.block_len
    }
    /// Current block index (== `n_blocks()` once done).
    pub fn block(&self) -> u32 {
        self.block
    }
    /// Steps this sequence has taken (its global step number for the next step).
    pub fn steps(&self) -> u32 {
        self.step
    }
    pub fn is_done(&self) -> bool {
        self.block >= self.n_blocks()
    }
    pub fn stopped_at_eos(&self) -> bool {
        self.stopped_at_eos
    }

    fn block_range(&self) -> std::ops::Range<usize> {
        let start = self.prompt_len as usize + (self.block * self.spec.block_len) as usize;
        start..start + self.spec.block_len as usize
    }

    fn is_masked(&self, pos: usize) -> bool {
        !self.fixed[pos] && self.tokens[pos] == self.mask_id
    }

    fn masked_in_block(&self) -> u32 {
        if self.is_done() {
            return 0;
        }
        self.block_range().filter(|&p| self.is_masked(p)).count() as u32
    }

    /// Canvas positions of the eligible slots (masked, not fixed, current block), ascending.
    pub fn eligible(&self) -> Vec<u32> {
        if self.is_done() {
            return Vec::new();
        }
        self.block_range().filter(|&p| self.is_masked(p)).map(|p| p as u32).collect()
    }

    /// The policy context of the next step.
    pub fn ctx(&self) -> StepCtx {
        StepCtx { step: self.block_step, block_masked: self.block_masked, masked: self.masked_in_block() }
    }

    /// Writes one step's commits (each must be an eligible slot, committed once, to a token
    /// that is not the mask and is below `vocab`; at least one commit), counts the step and
    /// advances past finished blocks.
    pub fn apply(&mut self, commits: &[Commit], vocab: usize) -> Result<()> {
        self.apply_step(commits, vocab, false)
    }

    /// [`Canvas::apply`] for a step of `policy`: a policy that may commit nothing
    /// ([`Policy::may_commit_none`], Dream) may pass an empty list; the step still counts.
    pub fn apply_for(&mut self, commits: &[Commit], vocab: usize, policy: &Policy) -> Result<()> {
        self.apply_step(commits, vocab, policy.may_commit_none())
    }

    fn apply_step(&mut self, commits: &[Commit], vocab: usize, may_commit_none: bool) -> Result<()> {
        if self.is_done() {
            return Err(Error::bad_input("commit to a finished sequence"));
        }
        if commits.is_empty() && !may_commit_none {
            return Err(Error::bad_input(format!(
                "step {} committed no slot (every policy commits at least one)",
                self.step
            )));
        }
        let range = self.block_range();
        for c in commits {
            let p = c.pos as usize;
            if !range.contains(&p) || !self.is_masked(p) {
                return Err(Error::bad_input(format!(
                    "step {}: commit to position {p}, which is not an eligible slot (block {}, positions {range:?})",
                    self.step, self.block
                )));
            }
            if c.token == self.mask_id || c.token as usize >= vocab {
                return Err(Error::bad_input(format!(
                    "step {}: commit of token {} at position {p} (the mask token or outside the vocabulary)",
                    self.step, c.token
                )));
            }
            self.tokens[p] = c.token;
        }
        self.step += 1;
        self.block_step += 1;
        self.settle();
        Ok(())
    }

    /// Moves past every finished block (no masked slot left), applying the stop rule.
    fn settle(&mut self) {
        while !self.is_done() && self.masked_in_block() == 0 {
            let range = self.block_range();
            let has_stop = self.tokens[range.clone()].iter().any(|t| self.stop_ids.contains(t));
            if self.spec.stop_at_eos && has_stop {
                for p in range.end..self.tokens.len() {
                    if !self.fixed[p] {
                        self.tokens[p] = self.eos_id;
                    }
                }
                self.stopped_at_eos = true;
                self.block = self.n_blocks();
                return;
            }
            self.block += 1;
            self.block_step = 0;
            self.block_masked = self.masked_in_block();
        }
    }
}

/// Refuses a step-count policy (`schedule:S`, `random:S`; S steps per block)
/// whose S exceeds the masked slots of a block: every step commits at least one slot, so that
/// block would silently take fewer steps than asked. `prior` holds the fixed token of every gen
/// slot (`None` = masked; empty = no prior); blocks a prior fixes entirely take no step and are
/// not checked. Run after [`check_lengths`] (block_len > 0 and divides gen_len).
pub fn check_steps(policy: &Policy, gen_len: u32, block_len: u32, prior: &[Option<u32>]) -> Result<()> {
    let (steps, fewer): (u32, fn(u32) -> Policy) = match *policy {
        Policy::Schedule { steps } => (steps, |m| Policy::Schedule { steps: m }),
        Policy::Random { steps } => (steps, |m| Policy::Random { steps: m }),
        // Dream commits its reference's count, 0 included: every one of its S steps runs.
        _ => return Ok(()),
    };
    let (gen, block) = (gen_len as usize, block_len.max(1) as usize);
    let masked = |b: usize| (b * block..((b + 1) * block).min(gen)).filter(|&i| prior.get(i).copied().flatten().is_none()).count();
    let fewest = (0..gen.div_ceil(block)).map(|b| (masked(b) as u32, b)).filter(|&(m, _)| m > 0).min();
    match fewest {
        Some((m, b)) if steps > m => Err(Error::bad_input(format!(
            "policy `{policy}` asks for {steps} steps per block, but block {b} has only {m} masked slots \
             (block_len {block_len}{}); every step commits at least one slot, so it would run {m} steps. \
             Use at most {m} steps (e.g. `{}`) or a longer block_len",
            if prior.is_empty() { "" } else { ", fewer where the prior fixes slots" },
            fewer(m)
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::preset("tiny-llada").unwrap()
    }

    fn spec(gen_len: u32, block_len: u32, stop_at_eos: bool) -> CanvasSpec {
        CanvasSpec { gen_len, block_len, stop_at_eos }
    }

    #[test]
    fn blocks_advance_and_fixed_blocks_are_skipped() {
        let cfg = cfg();
        // gen 6, blocks of 2; block 0 fully fixed, block 1 half fixed.
        let prior = [Some(5), Some(6), Some(7), None, None, None];
        let mut c = Canvas::new(&[1, 2, 3], &prior, spec(6, 2, true), &cfg).unwrap();
        assert_eq!(c.block(), 1);
        assert_eq!(c.eligible(), [6]);
        assert_eq!(c.ctx(), StepCtx { step: 0, block_masked: 1, masked: 1 });
        c.apply(&[Commit { pos: 6, token: 40 }], cfg.vocab).unwrap();
        assert_eq!(c.block(), 2);
        assert_eq!(c.eligible(), [7, 8]);
        c.apply(&[Commit { pos: 8, token: 41 }], cfg.vocab).unwrap();
        assert_eq!(c.ctx(), StepCtx { step: 1, block_masked: 2, masked: 1 });
        let e = c.apply(&[Commit { pos: 8, token: 41 }], cfg.vocab).unwrap_err().to_string();
        assert!(e.contains("not an eligible slot"), "{e}");
        c.apply(&[Commit { pos: 7, token: 42 }], cfg.vocab).unwrap();
        assert!(c.is_done());
        assert_eq!(c.gen(), [5, 6, 7, 40, 42, 41]);
        assert_eq!(c.steps(), 3);
    }

    #[test]
    fn eos_in_a_finished_block_fills_the_rest_but_keeps_fixed_slots() {
        let cfg = cfg();
        let prior = [None, None, None, Some(9), None, None];
        let mut c = Canvas::new(&[1], &prior, spec(6, 2, true), &cfg).unwrap();
        c.apply(&[Commit { pos: 1, token: cfg.eot_id }], cfg.vocab).unwrap();
        assert!(!c.is_done(), "the block still has a masked slot");
        c.apply(&[Commit { pos: 2, token: 3 }], cfg.vocab).unwrap();
        assert!(c.is_done() && c.stopped_at_eos());
        assert_eq!(c.gen(), [cfg.eot_id, 3, cfg.eos_id, 9, cfg.eos_id, cfg.eos_id]);
    }

    #[test]
    fn bad_lengths_are_named() {
        let cfg = cfg();
        let err = |p: usize, g, b| Canvas::new(&vec![1; p], &[], spec(g, b, false), &cfg).unwrap_err().to_string();
        assert!(err(1, 0, 1).contains("gen_len must be > 0"));
        assert!(err(1, 4, 0).contains("block_len must be > 0"));
        let e = err(1, 10, 4);
        assert!(e.contains("10") && e.contains("4") && e.contains("multiple"), "{e}");
        assert!(err(1000, 32, 8).contains("exceeds the model's context"));
        let e = Canvas::new(&[512], &[], spec(4, 4, false), &cfg).unwrap_err().to_string();
        assert!(e.contains("vocabulary"), "{e}");
    }
}
