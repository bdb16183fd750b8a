//! Shared by tests/fidelity.rs and tests/fidelity_moe.rs: the official trajectories of
//! `trajectories.json` (tools/fidelity), a replay on an engine, and the first difference.
use std::collections::BTreeSet;
use std::path::Path;

use demask::engine::Engine;
use demask::engine::Request;
use serde_json::Value;

pub struct Case {
    pub name: String,
    pub model: String,
    pub prompt: Vec<u32>,
    pub gen_len: u32,
    pub block_len: u32,
    pub policy: String,
    pub cache: String,
    /// Commits of each official forward, as (position, token).
    pub steps: Vec<BTreeSet<(u32, u32)>>,
    pub output: Vec<u32>,
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Reads the meta and cases of a `trajectories.json`.
pub fn load_cases(path: &Path) -> (Value, Vec<Case>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
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
/// The commits (position, token) of every step.
pub type Commits = Vec<BTreeSet<(u32, u32)>>;

pub type Top = Vec<(u32, u32, f32)>;

/// Runs one case on the CPU backend: (commits of each step, each step's top slots, final canvas).
pub fn run(engine: &mut Engine, c: &Case) -> (Commits, Vec<Top>, Vec<u32>) {
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
pub fn first_difference(c: &Case, steps: &[BTreeSet<(u32, u32)>], tops: &[Top], canvas: &[u32]) -> Option<String> {
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
