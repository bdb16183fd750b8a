//! Continuous batching on the CPU backend (exact: same precision and reduction order, so a
//! request's tokens must not depend on its neighbours at all):
//! (1) batch invariance: 8 requests with different prompt lengths, gen and block lengths,
//!     policies and cache schemes give identical tokens, step counts, commits and live rows
//!     alone, all together, with max_batch 3 (joining and leaving mid-flight), under a
//!     max_rows bound and under a tight KV budget;
//! (2) refill: with max_batch 2 a queued request starts at the step right after a short one
//!     finishes, long before the longest running one ends;
//! (3) the submit/step API: ids, each output returned once, pending/active counts, submits
//!     mid-flight, cancel, and outputs of submitted requests that finish during `generate`;
//! (4) the cache-row allocator: first fit, fragmentation, coalescing, growth, refusals;
//! (5) requests that can never fit, or are invalid, are refused at submit and queue nothing.
mod common;

use std::collections::HashMap;

use common::{cpu_engine, kv_row_bytes, mixed_requests, prompt, req, Trace, CPU_PRESETS};
use demask::config::ModelConfig;
use demask::decode::runner::StepEvent;
use demask::decode::scheduler::RowAllocator;
use demask::decode::{Policy, Sampling};
use demask::engine::{EngineOptions, Output, Prompt, Request, RequestId};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn same_decode(a: &Output, b: &Output, what: &str) {
    assert_eq!(a.tokens, b.tokens, "{what}: tokens");
    assert_eq!(a.steps, b.steps, "{what}: steps");
    assert_eq!(a.commits_per_step, b.commits_per_step, "{what}: commits per step");
    assert_eq!(a.rows_per_step, b.rows_per_step, "{what}: live rows per step");
    assert_eq!(a.step_ms.len(), a.steps as usize, "{what}: one step time per own step");
}

/// (1) Alone, together, max_batch 3, a max_rows bound and a tight KV budget: identical
/// decodes, exactly (CPU f32 computes every row independently of its neighbours).
#[test]
fn batch_invariance_alone_vs_together_vs_joining_mid_flight() {
    for preset in CPU_PRESETS {
        let reqs = mixed_requests(11);
        let canvas = |r: &Request| match &r.prompt {
            Prompt::Ids(p) => p.len() + r.gen_len as usize,
            _ => unreachable!(),
        };
        let longest = reqs.iter().map(canvas).max().unwrap();
        let mut e = cpu_engine(preset, EngineOptions::default());
        let alone: Vec<Output> = reqs.iter().map(|r| e.generate(std::slice::from_ref(r)).unwrap().remove(0)).collect();
        assert!(alone.iter().all(|o| o.tokens.iter().all(|&t| t != demask::config::TINY_MASK)));
        let together = e.generate(&reqs).unwrap();
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            same_decode(a, b, &format!("{preset} request {i}: alone vs all 8 together"));
        }
        let cfg = ModelConfig::preset(preset).unwrap();
        let per_row = kv_row_bytes(&cfg, 4);
        let bounded = [
            ("max_batch 3", EngineOptions { max_batch: 3, ..Default::default() }),
            ("max_rows", EngineOptions { max_rows: longest + 20, ..Default::default() }),
            ("kv budget", EngineOptions { kv_budget: Some(per_row * (longest as u64 + 30)), ..Default::default() }),
        ];
        for (what, opts) in bounded {
            let mut e = cpu_engine(preset, opts.clone());
            let mut t = Trace::default();
            let outs = e.generate_with(&reqs, &mut |ev: &StepEvent| t.record(ev)).unwrap();
            for (i, (a, b)) in alone.iter().zip(&outs).enumerate() {
                same_decode(a, b, &format!("{preset} request {i}: alone vs {what}"));
                assert_eq!(
                    t.span[&i].1 - t.span[&i].0 + 1,
                    b.steps,
                    "{preset} {what} request {i}: steps run back to back"
                );
            }
            for (&step, &(n, rows)) in &t.per_step {
                assert!(opts.max_batch == 0 || n <= opts.max_batch, "{preset} {what}: {n} sequences at step {step}");
                assert!(opts.max_rows == 0 || rows <= opts.max_rows, "{preset} {what}: {rows} rows at step {step}");
            }
            // Joined mid-flight: some request started while an earlier one was still running.
            let joined = t.span.values().any(|&(f, _)| f > 0 && t.span.values().any(|&(g, l)| g < f && l >= f));
            assert!(joined, "{preset} {what}: no request joined a running batch: {:?}", t.span);
        }
    }
}

/// (2) Continuous batching refills a finished slot at the next step.
#[test]
fn a_queued_request_starts_before_the_longest_running_one_finishes() {
    let mut rng = StdRng::seed_from_u64(3);
    let long = req(&prompt(&mut rng, 5), 64, 8, "schedule:8", "dual");
    let short = |rng: &mut StdRng| req(&prompt(rng, 9), 8, 8, "schedule:2", "prompt");
    let reqs = vec![long, short(&mut rng), short(&mut rng), short(&mut rng)];
    let mut e = cpu_engine("tiny-dream", EngineOptions { max_batch: 2, ..Default::default() });
    let mut t = Trace::default();
    let outs = e.generate_with(&reqs, &mut |ev: &StepEvent| t.record(ev)).unwrap();
    assert_eq!(outs[0].steps, 64);
    assert!(outs[1..].iter().all(|o| o.steps == 2), "{:?}", outs.iter().map(|o| o.steps).collect::<Vec<_>>());
    let s = |i: usize| t.span[&i];
    assert_eq!(s(0), (0, 63), "the long request runs every step");
    assert_eq!(s(1), (0, 1));
    assert_eq!(s(2).0, s(1).1 + 1, "request 2 takes request 1's slot at the next step");
    assert_eq!(s(3).0, s(2).1 + 1, "request 3 takes request 2's slot at the next step");
    assert!(s(3).1 < s(0).1, "every short request finished while the long one ran: {:?}", t.span);
    assert!(t.per_step.values().all(|&(n, _)| n <= 2));
    assert_eq!(e.batch_steps(), 64, "no step was spent waiting");
}

/// (3) submit / step / pending / active / cancel.
#[test]
fn submit_and_step_api() {
    let mut rng = StdRng::seed_from_u64(8);
    let reqs: Vec<Request> =
        (0..6).map(|i| req(&prompt(&mut rng, 2 + 5 * i), 8 * (1 + i as u32 % 3), 8, "schedule:2", "none")).collect();
    let want = cpu_engine("tiny-llada", EngineOptions::default()).generate(&reqs).unwrap();
    let mut e = cpu_engine("tiny-llada", EngineOptions { max_batch: 2, ..Default::default() });
    assert!(e.step().unwrap().is_empty(), "an idle step does nothing");
    assert_eq!(e.batch_steps(), 0);
    let ids: Vec<RequestId> = reqs[..5].iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    assert_eq!(ids, (0..5).map(RequestId).collect::<Vec<_>>());
    assert_eq!((e.pending(), e.active()), (5, 0));
    let mut seen_ids = Vec::new();
    let first = e.step_with(&mut |ev: &StepEvent| seen_ids.push(ev.index)).unwrap();
    assert!(first.is_empty(), "no request finishes in one step");
    assert_eq!(seen_ids, [0, 1], "the callback's index is the request id");
    assert_eq!((e.pending(), e.active()), (3, 2));
    let mut got: HashMap<RequestId, Output> = HashMap::new();
    let mut steps = 1;
    while e.pending() + e.active() > 0 {
        if steps == 3 {
            assert_eq!(e.submit(reqs[5].clone()).unwrap(), RequestId(5), "a submit mid-flight");
        }
        for (id, o) in e.step().unwrap() {
            assert!(got.insert(id, o).is_none(), "request {id} returned twice");
        }
        assert!(e.active() <= 2);
        steps += 1;
        assert!(steps < 1000, "does not finish");
    }
    assert_eq!(got.len(), 6);
    for (i, w) in want.iter().enumerate() {
        same_decode(w, &got[&RequestId(i as u64)], &format!("request {i}: generate vs submit/step"));
    }
    assert!(e.step().unwrap().is_empty(), "every output was returned once");

    // Cancel: a queued one, an active one, unknown ids.
    let a = e.submit(reqs[0].clone()).unwrap();
    let b = e.submit(reqs[1].clone()).unwrap();
    let c = e.submit(reqs[2].clone()).unwrap();
    assert_eq!(a, RequestId(6));
    e.step().unwrap();
    assert_eq!((e.pending(), e.active()), (1, 2));
    assert!(e.cancel(c), "queued");
    assert!(e.cancel(a), "active");
    assert!(!e.cancel(a) && !e.cancel(RequestId(99)));
    assert_eq!((e.pending(), e.active()), (0, 1));
    let mut rest = Vec::new();
    while e.active() > 0 {
        rest.extend(e.step().unwrap());
    }
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].0, b);
    assert_eq!(rest[0].1.tokens, want[1].tokens);

    // A request submitted before `generate` runs beside it; its output comes from the next step.
    let x = e.submit(reqs[3].clone()).unwrap();
    let outs = e.generate(&reqs[4..6]).unwrap();
    same_decode(&want[4], &outs[0], "generate beside a submitted request");
    same_decode(&want[5], &outs[1], "generate beside a submitted request");
    assert_eq!((e.pending(), e.active()), (0, 0), "the shorter submitted request finished first");
    let later = e.step().unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].0, x);
    same_decode(&want[3], &later[0].1, "a submitted request finished during generate");
}

/// (4) The cache-row allocator.
#[test]
fn row_allocator_fragmentation_coalescing_refusal() {
    let mut a = RowAllocator::new(100);
    let r: Vec<usize> = [20, 10, 30, 15, 25].iter().map(|&n| a.alloc(n).unwrap()).collect();
    assert_eq!(r, [0, 20, 30, 60, 75], "first fit packs from row 0");
    assert_eq!((a.free_rows(), a.used_rows()), (0, 100));
    assert_eq!(a.alloc(1), None, "full");
    // Free 10 at 20 and 15 at 60: 25 rows free, but no hole of 16.
    a.release(20, 10).unwrap();
    a.release(60, 15).unwrap();
    assert_eq!(a.free_ranges(), &[(20, 10), (60, 15)]);
    assert_eq!((a.free_rows(), a.largest_free()), (25, 15));
    assert_eq!(a.alloc(16), None, "fragmented: 25 rows free, none contiguous enough");
    // Freeing [30, 60) joins both holes into [20, 75).
    a.release(30, 30).unwrap();
    assert_eq!(a.free_ranges(), &[(20, 55)]);
    assert_eq!(a.alloc(16), Some(20));
    assert_eq!(a.alloc(5), Some(36), "first fit: right after");
    // Coalescing with the right neighbour only, then both.
    a.release(0, 20).unwrap();
    assert_eq!(a.free_ranges(), &[(0, 20), (41, 34)]);
    a.release(36, 5).unwrap();
    assert_eq!(a.free_ranges(), &[(0, 20), (36, 39)]);
    a.release(20, 16).unwrap();
    assert_eq!(a.free_ranges(), &[(0, 75)]);
    a.release(75, 25).unwrap();
    assert_eq!(a.free_ranges(), &[(0, 100)], "everything freed: one range");
    // Refusals: double free, out of range, zero length.
    assert!(a.release(10, 5).is_err(), "double free");
    let mut b = RowAllocator::new(10);
    assert_eq!(b.alloc(4), Some(0));
    assert!(b.release(2, 4).is_err(), "overlaps the free tail [4, 10)");
    assert!(b.release(8, 5).is_err(), "past the capacity");
    assert!(b.release(0, 0).is_err(), "empty range");
    assert_eq!(b.alloc(0), None);
    assert_eq!(b.alloc(7), None, "6 rows free");
    // Growth extends the free tail (or adds a range after a used tail).
    b.grow(12);
    assert_eq!(b.free_ranges(), &[(4, 8)]);
    assert_eq!(b.alloc(8), Some(4));
    b.grow(15);
    assert_eq!(b.free_ranges(), &[(12, 3)]);
    b.grow(5);
    assert_eq!(b.capacity(), 15, "never shrinks");
    let mut empty = RowAllocator::new(0);
    assert_eq!(empty.alloc(1), None);
    empty.grow(3);
    assert_eq!(empty.alloc(3), Some(0));
}

/// (5) Refused at submit: too large for max_rows or the KV budget, or invalid; nothing queued
/// and no id spent.
#[test]
fn requests_that_cannot_fit_or_are_invalid_are_refused_at_submit() {
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let per_row = kv_row_bytes(&cfg, 4);
    let mut rng = StdRng::seed_from_u64(4);
    let p20 = prompt(&mut rng, 20);
    let big = req(&p20, 16, 8, "schedule:2", "dual"); // 36 rows
    let small = req(&p20[..4], 8, 8, "schedule:2", "dual"); // 12 rows

    let mut e = cpu_engine("tiny-llada", EngineOptions { max_rows: 30, ..Default::default() });
    let m = e.submit(big.clone()).unwrap_err().to_string();
    assert!(m.contains("request 0") && m.contains("36 rows") && m.contains("max_rows 30"), "{m}");
    assert_eq!((e.pending(), e.active()), (0, 0));
    assert_eq!(e.submit(small.clone()).unwrap(), RequestId(0), "a refused request spends no id");
    let m = e.submit(big.clone()).unwrap_err().to_string();
    assert!(m.contains("request 1"), "named by the id it would have had: {m}");
    assert_eq!(e.pending(), 1);

    let mut e = cpu_engine("tiny-llada", EngineOptions { kv_budget: Some(per_row * 30), ..Default::default() });
    let m = e.submit(big.clone()).unwrap_err().to_string();
    assert!(m.contains("request 0") && m.contains("36 rows") && m.contains("KV budget"), "{m}");
    assert!(m.contains(&(per_row * 30).to_string()), "the budget in bytes: {m}");
    assert_eq!(e.pending(), 0);
    let m = e.generate(&[small.clone(), big.clone()]).unwrap_err().to_string();
    assert!(m.contains("request 1") && m.contains("KV budget"), "{m}");
    assert_eq!((e.pending(), e.active()), (0, 0), "generate validates every request before queueing any");

    let with_prompt = |p: Prompt| {
        let mut r = small.clone();
        r.prompt = p;
        r
    };
    let invalid = [
        (small.clone().gen_len(0), "gen_len must be > 0"),
        (with_prompt(Prompt::Ids(vec![1, 512])), "vocabulary"),
        (small.clone().policy(Policy::Schedule { steps: 0 }), "steps must be >= 1"),
        (small.clone().policy(Policy::Threshold { tau: f32::NAN }), "tau"),
        (small.clone().sampling(Sampling { temperature: -1.0, ..Sampling::default() }), "temperature"),
        (with_prompt(Prompt::Text { text: "hi".into(), chat: false }), "tokenizer"),
    ];
    for (r, what) in invalid {
        let m = e.submit(r).unwrap_err().to_string();
        assert!(m.contains("request 0") && m.contains(what), "{what}: {m}");
    }
    assert_eq!((e.pending(), e.active()), (0, 0));
    assert_eq!(e.submit(small).unwrap(), RequestId(0));
}
