//! One sequence's canvas (DESIGN.md §4, §8): the prompt, then `gen_len` slots cut into
//! semi-autoregressive blocks of `block_len`. Owns the block state machine: which slots are
//! eligible (masked, not fixed, in the current block), the policy context (`StepCtx`), applying
//! commits (and `edit:`'s re-writes), advancing past finished blocks (skipping blocks with
//! nothing masked), and the stop-at-EOS rule.
//!
//! Two layouts ([`Layout`]). `Gen` (every model but LLaDA2): `[prompt | gen_len slots]`, blocks
//! from the first gen slot, gen_len a multiple of block_len. `Aligned` (LLaDA2, as its official
//! `generate`): blocks sit at absolute multiples of block_len and the canvas is padded to
//! ceil((P + G) / B) blocks, so the first decoded block is P / B and holds the prompt's tail
//! (fixed: never eligible, never counted as masked); slots past P + G are decoded like the
//! others but are not output; with stop-at-EOS a finished block stops the sequence when
//! x[P, block end) holds `eos_id` (not the end-of-turn id), and the output is cut after its
//! first EOS.
use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};

use super::policy::{Policy, StepCtx};
use super::step::Commit;

/// Lengths and rules of one canvas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanvasSpec {
    pub gen_len: u32,
    pub block_len: u32,
    /// A finished block containing EOS/EOT (`Aligned`: EOS) ends the sequence; later masked
    /// slots become EOS.
    pub stop_at_eos: bool,
}

/// Where a canvas's blocks sit (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// Blocks from the first gen slot; gen_len a multiple of block_len.
    #[default]
    Gen,
    /// LLaDA2's: blocks at absolute multiples of block_len, the canvas padded to whole blocks.
    Aligned,
}

impl Layout {
    /// The layout the model's reference decoder uses: `Aligned` for LLaDA2, `Gen` otherwise.
    pub fn for_model(cfg: &ModelConfig) -> Layout {
        if cfg.arch == Arch::Llada2 {
            Layout::Aligned
        } else {
            Layout::Gen
        }
    }

    /// Canvas rows for a prompt of `prompt_len` and `gen_len` slots in blocks of `block_len`
    /// (> 0): P + G, or for `Aligned` P + G rounded up to whole blocks.
    pub fn canvas_len(self, prompt_len: usize, gen_len: u32, block_len: u32) -> usize {
        let total = prompt_len + gen_len as usize;
        match self {
            Layout::Gen => total,
            Layout::Aligned => total.div_ceil(block_len.max(1) as usize) * block_len.max(1) as usize,
        }
    }
}

/// Checks lengths against each other and the model (the `Gen` layout); the error names the
/// offending values.
pub fn check_lengths(prompt_len: usize, gen_len: u32, block_len: u32, cfg: &ModelConfig) -> Result<()> {
    check_layout_lengths(prompt_len, gen_len, block_len, Layout::Gen, cfg)
}

/// [`check_lengths`] for either layout: `Aligned` needs no divisibility (the canvas is padded to
/// whole blocks), and its padded length must fit the context.
pub fn check_layout_lengths(prompt_len: usize, gen_len: u32, block_len: u32, layout: Layout, cfg: &ModelConfig) -> Result<()> {
    if gen_len == 0 {
        return Err(Error::bad_input("gen_len must be > 0"));
    }
    if block_len == 0 {
        return Err(Error::bad_input("block_len must be > 0"));
    }
    if layout == Layout::Gen && !gen_len.is_multiple_of(block_len) {
        return Err(Error::bad_input(format!("gen_len {gen_len} is not a multiple of block_len {block_len}")));
    }
    let total = prompt_len + gen_len as usize;
    let rows = layout.canvas_len(prompt_len, gen_len, block_len);
    if rows > cfg.max_seq_len {
        let padded = if rows > total { format!(", padded to whole blocks of {block_len}: {rows}") } else { String::new() };
        return Err(Error::bad_input(format!(
            "prompt ({prompt_len} tokens) + gen_len ({gen_len}) = {total}{padded} exceeds the model's context of {} tokens",
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
    layout: Layout,
    mask_id: u32,
    stop_ids: [u32; 2],
    eos_id: u32,
    /// Canvas position where block 0 starts (P, or P rounded down to a block for `Aligned`).
    first: u32,
    n_blocks: u32,
    /// Current block index (== number of blocks when done).
    block: u32,
    /// Steps taken in the current block.
    block_step: u32,
    /// Masked slots of the current block when it started.
    block_masked: u32,
    /// Steps of the current block that began with no masked slot (`edit:` only).
    post_steps: u32,
    /// Steps taken by this sequence so far.
    step: u32,
    stopped_at_eos: bool,
}

impl Canvas {
    /// A canvas over `prompt` in the `Gen` layout ([`Canvas::with_layout`]).
    pub fn new(prompt: &[u32], prior: &[Option<u32>], spec: CanvasSpec, cfg: &ModelConfig) -> Result<Self> {
        Self::with_layout(prompt, prior, spec, Layout::Gen, cfg)
    }

    /// A canvas over `prompt` with gen slots masked except those `prior` fixes (`prior` is
    /// `gen_len` long, or empty for none; `Aligned` padding slots are masked). Validates
    /// lengths and token ids, then moves to the first block with a masked slot.
    pub fn with_layout(prompt: &[u32], prior: &[Option<u32>], spec: CanvasSpec, layout: Layout, cfg: &ModelConfig) -> Result<Self> {
        check_layout_lengths(prompt.len(), spec.gen_len, spec.block_len, layout, cfg)?;
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
        let rows = layout.canvas_len(p, spec.gen_len, spec.block_len);
        let mut tokens = Vec::with_capacity(rows);
        tokens.extend_from_slice(prompt);
        let mut fixed = vec![true; p];
        fixed.reserve(rows - p);
        for i in 0..rows - p {
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
        let bl = spec.block_len;
        let first = match layout {
            Layout::Gen => p as u32,
            Layout::Aligned => p as u32 / bl * bl,
        };
        let mut c = Canvas {
            tokens,
            fixed,
            prompt_len: p as u32,
            n_blocks: (rows as u32 - first).div_ceil(bl),
            spec,
            layout,
            mask_id: cfg.mask_id,
            stop_ids: [cfg.eos_id, cfg.eot_id],
            eos_id: cfg.eos_id,
            first,
            block: 0,
            block_step: 0,
            block_masked: 0,
            post_steps: 0,
            step: 0,
            stopped_at_eos: false,
        };
        c.block_masked = c.masked_in_block();
        c.settle(c.block_masked == 0);
        Ok(c)
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Canvas rows (P + G; `Aligned`: padded to whole blocks).
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
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The gen region: the `gen_len` slots after the prompt (never the `Aligned` padding).
    pub fn gen(&self) -> &[u32] {
        let p = self.prompt_len as usize;
        &self.tokens[p..p + self.spec.gen_len as usize]
    }
    /// Whether the slot at offset `i` after the prompt is fixed by the prior.
    pub fn is_fixed_gen(&self, i: usize) -> bool {
        self.fixed[self.prompt_len as usize + i]
    }
    pub fn mask_id(&self) -> u32 {
        self.mask_id
    }
    pub fn n_blocks(&self) -> u32 {
        self.n_blocks
    }
    /// Canvas position where block 0 starts.
    pub fn blocks_start(&self) -> u32 {
        self.first
    }
    /// Current block index (== `n_blocks()` once done).
    pub fn block(&self) -> u32 {
        self.block
    }
    /// The block holding canvas position `pos` (0 for a position before block 0).
    pub fn block_of(&self, pos: u32) -> u32 {
        pos.saturating_sub(self.first) / self.spec.block_len
    }
    /// Steps this sequence has taken (its global step number for the next step).
    pub fn steps(&self) -> u32 {
        self.step
    }
    pub fn is_done(&self) -> bool {
        self.block >= self.n_blocks
    }
    pub fn stopped_at_eos(&self) -> bool {
        self.stopped_at_eos
    }

    /// Gen slots (from the first) that no later step can change: those of finished blocks, or
    /// the whole output once done.
    pub fn finished_gen(&self) -> usize {
        if self.is_done() {
            return self.output_len();
        }
        let end = (self.first + self.block * self.spec.block_len).min(self.prompt_len + self.spec.gen_len);
        end.saturating_sub(self.prompt_len) as usize
    }

    /// Length of the output: `gen_len`, or for `Aligned` with stop-at-EOS up to and including
    /// the first EOS of the gen region (as the official LLaDA2 `generate` returns it).
    pub fn output_len(&self) -> usize {
        let gen = self.gen();
        match self.layout {
            Layout::Aligned if self.spec.stop_at_eos => gen.iter().position(|&t| t == self.eos_id).map_or(gen.len(), |i| i + 1),
            _ => gen.len(),
        }
    }

    /// The output: [`Canvas::gen`] cut to [`Canvas::output_len`].
    pub fn output(&self) -> &[u32] {
        &self.gen()[..self.output_len()]
    }

    /// Steps the canvas can take at most under `policy`: one per masked slot (every step but
    /// Dream's and `edit:`'s post-mask ones commits at least one), or S per block for a
    /// step-count policy if more, plus `edit:`'s budget per block.
    pub fn max_steps(&self, policy: &Policy) -> usize {
        let masked = (self.prompt_len as usize..self.len()).filter(|&p| !self.fixed[p]).count();
        let blocks = self.n_blocks as usize;
        let per_block = policy.steps().unwrap_or(0) as usize;
        masked.max(blocks * per_block) + blocks * policy.edit_budget().unwrap_or(0) as usize
    }

    /// The current block `[start, end)` in canvas positions (empty at the end once done).
    pub fn block_bounds(&self) -> (u32, u32) {
        let len = self.len() as u32;
        let lo = (self.first + self.block * self.spec.block_len).min(len);
        (lo, (lo + self.spec.block_len).min(len))
    }

    fn block_range(&self) -> std::ops::Range<usize> {
        let (lo, hi) = self.block_bounds();
        lo as usize..hi as usize
    }

    fn is_masked(&self, pos: usize) -> bool {
        !self.fixed[pos] && self.tokens[pos] == self.mask_id
    }

    fn masked_in_block(&self) -> u32 {
        self.block_range().filter(|&p| self.is_masked(p)).count() as u32
    }

    /// Canvas positions of the eligible slots (masked, not fixed, current block), ascending.
    pub fn eligible(&self) -> Vec<u32> {
        self.block_range().filter(|&p| self.is_masked(p)).map(|p| p as u32).collect()
    }

    /// The slots of the current block that are not fixed (masked or committed: what `edit:`
    /// scores), ascending, into `out` (cleared first; no allocation once it holds a block).
    pub fn editable_into(&self, out: &mut Vec<u32>) {
        out.clear();
        out.extend(self.block_range().filter(|&p| !self.fixed[p]).map(|p| p as u32));
    }

    /// The policy context of the next step.
    pub fn ctx(&self) -> StepCtx {
        StepCtx {
            step: self.block_step,
            block_masked: self.block_masked,
            masked: self.masked_in_block(),
            block_len: self.spec.block_len,
        }
    }

    /// Writes one step's commits (each must be an eligible slot, committed once, to a token
    /// that is not the mask and is below `vocab`; at least one commit), counts the step and
    /// advances past finished blocks.
    pub fn apply(&mut self, commits: &[Commit], vocab: usize) -> Result<()> {
        self.apply_step(commits, vocab, None)
    }

    /// [`Canvas::apply`] for a step of `policy`: a policy that may commit nothing
    /// ([`Policy::may_commit_none`], Dream) may pass an empty list; the step still counts.
    /// `edit:` may also re-write committed, non-fixed slots of the block (to a different
    /// token), commits nothing on a step that changes nothing, and closes a block with no
    /// mask left after such a step or once its post-mask budget is spent.
    pub fn apply_for(&mut self, commits: &[Commit], vocab: usize, policy: &Policy) -> Result<()> {
        self.apply_step(commits, vocab, Some(policy))
    }

    fn apply_step(&mut self, commits: &[Commit], vocab: usize, policy: Option<&Policy>) -> Result<()> {
        if self.is_done() {
            return Err(Error::bad_input("commit to a finished sequence"));
        }
        let budget = policy.and_then(Policy::edit_budget);
        let had_mask = self.masked_in_block() > 0;
        let may_commit_none = policy.is_some_and(Policy::may_commit_none) || (budget.is_some() && !had_mask);
        if commits.is_empty() && !may_commit_none {
            return Err(Error::bad_input(format!(
                "step {} committed no slot (every policy commits at least one)",
                self.step
            )));
        }
        let range = self.block_range();
        for (i, c) in commits.iter().enumerate() {
            let p = c.pos as usize;
            let edit = budget.is_some() && range.contains(&p) && !self.fixed[p] && !self.is_masked(p);
            if !range.contains(&p) || !(self.is_masked(p) || edit) || commits[..i].iter().any(|d| d.pos == c.pos) {
                return Err(Error::bad_input(format!(
                    "step {}: commit to position {p}, which is not an eligible slot or is committed twice (block {}, positions {range:?})",
                    self.step, self.block
                )));
            }
            if c.token == self.mask_id || c.token as usize >= vocab {
                return Err(Error::bad_input(format!(
                    "step {}: commit of token {} at position {p} (the mask token or outside the vocabulary)",
                    self.step, c.token
                )));
            }
            if edit && c.token == self.tokens[p] {
                return Err(Error::bad_input(format!(
                    "step {}: edit of position {p} to the token {} it already holds",
                    self.step, c.token
                )));
            }
        }
        for c in commits {
            self.tokens[c.pos as usize] = c.token;
        }
        self.step += 1;
        self.block_step += 1;
        let finished = match budget {
            Some(post) => {
                if !had_mask {
                    self.post_steps += 1;
                }
                self.masked_in_block() == 0 && ((!had_mask && commits.is_empty()) || self.post_steps >= post)
            }
            None => self.masked_in_block() == 0,
        };
        self.settle(finished);
        Ok(())
    }

    /// Whether the current (finished) block triggers the stop rule: `Gen`, it holds EOS or the
    /// end-of-turn token; `Aligned`, x[P, block end) holds EOS (the official rule: earlier
    /// blocks held none, or decoding would have stopped there).
    fn block_stops(&self) -> bool {
        let range = self.block_range();
        match self.layout {
            Layout::Gen => self.tokens[range].iter().any(|t| self.stop_ids.contains(t)),
            Layout::Aligned => {
                let lo = range.start.max(self.prompt_len as usize);
                self.tokens[lo..range.end.max(lo)].contains(&self.eos_id)
            }
        }
    }

    /// Moves past the current block when `finished` and past every following block with no
    /// masked slot, applying the stop rule to each block it leaves.
    fn settle(&mut self, mut finished: bool) {
        while !self.is_done() && finished {
            if self.spec.stop_at_eos && self.block_stops() {
                let end = self.block_range().end;
                for p in end..self.tokens.len() {
                    if !self.fixed[p] {
                        self.tokens[p] = self.eos_id;
                    }
                }
                self.stopped_at_eos = true;
                self.block = self.n_blocks;
                return;
            }
            self.block += 1;
            self.block_step = 0;
            self.post_steps = 0;
            self.block_masked = self.masked_in_block();
            finished = self.block_masked == 0;
        }
    }

    /// Refuses a step-count policy (`schedule:S`, `random:S`; S steps per block) whose S
    /// exceeds the masked slots of one of this canvas's blocks (see [`check_steps`]), for
    /// either layout.
    pub fn check_steps(&self, policy: &Policy) -> Result<()> {
        let Some(steps) = step_count(policy) else { return Ok(()) };
        let bl = self.spec.block_len;
        let masked = |b: u32| {
            let lo = (self.first + b * bl) as usize;
            (lo..(lo + bl as usize).min(self.len())).filter(|&p| !self.fixed[p]).count() as u32
        };
        let fewest = (0..self.n_blocks).map(|b| (masked(b), b)).filter(|&(m, _)| m > 0).min();
        let prior = (self.prompt_len as usize..self.len()).any(|p| self.fixed[p]);
        too_many_steps(policy, steps, fewest, bl, prior)
    }
}

/// S of a step-count policy whose S must fit every block.
fn step_count(policy: &Policy) -> Option<u32> {
    match *policy {
        Policy::Schedule { steps } | Policy::Random { steps } => Some(steps),
        // Dream commits its reference's count, 0 included: every one of its S steps runs.
        _ => None,
    }
}

fn too_many_steps(policy: &Policy, steps: u32, fewest: Option<(u32, u32)>, block_len: u32, prior: bool) -> Result<()> {
    let fewer = |m| match *policy {
        Policy::Random { .. } => Policy::Random { steps: m },
        _ => Policy::Schedule { steps: m },
    };
    match fewest {
        Some((m, b)) if steps > m => Err(Error::bad_input(format!(
            "policy `{policy}` asks for {steps} steps per block, but block {b} has only {m} masked slots \
             (block_len {block_len}{}); every step commits at least one slot, so it would run {m} steps. \
             Use at most {m} steps (e.g. `{}`) or a longer block_len",
            if prior { ", fewer where the prior fixes slots" } else { "" },
            fewer(m)
        ))),
        _ => Ok(()),
    }
}

/// Refuses a step-count policy (`schedule:S`, `random:S`; S steps per block)
/// whose S exceeds the masked slots of a block: every step commits at least one slot, so that
/// block would silently take fewer steps than asked. `prior` holds the fixed token of every gen
/// slot (`None` = masked; empty = no prior); blocks a prior fixes entirely take no step and are
/// not checked. Run after [`check_lengths`] (block_len > 0 and divides gen_len; the `Gen`
/// layout: [`Canvas::check_steps`] checks a canvas of either layout).
pub fn check_steps(policy: &Policy, gen_len: u32, block_len: u32, prior: &[Option<u32>]) -> Result<()> {
    let Some(steps) = step_count(policy) else { return Ok(()) };
    let (gen, block) = (gen_len as usize, block_len.max(1) as usize);
    let masked = |b: usize| (b * block..((b + 1) * block).min(gen)).filter(|&i| prior.get(i).copied().flatten().is_none()).count();
    let fewest = (0..gen.div_ceil(block)).map(|b| (masked(b) as u32, b as u32)).filter(|&(m, _)| m > 0).min();
    too_many_steps(policy, steps, fewest, block_len, !prior.is_empty())
}

#[cfg(test)]
#[path = "canvas_tests.rs"]
mod tests;
