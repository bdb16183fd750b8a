//! The GPU forward pass: weights on the device, a preallocated workspace and KV cache, and
//! `forward()` that runs the live rows of a `RowBatch` through every layer with the kernels of
//! `ops` and cuBLASLt GEMMs. Nothing is allocated after `GpuModel::new`.
use std::sync::Arc;

use half::bf16;

use crate::batch::RowBatch;
use crate::config::ModelConfig;
use crate::cpu::rope::RopeMode;
use crate::error::{Error, Result};
use crate::gpu::{DTensor, Gpu};
use crate::ops::{self, attention::AttnVariant, gemm::GemmVariant};
use crate::weights::HostWeights;

pub struct GpuLayer {
    pub attn_norm: DTensor<bf16>,
    pub wqkv: DTensor<bf16>,
    pub bqkv: Option<DTensor<bf16>>,
    pub wo: DTensor<bf16>,
    pub ffn_norm: DTensor<bf16>,
    pub w_gate_up: DTensor<bf16>,
    pub w_down: DTensor<bf16>,
}

pub struct GpuWeights {
    pub embed: DTensor<bf16>,
    pub layers: Vec<GpuLayer>,
    pub final_norm: DTensor<bf16>,
    pub lm_head: DTensor<bf16>,
}

/// Shapes of every weight tensor of `cfg`, in one place for upload and synthesis.
struct Shapes {
    hidden: usize,
    qkv: usize,
    q: usize,
    ffn: usize,
    vocab: usize,
}

impl Shapes {
    fn of(cfg: &ModelConfig) -> Self {
        Shapes { hidden: cfg.hidden, qkv: cfg.qkv_dim(), q: cfg.q_dim(), ffn: cfg.ffn, vocab: cfg.vocab }
    }
}

impl GpuWeights {
    /// Copies host weights to the device.
    pub fn upload(gpu: &Gpu, w: &HostWeights) -> Result<Self> {
        let s = Shapes::of(&w.cfg);
        let up = |v: &[bf16], dims: &[usize]| gpu.upload(v, dims);
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(GpuLayer {
                attn_norm: up(&l.attn_norm, &[s.hidden])?,
                wqkv: up(&l.wqkv, &[s.qkv, s.hidden])?,
                bqkv: l.bqkv.as_deref().map(|b| up(b, &[s.qkv])).transpose()?,
                wo: up(&l.wo, &[s.hidden, s.q])?,
                ffn_norm: up(&l.ffn_norm, &[s.hidden])?,
                w_gate_up: up(&l.w_gate_up, &[2 * s.ffn, s.hidden])?,
                w_down: up(&l.w_down, &[s.hidden, s.ffn])?,
            });
        }
        Ok(GpuWeights {
            embed: up(&w.embed, &[s.vocab, s.hidden])?,
            layers,
            final_norm: up(&w.final_norm, &[s.hidden])?,
            lm_head: up(&w.lm_head, &[s.vocab, s.hidden])?,
        })
    }

    /// Random weights of the exact architecture, generated on the device (no host copy), with
    /// the scales of `checkpoint::random_weights` (linear N(0, 1/√fan_in), embedding N(0, 1),
    /// norms 1 + 0.1·N, biases 0.1·N). Not bit-identical to the host generator.
    pub fn synthesize(gpu: &Gpu, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        let s = Shapes::of(cfg);
        let mut counter = 0u64;
        let mut gen = |dims: &[usize], mean: f32, std: f32| -> Result<DTensor<bf16>> {
            let mut t = gpu.alloc::<bf16>(dims)?;
            counter += 1;
            ops::fill::fill_normal(gpu, &mut t, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ counter, mean, std)?;
            Ok(t)
        };
        let inv = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            layers.push(GpuLayer {
                attn_norm: gen(&[s.hidden], 1.0, 0.1)?,
                wqkv: gen(&[s.qkv, s.hidden], 0.0, inv(s.hidden))?,
                bqkv: if cfg.qkv_bias { Some(gen(&[s.qkv], 0.0, 0.1)?) } else { None },
                wo: gen(&[s.hidden, s.q], 0.0, inv(s.q))?,
                ffn_norm: gen(&[s.hidden], 1.0, 0.1)?,
                w_gate_up: gen(&[2 * s.ffn, s.hidden], 0.0, inv(s.hidden))?,
                w_down: gen(&[s.hidden, s.ffn], 0.0, inv(s.ffn))?,
            });
        }
        let w = GpuWeights {
            embed: gen(&[s.vocab, s.hidden], 0.0, 1.0)?,
            layers,
            final_norm: gen(&[s.hidden], 1.0, 0.1)?,
            lm_head: gen(&[s.vocab, s.hidden], 0.0, inv(s.hidden))?,
        };
        gpu.synchronize()?;
        Ok(w)
    }

    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.bytes()
                    + l.wqkv.bytes()
                    + l.bqkv.as_ref().map_or(0, |b| b.bytes())
                    + l.wo.bytes()
                    + l.ffn_norm.bytes()
                    + l.w_gate_up.bytes()
                    + l.w_down.bytes()
            })
            .sum();
        l + self.embed.bytes() + self.final_norm.bytes() + self.lm_head.bytes()
    }
}

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
    tokens: DTensor<u32>,
    positions: DTensor<u32>,
    cache_rows: DTensor<u32>,
    seqs: DTensor<u32>,
    logit_rows: DTensor<u32>,
    /// Split-K partials of the skinny GEMM (f32), sized for the layer shapes at ≤ 64 rows.
    gemm_scratch: DTensor<f32>,
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
    ws: Workspace,
    /// Host staging for the per-forward index arrays (reused; no allocation per step).
    staging: Vec<u32>,
    last_logit_rows: usize,
    /// Per-op event timing (`enable_profiling`), for `demask profile`.
    pub profiler: Option<crate::gpu::profile::OpProfiler>,
}

impl GpuModel {
    pub fn new(gpu: Arc<Gpu>, cfg: ModelConfig, weights: GpuWeights, cap: Capacity) -> Result<Self> {
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
            gu: gpu.alloc(&[t, 2 * cfg.ffn])?,
            act: gpu.alloc(&[t, cfg.ffn])?,
            sel: gpu.alloc(&[cap.logit_rows, h])?,
            logits: gpu.alloc(&[cap.logit_rows, cfg.vocab])?,
            tokens: gpu.alloc(&[t])?,
            positions: gpu.alloc(&[t])?,
            cache_rows: gpu.alloc(&[t])?,
            seqs: gpu.alloc(&[cap.seqs * 4])?,
            logit_rows: gpu.alloc(&[cap.logit_rows])?,
            gemm_scratch: gpu.alloc(&[Self::gemm_scratch_len(&cfg, cap).max(1)])?,
        };
        let kvd = cfg.kv_dim();
        let mut cache = KvCache { k: Vec::new(), v: Vec::new(), rows: cap.cache_rows };
        for _ in 0..cfg.n_layers {
            cache.k.push(gpu.alloc(&[cap.cache_rows, kvd])?);
            cache.v.push(gpu.alloc(&[cap.cache_rows, kvd])?);
        }
        let staging = Vec::with_capacity(4 * t + 4 * cap.seqs + cap.logit_rows);
        Ok(GpuModel {
            gpu,
            cfg,
            weights,
            cache,
            cap,
            attn_variant: AttnVariant::Flash,
            gemm_variant: GemmVariant::Auto,
            ws,
            staging,
            last_logit_rows: 0,
            profiler: None,
        })
    }

    /// f32 elements of split-K scratch the skinny GEMM needs for this model's layer shapes
    /// (the LM head never splits).
    fn gemm_scratch_len(cfg: &ModelConfig, cap: Capacity) -> usize {
        let t = cap.rows.min(ops::gemm::SKINNY_ROW_LIMIT);
        [(cfg.qkv_dim(), cfg.hidden), (cfg.hidden, cfg.q_dim()), (2 * cfg.ffn, cfg.hidden), (cfg.hidden, cfg.ffn)]
            .iter()
            .map(|&(n, k)| ops::gemm::skinny_scratch_len(t, n, k))
            .max()
            .unwrap_or(0)
    }

    /// Device bytes of the workspace, logits and KV cache for `cap`.
    pub fn workspace_bytes(cfg: &ModelConfig, cap: Capacity) -> usize {
        let act = cap.rows * (4 * cfg.hidden + cfg.qkv_dim() + cfg.q_dim() + 3 * cfg.ffn) * 2;
        let logits = cap.logit_rows * (cfg.vocab * 4 + cfg.hidden * 2);
        let idx = (4 * cap.rows + 4 * cap.seqs + cap.logit_rows) * 4 + Self::gemm_scratch_len(cfg, cap) * 4;
        let kv = 2 * cfg.n_layers * cap.cache_rows * cfg.kv_dim() * 2;
        act + logits + idx + kv
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

    fn upload(&mut self, b: &RowBatch) -> Result<()> {
        let gpu = self.gpu.clone();
        let s = &mut self.staging;
        s.clear();
        s.extend_from_slice(&b.tokens);
        self.ws.tokens.write(&gpu, s)?;
        self.ws.positions.write(&gpu, &b.positions)?;
        s.clear();
        for sq in &b.seqs {
            for r in sq.row_start..sq.row_start + sq.row_count {
                s.push(sq.cache_base + b.positions[r as usize]);
            }
        }
        self.ws.cache_rows.write(&gpu, s)?;
        s.clear();
        for sq in &b.seqs {
            s.extend_from_slice(&[sq.row_start, sq.row_count, sq.cache_base, sq.kv_len]);
        }
        self.ws.seqs.write(&gpu, s)?;
        self.ws.logit_rows.write(&gpu, &b.logit_rows)?;
        Ok(())
    }

    /// Runs the live rows of `b` through the model; logits of `b.logit_rows` are left in the
    /// device buffer `[logit_rows, vocab]` f32 (see `logits()` / `logits_to_host()`).
    pub fn forward(&mut self, b: &RowBatch) -> Result<()> {
        self.check_capacity(b)?;
        self.upload(b)?;
        let gpu = self.gpu.clone();
        let g = &*gpu;
        let cfg = &self.cfg;
        let t = b.rows();
        let eps = cfg.norm_eps as f32;
        let mode = RopeMode::for_arch(cfg.arch);
        let max_rows = b.seqs.iter().map(|s| s.row_count as usize).max().unwrap_or(0);
        let gv = self.gemm_variant;
        let ws = &mut self.ws;
        let prof = &mut self.profiler;
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
        ops::embed::gather_rows(g, t, &ws.tokens, &self.weights.embed, &mut ws.x)?;
        mark!("embed");
        for (li, l) in self.weights.layers.iter().enumerate() {
            // The previous layer's down projection (in `o`) joins the residual here.
            let delta = if li == 0 { None } else { Some(&ws.o) };
            ops::norm::add_rmsnorm(g, t, &mut ws.x, delta, &l.attn_norm, eps, &mut ws.h)?;
            mark!("add_rmsnorm");
            ops::gemm::linear(g, gv, t, &ws.h, &l.wqkv, l.bqkv.as_ref(), &mut ws.qkv, &mut ws.gemm_scratch)?;
            mark!("gemm_qkv");
            ops::rope::rope_kv_store(
                g,
                t,
                &mut ws.qkv,
                &ws.positions,
                &ws.cache_rows,
                &mut self.cache.k[li],
                &mut self.cache.v[li],
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.rope_theta as f32,
                mode,
            )?;
            mark!("rope_kv_store");
            ops::attention::attention(
                g,
                self.attn_variant,
                t,
                &ws.qkv,
                cfg.qkv_dim(),
                &ws.seqs,
                b.seqs.len(),
                max_rows,
                &self.cache.k[li],
                &self.cache.v[li],
                cfg.n_heads,
                cfg.n_kv_heads,
                &mut ws.att,
            )?;
            mark!("attention");
            ops::gemm::linear(g, gv, t, &ws.att, &l.wo, None, &mut ws.o, &mut ws.gemm_scratch)?;
            mark!("gemm_o");
            ops::norm::add_rmsnorm(g, t, &mut ws.x, Some(&ws.o), &l.ffn_norm, eps, &mut ws.h)?;
            mark!("add_rmsnorm");
            ops::gemm::linear(g, gv, t, &ws.h, &l.w_gate_up, None, &mut ws.gu, &mut ws.gemm_scratch)?;
            mark!("gemm_gate_up");
            ops::swiglu::swiglu(g, t, &ws.gu, &mut ws.act)?;
            mark!("swiglu");
            ops::gemm::linear(g, gv, t, &ws.act, &l.w_down, None, &mut ws.o, &mut ws.gemm_scratch)?;
            mark!("gemm_down");
        }
        ops::norm::add_rmsnorm(g, t, &mut ws.x, Some(&ws.o), &self.weights.final_norm, eps, &mut ws.h)?;
        mark!("add_rmsnorm");
        let r = b.logit_rows.len();
        let identity = r == t && b.logit_rows.iter().enumerate().all(|(i, &x)| i as u32 == x);
        if identity {
            ops::gemm::linear(g, gv, r, &ws.h, &self.weights.lm_head, None, &mut ws.logits, &mut ws.gemm_scratch)?;
        } else {
            ops::embed::gather_rows(g, r, &ws.logit_rows, &ws.h, &mut ws.sel)?;
            mark!("gather_logit_rows");
            ops::gemm::linear(g, gv, r, &ws.sel, &self.weights.lm_head, None, &mut ws.logits, &mut ws.gemm_scratch)?;
        }
        mark!("gemm_lm_head");
        if let Some(p) = prof.as_mut() {
            p.end()?;
        }
        self.last_logit_rows = r;
        Ok(())
    }

    /// Turns per-op event timing on (every forward then ends with a host sync) or off.
    pub fn enable_profiling(&mut self, on: bool) -> Result<()> {
        self.profiler = if on { Some(crate::gpu::profile::OpProfiler::new(&self.gpu, 16 * self.cfg.n_layers + 8)?) } else { None };
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
