//! `demask serve` (the OpenAI-compatible server) and `demask loadgen` (concurrent clients
//! against it).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use demask::cache::CacheScheme;
use demask::config::ModelConfig;
use demask::decode::Policy;
use demask::engine::{parse_bytes, Device, Engine, EngineOptions};
use demask::serve::{loadgen, ServeOptions};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json for text prompts and chat).
    #[arg(long, required_unless_present = "preset", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Serve a built-in architecture with random weights instead (no tokenizer: prompts are
    /// token ids): llada-8b, dream-7b on a GPU; tiny-llada, tiny-dream, tiny-llada-moe anywhere.
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Most sequences decoding at once (the batch); more requests wait in the queue.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Most requests waiting to join the batch; beyond it requests get HTTP 429.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Most bytes the KV cache may take: bytes or K/M/G/T (binary), e.g. 8G. Default: 90% of
    /// the device memory left after the weights and workspace (no limit on the CPU).
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// Most canvas rows (prompt + gen) one request may have (longer ones get HTTP 400); the
    /// GPU workspace, logits included, is sized for max-batch of them. Default: 1024, or the
    /// model's context when shorter.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Requests must send `Authorization: Bearer KEY` (also read from DEMASK_API_KEY).
    #[arg(long, env = "DEMASK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model name clients send and /v1/models lists. Default: the checkpoint directory's
    /// name, or the preset.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Commit policy of requests that name none (and give no `steps`).
    #[arg(long, default_value = "threshold:0.9")]
    pub policy: String,
    /// KV-cache scheme of requests that name none: none (exact), prefix, dual, dkv:R, ...
    #[arg(long, default_value = "none")]
    pub cache: String,
    /// Block length of requests that name none; max_tokens is rounded up to a multiple of it.
    #[arg(long, default_value_t = 32)]
    pub block_len: u32,
    /// Largest request body (bytes or K/M/G).
    #[arg(long, default_value = "4M")]
    pub max_body: String,
    /// Seed of a preset's random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::Args)]
pub struct LoadgenArgs {
    /// The server, e.g. http://127.0.0.1:8000.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 256)]
    pub requests: usize,
    #[arg(long, default_value_t = 256)]
    pub prompt_len: usize,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 256)]
    pub gen_len: u32,
    #[arg(long, default_value_t = 32)]
    pub block_len: u32,
    /// Commit policy (schedule:8 = 4 tokens per step with blocks of 32).
    #[arg(long, default_value = "schedule:8")]
    pub policy: String,
    #[arg(long, default_value = "dual")]
    pub cache: String,
    /// Whole responses instead of streams.
    #[arg(long)]
    pub no_stream: bool,
    /// Let EOS end a request early (off by default: every request decodes its whole length,
    /// like the benchmark's fixed schedules).
    #[arg(long)]
    pub stop_at_eos: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    #[arg(long, env = "DEMASK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    // Every argument is checked before the (possibly minute-long) load.
    let device: Device = a.device.parse().context("--device")?;
    let default_policy: Policy = a.policy.parse().context("--policy")?;
    let default_cache: CacheScheme = a.cache.parse().context("--cache")?;
    let kv_budget = a.kv_budget.as_deref().map(parse_bytes).transpose().context("--kv-budget")?;
    let max_body = usize::try_from(parse_bytes(&a.max_body).context("--max-body")?).context("--max-body")?;
    if a.max_batch == 0 || a.max_queue == 0 || a.block_len == 0 || max_body == 0 {
        bail!("--max-batch, --max-queue, --block-len and --max-body must be positive");
    }
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an IP address and port", a.host, a.port))?;
    let name = match (&a.served_model_name, &a.model, &a.preset) {
        (Some(n), _, _) => n.clone(),
        (None, Some(dir), _) => dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string()),
        (None, None, Some(p)) => p.clone(),
        (None, None, None) => bail!("give --model DIR or --preset NAME"),
    };
    let t0 = Instant::now();
    let engine = match (&a.model, &a.preset) {
        (Some(dir), _) => {
            if !dir.join("config.json").is_file() {
                bail!("--model {}: no config.json there (is it a checkpoint directory?)", dir.display());
            }
            let cfg = ModelConfig::from_dir(dir).with_context(|| format!("--model {}", dir.display()))?;
            let device = resolve(device);
            // The GPU's workspace is preallocated for max_rows; the CPU's cache grows as needed.
            let max_rows = if device == Device::Cpu { 0 } else { max_rows(a.max_len, a.max_batch, &cfg)? };
            eprintln!("loading {} (device {device})", dir.display());
            Engine::load(dir, EngineOptions { device, kv_budget, max_batch: a.max_batch, max_rows, ..Default::default() })
                .with_context(|| format!("loading {}", dir.display()))?
        }
        (None, Some(p)) => preset_engine(p, &a, device, kv_budget)?,
        (None, None) => bail!("give --model DIR or --preset NAME"),
    };
    let cfg = engine.config();
    eprintln!(
        "loaded {:?} ({} layers, hidden {}, vocab {}, context {}) on {} in {:.1} s; tokenizer: {}",
        cfg.arch,
        cfg.n_layers,
        cfg.hidden,
        cfg.vocab,
        cfg.max_seq_len,
        engine.device(),
        t0.elapsed().as_secs_f64(),
        if engine.tokenizer().is_some() { "yes" } else { "none (token-id prompts only)" }
    );
    let opts = ServeOptions {
        addr,
        model_name: name,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_queue: a.max_queue,
        max_body,
        body_timeout: Duration::from_secs(30),
        default_policy,
        default_cache,
        default_block_len: a.block_len,
    };
    demask::serve::serve_forever(engine, opts)?;
    Ok(())
}

/// `auto` made concrete: GPU 0 when it opens, else the CPU.
fn resolve(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    if device == Device::Auto {
        return if demask::gpu::Gpu::new(0).is_ok() { Device::Cuda(0) } else { Device::Cpu };
    }
    if device == Device::Auto {
        Device::Cpu
    } else {
        device
    }
}

/// Default `--max-len`.
const DEFAULT_MAX_LEN: usize = 1024;

/// The rows of the engine's workspace: `--max-len` (checked against the context) per sequence.
fn max_rows(max_len: Option<usize>, max_batch: usize, cfg: &ModelConfig) -> Result<usize> {
    let len = match max_len {
        Some(l) if l == 0 || l > cfg.max_seq_len => {
            bail!("--max-len {l} must lie in 1..={} (the model's context)", cfg.max_seq_len)
        }
        Some(l) => l,
        None => DEFAULT_MAX_LEN.min(cfg.max_seq_len),
    };
    Ok(len * max_batch)
}

/// An engine over a preset's random weights (synthesised on the GPU, or generated on the host
/// for the CPU backend).
fn preset_engine(preset: &str, a: &ServeArgs, device: Device, kv_budget: Option<u64>) -> Result<Engine> {
    let cfg = ModelConfig::preset(preset).with_context(|| format!("--preset {preset}"))?;
    let max_rows = max_rows(a.max_len, a.max_batch, &cfg)?;
    #[cfg(feature = "cuda")]
    {
        let gpu = match device {
            Device::Cpu => None,
            Device::Cuda(i) => Some(demask::gpu::Gpu::new(i).with_context(|| format!("--device cuda:{i}"))?),
            Device::Auto => demask::gpu::Gpu::new(0).ok(),
        };
        if let Some(gpu) = gpu {
            eprintln!("synthesising {preset} weights on {} (seed {})", gpu.name, a.seed);
            let w = demask::model::GpuWeights::synthesize(&gpu, &cfg, a.seed)?;
            let opts = EngineOptions { device, kv_budget, max_batch: a.max_batch, max_rows, ..Default::default() };
            return Ok(Engine::on_gpu(gpu, cfg, w, None, &opts)?);
        }
    }
    if let Device::Cuda(i) = device {
        bail!("--device cuda:{i}: this build has no GPU backend");
    }
    eprintln!("no GPU: {preset} with random weights on the CPU backend");
    let weights = demask::checkpoint::random_weights(&cfg, a.seed);
    let opts = EngineOptions { device: Device::Cpu, kv_budget, max_batch: a.max_batch, ..Default::default() };
    Ok(Engine::from_weights(weights, None, opts)?)
}

pub fn loadgen(a: LoadgenArgs) -> Result<()> {
    if a.clients == 0 || a.requests == 0 || a.gen_len == 0 || a.block_len == 0 {
        bail!("--clients, --requests, --gen-len and --block-len must be positive");
    }
    if !a.gen_len.is_multiple_of(a.block_len) {
        bail!("--block-len {} must divide --gen-len {}", a.block_len, a.gen_len);
    }
    a.policy.parse::<Policy>().context("--policy")?;
    a.cache.parse::<CacheScheme>().context("--cache")?;
    let addr = demask::serve::client::host_port(&a.url).with_context(|| format!("--url {}", a.url))?;
    let spec = loadgen::LoadSpec {
        addr,
        api_key: a.api_key.clone(),
        clients: a.clients,
        requests: a.requests,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        block_len: a.block_len,
        policy: a.policy.clone(),
        cache: a.cache.clone(),
        stream: !a.no_stream,
        stop_at_eos: a.stop_at_eos,
        seed: a.seed,
        timeout: Duration::from_secs(a.timeout),
    };
    eprintln!(
        "loadgen: {} requests, {} clients, prompt {} gen {} block {} {} cache {}, {} → {}",
        a.requests,
        a.clients,
        a.prompt_len,
        a.gen_len,
        a.block_len,
        a.policy,
        a.cache,
        if spec.stream { "streaming" } else { "whole responses" },
        a.url
    );
    let rep = loadgen::run(&spec, |done, total| eprintln!("  {done}/{total} done")).map_err(anyhow::Error::msg)?;
    println!(
        "requests {} ok {} failed {} in {:.1} s: {:.1} tokens/s, {:.2} requests/s, mean batch {:.1}",
        rep.requests, rep.ok, rep.failed, rep.wall_s, rep.tokens_per_s, rep.requests_per_s, rep.mean_batch
    );
    let p = |x: &loadgen::Pcts| format!("p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ms", x.p50, x.p90, x.p99, x.max);
    println!("time to first block: {}", p(&rep.first_block_ms));
    println!("time to completion:  {}", p(&rep.completion_ms));
    if let Some([first, min, max, last]) = rep.device_memory {
        let gb = |b: u64| b as f64 / 1e9;
        println!("server device memory: first {:.3} min {:.3} max {:.3} last {:.3} GB", gb(first), gb(min), gb(max), gb(last));
    }
    for e in &rep.errors {
        println!("error: {e}");
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&rep)?).with_context(|| format!("--json {}", path.display()))?;
    }
    if rep.failed > 0 {
        bail!("{} of {} requests failed", rep.failed, rep.requests);
    }
    Ok(())
}
