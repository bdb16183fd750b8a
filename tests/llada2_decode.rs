//! LLaDA2 decoding through the engine (DESIGN.md §8; the official trajectories themselves are
//! in tests/fidelity_llada2.rs): the aligned layout under every cache scheme (refreshing every
//! step equals `none`; `dual` and `prefix` are exact under block-causal attention, so they
//! equal `none` outright), `edit:` with every scheme and on a `Gen`-layout model, the block
//! length LLaDA2 requires, `llada2:τ,S`'s steps capped at gen_len, and the named errors.
mod common;

use common::{cpu_engine, prompt};
use demask::engine::{Device, Engine, EngineOptions, Output, Request};
use demask::weights::HostWeights;
use rand::rngs::StdRng;
use rand::SeedableRng;

const SCHEMES: [&str; 8] = ["none", "prompt", "prefix", "dual", "dkv:1", "dkv:3", "dkv-greedy", "dkv-greedy:0"];

/// A LLaDA2 request: default block (the model's 32), stop-at-EOS off.
fn l2(prompt: &[u32], gen: u32, policy: &str, cache: &str) -> Request {
    Request::ids(prompt).gen_len(gen).policy(policy.parse().unwrap()).cache(cache.parse().unwrap()).stop_at_eos(false)
}

fn complete(o: &Output, gen: usize, mask: u32, what: &str) {
    assert_eq!(o.tokens.len(), gen, "{what}: the output is x[P, P + G)");
    assert!(o.tokens.iter().all(|&t| t != mask), "{what}: a slot is still masked");
    assert_eq!(o.rows_per_step.len(), o.steps as usize, "{what}");
}

/// The peaky fixture checkpoint of tests/fixtures/fidelity/llada2 (thresholds fire there).
fn fixture_engine() -> Engine {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fidelity/llada2");
    let w = HostWeights::load(&dir).expect("LLaDA2 fixture checkpoint");
    Engine::from_weights(w, None, EngineOptions { device: Device::Cpu, ..EngineOptions::default() }).unwrap()
}

#[test]
fn every_scheme_refreshed_every_step_equals_none_on_the_aligned_layout() {
    let mut rng = StdRng::seed_from_u64(21);
    let mut e = cpu_engine("tiny-llada2", EngineOptions::default());
    let mask = e.config().mask_id;
    // Few steps per block (random weights: probabilities near 1/512): τ = 0.001 passes many
    // slots, S = 4 takes 8 a step, τm = 0 takes every masked slot and τe = 0 edits whatever
    // differs, in 1 or 2 post-mask steps.
    for (p, policy) in [(19, "llada2:0.5,4"), (45, "edit:0,0,1"), (1, "edit:0,0.002,2"), (70, "threshold:0.001")] {
        let pr = prompt(&mut rng, p);
        let base = e.generate(&[l2(&pr, 24, policy, "none")]).unwrap().remove(0);
        complete(&base, 24, mask, policy);
        // `none` runs the whole padded canvas, ceil((P + 24) / 32) blocks, every step.
        let rows = (p + 24).div_ceil(32) * 32;
        assert!(base.rows_per_step.iter().all(|&r| r as usize == rows), "{policy}: {:?}", base.rows_per_step);
        for scheme in SCHEMES {
            let o = e.generate(&[l2(&pr, 24, policy, scheme).testing_refresh_every_step(true)]).unwrap().remove(0);
            assert_eq!((&o.tokens, &o.commits_per_step), (&base.tokens, &base.commits_per_step), "{policy} {scheme}");
            // Every scheme also runs to completion without the refresh, the first step full.
            let o = e.generate(&[l2(&pr, 24, policy, scheme)]).unwrap().remove(0);
            complete(&o, 24, mask, &format!("{policy} {scheme}"));
            assert_eq!(o.rows_per_step[0] as usize, rows, "{policy} {scheme}");
        }
    }
}

/// Block-causal attention makes `dual` (and `prefix`) exact: no row of an earlier block sees a
/// later one, and the current block's rows are recomputed every step. So on the peaky fixture
/// model, where thresholds and edits fire, they decode exactly as `none` while running fewer rows.
#[test]
fn dual_and_prefix_are_exact_for_llada2() {
    let mut rng = StdRng::seed_from_u64(22);
    let mut e = fixture_engine();
    for (p, policy) in [(17, "llada2:0.9,8"), (45, "edit:0.9,0.98,16"), (32, "threshold:0.9"), (70, "edit:0.7,0.5,4")] {
        let pr: Vec<u32> = prompt(&mut rng, p).into_iter().map(|t| t % 380).collect();
        let base = e.generate(&[l2(&pr, 60, policy, "none")]).unwrap().remove(0);
        for scheme in ["dual", "prefix"] {
            let o = e.generate(&[l2(&pr, 60, policy, scheme)]).unwrap().remove(0);
            assert_eq!(o.tokens, base.tokens, "{policy} {scheme}: an exact cache");
            assert_eq!(o.commits_per_step, base.commits_per_step, "{policy} {scheme}");
            let rows: u32 = o.rows_per_step.iter().sum();
            assert!(rows < base.rows_per_step.iter().sum::<u32>(), "{policy} {scheme}: the cache saved no row");
        }
    }
}

#[test]
fn llada2_block_length_is_the_models_and_gen_len_need_not_divide() {
    let mut e = cpu_engine("tiny-llada2", EngineOptions::default());
    let r = Request::ids(vec![1, 2, 3]).gen_len(16).block_len(8).policy("threshold:0.9".parse().unwrap());
    let err = e.generate(&[r]).unwrap_err().to_string();
    assert!(err.contains("block_len 8") && err.contains("32") && err.contains("block_length"), "{err}");
    // The default: blocks of 32 at absolute positions; gen_len 20 (not a multiple).
    let o = e.generate(&[Request::ids(vec![1, 2, 3]).gen_len(20).stop_at_eos(false)]).unwrap().remove(0);
    assert_eq!(o.tokens.len(), 20);
    let o = e.generate(&[Request::ids(vec![1, 2, 3]).gen_len(20).block_len(32).stop_at_eos(false)]).unwrap().remove(0);
    assert_eq!(o.tokens.len(), 20);
    // The padded canvas must fit the context (1024): 1000 + 20 fits in 32 blocks, 1000 + 30 does
    // not (checked at submit; nothing decodes).
    let id = e.submit(Request::ids(vec![1; 1000]).gen_len(20)).unwrap();
    assert!(e.cancel(id));
    let err = e.submit(Request::ids(vec![1; 1000]).gen_len(30)).unwrap_err().to_string();
    assert!(err.contains("padded to whole blocks of 32: 1056") && err.contains("context of 1024"), "{err}");
    // schedule:S is checked against the first decoded block's masked slots (32 - 19 = 13 here).
    let r = Request::ids(vec![1; 19]).gen_len(40).policy("schedule:16".parse().unwrap());
    let err = e.submit(r).unwrap_err().to_string();
    assert!(err.contains("block 0 has only 13 masked slots"), "{err}");
}

/// The official `generate` runs min(steps, gen_length) steps per block: with gen_len 8 and
/// S = 32, n is 32 / 8 = 4 per step (nothing passes τ = 1 on random weights).
#[test]
fn llada2_steps_are_capped_at_gen_len() {
    let mut e = cpu_engine("tiny-llada2", EngineOptions::default());
    let o = e.generate(&[l2(&[5; 64], 8, "llada2:1,32", "none")]).unwrap().remove(0);
    assert_eq!(o.commits_per_step, [4; 8], "32 slots (8 output, 24 padding) in 8 steps of 4");
    let o = e.generate(&[l2(&[5; 64], 64, "llada2:1,32", "none")]).unwrap().remove(0);
    assert_eq!(o.commits_per_step, [1; 64], "no cap: 32 steps of 1 per block");
}

/// `edit:` on a model with the ordinary layout (tiny-llada): it runs, re-writes committed
/// slots with τe = 0, and a budget of 0 takes exactly one step per masked slot when nothing
/// passes τm = 1.
#[test]
fn edit_runs_on_the_gen_layout_too() {
    let mut e = cpu_engine("tiny-llada", EngineOptions::default());
    let r = |policy: &str| Request::ids(vec![3, 4, 5]).gen_len(16).block_len(8).policy(policy.parse().unwrap()).stop_at_eos(false);
    let o = e.generate(&[r("edit:1,1,0")]).unwrap().remove(0);
    assert_eq!(o.commits_per_step, [1; 16], "top-1 per step, no edit (τe = 1), no post-mask step");
    let mut steps = Vec::new();
    let o = e.generate_with(&[r("edit:0.5,0,3")], &mut |ev| steps.push((ev.eligible.len(), ev.commits.len()))).unwrap().remove(0);
    assert!(o.tokens.iter().all(|&t| t != e.config().mask_id));
    assert!(steps.iter().all(|&(scored, _)| scored == 8), "edit scores every slot of the block: {steps:?}");
    assert!(steps.iter().any(|&(_, c)| c > 1), "τe = 0 re-writes committed slots: {steps:?}");
    assert!(o.steps as usize <= 16 + 2 * 3, "at most 3 post-mask steps per block: {}", o.steps);
    for (bad, what) in [("edit:0.5,0.5", "expected edit:"), ("edit:0.5,2,1", "edit threshold 2 must lie in [0, 1]")] {
        let err = bad.parse::<demask::decode::Policy>().unwrap_err().to_string();
        assert!(err.contains(what), "{bad}: {err}");
    }
    let p = demask::decode::Policy::Edit { tau_m: f32::NAN, tau_e: 0.5, post: 1 };
    let err = e.generate(&[Request::ids(vec![3]).gen_len(8).policy(p)]).unwrap_err().to_string();
    assert!(err.contains("mask threshold must lie in [0, 1]"), "{err}");
}
