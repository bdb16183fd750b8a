//! Criterion benches of the MoE kernels (`ops::moe`) at LLaDA-MoE (64 experts, top-8, hidden
//! 2048, expert ffn 1024, softmax router) and LLaDA2-mini (256 experts, top-8, ffn 512,
//! sigmoid group-limited router) shapes, t = 32 (one decode block) and 256 rows:
//! `moe_route/f32/{model}/{t}x{E}`, `moe_gate_up_swiglu/bf16/{variant}/{model}/{t}x{E}x{2·ffn}x{hidden}`,
//! `moe_down_combine/bf16/{variant}/{model}/{t}x{E}x{hidden}x{ffn}` (the reference variant at
//! t = 32 of LLaDA-MoE only: one thread per output is slow), and the FP8 expert kernels
//! (`ops::moe_fp8`, grouped): `moe_gate_up_swiglu/fp8/grouped/...`, `moe_down_combine/fp8/grouped/...`
//! (bytes: one per expert weight plus the channel scales). Device time per call from CUDA
//! events (`iter_custom`); `Throughput::Bytes` counts the weights of the experts the routing
//! really touched (read once) plus activations read and written, and after each bench one
//! line gives GB/s as a share of the measured copy rate. One layer's experts exceed the 50 MB
//! L2, so weights come from device memory as in a forward. Without a GPU the binary prints
//! `skipping GPU benches: <reason>` and exits 0 (with `DEMASK_REQUIRE_GPU=1` it exits 1).
use std::time::Duration;

use criterion::Criterion;
use criterion::Throughput;
use half::bf16;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use demask::bench::{gpu::measure_ceilings, Ceilings};
use demask::gpu::{DTensor, Gpu, Timer};
use demask::ops::fill::fill_normal;
use demask::ops::moe::{moe_down_combine, moe_gate_up_swiglu, moe_route, Combine, MoeGemmVariant, MoeWorkspace, RouteScoring};
use demask::ops::moe_fp8::{moe_down_combine_fp8_as, moe_gate_up_swiglu_fp8, Fp8Experts};
use demask::Result;

const ROWS: [usize; 2] = [32, 256];

/// A model's MoE layer shape.
struct Shape {
    name: &'static str,
    experts: usize,
    top_k: usize,
    hidden: usize,
    ffn: usize,
    /// LLaDA2's router (sigmoid, 8 groups, keep 4, × 2.5) instead of LLaDA-MoE's softmax.
    grouped_router: bool,
}

const SHAPES: [Shape; 2] = [
    Shape { name: "llada-moe", experts: 64, top_k: 8, hidden: 2048, ffn: 1024, grouped_router: false },
    Shape { name: "llada2-mini", experts: 256, top_k: 8, hidden: 2048, ffn: 512, grouped_router: true },
];

struct Env {
    gpu: std::sync::Arc<Gpu>,
    ceil: Ceilings,
    timer: Timer,
    failed: bool,
}

impl Env {
    /// Runs `op` once (a failure marks the run failed and skips the bench), then benches it
    /// with CUDA-event timing and prints GB/s against the copy ceiling.
    fn bench<F: FnMut() -> Result<()>>(&mut self, c: &mut Criterion, group: &str, id: &str, bytes: f64, flops: f64, mut op: F) {
        let name = format!("{group}/{id}");
        if let Err(e) = op().and_then(|_| self.gpu.synchronize()) {
            eprintln!("  {name}: FAILED before timing: {e}");
            self.failed = true;
            return;
        }
        let (gpu, timer) = (&self.gpu, &self.timer);
        let mut acc = (0f64, 0u64);
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(id, |b| {
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
        g.finish();
        if acc.1 > 0 {
            let secs = acc.0 * 1e-3 / acc.1 as f64;
            let gbps = bytes / secs / 1e9;
            let tflops = flops / secs / 1e12;
            eprintln!(
                "  {name}: {:.2} us/call, {gbps:.0} GB/s = {:.1} % of copy, {tflops:.1} TFLOP/s",
                secs * 1e6,
                100.0 * gbps / self.ceil.copy_gbps
            );
        }
    }
}

fn bench_shape(c: &mut Criterion, env: &mut Env, s: &Shape) -> Result<()> {
    let gpu = env.gpu.clone();
    let (e, k, h, f) = (s.experts, s.top_k, s.hidden, s.ffn);
    let t_max = ROWS[ROWS.len() - 1];
    let mut rng = StdRng::seed_from_u64(1);
    let normal = Normal::new(0.0f32, 1.0).expect("valid normal");
    let logits_h: Vec<f32> = (0..t_max * e).map(|_| normal.sample(&mut rng)).collect();
    let logits = gpu.upload(&logits_h, &[t_max, e])?;
    let bias_h: Vec<f32> = (0..e).map(|_| 0.1 * normal.sample(&mut rng)).collect();
    let bias = gpu.upload(&bias_h, &[e])?;
    let mut x = gpu.alloc::<bf16>(&[t_max, h])?;
    fill_normal(&gpu, &mut x, 2, 0.0, 1.0)?;
    let mut w_gate_up = gpu.alloc::<bf16>(&[e, 2 * f, h])?;
    fill_normal(&gpu, &mut w_gate_up, 3, 0.0, 0.02)?;
    let mut w_down = gpu.alloc::<bf16>(&[e, h, f])?;
    fill_normal(&gpu, &mut w_down, 4, 0.0, 0.02)?;
    // The same weights in FP8 (per-expert channel scales, quantised on the device).
    let fp8 = |seed: u64, dims: [usize; 3]| -> Result<Fp8Experts> {
        let mut w = gpu.alloc::<bf16>(&dims)?;
        fill_normal(&gpu, &mut w, seed, 0.0, 0.02)?;
        Fp8Experts::quantize(&gpu, w)
    };
    let (q_gate_up, q_down) = (fp8(3, [e, 2 * f, h])?, fp8(4, [e, h, f])?);
    let mut out: DTensor<bf16> = gpu.alloc(&[t_max, h])?;
    let mut ws = MoeWorkspace::new(&gpu, t_max, e, k, h, f)?;
    eprintln!("  [{}] workspace {:.1} MB for {t_max} rows", s.name, ws.bytes() as f64 / 1e6);
    let scoring = if s.grouped_router {
        RouteScoring::SigmoidGroup { bias: &bias, n_group: 8, topk_group: 4, routed_scaling: 2.5 }
    } else {
        RouteScoring::Softmax { norm_topk: false }
    };
    for t in ROWS {
        let pairs = t * k;
        // read logits, write ids + weights; the grouping reads ids, writes counts, offsets, perm, pos
        let route_bytes = (t * e * 4 + pairs * 8 + pairs * 4 + e * 8 + pairs * 8) as f64;
        env.bench(c, "moe_route", &format!("f32/{}/{t}x{e}", s.name), route_bytes, 0.0, || {
            moe_route(&gpu, t, &logits, &scoring, &mut ws)
        });
        // The experts this routing touches: their weights are what the GEMMs read.
        moe_route(&gpu, t, &logits, &scoring, &mut ws)?;
        let counts = ws.counts().to_host(&gpu)?;
        let touched = counts.iter().filter(|&&c| c > 0).count();
        eprintln!("  [{}] t={t}: {touched} of {e} experts touched, most rows on one expert {}", s.name, counts.iter().max().unwrap_or(&0));
        let gu_bytes = (touched * 2 * f * h * 2 + t * h * 2 + pairs * f * 2) as f64;
        let down_bytes = (touched * h * f * 2 + pairs * f * 2 + 2 * pairs * h * 4 + pairs * 12 + t * h * 2) as f64;
        let (gu_flops, down_flops) = ((2 * pairs * 2 * f * h) as f64, (2 * pairs * h * f) as f64);
        for variant in MoeGemmVariant::ALL {
            if variant == MoeGemmVariant::Reference && (t != ROWS[0] || s.grouped_router) {
                continue;
            }
            let id = format!("bf16/{variant}/{}/{t}x{e}x{}x{h}", s.name, 2 * f);
            env.bench(c, "moe_gate_up_swiglu", &id, gu_bytes, gu_flops, || {
                moe_gate_up_swiglu(&gpu, variant, &mut ws, t, &x, &w_gate_up)
            });
            let id = format!("bf16/{variant}/{}/{t}x{e}x{h}x{f}", s.name);
            env.bench(c, "moe_down_combine", &id, down_bytes, down_flops, || {
                moe_down_combine(&gpu, variant, &mut ws, t, &w_down, &mut out)
            });
        }
        // FP8 experts: one byte per weight plus a 4-byte scale per expert row.
        let g = MoeGemmVariant::Grouped;
        let gu8 = gu_bytes - (touched * 2 * f * h) as f64 + (touched * 2 * f * 4) as f64;
        let down8 = down_bytes - (touched * h * f) as f64 + (touched * h * 4) as f64;
        let id = format!("fp8/{g}/{}/{t}x{e}x{}x{h}", s.name, 2 * f);
        env.bench(c, "moe_gate_up_swiglu", &id, gu8, gu_flops, || moe_gate_up_swiglu_fp8(&gpu, g, &mut ws, t, &x, &q_gate_up));
        let id = format!("fp8/{g}/{}/{t}x{e}x{h}x{f}", s.name);
        env.bench(c, "moe_down_combine", &id, down8, down_flops, || {
            moe_down_combine_fp8_as(&gpu, g, &mut ws, t, &q_down, Combine::Write, &mut out)
        });
    }
    Ok(())
}

fn setup() -> std::result::Result<Env, String> {
    let gpu = Gpu::new(0).map_err(|e| e.to_string())?;
    let ceil = measure_ceilings(&gpu).map_err(|e| format!("measuring the device ceilings: {e}"))?;
    let timer = Timer::new(&gpu).map_err(|e| e.to_string())?;
    Ok(Env { gpu, ceil, timer, failed: false })
}

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
    eprintln!(
        "  [moe] ceilings on {} ({} SMs): device copy {:.0} GB/s (read+write)",
        env.ceil.device, env.ceil.sm_count, env.ceil.copy_gbps
    );
    for s in &SHAPES {
        if let Err(e) = bench_shape(&mut c, &mut env, s) {
            eprintln!("  [{}] FAILED during setup: {e}", s.name);
            env.failed = true;
        }
    }
    c.final_summary();
    if env.failed {
        eprintln!("some GPU benches failed (see the FAILED lines above)");
        std::process::exit(1);
    }
}
