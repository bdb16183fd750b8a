//! No allocation inside the decode loop (DESIGN.md §5, "a step never allocates"): a counting
//! global allocator counts this thread's heap allocations (alloc, alloc_zeroed, realloc) while
//! a test turns counting on, and the decode loops run with it on:
//! - [`runner::run`] over a scripted backend (allocation-free itself) and over the CPU
//!   backend (tiny-llada, dual cache), where only the runner's bookkeeping between two backend
//!   calls is counted (the CPU forward allocates; it is not the runner's);
//! - [`Scheduler::step`] over the scripted backend, a whole step boundary at a time.
//!
//! Steady state starts after the first step (it sizes the runner's reusable buffers, from
//! bounds: the canvas lengths, not the first step's rows, which for `block` are fewer than a
//! later block-start step's). The runner calls each sequence's
//! `CachePlan` once per step; the tests replay exactly those plan calls on a mirror of every
//! sequence, count their allocations, and require both the runner's own bookkeeping and the
//! plan to allocate nothing.
use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use demask::batch::RowBatch;
use demask::cache::CacheScheme;
use demask::checkpoint::random_weights;
use demask::config::ModelConfig;
use demask::decode::canvas::{self, Canvas, CanvasSpec};
use demask::decode::cpu::CpuStepper;
use demask::decode::runner::{self, SeqState};
use demask::decode::scheduler::{Limits, Scheduler};
use demask::decode::step::{Commit, SeqWork, SlotScores, StepBackend, StepCommits};
use demask::decode::{Policy, Sampling};
use demask::engine::EngineBackend;
use demask::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Counts allocations of the current thread while its `COUNTING` flag is set. To see where
/// unexpected ones come from, run with `NOALLOC_TRACE=1` and `-- --nocapture`: each counted
/// allocation then prints its number and a backtrace (compare with the probe's `CALL` lines).
struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

static TRACE: AtomicBool = AtomicBool::new(false);

fn note_alloc() {
    // `try_with`: thread-locals may already be gone while a thread shuts down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let n = COUNT.with(|c| {
                c.set(c.get() + 1);
                c.get()
            });
            if TRACE.load(Ordering::Relaxed) {
                // Printing allocates: count none of it.
                on.set(false);
                eprintln!("ALLOC #{n}\n{}", Backtrace::force_capture());
                on.set(true);
            }
        }
    });
}

// SAFETY: every call forwards to `System` with the same arguments; counting touches only
// const-initialised thread-locals (no allocation, no re-entry).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations counted on this thread so far.
fn allocs() -> u64 {
    COUNT.with(Cell::get)
}

fn set_counting(on: bool) {
    if on {
        TRACE.store(std::env::var_os("NOALLOC_TRACE").is_some(), Ordering::Relaxed);
    }
    COUNTING.with(|c| c.set(on));
}

/// Runs `f` with counting on; returns its result and the allocations it made.
fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = allocs();
    set_counting(true);
    let r = f();
    set_counting(false);
    (r, allocs() - before)
}

/// Runs `f` with counting off (the probe's own records), restoring the flag after.
fn uncounted<R>(f: impl FnOnce() -> R) -> R {
    let was = COUNTING.with(Cell::get);
    set_counting(false);
    let r = f();
    set_counting(was);
    r
}

#[test]
fn the_counter_sees_allocations() {
    let (v, n) = counted(|| vec![1u32; 3]);
    assert_eq!(n, 1, "a vec! allocates once");
    let (_, n) = counted(|| drop(v));
    assert_eq!(n, 0, "a free is not an allocation");
    let (_, n) = counted(|| uncounted(|| vec![0u8; 4]));
    assert_eq!(n, 0, "uncounted regions are not counted");
}

/// Commits a fixed number of eligible slots per step (1 + (step + seq) % 3, capped), each to a
/// token derived from its position, with no allocation: writes straight into `out`.
struct Script {
    cfg: ModelConfig,
}

impl StepBackend for Script {
    fn step(&mut self, _: &RowBatch, _: &[SeqWork]) -> Result<Vec<Vec<Commit>>> {
        panic!("the runner calls step_into when there is no callback");
    }
    fn step_scored(&mut self, _: &RowBatch, _: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
        panic!("no callback here");
    }
    fn step_into(&mut self, batch: &RowBatch, work: &[SeqWork], out: &mut StepCommits) -> Result<()> {
        assert_eq!(work.len(), batch.seqs.len());
        out.clear();
        for w in work {
            assert!(w.logit_index.iter().all(|&li| (li as usize) < batch.logit_rows.len()));
            let k = (1 + (w.step + w.seq_id) % 3) as usize;
            for &pos in w.eligible.iter().rev().take(k) {
                out.push(Commit { pos, token: 1 + (pos * 7 + w.seq_id) % 400 });
            }
            out.end_seq();
        }
        Ok(())
    }
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
}

impl EngineBackend for Script {
    fn cache_row_bytes(&self) -> u64 {
        1
    }
    fn cache_row_limit(&self) -> Option<usize> {
        None
    }
    fn reserve_cache(&mut self, _rows: usize) -> Result<()> {
        Ok(())
    }
}

/// One backend call as the probe saw it.
struct Call {
    /// Allocation counter when the call began and when it returned.
    entry: u64,
    exit: u64,
    /// (seq_id, commits) of every sequence of the step, batch order.
    commits: Vec<(u32, Vec<Commit>)>,
}

/// Wraps a backend: records the allocation counter at entry and exit of every `step_into`,
/// and each step's commits (with counting paused, so the records cost the count nothing).
struct Probe<B> {
    inner: B,
    calls: Vec<Call>,
}

impl<B: StepBackend> StepBackend for Probe<B> {
    fn step(&mut self, _: &RowBatch, _: &[SeqWork]) -> Result<Vec<Vec<Commit>>> {
        panic!("the runner calls step_into when there is no callback");
    }
    fn step_scored(&mut self, _: &RowBatch, _: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
        panic!("no callback here");
    }
    fn step_into(&mut self, batch: &RowBatch, work: &[SeqWork], out: &mut StepCommits) -> Result<()> {
        let entry = allocs();
        self.inner.step_into(batch, work, out)?;
        let exit = allocs();
        uncounted(|| {
            if TRACE.load(Ordering::Relaxed) {
                eprintln!("CALL {} allocations at entry {entry}, at exit {exit}", self.calls.len());
            }
            let commits = work.iter().enumerate().map(|(k, w)| (w.seq_id, out.seq(k).to_vec())).collect();
            self.calls.push(Call { entry, exit, commits });
        });
        Ok(())
    }
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
}

impl<B: EngineBackend> EngineBackend for Probe<B> {
    fn cache_row_bytes(&self) -> u64 {
        self.inner.cache_row_bytes()
    }
    fn cache_row_limit(&self) -> Option<usize> {
        self.inner.cache_row_limit()
    }
    fn reserve_cache(&mut self, rows: usize) -> Result<()> {
        self.inner.reserve_cache(rows)
    }
}

/// Allocations the runner's `CachePlan` calls make at one step of one batch: `live_rows`
/// before the forward (`before`) and `committed` after it (`after`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct PlanAllocs {
    before: u64,
    after: u64,
}

/// Replays every call's plan traffic on `mirror` (the sequences as they were before their
/// first step, indexed by seq_id): per sequence of the call, the plan's `live_rows` with the
/// inputs the runner gives it, then the commits applied and `committed`. Returns the counted
/// allocations per call, and checks the mirror ends where the real sequences did.
fn replay(mirror: &mut [SeqState], calls: &[Call], vocab: usize) -> Vec<PlanAllocs> {
    calls
        .iter()
        .map(|call| {
            let mut a = PlanAllocs::default();
            for (id, commits) in &call.commits {
                let s = &mut mirror[*id as usize];
                let masked = s.masked_positions();
                let eligible = s.canvas.eligible();
                let mut live = Vec::with_capacity(s.canvas.len());
                // `SeqState::live_rows_into` is the plan's call plus, for `edit:`, the block's
                // rows merged in place (counted too: it must not allocate either).
                a.before += counted(|| s.live_rows_into(&masked, &eligible, &mut live)).1;
                let n = s.canvas.steps();
                let plan = s.plan.as_mut().expect("admitted");
                let pos: Vec<u32> = commits.iter().map(|c| c.pos).collect();
                a.after += counted(|| plan.committed(n, &pos)).1;
                s.canvas.apply_for(commits, vocab, &s.policy).expect("recorded commits apply");
            }
            a
        })
        .collect()
}

fn seq(cfg: &ModelConfig, rng: &mut StdRng, id: u32, prompt_len: usize, gen: u32, block: u32, cache: &str) -> SeqState {
    let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.gen_range(1..400)).collect();
    let spec = CanvasSpec { gen_len: gen, block_len: block, stop_at_eos: false };
    let canvas = Canvas::new(&prompt, &[], spec, cfg).unwrap();
    let policy: Policy = "schedule:4".parse().unwrap();
    let scheme: CacheScheme = cache.parse().unwrap();
    SeqState::new(canvas, policy, Sampling::default(), 7, id).with_cache(scheme, false)
}

/// A batch with every cache scheme, awkward prompt lengths (1, 19) and mixed block lengths.
fn mixed_batch(cfg: &ModelConfig, seed: u64) -> Vec<SeqState> {
    let mut rng = StdRng::seed_from_u64(seed);
    let shapes: [(usize, u32, u32, &str); 8] = [
        (19, 32, 8, "dual"),
        (1, 24, 8, "prefix"),
        (7, 32, 16, "dkv:2"),
        (12, 16, 4, "dkv-greedy:1"),
        (5, 16, 16, "prompt"),
        (3, 8, 4, "none"),
        (11, 40, 8, "dual"),
        (3, 32, 8, "block"),
    ];
    shapes.iter().enumerate().map(|(i, &(p, g, b, c))| seq(cfg, &mut rng, i as u32, p, g, b, c)).collect()
}

/// Runs `seqs` through `runner::run` on `probe` with counting on, then checks every gap
/// between two backend calls (and the tail after the last) allocated exactly what the plan
/// replay did. `inner_free`: the wrapped backend itself must not allocate either.
fn check_run<B: StepBackend>(what: &str, probe: &mut Probe<B>, seqs: &mut [SeqState], inner_free: bool) {
    let vocab = probe.config().vocab;
    let shifted = probe.config().shifted();
    let mut mirror = seqs.to_vec();
    runner::admit(&mut mirror, shifted).unwrap();
    let (res, _) = counted(|| runner::run(probe, seqs, None));
    res.unwrap();
    let end = allocs();
    let calls = &probe.calls;
    assert!(calls.len() >= 8, "{what}: only {} steps", calls.len());
    let plan = replay(&mut mirror, calls, vocab);
    for (m, s) in mirror.iter().zip(seqs.iter()) {
        assert_eq!(m.canvas.tokens(), s.canvas.tokens(), "{what}: the replay diverged from the run");
        assert!(s.canvas.is_done(), "{what}: a sequence did not finish");
    }
    let mut bad = Vec::new();
    let mut plan_total = 0;
    for k in 1..=calls.len() {
        let gap_end = calls.get(k).map_or(end, |c| c.entry);
        let got = gap_end - calls[k - 1].exit;
        let want = plan[k - 1].after + plan.get(k).map_or(0, |p| p.before);
        plan_total += want;
        if got != want {
            bad.push((k, got, want));
        }
    }
    let inner: Vec<(usize, u64)> =
        calls.iter().enumerate().map(|(k, c)| (k, c.exit - c.entry)).filter(|&(_, n)| n > 0).collect();
    assert!(
        bad.is_empty(),
        "{what}: runner bookkeeping allocated between backend calls: (gap before call k, allocations, of which \
         the cache plan's) {:?}",
        &bad[..bad.len().min(8)]
    );
    if inner_free {
        assert!(inner.is_empty(), "{what}: the scripted backend allocated: (call, allocations) {inner:?}");
    }
    assert_eq!(plan_total, 0, "{what}: the cache plan allocated between steps");
    println!("{what}: {} steps, no allocation between them", calls.len());
}

#[test]
fn run_steps_allocate_nothing_beyond_the_cache_plan() {
    for (preset, seed) in [("tiny-llada", 1), ("tiny-dream", 2)] {
        let cfg = ModelConfig::preset(preset).unwrap();
        let mut seqs = mixed_batch(&cfg, seed);
        let mut probe = Probe { inner: Script { cfg }, calls: Vec::new() };
        check_run(&format!("{preset} scripted"), &mut probe, &mut seqs, true);
    }
}

/// The brief's case: a real CPU decode (tiny-llada, dual cache, two sequences); only the
/// runner's bookkeeping between forwards is counted.
#[test]
fn cpu_dual_decode_bookkeeping_allocates_nothing_beyond_the_cache_plan() {
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut seqs = vec![seq(&cfg, &mut rng, 0, 19, 32, 8, "dual"), seq(&cfg, &mut rng, 1, 5, 16, 8, "dual")];
    let stepper = CpuStepper::new(&random_weights(&cfg, 11), runner::cache_rows_for(&seqs)).unwrap();
    let mut probe = Probe { inner: stepper, calls: Vec::new() };
    check_run("tiny-llada CPU dual", &mut probe, &mut seqs, false);
}

/// LLaDA2's aligned layout (prompts of 19 and 45 tokens: the first block holds their tail;
/// gen 40: a padded canvas) with `edit:` (committed slots re-scored, the block's rows live under
/// every scheme) on a real CPU decode: the bookkeeping between forwards allocates nothing.
#[test]
fn cpu_llada2_edit_decode_bookkeeping_allocates_nothing_beyond_the_cache_plan() {
    let cfg = ModelConfig::preset("tiny-llada2").unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    let mut seqs: Vec<SeqState> = [(19, "dual", "edit:0.9,0,2"), (45, "dkv:2", "edit:0.5,0.1,1"), (3, "prompt", "llada2:0.9,8")]
        .iter()
        .enumerate()
        .map(|(i, &(p, cache, policy))| {
            let prompt: Vec<u32> = (0..p).map(|_| rng.gen_range(1..400)).collect();
            let spec = CanvasSpec { gen_len: 40, block_len: 32, stop_at_eos: false };
            let canvas = Canvas::with_layout(&prompt, &[], spec, canvas::Layout::Aligned, &cfg).unwrap();
            SeqState::new(canvas, policy.parse().unwrap(), Sampling::default(), 7, i as u32).with_cache(cache.parse().unwrap(), false)
        })
        .collect();
    let stepper = CpuStepper::new(&random_weights(&cfg, 12), runner::cache_rows_for(&seqs)).unwrap();
    let mut probe = Probe { inner: stepper, calls: Vec::new() };
    check_run("tiny-llada2 CPU edit", &mut probe, &mut seqs, false);
    // The run did re-write committed slots (else this would not test `edit:`'s path).
    let mut seen = std::collections::HashSet::new();
    let edits = probe.calls.iter().flat_map(|c| &c.commits).flat_map(|(id, cs)| cs.iter().map(move |c| (*id, c.pos)));
    let edits = edits.filter(|&k| !seen.insert(k)).count();
    assert!(edits > 0, "no edit in the run");
}

/// `Scheduler::step` at steady state (nothing admitted, nothing finishing): the whole step
/// boundary allocates only what the plan replay does. Sequences of different lengths retire at
/// different steps, so later steps run smaller batches out of the same buffers; with
/// `max_batch` 3 the rest wait in the queue (every step then also sizes the growing cache).
#[test]
fn scheduler_steps_allocate_nothing_beyond_the_cache_plan() {
    for (preset, seed, max_batch) in
        [("tiny-llada", 4, 0), ("tiny-dream", 5, 0), ("tiny-llada", 6, 3), ("tiny-dream", 7, 3)]
    {
        let what = format!("{preset} max_batch {max_batch}");
        let cfg = ModelConfig::preset(preset).unwrap();
        let vocab = cfg.vocab;
        let seqs = mixed_batch(&cfg, seed);
        let mut mirror = seqs.clone();
        for s in &mut mirror {
            s.make_plan(cfg.shifted()).unwrap();
        }
        let limits = Limits { max_batch, max_rows: 0, cache_rows: None, cache_grows: true };
        let mut sched = Scheduler::new(limits);
        for s in seqs {
            sched.submit(s).unwrap();
        }
        let mut probe = Probe { inner: Script { cfg }, calls: Vec::new() };
        // (allocations of the whole step, whether it admitted or retired a sequence)
        let mut steps = Vec::new();
        while sched.pending() + sched.active() > 0 {
            let pending = sched.pending();
            let (done, n) = counted(|| sched.step(&mut probe, None));
            let changed = done.unwrap().len() > 0 || sched.pending() != pending;
            steps.push((n, changed));
        }
        assert_eq!(steps.len(), probe.calls.len(), "{what}: one backend call per step");
        let plan = replay(&mut mirror, &probe.calls, vocab);
        assert!(mirror.iter().all(|m| m.canvas.is_done()), "{what}: the replay did not finish");
        let mut checked = 0;
        let mut bad = Vec::new();
        for (k, &(n, changed)) in steps.iter().enumerate().skip(1) {
            let inner = probe.calls[k].exit - probe.calls[k].entry;
            assert_eq!(inner, 0, "{what}: the scripted backend allocated at step {k}");
            if changed {
                continue; // admitting grows the active set; retiring returns a new Vec
            }
            checked += 1;
            let want = plan[k].before + plan[k].after;
            if n != want {
                bad.push((k, n, want));
            }
        }
        assert!(checked >= 8, "{what}: only {checked} steady-state steps");
        assert!(
            bad.is_empty(),
            "{what}: scheduler steps allocated beyond the cache plan: (step, allocations, of which the cache \
             plan's) {:?}",
            &bad[..bad.len().min(8)]
        );
        let plan_steps: Vec<usize> = (1..plan.len()).filter(|&k| plan[k].before + plan[k].after > 0).collect();
        assert!(plan_steps.is_empty(), "{what}: the cache plan allocated at steps {plan_steps:?}");
        println!("{what}: {} steps, {checked} steady-state steps allocated nothing", steps.len());
    }
}
