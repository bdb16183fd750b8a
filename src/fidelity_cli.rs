//! `demask fidelity`: how far a model's FP8 version is from its bf16 weights, on a checkpoint
//! or a preset with random weights — per linear weight, at the final logits (against bf16 and,
//! for models the CPU can run, against the f32 reference), after every transformer block
//! (relative L2 of the residual stream), and per decode step (commit agreement along the bf16
//! model's decodes). With `--w8a8` (CPU) the W8A8 model, activations quantised to E4M3 per row
//! as well, is measured the same way next to the W8A16 one. The measurement is
//! `demask::fp8_fidelity`.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use demask::config::ModelConfig;
use demask::cpu::forward::{ActQuant, CpuModel};
use demask::decode::cpu::CpuStepper;
use demask::fp8_fidelity::{
    commit_agreement, compare_logits, cpu_layer_fidelity_act, fake_quant, CommitAgreement, LayerCmp, LogitCmp, WeightError,
};
use demask::quant::WeightFormat;
use demask::weights::HostWeights;

/// Models the CPU reference runs (f32 copies of the weights).
const CPU_MAX_PARAMS: u64 = 2_000_000_000;
/// Top-2 gap (logit units) under which a row is a near-tie (counted, not compared).
const TIE_GAP: f32 = 0.05;

#[derive(clap::Args)]
pub struct FidelityArgs {
    /// Checkpoint directory (its bf16 weights are the reference).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Or a built-in preset with random weights (tiny-llada, tiny-dream, tiny-llada-moe,
    /// tiny-llada2, llada-8b, dream-7b, llada-moe-7b, llada2-mini).
    #[arg(long)]
    pub preset: Option<String>,
    /// Seed of the random weights and prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// FP8 format to measure: fp8 (per-channel scales) or fp8-block (128×128 blocks).
    #[arg(long, default_value = "fp8")]
    pub weights: String,
    /// auto, cpu or cuda[:N]. The CPU runs the FP8 model as f32 (tiny models).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Also measure the W8A8 model next to W8A16: activations quantised to E4M3 per row at
    /// q|k|v, o, the dense FFN and LLaDA2's shared expert (the GPU's path above 64 rows). f32
    /// CPU and per-channel scales only (--device cpu, --weights fp8).
    #[arg(long)]
    pub w8a8: bool,
    /// Sequences (random prompts) and their prompt length.
    #[arg(long, default_value_t = 3)]
    pub seqs: usize,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Decode: generated tokens, block length and schedule steps per block.
    #[arg(long, default_value_t = 32)]
    pub gen_len: usize,
    #[arg(long, default_value_t = 8)]
    pub block_len: usize,
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn print_logits(what: &str, c: &LogitCmp) {
    println!(
        "{what}: rel L2 {:.4}, worst row {:.4}, top-1 agreement {}/{} ({:.1} %), near-ties {}",
        c.rel_l2,
        c.worst_row_rel,
        c.top1_agree,
        c.top1_rows,
        100.0 * c.agreement(),
        c.near_ties
    );
}

/// One table of per-layer hidden-state errors: a `rel L2` and `worst row` column pair per
/// comparison (`cols`: heading, that comparison's layers).
fn print_layers(title: &str, cols: &[(&str, &[LayerCmp])]) {
    println!("{title}");
    let head: String = cols.iter().map(|(h, _)| format!("  {h:>25}")).collect();
    let sub: String = cols.iter().map(|_| format!("  {:>12} {:>12}", "rel L2", "worst row")).collect();
    println!("{:>5}{head}", "");
    println!("{:>5}{sub}", "layer");
    let n = cols.iter().map(|c| c.1.len()).max().unwrap_or(0);
    for l in 0..n {
        let row: String = cols
            .iter()
            .map(|(_, c)| c.get(l).map_or_else(|| format!("  {:>12} {:>12}", "-", "-"), |x| format!("  {:>12.4} {:>12.4}", x.rel_l2, x.worst_row_rel)))
            .collect();
        println!("{l:>5}{row}");
    }
}

fn print_commits(what: &str, a: &CommitAgreement) {
    println!(
        "commits per step ({what} on the bf16 model's canvas, {} steps): identical sets {}/{} ({:.1} %), same token on {}/{} shared slots",
        a.steps,
        a.same_commits,
        a.seq_steps,
        100.0 * a.fraction(),
        a.same_token,
        a.both_committed
    );
}

fn print_weights(errs: &[WeightError]) {
    let worst = errs.iter().max_by(|a, b| a.rel_err.total_cmp(&b.rel_err));
    let mean = errs.iter().map(|e| e.rel_err).sum::<f64>() / errs.len().max(1) as f64;
    if let Some(w) = worst {
        println!("weights: {} linear weights, relative error mean {mean:.4}, worst {:.4} (layer {} {})", errs.len(), w.rel_err, w.layer, w.name);
    }
}

pub fn run(a: FidelityArgs) -> Result<()> {
    let format: WeightFormat = a.weights.parse().context("--weights")?;
    let WeightFormat::Fp8(layout) = format else { bail!("--weights {format}: pick an FP8 format (fp8 or fp8-block)") };
    let (cfg, host): (ModelConfig, Option<HostWeights>) = match (&a.model, &a.preset) {
        (Some(dir), None) => {
            let w = HostWeights::load(dir).with_context(|| format!("loading {}", dir.display()))?;
            (w.cfg.clone(), Some(w))
        }
        (None, Some(p)) => (ModelConfig::preset(p)?, None),
        _ => bail!("give exactly one of --model and --preset"),
    };
    if a.block_len == 0 || !a.gen_len.is_multiple_of(a.block_len) || a.steps == 0 || a.seqs == 0 {
        bail!("--block-len must divide --gen-len, and --steps and --seqs must be positive");
    }
    if a.w8a8 && layout != demask::quant::ScaleLayout::Channel {
        bail!("--w8a8 with --weights {format}: the W8A8 path takes per-channel scales only (use --weights fp8)");
    }
    let vocab_hi = cfg.vocab.min(cfg.mask_id as usize);
    let prompts: Vec<Vec<u32>> =
        (0..a.seqs).map(|i| demask::bench::synthetic_tokens(a.prompt_len, vocab_hi, a.seed + 100 + i as u64)).collect();
    let small = cfg.param_count() <= CPU_MAX_PARAMS;
    // Small presets get host random weights (so the f32 CPU reference sees the same model);
    // large ones are synthesised on the device.
    let host = host.or_else(|| small.then(|| demask::checkpoint::random_weights(&cfg, a.seed)));
    let device = crate::bench_cli::pick_device(&a.device)?;
    if a.w8a8 && !matches!(device, crate::bench_cli::Device::Cpu) {
        bail!("--w8a8 measures the f32 CPU model: use --device cpu (on a GPU, --weights fp8 already runs W8A8 above 64 rows)");
    }
    println!("fidelity of {format} ({}) against bf16: {}", layout.name(), a.model.as_ref().map_or_else(|| a.preset.clone().unwrap_or_default(), |d| d.display().to_string()));
    let mut report = serde_json::json!({ "format": format.name() });
    match device {
        crate::bench_cli::Device::Cpu => {
            if !small {
                bail!("{} parameters is too large for the CPU backend; run on a GPU", cfg.param_count());
            }
            let w = host.expect("small models have host weights");
            let (q, errs) = fake_quant(&w, layout)?;
            print_weights(&errs);
            report["weights"] = serde_json::to_value(&errs)?;
            // W8A16 (f32 activations), and with --w8a8 also the W8A8 model: each against bf16.
            let acts: &[(ActQuant, &str, &str)] = if a.w8a8 {
                &[(ActQuant::None, "FP8 W8A16", "fp8"), (ActQuant::Fp8Row, "FP8 W8A8", "w8a8")]
            } else {
                &[(ActQuant::None, "FP8 W8A16", "fp8")]
            };
            let rows = a.seqs * (a.prompt_len + a.gen_len);
            let mut tables = Vec::new();
            let mut commits = Vec::new();
            for &(act, label, key) in acts {
                let (layers, c) = cpu_layer_fidelity_act(&w, &q, act, &prompts, TIE_GAP)?;
                print_logits(&format!("logits, {label} vs bf16 (f32 CPU)"), &c);
                report[format!("logits_{key}_vs_bf16")] = serde_json::to_value(&c)?;
                report[format!("layers_{key}_vs_bf16")] = serde_json::to_value(&layers)?;
                let mut test = CpuStepper::new(&q, rows)?.with_act_quant(act);
                let ag = commit_agreement(&mut CpuStepper::new(&w, rows)?, &mut test, &prompts, a.gen_len, a.block_len, a.steps)?;
                report[if act == ActQuant::None { "commits".to_string() } else { format!("commits_{key}") }] = serde_json::to_value(&ag)?;
                tables.push((format!("{label} vs bf16"), layers));
                commits.push((label, ag));
            }
            let cols: Vec<(&str, &[LayerCmp])> = tables.iter().map(|(h, l)| (h.as_str(), l.as_slice())).collect();
            print_layers("hidden state after each layer (relative L2 of the residual stream; f32 CPU):", &cols);
            for (label, ag) in &commits {
                print_commits(label, ag);
            }
        }
        #[cfg(feature = "cuda")]
        crate::bench_cli::Device::Cuda(gpu) => {
            use demask::decode::gpu::GpuStepper;
            use demask::model::{Capacity, GpuWeights};
            let (bw, fw) = match &host {
                Some(h) => {
                    let (_, errs) = fake_quant(h, layout)?;
                    print_weights(&errs);
                    report["weights"] = serde_json::to_value(&errs)?;
                    (GpuWeights::upload(&gpu, h)?, GpuWeights::upload_as(&gpu, h, format)?)
                }
                None => (GpuWeights::synthesize(&gpu, &cfg, a.seed)?, GpuWeights::synthesize_as(&gpu, &cfg, a.seed, format)?),
            };
            let rows = a.seqs * (a.prompt_len + a.gen_len);
            let cap = Capacity { rows, logit_rows: rows, cache_rows: rows, seqs: a.seqs };
            let mut rb = GpuStepper::with_weights(gpu.clone(), cfg.clone(), bw, cap)?;
            let mut rf = GpuStepper::with_weights(gpu.clone(), cfg.clone(), fw, cap)?;
            let canv: Vec<Vec<u32>> =
                prompts.iter().enumerate().map(|(i, p)| [p.clone(), demask::bench::synthetic_tokens(a.gen_len, vocab_hi, a.seed + 200 + i as u64)].concat()).collect();
            // One eager forward each with the residual stream captured after every layer.
            let run = |r: &mut GpuStepper| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
                let m = r.model_mut();
                m.set_layer_capture(true)?;
                let logits = m.forward_full(&canv)?;
                let layers = m.layer_hidden()?;
                m.set_layer_capture(false)?;
                Ok((logits, layers))
            };
            let (lb, hb) = run(&mut rb)?;
            let (lf, hf) = run(&mut rf)?;
            let c = compare_logits(&lf, &lb, cfg.vocab, TIE_GAP);
            print_logits("logits, GPU FP8 vs GPU bf16", &c);
            report["logits_fp8_vs_bf16"] = serde_json::to_value(&c)?;
            let layers = demask::fp8_fidelity::compare_layers(&hf, &hb, cfg.hidden);
            report["layers_fp8_vs_bf16"] = serde_json::to_value(&layers)?;
            if let Some(w) = host.as_ref().filter(|_| small) {
                let (want, hw) = CpuModel::new(w)?.forward_full_layers(&canv)?;
                let cb = compare_logits(&lb, &want, cfg.vocab, TIE_GAP);
                let cf = compare_logits(&lf, &want, cfg.vocab, TIE_GAP);
                print_logits("logits, GPU bf16 vs f32 CPU reference", &cb);
                print_logits("logits, GPU FP8 vs f32 CPU reference", &cf);
                report["logits_bf16_vs_f32"] = serde_json::to_value(&cb)?;
                report["logits_fp8_vs_f32"] = serde_json::to_value(&cf)?;
                let (lb32, lf32) = (demask::fp8_fidelity::compare_layers(&hb, &hw, cfg.hidden), demask::fp8_fidelity::compare_layers(&hf, &hw, cfg.hidden));
                print_layers(
                    "hidden state after each layer (relative L2 of the residual stream; GPU, bf16 activations):",
                    &[("GPU FP8 vs GPU bf16", &layers), ("GPU bf16 vs f32 CPU", &lb32), ("GPU FP8 vs f32 CPU", &lf32)],
                );
                report["layers_bf16_vs_f32"] = serde_json::to_value(&lb32)?;
                report["layers_fp8_vs_f32"] = serde_json::to_value(&lf32)?;
            } else {
                print_layers(
                    "hidden state after each layer (relative L2 of the residual stream; GPU, bf16 activations):",
                    &[("GPU FP8 vs GPU bf16", &layers)],
                );
            }
            let ag = commit_agreement(&mut rb, &mut rf, &prompts, a.gen_len, a.block_len, a.steps)?;
            print_commits("GPU FP8", &ag);
            report["commits"] = serde_json::to_value(&ag)?;
        }
    }
    crate::bench_cli::write_json(a.json.as_ref(), report)
}

/// `make-checkpoint --weights`: whether the checkpoint is to be written as FP8 (refuses an
/// unknown value before anything is written).
pub fn checkpoint_fp8(weights: &str) -> Result<bool> {
    match weights {
        "bf16" => Ok(false),
        "fp8" | "fp8-block" => Ok(true),
        other => bail!("--weights {other}: expected bf16 or fp8"),
    }
}

/// Rewrites the bf16 checkpoint just written in `out` in the published FP8 layout
/// (`weights::fp8::convert_to_fp8`).
pub fn convert_to_fp8(preset: &str, out: &std::path::Path) -> Result<()> {
    let cfg = ModelConfig::preset(preset)?;
    demask::weights::fp8::convert_to_fp8(out, &cfg)?;
    eprintln!("linear weights rewritten as FP8 (E4M3, 128x128 weight_scale_inv block scales)");
    Ok(())
}
