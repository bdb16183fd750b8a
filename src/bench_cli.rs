//! `demask bench`: the arguments, what they resolve to on the device at hand, and the runs
//! (W4 full-canvas forwards on the GPU or the CPU backend; decode workloads through the engine).
//!
//! Every argument is honoured or refused with a message naming it. The only substitutions are
//! of defaults the user did not give (the default preset on the CPU backend, default lengths
//! longer than the model's context), and each is printed as a `note:` line and recorded in the
//! JSON report.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use demask::bench::{self, ForwardRow, Stats};
use demask::config::ModelConfig;

/// Largest model the CPU backend runs (its f32 copy must fit comfortably in host memory); the
/// engine's CPU backend has the same bound.
const CPU_MAX_PARAMS: u64 = 2_000_000_000;
const DEFAULT_LENGTHS: [usize; 2] = [512, 2048];
const DEFAULT_ITERS: usize = 20;
const DEFAULT_WARMUP: usize = 3;
const CPU_DEFAULT_ITERS: usize = 5;
const CPU_DEFAULT_WARMUP: usize = 1;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// w4: one full-canvas forward per length and batch (default). w1: decode steps (batch 1,
    /// prompt 256, gen 256, block 32, schedule at --tokens-per-step 1 and 4, caches none, prefix,
    /// dual, dkv:4); w2: w1 at batch 8, 32, 64 with dual; w3: w1 on dream-7b (batch 1, 32; none,
    /// dual); w5: prompt 3840, dual; w6: w1 on llada-moe-7b (batch 1, 32; dual); w7: w1 on
    /// llada2-mini (batch 1, 32; block diffusion with the exact block cache). The decode flags
    /// below override a workload's values.
    #[arg(long, default_value = "w4")]
    pub workload: String,
    /// Decode workloads: prompt tokens per sequence.
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// Decode workloads: generated tokens per sequence (default 256).
    #[arg(long)]
    pub gen_len: Option<usize>,
    /// Decode workloads: block length (default 32).
    #[arg(long)]
    pub block_len: Option<usize>,
    /// Decode workloads: tokens committed per step, e.g. 1,4 (policy schedule:block_len/N).
    #[arg(long, value_delimiter = ',')]
    pub tokens_per_step: Vec<usize>,
    /// Decode workloads: cache schemes to time (none, prompt, prefix, dual, dkv:R, dkv-greedy:W,
    /// block for LLaDA2).
    #[arg(long, value_delimiter = ',')]
    pub cache: Vec<String>,
    /// Sequences per forward or decode batch sizes, e.g. 1 or 8,32,64 (each is timed). Default:
    /// 1 for w4, the workload's sizes for the decode workloads.
    #[arg(long = "batch", alias = "batches", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Built-in architecture with random weights (llada-8b, dream-7b, llada-moe-7b, llada2-mini,
    /// tiny-llada, tiny-dream, tiny-llada-moe, tiny-llada2). Default: llada-8b (dream-7b for w3,
    /// llada-moe-7b for w6, llada2-mini for w7). The CPU backend runs the tiny presets only.
    #[arg(long, conflicts_with = "model")]
    pub preset: Option<String>,
    /// A checkpoint directory instead of a preset.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// w4: canvas lengths (rows per sequence) to time [default: 512,2048].
    #[arg(long, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// w4: timed forwards per length and batch, median reported [default: 20; 5 on the CPU].
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed warm-up: w4 forwards per length [default: 3; 1 on the CPU], or the steps a
    /// decode run leaves out of its statistics [default: 3].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// auto (the GPU if usable, else the CPU backend on a tiny preset), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// GPU kernel variants, e.g. attention=reference, gemm=cublaslt or moe=reference (repeatable).
    #[arg(long)]
    pub variant: Vec<String>,
    /// Also write the results as one JSON document.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Linear-layer weights: bf16, fp8 (E4M3, per-output-channel scales) or fp8-block
    /// (128×128 block scales); GPU only. The floor then counts the FP8 bytes. Decode workloads
    /// take a list, e.g. bf16,fp8: every row for each format in turn, in one process and table.
    #[arg(long, default_value = "bf16")]
    pub weights: String,
}

/// Which device `--device` names, after probing.
pub enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<demask::gpu::Gpu>),
}

impl Device {
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }
}

/// Opens the device `spec` names. `auto` falls back to the CPU backend with a printed reason;
/// `cuda`/`cuda:N` without a usable GPU is an error that says what to pass instead.
pub fn pick_device(spec: &str) -> Result<Device> {
    let ordinal: usize = match spec {
        "cpu" => return Ok(Device::Cpu),
        "auto" | "cuda" => 0,
        s if s.starts_with("cuda:") => {
            s[5..].parse().with_context(|| format!("--device `{s}`: expected cuda:N with N a device number"))?
        }
        s => bail!("--device `{s}`: expected auto, cpu, cuda or cuda:N"),
    };
    #[cfg(feature = "cuda")]
    match demask::gpu::Gpu::new(ordinal) {
        Ok(g) => Ok(Device::Cuda(g)),
        Err(e) if spec == "auto" => {
            eprintln!("no usable GPU ({e}); running the CPU backend instead");
            Ok(Device::Cpu)
        }
        Err(e) => bail!("--device {spec}: {e}; pass --device cpu to use the CPU backend"),
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        if spec == "auto" {
            eprintln!("this build has no GPU backend (feature `cuda` off); running the CPU backend instead");
            return Ok(Device::Cpu);
        }
        bail!("--device {spec}: this build has no GPU backend (feature `cuda` off); pass --device cpu")
    }
}

/// What a run will do once the arguments are resolved against the device and the model.
pub struct Plan {
    /// The preset or checkpoint directory as printed.
    pub name: String,
    pub cfg: ModelConfig,
    /// Lines saying what was substituted for a default and why (printed, and in the JSON).
    pub notes: Vec<String>,
}

impl Plan {
    pub fn note(&mut self, msg: String) {
        eprintln!("note: {msg}");
        self.notes.push(msg);
    }
}

fn workload_preset(workload: &str) -> &'static str {
    match workload {
        "w3" => "dream-7b",
        "w6" => "llada-moe-7b",
        "w7" => "llada2-mini",
        _ => "llada-8b",
    }
}

/// Argument checks that need neither the device nor the model.
fn check_args(a: &BenchArgs) -> Result<String> {
    let w = a.workload.to_ascii_lowercase();
    if !matches!(w.as_str(), "w1" | "w2" | "w3" | "w4" | "w5" | "w6" | "w7") {
        bail!("unknown --workload `{}` (expected w1, w2, w3, w4, w5, w6 or w7)", a.workload);
    }
    if let Some(p) = &a.preset {
        ModelConfig::preset(p).with_context(|| format!("--preset {p}"))?;
    }
    if a.lengths.contains(&0) {
        bail!("--lengths must be positive (got {:?})", a.lengths);
    }
    if a.batch.contains(&0) {
        bail!("--batch must be positive (got {:?})", a.batch);
    }
    if a.iters == Some(0) {
        bail!("--iters must be positive");
    }
    for (flag, v) in [("--prompt-len", a.prompt_len), ("--gen-len", a.gen_len), ("--block-len", a.block_len)] {
        if v == Some(0) {
            bail!("{flag} must be positive");
        }
    }
    let decode_flags = [
        ("--prompt-len", a.prompt_len.is_some()),
        ("--gen-len", a.gen_len.is_some()),
        ("--block-len", a.block_len.is_some()),
        ("--tokens-per-step", !a.tokens_per_step.is_empty()),
        ("--cache", !a.cache.is_empty()),
    ];
    if w == "w4" {
        if let Some((flag, _)) = decode_flags.iter().find(|f| f.1) {
            bail!("{flag} applies to the decode workloads (--workload w1, w2, w3, w5, w6 or w7), not to w4 (full-canvas forwards)");
        }
    } else {
        if !a.lengths.is_empty() {
            bail!("--lengths applies to w4; a decode workload's canvas is --prompt-len + --gen-len");
        }
        if a.iters.is_some() {
            bail!(
                "--iters applies to w4; a decode workload times every step of one generate \
                 (gen_len / tokens-per-step steps per block; set them with --gen-len and --tokens-per-step)"
            );
        }
    }
    if let Some(path) = &a.json {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent.filter(|p| !p.is_dir()) {
            bail!("--json {}: directory {} does not exist", path.display(), dir.display());
        }
    }
    Ok(w)
}

/// The model to run: `--model`, `--preset`, or the workload's default preset. On the CPU an
/// explicit model too large for it is refused; the default preset becomes the tiny preset of
/// the same architecture, with a note.
fn resolve_model(a: &BenchArgs, workload: &str, device: &Device, auto: bool) -> Result<Plan> {
    let no_gpu = if auto { " and there is no usable GPU" } else { "" };
    if let Some(dir) = &a.model {
        let cfg = ModelConfig::from_dir(dir).with_context(|| format!("--model {}", dir.display()))?;
        if device.is_cpu() && cfg.param_count() > CPU_MAX_PARAMS {
            bail!(
                "--model {}: {} parameters is too large for the CPU backend (limit {CPU_MAX_PARAMS}){no_gpu}; \
                 pass a tiny checkpoint (demask make-checkpoint --preset tiny-llada --out DIR) or run on a GPU",
                dir.display(),
                cfg.param_count()
            );
        }
        return Ok(Plan { name: dir.display().to_string(), cfg, notes: Vec::new() });
    }
    if let Some(p) = &a.preset {
        let cfg = ModelConfig::preset(p)?;
        if device.is_cpu() && cfg.param_count() > CPU_MAX_PARAMS {
            bail!(
                "--preset {p}: {} parameters is too large for the CPU backend, which runs the tiny presets only{no_gpu}; \
                 pass --device cpu --preset tiny-llada (or tiny-dream, tiny-llada-moe, tiny-llada2) to benchmark the CPU backend, or run on a GPU",
                cfg.param_count()
            );
        }
        return Ok(Plan { name: p.clone(), cfg, notes: Vec::new() });
    }
    let default = workload_preset(workload);
    if !device.is_cpu() {
        return Ok(Plan { name: default.to_string(), cfg: ModelConfig::preset(default)?, notes: Vec::new() });
    }
    let tiny = match default {
        "dream-7b" => "tiny-dream",
        "llada-moe-7b" => "tiny-llada-moe",
        "llada2-mini" => "tiny-llada2",
        _ => "tiny-llada",
    };
    let mut plan = Plan { name: tiny.to_string(), cfg: ModelConfig::preset(tiny)?, notes: Vec::new() };
    plan.note(format!(
        "benchmarking {tiny} on the CPU backend instead of the default preset {default}{}: \
         an {default} model is too large for the f32 CPU backend (pass --device cpu --preset {tiny} to ask for this directly)",
        if auto { " (no usable GPU)" } else { "" }
    ));
    Ok(plan)
}

/// W4 lengths: explicit ones must fit the model's context; the defaults are capped at it.
fn resolve_lengths(a: &BenchArgs, plan: &mut Plan) -> Result<Vec<usize>> {
    let ctx = plan.cfg.max_seq_len;
    if !a.lengths.is_empty() {
        if let Some(&l) = a.lengths.iter().find(|&&l| l > ctx) {
            bail!(
                "--lengths {l} exceeds {}'s context of {ctx} tokens; pass lengths up to {ctx} (e.g. --lengths {})",
                plan.name,
                DEFAULT_LENGTHS[0].min(ctx)
            );
        }
        return Ok(a.lengths.clone());
    }
    let mut lengths: Vec<usize> = DEFAULT_LENGTHS.iter().copied().filter(|&l| l <= ctx).collect();
    if lengths.len() < DEFAULT_LENGTHS.len() {
        if !lengths.contains(&ctx) {
            lengths.push(ctx);
        }
        let list = |v: &[usize]| v.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",");
        plan.note(format!(
            "lengths {} instead of the default {} ({}'s context is {ctx} tokens)",
            list(&lengths),
            list(&DEFAULT_LENGTHS),
            plan.name
        ));
    }
    Ok(lengths)
}

use demask::quant::WeightFormat;

/// `--weights` parsed: one format or a comma-separated list (each once).
pub fn weight_formats(a: &BenchArgs) -> Result<Vec<WeightFormat>> {
    let mut v: Vec<WeightFormat> = Vec::new();
    for s in a.weights.split(',').map(str::trim) {
        let f: WeightFormat = s.parse().map_err(|e| anyhow::anyhow!("--weights: {e}"))?;
        if v.contains(&f) {
            bail!("--weights {}: {f} is listed twice", a.weights);
        }
        v.push(f);
    }
    Ok(v)
}

/// `--weights` as one format (W4 forwards take one).
pub fn weight_format(a: &BenchArgs) -> Result<WeightFormat> {
    match weight_formats(a)?[..] {
        [f] => Ok(f),
        _ => bail!("--weights {}: a list of formats applies to the decode workloads; W4 takes one", a.weights),
    }
}

/// The model column of a table row: the preset, with the weight format when not bf16.
pub fn model_label(name: &str, format: WeightFormat) -> String {
    if format == WeightFormat::Bf16 {
        name.to_string()
    } else {
        format!("{name}/{format}")
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    let workload = check_args(&a)?;
    let device = pick_device(&a.device)?;
    let formats = weight_formats(&a)?;
    if let Some(format) = formats.iter().find(|&&f| f != WeightFormat::Bf16).filter(|_| device.is_cpu()) {
        bail!("--weights {format}: FP8 weights run on the GPU only (drop --weights or run on a GPU)");
    }
    if device.is_cpu() && !a.variant.is_empty() {
        bail!("--variant selects GPU kernels; the CPU backend has no variants (drop --variant or run on a GPU)");
    }
    let mut plan = resolve_model(&a, &workload, &device, a.device == "auto")?;
    if workload != "w4" {
        return crate::bench_decode::run(&a, &workload, device, plan);
    }
    weight_format(&a)?;
    let lengths = resolve_lengths(&a, &mut plan)?;
    let batches = if a.batch.is_empty() { vec![1] } else { a.batch.clone() };
    // The CPU backend is ~1000x slower than a GPU: fewer forwards by default, said so.
    let (def_iters, def_warmup) = if device.is_cpu() { (CPU_DEFAULT_ITERS, CPU_DEFAULT_WARMUP) } else { (DEFAULT_ITERS, DEFAULT_WARMUP) };
    if device.is_cpu() && (a.iters.is_none() || a.warmup.is_none()) {
        plan.note(format!(
            "CPU backend: {} timed forwards after {} warm-up per length (GPU defaults {DEFAULT_ITERS} and {DEFAULT_WARMUP}; set --iters / --warmup)",
            a.iters.unwrap_or(def_iters),
            a.warmup.unwrap_or(def_warmup)
        ));
    }
    let iters = a.iters.unwrap_or(def_iters);
    let warmup = a.warmup.unwrap_or(def_warmup);
    let w4 = W4 { lengths, batches, iters, warmup };
    let (rows, ceilings): (Vec<ForwardRow>, Option<bench::Ceilings>) = match device {
        Device::Cpu => (bench_cpu(&a, &plan, &w4)?, None),
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) => {
            let (r, c) = bench_gpu(&a, &plan, &w4, gpu)?;
            (r, Some(c))
        }
    };
    print_rows(&rows);
    write_json(a.json.as_ref(), serde_json::json!({ "ceilings": ceilings, "notes": plan.notes, "rows": rows }))
}

pub fn write_json(path: Option<&PathBuf>, doc: serde_json::Value) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The resolved W4 run: every length × batch, `warmup` untimed then `iters` timed forwards.
struct W4 {
    lengths: Vec<usize>,
    batches: Vec<usize>,
    iters: usize,
    warmup: usize,
}

fn print_rows(rows: &[ForwardRow]) {
    let mw = rows.iter().map(|r| r.model.len()).max().unwrap_or(0).max(12);
    println!(
        "\n{:<10} {:<mw$} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "workload", "model", "len", "batch", "median ms", "min ms", "max ms", "floor ms", "% floor", "peak GB"
    );
    for r in rows {
        let (floor, pct) = match (&r.roofline, r.pct_of_floor) {
            (Some(f), Some(p)) => (format!("{:.2}", f.floor_ms), format!("{:.1}", 100.0 * p)),
            _ => ("-".into(), "-".into()),
        };
        let peak = r.peak_mem_bytes.map_or("-".to_string(), |b| format!("{:.2}", b as f64 / 1e9));
        println!(
            "{:<10} {:<mw$} {:>6} {:>6} {:>10.3} {:>10.3} {:>10.3} {:>10} {:>8} {:>8}",
            r.workload, r.model, r.len, r.batch, r.stats.median_ms, r.stats.min_ms, r.stats.max_ms, floor, pct, peak
        );
    }
}

fn bench_cpu(a: &BenchArgs, plan: &Plan, w4: &W4) -> Result<Vec<ForwardRow>> {
    let weights = match &a.model {
        Some(dir) => demask::weights::HostWeights::load(dir)?,
        None => demask::checkpoint::random_weights(&plan.cfg, a.seed),
    };
    let model = demask::cpu::forward::CpuModel::new(&weights)?;
    let mut rows = Vec::new();
    for &batch in &w4.batches {
        for &len in &w4.lengths {
            let seqs: Vec<Vec<u32>> =
                (0..batch).map(|i| bench::synthetic_tokens(len, model.cfg.vocab, 17 + i as u64)).collect();
            eprint!("cpu forward {} len {len} batch {batch}: {} warm-up + {} timed ", plan.name, w4.warmup, w4.iters);
            for _ in 0..w4.warmup {
                std::hint::black_box(model.forward_full(&seqs)?);
            }
            let mut times = Vec::with_capacity(w4.iters);
            for _ in 0..w4.iters {
                let t0 = Instant::now();
                let logits = model.forward_full(&seqs)?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(logits);
                eprint!(".");
            }
            eprintln!();
            rows.push(ForwardRow {
                workload: "W4-cpu".into(),
                model: plan.name.clone(),
                len,
                batch,
                stats: Stats::of(&times),
                roofline: None,
                pct_of_floor: None,
                peak_mem_bytes: None,
            });
        }
    }
    Ok(rows)
}

#[cfg(feature = "cuda")]
fn bench_gpu(
    a: &BenchArgs,
    plan: &Plan,
    w4: &W4,
    gpu: std::sync::Arc<demask::gpu::Gpu>,
) -> Result<(Vec<ForwardRow>, bench::Ceilings)> {
    use demask::model::{Capacity, GpuModel, GpuWeights};

    let variants = parse_variants(&a.variant)?;
    eprintln!("device: {} ({} SMs), cuda:{}", gpu.name, gpu.sm_count, gpu.ordinal);
    eprintln!("measuring ceilings...");
    let ceil = bench::gpu::measure_ceilings(&gpu)?;
    eprintln!("{}", ceil.line());
    let t0 = Instant::now();
    let cfg = plan.cfg.clone();
    let format = weight_format(a)?;
    let weights = match &a.model {
        Some(dir) => GpuWeights::upload_as(&gpu, &demask::weights::HostWeights::load(dir)?, format)?,
        None => GpuWeights::synthesize_as(&gpu, &cfg, a.seed, format)?,
    };
    eprintln!(
        "weights: {} ({format}), {:.2} GB on the device in {:.1} s",
        plan.name,
        weights.bytes() as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    let max_len = *w4.lengths.iter().max().expect("lengths resolved non-empty");
    let max_batch = *w4.batches.iter().max().expect("batches resolved non-empty");
    let rows_cap = max_len * max_batch;
    let cap = Capacity { rows: rows_cap, logit_rows: rows_cap, cache_rows: rows_cap, seqs: max_batch };
    let mut model = GpuModel::new(gpu.clone(), cfg.clone(), weights, cap)?;
    variants.apply(&mut model);
    let (free, total) = gpu.mem_info()?;
    let mut out = Vec::new();
    for &batch in &w4.batches {
        for &len in &w4.lengths {
            eprintln!("W4 forward len {len} batch {batch}: {} warm-up + {} timed", w4.warmup, w4.iters);
            let stats = bench::gpu::bench_forward(&mut model, len, batch, w4.warmup, w4.iters)?;
            let roof = bench::forward_roofline_as(&cfg, format, len, batch, &ceil);
            let pct = roof.floor_ms / stats.median_ms;
            out.push(ForwardRow {
                workload: "W4".into(),
                model: model_label(&plan.name, format),
                len,
                batch,
                stats,
                roofline: Some(roof),
                pct_of_floor: Some(pct),
                peak_mem_bytes: Some(total - free),
            });
        }
    }
    println!(
        "device: {} ({} SMs); copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s; variants {}",
        ceil.device,
        ceil.sm_count,
        ceil.copy_gbps,
        ceil.gemm_tflops,
        variants.describe()
    );
    Ok((out, ceil))
}

/// The kernel variants `--variant op=name` picks (defaults: flash, auto, grouped).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug)]
pub struct Variants {
    pub attn: demask::ops::attention::AttnVariant,
    pub gemm: demask::ops::gemm::GemmVariant,
    pub moe: demask::ops::moe::MoeGemmVariant,
}

#[cfg(feature = "cuda")]
impl Variants {
    /// Sets them on `model` (a change of variant is a new CUDA-graph shape key).
    pub fn apply(&self, model: &mut demask::model::GpuModel) {
        model.attn_variant = self.attn;
        model.gemm_variant = self.gemm;
        model.moe_variant = self.moe;
    }

    pub fn describe(&self) -> String {
        format!("attention={} gemm={} moe={}", self.attn.name(), self.gemm.name(), self.moe.name())
    }
}

/// `--variant op=name` flags.
#[cfg(feature = "cuda")]
pub fn parse_variants(flags: &[String]) -> Result<Variants> {
    let mut v = Variants {
        attn: demask::ops::attention::AttnVariant::Flash,
        gemm: demask::ops::gemm::GemmVariant::Auto,
        moe: demask::ops::moe::MoeGemmVariant::Grouped,
    };
    for f in flags {
        match f.split_once('=') {
            Some(("attention", name)) => v.attn = name.parse().with_context(|| format!("--variant {f}"))?,
            Some(("gemm", name)) => v.gemm = name.parse().with_context(|| format!("--variant {f}"))?,
            Some(("moe", name)) => v.moe = name.parse().with_context(|| format!("--variant {f}"))?,
            _ => bail!(
                "bad --variant `{f}` (expected attention=flash|reference, gemm=auto|cublaslt|skinny or moe=grouped|reference)"
            ),
        }
    }
    Ok(v)
}
