//! [`SeqState`]: one sequence in the decode loop — its canvas, policy, sampling, cache scheme
//! and plan, cache rows, and per-step history — with the position queries the runner asks each
//! step (masked, eligible and live rows), in allocation-free `_into` forms.
use crate::cache::{CachePlan, CacheScheme};
use crate::error::{Error, Result};

use super::canvas::Canvas;
use super::policy::Policy;
use super::sampling::Sampling;

/// One sequence in the decode loop: its canvas, how it decodes, and what happened so far.
#[derive(Clone, Debug)]
pub struct SeqState {
    pub canvas: Canvas,
    pub policy: Policy,
    pub sampling: Sampling,
    /// RNG key parts (`RngKey { seed, seq: seq_id, .. }`).
    pub seed: u64,
    pub seq_id: u32,
    /// KV-cache scheme (takes effect at admission).
    pub cache: CacheScheme,
    /// Test knob: a full refresh every step (then every scheme decodes exactly like `none`).
    pub cache_refresh_every_step: bool,
    /// The cache plan, set at admission.
    pub plan: Option<CachePlan>,
    /// Whether the model's logits are shifted (Dream), set with the plan.
    pub shifted: bool,
    /// First KV-cache row of this sequence, set once at admission.
    pub cache_base: Option<u32>,
    /// Slots committed at each of this sequence's steps.
    pub commits_per_step: Vec<u32>,
    /// Live rows (canvas rows recomputed) at each of this sequence's steps.
    pub rows_per_step: Vec<u32>,
    /// Wall time of each step this sequence took part in (the whole batch's step), ms.
    pub step_ms: Vec<f64>,
}

impl AsRef<SeqState> for SeqState {
    fn as_ref(&self) -> &SeqState {
        self
    }
}

impl AsMut<SeqState> for SeqState {
    fn as_mut(&mut self) -> &mut SeqState {
        self
    }
}

impl SeqState {
    /// A sequence with the `none` cache scheme (set `cache` before admission for another).
    /// `sampling`'s [`Sampling::POLICY_TOP_K`] becomes the policy's default top-k.
    pub fn new(canvas: Canvas, policy: Policy, sampling: Sampling, seed: u64, seq_id: u32) -> Self {
        SeqState {
            canvas,
            policy,
            sampling: sampling.for_policy(&policy),
            seed,
            seq_id,
            cache: CacheScheme::None,
            cache_refresh_every_step: false,
            plan: None,
            shifted: false,
            cache_base: None,
            commits_per_step: Vec::new(),
            rows_per_step: Vec::new(),
            step_ms: Vec::new(),
        }
    }

    /// Sets the cache scheme (before admission).
    pub fn with_cache(mut self, scheme: CacheScheme, refresh_every_step: bool) -> Self {
        self.cache = scheme;
        self.cache_refresh_every_step = refresh_every_step;
        self
    }

    /// Whether the scheduler's `admit` has given this sequence its plan and cache rows.
    pub fn is_admitted(&self) -> bool {
        self.plan.is_some() && self.cache_base.is_some()
    }

    /// Builds the cache plan for the sequence's scheme if it has none yet (an error when the
    /// scheme cannot serve this canvas). Idempotent; [`admit_at`](Self::admit_at) calls it.
    pub fn make_plan(&mut self, shifted: bool) -> Result<()> {
        if self.plan.is_none() {
            let c = &self.canvas;
            let spec = c.spec();
            // The plan's "prompt" is everything before block 0 (for LLaDA2's aligned layout,
            // the prompt's whole blocks; its tail is in block 0) and its gen region the blocks.
            let first = c.blocks_start() as usize;
            let mut plan = CachePlan::new(self.cache, first, c.len() - first, spec.block_len as usize, shifted)?;
            plan.set_refresh_every_step(self.cache_refresh_every_step);
            self.plan = Some(plan);
            self.shifted = shifted;
        }
        Ok(())
    }

    /// Admits the sequence with cache rows `[base, base + canvas len)` (fixed for its lifetime)
    /// and its cache plan. Refuses a sequence already admitted.
    pub fn admit_at(&mut self, base: u32, shifted: bool) -> Result<()> {
        if let Some(b) = self.cache_base {
            return Err(Error::bad_input(format!("sequence already admitted at cache row {b}")));
        }
        if base.checked_add(self.canvas.len() as u32).is_none() {
            return Err(Error::bad_input(format!("cache rows from {base} do not fit in u32")));
        }
        self.make_plan(shifted)?;
        self.cache_base = Some(base);
        // `Canvas::max_steps` bounds the records: they never reallocate inside the decode loop.
        let steps = self.canvas.max_steps(&self.policy);
        self.commits_per_step.reserve(steps);
        self.rows_per_step.reserve(steps);
        self.step_ms.reserve(steps);
        Ok(())
    }

    /// Canvas positions still masked (every block), ascending.
    pub fn masked_positions(&self) -> Vec<u32> {
        let mut out = Vec::new();
        self.masked_positions_into(&mut out);
        out
    }

    /// [`masked_positions`](Self::masked_positions) into `out` (cleared first).
    pub fn masked_positions_into(&self, out: &mut Vec<u32>) {
        let c = &self.canvas;
        let p = c.prompt_len() as usize;
        let mask = c.mask_id();
        out.clear();
        out.extend(
            c.tokens()[p..]
                .iter()
                .enumerate()
                .filter(|&(i, &t)| t == mask && !c.is_fixed_gen(i))
                .map(|(i, _)| (p + i) as u32),
        );
    }

    /// The eligible slots (what `Canvas::eligible` gives) as the sub-slice of `masked` (=
    /// [`masked_positions`](Self::masked_positions)) inside the current block: the masked
    /// positions are ascending, so the block's are contiguous. Empty once done.
    pub fn eligible_in<'m>(&self, masked: &'m [u32]) -> &'m [u32] {
        let (lo, hi) = self.block_range();
        &masked[masked.partition_point(|&p| p < lo)..masked.partition_point(|&p| p < hi)]
    }

    /// The current block `[start, end)` in canvas positions.
    pub fn block_range(&self) -> (u32, u32) {
        self.canvas.block_bounds()
    }

    /// The slots the next step scores, into `out` (cleared first): the eligible ones
    /// ([`eligible_in`](Self::eligible_in) of `masked`), or for `edit:` every slot of the block
    /// that is not fixed (its committed slots may be re-written).
    pub fn scored_into(&self, masked: &[u32], out: &mut Vec<u32>) {
        if self.policy.edit_budget().is_some() {
            self.canvas.editable_into(out);
        } else {
            out.clear();
            out.extend_from_slice(self.eligible_in(masked));
        }
    }

    /// The live rows of the coming step: the plan's choice once admitted, else every row.
    pub fn live_rows(&self, eligible: &[u32]) -> Vec<u32> {
        let mut live = Vec::new();
        self.live_rows_into(&self.masked_positions(), eligible, &mut live);
        live
    }

    /// [`live_rows`](Self::live_rows) into `out`, given `masked` =
    /// [`masked_positions`](Self::masked_positions). With `edit:`, every row of the current
    /// block (and, `shifted`, the row before it) is live too: its logits decide the edits.
    pub fn live_rows_into(&self, masked: &[u32], eligible: &[u32], out: &mut Vec<u32>) {
        match &self.plan {
            Some(plan) => {
                let c = &self.canvas;
                let block = self.block_range();
                plan.live_rows_into(c.steps(), c.ctx().step, block, masked, eligible, out);
                if self.policy.edit_budget().is_some() {
                    insert_range(out, block.0.saturating_sub(u32::from(self.shifted)), block.1);
                }
            }
            None => {
                out.clear();
                out.extend(0..self.canvas.len() as u32);
            }
        }
    }
}

/// Makes the ascending, unique `rows` hold every row of `[lo, hi)` too, in place (no
/// allocation while `rows` has the capacity: the plans leave it at the canvas length).
fn insert_range(rows: &mut Vec<u32>, lo: u32, hi: u32) {
    if lo >= hi {
        return;
    }
    let a = rows.partition_point(|&r| r < lo);
    let b = rows.partition_point(|&r| r < hi);
    let (n, tail) = ((hi - lo) as usize, rows.len() - b);
    let len = a + n + tail;
    if len > rows.len() {
        rows.resize(len, 0);
    }
    rows.copy_within(b..b + tail, a + n);
    for (k, r) in (lo..hi).enumerate() {
        rows[a + k] = r;
    }
    rows.truncate(len);
}

#[cfg(test)]
mod tests {
    #[test]
    fn insert_range_merges_in_place() {
        let mut v = vec![1, 5, 9, 12];
        v.reserve(16);
        super::insert_range(&mut v, 4, 8);
        assert_eq!(v, [1, 4, 5, 6, 7, 9, 12]);
        super::insert_range(&mut v, 0, 2);
        assert_eq!(v, [0, 1, 4, 5, 6, 7, 9, 12]);
        super::insert_range(&mut v, 12, 14);
        assert_eq!(v, [0, 1, 4, 5, 6, 7, 9, 12, 13]);
        super::insert_range(&mut v, 3, 3);
        assert_eq!(v.len(), 9);
    }
}
