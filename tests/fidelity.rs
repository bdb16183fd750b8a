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
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use demask::engine::{Device, Engine, EngineOptions, Request};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fidelity")
}

struct Case {
    name: String,
    model: String,
    prompt: Vec<u32>,
    gen_len: u32,
    block_len: u32,
    policy: String,
    cache: String,
    /// Commits of each official forward, as (position, token).
    steps: Vec<BTreeSet<(u32, u32)>>,
    output: Vec<u32>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn load_cases() -> (Value, Vec<Case>) {
    let path = fixtures().join("trajectories.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("trajectories.json parses");
    let cases = doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            model: c["model"].as_str().unwrap().to_string(),
            prompt: ids(&c["prompt"]),
            gen_len: c["gen_len"].as_u64().unwrap() as u32,
            block_len: c["block_len"].as_u64().unwrap() as u32,
            policy: c["policy"].as_str().unwrap().to_string(),
            cache: c["cache"].as_str().unwrap().to_string(),
            steps: c["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_array().unwrap().iter().map(|pt| (pt[0].as_u64().unwrap() as u32, pt[1].as_u64().unwrap() as u32)).collect())
                .collect(),
            output: ids(&c["output"]),
        })
        .collect();
    (doc["meta"].clone(), cases)
}

/// The six most confident eligible slots of a step, (position, candidate, confidence).
type Top = Vec<(u32, u32, f32)>;

/// Runs one case on the CPU backend: (commits of each step, each step's top slots, final canvas).
fn run(engine: &mut Engine, c: &Case) -> (Vec<BTreeSet<(u32, u32)>>, Vec<Top>, Vec<u32>) {
    let req = Request::ids(c.prompt.clone())
        .gen_len(c.gen_len)
        .block_len(c.block_len)
        .policy(c.policy.parse().unwrap())
        .cache(c.cache.parse().unwrap())
        .stop_at_eos(false);
    let (mut steps, mut tops) = (Vec::new(), Vec::new());
    let out = engine
        .generate_with(&[req], &mut |e| {
            steps.push(e.commits.iter().map(|m| (m.pos, m.token)).collect());
            let mut top: Top = (0..e.eligible.len()).map(|i| (e.eligible[i], e.scores.tokens[i], e.scores.conf[i])).collect();
            top.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
            top.truncate(6);
            tops.push(top);
        })
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let mut canvas = c.prompt.clone();
    canvas.extend_from_slice(&out[0].tokens);
    (steps, tops, canvas)
}

/// The first difference between the official trajectory and demask's, or None.
fn first_difference(c: &Case, steps: &[BTreeSet<(u32, u32)>], tops: &[Top], canvas: &[u32]) -> Option<String> {
    for (i, (want, got)) in c.steps.iter().zip(steps).enumerate() {
        if want != got {
            return Some(format!(
                "step {i}: official commits {want:?}, demask {got:?} (demask's most confident (pos, token, conf): {:?})",
                tops[i]
            ));
        }
    }
    if steps.len() != c.steps.len() {
        return Some(format!("official {} steps, demask {}", c.steps.len(), steps.len()));
    }
    if canvas != c.output.as_slice() {
        return Some(format!("final canvas differs: official {:?}, demask {:?}", c.output, canvas));
    }
    None
}

#[test]
fn official_trajectories_reproduced_in_f32() {
    let (meta, mut cases) = load_cases();
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
