//! Helpers shared by the integration tests (`mod common;` in each test file): random tiny
//! engines, weights and prompts, request and sequence builders, the 8 mixed batching requests,
//! a step trace, and the commit-set half of the GPU-vs-CPU near-tie rule. Each test binary uses
//! a subset, hence the module-wide `dead_code` allowance.
#![allow(dead_code)]

#[cfg(feature = "cuda")]
pub mod elementwise;
pub mod scratch;

use std::collections::HashMap;

use demask::checkpoint::random_weights;
use demask::config::ModelConfig;
use demask::decode::canvas::{Canvas, CanvasSpec};
use demask::decode::policy::{rank, DreamAlg, Policy};
use demask::decode::runner::{SeqState, StepEvent};
use demask::decode::step::{Commit, SeqWork};
use demask::decode::Sampling;
use demask::engine::{Device, Engine, EngineOptions, Request};
use demask::weights::HostWeights;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const PRESETS: [&str; 3] = ["tiny-llada", "tiny-dream", "tiny-llada-moe"];
/// The presets the CPU backend runs (the same: LLaDA2 has its own tests).
pub const CPU_PRESETS: [&str; 3] = PRESETS;
/// The dense presets, for the dense FP8 model tests (the MoE models' are tests/gpu_fp8/moe.rs)
/// and the per-step GPU-vs-CPU parity tests: an MoE model's bf16 router
/// picks another expert than the f32 one at router near-ties (about 1 % of rows per layer on
/// random weights), which moves that row's confidences beyond the dense tolerances; LLaDA-MoE's
/// GPU-vs-CPU agreement is measured row by row in tests/gpu_moe_model.rs instead.
pub const DENSE_PRESETS: [&str; 2] = ["tiny-llada", "tiny-dream"];

/// A CPU engine over `random_weights(preset, 5)`, no tokenizer, `opts` otherwise.
pub fn cpu_engine(preset: &str, opts: EngineOptions) -> Engine {
    let cfg = ModelConfig::preset(preset).unwrap();
    Engine::from_weights(random_weights(&cfg, 5), None, EngineOptions { device: Device::Cpu, ..opts }).unwrap()
}

/// Random weights with the LM head scaled by 4 (exact in bf16), which spreads the near-uniform
/// confidences of random init more like a trained model's: fewer near-ties between the bf16
/// GPU and the f32 CPU.
pub fn sharp_weights(cfg: &ModelConfig, seed: u64) -> HostWeights {
    let mut w = random_weights(cfg, seed);
    for x in &mut w.lm_head {
        *x = half::bf16::from_f32(x.to_f32() * 4.0);
    }
    w
}

/// Bytes of one KV cache row: K and V of every layer, `elem_bytes` per element (the CPU cache
/// is f32: 4; the GPU cache bf16: 2).
pub fn kv_row_bytes(cfg: &ModelConfig, elem_bytes: usize) -> u64 {
    (2 * cfg.n_layers * cfg.kv_dim() * elem_bytes) as u64
}

/// A random prompt of `len` ordinary tokens (below the tiny presets' special ids).
pub fn prompt(rng: &mut StdRng, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.gen_range(0..500)).collect()
}

/// A request over prompt ids without stop-at-EOS; every other setting is `Request`'s
/// default (greedy, seed 0, cache `none`).
pub fn ids_request(prompt: &[u32], gen: u32, block: u32, policy: &str) -> Request {
    Request::ids(prompt).gen_len(gen).block_len(block).policy(policy.parse().unwrap()).stop_at_eos(false)
}

/// [`ids_request`] with the cache scheme `cache`.
pub fn req(prompt: &[u32], gen: u32, block: u32, policy: &str, cache: &str) -> Request {
    let mut r = ids_request(prompt, gen, block, policy);
    r.cache = cache.parse().unwrap();
    r
}

/// Eight different requests: prompt lengths 1..40, gen 8..32, block 2..16, eight policies,
/// every cache scheme, one sampled (temperature 0.8: deterministic too, keyed by seed, seq id,
/// step and slot) and one with stop-at-EOS.
pub fn mixed_requests(seed: u64) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(seed);
    let spec: [(usize, u32, u32, &str, &str); 8] = [
        (1, 8, 8, "schedule:4", "none"),
        (7, 16, 4, "threshold:0.8", "prompt"),
        (40, 32, 8, "factor:1", "prefix"),
        (13, 24, 8, "confident:0.9,4", "dual"),
        (26, 16, 16, "dream:maskgit_plus,4", "dkv:2"),
        (3, 32, 4, "random:4", "dkv-greedy"),
        (19, 8, 2, "dream:topk_margin,3", "dkv:1"),
        (33, 24, 12, "schedule:3", "dkv-greedy:0"),
    ];
    spec.iter()
        .enumerate()
        .map(|(i, &(p, gen, block, policy, cache))| {
            let mut r = req(&prompt(&mut rng, p), gen, block, policy, cache);
            r.seed = 100 + i as u64;
            r.seq_id = i as u32;
            if i == 5 {
                r.sampling = Sampling { temperature: 0.8, ..Sampling::default() };
            }
            if i == 3 {
                r.stop_at_eos = true;
            }
            r
        })
        .collect()
}

/// A canvas spec of `gen` slots in blocks of `block`, without stop-at-EOS.
pub fn spec(gen: u32, block: u32) -> CanvasSpec {
    CanvasSpec { gen_len: gen, block_len: block, stop_at_eos: false }
}

/// A sequence over a fresh canvas `[prompt | spec.gen_len slots]` (`prior`: fixed slots, or
/// empty), `policy` parsed, greedy, the `none` cache scheme (chain `.with_cache(..)` for
/// another; set `sampling` by struct update).
pub fn seq_state(
    cfg: &ModelConfig,
    prompt: &[u32],
    prior: &[Option<u32>],
    spec: CanvasSpec,
    policy: &str,
    seed: u64,
    id: u32,
) -> SeqState {
    let canvas = Canvas::new(prompt, prior, spec, cfg).unwrap();
    SeqState::new(canvas, policy.parse().unwrap(), Sampling::default(), seed, id)
}

/// First and last batch step of each request index, and the sequences / canvas rows of each
/// batch step, from `generate_with`'s callback.
#[derive(Default)]
pub struct Trace {
    pub span: HashMap<usize, (u32, u32)>,
    pub per_step: HashMap<u32, (usize, usize)>,
}

impl Trace {
    pub fn record(&mut self, e: &StepEvent) {
        let s = self.span.entry(e.index).or_insert((e.batch_step, e.batch_step));
        s.0 = s.0.min(e.batch_step);
        s.1 = s.1.max(e.batch_step);
        let b = self.per_step.entry(e.batch_step).or_default();
        b.0 += 1;
        b.1 += e.canvas.len();
    }
}

/// Tolerance on a confidence from the bf16 GPU forward vs the f32 CPU forward:
/// |gpu − cpu| ≤ 0.02 + 0.1·|cpu| (bf16 activations shift logits by ~1%, and margins, being
/// differences of probabilities, amplify that). Near-ties closer than this at a cut-off are exempt.
pub fn conf_tol(c: f32) -> f32 {
    0.02 + 0.1 * c.abs()
}

/// The commit-set half of the near-tie rule (tests/gpu_decode/, tests/gpu_cache.rs): every
/// slot in the symmetric difference of the CPU's and the GPU's committed sets has a CPU
/// confidence (`conf`, one per eligible slot of `w`) within `conf_tol` of a cut value: the
/// k-th or (k+1)-th ranked confidence (k = the CPU's commit count), τ, or the factor threshold
/// at any rank. Each file adds its own rule for slots committed by both with different tokens.
pub fn sets_differ_only_at_cut(w: &SeqWork, cpu: &[Commit], gpu: &[Commit], conf: &[f32]) -> bool {
    let conf_of = |p: u32| conf[w.eligible.iter().position(|&q| q == p).unwrap()];
    let mut ranked: Vec<(u32, f32)> = w.eligible.iter().cloned().zip(conf.iter().cloned()).collect();
    rank(&mut ranked);
    let k = cpu.len();
    let mut cuts: Vec<f32> = vec![ranked[k - 1].1];
    if k < ranked.len() {
        cuts.push(ranked[k].1);
    }
    match w.policy {
        Policy::Threshold { tau } | Policy::Confident { tau, .. } => cuts.push(tau),
        Policy::Factor { f } => cuts.extend((0..ranked.len()).map(|i| 1.0 - f / (i as f32 + 2.0))),
        _ => {}
    }
    let cpu_set: Vec<u32> = cpu.iter().map(|c| c.pos).collect();
    let gpu_set: Vec<u32> = gpu.iter().map(|c| c.pos).collect();
    let mut diff =
        cpu_set.iter().filter(|p| !gpu_set.contains(p)).chain(gpu_set.iter().filter(|p| !cpu_set.contains(p)));
    diff.all(|&p| {
        let c = conf_of(p);
        cuts.iter().any(|&x| (c - x).abs() <= conf_tol(x))
    })
}

/// Commits ordered by position (a step's commit order does not matter when comparing sets).
pub fn by_pos(v: &[Commit]) -> Vec<Commit> {
    let mut v = v.to_vec();
    v.sort_by_key(|c| c.pos);
    v
}

/// A GPU engine (`Engine::on_gpu`, no tokenizer) over `w` uploaded to `gpu`.
#[cfg(feature = "cuda")]
pub fn gpu_engine(
    gpu: &std::sync::Arc<demask::gpu::Gpu>,
    cfg: &ModelConfig,
    w: &HostWeights,
    opts: &EngineOptions,
) -> Engine {
    let dev = demask::model::GpuWeights::upload(gpu, w).unwrap();
    Engine::on_gpu(gpu.clone(), cfg.clone(), dev, None, opts).unwrap()
}

/// Policies the GPU commit and step-parity tests cover: every kind, including exact τ and the
/// factor prefix rule.
pub fn policies() -> Vec<Policy> {
    vec![
        Policy::Schedule { steps: 4 },
        Policy::Schedule { steps: 7 },
        Policy::Random { steps: 5 },
        Policy::Threshold { tau: 0.75 },
        Policy::Threshold { tau: 0.9 },
        Policy::Confident { tau: 0.9, steps: 4 },
        Policy::Confident { tau: 0.5, steps: 3 },
        Policy::Factor { f: 1.0 },
        Policy::Factor { f: 0.4 },
        Policy::Dream {
            alg: DreamAlg::Origin,
            steps: 8,
        },
        Policy::Dream {
            alg: DreamAlg::MaskgitPlus,
            steps: 3,
        },
        Policy::Dream {
            alg: DreamAlg::TopkMargin,
            steps: 16,
        },
        Policy::Dream {
            alg: DreamAlg::Entropy,
            steps: 5,
        },
    ]
}
