//! CUDA graph replay of the GPU forward (`GpuModel::forward`, `gpu::graph`): a forward replayed
//! from a graph must equal the same forward run op by op, bit for bit, for batches of one shape
//! whose contents (tokens, positions, KV lengths, cache rows, logit rows) all differ; a batch
//! whose shape differs in any one key field must never replay another shape's graph; replacing
//! a KV cache buffer must drop the graphs; profiling runs eagerly; and a dual-cache decode on
//! `GpuStepper` commits the same tokens with graphs on and off.
//!
//! "Eager" here is the same model with `set_graphs(false)`. Each forward is preceded by a
//! full-canvas forward (prefill) that rewrites every cache row the step reads, so the eager and
//! graph passes start every step from the same cache. Logits are poisoned with NaN before each
//! forward and must all be finite after it. Skips without a GPU (`DEMASK_REQUIRE_GPU=1` makes
//! that a failure). The tests of this file share one stream, and a capture records whatever is
//! launched on its stream, so they run one at a time (`LOCK`).
#![cfg(feature = "cuda")]

mod common;

use std::sync::{Arc, Mutex, MutexGuard};

use common::{prompt, seq_state, spec, PRESETS};

/// The shared presets plus LLaDA2 (block-causal attention, dense + MoE layers, shared expert).
const GRAPH_PRESETS: [&str; 4] = [PRESETS[0], PRESETS[1], PRESETS[2], "tiny-llada2"];
use demask::batch::{RowBatch, SeqSpan};
use demask::checkpoint::random_weights;
use demask::config::ModelConfig;
use demask::decode::gpu::GpuStepper;
use demask::decode::runner::{self, SeqState};
use demask::decode::Sampling;
use demask::gpu::{test_gpu, DTensor, Gpu};
use demask::model::{Capacity, GpuModel, GpuWeights};
use demask::ops::{attention::AttnVariant, gemm::GemmVariant};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device, unless absent or `DEMASK_SYNC_LAUNCHES=1` (which turns graphs off by design).
fn graph_gpu() -> Option<Arc<Gpu>> {
    let gpu = test_gpu()?;
    if gpu.sync_launches {
        eprintln!("skipping graph test: DEMASK_SYNC_LAUNCHES=1 runs every forward eagerly");
        return None;
    }
    Some(gpu)
}

/// Canvas lengths of the sequences the batches draw from (cache rows packed back to back).
const LENS: [usize; 3] = [40, 57, 23];

/// Which logit rows a step asks for.
#[derive(Clone, Copy)]
enum Logits {
    /// Every live row, in order (the LM head reads the hidden rows in place).
    All,
    /// `r` distinct rows in random order.
    Some(usize),
    /// Every live row, reversed (same count as `All`, not the identity).
    Reversed,
}

/// One batch shape of the tests: (sequence, live row count) of each sequence in the batch
/// (block start and KV length are drawn per batch), the logit rows, the variants.
#[derive(Clone, Copy)]
struct Shape {
    live: &'static [(usize, usize)],
    logits: Logits,
    gemm: GemmVariant,
    attn: AttnVariant,
}

const fn shape(live: &'static [(usize, usize)], logits: Logits) -> Shape {
    Shape { live, logits, gemm: GemmVariant::Auto, attn: AttnVariant::Flash }
}

fn bases() -> Vec<u32> {
    LENS.iter()
        .scan(0u32, |b, &n| {
            let at = *b;
            *b += n as u32;
            Some(at)
        })
        .collect()
}

/// A batch of `shape` with random contents: tokens, block start, KV length and logit rows.
fn step_batch(shape: &Shape, vocab: usize, rng: &mut StdRng) -> RowBatch {
    let base = bases();
    let mut b = RowBatch::default();
    for &(si, count) in shape.live {
        let len = LENS[si];
        let start = rng.gen_range(0..=len - count);
        let kv_len = rng.gen_range(start + count..=len) as u32;
        let row_start = b.tokens.len() as u32;
        for p in start..start + count {
            b.tokens.push(rng.gen_range(0..vocab as u32));
            b.positions.push(p as u32);
        }
        b.seqs.push(SeqSpan { row_start, row_count: count as u32, cache_base: base[si], kv_len });
    }
    let t = b.rows() as u32;
    b.logit_rows = match shape.logits {
        Logits::All => (0..t).collect(),
        Logits::Reversed => (0..t).rev().collect(),
        Logits::Some(r) => {
            let mut rows: Vec<u32> = (0..t).collect();
            for i in 0..r {
                let j = rng.gen_range(i..rows.len());
                rows.swap(i, j);
            }
            rows.truncate(r);
            rows
        }
    };
    b
}

fn random_canvases(vocab: usize, rng: &mut StdRng) -> Vec<Vec<u32>> {
    LENS.iter().map(|&n| (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()).collect()
}

fn new_model(gpu: &Arc<Gpu>, preset: &str, seed: u64) -> (ModelConfig, GpuModel) {
    let cfg = ModelConfig::preset(preset).unwrap();
    let total: usize = LENS.iter().sum();
    let cap = Capacity { rows: total, logit_rows: total, cache_rows: total, seqs: LENS.len() };
    let w = GpuWeights::synthesize(gpu, &cfg, seed).unwrap();
    let mut m = GpuModel::new(gpu.clone(), cfg.clone(), w, cap).unwrap();
    m.set_graphs(true);
    (cfg, m)
}

/// What one step leaves behind: its logits and the last layer's K and V caches.
#[derive(PartialEq)]
struct Out {
    logits: Vec<u32>,
    k: Vec<u16>,
    v: Vec<u16>,
}

/// Prefill of `canvas` (every row of every sequence live, all cache rows rewritten), then the
/// step `b` with the given variants; logits poisoned before each forward and checked after.
fn prefill_and_step(m: &mut GpuModel, canvas: &[Vec<u32>], b: &RowBatch, sh: &Shape) -> Out {
    let g = m.gpu.clone();
    m.gemm_variant = GemmVariant::Auto;
    m.attn_variant = AttnVariant::Flash;
    let full = RowBatch::full(canvas);
    forward_checked(m, &full, "prefill");
    m.gemm_variant = sh.gemm;
    m.attn_variant = sh.attn;
    let logits = forward_checked(m, b, "step");
    let last = m.cfg.n_layers - 1;
    let n = LENS.iter().sum::<usize>() * m.cfg.kv_dim();
    let bits =
        |t: &DTensor<half::bf16>| -> Vec<u16> { t.to_host_n(&g, n).unwrap().iter().map(|x| x.to_bits()).collect() };
    Out { logits, k: bits(&m.cache.k[last]), v: bits(&m.cache.v[last]) }
}

/// One forward with the logits poisoned first; returns their bits, all finite.
fn forward_checked(m: &mut GpuModel, b: &RowBatch, what: &str) -> Vec<u32> {
    let g = m.gpu.clone();
    {
        let (lg, _) = m.logits_mut();
        let n = lg.len();
        lg.write(&g, &vec![f32::NAN; n]).unwrap();
    }
    m.forward(b).unwrap();
    let got = m.logits_to_host().unwrap();
    assert_eq!(got.len(), b.logit_rows.len() * m.cfg.vocab, "{what}: logits of every logit row");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: logit {i} (row {}, column {}) is {} after the forward: not written (stats {:?}, failure {:?})",
            i / m.cfg.vocab,
            i % m.cfg.vocab,
            got[i],
            m.graph_counters(),
            m.graph_failure()
        );
    }
    got.iter().map(|x| x.to_bits()).collect()
}

/// Bitwise equality of a graph pass and an eager pass, printing the first mismatches.
fn assert_same(what: &str, graph: &[Out], eager: &[Out], vocab: usize) {
    assert_eq!(graph.len(), eager.len());
    for (i, (g, e)) in graph.iter().zip(eager).enumerate() {
        if g == e {
            continue;
        }
        let bad: Vec<String> = g
            .logits
            .iter()
            .zip(&e.logits)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .map(|(j, (a, b))| {
                format!("[row {} col {}] got {} want {}", j / vocab, j % vocab, f32::from_bits(*a), f32::from_bits(*b))
            })
            .collect();
        let kbad = g.k.iter().zip(&e.k).filter(|(a, b)| a != b).count();
        let vbad = g.v.iter().zip(&e.v).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: forward {i}: graph and eager differ: {} logits ({:?}), {kbad} K and {vbad} V cache elements",
            g.logits.iter().zip(&e.logits).filter(|(a, b)| a != b).count(),
            bad
        );
    }
}

/// (a) Five forwards of one dual-cache-like shape (2 sequences × 8 live rows, 6 logit rows in
/// random order) with different tokens, block starts, KV lengths and logit rows: the graph pass
/// (eager, capture, replay ×3) equals the eager pass bit for bit, logits and K/V caches; the
/// contents really differ from step to step; stats count the captures and replays.
#[test]
fn graph_replay_equals_eager_bitwise() {
    let Some(gpu) = graph_gpu() else { return };
    let _serial = serial();
    for (pi, preset) in GRAPH_PRESETS.into_iter().enumerate() {
        let (cfg, mut m) = new_model(&gpu, preset, 40 + pi as u64);
        let sh = shape(&[(0, 8), (1, 8)], Logits::Some(6));
        let mut rng = StdRng::seed_from_u64(7);
        let inputs: Vec<(Vec<Vec<u32>>, RowBatch)> =
            (0..5).map(|_| (random_canvases(cfg.vocab, &mut rng), step_batch(&sh, cfg.vocab, &mut rng))).collect();
        let graph: Vec<Out> = inputs.iter().map(|(c, b)| prefill_and_step(&mut m, c, b, &sh)).collect();
        let (captures, replays, eager) = m.graph_stats();
        eprintln!("{preset}: graph pass: {captures} captures, {replays} replays, {eager} eager");
        assert_eq!(m.graph_failure(), None, "{preset}: a capture failed");
        // Two shapes (prefill, step), five forwards each: eager, capture, then three replays.
        assert_eq!((captures, replays, eager), (2, 6, 2), "{preset}: {:?}", m.graph_counters());
        for w in graph.windows(2) {
            assert!(w[0].logits != w[1].logits, "{preset}: consecutive steps gave equal logits: inputs unused?");
        }
        m.set_graphs(false);
        let eager_outs: Vec<Out> = inputs.iter().map(|(c, b)| prefill_and_step(&mut m, c, b, &sh)).collect();
        assert_same(preset, &graph, &eager_outs, cfg.vocab);
        assert_eq!(m.graph_stats(), (2, 6, 12), "{preset}: graphs off runs everything eagerly");
        // Back on: the graphs captured before are replayed.
        m.set_graphs(true);
        let again = prefill_and_step(&mut m, &inputs[0].0, &inputs[0].1, &sh);
        assert_same(preset, std::slice::from_ref(&again), &eager_outs[..1], cfg.vocab);
        assert_eq!(m.graph_stats(), (2, 8, 12), "{preset}");
    }
}

/// (b) Shapes that differ from `base` in one key field each (rows, sequences, max rows, logit
/// rows, identity, GEMM variant, attention variant; 19 and 1 live rows for awkward counts),
/// interleaved three times: every forward equals the eager one, so no shape replayed another's
/// graph; every shape (and the prefill) was captured once and replayed.
#[test]
fn shape_changes_never_replay_a_wrong_graph() {
    let Some(gpu) = graph_gpu() else { return };
    let _serial = serial();
    let base = shape(&[(0, 8), (1, 8)], Logits::Some(6));
    let shapes = [
        base,
        shape(&[(0, 8), (1, 8)], Logits::All),
        shape(&[(0, 8), (1, 8)], Logits::Reversed),
        shape(&[(0, 8), (1, 8)], Logits::Some(5)),
        shape(&[(0, 4), (1, 12)], Logits::Some(6)),
        shape(&[(0, 4), (1, 4), (2, 8)], Logits::Some(6)),
        shape(&[(1, 16)], Logits::Some(6)),
        shape(&[(0, 8), (1, 11)], Logits::Some(6)),
        shape(&[(2, 1)], Logits::All),
        Shape { gemm: GemmVariant::Skinny, ..base },
        Shape { gemm: GemmVariant::Cublaslt, ..base },
        Shape { attn: AttnVariant::Reference, ..base },
    ];
    for (pi, preset) in GRAPH_PRESETS.into_iter().enumerate() {
        let (cfg, mut m) = new_model(&gpu, preset, 50 + pi as u64);
        let mut rng = StdRng::seed_from_u64(8);
        let mut inputs = Vec::new();
        for _ in 0..3 {
            for sh in &shapes {
                inputs.push((*sh, random_canvases(cfg.vocab, &mut rng), step_batch(sh, cfg.vocab, &mut rng)));
            }
        }
        let graph: Vec<Out> = inputs.iter().map(|(sh, c, b)| prefill_and_step(&mut m, c, b, sh)).collect();
        let s = m.graph_counters();
        eprintln!("{preset}: {s:?}");
        assert_eq!(m.graph_failure(), None, "{preset}: a capture failed");
        // `Cublaslt` resolves to the same launches as `Auto` but is its own key.
        let keys = shapes.len() as u64 + 1;
        let forwards = 2 * inputs.len() as u64;
        assert_eq!(s.captures, keys, "{preset}: one capture per shape: {s:?}");
        assert_eq!((s.eager, s.replays), (keys, forwards - 2 * keys), "{preset}: {s:?}");
        m.set_graphs(false);
        let eager: Vec<Out> = inputs.iter().map(|(sh, c, b)| prefill_and_step(&mut m, c, b, sh)).collect();
        assert_same(preset, &graph, &eager, cfg.vocab);
    }
}

/// (c) Replacing layer 0's K/V cache tensors (the old ones kept alive, so the new ones have new
/// addresses) drops the graphs: the forwards after it are captured again and equal eager ones.
#[test]
fn replaced_cache_buffers_drop_the_graphs() {
    let Some(gpu) = graph_gpu() else { return };
    let _serial = serial();
    let (cfg, mut m) = new_model(&gpu, "tiny-dream", 60);
    let sh = shape(&[(0, 8), (2, 8)], Logits::Some(4));
    let mut rng = StdRng::seed_from_u64(9);
    let inputs: Vec<(Vec<Vec<u32>>, RowBatch)> =
        (0..3).map(|_| (random_canvases(cfg.vocab, &mut rng), step_batch(&sh, cfg.vocab, &mut rng))).collect();
    for (c, b) in &inputs {
        prefill_and_step(&mut m, c, b, &sh);
    }
    assert_eq!(m.graph_stats().0, 2, "{:?} {:?}", m.graph_counters(), m.graph_failure());
    let dims = m.cache.k[0].dims.clone();
    let old_k = std::mem::replace(&mut m.cache.k[0], gpu.alloc(&dims).unwrap());
    let old_v = std::mem::replace(&mut m.cache.v[0], gpu.alloc(&dims).unwrap());
    let graph: Vec<Out> = inputs.iter().map(|(c, b)| prefill_and_step(&mut m, c, b, &sh)).collect();
    assert_eq!(m.graph_stats().0, 4, "captured again after the cache changed: {:?}", m.graph_counters());
    m.set_graphs(false);
    let eager: Vec<Out> = inputs.iter().map(|(c, b)| prefill_and_step(&mut m, c, b, &sh)).collect();
    assert_same("new cache buffers", &graph, &eager, cfg.vocab);
    drop((old_k, old_v));
}

/// (d) With profiling on, repeated shapes never capture (the profiler's event records and host
/// sync cannot go in a graph); off again, they do.
#[test]
fn profiling_runs_eagerly() {
    let Some(gpu) = graph_gpu() else { return };
    let _serial = serial();
    let (cfg, mut m) = new_model(&gpu, "tiny-llada", 70);
    let sh = shape(&[(0, 8)], Logits::All);
    let mut rng = StdRng::seed_from_u64(10);
    let mut run3 = |m: &mut GpuModel| {
        for _ in 0..3 {
            let c = random_canvases(cfg.vocab, &mut rng);
            let b = step_batch(&sh, cfg.vocab, &mut rng);
            prefill_and_step(m, &c, &b, &sh);
        }
    };
    m.enable_profiling(true).unwrap();
    run3(&mut m);
    assert_eq!(m.graph_stats(), (0, 0, 6));
    m.enable_profiling(false).unwrap();
    run3(&mut m);
    // Seen for the first time by the cache now (prefill and step): eager, capture, replay.
    assert_eq!(m.graph_stats(), (2, 2, 8), "{:?}", m.graph_failure());
}

fn seq(cfg: &ModelConfig, prompt_len: usize, policy: &str, sampling: Sampling, id: u32, rng: &mut StdRng) -> SeqState {
    let s = seq_state(cfg, &prompt(rng, prompt_len), &[], spec(32, 8), policy, 5, id);
    SeqState { sampling, ..s }.with_cache("dual".parse().unwrap(), false)
}

/// (e) A dual-cache decode of three sequences (prompts 5, 19, 11; greedy and sampled) on
/// `GpuStepper` commits exactly the same tokens with graphs on and off,
/// and the graph run really replayed graphs (block steps repeat their shape).
#[test]
fn stepper_dual_cache_decode_same_tokens_with_graphs() {
    let Some(gpu) = graph_gpu() else { return };
    let _serial = serial();
    for preset in PRESETS {
        let cfg = ModelConfig::preset(preset).unwrap();
        let w = random_weights(&cfg, 11);
        let sampled = Sampling { temperature: 0.7, ..Sampling::default() };
        // Dual cache: a block's first step refreshes the whole canvas, the others recompute
        // the block rows only, and with full logits (GpuStepper) those steps share one shape
        // (7 per block here); the third sequence finishes first, then the others go on as two.
        // (`schedule:K` = K steps per block: 8 is one token per step for these 8-row blocks.)
        let specs = [
            (5usize, "schedule:8", Sampling::default()),
            (19, "schedule:8", sampled),
            (11, "schedule:4", Sampling::default()),
        ];
        let decode = |graphs: bool| {
            let mut rng = StdRng::seed_from_u64(12);
            let mut seqs: Vec<SeqState> =
                specs.iter().enumerate().map(|(i, (p, pol, s))| seq(&cfg, *p, pol, *s, i as u32, &mut rng)).collect();
            let rows = runner::cache_rows_for(&seqs);
            let cap = Capacity { rows, logit_rows: rows, cache_rows: rows, seqs: seqs.len() };
            let mut st = GpuStepper::new(gpu.clone(), &w, cap).unwrap();
            st.model_mut().set_graphs(graphs);
            runner::run(&mut st, &mut seqs, None).unwrap();
            let tokens: Vec<Vec<u32>> = seqs.iter().map(|s| s.canvas.tokens().to_vec()).collect();
            assert!(seqs.iter().all(|s| s.canvas.is_done()), "{preset}: unfinished sequence");
            (tokens, st.model().graph_counters(), st.model().graph_failure().map(str::to_string))
        };
        let (on, stats, failure) = decode(true);
        let (off, off_stats, _) = decode(false);
        eprintln!("{preset}: graphs on {stats:?}, off {off_stats:?}");
        assert_eq!(failure, None, "{preset}: a capture failed");
        assert!(stats.captures >= 1 && stats.replays >= 1, "{preset}: {stats:?}");
        assert_eq!((off_stats.captures, off_stats.replays), (0, 0));
        for (i, (a, b)) in on.iter().zip(&off).enumerate() {
            assert_eq!(a, b, "{preset}: sequence {i}: tokens differ with graphs on (left) and off (right)");
        }
    }
}
