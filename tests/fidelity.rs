//! Official-code fidelity: demask's f32 CPU backend must reproduce, token for token and step for
//! step, the trajectories the official decoders produced in f32 on the same small random
//! checkpoints (tests/fixtures/fidelity, made by tools/fidelity/make_fixtures.py):
//! the LLaDA reference `generate`, Fast-dLLM's `generate` / prefix cache / dual cache (schedule
//! and threshold), dKV-Cache-Decode, and Dream's `diffusion_generate` (maskgit_plus,
//! topk_margin, entropy; S = gen_len and gen_len / 4; top-k 50 as its default config gives).
//! Every step's committed (position, token) set, the step count and the final canvas must match,
//! with one documented exception: Fast-dLLM's prefix and dual cache run one more forward after a
//! block whose first (full) step committed every slot of it; that forward commits nothing and
//! demask skips it (same tokens, one forward less). Such empty official steps are dropped from
//! LLaDA-family trajectories and counted. Dream's empty steps are real (its count is 0 on some
//! steps, and the step runs and counts) and are compared as they are.
use std::path::{Path, PathBuf};

use demask::engine::{Device, Engine, EngineOptions};

#[path = "common/fidelity_cases.rs"]
mod cases;
use cases::{first_difference, load_cases, run};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fidelity")
}

#[test]
fn official_trajectories_reproduced_in_f32() {
    let (meta, mut cases) = load_cases(&fixtures().join("trajectories.json"));
    assert!(cases.len() >= 30, "expected the full fixture set, found {} cases", cases.len());
    let opts = EngineOptions { device: Device::Cpu, ..EngineOptions::default() };
    let mut llada = Engine::load(fixtures().join("llada"), opts.clone()).expect("llada fixture checkpoint");
    let mut dream = Engine::load(fixtures().join("dream"), opts).expect("dream fixture checkpoint");
    let mut failures = Vec::new();
    let (mut zero_steps, mut noop_forwards) = (0usize, 0usize);
    for c in cases.iter_mut() {
        if c.model == "llada" {
            let before = c.steps.len();
            c.steps.retain(|s| !s.is_empty());
            noop_forwards += before - c.steps.len();
        }
    }
    for c in &cases {
        let engine = match c.model.as_str() {
            "llada" => &mut llada,
            "dream" => &mut dream,
            m => panic!("{}: unknown fixture model {m}", c.name),
        };
        let (steps, tops, canvas) = run(engine, c);
        zero_steps += steps.iter().filter(|s| s.is_empty()).count();
        match first_difference(c, &steps, &tops, &canvas) {
            Some(d) => failures.push(format!("{} ({} {} {}): {d}", c.name, c.policy, c.cache, c.block_len)),
            None => eprintln!("{}: {} steps identical", c.name, steps.len()),
        }
    }
    for f in &failures {
        eprintln!("MISMATCH {f}");
    }
    eprintln!(
        "fidelity: {} of {} official trajectories reproduced token for token ({} zero-commit Dream steps; \
         {} empty official Fast-dLLM forwards after a block finished in its first step, skipped); fixtures: {meta}",
        cases.len() - failures.len(),
        cases.len(),
        zero_steps,
        noop_forwards
    );
    assert!(failures.is_empty(), "{} of {} trajectories differ", failures.len(), cases.len());
    assert!(zero_steps > 0, "the fixtures should include Dream steps that commit nothing");
}
