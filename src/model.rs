//! The GPU forward pass: weights on the device, a preallocated workspace and KV cache, and
//! `forward()` that runs the live rows of a `RowBatch` through every layer with the kernels of
//! `ops` and cuBLASLt GEMMs. Nothing is allocated after `GpuModel::new`.
//!
//! A forward copies the batch's index arrays to the device in one packed copy, then launches
//! the layers; a batch shape seen before replays one CUDA graph of the whole forward instead
//! (see `gpu::graph`: the policy, what the shape key holds, and why it is enough).
use std::sync::Arc;

use half::bf16;

use crate::batch::RowBatch;
use crate::config::ModelConfig;
use crate::cpu::rope::RopeMode;
use crate::error::{Error, Result};
use crate::gpu::graph::{self, GraphCache, GraphStep, IndexLayout, IndexViews, ShapeKey};
use crate::gpu::{DTensor, Gpu};
use crate::ops::gemm_fp8::{linear_any, linear_any_deferred, linear_any_deferred_to, linear_swiglu_any};
use crate::ops::{self, attention::{AttnMask, AttnVariant}, gemm::GemmVariant, moe::MoeGemmVariant, prefetch::L2Prefetch};
use crate::quant::WeightFormat;

mod knobs;
mod moe;
mod norm;
mod weights;
use norm::norm_for;
pub use knobs::Ablate;
pub use moe::{GpuMoe, MoeState, SharedExpert};
pub use weights::{check_gpu_support, GpuFfn, GpuLayer, GpuWeights};

/// Most live rows for which `set_full_logits` computes the LM head on every row: the skinny
/// range, where a GEMM costs its weight bytes whatever the row count.
pub const FULL_LOGITS_MAX_ROWS: usize = 64;

/// Sizes the engine preallocates for.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Most live rows in one forward (all sequences together).
    pub rows: usize,
    /// Most rows whose logits one forward produces.
    pub logit_rows: usize,
    /// KV-cache rows (all sequences together).
    pub cache_rows: usize,
    /// Most sequences in one forward.
    pub seqs: usize,
}

/// Activations, index buffers and logits, allocated once.
struct Workspace {
    x: DTensor<bf16>,
    h: DTensor<bf16>,
    qkv: DTensor<bf16>,
    att: DTensor<bf16>,
    o: DTensor<bf16>,
    gu: DTensor<bf16>,
    act: DTensor<bf16>,
    sel: DTensor<bf16>,
    logits: DTensor<f32>,
    /// FP8 channel-scaled weights: the W8A8 scratch (for GEMMs of `min_rows()` rows or more).
    w8a8: Option<ops::gemm_w8a8::W8a8>,
    /// Routing state of the MoE layers (`None` for a dense model).
    moe: Option<MoeState>,
}

/// Per-layer K and V: `[cache_rows, n_kv_heads * head_dim]` bf16, post-RoPE.
pub struct KvCache {
    pub k: Vec<DTensor<bf16>>,
    pub v: Vec<DTensor<bf16>>,
    pub rows: usize,
}

pub struct GpuModel {
    pub gpu: Arc<Gpu>,
    pub cfg: ModelConfig,
    pub weights: GpuWeights,
    pub cache: KvCache,
    pub cap: Capacity,
    pub attn_variant: AttnVariant,
    /// Which GEMM runs the linear layers (`auto`: the skinny kernel for ≤ 32 rows).
    pub gemm_variant: GemmVariant,
    /// Which kernels run the MoE layers' expert GEMMs (grouped by default).
    pub moe_variant: MoeGemmVariant,
    ws: Workspace,
    /// The per-forward index arrays, packed (`graph::IndexLayout`), written by one copy.
    index: DTensor<u32>,
    /// Host staging of `index` (reused; no allocation per step).
    staging: Vec<u32>,
    last_logit_rows: usize,
    /// `set_full_logits`: small forwards compute the LM head on every live row.
    full_logits: bool,
    /// Per-op event timing (`enable_profiling`), for `demask profile`.
    pub profiler: Option<crate::gpu::profile::OpProfiler>,
    graphs: GraphCache,
    graphs_on: bool,
    capture_mode: cudarc::driver::sys::CUstreamCaptureMode,
    /// `set_layer_capture`: the residual stream after every layer of the last forward,
    /// `[n_layers * cap.rows, hidden]` bf16 (layer `l`'s rows from `l * cap.rows`).
    layer_capture: Option<DTensor<bf16>>,
    /// Live rows of the last forward that filled `layer_capture` (for `layer_hidden`).
    captured_rows: Option<usize>,
    /// Ops left out of every forward (`set_ablate`; timing only).
    ablate: Ablate,
    /// L2 prefetches of the next GEMMs' weights (`set_l2_prefetch`; off by default).
    l2_prefetch: L2Prefetch,
    /// The stream and events of side-branch prefetches (made by the first `@side` setting).
    side: Option<knobs::SideBranch>,
    /// Attention copies the cache keys outside the live rows before it waits for RoPE
    /// (`set_kv_preload`; on unless `DEMASK_KV_PRELOAD=0`).
    kv_preload: bool,
}

impl GpuModel {
    pub fn new(gpu: Arc<Gpu>, cfg: ModelConfig, mut weights: GpuWeights, cap: Capacity) -> Result<Self> {
        // `DEMASK_FP8_LM_HEAD=1`: FP8 models also keep an E4M3 LM head (GpuWeights::set_fp8_lm_head).
        if matches!(weights.format, WeightFormat::Fp8(_)) && crate::quant::fp8_lm_head_from_env()? {
            weights.set_fp8_lm_head(&gpu, true)?;
        }
        cfg.validate()?;
        if cap.rows == 0 || cap.seqs == 0 {
            return Err(Error::bad_input("GpuModel: capacity needs at least one row and one sequence"));
        }
        let (t, h) = (cap.rows, cfg.hidden);
        let need = Self::workspace_bytes(&cfg, cap);
        let (free, _) = gpu.mem_info()?;
        if need > free {
            return Err(Error::OutOfMemory(format!(
                "workspace and KV cache need {:.2} GB, {:.2} GB free (lower the batch, lengths or --kv-budget)",
                need as f64 / 1e9,
                free as f64 / 1e9
            )));
        }
        let ws = Workspace {
            x: gpu.alloc(&[t, h])?,
            h: gpu.alloc(&[t, h])?,
            qkv: gpu.alloc(&[t, cfg.qkv_dim()])?,
            att: gpu.alloc(&[t, cfg.q_dim()])?,
            o: gpu.alloc(&[t, h])?,
            gu: gpu.alloc(&[t, 2 * cfg.dense_ffn()])?,
            act: gpu.alloc(&[t, cfg.dense_ffn()])?,
            sel: gpu.alloc(&[cap.logit_rows, h])?,
            logits: gpu.alloc(&[cap.logit_rows, cfg.vocab])?,
            // Every channel-scaled FP8 model: `DEMASK_W8A8_MIN_ROWS` / `set_w8a8_min_rows` may
            // send GEMMs of any row count here.
            w8a8: match weights.format {
                WeightFormat::Fp8(crate::quant::ScaleLayout::Channel) => {
                    Some(ops::gemm_w8a8::W8a8::new(&gpu, t, cfg.hidden.max(cfg.q_dim()).max(cfg.dense_ffn()))?)
                }
                _ => None,
            },
            moe: MoeState::new(&gpu, &cfg, t)?,
        };
        let kvd = cfg.kv_dim();
        let mut cache = KvCache { k: Vec::new(), v: Vec::new(), rows: cap.cache_rows };
        for _ in 0..cfg.n_layers {
            cache.k.push(gpu.alloc(&[cap.cache_rows, kvd])?);
            cache.v.push(gpu.alloc(&[cap.cache_rows, kvd])?);
        }
        let index_len = IndexLayout::new(t, cap.seqs, cap.logit_rows).len;
        let index = gpu.alloc(&[index_len])?;
        let staging = Vec::with_capacity(index_len);
        let capture_mode = graph::capture_mode_from_env()?;
        let mut model = GpuModel {
            gpu,
            cfg,
            weights,
            cache,
            cap,
            attn_variant: AttnVariant::Flash,
            gemm_variant: GemmVariant::Auto,
            moe_variant: MoeGemmVariant::Grouped,
            ws,
            index,
            staging,
            last_logit_rows: 0,
            full_logits: false,
            profiler: None,
            graphs: GraphCache::new(graph::DEFAULT_GRAPH_CAPACITY),
            graphs_on: std::env::var("DEMASK_GRAPHS").map_or(true, |v| v != "0"),
            capture_mode,
            layer_capture: None,
            captured_rows: None,
            ablate: Ablate::NONE,
            l2_prefetch: L2Prefetch::OFF,
            side: None,
            kv_preload: knobs::kv_preload_from_env()?,
        };
        model.set_l2_prefetch(L2Prefetch::from_env()?)?;
        Ok(model)
    }

    /// Device bytes of the workspace, logits and KV cache for `cap`.
    pub fn workspace_bytes(cfg: &ModelConfig, cap: Capacity) -> usize {
        let act = cap.rows * (4 * cfg.hidden + cfg.qkv_dim() + cfg.q_dim() + 3 * cfg.dense_ffn()) * 2;
        let logits = cap.logit_rows * (cfg.vocab * 4 + cfg.hidden * 2);
        let idx = IndexLayout::new(cap.rows, cap.seqs, cap.logit_rows).len * 4;
        let kv = 2 * cfg.n_layers * cap.cache_rows * cfg.kv_dim() * 2;
        act + logits + idx + kv + MoeState::bytes_for(cfg, cap.rows)
    }

    fn check_capacity(&self, b: &RowBatch) -> Result<()> {
        let c = &self.cap;
        for (what, got, max) in [
            ("live rows", b.rows(), c.rows),
            ("logit rows", b.logit_rows.len(), c.logit_rows),
            ("sequences", b.seqs.len(), c.seqs),
        ] {
            if got > max {
                return Err(Error::bad_input(format!("batch has {got} {what}, the engine was sized for {max}")));
            }
        }
        b.validate(&self.cfg, c.cache_rows)
    }

    /// With `on`, a forward of at most [`FULL_LOGITS_MAX_ROWS`] live rows (that the logits
    /// buffer can hold) computes the LM head on every live row instead of only `b.logit_rows`:
    /// at so few rows the LM head streams its weights once either way, and the forward's shape
    /// then stays fixed across the steps of a block, so its CUDA graph replays. The logits of
    /// `b.logit_rows[i]` are then in row [`logits_row`](Self::logits_row)`(b, i)`. Off by
    /// default (`logits()` rows follow `b.logit_rows`); `GpuStepper` turns it on.
    pub fn set_full_logits(&mut self, on: bool) {
        self.full_logits = on;
    }

    /// Whether a forward of `b` computes logits for every live row (see `set_full_logits`).
    pub fn full_logits_for(&self, b: &RowBatch) -> bool {
        let t = b.rows();
        self.full_logits && t <= FULL_LOGITS_MAX_ROWS && t <= self.cap.logit_rows
    }

    /// The row of the logits buffer holding the logits of `b.logit_rows[i]` after `forward(b)`.
    pub fn logits_row(&self, b: &RowBatch, i: usize) -> u32 {
        if self.full_logits_for(b) {
            b.logit_rows[i]
        } else {
            i as u32
        }
    }

    /// The shape key of `b` under the current variants: every host scalar `run` uses.
    fn shape_key(&self, b: &RowBatch) -> ShapeKey {
        let t = b.rows();
        let (r, identity) = if self.full_logits_for(b) {
            (t, true)
        } else {
            let r = b.logit_rows.len();
            (r, r == t && b.logit_rows.iter().enumerate().all(|(i, &x)| i as u32 == x))
        };
        ShapeKey {
            rows: t,
            seqs: b.seqs.len(),
            max_rows: b.seqs.iter().map(|s| s.row_count as usize).max().unwrap_or(0),
            logit_rows: r,
            identity,
            gemm: self.gemm_variant,
            attn: self.attn_variant,
            moe: self.moe_variant,
        }
    }

    /// Packs the index arrays of `b` into the staging buffer at layout `l` and copies them to
    /// the device in one transfer, before any launch (or capture) of the forward.
    fn upload(&mut self, b: &RowBatch, l: &IndexLayout) -> Result<()> {
        let s = &mut self.staging;
        s.clear();
        s.resize(l.len, 0);
        let t = l.rows;
        s[l.tokens..l.tokens + t].copy_from_slice(&b.tokens);
        s[l.positions..l.positions + t].copy_from_slice(&b.positions);
        let rows = &mut s[l.cache_rows..l.cache_rows + t];
        for sq in &b.seqs {
            let span = sq.row_start as usize..(sq.row_start + sq.row_count) as usize;
            for (dst, &p) in rows[span.clone()].iter_mut().zip(&b.positions[span]) {
                *dst = sq.cache_base + p;
            }
        }
        for (i, sq) in b.seqs.iter().enumerate() {
            let at = l.spans + 4 * i;
            s[at..at + 4].copy_from_slice(&[sq.row_start, sq.row_count, sq.cache_base, sq.kv_len]);
            // The keys this forward writes: its live rows' positions (cache row cache_base + p).
            let span = sq.row_start as usize..(sq.row_start + sq.row_count) as usize;
            let pos = &b.positions[span];
            let lo = pos.iter().copied().min().unwrap_or(0);
            let hi = pos.iter().copied().max().map_or(0, |p| p + 1);
            s[l.fresh + 2 * i..l.fresh + 2 * i + 2].copy_from_slice(&[lo, hi]);
        }
        let idx = &mut s[l.logit_idx..l.len];
        if idx.len() == b.logit_rows.len() {
            idx.copy_from_slice(&b.logit_rows);
        } else {
            // Full logits (every live row): the gather is skipped; keep the slots defined.
            for (i, v) in idx.iter_mut().enumerate() {
                *v = i as u32;
            }
        }
        self.index.write(&self.gpu, s)
    }

    /// Runs the live rows of `b` through the model; logits of `b.logit_rows` are left in the
    /// device buffer `[logit_rows, vocab]` f32 (see `logits()` / `logits_to_host()`).
    ///
    /// After the one upload, the launches are run op by op, or captured into a CUDA graph, or
    /// replayed from one, by `gpu::graph::GraphCache::plan` for the batch's [`ShapeKey`]:
    /// the first forward of a shape runs eagerly, the second is captured (and launched), later
    /// ones replay. A failed capture leaves that shape eager. Profiling, layer capture
    /// (`set_layer_capture`), `DEMASK_SYNC_LAUNCHES=1` and `set_graphs(false)` run every
    /// forward eagerly.
    pub fn forward(&mut self, b: &RowBatch) -> Result<()> {
        self.check_capacity(b)?;
        // This thread may not be the one that built the model (an engine is `Send`).
        self.gpu.bind_to_thread()?;
        let key = self.shape_key(b);
        self.upload(b, &IndexLayout::new(key.rows, key.seqs, key.logit_rows))?;
        let eager_only = self.profiler.is_some() || self.layer_capture.is_some() || self.gpu.sync_launches;
        let step = if self.graphs_on && !eager_only {
            self.graphs.rebind(self.binding());
            self.graphs.plan(key)
        } else {
            self.graphs.note_eager();
            GraphStep::Eager
        };
        match (step, self.graphs.graph(&key)) {
            (GraphStep::Replay, Some(g)) => g.launch().map_err(crate::gpu::drv("cuGraphLaunch"))?,
            (GraphStep::Capture, _) => {
                let stream = self.gpu.stream.clone();
                let mode = self.capture_mode;
                match graph::capture_and_launch(&stream, mode, || self.run(&key)) {
                    Ok(g) => self.graphs.captured(key, g),
                    Err(why) => {
                        // An error cudarc recorded while the capture failed must not surface in
                        // the eager rerun; keep it in the reason instead.
                        let why = match self.gpu.ctx.check_err() {
                            Ok(()) => why,
                            Err(e) => format!("{why} (then {e:?})"),
                        };
                        self.graphs.failed(key, why);
                        self.run(&key)?;
                    }
                }
            }
            _ => self.run(&key)?,
        }
        self.last_logit_rows = key.logit_rows;
        self.captured_rows = self.layer_capture.as_ref().map(|_| key.rows);
        Ok(())
    }

    /// Fingerprint of every device address a captured graph bakes in besides the private
    /// workspace: weights, KV cache (public fields a caller could replace) and the model
    /// constants that become kernel parameters.
    fn binding(&self) -> u64 {
        let g = &*self.gpu;
        let w = &self.weights;
        let tensors = w
            .layers
            .iter()
            .flat_map(GpuLayer::tensors)
            .chain([&w.embed, &w.final_norm, &w.lm_head])
            .chain(self.cache.k.iter())
            .chain(self.cache.v.iter())
            .map(|x| [x.ptr(g), x.len() as u64])
            .chain(w.layers.iter().flat_map(GpuLayer::f32_tensors).map(|x| [x.ptr(g), x.len() as u64]));
        let linears = w.layers.iter().flat_map(GpuLayer::linears).flat_map(|l| l.fingerprint(g));
        let head_fp8 = w.lm_head_fp8.iter().flat_map(|f| [f.q.ptr(g), f.q.len() as u64, f.scales.ptr(g), f.scales.len() as u64]);
        let experts = w.layers.iter().flat_map(GpuLayer::experts).flat_map(|x| x.fingerprint(g));
        let c = &self.cfg;
        let consts = [
            self.cache.rows as u64,
            self.cache.k.len() as u64,
            (c.norm_eps as f32).to_bits() as u64,
            (c.rope_theta as f32).to_bits() as u64,
            (c.n_heads as u64) << 32 | c.n_kv_heads as u64,
        ];
        graph::fingerprint(tensors.flatten().chain(linears).chain(head_fp8).chain(experts).chain(consts))
    }

    /// Launches the forward of a batch of shape `key` whose index arrays are already in
    /// `self.index` (eagerly, or into an open capture). Reads nothing else of the batch.
    fn run(&mut self, key: &ShapeKey) -> Result<()> {
        let gpu = self.gpu.clone();
        let g = &*gpu;
        let cfg = &self.cfg;
        let (t, r) = (key.rows, key.logit_rows);
        let eps = cfg.norm_eps as f32;
        let mode = RopeMode::for_arch(cfg.arch);
        let gv = key.gemm;
        let idx = IndexViews::new(g, &self.index, &IndexLayout::new(t, key.seqs, r))?;
        let ws = &mut self.ws;
        let prof = &mut self.profiler;
        let cap_rows = self.cap.rows;
        let ab = self.ablate;
        let pf = self.l2_prefetch;
        let kv_preload = self.kv_preload;
        let side = self.side.as_ref().filter(|_| pf.side);
        let mut forked = false;
        // One prefetch launch: in line, or forked onto the side stream.
        macro_rules! prefetch {
            ($items:expr, $budget:expr, $spread:expr) => {
                let plan = ops::prefetch::plan($items, $budget, $spread)?;
                match side {
                    Some(sb) if plan.chunks() > 0 => {
                        sb.fork(g)?;
                        ops::prefetch::l2_prefetch_on(g, &sb.stream, &plan)?;
                        forked = true;
                    }
                    _ => ops::prefetch::l2_prefetch(g, &plan)?,
                }
                mark!("l2_prefetch");
            };
        }
        // A GEMM left out (`set_ablate`) drops the codes its norm quantised for it.
        macro_rules! skipped {
            () => {
                if let Some(m) = ws.w8a8.as_mut() {
                    m.clear_prequantized();
                }
            };
        }
        // Records the end of an op when profiling (one event record; nothing otherwise).
        macro_rules! mark {
            ($name:expr) => {
                if let Some(p) = prof.as_mut() {
                    p.mark(g, $name)?;
                }
            };
        }
        if let Some(p) = prof.as_mut() {
            p.begin(g)?;
        }
        if let Some(m) = ws.w8a8.as_mut() {
            m.reset_pending();
        }
        ops::embed::gather_rows(g, t, &idx.tokens, &self.weights.embed, &mut ws.x)?;
        mark!("embed");
        for (li, l) in self.weights.layers.iter().enumerate() {
            // Host-side range per layer for nsys / ncu (eager forwards; a replayed graph has none).
            let _nvtx = crate::gpu::nvtx::range(c"layer");
            // The previous layer's down projection (in `o`) joins the residual here.
            let delta = if li == 0 { None } else { Some(&ws.o) };
            norm_for(g, t, &mut ws.x, delta, &l.attn_norm, eps, &mut ws.h, ws.w8a8.as_mut(), Some(&l.wqkv))?;
            mark!("add_rmsnorm");
            if let (Some(c), true) = (self.layer_capture.as_mut(), li > 0) {
                // `x` now holds layer li − 1's output (its down projection just added).
                ws.x.copy_to(g, t * cfg.hidden, c, (li - 1) * cap_rows * cfg.hidden)?;
            }
            let extras = ops::rope::RopeExtras {
                q_norm: l.q_norm.as_ref(),
                k_norm: l.k_norm.as_ref(),
                eps,
                rotary_dim: cfg.llada2.as_ref().map_or(cfg.head_dim, |l2| l2.rotary_dim),
            };
            if !ab.runs("qkv") {
                skipped!();
            } else if extras.is_none() {
                // The plain RoPE finishes a `split-scale` product itself (its scale epilogue fused).
                linear_any_deferred_to(g, gv, t, &ws.h, &l.wqkv, l.bqkv.as_ref(), &mut ws.qkv, ws.w8a8.as_mut(), usize::MAX)?;
            } else {
                linear_any(g, gv, t, &ws.h, &l.wqkv, l.bqkv.as_ref(), &mut ws.qkv, ws.w8a8.as_mut())?;
            }
            // Taken here even when RoPE is left out (`set_ablate`, timing only): dropped with it.
            let qkv_scale = match ws.w8a8.as_mut() {
                Some(m) => m.take_deferred(g, &ws.qkv)?,
                None => None,
            };
            mark!("gemm_qkv");
            // RoPE, attention and the O quantiser leave DRAM idle: fetch the O weight, then
            // gate|up, into L2 meanwhile.
            if pf.after_qkv > 0 {
                let gate_up = match &l.ffn {
                    GpuFfn::Dense { w_gate_up, .. } => w_gate_up.stream_span(g),
                    GpuFfn::Moe(_) => (0, 0),
                };
                prefetch!(&[l.wo.stream_span(g), gate_up], pf.after_qkv, pf.spread);
            }
            if ab.runs("rope") {
                ops::rope::rope_kv_store_scaled(
                    g,
                    t,
                    &mut ws.qkv,
                    qkv_scale.as_ref(),
                    &idx.positions,
                    &idx.cache_rows,
                    &mut self.cache.k[li],
                    &mut self.cache.v[li],
                    cfg.n_heads,
                    cfg.n_kv_heads,
                    cfg.rope_theta as f32,
                    mode,
                    &extras,
                )?;
            }
            mark!("rope_kv_store");
            let mask = match &cfg.llada2 {
                Some(l2) => AttnMask::BlockCausal { positions: &idx.positions, block: l2.block },
                None => AttnMask::Bidirectional,
            };
            if ab.runs("attention") {
                ops::attention::attention(
                    g,
                    key.attn,
                    t,
                    &ws.qkv,
                    cfg.qkv_dim(),
                    &idx.spans,
                    key.seqs,
                    key.max_rows,
                    &self.cache.k[li],
                    &self.cache.v[li],
                    cfg.n_heads,
                    cfg.n_kv_heads,
                    mask,
                    kv_preload.then_some(&*idx.fresh),
                    &mut ws.att,
                )?;
            }
            mark!("attention");
            // Only the residual add (norm_for) reads `o`: a W8A8 scale epilogue is left to it.
            if ab.runs("o") {
                linear_any_deferred(g, gv, t, &ws.att, &l.wo, None, &mut ws.o, ws.w8a8.as_mut())?;
            }
            mark!("gemm_o");
            let next = match &l.ffn {
                GpuFfn::Dense { w_gate_up, .. } if w_gate_up.fuses_swiglu(gv, t, cfg.hidden) => Some(w_gate_up),
                _ => None,
            };
            norm_for(g, t, &mut ws.x, Some(&ws.o), &l.ffn_norm, eps, &mut ws.h, ws.w8a8.as_mut(), next)?;
            mark!("add_rmsnorm");
            match &l.ffn {
                GpuFfn::Dense { w_gate_up, w_down } => {
                    if !ab.runs("gate_up") {
                        skipped!();
                    } else if w_gate_up.fuses_swiglu(gv, t, cfg.hidden) {
                        // SwiGLU in the gate|up GEMM's epilogue (one launch, no `gu` round trip).
                        linear_swiglu_any(g, gv, t, &ws.h, w_gate_up, &mut ws.gu, &mut ws.act, ws.w8a8.as_mut(), Some(w_down))?;
                        mark!("gemm_gate_up+swiglu");
                    } else {
                        linear_any(g, gv, t, &ws.h, w_gate_up, None, &mut ws.gu, None)?;
                        mark!("gemm_gate_up");
                        ops::swiglu::swiglu(g, t, &ws.gu, &mut ws.act)?;
                        mark!("swiglu");
                    }
                    // `o` goes to the next layer's (or the final) norm_for, nothing else.
                    if ab.runs("down") {
                        linear_any_deferred(g, gv, t, &ws.act, w_down, None, &mut ws.o, ws.w8a8.as_mut())?;
                    } else {
                        skipped!();
                    }
                    mark!("gemm_down");
                    // The residual add and norm before the next QKV GEMM leave DRAM idle too.
                    if let (true, Some(next)) = (pf.after_down > 0, self.weights.layers.get(li + 1)) {
                        prefetch!(&[next.wqkv.stream_span(g)], pf.after_down, true);
                    }
                }
                GpuFfn::Moe(m) => {
                    let st = ws.moe.as_mut().ok_or_else(|| Error::bad_input("MoE layer in a model built without MoE state"))?;
                    // LLaDA2's shared expert first, into `o`; the combine adds the routed sum.
                    let combine = match (&m.shared, st.shared_gu.as_mut(), st.shared_act.as_mut()) {
                        (Some(se), Some(sgu), Some(sact)) => {
                            linear_swiglu_any(g, gv, t, &ws.h, &se.w_gate_up, sgu, sact, ws.w8a8.as_mut(), Some(&se.w_down))?;
                            mark!("gemm_shared_gate_up+swiglu");
                            linear_any(g, gv, t, sact, &se.w_down, None, &mut ws.o, ws.w8a8.as_mut())?;
                            mark!("gemm_shared_down");
                            ops::moe::Combine::Add
                        }
                        (None, ..) => ops::moe::Combine::Write,
                        _ => return Err(Error::bad_input("shared expert without its workspace")),
                    };
                    ops::gemm::linear(g, gv, t, &ws.h, &m.router, None, &mut st.logits)?;
                    mark!("gemm_router");
                    ops::moe::moe_route(g, t, &st.logits, &m.scoring(cfg, st.norm_topk)?, &mut st.ws)?;
                    if st.tally_on {
                        ops::moe::moe_tally_touched(g, &st.ws, &mut st.tally)?;
                    }
                    mark!("moe_route");
                    ops::moe_fp8::moe_gate_up_swiglu_any(g, key.moe, &mut st.ws, t, &ws.h, &m.w_gate_up)?;
                    mark!("moe_gate_up+swiglu");
                    ops::moe_fp8::moe_down_combine_any(g, key.moe, &mut st.ws, t, &m.w_down, combine, &mut ws.o)?;
                    mark!("moe_down+combine");
                }
            }
        }
        if let (true, Some(sb)) = (forked, side) {
            sb.join(g)?;
        }
        norm_for(g, t, &mut ws.x, Some(&ws.o), &self.weights.final_norm, eps, &mut ws.h, ws.w8a8.as_mut(), None)?;
        mark!("add_rmsnorm");
        if let Some(c) = self.layer_capture.as_mut() {
            let last = cfg.n_layers - 1;
            ws.x.copy_to(g, t * cfg.hidden, c, last * cap_rows * cfg.hidden)?;
        }
        // The E4M3 LM head where the model has one and the step few logit rows (one pass of
        // the W8A16 kernel), else bf16.
        let head_fp8 = self.weights.lm_head_fp8.as_ref().filter(|_| r <= crate::quant::FP8_LM_HEAD_MAX_ROWS);
        let x_head = if key.identity {
            &ws.h
        } else {
            ops::embed::gather_rows(g, r, &idx.logit_rows, &ws.h, &mut ws.sel)?;
            mark!("gather_logit_rows");
            &ws.sel
        };
        match head_fp8 {
            _ if !ab.runs("head") => {}
            Some(w) => ops::gemm_fp8::linear_fp8(g, r, x_head, w, None, &mut ws.logits)?,
            None => ops::gemm::linear(g, gv, r, x_head, &self.weights.lm_head, None, &mut ws.logits)?,
        }
        mark!("gemm_lm_head");
        if let Some(p) = prof.as_mut() {
            p.end()?;
        }
        Ok(())
    }

    /// The logits buffer of the last forward: `[rows, vocab]` f32 on the device.
    pub fn logits(&self) -> (&DTensor<f32>, usize) {
        (&self.ws.logits, self.last_logit_rows)
    }

    /// Mutable access to the logits buffer (e.g. to exclude the mask token before sampling).
    pub fn logits_mut(&mut self) -> (&mut DTensor<f32>, usize) {
        (&mut self.ws.logits, self.last_logit_rows)
    }

    /// Copies the last forward's logits to the host (synchronising).
    pub fn logits_to_host(&self) -> Result<Vec<f32>> {
        self.ws.logits.to_host_n(&self.gpu, self.last_logit_rows * self.cfg.vocab)
    }

    /// Full-canvas forward of each sequence; returns host logits `[Σ len, vocab]`.
    pub fn forward_full(&mut self, seqs: &[Vec<u32>]) -> Result<Vec<f32>> {
        let b = RowBatch::full(seqs);
        self.forward(&b)?;
        self.logits_to_host()
    }
}
