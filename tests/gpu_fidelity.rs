//! The official trajectories of tests/fixtures/fidelity on the GPU (bf16), per step: DESIGN's
//! cross-precision rule. For every fixture case decoded without a KV cache (LLaDA `generate`,
//! Fast-dLLM `generate`, Dream `diffusion_generate`), each official step's input canvas is
//! given to `GpuStepper` and to the f32 CPU backend; the GPU's committed (position, token) set
//! must equal the official one, except near-ties at the cut-off (a CPU confidence within
//! `conf_tol` of a cut value, or two argmax logits within bf16 noise), which are counted and
//! printed. The CPU's must equal the official one exactly. Skips without a GPU.
#![cfg(feature = "cuda")]

mod common;

use std::path::{Path, PathBuf};

use common::{conf_tol, sets_differ_only_at_cut};
use demask::batch::RowBatch;
use demask::config::ModelConfig;
use demask::cpu::forward::CpuModel;
use demask::decode::gpu::GpuStepper;
use demask::decode::policy::{Policy, StepCtx};
use demask::decode::sampling::Sampling;
use demask::decode::step::{Commit, SeqWork, StepBackend};
use demask::gpu::test_gpu;
use demask::model::Capacity;
use demask::weights::HostWeights;
use serde_json::Value;

/// `$DEMASK_FIXTURES/fidelity` (the packed GPU suite sets it: the binary may run far from the
/// tree it was built in), else `<crate>/tests/fixtures/fidelity`.
fn fixtures() -> PathBuf {
    std::env::var_os("DEMASK_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join("fidelity")
}

fn sorted(v: &[Commit]) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = v.iter().map(|c| (c.pos, c.token)).collect();
    v.sort();
    v
}

/// One step's work on `canvas` (prompt `p` tokens, blocks of `block`), with `block_step` steps
/// already taken in the current block and `block_masked` masked slots at its start.
fn work_for(cfg: &ModelConfig, canvas: &[u32], p: usize, block: usize, policy: Policy, block_step: u32, block_masked: u32) -> (RowBatch, SeqWork) {
    let gen = canvas.len() - p;
    let b = (0..gen / block).find(|&b| canvas[p + b * block..p + (b + 1) * block].contains(&cfg.mask_id)).expect("a masked block");
    let eligible: Vec<u32> = (p + b * block..p + (b + 1) * block).filter(|&i| canvas[i] == cfg.mask_id).map(|i| i as u32).collect();
    let masked = eligible.len() as u32;
    let mut batch = RowBatch::full(&[canvas.to_vec()]);
    batch.logit_rows.clear();
    let mut logit_index = Vec::new();
    for &pos in &eligible {
        let row = if cfg.shifted() { pos.max(1) - 1 } else { pos };
        logit_index.push(batch.logit_rows.len() as u32);
        batch.logit_rows.push(row);
    }
    let w = SeqWork {
        eligible,
        current: Vec::new(),
        logit_index,
        policy,
        ctx: StepCtx { step: block_step, block_masked, masked, block_len: block as u32 },
        sampling: Sampling::default().for_policy(&policy),
        seed: 0,
        seq_id: 0,
        step: 0,
    };
    (batch, w)
}

#[test]
fn official_steps_on_the_gpu_bf16() {
    let Some(gpu) = test_gpu() else { return };
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("trajectories.json")).unwrap()).unwrap();
    let (mut steps, mut same, mut near, mut cases_run) = (0usize, 0usize, 0usize, 0usize);
    let mut bad = Vec::new();
    for model in ["llada", "dream"] {
        let dir = fixtures().join(model);
        let cfg = ModelConfig::from_dir(&dir).unwrap();
        let weights = HostWeights::load(&dir).unwrap();
        let cpu = CpuModel::new(&weights).unwrap();
        let cap = Capacity { rows: 128, logit_rows: 64, cache_rows: 128, seqs: 1 };
        let mut stepper = GpuStepper::new(gpu.clone(), &weights, cap).unwrap();
        for c in doc["cases"].as_array().unwrap() {
            if c["model"] != model || c["cache"] != "none" {
                continue;
            }
            cases_run += 1;
            let name = c["name"].as_str().unwrap();
            let policy: Policy = c["policy"].as_str().unwrap().parse().unwrap();
            let block = c["block_len"].as_u64().unwrap() as usize;
            let mut canvas: Vec<u32> = c["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let p = canvas.len();
            canvas.extend(std::iter::repeat_n(cfg.mask_id, c["gen_len"].as_u64().unwrap() as usize));
            let (mut cur_block, mut block_step, mut block_masked) = (usize::MAX, 0u32, 0u32);
            for (k, st) in c["steps"].as_array().unwrap().iter().enumerate() {
                let official: Vec<(u32, u32)> = {
                    let mut v: Vec<(u32, u32)> = st.as_array().unwrap().iter().map(|pt| (pt[0].as_u64().unwrap() as u32, pt[1].as_u64().unwrap() as u32)).collect();
                    v.sort();
                    v
                };
                if !canvas[p..].contains(&cfg.mask_id) {
                    assert!(official.is_empty(), "{name} step {k}: commits after the canvas is full");
                    continue;
                }
                let b = (0..(canvas.len() - p) / block).find(|&b| canvas[p + b * block..p + (b + 1) * block].contains(&cfg.mask_id)).unwrap();
                if b != cur_block {
                    cur_block = b;
                    block_step = 0;
                    block_masked = canvas[p + b * block..p + (b + 1) * block].iter().filter(|&&t| t == cfg.mask_id).count() as u32;
                }
                let (batch, w) = work_for(&cfg, &canvas, p, block, policy, block_step, block_masked);
                let mut cache = cpu.new_cache(batch.cache_rows_needed());
                let logits = cpu.forward(&batch, &mut cache).unwrap();
                let (cpu_commits, scores) = demask::decode::cpu::score_and_select(&logits, cfg.vocab, cfg.mask_id, std::slice::from_ref(&w)).unwrap();
                assert_eq!(sorted(&cpu_commits[0]), official, "{name} step {k}: the f32 CPU step differs from the official one");
                stepper.load_canvas(0, &canvas).unwrap();
                let (got, _) = stepper.step_scored(&batch, std::slice::from_ref(&w)).unwrap();
                steps += 1;
                let g = sorted(&got[0]);
                if g == official {
                    same += 1;
                } else {
                    let conf = &scores[0].conf;
                    let sets_ok = !cpu_commits[0].is_empty() && sets_differ_only_at_cut(&w, &cpu_commits[0], &got[0], conf);
                    let tokens_ok = cpu_commits[0].iter().all(|cc| {
                        got[0].iter().find(|gc| gc.pos == cc.pos).is_none_or(|gc| {
                            let li = w.logit_index[w.eligible.iter().position(|&q| q == cc.pos).unwrap()] as usize;
                            let row = &logits[li * cfg.vocab..(li + 1) * cfg.vocab];
                            let (a, b2) = (row[gc.token as usize], row[cc.token as usize]);
                            gc.token == cc.token || (a - b2).abs() <= 0.05 * (1.0 + b2.abs())
                        })
                    });
                    if sets_ok && tokens_ok {
                        near += 1;
                        eprintln!("{name} step {k}: near-tie: official {official:?}, gpu {g:?} (tolerance {:.3})", conf_tol(conf[0]));
                    } else {
                        bad.push(format!("{name} step {k}: official {official:?}, gpu {g:?}"));
                    }
                }
                for &(pos, tok) in &official {
                    canvas[pos as usize] = tok;
                }
                block_step += 1;
            }
        }
    }
    for b in &bad {
        eprintln!("DIFFERS {b}");
    }
    eprintln!(
        "gpu fidelity (bf16, per step): {cases_run} uncached cases, {steps} steps: {same} identical to the official f32 step, {near} near-ties at the cut-off, {} beyond tolerance",
        bad.len()
    );
    assert!(cases_run >= 20, "expected the uncached fixture cases, ran {cases_run}");
    assert!(bad.is_empty(), "{} GPU steps differ beyond the near-tie rule", bad.len());
    // bf16 vs f32 on these small random models: 65 of 474 steps (13.7%) were near-ties on the H100
    // (2026-12-06); a GPU path that merely stayed inside the broad tolerance would exceed this.
    assert!(near * 5 <= steps, "too many near-ties: {near} of {steps}");
}
