//! The decode loop over any `StepBackend`, with KV caching (DESIGN.md §5). Each sequence is
//! *admitted* once ([`admit`]): it gets a [`CachePlan`](crate::cache::CachePlan) for its cache scheme and a `cache_base`
//! (its first KV-cache row) that stays fixed for its lifetime, because cached rows must stay
//! where they were written. Each step packs, per active sequence, only the live rows the plan
//! picks (tokens and positions of those canvas positions; `kv_len` = the canvas length, so
//! attention reads cached ∪ live rows), asks for the logits of the rows that predict eligible
//! slots (the slot's own row; for shifted models the row before it, row 0 for a slot at
//! position 0 — live by construction), lets the backend pick the commits, applies them, tells
//! the plan, advances blocks and stop rules, records per-step timings and live rows, and calls
//! the step callback. Finished sequences leave the batch; the loop ends when every sequence is
//! done. With the `none` scheme every row is live every step (exact decoding).
//!
//! [`step_batch_with`] is one such step over any set of admitted sequences: [`run`] loops it
//! over a fixed set, the continuous-batching scheduler (`decode::scheduler`) over a set that
//! changes at every step boundary. The backend's cache must hold the admitted rows before a
//! step (the engine reserves them); a step itself never sizes anything.
//!
//! No allocation inside the decode loop: whoever loops keeps one [`StepScratch`] (the packed
//! batch, the work lists, the commit lists, position scratch) and every step clears and
//! refills it, so once its buffers have grown to the largest step the runner's bookkeeping
//! allocates nothing on the host (`tests/no_alloc.rs`). Per-sequence records grow by one
//! element a step into capacity reserved at admission.
use std::time::Instant;

use crate::batch::{RowBatch, SeqSpan};
use crate::error::{Error, Result};

use super::canvas::Canvas;
pub use super::seq::SeqState;
use super::step::{Commit, SeqWork, SlotScores, StepBackend, StepCommits};

/// Reusable host buffers of the decode loop (module docs): the sequences the next step runs
/// ([`pick`](Self::pick)), the packed batch and work lists it builds, the commit lists the
/// backend fills, and per-sequence position scratch. Whoever loops keeps one across steps.
#[derive(Debug, Default)]
pub struct StepScratch {
    /// `(item index, event index)` of each sequence the next step runs, item indices ascending.
    picks: Vec<(usize, usize)>,
    pack: Pack,
    commits: StepCommits,
    /// Committed positions of the sequence being applied.
    pos: Vec<u32>,
}

/// What [`build_step_into`] fills. Every buffer is sized up front from bounds of the step's
/// sequences (canvas and block lengths), not from what this step happens to need, so a step
/// grows nothing unless a sequence joined that is larger than any before it.
#[derive(Debug, Default)]
struct Pack {
    batch: RowBatch,
    /// The step's work is `work[..n_work]`; entries past it keep their Vecs for later steps.
    /// Sequences move between entries as others finish, so every entry's `eligible` and
    /// `logit_index` hold room for `slot_cap` (the longest block seen).
    work: Vec<SeqWork>,
    n_work: usize,
    slot_cap: usize,
    /// Most eligible slots the step can have: the sum of its sequences' block lengths.
    slot_bound: usize,
    /// Masked positions of the sequence being packed (its eligible slots are a sub-slice).
    masked: Vec<u32>,
    /// Live rows of the sequence being packed.
    live: Vec<u32>,
}

impl StepScratch {
    /// Forgets the picks (the next step's set of sequences).
    pub fn clear_picks(&mut self) {
        self.picks.clear();
    }

    /// Adds item `item` of the slice given to [`step_batch_with`] to the next step, reported
    /// to the callback as `index`. Items must be picked in ascending order.
    pub fn pick(&mut self, item: usize, index: usize) {
        self.picks.push((item, index));
    }

    /// Sequences picked for the next step.
    pub fn picked(&self) -> usize {
        self.picks.len()
    }

    /// The batch of the latest step built here.
    pub fn batch(&self) -> &RowBatch {
        &self.pack.batch
    }

    /// The work lists of the latest step built here (one per sequence, batch order).
    pub fn work(&self) -> &[SeqWork] {
        &self.pack.work[..self.pack.n_work]
    }

    /// The commit lists of the latest step run here.
    pub fn commits(&self) -> &StepCommits {
        &self.commits
    }
}

/// Admits every sequence of `seqs` not admitted yet: a cache plan for its scheme, and cache
/// rows `[cache_base, cache_base + canvas len)` packed after the highest row already taken.
/// Returns the cache rows the whole slice needs (one past the highest row of any sequence).
pub fn admit(seqs: &mut [SeqState], shifted: bool) -> Result<usize> {
    let end = |s: &SeqState| s.cache_base.map_or(0, |b| b as usize + s.canvas.len());
    let mut next = seqs.iter().map(end).max().unwrap_or(0);
    for s in seqs.iter_mut() {
        if s.cache_base.is_none() {
            let base =
                u32::try_from(next).map_err(|_| Error::bad_input(format!("cache row {next} does not fit in u32")))?;
            s.admit_at(base, shifted)?;
            next += s.canvas.len();
        } else {
            s.make_plan(shifted)?;
        }
    }
    Ok(seqs.iter().map(end).max().unwrap_or(0))
}

/// Cache rows the sequences of `seqs` need once admitted together from row 0: the sum of
/// their canvases' lengths.
pub fn cache_rows_for(seqs: &[SeqState]) -> usize {
    seqs.iter().map(|s| s.canvas.len()).sum()
}

/// What the step callback sees, once per sequence per step, after the commits are applied.
#[derive(Clone, Copy)]
pub struct StepEvent<'a> {
    /// Which sequence: its index in the slice given to [`run`]; with the engine's scheduler
    /// the request's id (`RequestId.0`), and with `Engine::generate_with` its index in the
    /// request list.
    pub index: usize,
    /// The sequence's step number (0 for its first step).
    pub step: u32,
    /// Index of the batch step (counts every forward of this run; with the scheduler, of the
    /// engine's life, and with `Engine::generate_with` from that call's first forward).
    pub batch_step: u32,
    pub canvas: &'a Canvas,
    /// Positions that were eligible at this step, ascending.
    pub eligible: &'a [u32],
    /// Candidate and confidence of each eligible slot (same order as `eligible`).
    pub scores: &'a SlotScores,
    /// The slots that took their candidate, in rank order.
    pub commits: &'a [Commit],
    /// Canvas rows this sequence recomputed at this step (the rest came from its KV cache).
    pub live_rows: u32,
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

/// Packs the live rows of every sequence of `seqs` (the cache plan's choice once admitted;
/// every row otherwise, with cache rows packed after the highest admitted one) and the work of
/// each: eligible slots and, per slot, the index into `logit_rows` of the row predicting it.
/// Rows shared by two slots (shifted, empty prompt: slots 0 and 1 both read row 0) appear once.
///
/// An error (not a panic) if a plan leaves a logit row out of the live set (the plans
/// guarantee it never does). Allocates; the decode loop uses [`build_step_into`].
pub fn build_step(seqs: &[&SeqState], shifted: bool) -> Result<(RowBatch, Vec<SeqWork>)> {
    let mut ws = StepScratch::default();
    build_step_into(seqs.iter().copied(), shifted, &mut ws)?;
    let Pack { batch, mut work, n_work, .. } = ws.pack;
    work.truncate(n_work);
    Ok((batch, work))
}

/// [`build_step`] into `ws` (its batch and work lists are cleared and refilled; read them with
/// [`StepScratch::batch`] / [`StepScratch::work`]): no allocation once `ws` has grown to the
/// largest step.
pub fn build_step_into<'a, I>(seqs: I, shifted: bool, ws: &mut StepScratch) -> Result<()>
where
    I: Iterator<Item = &'a SeqState> + Clone,
{
    ws.pack.fill(seqs, shifted)
}

impl Pack {
    fn fill<'a, I>(&mut self, seqs: I, shifted: bool) -> Result<()>
    where
        I: Iterator<Item = &'a SeqState> + Clone,
    {
        let Pack { batch: b, work, n_work, slot_cap, slot_bound, masked, live } = self;
        let (mut next_free, mut n_seqs, mut rows, mut slots, mut most_slots, mut most_gen) = (0u32, 0, 0, 0, 0, 0);
        for s in seqs.clone() {
            let c = &s.canvas;
            if let Some(base) = s.cache_base {
                next_free = next_free.max(base + c.len() as u32);
            }
            let block = c.spec().block_len as usize;
            n_seqs += 1;
            rows += c.len();
            slots += block;
            most_slots = most_slots.max(block);
            most_gen = most_gen.max(c.len() - c.prompt_len() as usize);
        }
        b.tokens.clear();
        b.tokens.reserve(rows);
        b.positions.clear();
        b.positions.reserve(rows);
        b.seqs.clear();
        b.seqs.reserve(n_seqs);
        b.logit_rows.clear();
        b.logit_rows.reserve(slots);
        masked.clear();
        masked.reserve(most_gen);
        if most_slots > *slot_cap {
            *slot_cap = most_slots;
            for w in work.iter_mut() {
                w.eligible.clear();
                w.eligible.reserve(most_slots);
                w.logit_index.clear();
                w.logit_index.reserve(most_slots);
                w.current.clear();
                w.current.reserve(most_slots);
            }
        }
        *slot_bound = slots;
        *n_work = 0;
        for s in seqs {
            let c = &s.canvas;
            let start = b.tokens.len() as u32;
            let len = c.len() as u32;
            s.masked_positions_into(masked);
            let eligible = s.eligible_in(masked);
            s.live_rows_into(masked, eligible, live);
            let base = s.cache_base.unwrap_or_else(|| {
                next_free += len;
                next_free - len
            });
            let tokens = c.tokens();
            b.tokens.extend(live.iter().map(|&p| tokens[p as usize]));
            b.positions.extend_from_slice(live);
            b.seqs.push(SeqSpan { row_start: start, row_count: live.len() as u32, cache_base: base, kv_len: len });
            if work.len() == *n_work {
                work.push(SeqWork {
                    eligible: Vec::with_capacity(*slot_cap),
                    current: Vec::with_capacity(*slot_cap),
                    logit_index: Vec::with_capacity(*slot_cap),
                    policy: s.policy,
                    ctx: c.ctx(),
                    sampling: s.sampling,
                    seed: s.seed,
                    seq_id: s.seq_id,
                    step: 0,
                });
            }
            let w = &mut work[*n_work];
            *n_work += 1;
            s.scored_into(masked, &mut w.eligible);
            w.current.clear();
            w.current.extend(w.eligible.iter().map(|&p| tokens[p as usize]));
            w.logit_index.clear();
            w.policy = s.policy;
            w.ctx = c.ctx();
            w.sampling = s.sampling;
            w.seed = s.seed;
            w.seq_id = s.seq_id;
            w.step = c.steps();
            let mut last: Option<u32> = None;
            for &p in &w.eligible {
                let pos = logit_row(p, shifted);
                // The plans guarantee it (tests/cache_plan.rs); a violation is an engine bug,
                // reported as an error rather than a panic.
                let k = live.binary_search(&pos).map_err(|_| {
                    Error::bad_input(format!("cache plan {}: row {pos}, which predicts slot {p}, is not live", s.cache))
                })?;
                let row = start + k as u32;
                if last != Some(row) {
                    b.logit_rows.push(row);
                    last = Some(row);
                }
                w.logit_index.push(b.logit_rows.len() as u32 - 1);
            }
        }
        Ok(())
    }
}

/// Decodes every sequence of `seqs` to completion on `backend`, admitting those not admitted
/// yet (the backend's cache must already hold [`admit`]'s rows). With a callback, each step
/// also asks the backend for the eligible slots' scores and reports every sequence's step.
pub fn run(
    backend: &mut dyn StepBackend,
    seqs: &mut [SeqState],
    mut callback: Option<&mut dyn FnMut(&StepEvent)>,
) -> Result<()> {
    admit(seqs, backend.config().shifted())?;
    let mut ws = StepScratch::default();
    let mut batch_step = 0u32;
    loop {
        ws.clear_picks();
        for (i, s) in seqs.iter().enumerate() {
            if !s.canvas.is_done() {
                ws.pick(i, i);
            }
        }
        if ws.picked() == 0 {
            return Ok(());
        }
        let cb = callback.as_mut().map(|c| &mut **c as &mut dyn FnMut(&StepEvent));
        step_batch_with(backend, seqs, &mut ws, batch_step, cb)?;
        batch_step += 1;
    }
}

/// One batch step over `seqs[k]` with event index `index[k]`: [`step_batch_with`] with a
/// scratch of its own (so it allocates; loops keep a [`StepScratch`] instead).
pub fn step_batch(
    backend: &mut dyn StepBackend,
    seqs: &mut [&mut SeqState],
    index: &[usize],
    batch_step: u32,
    callback: Option<&mut dyn FnMut(&StepEvent)>,
) -> Result<()> {
    if index.len() != seqs.len() {
        return Err(Error::bad_input(format!("step: {} event indices for {} sequences", index.len(), seqs.len())));
    }
    let mut ws = StepScratch::default();
    for (k, &ix) in index.iter().enumerate() {
        ws.pick(k, ix);
    }
    step_batch_with(backend, seqs, &mut ws, batch_step, callback)
}

/// One batch step: a forward over the live rows of the sequences `ws` picked from `items` (each
/// admitted and not done), the commits applied, plans told, per-sequence records (commits,
/// live rows, step time) appended and, with a callback, one [`StepEvent`] per sequence (with
/// the event index it was picked with; `batch_step` is passed through). On an error no event
/// is sent; sequences before the failing one may already hold the step's commits. Without a
/// callback, and once `ws` has grown to the largest step, the runner allocates nothing here
/// (the backend's `step_into` may; see `tests/no_alloc.rs`).
pub fn step_batch_with<S: AsRef<SeqState> + AsMut<SeqState>>(
    backend: &mut dyn StepBackend,
    items: &mut [S],
    ws: &mut StepScratch,
    batch_step: u32,
    mut callback: Option<&mut dyn FnMut(&StepEvent)>,
) -> Result<()> {
    // One NVTX range per decode step (nsys / ncu); closes on every return path.
    #[cfg(feature = "cuda")]
    let _nvtx = crate::gpu::nvtx::range(c"step");
    let mut prev: Option<usize> = None;
    for &(i, ix) in &ws.picks {
        if i >= items.len() || prev.is_some_and(|p| p >= i) {
            return Err(Error::bad_input(format!(
                "step: sequence {ix} picked as item {i} of {} (items must be distinct, ascending)",
                items.len()
            )));
        }
        prev = Some(i);
        let s = items[i].as_ref();
        if !s.is_admitted() || s.canvas.is_done() {
            return Err(Error::bad_input(format!(
                "step: sequence {ix} is {}",
                if s.canvas.is_done() { "already done" } else { "not admitted" }
            )));
        }
    }
    let shifted = backend.config().shifted();
    let vocab = backend.config().vocab;
    let t0 = Instant::now();
    let StepScratch { picks, pack, commits, pos } = ws;
    let shared = &*items;
    pack.fill(picks.iter().map(|&(i, _)| shared[i].as_ref()), shifted)?;
    let (batch, work) = (&pack.batch, &pack.work[..pack.n_work]);
    // Sized before the forward, like every other buffer: a sequence commits at most its
    // eligible slots, which fit in its block.
    pos.clear();
    pos.reserve(pack.slot_cap);
    let scores = if callback.is_some() {
        let (lists, scores) = backend.step_scored(batch, work)?;
        commits.set_lists(&lists);
        scores
    } else {
        // Every commit is an eligible slot: with room for all of them the backend need not grow `commits`.
        commits.clear();
        commits.reserve(work.len(), pack.slot_bound);
        backend.step_into(batch, work, commits)?;
        Vec::new()
    };
    if commits.len() != work.len() || (callback.is_some() && scores.len() != work.len()) {
        return Err(Error::bad_input(format!(
            "step backend returned {} commit lists and {} score lists for {} sequences",
            commits.len(),
            scores.len(),
            work.len()
        )));
    }
    for (k, &(i, ix)) in picks.iter().enumerate() {
        let s = items[i].as_mut();
        let n = s.canvas.steps();
        let list = commits.seq(k);
        s.canvas.apply_for(list, vocab, &s.policy).map_err(|e| match e {
            Error::BadInput(m) => Error::bad_input(format!("sequence {ix}: {m}")),
            other => other,
        })?;
        if let Some(plan) = s.plan.as_mut() {
            pos.clear();
            pos.extend(list.iter().map(|c| c.pos));
            plan.committed(n, pos);
        }
        s.commits_per_step.push(list.len() as u32);
        s.rows_per_step.push(batch.seqs[k].row_count);
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    for (k, &(i, ix)) in picks.iter().enumerate() {
        let s = items[i].as_mut();
        s.step_ms.push(ms);
        if let Some(cb) = callback.as_mut() {
            cb(&StepEvent {
                index: ix,
                step: s.canvas.steps() - 1,
                batch_step,
                canvas: &s.canvas,
                eligible: &work[k].eligible,
                scores: &scores[k],
                commits: commits.seq(k),
                live_rows: batch.seqs[k].row_count,
                ms,
            });
        }
    }
    Ok(())
}
