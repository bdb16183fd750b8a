//! KV caching end to end on the CPU backend (DESIGN.md §5): every scheme with a full refresh
//! every step decodes exactly like `none`; the cache is really used (a prompt row's cached K
//! goes stale under `prompt` / `dual`, rows that are not live keep their K, full steps equal a
//! fresh recomputation); live rows per step follow the scheme's rule; every scheme finishes
//! with several policies; alone vs in a batch; bad scheme strings; the KV budget.
mod common;

use common::{cpu_engine, kv_row_bytes, prompt, req, seq_state, spec, CPU_PRESETS};
use demask::batch::RowBatch;
use demask::cache::CacheScheme;
use demask::checkpoint::random_weights;
use demask::config::ModelConfig;
use demask::decode::cpu::CpuStepper;
use demask::decode::runner::{self, StepEvent};
use demask::decode::step::{Commit, SeqWork, SlotScores, StepBackend};
use demask::engine::{parse_bytes, Engine, EngineOptions, Output, Request};
use demask::Result;
use rand::rngs::StdRng;
use rand::SeedableRng;

const SCHEMES: [&str; 8] = ["none", "prompt", "prefix", "dual", "dkv:1", "dkv:3", "dkv-greedy", "dkv-greedy:0"];
const POLICIES: [&str; 5] = ["schedule:4", "threshold:0.9", "factor:1", "random:4", "dream:entropy,4"];

fn check_complete(o: &Output, what: &str) {
    assert!(o.tokens.iter().all(|&t| t != demask::config::TINY_MASK), "{what}: a slot is still masked: {:?}", o.tokens);
    assert_eq!(o.rows_per_step.len(), o.steps as usize, "{what}: one live-row count per step");
    let len = (o.prompt_len + o.tokens.len()) as u32;
    assert!(o.rows_per_step.iter().all(|&r| r >= 1 && r <= len), "{what}: rows {:?}", o.rows_per_step);
    assert_eq!(o.rows_per_step[0], len, "{what}: the first step is full");
}

/// (a) Every scheme with a full refresh every step gives exactly the `none` tokens (CPU vs CPU,
/// same reduction order: exact), on both presets and several policies, and runs every row.
#[test]
fn refresh_every_step_equals_none() {
    let mut rng = StdRng::seed_from_u64(1);
    for preset in CPU_PRESETS {
        let mut e = cpu_engine(preset, EngineOptions::default());
        for (pi, policy) in POLICIES.iter().enumerate() {
            let p = prompt(&mut rng, 3 + 4 * pi);
            let base = e.generate(&[req(&p, 16, 8, policy, "none")]).unwrap().remove(0);
            for scheme in SCHEMES {
                let r = req(&p, 16, 8, policy, scheme).testing_refresh_every_step(true);
                let o = e.generate(&[r]).unwrap().remove(0);
                assert_eq!(o.tokens, base.tokens, "{preset} {policy} {scheme}: refreshed every step must equal none");
                assert_eq!(o.commits_per_step, base.commits_per_step, "{preset} {policy} {scheme}");
                let len = (p.len() + 16) as u32;
                assert!(o.rows_per_step.iter().all(|&r| r == len), "{preset} {scheme}: {:?}", o.rows_per_step);
            }
        }
    }
}

/// Every scheme runs to completion on both presets with several policies, prompts of awkward
/// lengths (1, 19) and several blocks; `none` runs every row every step.
#[test]
fn every_scheme_runs_to_completion() {
    let mut rng = StdRng::seed_from_u64(2);
    for preset in CPU_PRESETS {
        let mut e = cpu_engine(preset, EngineOptions::default());
        for scheme in SCHEMES {
            for (pi, policy) in POLICIES.iter().enumerate() {
                let p = prompt(&mut rng, if pi % 2 == 0 { 1 } else { 19 });
                let (gen, block) = if pi % 2 == 0 { (24, 8) } else { (12, 4) };
                let o = e.generate(&[req(&p, gen, block, policy, scheme)]).unwrap().remove(0);
                let what = format!("{preset} {scheme} {policy}");
                check_complete(&o, &what);
                // dkv:1 refreshes at every step (i % 1 == 0); Dream's `prompt` keeps row P−1 live,
                // which for P = 1 is every row.
                let all_live = scheme == "none"
                    || scheme == "dkv:1"
                    || (preset == "tiny-dream" && scheme == "prompt" && p.len() == 1);
                if all_live {
                    assert!(o.rows_per_step.iter().all(|&r| r as usize == p.len() + gen as usize), "{what}");
                } else {
                    assert!(
                        o.rows_per_step.iter().any(|&r| (r as usize) < p.len() + gen as usize),
                        "{what}: no step used the cache: {:?}",
                        o.rows_per_step
                    );
                }
            }
        }
    }
}

/// One step as seen by the callback: the block of the step, live rows, and masked slots before
/// the step (every block).
struct Seen {
    block: u32,
    live: u32,
    masked_before: u32,
    commits: u32,
    eligible: u32,
}

fn observe(e: &mut Engine, r: Request) -> (Output, Vec<Seen>) {
    let mask = e.config().mask_id;
    let mut seen = Vec::new();
    let mut cb = |ev: &StepEvent| {
        let c = ev.canvas;
        let p = c.prompt_len();
        let masked_after = c.gen().iter().filter(|&&t| t == mask).count() as u32;
        seen.push(Seen {
            block: (ev.eligible[0] - p) / c.spec().block_len,
            live: ev.live_rows,
            masked_before: masked_after + ev.commits.len() as u32,
            commits: ev.commits.len() as u32,
            eligible: ev.eligible.len() as u32,
        });
    };
    let o = e.generate_with(&[r], &mut cb).unwrap().remove(0);
    assert_eq!(o.rows_per_step, seen.iter().map(|s| s.live).collect::<Vec<_>>(), "Output and events agree");
    (o, seen)
}

/// Live rows per step follow each scheme's rule (P = 5, G = 24, blocks of 8): exactly on LLaDA
/// (e.g. dual's non-first steps run exactly block_len rows); Dream may add the row before an
/// eligible slot (always P−1 for `prompt`).
#[test]
fn live_rows_per_step_follow_the_scheme() {
    let mut rng = StdRng::seed_from_u64(3);
    let (p_len, gen, bl) = (5u32, 24u32, 8u32);
    let len = p_len + gen;
    for preset in CPU_PRESETS {
        let shifted = preset == "tiny-dream";
        let mut e = cpu_engine(preset, EngineOptions::default());
        let p = prompt(&mut rng, p_len as usize);
        for scheme in ["prompt", "prefix", "dual", "dkv:3"] {
            // threshold:0.9 on random weights commits about one slot a step: many steps a block.
            let (o, seen) = observe(&mut e, req(&p, gen, bl, "threshold:0.9", scheme));
            check_complete(&o, &format!("{preset} {scheme}"));
            let mut prev_block = u32::MAX;
            let mut i = 0u32;
            let mut prev_commits = 0u32;
            for (n, s) in seen.iter().enumerate() {
                if s.block != prev_block {
                    i = 0;
                    prev_block = s.block;
                }
                let start = p_len + s.block * bl;
                // The LLaDA rule; a shifted model adds the row before each eligible slot when it
                // is not live already: up to `slack` rows.
                let (want, slack) = match scheme {
                    "prompt" if n == 0 => (len, 0),
                    "prompt" => (gen + u32::from(shifted), 0),
                    "prefix" | "dual" if i == 0 => (len, 0),
                    "prefix" => (len - start, u32::from(shifted)),
                    "dual" => (bl, u32::from(shifted)),
                    "dkv:3" if i == 0 || i == 1 || i.is_multiple_of(3) => (len, 0),
                    // still-masked rows (every block) and the rows committed at the previous step
                    "dkv:3" => (s.masked_before + prev_commits, if shifted { s.eligible } else { 0 }),
                    _ => unreachable!(),
                };
                assert!(
                    s.live >= want && s.live <= want + slack,
                    "{preset} {scheme} step {n} (block {}, i {i}): {} live rows, want {want} (+ up to {slack})",
                    s.block,
                    s.live
                );
                prev_commits = s.commits;
                i += 1;
            }
        }
    }
}

/// A request alone vs in a batch of 3 (different prompts, lengths and schemes around it) gives
/// identical tokens for every scheme: its cache rows are its own.
#[test]
fn alone_equals_in_a_batch_of_three_for_every_scheme() {
    let mut rng = StdRng::seed_from_u64(4);
    for preset in CPU_PRESETS {
        let mut e = cpu_engine(preset, EngineOptions::default());
        for scheme in SCHEMES {
            let a = req(&prompt(&mut rng, 7), 16, 8, "schedule:4", "dual");
            let b = req(&prompt(&mut rng, 11), 16, 4, "threshold:0.9", scheme);
            let c = req(&prompt(&mut rng, 2), 8, 8, "factor:1", "prompt");
            let alone = e.generate(std::slice::from_ref(&b)).unwrap().remove(0);
            let batch = e.generate(&[a, b, c]).unwrap();
            assert_eq!(batch[1].tokens, alone.tokens, "{preset} {scheme}");
            assert_eq!(batch[1].rows_per_step, alone.rows_per_step, "{preset} {scheme}");
        }
    }
}

/// Wraps a CpuStepper and snapshots K of every layer (the whole cache) after each step.
struct Probe {
    inner: CpuStepper,
    k_after: Vec<Vec<Vec<f32>>>,
    live: Vec<Vec<u32>>,
}

impl StepBackend for Probe {
    fn step(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<Vec<Vec<Commit>>> {
        Ok(self.step_scored(batch, work)?.0)
    }
    fn step_scored(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
        let out = self.inner.step_scored(batch, work)?;
        self.k_after.push(self.inner.cache().k.clone());
        self.live.push(batch.positions.clone());
        Ok(out)
    }
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
}

/// Largest |a − b| over row `r` of two `[rows, kvd]` buffers.
fn row_diff(a: &[f32], b: &[f32], r: usize, kvd: usize) -> f32 {
    a[r * kvd..(r + 1) * kvd].iter().zip(&b[r * kvd..(r + 1) * kvd]).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// (c) The cache is really used. For one sequence decoded with `scheme`, after every step:
/// rows that were not live kept the K they had (bit for bit); at full steps every row equals a
/// fresh full recomputation of the step's input canvas (bit for bit: same f32 code); layer-0 K
/// of live rows equals the fresh one (it depends on the token and position only); and returns
/// the largest layer-1 K difference between a cached prompt row and the fresh recomputation.
fn stale_prompt_k(preset: &str, scheme: &str) -> f32 {
    let cfg = ModelConfig::preset(preset).unwrap();
    let w = random_weights(&cfg, 6);
    let mut rng = StdRng::seed_from_u64(5);
    let p = prompt(&mut rng, 9);
    let s = seq_state(&cfg, &p, &[], spec(16, 8), "threshold:0.9", 1, 0).with_cache(scheme.parse().unwrap(), false);
    let len = s.canvas.len();
    let mut probe = Probe { inner: CpuStepper::new(&w, len).unwrap(), k_after: Vec::new(), live: Vec::new() };
    // The input canvas of each step: the initial one, then the canvas after each step.
    let mut inputs = vec![s.canvas.tokens().to_vec()];
    let mut cb = |e: &StepEvent| inputs.push(e.canvas.tokens().to_vec());
    let mut seqs = [s];
    runner::run(&mut probe, &mut seqs, Some(&mut cb)).unwrap();
    let kvd = cfg.kv_dim();
    let model = probe.inner.model();
    let mut worst = 0f32;
    for (n, k) in probe.k_after.iter().enumerate() {
        let mut fresh = model.new_cache(len);
        model.forward(&RowBatch::full(&[inputs[n].clone()]), &mut fresh).unwrap();
        let live = &probe.live[n];
        let full = live.len() == len;
        for r in 0..len {
            let is_live = live.binary_search(&(r as u32)).is_ok();
            for (l, (kl, fl)) in k.iter().zip(&fresh.k).enumerate() {
                if full {
                    assert_eq!(
                        row_diff(kl, fl, r, kvd),
                        0.0,
                        "{preset} {scheme} step {n}: full step row {r} layer {l}"
                    );
                } else if !is_live && n > 0 {
                    let prev = &probe.k_after[n - 1][l];
                    assert_eq!(row_diff(kl, prev, r, kvd), 0.0, "{preset} {scheme} step {n}: cached row {r} changed");
                }
            }
            if is_live {
                let d = row_diff(&k[0], &fresh.k[0], r, kvd);
                assert!(d <= 1e-5, "{preset} {scheme} step {n}: live row {r} layer-0 K off by {d}");
            }
            if r < p.len() {
                worst = worst.max(row_diff(&k[cfg.n_layers - 1], &fresh.k[cfg.n_layers - 1], r, kvd));
            }
        }
    }
    assert!(probe.k_after.len() >= 3, "{preset} {scheme}: want several steps, got {}", probe.k_after.len());
    worst
}

#[test]
fn cached_prompt_rows_go_stale_with_prompt_and_dual() {
    for preset in CPU_PRESETS {
        let none = stale_prompt_k(preset, "none");
        assert_eq!(none, 0.0, "{preset} none: the cache must equal a fresh recomputation");
        for scheme in ["prompt", "dual"] {
            let d = stale_prompt_k(preset, scheme);
            // Rounding of a recomputation is ~1e-6; a stale row differs by orders more.
            assert!(d > 1e-3, "{preset} {scheme}: cached prompt K equals a fresh recomputation ({d}): cache unused?");
            eprintln!("{preset} {scheme}: largest stale prompt-row K difference {d}");
        }
        for scheme in ["prefix", "dkv:3", "dkv-greedy"] {
            stale_prompt_k(preset, scheme);
        }
    }
}

#[test]
fn bad_cache_schemes_are_refused() {
    for (s, want) in [
        ("bogus", "unknown cache scheme"),
        ("dkv", "expected dkv:R"),
        ("dkv:0", "must be >= 1"),
        ("dkv:x", "not a non-negative integer"),
        ("dual:3", "takes no parameter"),
        ("dkv-greedy:-1", "not a non-negative integer"),
        ("", "unknown cache scheme"),
    ] {
        let e = s.parse::<CacheScheme>().unwrap_err().to_string();
        assert!(e.contains(want), "`{s}`: {e}");
    }
    for s in ["none", "prompt", "prefix", "dual", "dkv:4", "dkv-greedy:2"] {
        assert_eq!(s.parse::<CacheScheme>().unwrap().name(), s);
    }
}

#[test]
fn byte_counts_parse() {
    assert_eq!(parse_bytes("1048576").unwrap(), 1 << 20);
    assert_eq!(parse_bytes("8G").unwrap(), 8 << 30);
    assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
    assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
    assert_eq!(parse_bytes("1.5K").unwrap(), 1536);
    for bad in ["", "G", "8X", "-1G", "1.5", "abc"] {
        let e = parse_bytes(bad).unwrap_err().to_string();
        assert!(e.contains("byte count"), "`{bad}`: {e}");
    }
}

/// A KV budget too small for a request is a clear error naming the request, its rows and the
/// budget; a budget that fits one request at a time splits a batch into waves with the same
/// tokens as an unbounded run.
#[test]
fn kv_budget_errors_and_waves() {
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    // The CPU cache is f32: 2 (K, V) · layers · kv_dim · 4 bytes a row.
    let per_row = kv_row_bytes(&cfg, 4);
    let mut rng = StdRng::seed_from_u64(7);
    let reqs: Vec<Request> =
        (0..3).map(|i| req(&prompt(&mut rng, 5 + i), 16, 8, "schedule:4", SCHEMES[1 + i])).collect();
    let rows1 = 5 + 1 + 16; // request 1's canvas
    let mut small = cpu_engine("tiny-llada", EngineOptions { kv_budget: Some(per_row * 20), ..Default::default() });
    let e = small.generate(&reqs).unwrap_err().to_string();
    assert!(e.contains("request 0") && e.contains("21 rows") && e.contains("KV budget"), "{e}");
    assert!(e.contains(&(per_row * 20).to_string()), "the budget in bytes: {e}");
    let e = small.generate(&reqs[1..2]).unwrap_err().to_string();
    assert!(e.contains("request 0") && e.contains(&format!("{rows1} rows")), "{e}");
    // Room for the longest request alone: three waves, same tokens as no budget.
    let mut one = cpu_engine("tiny-llada", EngineOptions { kv_budget: Some(per_row * 23 + 7), ..Default::default() });
    let mut free = cpu_engine("tiny-llada", EngineOptions::default());
    let a = one.generate(&reqs).unwrap();
    let b = free.generate(&reqs).unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.tokens, y.tokens, "request {i}");
        assert_eq!(x.rows_per_step, y.rows_per_step, "request {i}");
    }
}

/// The GPU's default KV budget: 90% of the memory left after the workspace, in whole rows, at
/// most one wave's rows; an explicit budget beyond the free memory or below one row is an
/// out-of-memory error that says so.
#[test]
fn kv_cache_rows_from_budget_and_free_memory() {
    use demask::engine::kv_cache_rows;
    // 10 GB free, 1 GB workspace, 1 MB rows: 0.9 · 9e9 / 2^20 rows.
    let (gb, mb) = (1_000_000_000u64, 1u64 << 20);
    assert_eq!(kv_cache_rows(None, 10 * gb, gb, mb, usize::MAX).unwrap(), (0.9 * 9e9) as usize / mb as usize);
    assert_eq!(kv_cache_rows(None, 10 * gb, gb, mb, 1000).unwrap(), 1000, "at most one wave's rows");
    assert_eq!(kv_cache_rows(Some(100 * mb + 5), 10 * gb, gb, mb, usize::MAX).unwrap(), 100);
    let e = kv_cache_rows(Some(9 * gb + 1), 10 * gb, gb, mb, usize::MAX).unwrap_err().to_string();
    assert!(e.contains("out of device memory") && e.contains("exceeds"), "{e}");
    let e = kv_cache_rows(Some(mb - 1), 10 * gb, gb, mb, usize::MAX).unwrap_err().to_string();
    assert!(e.contains("holds no cache row"), "{e}");
    let e = kv_cache_rows(None, gb, 2 * gb, mb, usize::MAX).unwrap_err().to_string();
    assert!(e.contains("holds no cache row"), "workspace larger than free memory: {e}");
}

/// `block` needs block-causal attention: refused by name for every bidirectional model (its
/// live rows would read never-written rows); on LLaDA2 (whose decode blocks are whole attention
/// blocks of 32 at absolute positions) it runs the scheme's rows and decodes exactly as `none`
/// (CPU against CPU), whatever the prompt's length.
#[test]
fn block_cache_needs_block_causal_attention() {
    let mut rng = StdRng::seed_from_u64(10);
    for preset in CPU_PRESETS {
        let mut e = cpu_engine(preset, EngineOptions::default());
        let r = req(&prompt(&mut rng, 32), 32, 32, "schedule:4", "block");
        let err = e.generate(std::slice::from_ref(&r)).unwrap_err().to_string();
        assert!(err.contains("`block`") && err.contains("block-causal") && err.contains("`dual`"), "{preset}: {err}");
        let err = e.submit(r).unwrap_err().to_string();
        assert!(err.contains("request") && err.contains("block-causal"), "{preset} submit: {err}");
        assert_eq!(e.pending(), 0, "{preset}: a refused request was queued");
    }
    let mut e = cpu_engine("tiny-llada2", EngineOptions::default());
    // LLaDA2's decode blocks are its attention blocks (another block_len is refused before any
    // cache scheme is looked at) ...
    for (p, bl) in [(32usize, 16u32), (5, 64), (0, 16)] {
        let r = req(&prompt(&mut rng, p), 64, bl, "llada2:0.9,4", "block");
        let err = e.generate(&[r]).unwrap_err().to_string();
        assert!(err.contains("block-causal attention block, 32") && err.contains(&format!("block_len {bl}")), "P {p} bl {bl}: {err}");
    }
    // ... at absolute multiples of 32 whatever the prompt's length (the official canvas), so
    // `block` serves a 31-token prompt too, exactly: [0, 32) first (31 prompt rows and one
    // slot), then blocks 0 and 1 (block 0's final K/V with block 1's first step).
    let p31 = prompt(&mut rng, 31);
    let base = e.generate(&[req(&p31, 64, 32, "llada2:0.9,4", "none")]).unwrap().remove(0);
    let o = e.generate(&[req(&p31, 64, 32, "llada2:0.9,4", "block")]).unwrap().remove(0);
    assert_eq!((&o.tokens, &o.commits_per_step), (&base.tokens, &base.commits_per_step), "P 31: block == none");
    assert_eq!(o.rows_per_step[..3], [32, 64, 32], "P 31: {:?}", o.rows_per_step);
    let p = prompt(&mut rng, 32);
    let base = e.generate(&[req(&p, 64, 32, "llada2:0.9,4", "none")]).unwrap().remove(0);
    let o = e.generate(&[req(&p, 64, 32, "llada2:0.9,4", "block")]).unwrap().remove(0);
    assert_eq!(o.tokens, base.tokens, "block must decode exactly like none on block-causal attention");
    assert_eq!(o.commits_per_step, base.commits_per_step);
    // 4 steps per block: [0, 64), then block 0 alone, then blocks 0 and 1, then block 1 alone.
    assert_eq!(o.rows_per_step, [64, 32, 32, 32, 64, 32, 32, 32]);
    // With no prompt the first block starts at 0.
    let o = e.generate(&[req(&[], 64, 32, "llada2:0.9,4", "block")]).unwrap().remove(0);
    assert_eq!(o.rows_per_step, [32, 32, 32, 32, 64, 32, 32, 32]);
}
