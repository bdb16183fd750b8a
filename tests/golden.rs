//! Golden parity: the CPU forward against logits that Hugging Face transformers computed on the
//! same checkpoint (tools/golden/make_golden.py: LlamaForCausalLM for LLaDA,
//! Qwen2ForCausalLM for Dream, f32, bidirectional mask). Each fixture
//! `tests/fixtures/golden-<preset>.safetensors` holds `ids` [L] and `logits` [L, vocab] (raw
//! rows, no Dream shift), with the preset and the checkpoint seed in its metadata; the test
//! rebuilds the same weights in-process with `checkpoint::random_weights` and compares.
//! Dream fixtures also hold `logits_bf16_rope`: the script's plain forward (checked against
//! transformers to ~5e-7) with cos/sin rounded to bf16, as Dream's bf16 run (and demask's GPU)
//! computes; the CPU forward is checked against it in that mode.
//!
//! Fixtures are found in `$DEMASK_FIXTURES`, else `<crate>/tests/fixtures`, else
//! `./tests/fixtures` (the GPU pack's layout). Regenerate them with `tools/golden/run.sh`
//! whenever the random weights of `make-checkpoint` change.
use std::collections::HashMap;
use std::path::PathBuf;

use demask::checkpoint::random_weights;
use demask::cpu::forward::CpuModel;
use demask::cpu::rope::RopeMode;
use demask::ModelConfig;
use safetensors::{Dtype, SafeTensors};

/// f32 against f32 over the same bf16 weights: only the summation order differs (measured
/// about 6e-7), so 1e-4 catches any real deviation (a wrong rope theta, norm eps, bias or
/// mask moves the logits by 1e-2 or more).
const TOL_F32: f32 = 1e-4;

struct Fixture {
    path: PathBuf,
    seed: u64,
    ids: Vec<u32>,
    vocab: usize,
    meta: HashMap<String, String>,
    /// name → [L, vocab] row-major f32 (`logits`, and `logits_bf16_rope` for Dream).
    logits: HashMap<String, Vec<f32>>,
}

fn fixture_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEMASK_FIXTURES") {
        return PathBuf::from(d);
    }
    let built = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"));
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    }
}

/// Reads and checks one fixture; `None` (with the reason printed) only when the file is absent.
fn load_fixture(preset: &str) -> Option<Fixture> {
    let path = fixture_dir().join(format!("golden-{preset}.safetensors"));
    if !path.is_file() {
        eprintln!(
            "golden: SKIP {preset}: {} is absent (make it with tools/golden/run.sh target/release/demask)",
            path.display()
        );
        return None;
    }
    let p = path.display().to_string();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {p}: {e}"));
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap_or_else(|e| panic!("{p}: {e:?}"));
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{p}: {e:?}"));
    assert_eq!(meta.get("format").map(String::as_str), Some("demask-golden-v1"), "{p}: format");
    assert_eq!(meta.get("preset").map(String::as_str), Some(preset), "{p}: preset");
    let seed: u64 = meta
        .get("seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{p}: metadata lacks a numeric seed"));

    let ids_t = st.tensor("ids").unwrap_or_else(|e| panic!("{p}: ids: {e:?}"));
    assert_eq!(ids_t.shape().len(), 1, "{p}: ids must be 1-D");
    let ids: Vec<u32> = match ids_t.dtype() {
        Dtype::I64 => ids_t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        Dtype::I32 => ids_t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        other => panic!("{p}: ids dtype {other:?} (expected I64 or I32)"),
    };
    let mut logits = HashMap::new();
    let mut vocab = 0;
    for name in ["logits", "logits_bf16_rope"] {
        let Ok(t) = st.tensor(name) else {
            assert_ne!(name, "logits", "{p}: no `logits` tensor");
            continue;
        };
        assert_eq!(t.dtype(), Dtype::F32, "{p}: {name} dtype");
        assert_eq!(t.shape().len(), 2, "{p}: {name} must be [L, vocab]");
        assert_eq!(t.shape()[0], ids.len(), "{p}: {name} rows vs ids");
        vocab = t.shape()[1];
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert!(v.iter().all(|x| x.is_finite()), "{p}: {name} must be finite");
        logits.insert(name.to_string(), v);
    }
    Some(Fixture { path, seed, ids, vocab, meta, logits })
}

/// Compares `got` with `want` ([rows, vocab]): max|d| / max|ref| must be ≤ `tol`, and each
/// row's argmax (ties to the lowest id) must agree unless the reference's gap between the two
/// ids is within 2·tol·max|ref| (a near-tie, counted). Prints the measured error.
fn compare(label: &str, got: &[f32], want: &[f32], vocab: usize, tol: f32) {
    assert_eq!(got.len(), want.len(), "{label}: CPU forward returned {} values, want {}", got.len(), want.len());
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (mut max_d, mut worst) = (0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if !(d <= max_d) {
            max_d = d;
            worst = i;
        }
    }
    let rel = max_d / max_ref;
    let rows = want.len() / vocab;
    let (mut agree, mut near_ties, mut bad) = (0, 0, Vec::new());
    for r in 0..rows {
        let (g, w) = (&got[r * vocab..(r + 1) * vocab], &want[r * vocab..(r + 1) * vocab]);
        let (ag, aw) = (argmax(g), argmax(w));
        if ag == aw {
            agree += 1;
        } else if w[aw] - w[ag] <= 2.0 * tol * max_ref {
            near_ties += 1;
        } else {
            bad.push((r, ag, aw, w[aw] - w[ag]));
        }
    }
    println!(
        "{label}: max|d| {max_d:.3e} at [{}, {}], max|ref| {max_ref:.3e}, max|d|/max|ref| {rel:.3e} (tol {tol:.0e}); \
         argmax agrees on {agree}/{rows} rows, {near_ties} near-ties",
        worst / vocab,
        worst % vocab,
    );
    if !(rel <= tol) {
        let bad_elems = got.iter().zip(want).enumerate().filter(|(_, (g, w))| !((*g - *w).abs() <= tol * max_ref));
        for (i, (g, w)) in bad_elems.take(8) {
            eprintln!("  mismatch [{}, {}]: got {g}, want {w}", i / vocab, i % vocab);
        }
        panic!("{label}: max|d|/max|ref| = {rel:.3e} exceeds {tol:.0e}");
    }
    assert!(bad.is_empty(), "{label}: argmax differs beyond near-ties (row, got, want, gap): {bad:?}");
}

/// Lowest index of the maximum.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Runs the CPU forward on weights rebuilt from (preset, seed) and compares with the fixture:
/// `logits` (transformers in f32: f32 cos/sin for both architectures, as the CPU forward) at
/// TOL_F32, and `logits_bf16_rope` (when present) against the CPU forward with cos/sin rounded
/// to bf16 (`RopeMode::Dream`, what the GPU's bf16 Dream forward does), also at TOL_F32.
fn check(preset: &str) {
    let Some(fx) = load_fixture(preset) else { return };
    let cfg = ModelConfig::preset(preset).expect("preset");
    assert_eq!(fx.vocab, cfg.vocab, "{}: vocab differs from the preset", fx.path.display());
    assert!(fx.ids.iter().all(|&t| (t as usize) < cfg.vocab), "fixture ids must be < vocab");
    let weights = random_weights(&cfg, fx.seed);
    let mut model = CpuModel::new(&weights).expect("CpuModel::new");
    let got = model.forward_full(&[fx.ids.clone()]).expect("CPU forward");
    println!(
        "golden {preset}: seed {}, L {}, vocab {}; reference: {}",
        fx.seed,
        fx.ids.len(),
        fx.vocab,
        fx.meta.get("reference").map(String::as_str).unwrap_or("?")
    );
    compare(&format!("golden {preset} vs transformers"), &got, &fx.logits["logits"], fx.vocab, TOL_F32);
    match fx.logits.get("logits_bf16_rope") {
        Some(want) => {
            model.set_rope_mode(RopeMode::Dream);
            let got = model.forward_full(&[fx.ids.clone()]).expect("CPU forward, bf16 cos/sin");
            compare(&format!("golden {preset} vs plain forward, bf16 cos/sin"), &got, want, fx.vocab, TOL_F32)
        }
        None if fx.meta.get("arch").map(String::as_str) == Some("dream") => {
            println!("golden {preset}: fixture has no logits_bf16_rope (older make_golden.py); only the HF check ran")
        }
        None => {}
    }
}

#[test]
fn golden_tiny_llada() {
    check("tiny-llada");
}

#[test]
fn golden_tiny_dream() {
    check("tiny-dream");
}
