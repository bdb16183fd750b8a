//! Criterion benches, one group per kernel, named `<op>/<dtype>/<shape>` at LLaDA-8B sizes.
//! Each iteration is timed with CUDA events (`iter_custom`), so criterion reports device time;
//! `Throughput::Bytes` is the bytes the op really moves (weights + activations read + outputs
//! written), and after each bench one line gives its GB/s and TFLOP/s as a share of the
//! ceilings measured at start (`bench::gpu::measure_ceilings`). Without a GPU the binary prints
//! `skipping GPU benches: <reason>` and exits 0 (with `DEMASK_REQUIRE_GPU=1` it exits 1).
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use demask::bench::{gpu::measure_ceilings, Ceilings};
use demask::config::{ModelConfig, HEAD_DIM};
use demask::decode::policy::{ConfKind, Policy, StepCtx};
use demask::decode::sampling::{ConfDist, RngKey, Sampling};
use demask::gpu::{DTensor, Gpu, Timer};
use demask::ops::attention::{attention, AttnMask, AttnVariant};
use demask::ops::commit::{commit, CommitWs, SeqCommitParams};
use demask::decode::gpu::{commit_rule, count_ctx};
use demask::ops::confidence::{confidence, ConfidenceWs, SlotParams};
use demask::ops::gemm::{linear, GemmVariant};
use demask::ops::rope::{rope_kv_store, RopeExtras, RopeMode};
use demask::ops::{embed, fill, norm, swiglu};
use demask::Result;

/// Bytes of weight copies a linear bench rotates through (H100 L2: 50 MB).
const ROTATE_BYTES: usize = 200 << 20;

/// Live-row counts of the elementwise benches: a decode block, a 512-token canvas, 2048.
const ROWS: [usize; 3] = [32, 512, 2048];

/// Everything the benches share: the device, its measured ceilings, one event pair.
struct Env {
    gpu: Arc<Gpu>,
    ceil: Ceilings,
    timer: Timer,
    cfg: ModelConfig,
    failed: bool,
}

/// Real work of one call: bytes moved to or from device memory, and FLOPs (0 = elementwise).
#[derive(Clone, Copy)]
struct Work {
    bytes: f64,
    flops: f64,
}

impl Work {
    fn bytes(bytes: f64) -> Self {
        Work { bytes, flops: 0.0 }
    }
}

/// A criterion group named after the op, printing the ceilings once when it opens.
struct Group<'a> {
    g: BenchmarkGroup<'a, WallTime>,
    op: &'static str,
}

impl Env {
    fn group<'a>(&self, c: &'a mut Criterion, op: &'static str) -> Group<'a> {
        eprintln!(
            "  [{op}] ceilings on {} ({} SMs): device copy {:.0} GB/s (read+write), cuBLASLt bf16 8192^3 {:.0} TFLOP/s",
            self.ceil.device, self.ceil.sm_count, self.ceil.copy_gbps, self.ceil.gemm_tflops
        );
        Group {
            g: c.benchmark_group(op),
            op,
        }
    }

    /// Runs `op` once (a failure is reported, marks the run failed and skips the bench), then
    /// benches it with CUDA-event timing and prints its share of the ceilings.
    fn bench<F: FnMut() -> Result<()>>(
        &mut self,
        grp: &mut Group<'_>,
        id: &str,
        work: Work,
        mut op: F,
    ) {
        let name = format!("{}/{id}", grp.op);
        if let Err(e) = op().and_then(|_| self.gpu.synchronize()) {
            eprintln!("  {name}: FAILED before timing: {e}");
            self.failed = true;
            return;
        }
        let (gpu, timer) = (&self.gpu, &self.timer);
        // (total ms, total iterations) over every routine call, warm-up included.
        let mut acc = (0f64, 0u64);
        grp.g.throughput(Throughput::Bytes(work.bytes as u64));
        grp.g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                timer.start(gpu).unwrap_or_else(|e| panic!("{name}: {e}"));
                for _ in 0..iters {
                    op().unwrap_or_else(|e| panic!("{name}: {e}"));
                }
                let ms = timer.stop_ms(gpu).unwrap_or_else(|e| panic!("{name}: {e}")) as f64;
                acc.0 += ms;
                acc.1 += iters;
                Duration::from_secs_f64(ms * 1e-3)
            })
        });
        if acc.1 > 0 {
            self.report(&name, work, acc.0 * 1e-3 / acc.1 as f64);
        }
    }

    /// One line: seconds per call, GB/s and TFLOP/s against the ceilings, % of the roofline floor.
    fn report(&self, name: &str, w: Work, secs: f64) {
        let gbps = w.bytes / secs / 1e9;
        let t_mem = w.bytes / (self.ceil.copy_gbps * 1e9);
        let mut line = format!(
            "  {name}: {:.2} us/call (mean), {gbps:.0} GB/s = {:.1} % of copy",
            secs * 1e6,
            100.0 * gbps / self.ceil.copy_gbps
        );
        let t_flop = w.flops / (self.ceil.gemm_tflops * 1e12);
        if w.flops > 0.0 {
            let tflops = w.flops / secs / 1e12;
            line += &format!(
                ", {tflops:.1} TFLOP/s = {:.1} % of GEMM",
                100.0 * tflops / self.ceil.gemm_tflops
            );
        }
        let (floor, bound) = if t_flop > t_mem {
            (t_flop, "compute")
        } else {
            (t_mem, "memory")
        };
        line += &format!(
            "; {bound}-bound, {:.1} % of the floor",
            100.0 * floor / secs
        );
        eprintln!("{line}");
    }

    fn alloc_normal(
        &self,
        dims: &[usize],
        seed: u64,
        mean: f32,
        std: f32,
    ) -> Result<DTensor<bf16>> {
        let mut t = self.gpu.alloc::<bf16>(dims)?;
        fill::fill_normal(&self.gpu, &mut t, seed, mean, std)?;
        Ok(t)
    }
}

fn bench_embed(c: &mut Criterion, env: &mut Env) -> Result<()> {
    let (vocab, h) = (env.cfg.vocab, env.cfg.hidden);
    let t_max = ROWS[ROWS.len() - 1];
    let table = env.alloc_normal(&[vocab, h], 11, 0.0, 0.02)?;
    let mut rng = StdRng::seed_from_u64(12);
    let ids_host: Vec<u32> = (0..t_max).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let ids = env.gpu.upload(&ids_host, &[t_max])?;
    let mut out = env.gpu.alloc::<bf16>(&[t_max, h])?;
    let mut grp = env.group(c, "embed");
    for t in ROWS {
        let work = Work::bytes((t * 4 + 2 * t * h * 2) as f64);
        let gpu = env.gpu.clone();
        env.bench(&mut grp, &format!("bf16/{t}x{h}"), work, || {
            embed::gather_rows(&gpu, t, &ids, &table, &mut out)
        });
    }
    grp.g.finish();
    Ok(())
}

fn bench_add_rmsnorm(c: &mut Criterion, env: &mut Env) -> Result<()> {
    let h = env.cfg.hidden;
    let eps = env.cfg.norm_eps as f32;
    let t_max = ROWS[ROWS.len() - 1];
    let mut residual = env.alloc_normal(&[t_max, h], 21, 0.0, 1.0)?;
    let delta = env.alloc_normal(&[t_max, h], 22, 0.0, 0.5)?;
    let weight = env.alloc_normal(&[h], 23, 1.0, 0.1)?;
    let mut out = env.gpu.alloc::<bf16>(&[t_max, h])?;
    let mut grp = env.group(c, "add_rmsnorm");
    for t in ROWS {
        // read residual + delta, write residual + out, read the weight
        let work = Work::bytes((4 * t * h * 2 + h * 2) as f64);
        let gpu = env.gpu.clone();
        env.bench(&mut grp, &format!("bf16/{t}x{h}"), work, || {
            norm::add_rmsnorm(&gpu, t, &mut residual, Some(&delta), &weight, eps, &mut out)
        });
    }
    grp.g.finish();
    Ok(())
}

fn bench_rope_kv_store(c: &mut Criterion, env: &mut Env) -> Result<()> {
    let cfg = env.cfg.clone();
    let theta = cfg.rope_theta as f32;
    let mut grp = env.group(c, "rope_kv_store");
    // LLaDA-8B (the plain kernel), then LLaDA-MoE (16/16 heads: qk norm, full RoPE) and
    // LLaDA2-mini (16/4: qk norm, RoPE over 64 dims), each fused variant next to the plain
    // kernel at the same shape (Dream numerics, as those models use).
    rope_shape(env, &mut grp, cfg.n_heads, cfg.n_kv_heads, theta, RopeMode::Llada, None)?;
    rope_shape(env, &mut grp, 16, 16, 50000.0, RopeMode::Dream, None)?;
    rope_shape(env, &mut grp, 16, 16, 50000.0, RopeMode::Dream, Some(("qknorm", 1e-5, HEAD_DIM)))?;
    rope_shape(env, &mut grp, 16, 4, 600000.0, RopeMode::Dream, None)?;
    rope_shape(env, &mut grp, 16, 4, 600000.0, RopeMode::Dream, Some(("qknorm_rot64", 1e-6, 64)))?;
    grp.g.finish();
    Ok(())
}

/// `rope_kv_store/bf16/{t}x({n_heads}+{2·n_kv})x128[/{variant}]` for each row count; `fused`:
/// (variant name, eps, rotary_dim) of a q/k-normed call, None for the plain kernel.
fn rope_shape(
    env: &mut Env,
    grp: &mut Group<'_>,
    n_heads: usize,
    n_kv: usize,
    theta: f32,
    mode: RopeMode,
    fused: Option<(&str, f32, usize)>,
) -> Result<()> {
    let (q_dim, kv_dim) = (n_heads * HEAD_DIM, n_kv * HEAD_DIM);
    let qkv_dim = q_dim + 2 * kv_dim;
    let t_max = ROWS[ROWS.len() - 1];
    let mut qkv = env.alloc_normal(&[t_max, qkv_dim], 31, 0.0, 1.0)?;
    let rows_host: Vec<u32> = (0..t_max as u32).collect();
    let positions = env.gpu.upload(&rows_host, &[t_max])?;
    let cache_rows = env.gpu.upload(&rows_host, &[t_max])?;
    let mut k_cache = env.gpu.alloc::<bf16>(&[t_max, kv_dim])?;
    let mut v_cache = env.gpu.alloc::<bf16>(&[t_max, kv_dim])?;
    let q_norm = env.alloc_normal(&[HEAD_DIM], 32, 1.0, 0.2)?;
    let k_norm = env.alloc_normal(&[HEAD_DIM], 33, 1.0, 0.2)?;
    let (suffix, ex) = match fused {
        None => (String::new(), RopeExtras::none()),
        Some((name, eps, rotary_dim)) => {
            let ex = RopeExtras { q_norm: Some(&q_norm), k_norm: Some(&k_norm), eps, rotary_dim };
            (format!("/{name}"), ex)
        }
    };
    let weights = if ex.is_none() { 0 } else { 2 * HEAD_DIM * 2 };
    for t in ROWS {
        // read q, k, v; write rotated q in place and k, v into the cache rows; 8 B of indices
        // (and the two norm weights)
        let work = Work::bytes((t * (qkv_dim * 2 + q_dim * 2 + 2 * kv_dim * 2) + 8 * t + weights) as f64);
        let id = format!("bf16/{t}x({n_heads}+{})x{HEAD_DIM}{suffix}", 2 * n_kv);
        let gpu = env.gpu.clone();
        env.bench(grp, &id, work, || {
            rope_kv_store(
                &gpu,
                t,
                &mut qkv,
                &positions,
                &cache_rows,
                &mut k_cache,
                &mut v_cache,
                n_heads,
                n_kv,
                theta,
                mode,
                &ex,
            )
        });
    }
    Ok(())
}

fn bench_swiglu(c: &mut Criterion, env: &mut Env) -> Result<()> {
    let f = env.cfg.ffn;
    let t_max = ROWS[ROWS.len() - 1];
    let gu = env.alloc_normal(&[t_max, 2 * f], 41, 0.0, 1.0)?;
    let mut out = env.gpu.alloc::<bf16>(&[t_max, f])?;
    let mut grp = env.group(c, "swiglu");
    for t in ROWS {
        let work = Work::bytes((3 * t * f * 2) as f64);
        let gpu = env.gpu.clone();
        env.bench(&mut grp, &format!("bf16/{t}x{f}"), work, || {
            swiglu::swiglu(&gpu, t, &gu, &mut out)
        });
    }
    grp.g.finish();
    Ok(())
}

fn bench_attention(c: &mut Criterion, env: &mut Env) -> Result<()> {
    let cfg = env.cfg.clone();
    let (h, kvh, q_stride, q_dim, kv_dim) = (
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.qkv_dim(),
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    // (live query rows, keys): a 512 canvas, a decode block of 32 over 512 keys, 2048².
    let cases: [(usize, usize, &[AttnVariant]); 3] = [
        (512, 512, &AttnVariant::ALL),
        (32, 512, &AttnVariant::ALL),
        (2048, 2048, &[AttnVariant::Flash]),
    ];
    let (q_max, kv_max) = (2048, 2048);
    let qkv = env.alloc_normal(&[q_max, q_stride], 51, 0.0, 1.0)?;
    let k_cache = env.alloc_normal(&[kv_max, kv_dim], 52, 0.0, 1.0)?;
    let v_cache = env.alloc_normal(&[kv_max, kv_dim], 53, 0.0, 1.0)?;
    let mut out = env.gpu.alloc::<bf16>(&[q_max, q_dim])?;
    let mut seqs = env.gpu.alloc::<u32>(&[1, 4])?;
    let mut grp = env.group(c, "attention");
    for (q, kv, variants) in cases {
        // one sequence: live rows [0, q), cache rows [0, kv)
        seqs.write(&env.gpu, &[0, q as u32, 0, kv as u32])?;
        for &variant in variants {
            let work = Work {
                bytes: (2 * q * q_dim * 2 + 2 * kv * kv_dim * 2 + 16) as f64,
                flops: 4.0 * (q * kv * HEAD_DIM * h) as f64,
            };
            let gpu = env.gpu.clone();
            let id = format!("bf16/{}/{q}x{kv}x{h}h", variant.name());
            env.bench(&mut grp, &id, work, || {
                attention(
                    &gpu, variant, q, &qkv, q_stride, &seqs, 1, q, &k_cache, &v_cache, h, kvh,
                    AttnMask::Bidirectional, None, &mut out,
                )
            });
        }
    }
    // Block-causal (LLaDA2, blocks of 32): a 512-row prefill (row p sees (p/32 + 1)·32 keys)
    // and a decode step of block 8 (rows 256..288) with 512 cache rows, of which it reads 288.
    let mut positions = env.gpu.alloc::<u32>(&[q_max])?;
    for (q, kv, first) in [(512usize, 512usize, 0usize), (32, 512, 256)] {
        seqs.write(&env.gpu, &[0, q as u32, 0, kv as u32])?;
        positions.write(&env.gpu, &(first as u32..(first + q) as u32).chain(0..(q_max - q) as u32).collect::<Vec<_>>())?;
        let keys: usize = (first..first + q).map(|p| ((p / 32 + 1) * 32).min(kv)).sum();
        let read = ((first + q).div_ceil(32) * 32).min(kv);
        let work = Work {
            bytes: (2 * q * q_dim * 2 + 2 * read * kv_dim * 2 + 16 + q * 4) as f64,
            flops: 4.0 * (keys * HEAD_DIM * h) as f64,
        };
        let gpu = env.gpu.clone();
        let pos = &positions;
        let id = format!("bf16/flash-block32/{q}x{kv}x{h}h");
        env.bench(&mut grp, &id, work, || {
            attention(
                &gpu, AttnVariant::Flash, q, &qkv, q_stride, &seqs, 1, q, &k_cache, &v_cache, h, kvh,
                AttnMask::BlockCausal { positions: pos, block: 32 }, None, &mut out,
            )
        });
    }
    grp.g.finish();
    Ok(())
}

fn bench_confidence(c: &mut Criterion, env: &mut Env) -> Result<()> {
    let vocab = env.cfg.vocab;
    let rows_all = [1usize, 32, 256];
    let r_max = rows_all[rows_all.len() - 1];
    let mut rng = StdRng::seed_from_u64(61);
    let normal = Normal::new(0.0f32, 3.0).expect("valid normal");
    let host: Vec<f32> = (0..r_max * vocab)
        .map(|_| normal.sample(&mut rng))
        .collect();
    let logits = env.gpu.upload(&host, &[r_max, vocab])?;
    drop(host);
    let mut ws = ConfidenceWs::new(&env.gpu, r_max)?;
    let mut tokens = env.gpu.alloc::<u32>(&[r_max])?;
    let mut conf = env.gpu.alloc::<f32>(&[r_max])?;
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let mut grp = env.group(c, "confidence");
    for rows in rows_all {
        let slots: Vec<SlotParams> = (0..rows as u32)
            .map(|r| {
                SlotParams::new(
                    r,
                    ConfKind::Prob,
                    &greedy,
                    RngKey {
                        seed: 62,
                        seq: 0,
                        step: 0,
                        slot: r,
                    },
                )
            })
            .collect();
        ws.set_slots(&env.gpu, &slots, vocab)?;
        // read the logits and the slot records, write token + confidence
        let work = Work::bytes((rows * vocab * 4 + rows * (48 + 8)) as f64);
        let gpu = env.gpu.clone();
        env.bench(&mut grp, &format!("f32/{rows}x{vocab}"), work, || {
            confidence(&gpu, &logits, rows, &mut ws, &mut tokens, &mut conf)
        });
        // Dream's confidences (ConfDist::Filtered) with its default top-k 50: the cut-off
        // kernel (radix select) runs first, then the main pass over the filtered row.
        let dream = Sampling { top_k: 50, ..greedy };
        let slots: Vec<SlotParams> = (0..rows as u32)
            .map(|r| SlotParams::new(r, ConfKind::Prob, &dream, RngKey { seed: 62, seq: 0, step: 0, slot: r }).with_dist(ConfDist::Filtered))
            .collect();
        ws.set_slots(&env.gpu, &slots, vocab)?;
        env.bench(&mut grp, &format!("f32-dream-top50/{rows}x{vocab}"), work, || {
            confidence(&gpu, &logits, rows, &mut ws, &mut tokens, &mut conf)
        });
    }
    grp.g.finish();
    Ok(())
}

fn bench_commit(c: &mut Criterion, env: &mut Env) -> Result<()> {
    let vocab = env.cfg.vocab as u32;
    // (sequences, eligible slots per sequence); slots sit after a 256-token prompt
    let cases = [(1usize, 32usize), (32, 32), (8, 256)];
    let (prompt, stride) = (256usize, 512usize);
    let policy = Policy::Schedule { steps: 8 };
    let n_max = cases.iter().map(|(s, n)| s * n).max().unwrap_or(1);
    let s_max = cases.iter().map(|(s, _)| *s).max().unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(71);
    let tok_host: Vec<u32> = (0..n_max).map(|_| rng.gen_range(0..vocab)).collect();
    let conf_host: Vec<f32> = (0..n_max).map(|_| rng.gen_range(0.01f32..1.0)).collect();
    let canvas_host: Vec<u32> = (0..s_max * stride)
        .map(|_| rng.gen_range(0..vocab))
        .collect();
    let tokens = env.gpu.upload(&tok_host, &[n_max])?;
    let conf = env.gpu.upload(&conf_host, &[n_max])?;
    let mut canvas = env.gpu.upload(&canvas_host, &[s_max, stride])?;
    let mut ws = CommitWs::new(&env.gpu, s_max, n_max)?;
    let mut out = env.gpu.alloc::<u32>(&[s_max + 2 * n_max])?;
    let mut grp = env.group(c, "commit");
    for (n_seqs, slots) in cases {
        let ctx = StepCtx {
            step: 0,
            block_masked: slots as u32,
            masked: slots as u32,
            block_len: slots as u32,
        };
        let seqs: Vec<SeqCommitParams> = (0..n_seqs)
            .map(|s| SeqCommitParams::new(commit_rule(&policy).expect("a GPU policy"), count_ctx(ctx), s * slots, slots, s))
            .collect();
        let positions: Vec<u32> = (0..n_seqs)
            .flat_map(|_| (prompt..prompt + slots).map(|p| p as u32))
            .collect();
        ws.set_seqs(&env.gpu, &seqs, &positions, stride)?;
        let k = demask::decode::policy::schedule_count(slots as u32, 8, 0) as usize;
        // read records + (position, token, conf) per slot; write counts, ranked pairs and
        // confidences, and the k committed tokens per sequence into the canvas
        let n = n_seqs * slots;
        let work = Work::bytes((n_seqs * (48 + 4 + 4 * k) + n * (12 + 8 + 4)) as f64);
        let gpu = env.gpu.clone();
        env.bench(&mut grp, &format!("u32/{n_seqs}x{slots}"), work, || {
            commit(&gpu, &mut ws, &tokens, &conf, &mut canvas, &mut out)
        });
    }
    grp.g.finish();
    Ok(())
}

/// Output of a linear: bf16 activations, or f32 logits (the LM head).
enum Out {
    Bf16(DTensor<bf16>),
    F32(DTensor<f32>),
}

fn bench_linear(c: &mut Criterion, env: &mut Env) -> Result<()> {
    let cfg = env.cfg.clone();
    let (h, f) = (cfg.hidden, cfg.ffn);
    // (role, n, k, f32 output)
    let shapes = [
        ("qkv", cfg.qkv_dim(), h, false),
        ("o", h, cfg.q_dim(), false),
        ("gate_up", 2 * f, h, false),
        ("down", h, f, false),
        ("lm_head", cfg.vocab, h, true),
    ];
    // (variant, rows): cuBLASLt at a decode block and a 512 canvas, the skinny kernel at 32.
    let runs = [
        (GemmVariant::Cublaslt, 32usize),
        (GemmVariant::Cublaslt, 512),
        (GemmVariant::Skinny, 32),
    ];
    let t_max = runs.iter().map(|r| r.1).max().unwrap_or(1);
    let mut grp = env.group(c, "linear");
    for (i, &(role, n, k, f32_out)) in shapes.iter().enumerate() {
        let seed = 80 + 3 * i as u64;
        // Enough weight copies that one rotation exceeds L2 several times over: every call
        // reads its weights from device memory, as in a forward pass.
        let copies = ROTATE_BYTES.div_ceil(n * k * 2);
        let ws = (0..copies)
            .map(|j| env.alloc_normal(&[n, k], seed + 100 * j as u64, 0.0, 0.02))
            .collect::<Result<Vec<_>>>()?;
        let x = env.alloc_normal(&[t_max, k], seed + 1, 0.0, 1.0)?;
        let mut y = if f32_out {
            Out::F32(env.gpu.alloc::<f32>(&[t_max, n])?)
        } else {
            Out::Bf16(env.gpu.alloc::<bf16>(&[t_max, n])?)
        };
        let out_bytes = if f32_out { 4 } else { 2 };
        for (variant, t) in runs {
            let work = Work {
                bytes: (n * k * 2 + t * k * 2 + t * n * out_bytes) as f64,
                flops: 2.0 * (t * n * k) as f64,
            };
            let id = format!("bf16/{}/{t}x{n}x{k}", variant.name());
            eprintln!("  linear/{id} is the LLaDA-8B {role} projection");
            let gpu = env.gpu.clone();
            let mut call = 0usize;
            env.bench(&mut grp, &id, work, || {
                let w = &ws[call % ws.len()];
                call += 1;
                match &mut y {
                    Out::Bf16(y) => linear(&gpu, variant, t, &x, w, None, y),
                    Out::F32(y) => linear(&gpu, variant, t, &x, w, None, y),
                }
            });
        }
    }
    grp.g.finish();
    Ok(())
}

/// The W8A16 skinny GEMM (`ops::gemm_fp8`) at the LLaDA-8B linear shapes, 1 and 32 rows,
/// both scale layouts: named `linear_fp8/fp8-<layout>/<t>x<n>x<k>`; bytes are the FP8 weight
/// (one byte per weight, plus its scales) and the activations, so the % of copy compares
/// directly with `linear/bf16/skinny/...`.
fn bench_linear_fp8(c: &mut Criterion, env: &mut Env) -> Result<()> {
    use demask::ops::gemm_fp8::{linear_fp8, Fp8Weight};
    use demask::quant::ScaleLayout;
    let cfg = env.cfg.clone();
    let (h, f) = (cfg.hidden, cfg.ffn);
    let shapes = [("qkv", cfg.qkv_dim(), h), ("o", h, cfg.q_dim()), ("gate_up", 2 * f, h), ("down", h, f)];
    let mut grp = env.group(c, "linear_fp8");
    for (i, &(role, n, k)) in shapes.iter().enumerate() {
        let seed = 180 + 3 * i as u64;
        let copies = ROTATE_BYTES.div_ceil(n * k);
        let x = env.alloc_normal(&[32, k], seed + 1, 0.0, 1.0)?;
        let mut y = env.gpu.alloc::<bf16>(&[32, n])?;
        for layout in [ScaleLayout::Channel, ScaleLayout::Block128] {
            let mut ws = Vec::with_capacity(copies);
            for j in 0..copies {
                let w = env.alloc_normal(&[n, k], seed + 100 * j as u64, 0.0, 0.02)?;
                ws.push(Fp8Weight::quantize(&env.gpu, &w, layout)?);
            }
            for t in [1usize, 32] {
                let work = Work { bytes: (ws[0].bytes() + t * k * 2 + t * n * 2) as f64, flops: 2.0 * (t * n * k) as f64 };
                let id = format!("fp8-{}/{t}x{n}x{k}", layout.name());
                eprintln!("  linear_fp8/{id} is the LLaDA-8B {role} projection");
                let gpu = env.gpu.clone();
                let mut call = 0usize;
                env.bench(&mut grp, &id, work, || {
                    let w = &ws[call % ws.len()];
                    call += 1;
                    linear_fp8(&gpu, t, &x, w, None, &mut y)
                });
            }
        }
    }
    grp.g.finish();
    Ok(())
}

/// Opens device 0 and measures its ceilings; `Err` carries the reason to skip.
fn setup() -> std::result::Result<Env, String> {
    let gpu = Gpu::new(0).map_err(|e| e.to_string())?;
    let ceil = measure_ceilings(&gpu).map_err(|e| format!("measuring the device ceilings: {e}"))?;
    let timer = Timer::new(&gpu).map_err(|e| e.to_string())?;
    let cfg = ModelConfig::preset("llada-8b").map_err(|e| e.to_string())?;
    Ok(Env {
        gpu,
        ceil,
        timer,
        cfg,
        failed: false,
    })
}

type BenchFn = fn(&mut Criterion, &mut Env) -> Result<()>;

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut env = match setup() {
        Ok(env) => env,
        Err(reason) => {
            if std::env::var("DEMASK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                eprintln!("DEMASK_REQUIRE_GPU=1 but the GPU benches cannot run: {reason}");
                std::process::exit(1);
            }
            eprintln!("skipping GPU benches: {reason}");
            return;
        }
    };
    let groups: [(&str, BenchFn); 9] = [
        ("embed", bench_embed),
        ("add_rmsnorm", bench_add_rmsnorm),
        ("rope_kv_store", bench_rope_kv_store),
        ("swiglu", bench_swiglu),
        ("attention", bench_attention),
        ("confidence", bench_confidence),
        ("commit", bench_commit),
        ("linear", bench_linear),
        ("linear_fp8", bench_linear_fp8),
    ];
    for (name, run) in groups {
        if let Err(e) = run(&mut c, &mut env) {
            eprintln!("  [{name}] FAILED during setup: {e}");
            env.failed = true;
        }
    }
    c.final_summary();
    if env.failed {
        eprintln!("some GPU benches failed (see the FAILED lines above)");
        std::process::exit(1);
    }
}
