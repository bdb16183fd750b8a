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

/// The decode workload `w` with the flags applied, as a list of specs; refuses a canvas longer
/// than the model's context.
fn decode_specs(a: &BenchArgs, w: &str, plan: &Plan) -> Result<Vec<bench::DecodeSpec>> {
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
    if gen_len % block_len != 0 {
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
    // The device whose memory use the table reports (None on the CPU).
    #[cfg(feature = "cuda")]
    let mem_gpu = match &device {
        Device::Cuda(g) => Some(g.clone()),
        Device::Cpu => None,
    };
    let (mut engine, ceilings) = match device {
        Device::Cpu => {
            let weights = match &a.model {
                Some(dir) => demask::weights::HostWeights::load(dir)?,
                None => demask::checkpoint::random_weights(&plan.cfg, a.seed),
            };
            (Engine::from_weights(weights, None, EngineOptions::default())?, None)
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
            let cfg = plan.cfg.clone();
            let weights = match &a.model {
                Some(dir) => GpuWeights::upload(&gpu, &demask::weights::HostWeights::load(dir)?)?,
                None => GpuWeights::synthesize(&gpu, &cfg, a.seed)?,
            };
            let rows = max_batch * max_len;
            let cap = Capacity { rows, logit_rows: max_batch * max_block, cache_rows: rows, seqs: max_batch };
            let mut stepper = GpuStepper::with_weights(gpu.clone(), cfg, weights, cap)?;
            let variants = crate::bench_cli::parse_variants(&a.variant)?;
            variants.apply(stepper.model_mut());
            eprintln!("variants: {}", variants.describe());
            let opts = EngineOptions { max_batch, max_rows: rows, ..Default::default() };
            let dev = format!("{} (cuda:{})", gpu.name, gpu.ordinal);
            (Engine::with_backend(Box::new(stepper), None, dev, &opts), Some(ceil))
        }
    };
    let mut rows = Vec::new();
    for spec in &specs {
        eprintln!(
            "{} batch {} prompt {} gen {} block {} {} cache {}...",
            spec.workload, spec.batch, spec.prompt_len, spec.gen_len, spec.block_len, spec.policy, spec.cache
        );
        let mut r = bench::run_decode(&mut engine, spec, warmup, ceilings.as_ref())?;
        r.model = plan.name.clone();
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
    crate::bench_cli::write_json(
        a.json.as_ref(),
        serde_json::json!({ "ceilings": ceilings, "notes": plan.notes, "rows": rows }),
    )
}
