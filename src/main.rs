//! The `demask` command line: make-checkpoint, inspect, bench, profile, generate, serve, loadgen, doctor.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[cfg(feature = "cuda")]
use demask::bench;
use demask::config::{ModelConfig, PRESETS};
#[cfg(feature = "cuda")]
use demask::model::Ablate;

mod bench_cli;
mod bench_decode;
mod fidelity_cli;
mod generate_cli;
mod serve_cli;

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
        /// Architecture: tiny-llada, tiny-dream, tiny-llada-moe, tiny-llada2, llada-8b, dream-7b,
        /// llada-moe-7b, llada2-mini.
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
        /// bf16, or fp8: linear weights in the published FP8 layout (E4M3 + 128×128
        /// `weight_scale_inv` block scales).
        #[arg(long, default_value = "bf16")]
        weights: String,
    },
    /// Print a checkpoint's architecture, size and any problem found (reads headers and the
    /// tokenizer, not the weights); exits with status 1 when it finds a problem.
    Inspect {
        #[arg(long)]
        model: PathBuf,
    },
    /// Benchmark on synthetic or real weights: W4 (full-canvas forwards, the default) or decode
    /// steps with cache schemes (W1, W2, W3, W5). Without a GPU, the CPU backend on a tiny model.
    Bench(bench_cli::BenchArgs),
    /// Per-kernel time of a forward (full canvas, or a decode step with --live), with kernel
    /// variants side by side.
    Profile(ProfileArgs),
    /// Decode a prompt: masked diffusion generation with a commit policy.
    Generate(generate_cli::GenerateArgs),
    /// Serve the OpenAI API (/v1/completions, /v1/chat/completions, streaming) with
    /// continuous batching.
    Serve(serve_cli::ServeArgs),
    /// Concurrent clients against a running `demask serve`: throughput, latency percentiles.
    Loadgen(serve_cli::LoadgenArgs),
    /// Print the device, the kernels in this build and the measured ceilings.
    Doctor,
    /// Measure FP8 weights against bf16: per-weight, per-layer and final-logit error, per-step commit agreement.
    Fidelity(fidelity_cli::FidelityArgs),
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
    /// Variants to time side by side: attention=flash,reference, gemm=auto,cublaslt,skinny,
    /// moe=grouped,reference (MoE presets), epilogues=fused,unfused (--weights fp8: the W8A8
    /// scale epilogues fused into their consumers or not; same values) or
    /// w8a8=auto,split-scale,stream,skinny,outer-vec,w8a16 (--weights fp8: the W8A8 paths
    /// allowed) or prefetch=0,17,40s,40s+8,40s@side (L2 prefetches of the next GEMMs' weights:
    /// MB after each QKV GEMM, `s` to spread the gate|up share over its rows, `+MB` of the next
    /// QKV weight after each down GEMM, `@side` on a second stream; same values) or
    /// kv-preload=on,off (attention copies the cached keys outside the live rows before it
    /// waits for RoPE; same values).
    #[arg(long, default_value = "attention=flash")]
    variants: String,
    /// Also time each variant's replayed graph with ops left out, to measure what each op
    /// costs inside the forward, overlap with its neighbours included (the per-op table times
    /// an eager forward, launch gaps and all): a comma-separated list of sets, each op or
    /// several joined by + (qkv, o, gate_up, down, attention, rope, head), e.g.
    /// `qkv,o,gate_up,down`. Timing only: such forwards compute nothing meaningful.
    #[arg(long)]
    ablate: Option<String>,
    /// Linear-layer weights: bf16, fp8 or fp8-block (the GEMM rows' GB/s count the weights
    /// as stored: one byte each in FP8, plus the scales).
    #[arg(long, default_value = "bf16")]
    weights: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::MakeCheckpoint { preset, seed, out, overwrite, weights } => {
            let fp8 = fidelity_cli::checkpoint_fp8(&weights)?;
            make_checkpoint(&preset, seed, &out, overwrite)?;
            if fp8 {
                fidelity_cli::convert_to_fp8(&preset, &out)?;
            }
            Ok(())
        }
        Cmd::Inspect { model } => inspect(&model),
        Cmd::Bench(a) => bench_cli::run(a),
        Cmd::Generate(a) => generate_cli::run(a),
        Cmd::Profile(a) => profile_cmd(a),
        Cmd::Serve(a) => serve_cli::serve(a),
        Cmd::Loadgen(a) => serve_cli::loadgen(a),
        Cmd::Doctor => doctor(),
        Cmd::Fidelity(a) => fidelity_cli::run(a),
    }
}

fn inspect(model: &std::path::Path) -> Result<()> {
    let found =
        demask::weights::inspect_checkpoint(model).with_context(|| format!("inspecting {}", model.display()))?;
    print!("{}", found.report);
    match found.problems.len() {
        0 => Ok(()),
        1 => bail!("{}: 1 problem found (listed above)", model.display()),
        n => bail!("{}: {n} problems found (listed above)", model.display()),
    }
}

fn make_checkpoint(preset: &str, seed: u64, out: &std::path::Path, overwrite: bool) -> Result<()> {
    let cfg = ModelConfig::preset(preset).with_context(|| format!("--preset {preset}"))?;
    // Refuse before announcing the write.
    demask::checkpoint::check_output_dir(out, overwrite).with_context(|| format!("--out {}", out.display()))?;
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
    use demask::ops::gemm_w8a8::W8a8Select;
    use demask::ops::moe::MoeGemmVariant;
    use demask::ops::prefetch::L2Prefetch;
    // One op's variants side by side, the others at their defaults (`None`: the model's own).
    #[derive(Clone, Copy)]
    struct Variant {
        attn: AttnVariant,
        gemm: GemmVariant,
        moe: MoeGemmVariant,
        /// The W8A8 epilogues fused or not (`epilogues=`).
        fused: Option<bool>,
        /// The W8A8 paths allowed (`w8a8=`).
        w8a8: Option<W8a8Select>,
        /// The forward's L2 prefetches (`prefetch=`).
        prefetch: Option<L2Prefetch>,
        /// Attention's early copies of the cached keys (`kv-preload=`).
        kv_preload: Option<bool>,
    }
    let base = Variant {
        attn: AttnVariant::Flash,
        gemm: GemmVariant::Auto,
        moe: MoeGemmVariant::Grouped,
        fused: None,
        w8a8: None,
        prefetch: None,
        kv_preload: None,
    };
    let on_off = |v: &str| match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(anyhow::anyhow!("bad kv-preload variant `{v}` (expected on or off)")),
    };
    let fused = |v: &str| match v {
        "fused" => Ok(true),
        "unfused" => Ok(false),
        _ => Err(anyhow::anyhow!("bad epilogues variant `{v}` (expected fused or unfused)")),
    };
    let list = |f: &dyn Fn(&str) -> Result<Variant>| -> Result<Vec<Variant>> {
        a.variants.split_once('=').map_or(Ok(Vec::new()), |(_, l)| l.split(',').map(f).collect())
    };
    let variants: Vec<Variant> = match a.variants.split_once('=').map(|v| v.0) {
        Some("attention") => list(&|v| Ok(Variant { attn: v.parse()?, ..base }))?,
        Some("gemm") => list(&|v| Ok(Variant { gemm: v.parse()?, ..base }))?,
        Some("moe") => list(&|v| Ok(Variant { moe: v.parse()?, ..base }))?,
        Some("epilogues") => list(&|v| Ok(Variant { fused: Some(fused(v)?), ..base }))?,
        Some("w8a8") => list(&|v| Ok(Variant { w8a8: Some(v.parse()?), ..base }))?,
        Some("prefetch") => list(&|v| Ok(Variant { prefetch: Some(v.parse()?), ..base }))?,
        Some("kv-preload") => list(&|v| Ok(Variant { kv_preload: Some(on_off(v)?), ..base }))?,
        _ => bail!(
            "bad --variants `{}` (expected attention=NAME[,NAME...], gemm=NAME[,NAME...], moe=NAME[,NAME...], epilogues=fused,unfused, w8a8=NAME[,NAME...], prefetch=MB[s][+MB][,...] or kv-preload=on,off)",
            a.variants
        ),
    };
    let ablations: Vec<Ablate> = match &a.ablate {
        Some(list) => list.split(',').map(Ablate::parse).collect::<demask::Result<_>>().context("--ablate")?,
        None => Vec::new(),
    };
    // Arguments first: opening the GPU and synthesising 16 GB of weights takes a while.
    let cfg = ModelConfig::preset(&a.preset).with_context(|| format!("--preset {}", a.preset))?;
    if a.len == 0 || a.len > cfg.max_seq_len {
        bail!("--len {} must be in 1..={} ({}'s context)", a.len, cfg.max_seq_len, a.preset);
    }
    let live = a.live.unwrap_or(a.len);
    if live == 0 || live > a.len {
        bail!("--live must be in 1..=--len ({})", a.len);
    }
    if a.batch == 0 || a.iters == 0 {
        bail!("--batch and --iters must be positive");
    }
    let gpu = demask::gpu::Gpu::new(0).context("`demask profile` runs on a GPU")?;
    let ceil = bench::gpu::measure_ceilings(&gpu)?;
    println!("device: {} ({} SMs); copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s", ceil.device, ceil.sm_count, ceil.copy_gbps, ceil.gemm_tflops);
    let format: demask::quant::WeightFormat = a.weights.parse().context("--weights")?;
    let weights = GpuWeights::synthesize_as(&gpu, &cfg, 0, format)?;
    let rows = live * a.batch;
    let cap = Capacity { rows, logit_rows: rows, cache_rows: a.len * a.batch, seqs: a.batch };
    let mut model = GpuModel::new(gpu.clone(), cfg.clone(), weights, cap)?;
    // Live rows sit at the canvas's end (a dual step's block of the last gen block).
    let batch = bench::gpu::decode_batch(&cfg, a.len, live, a.len - live, a.batch);
    let work = bench::forward_op_work_as(&cfg, format, a.len, a.batch, live);
    for Variant { attn: v, gemm: gv, moe: mv, fused, w8a8: sel, prefetch, kv_preload } in variants {
        model.attn_variant = v;
        model.gemm_variant = gv;
        model.moe_variant = mv;
        if let Some(on) = fused {
            model.set_w8a8_fused_epilogues(on).context("--variants epilogues= (needs --weights fp8)")?;
        }
        if let Some(s) = sel {
            model.set_w8a8_select(s).context("--variants w8a8= (needs --weights fp8)")?;
        }
        if let Some(p) = prefetch {
            model.set_l2_prefetch(p).context("--variants prefetch=")?;
        }
        if let Some(on) = kv_preload {
            model.set_kv_preload(on);
        }
        model.enable_profiling(false)?;
        let plain = bench::gpu::time_batch(&mut model, &batch, 3, a.iters)?;
        model.enable_profiling(true)?;
        bench::gpu::time_batch(&mut model, &batch, 0, a.iters)?;
        let p = model.profiler.as_ref().unwrap().per_forward();
        let total: f64 = p.iter().map(|x| x.1).sum();
        println!(
            "\n{} len {} live {} batch {}, attention={} gemm={} moe={}{}: {:.3} ms per forward unprofiled (median), {:.3} ms sum of ops profiled",
            a.preset,
            a.len,
            live,
            a.batch,
            v.name(),
            gv.name(),
            mv.name(),
            fused.map_or(String::new(), |on| format!(" epilogues={}", if on { "fused" } else { "unfused" }))
                + &sel.map_or(String::new(), |s| format!(" w8a8={s}"))
                + &format!(" prefetch={}", model.l2_prefetch())
                + if model.kv_preload() { " kv-preload=on" } else { " kv-preload=off" },
            plain.median_ms,
            total
        );
        println!("{:<18} {:>9} {:>7} {:>9} {:>10} {:>9}", "op", "ms", "share", "launches", "TFLOP/s", "GB/s");
        for (name, ms, n) in p {
            let (fl, by) = work.iter().find(|w| w.0 == name).map(|w| (w.1, w.2)).unwrap_or((0.0, 0.0));
            let tf = if fl > 0.0 { format!("{:.0}", fl / (ms * 1e-3) / 1e12) } else { "-".into() };
            let gb = if by > 0.0 { format!("{:.0}", by / (ms * 1e-3) / 1e9) } else { "-".into() };
            println!("{:<18} {:>9.3} {:>6.1}% {:>9.0} {:>10} {:>9}", name, ms, 100.0 * ms / total, n, tf, gb);
        }
        model.enable_profiling(false)?;
        if !ablations.is_empty() {
            ablate_table(&mut model, &batch, a.iters, &ablations)?;
        }
    }
    Ok(())
}

/// `profile --ablate`: the replayed forward with each set of ops left out against the full
/// one (timed before and after the sets, their mean the baseline), so the difference is what
/// the set costs inside the graph.
#[cfg(feature = "cuda")]
fn ablate_table(model: &mut demask::model::GpuModel, batch: &demask::batch::RowBatch, iters: usize, sets: &[Ablate]) -> Result<()> {
    let time = |m: &mut demask::model::GpuModel, ab: Ablate| -> Result<f64> {
        m.set_ablate(ab);
        Ok(bench::gpu::time_batch(m, batch, 3, iters)?.median_ms)
    };
    let mut rows = Vec::with_capacity(sets.len());
    let before = time(model, Ablate::NONE)?;
    for &s in sets {
        rows.push((s, time(model, s)?));
    }
    let after = time(model, Ablate::NONE)?;
    model.set_ablate(Ablate::NONE);
    let base = 0.5 * (before + after);
    let layers = model.cfg.n_layers as f64;
    println!(
        "\nleft out (replayed graph, median of {iters}; full forward {before:.3} ms before, {after:.3} after): ms saved per forward, µs per launch"
    );
    for (s, ms) in rows {
        // The LM head runs once a forward, the other ops once a layer.
        let per = if s == Ablate::parse("head")? { 1.0 } else { layers };
        println!("{:<18} {:>9.3} ms  {:>7.3} saved  {:>6.1} µs", s.to_string(), ms, base - ms, 1e3 * (base - ms) / per);
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn profile_cmd(_a: ProfileArgs) -> Result<()> {
    bail!("`demask profile` needs the GPU backend (built without the `cuda` feature)")
}
