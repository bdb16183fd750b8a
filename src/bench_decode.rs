//! `demask bench --workload w1|w2|w3|w5|w6|w7`: decode steps through the engine, one row per
//! (batch, tokens per step, cache scheme), on the GPU or the CPU backend.
use anyhow::{bail, Result};

use demask::bench;

use crate::bench_cli::{BenchArgs, Device, Plan};

/// A decode workload's own values, before the flags override them.
struct Workload {
    batches: Vec<usize>,
    prompt_len: usize,
    caches: Vec<&'static str>,
}

fn workload(w: &str) -> Result<Workload> {
    let (batches, prompt_len, caches) = match w {
        "w1" => (vec![1], 256, vec!["none", "prefix", "dual", "dkv:4"]),
        "w2" => (vec![8, 32, 64], 256, vec!["dual"]),
        "w3" => (vec![1, 32], 256, vec!["none", "dual"]),
        "w5" => (vec![1], 3840, vec!["dual"]),
        "w6" => (vec![1, 32], 256, vec!["dual"]),
        // LLaDA2: block diffusion with the exact block cache.
        "w7" => (vec![1, 32], 256, vec!["block"]),
        other => bail!("unknown --workload `{other}` (w1, w2, w3, w4, w5, w6, w7)"),
    };
    Ok(Workload { batches, prompt_len, caches })
}

/// The decode workload `w` with the flags applied, as a list of specs: every (batch, tokens per
/// step, cache) once per `--weights` format, in the order listed, each spec naming its one
/// format. Refuses a canvas longer than the model's context.
fn decode_specs(a: &BenchArgs, w: &str, plan: &Plan) -> Result<Vec<bench::DecodeSpec>> {
    let formats = crate::bench_cli::weight_formats(a)?;
    let wl = workload(w)?;
    let batches = if a.batch.is_empty() { wl.batches } else { a.batch.clone() };
    let caches: Vec<String> =
        if a.cache.is_empty() { wl.caches.iter().map(|s| s.to_string()).collect() } else { a.cache.clone() };
    for c in &caches {
        c.parse::<demask::cache::CacheScheme>().map_err(|e| anyhow::anyhow!("--cache {c}: {e}"))?;
    }
    let prompt_len = a.prompt_len.unwrap_or(wl.prompt_len);
    let gen_len = a.gen_len.unwrap_or(256);
    let block_len = a.block_len.unwrap_or(32);
    if !gen_len.is_multiple_of(block_len) {
        bail!("--block-len {block_len} must divide --gen-len {gen_len}");
    }
    let ctx = plan.cfg.max_seq_len;
    if prompt_len + gen_len > ctx {
        bail!(
            "{w}'s canvas (prompt {prompt_len} + gen {gen_len} = {}) exceeds {}'s context of {ctx} tokens; \
             pass --prompt-len and --gen-len that sum to at most {ctx}",
            prompt_len + gen_len,
            plan.name
        );
    }
    let tps = if a.tokens_per_step.is_empty() { vec![1, 4] } else { a.tokens_per_step.clone() };
    if let Some(t) = tps.iter().find(|&&t| t == 0 || !block_len.is_multiple_of(t)) {
        bail!("--tokens-per-step {t} must divide --block-len {block_len}");
    }
    let mut specs = Vec::new();
    for format in &formats {
        for &batch in &batches {
            for &t in &tps {
                for c in &caches {
                    specs.push(bench::DecodeSpec {
                        workload: w.to_uppercase(),
                        batch,
                        prompt_len,
                        gen_len,
                        block_len,
                        policy: format!("schedule:{}", block_len / t),
                        cache: c.clone(),
                        weights: format.to_string(),
                    });
                }
            }
        }
    }
    Ok(specs)
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
    for r in rows.iter().filter(|r| r.experts_touched.is_some()) {
        let s = &r.spec;
        println!(
            "  {} batch {} {} {}: a forward read {:.1} % of the expert weights (measured; the floor counts those bytes)",
            s.workload,
            s.batch,
            s.policy,
            s.cache,
            100.0 * r.experts_touched.unwrap_or(0.0)
        );
    }
}

pub fn run(a: &BenchArgs, w: &str, device: Device, plan: Plan) -> Result<()> {
    use demask::engine::{Engine, EngineOptions};
    let specs = decode_specs(a, w, &plan)?;
    let warmup = a.warmup.unwrap_or(3);
    // `--weights bf16,fp8`: each format's specs in turn, one engine at a time.
    let formats = crate::bench_cli::weight_formats(a)?;
    let mut rows = Vec::new();
    // Runs the specs of `format` on `engine` into `rows` (device memory in use from `mem`, on
    // the GPU).
    let mut run_specs = |engine: &mut Engine,
                         ceil: Option<&bench::Ceilings>,
                         format: demask::quant::WeightFormat,
                         mem: Option<&dyn Fn() -> Result<usize>>|
     -> Result<()> {
        let name = format.to_string();
        for spec in specs.iter().filter(|s| s.weights == name) {
            eprintln!(
                "{} batch {} prompt {} gen {} block {} {} cache {} weights {format}...",
                spec.workload, spec.batch, spec.prompt_len, spec.gen_len, spec.block_len, spec.policy, spec.cache
            );
            let mut r = bench::run_decode(engine, spec, warmup, ceil)?;
            r.model = crate::bench_cli::model_label(&plan.name, format);
            if let Some(m) = mem {
                r.peak_mem_bytes = Some(m()?);
            }
            rows.push(r);
        }
        Ok(())
    };
    let ceilings = match device {
        Device::Cpu => {
            let weights = match &a.model {
                Some(dir) => demask::weights::HostWeights::load(dir)?,
                None => demask::checkpoint::random_weights(&plan.cfg, a.seed),
            };
            let mut engine = Engine::from_weights(weights, None, EngineOptions::default())?;
            // bf16 only (bench_cli refuses FP8 on the CPU).
            run_specs(&mut engine, None, formats[0], None)?;
            None
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
            eprintln!("{}", ceil.line());
            let variants = crate::bench_cli::parse_variants(&a.variant)?;
            let mem = || -> Result<usize> {
                let (free, total) = gpu.mem_info()?;
                Ok(total - free)
            };
            for &format in &formats {
                let cfg = plan.cfg.clone();
                let weights = match &a.model {
                    Some(dir) => GpuWeights::upload_as(&gpu, &demask::weights::HostWeights::load(dir)?, format)?,
                    None => GpuWeights::synthesize_as(&gpu, &cfg, a.seed, format)?,
                };
                eprintln!("weights: {} ({format}), {:.2} GB on the device", plan.name, weights.bytes() as f64 / 1e9);
                let rows_cap = max_batch * max_len;
                let cap = Capacity { rows: rows_cap, logit_rows: max_batch * max_block, cache_rows: rows_cap, seqs: max_batch };
                let mut stepper = GpuStepper::with_weights(gpu.clone(), cfg, weights, cap)?;
                variants.apply(stepper.model_mut());
                eprintln!("variants: {}", variants.describe());
                if let Some(r) = stepper.model().w8a8_min_rows() {
                    eprintln!("FP8 linear layers: the W8A16 kernel below {r} live rows, W8A8 from {r} (DEMASK_W8A8_MIN_ROWS)");
                }
                if stepper.model().fp8_lm_head() {
                    eprintln!(
                        "LM head: an E4M3 copy for steps of up to {} logit rows, bf16 above (DEMASK_FP8_LM_HEAD=1; the floor counts it so)",
                        demask::quant::FP8_LM_HEAD_MAX_ROWS
                    );
                }
                let opts = EngineOptions { max_batch, max_rows: rows_cap, ..Default::default() };
                let dev = format!("{} (cuda:{})", gpu.name, gpu.ordinal);
                let mut engine = Engine::with_backend(Box::new(stepper), None, dev, &opts);
                run_specs(&mut engine, Some(&ceil), format, Some(&mem))?;
                // The engine (weights, KV cache, workspace) is freed before the next format's.
                drop(engine);
                gpu.synchronize()?;
            }
            Some(ceil)
        }
    };
    if let Some(c) = &ceilings {
        println!("device: {}; copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s", c.device, c.copy_gbps, c.gemm_tflops);
    }
    print_decode_rows(&rows);
    crate::bench_cli::write_json(
        a.json.as_ref(),
        serde_json::json!({ "ceilings": ceilings, "notes": plan.notes, "rows": rows }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use demask::config::ModelConfig;
    use demask::quant::{ScaleLayout, WeightFormat};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn specs(flags: &[&str], preset: &str) -> Vec<bench::DecodeSpec> {
        let a = Cli::parse_from(std::iter::once("bench").chain(flags.iter().copied())).bench;
        let plan = Plan { name: preset.into(), cfg: ModelConfig::preset(preset).unwrap(), notes: Vec::new() };
        decode_specs(&a, &a.workload.clone(), &plan).unwrap()
    }

    /// (batch, prompt, gen, block, policy, cache): a spec without its weight format.
    fn shape(s: &bench::DecodeSpec) -> (usize, usize, usize, usize, String, String) {
        (s.batch, s.prompt_len, s.gen_len, s.block_len, s.policy.clone(), s.cache.clone())
    }

    #[test]
    fn a_list_of_weight_formats_gives_each_spec_one_format() {
        // The GPU run parses each spec's format for its floor (`bench::run_decode`): the
        // H100 run of `--weights bf16,fp8` stopped after its first row on "bf16,fp8".
        let s = specs(&["--workload", "w2", "--batch", "64", "--tokens-per-step", "4", "--weights", "bf16,fp8"], "llada-8b");
        let formats: Vec<WeightFormat> =
            s.iter().map(|s| s.weights.parse().unwrap_or_else(|e| panic!("spec weights `{}`: {e}", s.weights))).collect();
        assert_eq!(formats, [WeightFormat::Bf16, WeightFormat::Fp8(ScaleLayout::Channel)]);
        assert_eq!(shape(&s[0]), shape(&s[1]));
        // Every (batch, tokens per step, cache) once per format, in the order listed.
        let s = specs(&["--workload", "w1", "--weights", "fp8-block,bf16"], "llada-8b");
        assert_eq!(s.len(), 2 * 2 * 4, "w1: 2 tokens-per-step × 4 caches, per format");
        let (a, b) = s.split_at(8);
        assert!(a.iter().all(|s| s.weights == "fp8-block") && b.iter().all(|s| s.weights == "bf16"));
        assert_eq!(a.iter().map(shape).collect::<Vec<_>>(), b.iter().map(shape).collect::<Vec<_>>());
        // One format: the specs as before, each naming it.
        let s = specs(&["--workload", "w7", "--batch", "1"], "tiny-llada2");
        assert_eq!((s.len(), s[0].cache.as_str()), (2, "block"));
        assert!(s.iter().all(|s| s.weights == "bf16"));
    }
}
