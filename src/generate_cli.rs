//! `demask generate`: decode one prompt with a checkpoint and print the result (text, or one
//! JSON document with `--json`). Progress and `--show-steps` go to stderr.
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use demask::cache::CacheScheme;
use demask::config::ModelConfig;
use demask::decode::canvas::check_steps;
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
    /// Wrap --prompt in the checkpoint's chat template as one user message (not with --prompt-ids).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub chat: bool,
    /// Prompt token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Slots to generate.
    #[arg(long)]
    pub gen_len: u32,
    /// Semi-autoregressive block length (must divide --gen-len; default: one block). LLaDA2:
    /// its attention block (32, the default), blocks at absolute positions, canvas padded.
    #[arg(long)]
    pub block_len: Option<u32>,
    /// Commit policy: schedule:S, random:S, threshold:T, confident:T,S, llada2:T,S,
    /// edit:TM,TE,P (LLaDA2.1 token editing: commit masked slots with p > TM, re-write committed
    /// slots whose argmax differs with p > TE, up to P edit-only steps per block; CPU only),
    /// factor:F, dream:ALG,S.
    #[arg(long)]
    pub policy: String,
    /// Sampling temperature (0 = argmax).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the K largest logits (0 = off). Default: the policy's reference behaviour:
    /// 50 for dream:* policies (Dream's `diffusion_generate` filters to the top 50 before its
    /// softmax, so its confidences come from that renormalised distribution; pass 0 for none),
    /// off for the others (where it shapes only sampling at temperature > 0).
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Nucleus sampling mass in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
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
    /// LLaDA2: EOS only, and the output is cut after the first EOS (its official rule).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub stop_at_eos: bool,
    /// KV-cache scheme: none (exact), prompt, prefix, dual, dkv:R (refresh every R steps),
    /// dkv-greedy[:W] (window W, default 2), block (exact block cache of block-causal models:
    /// LLaDA2 only; its blocks sit at multiples of 32 whatever the prompt length).
    #[arg(long, default_value = "none")]
    pub cache: String,
    /// Most bytes the KV cache may take: bytes or K/M/G/T (binary), e.g. 8G. Default: no limit
    /// on the CPU; 90% of the device memory left after the weights and workspace on a GPU.
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Linear-layer weights on the GPU: bf16, fp8 (E4M3, one scale per output channel,
    /// quantised at load) or fp8-block (128×128 block scales).
    #[arg(long, default_value = "bf16")]
    pub weights: String,
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

/// Loads the checkpoint's tokenizer as the engine does, for a text prompt or a template prior
/// with text; `None` when neither needs one.
fn preflight_tokenizer(a: &GenerateArgs) -> Result<Option<Tokenizer>> {
    let needs = a.prompt.is_some() || a.prior.is_some();
    if !needs {
        return Ok(None);
    }
    Tokenizer::load_optional(&a.model).with_context(|| format!("--model {}: loading the tokenizer", a.model.display()))
}

/// Every check that needs no weights, run before the (possibly minute-long) load: the flags on
/// their own, then against config.json and the tokenizer (token ids against the vocabulary,
/// prompt + gen length against the context, the prior, the policy's steps against the masked
/// slots of a block). The engine checks the same again when the request is submitted.
fn preflight(a: &GenerateArgs, policy: &Policy, prompt: &Prompt, prior: Option<&Prior>) -> Result<()> {
    if a.gen_len == 0 {
        bail!("--gen-len must be > 0");
    }
    if a.block_len == Some(0) {
        bail!("--block-len must be > 0");
    }
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature {} must be a finite number >= 0", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p {} must lie in (0, 1]", a.top_p);
    }
    if a.chat && a.prompt_ids.is_some() {
        bail!("--chat wraps a text --prompt in the chat template; --prompt-ids are used as they are (drop --chat or pass --prompt)");
    }
    let cfg = ModelConfig::from_dir(&a.model).with_context(|| format!("--model {}", a.model.display()))?;
    // LLaDA2 pads its canvas to whole blocks: no divisibility (the engine checks its block).
    match a.block_len {
        Some(b) if cfg.arch != demask::Arch::Llada2 && !a.gen_len.is_multiple_of(b) => {
            bail!("--block-len {b} must divide --gen-len {}", a.gen_len)
        }
        _ => {}
    }
    let tok = preflight_tokenizer(a)?;
    let (ids, what) = match prompt {
        Prompt::Ids(ids) => (ids.clone(), "--prompt-ids"),
        Prompt::Text { text, chat } => {
            let tok = tok.as_ref().with_context(|| {
                format!("--prompt needs a tokenizer and {} has no tokenizer.json: pass --prompt-ids", a.model.display())
            })?;
            let ids = if *chat {
                tok.apply_chat(text).and_then(|t| tok.encode(&t, false)).context("--chat: applying the chat template")?
            } else {
                tok.encode(text, true).context("--prompt: tokenizing")?
            };
            (ids, "--prompt")
        }
    };
    if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab) {
        bail!("{what}: token id {t} at index {i} is not below the model's vocabulary size {}", cfg.vocab);
    }
    let total = ids.len() + a.gen_len as usize;
    if total > cfg.max_seq_len {
        let field = match cfg.arch {
            demask::Arch::Llada => "max_sequence_length",
            demask::Arch::Dream | demask::Arch::LladaMoe | demask::Arch::Llada2 => "max_position_embeddings",
        };
        bail!(
            "{what} ({} tokens) + --gen-len {} = {total} exceeds the model's context of {} tokens ({field} in config.json)",
            ids.len(),
            a.gen_len,
            cfg.max_seq_len
        );
    }
    let slots = match prior {
        Some(p) => {
            let flag = if a.prior.is_some() { "--prior" } else { "--prior-ids" };
            p.resolve(a.gen_len, &cfg, tok.as_ref()).with_context(|| flag.to_string())?
        }
        None => Vec::new(),
    };
    // LLaDA2's blocks sit at absolute positions: the engine checks them on its canvas.
    if cfg.arch != demask::Arch::Llada2 {
        check_steps(policy, a.gen_len, a.block_len.unwrap_or(a.gen_len), &slots)
            .with_context(|| format!("--policy {policy}"))?;
    }
    Ok(())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let device: Device = a.device.parse().context("--device")?;
    let policy: Policy = a.policy.parse().context("--policy")?;
    let cache: CacheScheme = a.cache.parse().context("--cache")?;
    let kv_budget = a.kv_budget.as_deref().map(parse_bytes).transpose().context("--kv-budget")?;
    let weights: demask::quant::WeightFormat = a.weights.parse().context("--weights")?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => Prompt::Text { text: text.clone(), chat: a.chat },
        (None, Some(ids)) => Prompt::Ids(ids.clone()),
        _ => bail!("give exactly one of --prompt and --prompt-ids"),
    };
    let prior = match (&a.prior, &a.prior_ids) {
        (Some(t), _) => Some(Prior::Template(t.clone())),
        (None, Some(ids)) => Some(Prior::Fixed(parse_prior_ids(ids)?)),
        (None, None) => None,
    };
    preflight(&a, &policy, &prompt, prior.as_ref())?;
    let t0 = Instant::now();
    eprintln!("loading {} (device {device})", a.model.display());
    let mut engine = Engine::load(&a.model, EngineOptions { device, kv_budget, weights, ..Default::default() })
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
    let mut req = Request::new(prompt)
        .gen_len(a.gen_len)
        .policy(policy)
        .sampling(Sampling { temperature: a.temperature, top_k: a.top_k.unwrap_or(Sampling::POLICY_TOP_K), top_p: a.top_p })
        .seed(a.seed)
        .stop_at_eos(a.stop_at_eos)
        .cache(cache);
    req.block_len = a.block_len;
    req.prior = prior;
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
                e.eligible.first().map_or(0, |&p| e.canvas.block_of(p)),
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
            "top_k": a.top_k.unwrap_or_else(|| policy.default_top_k()),
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
