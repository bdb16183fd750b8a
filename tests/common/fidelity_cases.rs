//! Shared by tests/fidelity.rs, tests/fidelity_moe.rs and tests/fidelity_llada2.rs: the
//! official trajectories of `trajectories.json` (tools/fidelity), a replay on an engine, the
//! first difference, and the golden forward of `golden.safetensors` with its error measure.
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
    /// Whether the official run stopped at EOS (`stop_at_eos`, absent: off) and, if so, with
    /// which EOS id (`eos_id`, absent: the checkpoint's).
    pub stop_at_eos: bool,
    #[allow(dead_code)] // (only the LLaDA2 fixtures name their own EOS)
    pub eos_id: Option<u32>,
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
            stop_at_eos: c["stop_at_eos"].as_bool().unwrap_or(false),
            eos_id: c["eos_id"].as_u64().map(|e| e as u32),
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

/// Runs one case on the CPU backend: (commits of each step, each step's top slots, final
/// canvas = the prompt and the output). The engine's checkpoint must have the case's EOS id.
pub fn run(engine: &mut Engine, c: &Case) -> (Commits, Vec<Top>, Vec<u32>) {
    let req = Request::ids(c.prompt.clone())
        .gen_len(c.gen_len)
        .block_len(c.block_len)
        .policy(c.policy.parse().unwrap())
        .cache(c.cache.parse().unwrap())
        .stop_at_eos(c.stop_at_eos);
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

/// The golden forward of a fixture directory: (input ids, official logits `[T, vocab]`).
#[allow(dead_code)]
pub fn golden(dir: &Path, vocab: usize) -> (Vec<u32>, Vec<f32>) {
    let path = dir.join("golden.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden.safetensors parses");
    let ids = st.tensor("input_ids").expect("input_ids");
    assert_eq!(ids.dtype(), safetensors::Dtype::I64);
    let ids: Vec<u32> =
        ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    let logits = st.tensor("logits").expect("logits");
    assert_eq!(logits.dtype(), safetensors::Dtype::F32);
    assert_eq!(logits.shape(), &[ids.len(), vocab]);
    let logits = logits.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (ids, logits)
}

/// Largest |got − want| relative to max(|want|, 1), and where.
#[allow(dead_code)]
pub fn worst(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .enumerate()
        .fold((0.0, 0), |(m, at), (i, e)| if e > m { (e, i) } else { (m, at) })
}
