//! LLaDA2.0 against the official code (tests/fixtures/fidelity/llada2, made by
//! tools/fidelity/make_llada2_fixtures.py from inclusionAI/dFactory's LLaDA2 modeling file in
//! f32 on the CPU with SDPA and the official `generate`'s block-causal mask): demask's f32 CPU
//! forward must give the official logits within 1e-4 relative over two full blocks and a
//! partial third, and a block step against cached earlier blocks (DESIGN.md §8: their K/V are
//! exact under block-causal attention) must give the same logits. The CPU backend must
//! reproduce, token for token and step for step, every official trajectory: LLaDA2.0's
//! `generate` with `llada2:τ,S` (argmax; prompts of 1, 17, 45, 64, 70 and 32 tokens, so the
//! first decoded block holds the prompt's tail and the canvas is padded to whole blocks; the
//! EOS stop off and on, the output cut after the first EOS), and LLaDA2.1's token editing with
//! `edit:τm,τe,P` (SGLang's JointThreshold step in the official block loop). The golden test
//! has teeth: zeroing the f32 expert bias (routing changes), full RoPE instead of partial, or
//! bidirectional attention are far outside the tolerance.
use std::path::{Path, PathBuf};

use demask::batch::{RowBatch, SeqSpan};
use demask::cpu::forward::CpuModel;
use demask::engine::{Device, Engine, EngineOptions};
use demask::weights::HostWeights;
use demask::decode::Policy;
use demask::Arch;

#[path = "common/fidelity_cases.rs"]
mod cases;
use cases::{first_difference, load_cases, run, worst, Case};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fidelity/llada2")
}

/// The golden forward: (input ids, official logits `[T, 384]`).
fn golden() -> (Vec<u32>, Vec<f32>) {
    cases::golden(&fixture(), 384)
}

fn load() -> HostWeights {
    let w = HostWeights::load(&fixture()).expect("LLaDA2 fixture checkpoint");
    let l2 = w.cfg.llada2.clone().expect("the fixture is LLaDA2");
    assert_eq!(w.cfg.arch, Arch::Llada2);
    assert_eq!((l2.first_k_dense, l2.n_group, l2.topk_group, l2.rotary_dim, l2.block), (1, 4, 2, 64, 32));
    assert_eq!((w.cfg.n_heads, w.cfg.n_kv_heads), (2, 1), "GQA in the packed QKV");
    assert!(w.layers[0].moe.is_none() && w.layers[1].moe.is_some());
    w
}

#[test]
fn cpu_forward_matches_official_logits() {
    let (ids, want) = golden();
    let w = load();
    let bias = &w.layers[1].moe.as_ref().unwrap().expert_bias;
    assert!(bias.iter().any(|&b| half::bf16::from_f32(b).to_f32() != b), "the fixture's bias is not bf16-exact");
    let model = CpuModel::new(&w).unwrap();
    let got = model.forward_full(std::slice::from_ref(&ids)).unwrap();
    let (err, at) = worst(&got, &want);
    let vocab = w.cfg.vocab;
    eprintln!("golden logits: worst relative error {err:e} at row {}, token {}", at / vocab, at % vocab);
    assert!(err <= 1e-4, "row {} token {}: demask {} official {}", at / vocab, at % vocab, got[at], want[at]);
    let argmax = |l: &[f32]| l.iter().enumerate().fold(0, |b, (i, &v)| if v > l[b] { i } else { b });
    for r in 0..ids.len() {
        assert_eq!(argmax(&got[r * vocab..(r + 1) * vocab]), argmax(&want[r * vocab..(r + 1) * vocab]), "row {r}");
    }
}

/// Each piece of LLaDA2's semantics moves the logits far outside the tolerance when removed.
#[test]
fn golden_test_has_teeth() {
    let (ids, want) = golden();
    let base = load();
    let err_of = |w: &HostWeights| {
        let got = CpuModel::new(w).unwrap().forward_full(std::slice::from_ref(&ids)).unwrap();
        worst(&got, &want).0
    };
    let mut no_bias = base.clone();
    for l in no_bias.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        l.expert_bias.iter_mut().for_each(|b| *b = 0.0);
    }
    let mut full_rope = base.clone();
    full_rope.cfg.llada2.as_mut().unwrap().rotary_dim = 128;
    let mut bidirectional = base.clone();
    bidirectional.cfg.llada2.as_mut().unwrap().block = 1024;
    let mut no_shared = base.clone();
    for l in no_shared.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        l.shared_down.iter_mut().for_each(|x| *x = half::bf16::ZERO);
    }
    for (what, w) in [("no expert bias", no_bias), ("full RoPE", full_rope), ("bidirectional", bidirectional), ("no shared expert", no_shared)] {
        let e = err_of(&w);
        eprintln!("{what}: worst relative error {e:e}");
        assert!(e > 1e-2, "{what}: {e} is within reach of the tolerance");
    }
}

/// Blocks 0-1 in one forward that fills the cache, then block 2's rows alone against it: the
/// official logits of block 2, because no earlier row can see a later block.
#[test]
fn block_step_over_cached_blocks_matches_official_logits() {
    let (ids, want) = golden();
    let model = CpuModel::new(&load()).unwrap();
    let vocab = model.cfg.vocab;
    let mut cache = model.new_cache(ids.len());
    let prefix = model.forward(&RowBatch::full(&[ids[..64].to_vec()]), &mut cache).unwrap();
    let (err, _) = worst(&prefix, &want[..64 * vocab]);
    assert!(err <= 1e-4, "prefix blocks: {err}");
    let n = ids.len() - 64;
    let step = RowBatch {
        tokens: ids[64..].to_vec(),
        positions: (64..ids.len() as u32).collect(),
        seqs: vec![SeqSpan { row_start: 0, row_count: n as u32, cache_base: 0, kv_len: ids.len() as u32 }],
        logit_rows: (0..n as u32).collect(),
    };
    let got = model.forward(&step, &mut cache).unwrap();
    let (err, at) = worst(&got, &want[64 * vocab..]);
    eprintln!("cached block step: worst relative error {err:e}");
    assert!(err <= 1e-4, "row {} token {}: {} vs {}", 64 + at / vocab, at % vocab, got[at], want[64 * vocab + at]);
}

/// An engine on the fixture checkpoint whose EOS id is `eos` (the fixtures make EOS likely by
/// naming a token the decode produces as the EOS of a case; the end-of-turn id follows it).
fn engine_with_eos(eos: Option<u32>) -> Engine {
    let mut w = HostWeights::load(&fixture()).expect("LLaDA2 fixture checkpoint");
    if let Some(e) = eos {
        w.cfg.eos_id = e;
        w.cfg.eot_id = e;
    }
    Engine::from_weights(w, None, EngineOptions { device: Device::Cpu, ..EngineOptions::default() }).unwrap()
}

/// Replays every case of `cases` and returns the failures (none expected).
fn replay(cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        assert_eq!((c.model.as_str(), c.block_len), ("llada2", 32), "{}", c.name);
        let mut engine = engine_with_eos(c.eos_id);
        let (steps, tops, canvas) = run(&mut engine, c);
        match first_difference(c, &steps, &tops, &canvas) {
            None => eprintln!("{}: {} steps identical", c.name, steps.len()),
            Some(d) => failures.push(format!("{}: {d}", c.name)),
        }
    }
    failures
}

#[test]
fn official_llada2_generate_trajectories_reproduced() {
    let (meta, cases) = load_cases(&fixture().join("trajectories.json"));
    let cases: Vec<Case> = cases.into_iter().filter(|c| c.policy.starts_with("llada2:")).collect();
    assert!(cases.len() >= 16, "expected the LLaDA2.0 fixture set, found {}", cases.len());
    let failures = replay(&cases);
    eprintln!("meta: {meta}");
    assert!(failures.is_empty(), "{failures:#?}");
    // Both halves of the rule are exercised: steps committing more than the schedule's n
    // (threshold) and steps committing exactly n below the threshold.
    assert!(cases.iter().any(|c| c.steps.iter().any(|s| s.len() > 1)));
    assert!(cases.iter().any(|c| c.steps.len() >= 8), "a case with many small steps");
    // A case where nothing passes τ: the even split of 32 over S, remainder first (7,7,6,6,6).
    assert!(cases.iter().any(|c| c.steps.iter().map(|s| s.len()).collect::<Vec<_>>() == [7, 7, 6, 6, 6]));
    // The layout: prompts that are not a multiple of 32 (the first block holds their tail),
    // canvases padded past P + G (commits beyond it), steps capped at gen_len (P 45, G 20, S 32).
    let odd: Vec<usize> = cases.iter().map(|c| c.prompt.len()).filter(|p| p % 32 != 0).collect();
    for p in [1, 17, 45, 70] {
        assert!(odd.contains(&p), "a prompt of {p} tokens");
    }
    assert!(cases.iter().any(|c| c.steps.iter().flatten().any(|&(pos, _)| pos as usize >= c.prompt.len() + c.gen_len as usize)));
    assert!(cases.iter().any(|c| c.gen_len < 32 && c.policy.ends_with(",32") && c.steps.len() > c.gen_len as usize / 2));
    // The EOS stop: cases that stop early and cut their output after an EOS, and one with the
    // stop on whose EOS never comes (the full output).
    let stopped = |c: &Case| c.stop_at_eos && c.output.len() < c.prompt.len() + c.gen_len as usize;
    assert!(cases.iter().filter(|c| stopped(c)).count() >= 3, "cases stopped by EOS");
    assert!(cases.iter().any(|c| c.stop_at_eos && !stopped(c)));
}

/// The positions of `c`'s commits that re-write a slot an earlier step committed (edits).
fn edits(c: &Case) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    let mut n = 0;
    for s in &c.steps {
        n += s.iter().filter(|&&(p, _)| seen.contains(&p)).count();
        seen.extend(s.iter().map(|&(p, _)| p));
    }
    n
}

#[test]
fn official_llada2_1_edit_trajectories_reproduced() {
    let (meta, cases) = load_cases(&fixture().join("trajectories.json"));
    let cases: Vec<Case> = cases.into_iter().filter(|c| c.policy.starts_with("edit:")).collect();
    assert!(cases.len() >= 8, "expected the LLaDA2.1 edit fixture set, found {}", cases.len());
    assert!(meta["sglang"].is_string(), "the edit rule's source is recorded: {meta}");
    let failures = replay(&cases);
    assert!(failures.is_empty(), "{failures:#?}");
    // Every part of the rule is exercised: edits (also with τe = 0), blocks that end on a
    // step that changes nothing (an empty step), budgets of 0 (no post-mask step) and of 4,
    // odd prompts and the EOS stop.
    let edit = |c: &Case| match c.policy.parse() {
        Ok(Policy::Edit { tau_m, tau_e, post }) => (tau_m, tau_e, post),
        other => panic!("{}: {other:?}", c.name),
    };
    assert!(cases.iter().filter(|c| edits(c) > 0).count() >= 6, "cases with edits");
    assert!(cases.iter().any(|c| edit(c).1 == 0.0 && edits(c) > 0), "τe = 0 edits");
    assert!(cases.iter().any(|c| c.steps.iter().any(|s| s.is_empty())), "a quiet step ending a block");
    assert!(cases.iter().any(|c| edit(c).2 == 0) && cases.iter().any(|c| edit(c).2 == 4), "budgets 0 and 4");
    assert!(cases.iter().any(|c| c.prompt.len() % 32 != 0 && c.stop_at_eos && c.output.len() < c.prompt.len() + c.gen_len as usize));
}

/// The official trajectories again with the KV caches that are exact under block-causal
/// attention (DESIGN.md §8): `block` (the current block's rows; the first step prefills the
/// prompt with the first block, a block's first step also rewrites the finished block with its
/// final tokens), `dual` and `prefix` (a full step at each block start): token for token and
/// step for step the fixtures, with each step's live rows exactly the scheme's (so a scheme that
/// silently recomputed everything fails), and `block` running far fewer rows than `none`.
#[test]
fn official_llada2_trajectories_with_exact_caches() {
    let (_, cases) = load_cases(&fixture().join("trajectories.json"));
    let mut failures = Vec::new();
    let (mut block_rows, mut all_rows) = (0u64, 0u64);
    for c in &cases {
        // The official canvas: blocks of 32 at absolute positions, padded to whole blocks.
        let p = c.prompt.len() as u32;
        let len = (p + c.gen_len).div_ceil(32) * 32;
        assert_eq!(c.block_len, 32, "{}", c.name);
        // (block, step within it) of each official step, from the positions it commits (an
        // `edit:` step that changes nothing ends the block the step before it ran in).
        let mut at: Vec<(u32, u32)> = Vec::new();
        for (n, s) in c.steps.iter().enumerate() {
            let b = match s.iter().next() {
                Some(&(q, _)) => q / 32,
                None => at.last().expect("a first step commits").0,
            };
            assert!(s.iter().all(|&(q, _)| q / 32 == b), "{}: step {n} spans blocks", c.name);
            let i = match at.last() {
                Some(&(pb, pi)) if pb == b => pi + 1,
                _ => 0,
            };
            at.push((b, i));
        }
        let mut engine = engine_with_eos(c.eos_id);
        for cache in ["block", "dual", "prefix"] {
            let req = demask::engine::Request::ids(c.prompt.clone())
                .gen_len(c.gen_len)
                .block_len(c.block_len)
                .policy(c.policy.parse().unwrap())
                .cache(cache.parse().unwrap())
                .stop_at_eos(c.stop_at_eos);
            let (mut steps, mut tops, mut live) = (Vec::new(), Vec::new(), Vec::new());
            let out = engine
                .generate_with(&[req], &mut |e| {
                    steps.push(e.commits.iter().map(|m| (m.pos, m.token)).collect());
                    let mut top: Vec<(u32, u32, f32)> =
                        (0..e.eligible.len()).map(|i| (e.eligible[i], e.scores.tokens[i], e.scores.conf[i])).collect();
                    top.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
                    top.truncate(6);
                    tops.push(top);
                    live.push(e.live_rows);
                })
                .unwrap_or_else(|e| panic!("{} --cache {cache}: {e}", c.name));
            let mut canvas = c.prompt.clone();
            canvas.extend_from_slice(&out[0].tokens);
            if let Some(d) = first_difference(c, &steps, &tops, &canvas) {
                failures.push(format!("{} --cache {cache}: {d}", c.name));
                continue;
            }
            let want: Vec<u32> = at
                .iter()
                .enumerate()
                .map(|(n, &(b, i))| {
                    let (start, end) = (32 * b, 32 * (b + 1));
                    match (cache, n, i) {
                        ("block", 0, _) => end,
                        ("block", _, 0) => end - (start - 32),
                        ("block", _, _) => 32,
                        (_, _, 0) => len,
                        ("dual", _, _) => 32,
                        _ => len - start,
                    }
                })
                .collect();
            assert_eq!(live, want, "{} --cache {cache}: live rows per step", c.name);
            assert_eq!(out[0].rows_per_step, want, "{} --cache {cache}: Output::rows_per_step", c.name);
            if cache == "block" {
                block_rows += live.iter().map(|&r| r as u64).sum::<u64>();
                all_rows += (len as u64) * live.len() as u64;
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    eprintln!("block cache: {block_rows} rows computed where `none` computes {all_rows}");
    assert!(block_rows * 2 < all_rows, "block: {block_rows} rows of {all_rows}");
    // The cases cross block boundaries: `block`'s block-start steps with the previous block ran.
    assert!(cases.iter().any(|c| c.gen_len > 32 && c.steps.len() > 2));
}
