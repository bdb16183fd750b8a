//! Continuous batching (DESIGN.md §1): a FIFO queue of pending sequences, the active set, and
//! the KV-cache rows they hold. At every step boundary [`Scheduler::step`] admits queued
//! sequences while they fit (`max_batch` sequences, `max_rows` live canvas rows, a contiguous
//! range of cache rows), runs one batch step for every active sequence
//! ([`runner::step_batch_with`]), then retires the sequences that finished in it (their cache rows
//! go back to the [`RowAllocator`]). So a short request's slot is refilled at the very next
//! step, not when its whole batch ends.
//!
//! A sequence's result never depends on its neighbours: each keeps its own canvas, plan, RNG
//! key and step counter, its cache rows are its own for its lifetime (every scheme's first
//! step is full, so rows a finished sequence left are overwritten before they are read), and
//! the forward treats every sequence's rows independently. Admission is strictly FIFO: a head
//! that does not fit yet waits (nothing overtakes it), and since every queued sequence fits
//! the capacity alone, it is admitted at the latest when the active set drains.
//!
//! Cache rows: a fixed-size backend (the GPU) preallocated its rows; the allocator hands out
//! ranges of them. A backend whose cache grows on demand (the CPU) is grown only while no
//! sequence is active, because growing drops what it held; it is sized for the whole queue
//! (within `cache_rows`) when that happens, so later admissions rarely wait for it.
//!
//! A step that admits and retires nothing allocates nothing on the host: the scheduler keeps
//! the runner's [`StepScratch`] across steps (`tests/no_alloc.rs`).
use std::collections::VecDeque;
use std::fmt;

use serde::Serialize;

use crate::engine::EngineBackend;
use crate::error::{Error, Result};

use super::runner::{self, SeqState, StepEvent, StepScratch};

/// First-fit allocator of contiguous KV-cache row ranges in `[0, capacity)`, with a free list
/// kept sorted and coalesced (adjacent free ranges merge), so freeing every range always gives
/// back one range of `capacity` rows. Host bookkeeping only; it never touches device memory.
#[derive(Clone, Debug, Default)]
pub struct RowAllocator {
    capacity: usize,
    /// Free ranges `(start, len)`, sorted by start, non-adjacent, non-empty.
    free: Vec<(usize, usize)>,
}

impl RowAllocator {
    /// All of `[0, capacity)` free.
    pub fn new(capacity: usize) -> Self {
        let free = if capacity > 0 { vec![(0, capacity)] } else { Vec::new() };
        RowAllocator { capacity, free }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows free in total (possibly in several ranges).
    pub fn free_rows(&self) -> usize {
        self.free.iter().map(|&(_, n)| n).sum()
    }

    /// Rows held by allocations.
    pub fn used_rows(&self) -> usize {
        self.capacity - self.free_rows()
    }

    /// Length of the longest free range (the largest allocation that succeeds now).
    pub fn largest_free(&self) -> usize {
        self.free.iter().map(|&(_, n)| n).max().unwrap_or(0)
    }

    /// The free ranges `(start, len)`, ascending.
    pub fn free_ranges(&self) -> &[(usize, usize)] {
        &self.free
    }

    /// The lowest free range of `len` rows (first fit): its first row, or `None` when no free
    /// range is long enough or `len` is 0.
    pub fn alloc(&mut self, len: usize) -> Option<usize> {
        if len == 0 {
            return None;
        }
        let i = self.free.iter().position(|&(_, n)| n >= len)?;
        let (start, n) = self.free[i];
        if n == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, n - len);
        }
        Some(start)
    }

    /// Returns `[start, start + len)` to the free list, merging it with free neighbours.
    /// Refuses a range outside the capacity or overlapping a free range (a double free).
    pub fn release(&mut self, start: usize, len: usize) -> Result<()> {
        let end = start.checked_add(len).filter(|&e| len > 0 && e <= self.capacity).ok_or_else(|| {
            Error::bad_input(format!("release of cache rows [{start}, +{len}) outside [0, {})", self.capacity))
        })?;
        let i = self.free.partition_point(|&(s, _)| s < start);
        let overlaps_prev = i > 0 && self.free[i - 1].0 + self.free[i - 1].1 > start;
        let overlaps_next = i < self.free.len() && self.free[i].0 < end;
        if overlaps_prev || overlaps_next {
            return Err(Error::bad_input(format!("release of cache rows [{start}, {end}): some are already free")));
        }
        let merge_prev = i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == start;
        let merge_next = i < self.free.len() && self.free[i].0 == end;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.free[i - 1].1 += len + self.free[i].1;
                self.free.remove(i);
            }
            (true, false) => self.free[i - 1].1 += len,
            (false, true) => self.free[i] = (start, len + self.free[i].1),
            (false, false) => self.free.insert(i, (start, len)),
        }
        Ok(())
    }

    /// Raises the capacity to `capacity` (no-op when not larger); the new rows are free.
    pub fn grow(&mut self, capacity: usize) {
        if capacity <= self.capacity {
            return;
        }
        let old = self.capacity;
        self.capacity = capacity;
        match self.free.last_mut() {
            Some((s, n)) if *s + *n == old => *n += capacity - old,
            _ => self.free.push((old, capacity - old)),
        }
    }
}

/// Identifies a submitted request for its whole life (ids count up from 0 per engine).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What bounds the active set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most active sequences (0 = no limit).
    pub max_batch: usize,
    /// Most canvas rows summed over the active sequences (0 = no limit).
    pub max_rows: usize,
    /// Most KV-cache rows the active sequences may hold together (`None` = no limit).
    pub cache_rows: Option<usize>,
    /// The backend's cache grows on demand (`EngineBackend::cache_row_limit` is `None`); else
    /// it preallocated `cache_rows` rows.
    pub cache_grows: bool,
}

/// Why a sequence can never be admitted, even alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misfit {
    /// Its canvas has more rows than `max_rows`.
    Rows { len: usize, max_rows: usize },
    /// Its canvas needs more KV-cache rows than the cache holds.
    Cache { len: usize, cache_rows: usize },
}

/// A sequence the scheduler holds.
struct Entry {
    id: RequestId,
    seq: SeqState,
    /// Batch step of its first forward (None until it ran one).
    first_step: Option<u32>,
}

impl AsRef<SeqState> for Entry {
    fn as_ref(&self) -> &SeqState {
        &self.seq
    }
}

impl AsMut<SeqState> for Entry {
    fn as_mut(&mut self) -> &mut SeqState {
        &mut self.seq
    }
}

/// A sequence that finished, with the batch steps of its first and last forward (`None` for
/// a sequence that needed none: every slot fixed by its prior).
pub struct Finished {
    pub id: RequestId,
    pub seq: SeqState,
    pub first_step: Option<u32>,
    pub last_step: Option<u32>,
}

/// The FIFO queue, the active set and the cache rows (module docs).
pub struct Scheduler {
    limits: Limits,
    rows: RowAllocator,
    queue: VecDeque<Entry>,
    active: Vec<Entry>,
    next_id: u64,
    batch_step: u32,
    /// The runner's buffers, reused by every step.
    ws: StepScratch,
    /// Canvas lengths of the queue (scratch of `growth_target`, which runs at every step
    /// while requests wait).
    lens: Vec<usize>,
}

impl Scheduler {
    /// An empty scheduler. A fixed-size cache starts with all its `cache_rows` free; a growing
    /// one starts empty and grows at the first admission.
    pub fn new(limits: Limits) -> Self {
        let cap = if limits.cache_grows { 0 } else { limits.cache_rows.unwrap_or(0) };
        Scheduler {
            limits,
            rows: RowAllocator::new(cap),
            queue: VecDeque::new(),
            active: Vec::new(),
            next_id: 0,
            batch_step: 0,
            ws: StepScratch::default(),
            lens: Vec::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The cache-row allocator (for inspection).
    pub fn rows(&self) -> &RowAllocator {
        &self.rows
    }

    /// Requests queued, not admitted yet.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Requests admitted and not finished.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// The admitted, unfinished sequences with their ids, in admission order.
    pub fn active_seqs(&self) -> impl Iterator<Item = (RequestId, &SeqState)> + '_ {
        self.active.iter().map(|e| (e.id, &e.seq))
    }

    /// Batch steps run so far (the next step's `batch_step`).
    pub fn batch_step(&self) -> u32 {
        self.batch_step
    }

    /// The id the next submitted sequence gets.
    pub fn next_id(&self) -> RequestId {
        RequestId(self.next_id)
    }

    /// Whether a canvas of `len` rows can ever be admitted (alone, into an empty cache).
    pub fn fits_alone(&self, len: usize) -> std::result::Result<(), Misfit> {
        let l = &self.limits;
        if l.max_rows > 0 && len > l.max_rows {
            return Err(Misfit::Rows { len, max_rows: l.max_rows });
        }
        match l.cache_rows {
            Some(cache_rows) if len > cache_rows => Err(Misfit::Cache { len, cache_rows }),
            _ => Ok(()),
        }
    }

    /// Queues `seq` (validated by the caller; its plan may already be built) and returns its
    /// id. Refuses a sequence that can never fit.
    pub fn submit(&mut self, seq: SeqState) -> Result<RequestId> {
        let id = RequestId(self.next_id);
        if seq.cache_base.is_some() {
            return Err(Error::bad_input(format!("request {id}: sequence already holds cache rows")));
        }
        if let Err(m) = self.fits_alone(seq.canvas.len()) {
            return Err(Error::bad_input(format!("request {id}: it can never be scheduled: {m:?}")));
        }
        self.next_id += 1;
        self.queue.push_back(Entry { id, seq, first_step: None });
        Ok(id)
    }

    /// Drops a queued or active request (its cache rows are freed). False when it is not here
    /// (unknown or already finished).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.queue.iter().position(|e| e.id == id) {
            self.queue.remove(i);
            return true;
        }
        if let Some(i) = self.active.iter().position(|e| e.id == id) {
            let e = self.active.remove(i);
            self.free_rows_of(&e);
            return true;
        }
        false
    }

    fn free_rows_of(&mut self, e: &Entry) {
        if let Some(base) = e.seq.cache_base {
            // Rows came from this allocator, once; a failure here is a scheduler bug.
            self.rows.release(base as usize, e.seq.canvas.len()).expect("cache rows released twice");
        }
    }

    /// Rows a growing cache is sized to when it grows: enough for every queued sequence, but
    /// no more than twice what can be active at once (slack against fragmentation), at least
    /// the longest queued canvas, and within `cache_rows`.
    fn growth_target(&mut self) -> usize {
        let lens = &mut self.lens;
        lens.clear();
        lens.extend(self.queue.iter().map(|e| e.seq.canvas.len()));
        lens.sort_unstable_by(|a, b| b.cmp(a));
        let total: usize = lens.iter().sum();
        let longest = lens.first().copied().unwrap_or(0);
        let mut at_once: usize = match self.limits.max_batch {
            0 => total,
            b => lens.iter().take(b).sum(),
        };
        if self.limits.max_rows > 0 {
            at_once = at_once.min(self.limits.max_rows);
        }
        let want = total.min(at_once.saturating_mul(2)).max(longest);
        want.min(self.limits.cache_rows.unwrap_or(usize::MAX))
    }

    /// Admits queued sequences, in order, while the head fits.
    fn admit(&mut self, backend: &mut dyn EngineBackend) -> Result<()> {
        if self.queue.is_empty() {
            return Ok(());
        }
        // A growable cache (the CPU's) keeps its rows when it grows, so it may grow with
        // sequences active.
        if self.limits.cache_grows {
            let target = self.growth_target();
            if target > self.rows.capacity() {
                backend.reserve_cache(target)?;
                self.rows.grow(target);
            }
        }
        let shifted = backend.config().shifted();
        let mut live: usize = self.active.iter().map(|e| e.seq.canvas.len()).sum();
        while let Some(head) = self.queue.front() {
            let len = head.seq.canvas.len();
            if self.limits.max_batch > 0 && self.active.len() >= self.limits.max_batch {
                break;
            }
            if self.limits.max_rows > 0 && live + len > self.limits.max_rows {
                break;
            }
            let Some(base) = self.rows.alloc(len) else { break };
            let mut e = self.queue.pop_front().expect("head exists");
            let admitted = u32::try_from(base)
                .map_err(|_| Error::bad_input(format!("cache row {base} does not fit in u32")))
                .and_then(|b| e.seq.admit_at(b, shifted));
            if let Err(err) = admitted {
                self.rows.release(base, len).expect("rows just allocated");
                self.queue.push_front(e);
                return Err(err);
            }
            live += len;
            self.active.push(e);
        }
        Ok(())
    }

    /// One step boundary and step: admit what fits, run one batch step over every active
    /// sequence that is not done, retire the finished ones (cache rows freed) and return them
    /// in admission order. With nothing queued or active, does nothing. The callback sees each
    /// stepped sequence with `index` = its id. On an error the step's sequences stay active
    /// (some may hold the failed step's commits): cancel them.
    pub fn step(
        &mut self,
        backend: &mut dyn EngineBackend,
        callback: Option<&mut dyn FnMut(&StepEvent)>,
    ) -> Result<Vec<Finished>> {
        self.admit(backend)?;
        let step = self.batch_step;
        self.ws.clear_picks();
        for (i, e) in self.active.iter_mut().enumerate() {
            if !e.seq.canvas.is_done() {
                e.first_step.get_or_insert(step);
                self.ws.pick(i, e.id.0 as usize);
            }
        }
        if self.ws.picked() > 0 {
            runner::step_batch_with(&mut *backend, &mut self.active, &mut self.ws, step, callback)?;
            self.batch_step = self.batch_step.wrapping_add(1);
        }
        let last = self.batch_step.wrapping_sub(1);
        // Empty (no allocation) unless a sequence finished.
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].seq.canvas.is_done() {
                let e = self.active.remove(i);
                self.free_rows_of(&e);
                let last_step = e.first_step.map(|_| last);
                done.push(Finished { id: e.id, seq: e.seq, first_step: e.first_step, last_step });
            } else {
                i += 1;
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_coalescing() {
        let mut a = RowAllocator::new(10);
        assert_eq!(a.alloc(3), Some(0));
        assert_eq!(a.alloc(3), Some(3));
        assert_eq!(a.alloc(3), Some(6));
        assert_eq!(a.alloc(2), None, "one row left");
        a.release(3, 3).unwrap();
        assert_eq!(a.free_ranges(), &[(3, 3), (9, 1)]);
        assert_eq!(a.alloc(1), Some(3), "first fit: the lowest range");
        a.release(0, 3).unwrap();
        a.release(3, 1).unwrap();
        a.release(6, 3).unwrap();
        assert_eq!(a.free_ranges(), &[(0, 10)]);
        assert!(a.release(2, 2).is_err(), "double free");
    }
}
