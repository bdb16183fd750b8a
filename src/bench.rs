//! Workloads, roofline accounting and the JSON report of `demask bench`.
//! So far: W4, the full-canvas forward (the uncached step), on GPU or, without one, on the
//! CPU backend with a tiny model. Times are CUDA-event medians after warm-up.
use serde::Serialize;

use crate::config::ModelConfig;
use crate::quant::WeightFormat;

/// Measured device ceilings (printed at the start of every bench).
#[derive(Clone, Debug, Serialize)]
pub struct Ceilings {
    pub device: String,
    pub sm_count: usize,
    /// Device-to-device copy, bytes read + written per second / 1e9.
    pub copy_gbps: f64,
    /// bf16 GEMM 8192³ through cuBLASLt, TFLOP/s.
    pub gemm_tflops: f64,
    /// FP8 (E4M3 × E4M3, per-row × per-channel scales) GEMM 8192³ through cuBLASLt, TFLOP/s:
    /// the rate of the W8A8 path (activation quantiser and epilogue included); `None` where
    /// cuBLASLt has no FP8 algorithm.
    pub fp8_tflops: Option<f64>,
    /// The W8A8 path that rate was measured on (`outer-vec` or `split-scale`,
    /// `ops::gemm_w8a8::W8a8Path`).
    pub fp8_path: Option<&'static str>,
}

impl Ceilings {
    /// The `ceilings:` line the bench commands print.
    pub fn line(&self) -> String {
        let fp8 = self.fp8_tflops.map_or("unavailable".into(), |r| {
            #[cfg(feature = "cuda")]
            let fast = crate::gpu::gemm_fp8lt::fast_accum();
            #[cfg(not(feature = "cuda"))]
            let fast = false;
            let acc = if fast { "fast accumulation" } else { "f32 promotion" };
            format!("{r:.0} TFLOP/s ({}, {acc})", self.fp8_path.unwrap_or("?"))
        });
        format!("ceilings: copy {:.0} GB/s (read+write), bf16 GEMM {:.0} TFLOP/s, FP8 GEMM {fp8}", self.copy_gbps, self.gemm_tflops)
    }
}

/// Work one forward must do: FLOPs and the fewest bytes (weights read once).
#[derive(Clone, Debug, Serialize)]
pub struct Roofline {
    pub flops: f64,
    pub bytes: f64,
    /// max(flops / gemm rate, bytes / bandwidth), in ms.
    pub floor_ms: f64,
    pub bound: &'static str,
}

/// FLOPs and bytes of one full-canvas forward of `batch` sequences of `len` rows, where every
/// row is live and attends to `len` keys, and every row's logits are produced.
pub fn forward_roofline(cfg: &ModelConfig, len: usize, batch: usize, c: &Ceilings) -> Roofline {
    step_roofline(cfg, batch, len as f64, len, len, None, c)
}

/// [`forward_roofline`] with the linear layers' weights in `format`.
pub fn forward_roofline_as(cfg: &ModelConfig, format: WeightFormat, len: usize, batch: usize, c: &Ceilings) -> Roofline {
    step_roofline_as(cfg, format, batch, len as f64, len, len, None, c)
}

/// Median, min and max of a set of timings.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub median_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

impl Stats {
    pub fn of(times: &[f64]) -> Stats {
        let mut t = times.to_vec();
        t.sort_by(f64::total_cmp);
        let n = t.len();
        let median = if n == 0 { f64::NAN } else if n % 2 == 1 { t[n / 2] } else { 0.5 * (t[n / 2 - 1] + t[n / 2]) };
        let mean_ms = if n == 0 { f64::NAN } else { t.iter().sum::<f64>() / n as f64 };
        Stats { median_ms: median, mean_ms, min_ms: *t.first().unwrap_or(&f64::NAN), max_ms: *t.last().unwrap_or(&f64::NAN), samples: n }
    }
}

/// One row of the forward table.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardRow {
    pub workload: String,
    pub model: String,
    pub len: usize,
    pub batch: usize,
    pub stats: Stats,
    pub roofline: Option<Roofline>,
    /// floor / median: how close to the hardware floor (1.0 = at the floor).
    pub pct_of_floor: Option<f64>,
    pub peak_mem_bytes: Option<usize>,
}

/// Deterministic pseudo-random token ids below `vocab` (never all one token).
pub fn synthetic_tokens(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed ^ 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

#[cfg(feature = "cuda")]
pub mod gpu;

/// FLOPs and bytes each op of one forward moves (all layers together) when `live` rows per
/// sequence attend to `len` keys, for the per-kernel table of `demask profile`: GEMMs count
/// 2·m·n·k FLOPs and weight + activation bytes; attention the K/V rows it reads; elementwise
/// ops bytes read + written. bf16 weights; [`forward_op_work_as`] for another format.
pub fn forward_op_work(cfg: &ModelConfig, len: usize, batch: usize, live: usize) -> Vec<(&'static str, f64, f64)> {
    forward_op_work_as(cfg, WeightFormat::Bf16, len, batch, live)
}

/// [`forward_op_work`] with the linear layers stored in `format` (`model::GpuLayer::linears`:
/// q|k|v, o and the dense FFN's gate|up and down): their weight bytes are
/// `format.bytes_per_weight()` per weight plus 4 per scale; the LM head, router, experts and
/// shared expert stay bf16. Activations are counted as bf16 in and out: the W8A8 path's
/// activation quantisation (and `split-scale`'s epilogue pass) inside a GEMM row are not, nor
/// the W8A16 kernel's re-reads of W when it runs more than 64 rows in chunks.
pub fn forward_op_work_as(
    cfg: &ModelConfig,
    format: WeightFormat,
    len: usize,
    batch: usize,
    live: usize,
) -> Vec<(&'static str, f64, f64)> {
    let t = (live * batch) as f64;
    let (h, l) = (cfg.hidden as f64, cfg.n_layers as f64);
    let (qkv, q, kv, f, v) = (cfg.qkv_dim() as f64, cfg.q_dim() as f64, cfg.kv_dim() as f64, cfg.ffn as f64, cfg.vocab as f64);
    let gemm = |n: f64, k: f64, out_bytes: f64| (2.0 * t * n * k, 2.0 * n * k + 2.0 * t * k + out_bytes * t * n);
    // A linear layer in `format`: the same FLOPs, its weight bytes as stored.
    let linear = |n: usize, k: usize, out_bytes: f64| {
        let (fl, by) = gemm(n as f64, k as f64, out_bytes);
        let stored = match format {
            WeightFormat::Bf16 => 2.0 * (n * k) as f64,
            WeightFormat::Fp8(layout) => (n * k * format.bytes_per_weight()) as f64 + 4.0 * layout.count(n, k) as f64,
        };
        (fl, by - 2.0 * (n * k) as f64 + stored)
    };
    let per_layer = |(fl, by): (f64, f64)| (fl * l, by * l);
    // Layers with a dense FFN (LLaDA2: below first_k_dense_replace, width intermediate_size)
    // and with experts.
    let (dense_l, moe_l) = match (&cfg.moe, &cfg.llada2) {
        (Some(_), Some(l2)) => (l2.first_k_dense as f64, l - l2.first_k_dense as f64),
        (Some(_), None) => (0.0, l),
        (None, _) => (l, 0.0),
    };
    let dfu = cfg.dense_ffn();
    let df = dfu as f64;
    let mut v_ = vec![
        ("gemm_qkv", per_layer(linear(cfg.qkv_dim(), cfg.hidden, 2.0))),
        ("gemm_o", per_layer(linear(cfg.hidden, cfg.q_dim(), 2.0))),
        ("gemm_lm_head", gemm(v, h, 4.0)),
        ("attention", (4.0 * t * len as f64 * q * l, (2.0 * 2.0 * t * q + 2.0 * 2.0 * (len * batch) as f64 * kv) * l)),
        ("add_rmsnorm", (0.0, (2.0 * l + 1.0) * t * h * 2.0 * 3.0)),
        ("rope_kv_store", (0.0, l * t * (qkv * 2.0 + q * 2.0 + 2.0 * kv * 2.0))),
        ("embed", (0.0, 2.0 * t * h * 2.0)),
    ]
    .into_iter()
    .map(|(n, (fl, by))| (n, fl, by))
    .collect::<Vec<_>>();
    if dense_l > 0.0 {
        let (gf, gb) = linear(2 * dfu, cfg.hidden, 2.0);
        let (dfl, dby) = linear(cfg.hidden, dfu, 2.0);
        v_.push(("gemm_gate_up", gf * dense_l, gb * dense_l));
        // SwiGLU fused into the gate|up GEMM (FP8 weights, the skinny bf16 kernel): it writes
        // the activation, half the columns, instead of gate|up.
        v_.push(("gemm_gate_up+swiglu", gf * dense_l, (gb - t * df * 2.0) * dense_l));
        v_.push(("gemm_down", dfl * dense_l, dby * dense_l));
        v_.push(("swiglu", 0.0, dense_l * t * 3.0 * df * 2.0));
    }
    if let Some(m) = &cfg.moe {
        // Expert GEMMs: each row runs top_k experts; the weight bytes are those of the experts
        // the forward touches (expected under uniform routing, as `step_roofline`).
        let (e, k, l) = (m.n_experts as f64, m.top_k as f64, moe_l);
        let touched = e * (1.0 - (1.0 - k / e).powf(t));
        let (rf, rb) = gemm(e, h, 4.0);
        v_.push(("gemm_router", rf * l, rb * l));
        v_.push(("moe_route", 0.0, l * t * (e * 4.0 + k * 16.0)));
        v_.push((
            "moe_gate_up+swiglu",
            l * 2.0 * t * k * 2.0 * f * h,
            l * (touched * 2.0 * f * h * 2.0 + t * k * (h * 2.0 + f * 2.0)),
        ));
        v_.push((
            "moe_down+combine",
            l * 2.0 * t * k * h * f,
            l * (touched * h * f * 2.0 + t * k * (f * 2.0 + h * 8.0) + t * h * 2.0),
        ));
        // LLaDA2's shared expert: a dense SwiGLU every row runs in every MoE layer.
        if let Some(sf) = cfg.llada2.as_ref().map(|l2| l2.shared_ffn as f64).filter(|&sf| sf > 0.0) {
            let (gf, gb) = gemm(2.0 * sf, h, 2.0);
            let (dfl, dby) = gemm(h, sf, 2.0);
            v_.push(("gemm_shared_gate_up+swiglu", gf * l, gb * l));
            v_.push(("gemm_shared_down", dfl * l, dby * l));
        }
    }
    v_.sort_by(|a, b| a.0.cmp(b.0));
    v_
}

/// A decode workload (W1–W3, W5): `batch` requests of `prompt_len` synthetic tokens, each
/// generating `gen_len` in blocks of `block_len` with a fixed-count policy, EOS stop off (so the
/// work does not depend on the weights).
#[derive(Clone, Debug, Serialize)]
pub struct DecodeSpec {
    pub workload: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub block_len: usize,
    pub policy: String,
    pub cache: String,
    /// Linear-layer weight format (`quant::WeightFormat` name: bf16, fp8, fp8-block).
    pub weights: String,
}

/// One row of the decode table.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeRow {
    pub spec: DecodeSpec,
    pub model: String,
    pub device: String,
    /// Steps (forwards) per sequence.
    pub steps: u32,
    /// Per-step wall time (each step ends with the scheduler's one host sync), after the first
    /// `warmup_steps` steps of the run.
    pub step: Stats,
    pub tokens_per_s: f64,
    /// Live rows per step per sequence, averaged over the timed steps.
    pub live_rows_avg: f64,
    pub roofline: Option<Roofline>,
    pub pct_of_floor: Option<f64>,
    /// Device memory in use after the run (weights, KV cache, workspace: everything is
    /// allocated up front, so this is the peak); `None` on the CPU.
    pub peak_mem_bytes: Option<usize>,
    /// MoE on the GPU: the fraction of (layer, expert) weights a forward read, averaged over
    /// every forward of the run (the floor's expert bytes).
    pub experts_touched: Option<f64>,
}

/// FLOPs and bytes of one step of `batch` sequences, each recomputing `live` rows of a
/// `kv_len`-row canvas and producing `logit_rows` logits, and the floor they imply:
/// max(FLOPs / measured GEMM rate, bytes / measured copy bandwidth).
/// MoE: `touched` is the fraction of the expert weights one forward reads, as measured
/// (`Engine::expert_stats`); `None` takes the expectation under uniform routing.
pub fn step_roofline(
    cfg: &ModelConfig,
    batch: usize,
    live: f64,
    kv_len: usize,
    logit_rows: usize,
    touched: Option<f64>,
    c: &Ceilings,
) -> Roofline {
    step_roofline_as(cfg, WeightFormat::Bf16, batch, live, kv_len, logit_rows, touched, c)
}

/// [`step_roofline`] with the linear layers' weights in `format`: FP8 counts one byte per
/// linear weight plus its f32 scales, MoE experts included (one byte per expert weight plus
/// the per-expert channel scales, of the experts the step touches; the router, embedding,
/// norms and LM head stay bf16, as `model::GpuWeights` keeps them). The compute floor takes the linear layers' FLOPs at the
/// measured FP8 rate where they run W8A8 (channel scales, more than 64 rows,
/// `Ceilings::fp8_tflops` measured); at ≤ 64 rows the W8A16 kernel multiplies in bf16.
#[allow(clippy::too_many_arguments)]
pub fn step_roofline_as(
    cfg: &ModelConfig,
    format: WeightFormat,
    batch: usize,
    live: f64,
    kv_len: usize,
    logit_rows: usize,
    touched: Option<f64>,
    c: &Ceilings,
) -> Roofline {
    let h = cfg.hidden as f64;
    let rows = live * batch as f64;
    // MoE: each row runs its top_k experts and the router (LLaDA2: plus the shared expert, and
    // its first layers are dense); the weight bytes below count the experts a step touches.
    let attn_params = h * cfg.qkv_dim() as f64 + cfg.q_dim() as f64 * h;
    let row_params: f64 = (0..cfg.n_layers)
        .map(|i| {
            let ffn = match (&cfg.moe, &cfg.llada2) {
                (Some(m), Some(l)) if i >= l.first_k_dense => {
                    m.top_k as f64 * 3.0 * h * cfg.ffn as f64 + m.n_experts as f64 * h + 3.0 * h * l.shared_ffn as f64
                }
                (_, Some(l)) => 3.0 * h * l.dense_ffn as f64,
                (Some(m), None) => m.top_k as f64 * 3.0 * h * cfg.ffn as f64 + m.n_experts as f64 * h,
                (None, None) => 3.0 * h * cfg.ffn as f64,
            };
            attn_params + ffn
        })
        .sum();
    let dense = 2.0 * rows * row_params + 2.0 * (logit_rows * batch) as f64 * cfg.vocab as f64 * h;
    let attn = 4.0 * rows * kv_len as f64 * cfg.q_dim() as f64 * cfg.n_layers as f64;
    let flops = dense + attn;
    // The weights stored in `format` (`model::GpuLayer::linears` and `experts`): q|k|v and o of
    // every layer, the dense FFNs, LLaDA2's shared expert and every routed expert (the router
    // stays bf16). The experts run the W8A16 grouped kernels at any row count (bf16 MMA), the
    // others W8A8 above 64 rows.
    let dense_ffn_layers = (0..cfg.n_layers).filter(|&i| !cfg.is_moe_layer(i)).count() as f64;
    let moe_layers = cfg.n_layers as f64 - dense_ffn_layers;
    let df = cfg.dense_ffn();
    let sf = cfg.llada2.as_ref().map_or(0, |l| l.shared_ffn);
    let n_experts = cfg.moe.as_ref().map_or(0, |m| m.n_experts) as f64;
    let linear_params = attn_params * cfg.n_layers as f64
        + dense_ffn_layers * 3.0 * h * df as f64
        + moe_layers * 3.0 * h * sf as f64;
    let expert_params = moe_layers * n_experts * 3.0 * h * cfg.ffn as f64;
    // FP8 with channel scales from `DEMASK_W8A8_MIN_ROWS` (default 17) rows runs the linear
    // layers on the W8A8 path: their FLOPs at the measured FP8 rate, the rest (experts, LM
    // head, attention) at the bf16 rate.
    let linear_flops = 2.0 * rows * linear_params;
    let w8a8_from = crate::quant::w8a8_min_rows_from_env().unwrap_or(crate::quant::W8A8_MIN_ROWS) as f64;
    let fp8_rate = match (format, c.fp8_tflops) {
        (WeightFormat::Fp8(crate::quant::ScaleLayout::Channel), Some(r)) if rows >= w8a8_from => Some(r),
        _ => None,
    };
    // Weights once (the embedding only through its gathered rows), K/V rows read, f32 logits.
    // Scale bytes of the experts are per expert (one f32 per output channel of each).
    let (scale_bytes, expert_scale_bytes) = match format {
        WeightFormat::Bf16 => (0.0, 0.0),
        WeightFormat::Fp8(layout) => {
            let count = |shapes: &[(usize, usize)]| shapes.iter().map(|&(n, k)| layout.count(n, k) as f64).sum::<f64>();
            let attn = count(&[(cfg.qkv_dim(), cfg.hidden), (cfg.hidden, cfg.q_dim())]);
            let ffn = count(&[(2 * df, cfg.hidden), (cfg.hidden, df)]);
            let shared = if sf > 0 { count(&[(2 * sf, cfg.hidden), (cfg.hidden, sf)]) } else { 0.0 };
            let experts = moe_layers * n_experts * count(&[(2 * cfg.ffn, cfg.hidden), (cfg.hidden, cfg.ffn)]);
            (4.0 * (cfg.n_layers as f64 * attn + dense_ffn_layers * ffn + moe_layers * shared), 4.0 * experts)
        }
    };
    let saved = (linear_params + expert_params) * (2.0 - format.bytes_per_weight() as f64);
    // MoE: only the experts the step's rows select are read: the measured fraction, or under
    // uniform routing the expectation 1 − (1 − k/E)^rows (32 random rows of LLaDA-MoE:
    // 98.6 %; a decode block of mask rows routes alike and touches far fewer).
    let untouched_expert_bytes = cfg.moe.as_ref().map_or(0.0, |m| {
        let all = expert_params * format.bytes_per_weight() as f64 + expert_scale_bytes;
        let touched = touched.unwrap_or_else(|| 1.0 - (1.0 - m.top_k as f64 / m.n_experts as f64).powf(rows));
        all * (1.0 - touched.clamp(0.0, 1.0))
    });
    // `DEMASK_FP8_LM_HEAD=1` (FP8 models, steps of few logit rows): the LM head is read as
    // E4M3 codes plus one f32 scale per vocabulary row.
    let fp8_head = matches!(format, WeightFormat::Fp8(_))
        && crate::quant::fp8_lm_head_from_env().unwrap_or(false)
        && logit_rows * batch <= crate::quant::FP8_LM_HEAD_MAX_ROWS;
    let head_saved = if fp8_head { cfg.vocab as f64 * (h - 4.0) } else { 0.0 };
    let weight_bytes = cfg.param_count() as f64 * 2.0 - cfg.vocab as f64 * h * 2.0 - saved + scale_bytes + expert_scale_bytes
        - untouched_expert_bytes
        - head_saved;
    let kv_bytes = 2.0 * (batch * kv_len) as f64 * cfg.kv_dim() as f64 * 2.0 * cfg.n_layers as f64;
    let logit_bytes = (logit_rows * batch) as f64 * cfg.vocab as f64 * 4.0;
    let bytes = weight_bytes + kv_bytes + logit_bytes;
    let t_flops = match fp8_rate {
        Some(r) => (linear_flops / (r * 1e12) + (flops - linear_flops) / (c.gemm_tflops * 1e12)) * 1e3,
        None => flops / (c.gemm_tflops * 1e12) * 1e3,
    };
    let t_bytes = bytes / (c.copy_gbps * 1e9) * 1e3;
    let (floor_ms, bound) = if t_flops >= t_bytes { (t_flops, "compute") } else { (t_bytes, "memory") };
    Roofline { flops, bytes, floor_ms, bound }
}

/// Runs a decode workload on `engine` and times its steps. The first `warmup_steps` steps
/// (GEMM autotuning, first-touch) are excluded from the step statistics.
pub fn run_decode(
    engine: &mut crate::engine::Engine,
    spec: &DecodeSpec,
    warmup_steps: usize,
    ceilings: Option<&Ceilings>,
) -> crate::error::Result<DecodeRow> {
    use crate::engine::{Prompt, Request};
    let cfg = engine.config().clone();
    let policy: crate::decode::Policy = spec.policy.parse()?;
    let cache: crate::cache::CacheScheme = spec.cache.parse()?;
    let reqs: Vec<Request> = (0..spec.batch)
        .map(|i| {
            let prompt = synthetic_tokens(spec.prompt_len, cfg.vocab.min(cfg.mask_id as usize), 1000 + i as u64);
            let mut r =
                Request::new(Prompt::Ids(prompt)).gen_len(spec.gen_len as u32).block_len(spec.block_len as u32).policy(policy);
            r.stop_at_eos = false;
            r.seed = i as u64;
            r.cache = cache;
            r
        })
        .collect();
    // MoE on the GPU: count the experts each layer's routing touches (the floor's bytes).
    let counting = cfg.moe.is_some() && engine.set_expert_stats(true)?;
    let t0 = std::time::Instant::now();
    let outs = engine.generate(&reqs)?;
    let wall = t0.elapsed().as_secs_f64();
    let experts_touched = match (counting, engine.expert_stats()?, &cfg.moe) {
        (true, Some((touched, forwards)), Some(m)) if forwards > 0 => {
            Some(touched as f64 / (forwards as f64 * m.n_experts as f64))
        }
        _ => None,
    };
    if counting {
        engine.set_expert_stats(false)?;
    }
    let o = &outs[0];
    let skip = warmup_steps.min(o.step_ms.len().saturating_sub(1));
    let step = Stats::of(&o.step_ms[skip..]);
    let generated: usize = outs.iter().map(|o| o.generated_tokens).sum();
    let live: Vec<f64> = o.rows_per_step.iter().skip(skip).map(|&r| r as f64).collect();
    let live_rows_avg = if live.is_empty() { (spec.prompt_len + spec.gen_len) as f64 } else { live.iter().sum::<f64>() / live.len() as f64 };
    let (roofline, pct) = match ceilings {
        Some(c) => {
            // Steps differ (a cached block's full first step vs its partial steps), so the floor
            // of the average step (average live rows) is compared with the mean step time.
            let format: WeightFormat = spec.weights.parse()?;
            let r = step_roofline_as(
                &cfg,
                format,
                spec.batch,
                live_rows_avg,
                spec.prompt_len + spec.gen_len,
                spec.block_len,
                experts_touched,
                c,
            );
            let pct = r.floor_ms / step.mean_ms;
            (Some(r), Some(pct))
        }
        None => (None, None),
    };
    Ok(DecodeRow {
        spec: spec.clone(),
        model: String::new(),
        device: engine.device().to_string(),
        steps: o.steps,
        step,
        tokens_per_s: generated as f64 / wall,
        live_rows_avg,
        roofline,
        pct_of_floor: pct,
        peak_mem_bytes: None,
        experts_touched,
    })
}

#[cfg(test)]
#[path = "bench_tests.rs"]
mod tests;
