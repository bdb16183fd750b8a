//! `demask generate`: decode one prompt with a checkpoint and print the result (text, or one
//! JSON document with `--json`). Progress and `--show-steps` go to stderr.
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use demask::cache::CacheScheme;
use demask::decode::prior::Prior;
use demask::decode::runner::StepEvent;
use demask::decode::{Policy, Sampling};
use demask::engine::{parse_bytes, Device, Engine, EngineOptions, Output, Prompt, Request};
use demask::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, optional tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (tokenized with the checkpoint's tokenizer).
    #[arg(long, required_unless_present = "prompt_ids", conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Wrap --prompt in the checkpoint's chat template as one user message.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// Prompt token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Slots to generate.
    #[arg(long)]
    pub gen_len: u32,
    /// Semi-autoregressive block length (must divide --gen-len; default: one block).
    #[arg(long)]
    pub block_len: Option<u32>,
    /// Commit policy: schedule:S, random:S, threshold:T, confident:T,S, factor:F, dream:ALG,S.
    #[arg(long)]
    pub policy: String,
    /// Sampling temperature (0 = argmax).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the K most likely tokens when sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Nucleus sampling mass in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// RNG seed (sampling and random orders; same seed, same tokens).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Structure prior over the gen region: text with `<mask:N>` holes.
    #[arg(long, conflicts_with = "prior_ids")]
    pub prior: Option<String>,
    /// Structure prior as fixed token ids at gen offsets: OFFSET:ID,OFFSET:ID,...
    #[arg(long, value_delimiter = ',')]
    pub prior_ids: Option<Vec<String>>,
    /// End the sequence when a finished block contains EOS/EOT (default on; --stop-at-eos=false).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub stop_at_eos: bool,
    /// KV-cache scheme: none (exact), prompt, prefix, dual, dkv:R (refresh every R steps),
    /// dkv-greedy[:W] (window W, default 2).
    #[arg(long, default_value = "none")]
    pub cache: String,
    /// Most bytes the KV cache may take: bytes or K/M/G/T (binary), e.g. 8G. Default: no limit
    /// on the CPU; 90% of the device memory left after the weights and workspace on a GPU.
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print the canvas after every step (masks shown as ░) to stderr.
    #[arg(long)]
    pub show_steps: bool,
    /// Print one JSON document with the result to stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_prior_ids(items: &[String]) -> Result<Vec<(u32, u32)>> {
    items
        .iter()
        .map(|s| {
            let (o, t) = s.split_once(':').with_context(|| format!("--prior-ids item `{s}`: expected OFFSET:ID"))?;
            let o = o.trim().parse().with_context(|| format!("--prior-ids item `{s}`: bad offset"))?;
            let t = t.trim().parse().with_context(|| format!("--prior-ids item `{s}`: bad token id"))?;
            Ok((o, t))
        })
        .collect()
}

/// The gen region as text (runs of tokens decoded together, masks as ░) or as ids.
fn render(gen: &[u32], mask_id: u32, tok: Option<&Tokenizer>) -> String {
    let Some(tok) = tok else {
        return gen
            .iter()
            .map(|&t| if t == mask_id { "_".to_string() } else { t.to_string() })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let mut out = String::new();
    let mut run: Vec<u32> = Vec::new();
    let flush = |run: &mut Vec<u32>, out: &mut String| {
        if !run.is_empty() {
            out.push_str(&tok.decode(run, false).unwrap_or_else(|_| format!("{run:?}")));
            run.clear();
        }
    };
    for &t in gen {
        if t == mask_id {
            flush(&mut run, &mut out);
            out.push('░');
        } else {
            run.push(t);
        }
    }
    flush(&mut run, &mut out);
    out.replace('\n', "⏎")
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let device: Device = a.device.parse()?;
    let policy: Policy = a.policy.parse()?;
    let cache: CacheScheme = a.cache.parse()?;
    let kv_budget = a.kv_budget.as_deref().map(parse_bytes).transpose()?;
    let t0 = Instant::now();
    eprintln!("loading {} (device {device})", a.model.display());
    let mut engine = Engine::load(&a.model, EngineOptions { device, kv_budget, ..Default::default() })
        .with_context(|| format!("loading {}", a.model.display()))?;
    let cfg = engine.config().clone();
    eprintln!(
        "loaded {:?} ({} layers, hidden {}, vocab {}) on {} in {:.2} s",
        cfg.arch,
        cfg.n_layers,
        cfg.hidden,
        cfg.vocab,
        engine.device(),
        t0.elapsed().as_secs_f64()
    );
    let prompt = match (a.prompt, a.prompt_ids) {
        (Some(text), None) => Prompt::Text { text, chat: a.chat },
        (None, Some(ids)) => Prompt::Ids(ids),
        _ => bail!("give exactly one of --prompt and --prompt-ids"),
    };
    let prior = match (a.prior, a.prior_ids) {
        (Some(t), _) => Some(Prior::Template(t)),
        (None, Some(ids)) => Some(Prior::Fixed(parse_prior_ids(&ids)?)),
        (None, None) => None,
    };
    let req = Request {
        prompt,
        gen_len: a.gen_len,
        block_len: a.block_len.unwrap_or(a.gen_len),
        policy,
        sampling: Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p },
        seed: a.seed,
        seq_id: 0,
        prior,
        stop_at_eos: a.stop_at_eos,
        cache,
        cache_refresh_every_step: false,
    };
    let reqs = [req];
    let t1 = Instant::now();
    let out: Output = if a.show_steps {
        let tok = engine.shared_tokenizer();
        let mask_id = cfg.mask_id;
        let mut on_step = |e: &StepEvent| {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "step {:>3} block {:>2} +{:<3} rows {:>5} {:>8.2} ms | {}",
                e.step,
                e.eligible.first().map_or(0, |&p| (p - e.canvas.prompt_len()) / e.canvas.spec().block_len),
                e.commits.len(),
                e.live_rows,
                e.ms,
                render(e.canvas.gen(), mask_id, tok.as_deref())
            );
        };
        engine.generate_with(&reqs, &mut on_step)?.remove(0)
    } else {
        engine.generate(&reqs)?.remove(0)
    };
    let wall = t1.elapsed().as_secs_f64();
    eprintln!(
        "{} tokens ({} non-EOS) in {} steps, {:.1} ms ({:.1} tok/s){}",
        out.tokens.len(),
        out.generated_tokens,
        out.steps,
        out.total_ms,
        out.tokens_per_s,
        if out.stopped_at_eos { ", stopped at EOS" } else { "" }
    );
    if a.json {
        let doc = serde_json::json!({
            "model": a.model.display().to_string(),
            "arch": format!("{:?}", cfg.arch),
            "device": engine.device(),
            "policy": policy.to_string(),
            "cache": cache.name(),
            "gen_len": a.gen_len,
            "block_len": reqs[0].block_len,
            "temperature": a.temperature,
            "top_k": a.top_k,
            "top_p": a.top_p,
            "seed": a.seed,
            "prompt_len": out.prompt_len,
            "tokens": out.tokens,
            "text": out.text,
            "steps": out.steps,
            "commits_per_step": out.commits_per_step,
            "rows_per_step": out.rows_per_step,
            "ms_per_step": out.step_ms.iter().map(|&m| (m * 1e3).round() / 1e3).collect::<Vec<f64>>(),
            "total_ms": out.total_ms,
            "wall_s": wall,
            "generated_tokens": out.generated_tokens,
            "tokens_per_s": out.tokens_per_s,
            "stopped_at_eos": out.stopped_at_eos,
        });
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        match &out.text {
            Some(t) => println!("{t}"),
            None => println!("{}", out.tokens.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ")),
        }
    }
    Ok(())
}
