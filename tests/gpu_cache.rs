//! KV caching on the GPU (DESIGN.md §5), against the CPU reference of the same scheme:
//! (b) step-level parity: the runner drives one decode per scheme whose every step goes to
//!     both `CpuStepper` (f32) and `GpuStepper` (bf16) with the same batch (same live rows,
//!     same cache history: the CPU's commits drive the canvas and the plan of both), and the
//!     GPU's commits must equal the CPU's except near-ties at the cut-off (counted, printed,
//!     rare);
//! (c) the cache is really used on the GPU: with `prompt` / `dual`, a prompt row's cached K
//!     differs from a fresh recomputation of the same canvas after some steps, while with
//!     `none` it matches.
//! Skips without a GPU (`DEMASK_REQUIRE_GPU=1` makes that a failure).
#![cfg(feature = "cuda")]

mod common;

use common::{
    by_pos, conf_tol, gpu_engine, kv_row_bytes, prompt, seq_state, sets_differ_only_at_cut, sharp_weights, spec,
    DENSE_PRESETS, PRESETS,
};
use demask::batch::RowBatch;
use demask::config::ModelConfig;
use demask::decode::cpu::CpuStepper;
use demask::decode::gpu::GpuStepper;
use demask::decode::policy::ConfKind;
use demask::decode::runner::{self, SeqState};
use demask::decode::step::{Commit, SeqWork, SlotScores, StepBackend};
use demask::gpu::test_gpu;
use demask::model::Capacity;
use demask::Result;
use rand::rngs::StdRng;
use rand::SeedableRng;

const SCHEMES: [&str; 7] = ["none", "prompt", "prefix", "dual", "dkv:1", "dkv:3", "dkv-greedy"];

/// Whether a GPU/CPU disagreement is a near-tie at the cut-off (the rule of
/// tests/gpu_decode/): every slot in the symmetric difference of the committed sets has a CPU
/// confidence within `conf_tol` of a cut value (`common::sets_differ_only_at_cut`: the k-th or
/// (k+1)-th ranked confidence, τ, or the factor threshold at its rank), and every slot
/// committed by both with different tokens is an argmax near-tie (CPU probability ≤ 0.5).
/// (`conf_tol`: the bf16-vs-f32 confidence tolerance of tests/gpu_decode/,
/// |gpu − cpu| ≤ 0.02 + 0.1·|cpu|.)
fn near_tie(w: &SeqWork, cpu: &[Commit], gpu: &[Commit], sc: &SlotScores) -> bool {
    let conf_of = |p: u32| sc.conf[w.eligible.iter().position(|&q| q == p).unwrap()];
    let sets_ok = sets_differ_only_at_cut(w, cpu, gpu, &sc.conf);
    let tokens_ok = cpu
        .iter()
        .all(|c| gpu.iter().find(|g| g.pos == c.pos).is_none_or(|g| g.token == c.token || conf_of(c.pos) <= 0.5));
    sets_ok && tokens_ok
}

/// Runs every step on both backends with the same batch; returns the CPU's commits, so both
/// caches keep seeing the same inputs. Counts steps, sequence-steps and exemptions.
struct Parity {
    cpu: CpuStepper,
    gpu: GpuStepper,
    what: String,
    steps: usize,
    seq_steps: usize,
    /// Sequence-steps whose commits needed the near-tie exemption.
    exempt_steps: usize,
    partial_steps: usize,
}

impl StepBackend for Parity {
    fn step(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<Vec<Vec<Commit>>> {
        Ok(self.step_scored(batch, work)?.0)
    }

    fn step_scored(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
        let (want, cpu_sc) = self.cpu.step_scored(batch, work)?;
        let (got, gpu_sc) = self.gpu.step_scored(batch, work)?;
        assert_eq!(got.len(), work.len(), "{}: one commit list per sequence", self.what);
        let total: u32 = batch.seqs.iter().map(|s| s.kv_len).sum();
        self.partial_steps += usize::from((batch.rows() as u32) < total);
        for (si, w) in work.iter().enumerate() {
            self.seq_steps += 1;
            let (c, g) = (&cpu_sc[si], &gpu_sc[si]);
            assert_eq!(g.tokens.len(), w.eligible.len(), "{}: scores of every eligible slot", self.what);
            for j in 0..w.eligible.len() {
                if g.tokens[j] == c.tokens[j] && w.policy.conf_kind() != ConfKind::Random {
                    assert!(
                        (g.conf[j] - c.conf[j]).abs() <= conf_tol(c.conf[j]),
                        "{} {} step {}: slot {}: conf gpu {} cpu {}",
                        self.what,
                        w.policy,
                        w.step,
                        w.eligible[j],
                        g.conf[j],
                        c.conf[j]
                    );
                }
            }
            if by_pos(&got[si]) != by_pos(&want[si]) {
                assert!(
                    near_tie(w, &want[si], &got[si], c),
                    "{} {} step {} ctx {:?}: commits differ beyond the near-tie rule:\n gpu {:?}\n cpu {:?}\n cpu scores {:?}\n gpu scores {:?}",
                    self.what,
                    w.policy,
                    w.step,
                    w.ctx,
                    got[si],
                    want[si],
                    c,
                    g
                );
                eprintln!(
                    "{} {}: near-tie exemption at step {}: gpu {:?} cpu {:?}",
                    self.what, w.policy, w.step, got[si], want[si]
                );
                self.exempt_steps += 1;
            }
        }
        self.steps += 1;
        Ok((want, cpu_sc))
    }

    fn config(&self) -> &ModelConfig {
        self.cpu.config()
    }
}

fn seq(cfg: &ModelConfig, prompt: &[u32], gen: u32, block: u32, policy: &str, scheme: &str, id: u32) -> SeqState {
    seq_state(cfg, prompt, &[], spec(gen, block), policy, 3, id).with_cache(scheme.parse().unwrap(), false)
}

/// (b) For every scheme and both tiny presets, a batch of 3 sequences (prompts of 1, 19 and 7
/// tokens; different block lengths and deterministic policies) decoded to the end with every
/// step run on both backends: commits equal up to near-ties (each difference must pass the
/// near-tie rule). Exemptions are counted per sequence-step. On these tiny random models many
/// slots predict the same token with nearly equal confidence, so even the uncached step (`none`)
/// needs exemptions in ~15% of sequence-steps (measured on an H100, 2026-11-25); the assertion is
/// that caching adds none of its own: every cached scheme stays within 2× the `none` rate plus
/// 10 points (≈ 45 sequence-steps per scheme), and a preset's overall rate stays ≤ 25%. The
/// cached schemes must really have run partial steps.
#[test]
fn cached_decode_step_parity_gpu_vs_cpu() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(21);
    for preset in DENSE_PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let w = sharp_weights(&cfg, 8);
        let shapes = [(1usize, 32u32, 8u32, "schedule:4"), (19, 24, 8, "factor:1"), (7, 16, 16, "dream:entropy,8")];
        let rows: usize = shapes.iter().map(|&(p, g, _, _)| p + g as usize).sum();
        let cap = Capacity { rows, logit_rows: rows, cache_rows: rows, seqs: shapes.len() };
        let mut parity = Parity {
            cpu: CpuStepper::new(&w, rows).unwrap(),
            gpu: GpuStepper::new(gpu.clone(), &w, cap).unwrap(),
            what: String::new(),
            steps: 0,
            seq_steps: 0,
            exempt_steps: 0,
            partial_steps: 0,
        };
        let (mut all_steps, mut all_exempt) = (0usize, 0usize);
        let mut none_rate = None;
        for scheme in SCHEMES {
            let mut seqs: Vec<SeqState> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(p, g, b, pol))| seq(&cfg, &prompt(&mut rng, p), g, b, pol, scheme, i as u32))
                .collect();
            parity.what = format!("{preset} {scheme}");
            (parity.steps, parity.seq_steps, parity.exempt_steps, parity.partial_steps) = (0, 0, 0, 0);
            runner::run(&mut parity, &mut seqs, None).unwrap();
            for (i, s) in seqs.iter().enumerate() {
                assert!(s.canvas.is_done(), "{preset} {scheme}: sequence {i} did not finish");
            }
            eprintln!(
                "{preset} {scheme}: {} steps ({} sequence-steps, {} partial), {} with near-tie exemptions",
                parity.steps, parity.seq_steps, parity.partial_steps, parity.exempt_steps
            );
            (all_steps, all_exempt) = (all_steps + parity.seq_steps, all_exempt + parity.exempt_steps);
            let rate = parity.exempt_steps as f64 / parity.seq_steps.max(1) as f64;
            match none_rate {
                None => {
                    assert_eq!(scheme, "none", "SCHEMES starts with the uncached baseline");
                    none_rate = Some(rate);
                }
                Some(base) => assert!(
                    rate <= 2.0 * base + 0.10,
                    "{preset} {scheme}: exemptions in {:.1}% of sequence-steps, uncached {:.1}%: caching adds GPU/CPU disagreement",
                    100.0 * rate,
                    100.0 * base
                ),
            }
            if !matches!(scheme, "none" | "dkv:1") {
                assert!(parity.partial_steps > 0, "{preset} {scheme}: no step used the cache");
            }
        }
        eprintln!("{preset}: {all_steps} sequence-steps over every scheme, {all_exempt} with near-tie exemptions");
        assert!(all_exempt * 4 <= all_steps, "{preset}: {all_exempt} of {all_steps} sequence-steps needed exemptions (> 25%)");
    }
}

/// Decodes one sequence on the GPU alone and, after every step, compares the cached K of the
/// last layer for the prompt rows with a fresh full forward of the step's input canvas (written
/// to cache rows `[len, 2·len)`, away from the decode's rows `[0, len)`). Returns the largest
/// difference seen at a partial step and at a full step.
struct Stale {
    gpu: GpuStepper,
    canvas: Vec<u32>,
    prompt_len: usize,
    partial_diff: f32,
    full_diff: f32,
    partial_steps: usize,
}

impl StepBackend for Stale {
    fn step(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<Vec<Vec<Commit>>> {
        Ok(self.step_scored(batch, work)?.0)
    }

    fn step_scored(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
        let out = self.gpu.step_scored(batch, work)?;
        let len = self.canvas.len();
        let full = batch.rows() == len;
        let model = self.gpu.model_mut();
        let layer = model.cfg.n_layers - 1;
        let kvd = model.cfg.kv_dim();
        let g = model.gpu.clone();
        let cached = model.cache.k[layer].to_host(&g)?;
        let mut fresh = RowBatch::full(std::slice::from_ref(&self.canvas));
        fresh.seqs[0].cache_base = len as u32;
        model.forward(&fresh)?;
        let recomputed = model.cache.k[layer].to_host(&g)?;
        let mut d = 0f32;
        for r in 0..self.prompt_len {
            for j in 0..kvd {
                let (a, b) = (cached[r * kvd + j].to_f32(), recomputed[(len + r) * kvd + j].to_f32());
                assert!(a.is_finite() && b.is_finite(), "K row {r} not finite: {a} {b}");
                d = d.max((a - b).abs());
            }
        }
        if full {
            self.full_diff = self.full_diff.max(d);
        } else {
            self.partial_diff = self.partial_diff.max(d);
            self.partial_steps += 1;
        }
        for c in &out.0[0] {
            self.canvas[c.pos as usize] = c.token;
        }
        Ok(out)
    }

    fn config(&self) -> &ModelConfig {
        self.gpu.config()
    }
}

fn stale(gpu: &std::sync::Arc<demask::gpu::Gpu>, preset: &str, scheme: &str) -> (f32, f32, usize) {
    let cfg = ModelConfig::preset(preset).unwrap();
    let w = sharp_weights(&cfg, 9);
    let mut rng = StdRng::seed_from_u64(22);
    let prompt = prompt(&mut rng, 11);
    let s = seq(&cfg, &prompt, 24, 8, "schedule:6", scheme, 0);
    let len = s.canvas.len();
    let cap = Capacity { rows: len, logit_rows: len, cache_rows: 2 * len, seqs: 1 };
    let mut probe = Stale {
        gpu: GpuStepper::new(gpu.clone(), &w, cap).unwrap(),
        canvas: s.canvas.tokens().to_vec(),
        prompt_len: prompt.len(),
        partial_diff: 0.0,
        full_diff: 0.0,
        partial_steps: 0,
    };
    let mut seqs = [s];
    runner::run(&mut probe, &mut seqs, None).unwrap();
    assert!(seqs[0].canvas.is_done());
    (probe.partial_diff, probe.full_diff, probe.partial_steps)
}

/// (c) on the GPU: with `prompt` and `dual`, after some steps a prompt row's cached K (last
/// layer) differs from a fresh recomputation by far more than bf16 rounding (> 0.25; the CPU
/// measures 1.4-3.1 on these presets), while right after full steps, and with `none` at every
/// step, it matches within bf16 rounding of the same kernels (≤ 0.05; expected 0).
#[test]
fn gpu_cached_prompt_rows_go_stale_with_prompt_and_dual() {
    let Some(gpu) = test_gpu() else { return };
    for preset in PRESETS {
        let (partial, full, n) = stale(&gpu, preset, "none");
        assert_eq!((partial, n), (0.0, 0), "{preset} none: every step is full");
        assert!(full <= 0.05, "{preset} none: cached K differs from a recomputation by {full}");
        for scheme in ["prompt", "dual"] {
            let (partial, full, n) = stale(&gpu, preset, scheme);
            eprintln!(
                "{preset} {scheme}: stale prompt K differs by {partial} over {n} partial steps; full steps {full}"
            );
            assert!(n >= 2, "{preset} {scheme}: only {n} partial steps");
            assert!(
                full <= 0.05,
                "{preset} {scheme}: after a full step the cache differs from a recomputation by {full}"
            );
            assert!(
                partial > 0.25,
                "{preset} {scheme}: cached prompt K equals a recomputation ({partial}): cache unused?"
            );
        }
    }
}

/// `Engine::on_gpu`: an explicit KV budget bounds the cache (a request that cannot fit is a
/// clear error naming it, its rows and the budget), the default budget decodes every scheme to
/// the end with partial steps where the scheme has them.
#[test]
fn gpu_engine_kv_budget() {
    use demask::engine::EngineOptions;
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("tiny-dream").unwrap();
    let w = sharp_weights(&cfg, 10);
    let per_row = kv_row_bytes(&cfg, 2);
    let req = |p: usize, scheme: &str| common::req(&(1..=p as u32).collect::<Vec<u32>>(), 16, 8, "schedule:4", scheme);
    let opts = EngineOptions { max_batch: 2, kv_budget: Some(per_row * 30), ..Default::default() };
    let mut e = gpu_engine(&gpu, &cfg, &w, &opts);
    let err = e.generate(&[req(5, "dual"), req(25, "dual")]).unwrap_err().to_string();
    assert!(err.contains("request 1") && err.contains("41 rows") && err.contains("KV budget"), "{err}");
    // Two requests of 21 rows: one wave each under a 30-row budget.
    let outs = e.generate(&[req(5, "dual"), req(5, "prompt")]).unwrap();
    assert!(outs.iter().all(|o| o.tokens.iter().all(|&t| t != cfg.mask_id)));
    let opts = EngineOptions { max_batch: 3, ..Default::default() };
    let mut e = gpu_engine(&gpu, &cfg, &w, &opts);
    for scheme in SCHEMES {
        let outs = e.generate(&[req(3, scheme), req(19, scheme), req(1, scheme)]).unwrap();
        for (i, o) in outs.iter().enumerate() {
            assert!(o.tokens.iter().all(|&t| t != cfg.mask_id), "{scheme} request {i}: {:?}", o.tokens);
            let len = (o.prompt_len + o.tokens.len()) as u32;
            assert_eq!(o.rows_per_step[0], len, "{scheme}: the first step is full");
            if !matches!(scheme, "none" | "dkv:1") && o.prompt_len > 1 {
                assert!(o.rows_per_step.iter().any(|&r| r < len), "{scheme} request {i}: {:?}", o.rows_per_step);
            }
        }
    }
}
