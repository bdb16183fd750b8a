//! The decode loop over any `StepBackend`, with KV caching (DESIGN.md §5). Each sequence is
//! *admitted* once ([`admit`]): it gets a [`CachePlan`] for its cache scheme and a `cache_base`
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
//! [`step_batch`] is one such step over any set of admitted sequences: [`run`] loops it over a
//! fixed set, the continuous-batching scheduler (`decode::scheduler`) over a set that changes
//! at every step boundary. The backend's cache must hold the admitted rows before a step (the
//! engine reserves them); a step itself never sizes anything.
use std::time::Instant;

use crate::batch::{RowBatch, SeqSpan};
use crate::cache::{CachePlan, CacheScheme};
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
    /// KV-cache scheme (takes effect at admission).
    pub cache: CacheScheme,
    /// Test knob: a full refresh every step (then every scheme decodes exactly like `none`).
    pub cache_refresh_every_step: bool,
    /// The cache plan, set at admission.
    pub plan: Option<CachePlan>,
    /// First KV-cache row of this sequence, set once at admission.
    pub cache_base: Option<u32>,
    /// Slots committed at each of this sequence's steps.
    pub commits_per_step: Vec<u32>,
    /// Live rows (canvas rows recomputed) at each of this sequence's steps.
    pub rows_per_step: Vec<u32>,
    /// Wall time of each step this sequence took part in (the whole batch's step), ms.
    pub step_ms: Vec<f64>,
}

impl SeqState {
    /// A sequence with the `none` cache scheme (set `cache` before admission for another).
    pub fn new(canvas: Canvas, policy: Policy, sampling: Sampling, seed: u64, seq_id: u32) -> Self {
        SeqState {
            canvas,
            policy,
            sampling,
            seed,
            seq_id,
            cache: CacheScheme::None,
            cache_refresh_every_step: false,
            plan: None,
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

    /// Whether [`admit`] has given this sequence its plan and cache rows.
    pub fn is_admitted(&self) -> bool {
        self.plan.is_some() && self.cache_base.is_some()
    }

    /// Builds the cache plan for the sequence's scheme if it has none yet (an error when the
    /// scheme cannot serve this canvas). Idempotent; [`admit_at`](Self::admit_at) calls it.
    pub fn make_plan(&mut self, shifted: bool) -> Result<()> {
        if self.plan.is_none() {
            let c = &self.canvas;
            let spec = c.spec();
            let mut plan = CachePlan::new(
                self.cache,
                c.prompt_len() as usize,
                spec.gen_len as usize,
                spec.block_len as usize,
                shifted,
            )?;
            plan.set_refresh_every_step(self.cache_refresh_every_step);
            self.plan = Some(plan);
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
        Ok(())
    }

    /// Canvas positions still masked (every block), ascending.
    pub fn masked_positions(&self) -> Vec<u32> {
        let c = &self.canvas;
        let p = c.prompt_len() as usize;
        let mask = c.mask_id();
        c.tokens()[p..]
            .iter()
            .enumerate()
            .filter(|&(i, &t)| t == mask && !c.is_fixed_gen(i))
            .map(|(i, _)| (p + i) as u32)
            .collect()
    }

    /// The current block `[start, end)` in canvas positions.
    pub fn block_range(&self) -> (u32, u32) {
        let c = &self.canvas;
        let bl = c.spec().block_len;
        let lo = c.prompt_len() + c.block() * bl;
        (lo, (lo + bl).min(c.len() as u32))
    }

    /// The live rows of the coming step: the plan's choice once admitted, else every row.
    pub fn live_rows(&self, eligible: &[u32]) -> Vec<u32> {
        match &self.plan {
            Some(plan) => {
                let c = &self.canvas;
                let masked = self.masked_positions();
                plan.live_rows(c.steps(), c.ctx().step, self.block_range(), &masked, eligible).live
            }
            None => (0..self.canvas.len() as u32).collect(),
        }
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
/// Panics if a plan leaves a logit row out of the live set (the plan guarantees it never does).
pub fn build_step(seqs: &[&SeqState], shifted: bool) -> Result<(RowBatch, Vec<SeqWork>)> {
    let mut b = RowBatch::default();
    let mut work = Vec::with_capacity(seqs.len());
    let mut next_free =
        seqs.iter().filter_map(|s| s.cache_base.map(|base| base + s.canvas.len() as u32)).max().unwrap_or(0);
    for s in seqs {
        let c = &s.canvas;
        let start = b.tokens.len() as u32;
        let len = c.len() as u32;
        let eligible = c.eligible();
        let live = s.live_rows(&eligible);
        let base = s.cache_base.unwrap_or_else(|| {
            next_free += len;
            next_free - len
        });
        let tokens = c.tokens();
        b.tokens.extend(live.iter().map(|&p| tokens[p as usize]));
        b.positions.extend_from_slice(&live);
        b.seqs.push(SeqSpan { row_start: start, row_count: live.len() as u32, cache_base: base, kv_len: len });
        let mut logit_index = Vec::with_capacity(eligible.len());
        let mut last: Option<u32> = None;
        for &p in &eligible {
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
    Ok((b, work))
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
    let mut batch_step = 0u32;
    loop {
        let index: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].canvas.is_done()).collect();
        if index.is_empty() {
            return Ok(());
        }
        let mut active: Vec<&mut SeqState> = seqs.iter_mut().filter(|s| !s.canvas.is_done()).collect();
        let cb = callback.as_mut().map(|c| &mut **c as &mut dyn FnMut(&StepEvent));
        step_batch(backend, &mut active, &index, batch_step, cb)?;
        batch_step += 1;
    }
}

/// One batch step: a forward over the live rows of every sequence of `seqs` (each admitted and
/// not done), the commits applied, plans told, per-sequence records (commits, live rows, step
/// time) appended and, with a callback, one [`StepEvent`] per sequence (`index[k]` is the
/// event index of `seqs[k]`; `batch_step` is passed through). On an error no event is sent;
/// sequences before the failing one may already hold the step's commits.
pub fn step_batch(
    backend: &mut dyn StepBackend,
    seqs: &mut [&mut SeqState],
    index: &[usize],
    batch_step: u32,
    mut callback: Option<&mut dyn FnMut(&StepEvent)>,
) -> Result<()> {
    // One NVTX range per decode step (nsys / ncu); closes on every return path.
    #[cfg(feature = "cuda")]
    let _nvtx = crate::gpu::nvtx::range(c"step");
    if index.len() != seqs.len() {
        return Err(Error::bad_input(format!("step: {} event indices for {} sequences", index.len(), seqs.len())));
    }
    if let Some(k) = seqs.iter().position(|s| !s.is_admitted() || s.canvas.is_done()) {
        return Err(Error::bad_input(format!(
            "step: sequence {} is {}",
            index[k],
            if seqs[k].canvas.is_done() { "already done" } else { "not admitted" }
        )));
    }
    let shifted = backend.config().shifted();
    let vocab = backend.config().vocab;
    let t0 = Instant::now();
    let refs: Vec<&SeqState> = seqs.iter().map(|s| &**s).collect();
    let (batch, work) = build_step(&refs, shifted)?;
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
    for (k, s) in seqs.iter_mut().enumerate() {
        let n = s.canvas.steps();
        s.canvas.apply(&commits[k], vocab).map_err(|e| match e {
            Error::BadInput(m) => Error::bad_input(format!("sequence {}: {m}", index[k])),
            other => other,
        })?;
        if let Some(plan) = s.plan.as_mut() {
            let pos: Vec<u32> = commits[k].iter().map(|c| c.pos).collect();
            plan.committed(n, &pos);
        }
        s.commits_per_step.push(commits[k].len() as u32);
        s.rows_per_step.push(batch.seqs[k].row_count);
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    for (k, s) in seqs.iter_mut().enumerate() {
        s.step_ms.push(ms);
        if let Some(cb) = callback.as_mut() {
            cb(&StepEvent {
                index: index[k],
                step: s.canvas.steps() - 1,
                batch_step,
                canvas: &s.canvas,
                eligible: &work[k].eligible,
                scores: &scores[k],
                commits: &commits[k],
                live_rows: batch.seqs[k].row_count,
                ms,
            });
        }
    }
    Ok(())
}
