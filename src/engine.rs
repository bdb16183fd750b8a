//! The public decoding API: [`Engine::load`] (or [`Engine::from_weights`] /
//! [`Engine::with_backend`] / `Engine::on_gpu` with the `cuda` feature), then either
//! [`generate`](Engine::generate)`(&[Request]) -> Vec<Output>` or, for embedding in a server,
//! [`submit`](Engine::submit)`(Request) -> RequestId` and [`step`](Engine::step)`()` → the
//! `(RequestId, Output)` pairs that finished. Requests are validated at submit, turned into
//! canvases (prompt ids or text, chat template, structure prior) and queued; every step is one
//! forward over the active sequences. A step callback sees each sequence's canvas after every
//! step (streaming, visualisation).
//!
//! Continuous batching (`decode::scheduler`): at every step boundary finished sequences leave
//! and queued requests join, FIFO, while they fit `max_batch` sequences, `max_rows` live canvas
//! rows and the KV cache; `generate` is submit-all-then-step on top. A request's output does
//! not depend on which others share its steps.
//!
//! KV caching (DESIGN.md §5): each request names a cache scheme ([`Request::cache`]). A sequence
//! gets its KV-cache rows (one per canvas row, contiguous) when it is admitted and gives them
//! back when it finishes; the cache holds [`EngineOptions::kv_budget`] bytes or what the backend
//! preallocated (the GPU's is fixed; the CPU's grows at step boundaries, keeping its rows).
//!
//! Threads: an [`Engine`] is `Send` (not `Sync`): a server moves each engine to the worker
//! thread that drives it; the GPU backend makes its CUDA context current on whichever thread
//! steps it.
use std::path::Path;
use std::sync::Arc;

use crate::config::{Arch, ModelConfig};
use crate::decode::canvas::{Canvas, CanvasSpec, Layout};
use crate::decode::cpu::CpuStepper;
use crate::decode::runner::SeqState;
use crate::decode::scheduler::{Finished, Limits, Misfit, Scheduler};
use crate::decode::Policy;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::HostWeights;

pub use crate::decode::runner::StepEvent;
pub use crate::decode::scheduler::RequestId;
pub use backend::EngineBackend;
pub use request::{Prompt, Request, DEFAULT_GEN_LEN, DEFAULT_POLICY};
pub use types::{kv_cache_rows, parse_bytes, DType, Device, EngineOptions, Output, DEFAULT_KV_FRACTION};

#[cfg(feature = "cuda")]
use backend::open_gpu;
use backend::{cache_row_cap, pick_backend};

mod backend;
mod request;
mod types;

// An engine must stay movable to a worker thread (checked at every build, whatever the tests).
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
};

/// A loaded model and its decoding backend, with the queue and the running batch of its
/// requests.
///
/// `Send` but not `Sync`: one engine per thread, moved to whichever thread drives it.
///
/// ```
/// use demask::prelude::*;
/// # let dir = std::env::temp_dir().join(format!("demask-doc-engine-{}", std::process::id()));
/// # demask::checkpoint::write_checkpoint(&ModelConfig::preset("tiny-llada")?, 0, &dir, true, |_| {})?;
///
/// let mut engine = Engine::load(&dir, EngineOptions { device: Device::Cpu, ..Default::default() })?;
/// // A worker thread owns the engine from here on.
/// let worker = std::thread::spawn(move || -> Result<Vec<Output>> {
///     engine.generate(&[Request::ids(vec![1, 2, 3]).gen_len(16).block_len(8)])
/// });
/// let outs = worker.join().expect("worker thread")?;
/// assert_eq!(outs[0].tokens.len(), 16);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), demask::Error>(())
/// ```
pub struct Engine {
    backend: Box<dyn EngineBackend>,
    tokenizer: Option<Arc<Tokenizer>>,
    device: String,
    kv_budget: Option<u64>,
    sched: Scheduler,
    /// Outputs of submitted requests that finished during a `generate` call, handed out by
    /// the next `step`.
    unclaimed: Vec<(RequestId, Output)>,
}

impl Engine {
    /// Loads a checkpoint directory in the Hugging Face layout (config.json, safetensors, and
    /// tokenizer.json when present) onto the device `opts.device` names: `Auto` takes GPU 0
    /// when it opens and the CPU backend otherwise.
    ///
    /// ```
    /// use demask::prelude::*;
    ///
    /// // A random tiny checkpoint (with a byte-level tokenizer) to load.
    /// let dir = std::env::temp_dir().join(format!("demask-doc-load-{}", std::process::id()));
    /// let cfg = ModelConfig::preset("tiny-llada")?;
    /// demask::checkpoint::write_checkpoint(&cfg, 0, &dir, true, |_| {})?;
    ///
    /// let engine = Engine::load(&dir, EngineOptions { device: Device::Cpu, ..Default::default() })?;
    /// assert_eq!(engine.config(), &cfg);
    /// assert!(engine.tokenizer().is_some());
    /// assert_eq!(engine.device(), "cpu (f32)");
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), demask::Error>(())
    /// ```
    pub fn load(dir: impl AsRef<Path>, opts: EngineOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ModelConfig::from_dir(dir)?;
        #[cfg(feature = "cuda")]
        if let Some(gpu) = open_gpu(&opts)? {
            crate::model::check_gpu_support(&cfg)?;
            let tokenizer = if dir.join("tokenizer.json").is_file() { Some(Tokenizer::from_dir(dir)?) } else { None };
            let weights = HostWeights::load(dir)?;
            let w = crate::model::GpuWeights::upload_as(&gpu, &weights, opts.weights)?;
            drop(weights);
            return Self::on_gpu(gpu, cfg, w, tokenizer, &opts);
        }
        let opts = EngineOptions { device: Device::Cpu, ..opts };
        pick_backend(&cfg, &opts)?;
        let tokenizer = if dir.join("tokenizer.json").is_file() { Some(Tokenizer::from_dir(dir)?) } else { None };
        let weights = HostWeights::load(dir)?;
        Self::from_weights(weights, tokenizer, opts)
    }

    /// An engine on the CPU backend over weights in memory (tests, synthetic checkpoints).
    /// For the GPU, upload them (`model::GpuWeights::upload`) and use `Engine::on_gpu`.
    pub fn from_weights(weights: HostWeights, tokenizer: Option<Tokenizer>, opts: EngineOptions) -> Result<Self> {
        pick_backend(&weights.cfg, &opts)?;
        let stepper = CpuStepper::new(&weights, opts.max_rows)?;
        Ok(Self::with_backend(Box::new(stepper), tokenizer, "cpu (f32)".into(), &opts))
    }

    /// An engine over any step backend (how the GPU backend plugs in); `opts.max_batch`,
    /// `opts.max_rows` and `opts.kv_budget` bound the active set at every step.
    pub fn with_backend(
        backend: Box<dyn EngineBackend>,
        tokenizer: Option<Tokenizer>,
        device: String,
        opts: &EngineOptions,
    ) -> Self {
        let (cache_rows, _) = cache_row_cap(backend.as_ref(), opts.kv_budget);
        let limits = Limits {
            max_batch: opts.max_batch,
            max_rows: opts.max_rows,
            cache_rows: (cache_rows != usize::MAX).then_some(cache_rows),
            cache_grows: backend.cache_row_limit().is_none(),
        };
        Engine {
            backend,
            tokenizer: tokenizer.map(Arc::new),
            device,
            kv_budget: opts.kv_budget,
            sched: Scheduler::new(limits),
            unclaimed: Vec::new(),
        }
    }

    /// An engine on the GPU over weights already on the device, sized by `opts`: at most
    /// `max_batch` sequences (0: 1) and `max_rows` canvas rows (0: `max_batch` · the model's
    /// context) at once; the KV cache takes `kv_budget` bytes or, by default, 90% of the
    /// device memory left after the weights and workspace ([`kv_cache_rows`]), all allocated
    /// here, once.
    #[cfg(feature = "cuda")]
    pub fn on_gpu(
        gpu: Arc<crate::gpu::Gpu>,
        cfg: ModelConfig,
        weights: crate::model::GpuWeights,
        tokenizer: Option<Tokenizer>,
        opts: &EngineOptions,
    ) -> Result<Self> {
        use crate::model::{Capacity, GpuModel};
        let seqs = opts.max_batch.max(1);
        // Default: room for every sequence at the model's context, capped at 4096 rows each
        // (Dream's 131072-token context would otherwise size the workspace at tens of GB).
        let rows = if opts.max_rows == 0 { seqs * cfg.max_seq_len.min(4096) } else { opts.max_rows };
        let mut cap = Capacity { rows, logit_rows: rows, cache_rows: 0, seqs };
        let (free, _) = gpu.mem_info()?;
        let workspace = GpuModel::workspace_bytes(&cfg, cap) as u64;
        let row_bytes = (2 * cfg.n_layers * cfg.kv_dim() * std::mem::size_of::<half::bf16>()) as u64;
        cap.cache_rows = kv_cache_rows(opts.kv_budget, free as u64, workspace, row_bytes, rows)?;
        let stepper = crate::decode::gpu::GpuStepper::with_weights(gpu.clone(), cfg, weights, cap)?;
        let device = format!("{} (cuda:{})", gpu.name, gpu.ordinal);
        let opts = EngineOptions { max_batch: seqs, max_rows: rows, ..opts.clone() };
        Ok(Self::with_backend(Box::new(stepper), tokenizer, device, &opts))
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }
    /// The checkpoint's tokenizer (`None` when it has no tokenizer.json: token-id prompts only).
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }
    /// The tokenizer as a shared handle (e.g. for a step callback that renders text).
    pub fn shared_tokenizer(&self) -> Option<Arc<Tokenizer>> {
        self.tokenizer.clone()
    }
    /// The backend in words, e.g. "cpu (f32)".
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Decodes all requests (submitted together, stepped until every one finished); outputs
    /// in request order. Every request is validated before any is queued. Requests submitted
    /// earlier keep running alongside; their outputs wait for the next [`Engine::step`].
    ///
    /// ```
    /// use demask::prelude::*;
    /// # let dir = std::env::temp_dir().join(format!("demask-doc-generate-{}", std::process::id()));
    /// # demask::checkpoint::write_checkpoint(&ModelConfig::preset("tiny-llada")?, 0, &dir, true, |_| {})?;
    /// let mut engine = Engine::load(&dir, EngineOptions { device: Device::Cpu, ..Default::default() })?;
    ///
    /// let outs = engine.generate(&[
    ///     Request::text("Hello").chat(true).gen_len(32).block_len(8),
    ///     Request::ids(vec![5, 6, 7]).gen_len(16).policy("schedule:4".parse()?).stop_at_eos(false),
    /// ])?;
    /// assert_eq!(outs.len(), 2);
    /// assert_eq!(outs[1].tokens.len(), 16);
    /// assert_eq!(outs[1].steps, 4); // one block of 16 slots in 4 steps
    /// println!("{}", outs[0].text.as_deref().unwrap_or(""));
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), demask::Error>(())
    /// ```
    pub fn generate(&mut self, reqs: &[Request]) -> Result<Vec<Output>> {
        self.run(reqs, None)
    }

    /// As `generate`, calling `on_step` for every sequence after each of its steps (`index`:
    /// the request's index in `reqs`; `batch_step`: counted from this call's first forward).
    pub fn generate_with(&mut self, reqs: &[Request], on_step: &mut dyn FnMut(&StepEvent)) -> Result<Vec<Output>> {
        self.run(reqs, Some(on_step))
    }

    /// Validates `r` fully (tokenization, lengths, ids, policy, sampling, prior, cache scheme,
    /// and that it can ever fit the engine's limits) and queues it. An error names the
    /// request by the id it would have had; nothing is queued then.
    ///
    /// A server loop submits as requests arrive and steps while any is pending or active:
    ///
    /// ```
    /// use demask::prelude::*;
    /// # let dir = std::env::temp_dir().join(format!("demask-doc-submit-{}", std::process::id()));
    /// # demask::checkpoint::write_checkpoint(&ModelConfig::preset("tiny-llada")?, 0, &dir, true, |_| {})?;
    /// let opts = EngineOptions { device: Device::Cpu, max_batch: 2, ..Default::default() };
    /// let mut engine = Engine::load(&dir, opts)?;
    ///
    /// let a: RequestId = engine.submit(Request::text("Hi").gen_len(16).block_len(8))?;
    /// let b = engine.submit(Request::ids(vec![1, 2]).gen_len(8).stop_at_eos(false))?;
    /// let mut done = Vec::new();
    /// while engine.pending() + engine.active() > 0 {
    ///     // More requests may be submitted here; they join at the next step boundary.
    ///     for (id, out) in engine.step()? {
    ///         done.push((id, out));
    ///     }
    /// }
    /// done.sort_by_key(|(id, _)| *id);
    /// assert_eq!(done.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [a, b]);
    /// assert_eq!(done[1].1.tokens.len(), 8);
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), demask::Error>(())
    /// ```
    pub fn submit(&mut self, r: Request) -> Result<RequestId> {
        let id = self.sched.next_id();
        let seq = self.checked(&r, &format!("request {id}"))?;
        self.sched.submit(seq)
    }

    /// One step boundary and step: finished sequences have left, queued requests join while
    /// they fit, then one forward for every active sequence. Returns the requests that
    /// finished in it (and any that finished during a `generate` call since the last `step`).
    /// With nothing queued or active it returns at once with no outputs.
    pub fn step(&mut self) -> Result<Vec<(RequestId, Output)>> {
        self.step_inner(None)
    }

    /// As `step`, calling `on_step` for every sequence it stepped (`index` = the request's id
    /// as `usize`; `batch_step` counts the engine's forwards).
    pub fn step_with(&mut self, on_step: &mut dyn FnMut(&StepEvent)) -> Result<Vec<(RequestId, Output)>> {
        self.step_inner(Some(on_step))
    }

    fn step_inner(&mut self, on_step: Option<&mut dyn FnMut(&StepEvent)>) -> Result<Vec<(RequestId, Output)>> {
        let mut out = std::mem::take(&mut self.unclaimed);
        for f in self.sched.step(self.backend.as_mut(), on_step)? {
            out.push((f.id, self.output(&f)?));
        }
        Ok(out)
    }

    /// The canvas of every request that is decoding, as the last step left it (every admitted
    /// request takes part in every step). A server streams finished blocks from these: unlike
    /// a step callback, reading them costs no download of the step's scores.
    pub fn active_canvases(&self) -> impl Iterator<Item = (RequestId, &Canvas)> + '_ {
        self.sched.active_seqs().map(|(id, s)| (id, &s.canvas))
    }

    /// Requests queued, not admitted yet.
    pub fn pending(&self) -> usize {
        self.sched.pending()
    }

    /// Requests admitted (decoding) and not finished.
    pub fn active(&self) -> usize {
        self.sched.active()
    }

    /// Drops a queued or active request (its cache rows are freed). False when the engine
    /// does not hold it (unknown id, or already finished).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        self.sched.cancel(id)
    }

    /// KV-cache rows `(in use, capacity)`; the capacity grows on the CPU backend (rows are
    /// added at step boundaries as sequences need them) and is fixed on the GPU.
    pub fn kv_rows(&self) -> (usize, usize) {
        let r = self.sched.rows();
        (r.used_rows(), r.capacity())
    }

    /// Bytes of one KV-cache row (all layers, K and V).
    pub fn kv_row_bytes(&self) -> u64 {
        self.backend.cache_row_bytes()
    }

    /// Device memory `(used, total)` bytes when the engine runs on a GPU (`None` on the CPU).
    pub fn device_memory(&self) -> Option<(u64, u64)> {
        self.backend.device_memory()
    }

    /// Starts (and resets) or stops counting the experts each MoE layer's routing touches, for
    /// bandwidth accounting; `false` where not counted (CPU backend, dense models).
    pub fn set_expert_stats(&mut self, on: bool) -> Result<bool> {
        self.backend.set_expert_stats(on)
    }

    /// `(experts touched, layer forwards)` since `set_expert_stats(true)`, where counted.
    pub fn expert_stats(&self) -> Result<Option<(u64, u64)>> {
        self.backend.expert_stats()
    }

    /// Forwards run since the engine was built.
    pub fn batch_steps(&self) -> u32 {
        self.sched.batch_step()
    }

    /// The prompt's token ids (tokenizing text, applying the chat template).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Text { text, chat } => {
                let tok = self.tokenizer.as_ref().ok_or_else(|| {
                    Error::bad_input("a text prompt needs a tokenizer, and this model has none: pass token ids")
                })?;
                if *chat {
                    tok.encode(&tok.apply_chat(text)?, false)
                } else {
                    tok.encode(text, true)
                }
            }
        }
    }

    fn prepare(&self, r: &Request) -> Result<SeqState> {
        let cfg = self.backend.config();
        let t = r.sampling.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::bad_input(format!("temperature {t} must be a finite number >= 0")));
        }
        let p = r.sampling.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::bad_input(format!("top_p {p} must lie in (0, 1]")));
        }
        check_policy(&r.policy)?;
        let prompt = self.prompt_ids(&r.prompt)?;
        let layout = Layout::for_model(cfg);
        let block_len = block_len_for(r, cfg)?;
        crate::decode::canvas::check_layout_lengths(prompt.len(), r.gen_len, block_len, layout, cfg)?;
        let prior = match &r.prior {
            Some(pr) => pr.resolve(r.gen_len, cfg, self.tokenizer.as_deref())?,
            None => Vec::new(),
        };
        let spec = CanvasSpec { gen_len: r.gen_len, block_len, stop_at_eos: r.stop_at_eos };
        let canvas = Canvas::with_layout(&prompt, &prior, spec, layout, cfg)?;
        canvas.check_steps(&r.policy)?;
        // The official LLaDA2 `generate` runs `steps = min(steps, gen_length)`.
        let policy = match r.policy {
            Policy::Llada2 { tau, steps } => Policy::Llada2 { tau, steps: steps.min(r.gen_len) },
            p => p,
        };
        let mut seq = SeqState::new(canvas, policy, r.sampling, r.seed, r.seq_id)
            .with_cache(r.cache, r.refresh_every_step);
        check_cache(&seq, cfg)?;
        seq.make_plan(cfg.shifted())?;
        Ok(seq)
    }

    /// `prepare`, then the check that the request can ever be scheduled; errors start with
    /// `label` ("request 3").
    fn checked(&self, r: &Request, label: &str) -> Result<SeqState> {
        let seq = self.prepare(r).map_err(|e| match e {
            Error::BadInput(m) => Error::bad_input(format!("{label}: {m}")),
            other => other,
        })?;
        match self.sched.fits_alone(seq.canvas.len()) {
            Ok(()) => Ok(seq),
            Err(Misfit::Rows { len, max_rows }) => Err(Error::bad_input(format!(
                "{label}: its canvas of {len} rows exceeds the engine's max_rows {max_rows}"
            ))),
            Err(Misfit::Cache { len, cache_rows }) => {
                let per_row = self.backend.cache_row_bytes();
                let (_, budget) = cache_row_cap(self.backend.as_ref(), self.kv_budget);
                Err(Error::bad_input(format!(
                    "{label}: its canvas of {len} rows needs {} bytes of KV cache ({per_row} per row), \
                     more than the KV budget of {} bytes ({cache_rows} rows); raise --kv-budget or shorten the request",
                    len as u64 * per_row,
                    budget.unwrap_or(0)
                )))
            }
        }
    }

    fn run(&mut self, reqs: &[Request], mut on_step: Option<&mut dyn FnMut(&StepEvent)>) -> Result<Vec<Output>> {
        if reqs.is_empty() {
            return Err(Error::bad_input("no requests to generate"));
        }
        let seqs = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| self.checked(r, &format!("request {i}")))
            .collect::<Result<Vec<_>>>()?;
        let mut ids = Vec::with_capacity(seqs.len());
        for s in seqs {
            match self.sched.submit(s) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    self.cancel_all(&ids);
                    return Err(e);
                }
            }
        }
        // Ids of one call are consecutive: nothing else submits while `self` is borrowed.
        let first = ids[0].0;
        let ours = |id: u64| id.checked_sub(first).map(|k| k as usize).filter(|&k| k < reqs.len());
        let step0 = self.sched.batch_step();
        let mut outs: Vec<Option<Output>> = vec![None; reqs.len()];
        let mut left = reqs.len();
        while left > 0 {
            let done = match on_step.as_mut() {
                Some(cb) => {
                    let mut mine = |e: &StepEvent| {
                        if let Some(k) = ours(e.index as u64) {
                            cb(&StepEvent { index: k, batch_step: e.batch_step.wrapping_sub(step0), ..*e })
                        }
                    };
                    self.sched.step(self.backend.as_mut(), Some(&mut mine))
                }
                None => self.sched.step(self.backend.as_mut(), None),
            };
            let done = match done {
                Ok(d) => d,
                Err(e) => {
                    self.cancel_all(&ids);
                    return Err(e);
                }
            };
            for f in done {
                let o = self.output(&f)?;
                match ours(f.id.0) {
                    Some(k) => {
                        outs[k] = Some(o);
                        left -= 1;
                    }
                    None => self.unclaimed.push((f.id, o)),
                }
            }
        }
        Ok(outs.into_iter().map(|o| o.expect("every request finished")).collect())
    }

    fn cancel_all(&mut self, ids: &[RequestId]) {
        for &id in ids {
            self.sched.cancel(id);
        }
    }

    fn output(&self, f: &Finished) -> Result<Output> {
        let s = &f.seq;
        let cfg = self.backend.config();
        let c = &s.canvas;
        // LLaDA2: cut after the first EOS (with stop-at-EOS), as its official `generate`.
        let gen = c.output().to_vec();
        let is_stop = |t: u32| t == cfg.eos_id || t == cfg.eot_id;
        let generated_tokens = gen.iter().enumerate().filter(|&(i, &t)| !c.is_fixed_gen(i) && !is_stop(t)).count();
        let text = match &self.tokenizer {
            Some(tok) => {
                let end = gen.iter().position(|&t| is_stop(t)).unwrap_or(gen.len());
                Some(tok.decode(&gen[..end], true)?)
            }
            None => None,
        };
        let total_ms: f64 = s.step_ms.iter().sum();
        let tokens_per_s = if total_ms > 0.0 { generated_tokens as f64 / (total_ms / 1e3) } else { 0.0 };
        Ok(Output {
            tokens: gen,
            text,
            prompt_len: c.prompt_len() as usize,
            steps: c.steps(),
            commits_per_step: s.commits_per_step.clone(),
            rows_per_step: s.rows_per_step.clone(),
            step_ms: s.step_ms.clone(),
            total_ms,
            generated_tokens,
            tokens_per_s,
            stopped_at_eos: c.stopped_at_eos(),
        })
    }
}

/// The request's block length: its own (or one block of gen_len); for LLaDA2 the model's
/// attention block (config.json `block_length`, 32), which blocks must match to decode as the
/// official `generate` does (the default when the request sets none).
fn block_len_for(r: &Request, cfg: &ModelConfig) -> Result<u32> {
    let Some(l2) = cfg.llada2.as_ref() else { return Ok(r.effective_block_len()) };
    let block = l2.block as u32;
    match r.block_len {
        None => Ok(block),
        Some(b) if b == block => Ok(b),
        Some(b) => Err(Error::bad_input(format!(
            "block_len {b}: LLaDA2 decodes in blocks of its block-causal attention block, {block} \
             (config.json `block_length`), at absolute positions; leave block_len unset or pass {block}"
        ))),
    }
}

/// Refuses a cache scheme the model cannot run exactly: `block` needs block-causal attention
/// (LLaDA2; with bidirectional attention its live rows would read the never-written rows after
/// the current block) and decode blocks made of whole attention blocks (each block starting
/// at a multiple of the attention block: otherwise a cached row would have seen masked rows of
/// the block being decoded, and a live row unwritten ones after it).
fn check_cache(seq: &SeqState, cfg: &ModelConfig) -> Result<()> {
    let scheme = seq.cache;
    if !scheme.needs_block_causal() {
        return Ok(());
    }
    let attn_block = match (cfg.arch, &cfg.llada2) {
        (Arch::Llada2, Some(l2)) => l2.block as u32,
        _ => {
            return Err(Error::bad_input(format!(
                "cache scheme `{scheme}` needs block-causal attention (LLaDA2), and this {:?} model attends \
                 bidirectionally: its live rows would read the never-written cache rows after the block. \
                 Use `dual` or `prefix` instead",
                cfg.arch
            )))
        }
    };
    let block_len = seq.canvas.spec().block_len;
    let (start, _) = seq.block_range();
    if attn_block == 0 || !block_len.is_multiple_of(attn_block) || !start.is_multiple_of(attn_block) {
        return Err(Error::bad_input(format!(
            "cache scheme `{scheme}` is exact only when every decode block is made of whole attention \
             blocks of {attn_block} (block_len and block starts multiples of {attn_block}); this request has \
             block_len {block_len} and a block starting at position {start} (a prompt of {} tokens). Use a \
             block_len and a prompt length that are multiples of {attn_block}, or `dual`",
            seq.canvas.prompt_len()
        )));
    }
    Ok(())
}

/// Refuses policy parameters the parser would refuse (for policies built in code).
fn check_policy(p: &Policy) -> Result<()> {
    let bad = |what: &str| Err(Error::bad_input(format!("policy `{p}`: {what}")));
    if p.steps() == Some(0) || matches!(p, Policy::Confident { steps: 0, .. } | Policy::Llada2 { steps: 0, .. }) {
        return bad("steps must be >= 1");
    }
    match *p {
        Policy::Threshold { tau } | Policy::Confident { tau, .. } | Policy::Llada2 { tau, .. } if !(0.0..=1.0).contains(&tau) => {
            bad("tau must lie in [0, 1]")
        }
        Policy::Edit { tau_m, .. } if !(0.0..=1.0).contains(&tau_m) => bad("mask threshold must lie in [0, 1]"),
        Policy::Edit { tau_e, .. } if !(0.0..=1.0).contains(&tau_e) => bad("edit threshold must lie in [0, 1]"),
        Policy::Factor { f } if !(f.is_finite() && f > 0.0) => bad("factor must be a finite number > 0"),
        _ => Ok(()),
    }
}

