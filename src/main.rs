//! The `demask` command line: make-checkpoint, inspect, bench, profile, generate, doctor.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use demask::bench::{self, ForwardRow, Stats};
use demask::config::{ModelConfig, PRESETS};

mod generate_cli;

#[derive(Parser)]
#[command(name = "demask", version, about = "Fast decoding engine for masked diffusion language models (LLaDA, Dream)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a random-weight checkpoint in the exact Hugging Face layout.
    MakeCheckpoint {
        /// Architecture: tiny-llada, tiny-dream, llada-8b, dream-7b.
        #[arg(long)]
        preset: String,
        /// Seed of the weights (same seed, same bits).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Replace a checkpoint already in --out.
        #[arg(long)]
        overwrite: bool,
    },
    /// Print a checkpoint's architecture, size and any problem found (reads headers only).
    Inspect {
        #[arg(long)]
        model: PathBuf,
    },
    /// Benchmark the workloads of BENCH.md on synthetic or real weights: W4 (one full-canvas
    /// forward, default) or decode steps with cache schemes (W1, W2, W3, W5).
    Bench(BenchArgs),
    /// Per-kernel time of a forward (full canvas, or a decode step with --live), with kernel
    /// variants side by side.
    Profile(ProfileArgs),
    /// Decode a prompt: masked diffusion generation with a commit policy.
    Generate(generate_cli::GenerateArgs),
    /// Print the device, the kernels in this build and the measured ceilings.
    Doctor,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// w4: one full-canvas forward per length (default). w1: decode steps (batch 1, prompt 256,
    /// gen 256, block 32, schedule at --tokens-per-step, each --cache scheme); w2: w1 at
    /// --batch 8,32,64; w3: w1 on dream-7b; w5: prompt 3840, dual. Flags below override.
    #[arg(long, default_value = "w4")]
    workload: String,
    /// Decode workloads: prompt tokens per sequence.
    #[arg(long)]
    prompt_len: Option<usize>,
    /// Decode workloads: generated tokens per sequence.
    #[arg(long)]
    gen_len: Option<usize>,
    /// Decode workloads: block length.
    #[arg(long)]
    block_len: Option<usize>,
    /// Decode workloads: tokens committed per step (policy schedule:block_len/N).
    #[arg(long, value_delimiter = ',')]
    tokens_per_step: Vec<usize>,
    /// Decode workloads: cache schemes to time (none, prompt, prefix, dual, dkv:R, dkv-greedy:W).
    #[arg(long, value_delimiter = ',')]
    cache: Vec<String>,
    /// Decode workloads: batch sizes (overrides --batch).
    #[arg(long, value_delimiter = ',')]
    batches: Vec<usize>,
    /// Built-in architecture with random weights synthesised on the device.
    #[arg(long, default_value = "llada-8b", conflicts_with = "model")]
    preset: String,
    /// A checkpoint directory instead of a preset.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Canvas lengths (rows per sequence) to time.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    lengths: Vec<usize>,
    /// Sequences per forward.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed forwards per length (median reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// auto (GPU if usable, else the CPU backend on tiny-llada), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Kernel variants, e.g. attention=reference or gemm=cublaslt (repeatable).
    #[arg(long)]
    variant: Vec<String>,
    /// Also write the results as one JSON document.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// Built-in architecture with random weights synthesised on the device.
    #[arg(long, default_value = "llada-8b")]
    preset: String,
    /// Canvas length (rows per sequence, the keys every live row attends to).
    #[arg(long, default_value_t = 512)]
    len: usize,
    /// Live rows per sequence (default: all of --len, the full-canvas forward W4). A decode
    /// step of the `dual` cache is `--live 32` (block_len rows), logits for each live row.
    #[arg(long)]
    live: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Profiled forwards (after 3 warm-up forwards).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Variants to time side by side: attention=flash,reference or gemm=auto,cublaslt,skinny.
    #[arg(long, default_value = "attention=flash")]
    variants: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::MakeCheckpoint { preset, seed, out, overwrite } => make_checkpoint(&preset, seed, &out, overwrite),
        Cmd::Inspect { model } => {
            let report = demask::weights::inspect(&model).with_context(|| format!("inspecting {}", model.display()))?;
            println!("{report}");
            Ok(())
        }
        Cmd::Bench(a) => bench_cmd(a),
        Cmd::Generate(a) => generate_cli::run(a),
        Cmd::Profile(a) => profile_cmd(a),
        Cmd::Doctor => doctor(),
    }
}

fn make_checkpoint(preset: &str, seed: u64, out: &std::path::Path, overwrite: bool) -> Result<()> {
    let cfg = ModelConfig::preset(preset)?;
    let t0 = Instant::now();
    eprintln!(
        "writing {preset} (seed {seed}, {} parameters, {:.2} GB) to {}",
        cfg.param_count(),
        cfg.param_count() as f64 * 2.0 / 1e9,
        out.display()
    );
    let summary = demask::checkpoint::write_checkpoint(&cfg, seed, out, overwrite, |msg: &str| eprintln!("  {msg}"))?;
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
    println!("{summary}");
    Ok(())
}

/// Which device `--device` names, after probing.
enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<demask::gpu::Gpu>),
}

fn pick_device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "auto" | "cuda" => 0,
        s if s.starts_with("cuda:") => s[5..].parse().with_context(|| format!("bad --device {s}"))?,
        s => bail!("bad --device `{s}` (expected auto, cpu, cuda or cuda:N)"),
    };
    #[cfg(feature = "cuda")]
    match demask::gpu::Gpu::new(ordinal) {
        Ok(g) => return Ok(Device::Cuda(g)),
        Err(e) if spec == "auto" => {
            eprintln!("no usable GPU ({e}); running the CPU backend instead");
            return Ok(Device::Cpu);
        }
        Err(e) => return Err(e.into()),
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        if spec == "auto" {
            eprintln!("this build has no GPU backend (feature `cuda` off); running the CPU backend instead");
            return Ok(Device::Cpu);
        }
        bail!("this build has no GPU backend (feature `cuda` off)")
    }
}

fn print_rows(rows: &[ForwardRow]) {
    println!(
        "\n{:<10} {:<12} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "workload", "model", "len", "batch", "median ms", "min ms", "max ms", "floor ms", "% floor", "peak GB"
    );
    for r in rows {
        let (floor, pct) = match (&r.roofline, r.pct_of_floor) {
            (Some(f), Some(p)) => (format!("{:.2}", f.floor_ms), format!("{:.1}", 100.0 * p)),
            _ => ("-".into(), "-".into()),
        };
        let peak = r.peak_mem_bytes.map_or("-".to_string(), |b| format!("{:.2}", b as f64 / 1e9));
        println!(
            "{:<10} {:<12} {:>6} {:>6} {:>10.3} {:>10.3} {:>10.3} {:>10} {:>8} {:>8}",
            r.workload, r.model, r.len, r.batch, r.stats.median_ms, r.stats.min_ms, r.stats.max_ms, floor, pct, peak
        );
    }
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.lengths.is_empty() || a.lengths.contains(&0) {
        bail!("--lengths must be positive");
    }
    if a.batch == 0 || a.iters == 0 {
        bail!("--batch and --iters must be positive");
    }
    let device = pick_device(&a.device)?;
    if a.workload != "w4" {
        return bench_decode_cmd(&a, device);
    }
    let (rows, ceilings): (Vec<ForwardRow>, Option<bench::Ceilings>) = match device {
        Device::Cpu => (bench_cpu(&a)?, None),
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) => {
            let (r, c) = bench_gpu(&a, gpu)?;
            (r, Some(c))
        }
    };
    print_rows(&rows);
    if let Some(path) = &a.json {
        let doc = serde_json::json!({ "ceilings": ceilings, "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn bench_cpu(a: &BenchArgs) -> Result<Vec<ForwardRow>> {
    // The CPU backend runs tiny models only: swap a large preset for tiny-llada.
    let (name, weights) = match &a.model {
        Some(dir) => (dir.display().to_string(), demask::weights::HostWeights::load(dir)?),
        None => {
            let name = if a.preset.starts_with("tiny-") { a.preset.clone() } else { "tiny-llada".to_string() };
            if name != a.preset {
                eprintln!("CPU backend: benchmarking {name} instead of {} (too large for the CPU)", a.preset);
            }
            let cfg = ModelConfig::preset(&name)?;
            (name, demask::checkpoint::random_weights(&cfg, a.seed))
        }
    };
    let model = demask::cpu::forward::CpuModel::new(&weights)?;
    let mut rows = Vec::new();
    for &len in &a.lengths {
        let len = len.min(model.cfg.max_seq_len);
        let seqs: Vec<Vec<u32>> = (0..a.batch).map(|i| bench::synthetic_tokens(len, model.cfg.vocab, 17 + i as u64)).collect();
        let iters = a.iters.min(5);
        let mut times = Vec::new();
        eprint!("cpu forward {name} len {len} batch {}: ", a.batch);
        for _ in 0..iters {
            let t0 = Instant::now();
            let logits = model.forward_full(&seqs)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(logits);
            eprint!(".");
        }
        eprintln!();
        rows.push(ForwardRow {
            workload: "W4-cpu".into(),
            model: name.clone(),
            len,
            batch: a.batch,
            stats: Stats::of(&times),
            roofline: None,
            pct_of_floor: None,
            peak_mem_bytes: None,
        });
    }
    Ok(rows)
}

#[cfg(feature = "cuda")]
fn bench_gpu(a: &BenchArgs, gpu: std::sync::Arc<demask::gpu::Gpu>) -> Result<(Vec<ForwardRow>, bench::Ceilings)> {
    use demask::model::{Capacity, GpuModel, GpuWeights};

    let (attn, gemm) = parse_variants(&a.variant)?;
    eprintln!("device: {} ({} SMs), cuda:{}", gpu.name, gpu.sm_count, gpu.ordinal);
    eprintln!("measuring ceilings...");
    let ceil = bench::gpu::measure_ceilings(&gpu)?;
    eprintln!("ceilings: copy {:.0} GB/s (read+write), bf16 GEMM {:.0} TFLOP/s", ceil.copy_gbps, ceil.gemm_tflops);
    let t0 = Instant::now();
    let (name, cfg, weights) = match &a.model {
        Some(dir) => {
            let hw = demask::weights::HostWeights::load(dir)?;
            let w = GpuWeights::upload(&gpu, &hw)?;
            (dir.display().to_string(), hw.cfg.clone(), w)
        }
        None => {
            let cfg = ModelConfig::preset(&a.preset)?;
            (a.preset.clone(), cfg.clone(), GpuWeights::synthesize(&gpu, &cfg, a.seed)?)
        }
    };
    eprintln!("weights: {name}, {:.2} GB on the device in {:.1} s", weights.bytes() as f64 / 1e9, t0.elapsed().as_secs_f64());
    let max_len = *a.lengths.iter().max().unwrap();
    if max_len > cfg.max_seq_len {
        bail!("length {max_len} exceeds the model's context {}", cfg.max_seq_len);
    }
    let rows_cap = max_len * a.batch;
    let cap = Capacity { rows: rows_cap, logit_rows: rows_cap, cache_rows: rows_cap, seqs: a.batch };
    let mut model = GpuModel::new(gpu.clone(), cfg.clone(), weights, cap)?;
    model.attn_variant = attn;
    model.gemm_variant = gemm;
    let (free, total) = gpu.mem_info()?;
    let mut out = Vec::new();
    for &len in &a.lengths {
        eprintln!("W4 forward len {len} batch {}: {} warm-up + {} timed", a.batch, a.warmup, a.iters);
        let stats = bench::gpu::bench_forward(&mut model, len, a.batch, a.warmup, a.iters)?;
        let roof = bench::forward_roofline(&cfg, len, a.batch, &ceil);
        let pct = roof.floor_ms / stats.median_ms;
        out.push(ForwardRow {
            workload: "W4".into(),
            model: name.clone(),
            len,
            batch: a.batch,
            stats,
            roofline: Some(roof),
            pct_of_floor: Some(pct),
            peak_mem_bytes: Some(total - free),
        });
    }
    println!(
        "device: {} ({} SMs); copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s; variants attention={} gemm={}",
        ceil.device, ceil.sm_count, ceil.copy_gbps, ceil.gemm_tflops, attn.name(), gemm.name()
    );
    Ok((out, ceil))
}

fn doctor() -> Result<()> {
    println!("demask {}", env!("CARGO_PKG_VERSION"));
    println!("presets: {}", PRESETS.join(", "));
    #[cfg(feature = "cuda")]
    {
        println!("kernels: {} modules in this build", demask::gpu::kernel_modules().len());
        match demask::gpu::Gpu::new(0) {
            Ok(g) => {
                let (free, total) = g.mem_info()?;
                println!("device: {} ({} SMs), {:.1} of {:.1} GB free", g.name, g.sm_count, free as f64 / 1e9, total as f64 / 1e9);
                let c = bench::gpu::measure_ceilings(&g)?;
                println!("ceilings: copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s", c.copy_gbps, c.gemm_tflops);
            }
            Err(e) => println!("device: none ({e})"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    println!("kernels: none (built without the `cuda` feature)");
    Ok(())
}

#[cfg(feature = "cuda")]
fn profile_cmd(a: ProfileArgs) -> Result<()> {
    use demask::model::{Capacity, GpuModel, GpuWeights};
    use demask::ops::attention::AttnVariant;
    use demask::ops::gemm::GemmVariant;
    // (attention, gemm) pairs to time: one op's variants side by side, the other at its default.
    let variants: Vec<(AttnVariant, GemmVariant)> = match a.variants.split_once('=') {
        Some(("attention", list)) => list
            .split(',')
            .map(|v| Ok((v.parse()?, GemmVariant::Auto)))
            .collect::<demask::Result<_>>()?,
        Some(("gemm", list)) => list
            .split(',')
            .map(|v| Ok((AttnVariant::Flash, v.parse()?)))
            .collect::<demask::Result<_>>()?,
        _ => bail!("bad --variants `{}` (expected attention=NAME[,NAME...] or gemm=NAME[,NAME...])", a.variants),
    };
    let gpu = demask::gpu::Gpu::new(0)?;
    let ceil = bench::gpu::measure_ceilings(&gpu)?;
    println!("device: {} ({} SMs); copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s", ceil.device, ceil.sm_count, ceil.copy_gbps, ceil.gemm_tflops);
    let cfg = ModelConfig::preset(&a.preset)?;
    let weights = GpuWeights::synthesize(&gpu, &cfg, 0)?;
    let live = a.live.unwrap_or(a.len);
    if live == 0 || live > a.len {
        bail!("--live must be in 1..=--len ({})", a.len);
    }
    let rows = live * a.batch;
    let cap = Capacity { rows, logit_rows: rows, cache_rows: a.len * a.batch, seqs: a.batch };
    let mut model = GpuModel::new(gpu.clone(), cfg.clone(), weights, cap)?;
    // Live rows sit at the canvas's end (a dual step's block of the last gen block).
    let batch = bench::gpu::decode_batch(&cfg, a.len, live, a.len - live, a.batch);
    let work = bench::forward_op_work(&cfg, a.len, a.batch, live);
    for (v, gv) in variants {
        model.attn_variant = v;
        model.gemm_variant = gv;
        model.enable_profiling(false)?;
        let plain = bench::gpu::time_batch(&mut model, &batch, 3, a.iters)?;
        model.enable_profiling(true)?;
        bench::gpu::time_batch(&mut model, &batch, 0, a.iters)?;
        let p = model.profiler.as_ref().unwrap().per_forward();
        let total: f64 = p.iter().map(|x| x.1).sum();
        println!(
            "\n{} len {} live {} batch {}, attention={} gemm={}: {:.3} ms per forward unprofiled (median), {:.3} ms sum of ops profiled",
            a.preset, a.len, live, a.batch, v.name(), gv.name(), plain.median_ms, total
        );
        println!("{:<18} {:>9} {:>7} {:>9} {:>10} {:>9}", "op", "ms", "share", "launches", "TFLOP/s", "GB/s");
        for (name, ms, n) in p {
            let (fl, by) = work.iter().find(|w| w.0 == name).map(|w| (w.1, w.2)).unwrap_or((0.0, 0.0));
            let tf = if fl > 0.0 { format!("{:.0}", fl / (ms * 1e-3) / 1e12) } else { "-".into() };
            let gb = if by > 0.0 { format!("{:.0}", by / (ms * 1e-3) / 1e9) } else { "-".into() };
            println!("{:<18} {:>9.3} {:>6.1}% {:>9.0} {:>10} {:>9}", name, ms, 100.0 * ms / total, n, tf, gb);
        }
        model.enable_profiling(false)?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn profile_cmd(_a: ProfileArgs) -> Result<()> {
    bail!("`demask profile` needs the GPU backend (built without the `cuda` feature)")
}

/// The decode workloads (BENCH.md W1, W2, W3, W5) as a list of specs.
fn decode_specs(a: &BenchArgs) -> Result<(String, Vec<bench::DecodeSpec>)> {
    let w = a.workload.to_ascii_lowercase();
    let (preset, batches, prompt, caches): (&str, Vec<usize>, usize, Vec<&str>) = match w.as_str() {
        "w1" => ("llada-8b", vec![1], 256, vec!["none", "prefix", "dual", "dkv:4"]),
        "w2" => ("llada-8b", vec![8, 32, 64], 256, vec!["dual"]),
        "w3" => ("dream-7b", vec![1, 32], 256, vec!["none", "dual"]),
        "w5" => ("llada-8b", vec![1], 3840, vec!["dual"]),
        other => bail!("unknown --workload `{other}` (w1, w2, w3, w4, w5)"),
    };
    let preset = if a.preset != "llada-8b" || a.model.is_some() { a.preset.as_str() } else { preset };
    let batches = if !a.batches.is_empty() { a.batches.clone() } else if a.batch != 1 { vec![a.batch] } else { batches };
    let caches: Vec<String> = if a.cache.is_empty() { caches.iter().map(|s| s.to_string()).collect() } else { a.cache.clone() };
    let prompt_len = a.prompt_len.unwrap_or(prompt);
    let gen_len = a.gen_len.unwrap_or(256);
    let block_len = a.block_len.unwrap_or(32);
    let tps = if a.tokens_per_step.is_empty() { vec![1, 4] } else { a.tokens_per_step.clone() };
    let mut specs = Vec::new();
    for &batch in &batches {
        for &t in &tps {
            if t == 0 || block_len % t != 0 {
                bail!("--tokens-per-step {t} must divide --block-len {block_len}");
            }
            for c in &caches {
                specs.push(bench::DecodeSpec {
                    workload: w.to_uppercase(),
                    batch,
                    prompt_len,
                    gen_len,
                    block_len,
                    policy: format!("schedule:{}", block_len / t),
                    cache: c.clone(),
                });
            }
        }
    }
    Ok((preset.to_string(), specs))
}

fn print_decode_rows(rows: &[bench::DecodeRow]) {
    println!(
        "\n{:<5} {:<10} {:>5} {:>6} {:>5} {:>5} {:<12} {:<12} {:>6} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "work", "model", "batch", "prompt", "gen", "block", "policy", "cache", "steps", "median ms", "mean ms", "max", "tok/s", "live rows", "% floor", "peak GB"
    );
    for r in rows {
        let s = &r.spec;
        let pct = r.pct_of_floor.map_or("-".to_string(), |p| format!("{:.1}", 100.0 * p));
        let peak = r.peak_mem_bytes.map_or("-".to_string(), |b| format!("{:.2}", b as f64 / 1e9));
        println!(
            "{:<5} {:<10} {:>5} {:>6} {:>5} {:>5} {:<12} {:<12} {:>6} {:>9.3} {:>8.3} {:>8.3} {:>9.1} {:>9.1} {:>8} {:>8}",
            s.workload, r.model, s.batch, s.prompt_len, s.gen_len, s.block_len, s.policy, s.cache, r.steps,
            r.step.median_ms, r.step.mean_ms, r.step.max_ms, r.tokens_per_s, r.live_rows_avg, pct, peak
        );
    }
}

fn bench_decode_cmd(a: &BenchArgs, device: Device) -> Result<()> {
    use demask::engine::{Engine, EngineOptions};
    let (preset, specs) = decode_specs(a)?;
    // The device whose memory use the table reports (None on the CPU).
    #[cfg(feature = "cuda")]
    let mem_gpu = match &device {
        Device::Cuda(g) => Some(g.clone()),
        Device::Cpu => None,
    };
    let (mut engine, ceilings, model_name) = match device {
        Device::Cpu => {
            let name = if preset.starts_with("tiny-") { preset.clone() } else { "tiny-llada".to_string() };
            if name != preset {
                eprintln!("CPU backend: decoding {name} instead of {preset} (too large for the CPU)");
            }
            let w = match &a.model {
                Some(dir) => demask::weights::HostWeights::load(dir)?,
                None => demask::checkpoint::random_weights(&ModelConfig::preset(&name)?, a.seed),
            };
            (Engine::from_weights(w, None, EngineOptions::default())?, None, name)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) => {
            use demask::decode::gpu::GpuStepper;
            use demask::model::{Capacity, GpuWeights};
            let max_batch = specs.iter().map(|s| s.batch).max().unwrap_or(1);
            let max_len = specs.iter().map(|s| s.prompt_len + s.gen_len).max().unwrap_or(1);
            let max_block = specs.iter().map(|s| s.block_len).max().unwrap_or(1);
            eprintln!("device: {} ({} SMs), cuda:{}", gpu.name, gpu.sm_count, gpu.ordinal);
            let ceil = bench::gpu::measure_ceilings(&gpu)?;
            eprintln!("ceilings: copy {:.0} GB/s (read+write), bf16 GEMM {:.0} TFLOP/s", ceil.copy_gbps, ceil.gemm_tflops);
            let (name, cfg, weights) = match &a.model {
                Some(dir) => {
                    let hw = demask::weights::HostWeights::load(dir)?;
                    (dir.display().to_string(), hw.cfg.clone(), GpuWeights::upload(&gpu, &hw)?)
                }
                None => {
                    let cfg = ModelConfig::preset(&preset)?;
                    (preset.clone(), cfg.clone(), GpuWeights::synthesize(&gpu, &cfg, a.seed)?)
                }
            };
            let rows = max_batch * max_len;
            let cap = Capacity { rows, logit_rows: max_batch * max_block, cache_rows: rows, seqs: max_batch };
            let mut stepper = GpuStepper::with_weights(gpu.clone(), cfg, weights, cap)?;
            let (attn, gemm) = parse_variants(&a.variant)?;
            stepper.model_mut().attn_variant = attn;
            stepper.model_mut().gemm_variant = gemm;
            eprintln!("variants: attention={} gemm={}", attn.name(), gemm.name());
            let opts = EngineOptions { max_batch, max_rows: rows, ..Default::default() };
            let dev = format!("{} (cuda:{})", gpu.name, gpu.ordinal);
            (Engine::with_backend(Box::new(stepper), None, dev, &opts), Some(ceil), name)
        }
    };
    let mut rows = Vec::new();
    for spec in &specs {
        eprintln!(
            "{} batch {} prompt {} gen {} block {} {} cache {}...",
            spec.workload, spec.batch, spec.prompt_len, spec.gen_len, spec.block_len, spec.policy, spec.cache
        );
        let mut r = bench::run_decode(&mut engine, spec, 3, ceilings.as_ref())?;
        r.model = model_name.clone();
        #[cfg(feature = "cuda")]
        if let Some(g) = &mem_gpu {
            let (free, total) = g.mem_info()?;
            r.peak_mem_bytes = Some(total - free);
        }
        rows.push(r);
    }
    if let Some(c) = &ceilings {
        println!("device: {}; copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s", c.device, c.copy_gbps, c.gemm_tflops);
    }
    print_decode_rows(&rows);
    if let Some(path) = &a.json {
        let doc = serde_json::json!({ "ceilings": ceilings, "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `--variant op=name` flags: (attention, gemm), defaults flash and auto.
#[cfg(feature = "cuda")]
fn parse_variants(flags: &[String]) -> Result<(demask::ops::attention::AttnVariant, demask::ops::gemm::GemmVariant)> {
    let mut attn = demask::ops::attention::AttnVariant::Flash;
    let mut gemm = demask::ops::gemm::GemmVariant::Auto;
    for v in flags {
        match v.split_once('=') {
            Some(("attention", name)) => attn = name.parse()?,
            Some(("gemm", name)) => gemm = name.parse()?,
            _ => bail!("bad --variant `{v}` (expected attention=flash|reference or gemm=auto|cublaslt|skinny)"),
        }
    }
    Ok((attn, gemm))
}
