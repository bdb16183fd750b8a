//! The whole-model forward pass on the CPU (f32): the oracle for the GPU forward and the
//! backend that runs tiny models end to end. Same `RowBatch` semantics as the GPU: live rows
//! write post-RoPE K/V into the cache at `cache_base + position`, attention reads
//! `[cache_base, cache_base + kv_len)` of their sequence. [`CpuModel::set_act_quant`] fake-quantises
//! the inputs of the linears the GPU runs W8A8 (with FP8 weights: the W8A8 reference).
use crate::batch::RowBatch;
use crate::config::ModelConfig;
use crate::cpu::llada2::{self, CpuLlada2Moe};
use crate::cpu::moe::{self, CpuMoe};
use crate::cpu::{attention, embed, gemm, norm, rope, swiglu};
use crate::error::{Error, Result};
use crate::weights::HostWeights;

pub use crate::cpu::gemm_fp8::ActQuant;

fn f32s(v: &[half::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

struct CpuLayer {
    attn_norm: Vec<f32>,
    wqkv: Vec<f32>,
    bqkv: Option<Vec<f32>>,
    wo: Vec<f32>,
    ffn_norm: Vec<f32>,
    w_gate_up: Vec<f32>,
    w_down: Vec<f32>,
    /// Per-head q/k RMSNorm weights (LLaDA-MoE), applied before RoPE.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// The experts replacing the dense FFN (LLaDA-MoE).
    moe: Option<CpuMoe>,
    /// LLaDA2's experts, router bias and shared expert (its MoE layers).
    moe2: Option<CpuLlada2Moe>,
}

/// f32 weights of a whole model.
pub struct CpuModel {
    pub cfg: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<CpuLayer>,
    final_norm: Vec<f32>,
    lm_head: Vec<f32>,
    /// How cos/sin enter the rotation: by default [`rope::RopeMode::Llada`] (f32 cos/sin, f32
    /// rotation) for both architectures, which is what the official code computes in f32
    /// (Dream casts cos/sin to the activation dtype: a no-op in f32). The GPU's bf16 Dream
    /// forward rounds them to bf16 ([`rope::RopeMode::Dream`], settable for parity checks).
    rope_mode: rope::RopeMode,
    /// Activation quantisation at the W8A8 linears ([`ActQuant::None`] unless set).
    act_quant: ActQuant,
}

/// Per-layer K and V rows, `[capacity, n_kv_heads * head_dim]` each.
pub struct CpuKvCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub capacity: usize,
}

/// The per-layer hook of [`CpuModel::forward_observed`]: `(layer, residual stream)`.
pub type LayerHook<'a> = &'a mut dyn FnMut(usize, &[f32]);

/// Refuses models whose f32 copy would not fit comfortably in host memory.
const MAX_CPU_PARAMS: u64 = 2_000_000_000;

impl CpuModel {
    pub fn new(w: &HostWeights) -> Result<Self> {
        let params = w.cfg.param_count();
        if params > MAX_CPU_PARAMS {
            return Err(Error::bad_input(format!(
                "the CPU backend runs small models only ({params} parameters; limit {MAX_CPU_PARAMS}): use a GPU"
            )));
        }
        Ok(CpuModel {
            cfg: w.cfg.clone(),
            embed: f32s(&w.embed),
            layers: w
                .layers
                .iter()
                .map(|l| CpuLayer {
                    attn_norm: f32s(&l.attn_norm),
                    wqkv: f32s(&l.wqkv),
                    bqkv: l.bqkv.as_deref().map(f32s),
                    wo: f32s(&l.wo),
                    ffn_norm: f32s(&l.ffn_norm),
                    w_gate_up: f32s(&l.w_gate_up),
                    w_down: f32s(&l.w_down),
                    q_norm: l.q_norm.as_deref().map(f32s),
                    k_norm: l.k_norm.as_deref().map(f32s),
                    moe: l.moe.as_ref().filter(|_| w.cfg.llada2.is_none()).map(|m| CpuMoe {
                        router: f32s(&m.router),
                        w_gate_up: f32s(&m.w_gate_up),
                        w_down: f32s(&m.w_down),
                    }),
                    moe2: l.moe.as_ref().filter(|_| w.cfg.llada2.is_some()).map(|m| CpuLlada2Moe {
                        router: f32s(&m.router),
                        expert_bias: m.expert_bias.clone(),
                        w_gate_up: f32s(&m.w_gate_up),
                        w_down: f32s(&m.w_down),
                        shared_gate_up: f32s(&m.shared_gate_up),
                        shared_down: f32s(&m.shared_down),
                    }),
                })
                .collect(),
            final_norm: f32s(&w.final_norm),
            lm_head: f32s(&w.lm_head),
            rope_mode: rope::RopeMode::Llada,
            act_quant: ActQuant::None,
        })
    }

    /// Sets how cos/sin enter the rotation (see the field's doc; `RopeMode::Dream` rounds them
    /// to bf16 as the GPU's Dream forward does).
    pub fn set_rope_mode(&mut self, mode: rope::RopeMode) {
        self.rope_mode = mode;
    }

    /// Sets the activation quantisation of the W8A8 linears (see [`ActQuant`]): `Fp8Row` on
    /// `fp8_fidelity::fake_quant` weights is the CPU reference of the GPU's W8A8 forward.
    pub fn set_act_quant(&mut self, q: ActQuant) {
        self.act_quant = q;
    }

    pub fn act_quant(&self) -> ActQuant {
        self.act_quant
    }

    pub fn new_cache(&self, capacity: usize) -> CpuKvCache {
        let n = capacity * self.cfg.kv_dim();
        CpuKvCache {
            k: (0..self.cfg.n_layers).map(|_| vec![0.0; n]).collect(),
            v: (0..self.cfg.n_layers).map(|_| vec![0.0; n]).collect(),
            capacity,
        }
    }

    /// Runs the live rows of `b`, updating `cache`; returns logits `[b.logit_rows.len(), vocab]`.
    pub fn forward(&self, b: &RowBatch, cache: &mut CpuKvCache) -> Result<Vec<f32>> {
        self.forward_impl(b, cache, None)
    }

    /// [`forward`](Self::forward), calling `on_layer(layer, x)` after each transformer block
    /// with the residual stream `x` (`[b.rows(), hidden]`: the block's output, before the next
    /// block's norm). For per-layer error measurements (`fp8_fidelity`); `forward` passes no
    /// hook and pays one branch per layer.
    pub fn forward_observed(
        &self,
        b: &RowBatch,
        cache: &mut CpuKvCache,
        on_layer: LayerHook<'_>,
    ) -> Result<Vec<f32>> {
        self.forward_impl(b, cache, Some(on_layer))
    }

    fn forward_impl(
        &self,
        b: &RowBatch,
        cache: &mut CpuKvCache,
        mut on_layer: Option<LayerHook<'_>>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        b.validate(cfg, cache.capacity)?;
        let (t, h, kvd, qd) = (b.rows(), cfg.hidden, cfg.kv_dim(), cfg.q_dim());
        let qkv_dim = cfg.qkv_dim();
        let (mode, aq) = (self.rope_mode, self.act_quant);
        let eps = cfg.norm_eps as f32;
        let cache_rows = b.cache_rows();

        let mut x = vec![0f32; t * h];
        embed::gather_rows(&self.embed, h, &b.tokens, &mut x);
        let mut xn = vec![0f32; t * h];
        let mut qkv = vec![0f32; t * qkv_dim];
        let mut att = vec![0f32; t * qd];
        let mut o = vec![0f32; t * h];
        // LLaDA2: block-causal attention (each row sees the keys of its block and earlier).
        let caps = cfg.llada2.as_ref().map(|l2| llada2::block_caps(&b.positions, l2.block));
        let mut gu = Vec::new();
        let mut act = Vec::new();
        for (li, l) in self.layers.iter().enumerate() {
            let dense_ffn = l.w_down.len() / h;
            norm::rms_norm(&x, &l.attn_norm, eps, &mut xn);
            aq.apply(&mut xn, h, || format!("layer {li} q|k|v input"))?;
            gemm::linear(&xn, &l.wqkv, l.bqkv.as_deref(), h, &mut qkv);
            if let Some(w) = &l.q_norm {
                moe::head_rms_norm_inplace(&mut qkv, qkv_dim, 0, cfg.n_heads, w, eps);
            }
            if let Some(w) = &l.k_norm {
                moe::head_rms_norm_inplace(&mut qkv, qkv_dim, qd, cfg.n_kv_heads, w, eps);
            }
            if let Some(l2) = &cfg.llada2 {
                let (hd, rot, pos, theta) = (cfg.head_dim, l2.rotary_dim, &b.positions, cfg.rope_theta);
                llada2::partial_rope_inplace(&mut qkv, qkv_dim, 0, cfg.n_heads, hd, rot, pos, theta);
                llada2::partial_rope_inplace(&mut qkv, qkv_dim, qd, cfg.n_kv_heads, hd, rot, pos, theta);
            } else {
                rope::rope_inplace(&mut qkv, qkv_dim, 0, cfg.n_heads, &b.positions, cfg.rope_theta, mode);
                rope::rope_inplace(&mut qkv, qkv_dim, qd, cfg.n_kv_heads, &b.positions, cfg.rope_theta, mode);
            }
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            for (r, &cr) in cache_rows.iter().enumerate() {
                let src = &qkv[r * qkv_dim..(r + 1) * qkv_dim];
                let cr = cr as usize;
                kc[cr * kvd..(cr + 1) * kvd].copy_from_slice(&src[qd..qd + kvd]);
                vc[cr * kvd..(cr + 1) * kvd].copy_from_slice(&src[qd + kvd..qd + 2 * kvd]);
            }
            let caps = caps.as_deref();
            attention::attention_capped(&qkv, qkv_dim, kc, vc, &b.seqs, cfg.n_heads, cfg.n_kv_heads, caps, &mut att);
            aq.apply(&mut att, qd, || format!("layer {li} o input"))?;
            gemm::linear(&att, &l.wo, None, qd, &mut o);
            norm::add_inplace(&mut x, &o);
            norm::rms_norm(&x, &l.ffn_norm, eps, &mut xn);
            if let (Some(m), Some(mc), Some(l2)) = (&l.moe2, &cfg.moe, &cfg.llada2) {
                llada2::moe_ffn_quant(&xn, m, l2, h, cfg.ffn, mc.top_k, aq, &mut o)?;
            } else if let (Some(m), Some(mc)) = (&l.moe, &cfg.moe) {
                moe::moe_ffn(&xn, m, h, cfg.ffn, mc.top_k, mc.norm_topk_prob, &mut o)?;
            } else {
                gu.resize(t * 2 * dense_ffn, 0.0);
                act.resize(t * dense_ffn, 0.0);
                aq.apply(&mut xn, h, || format!("layer {li} gate|up input"))?;
                gemm::linear(&xn, &l.w_gate_up, None, h, &mut gu);
                swiglu::swiglu(&gu, dense_ffn, &mut act);
                aq.apply(&mut act, dense_ffn, || format!("layer {li} down input"))?;
                gemm::linear(&act, &l.w_down, None, dense_ffn, &mut o);
            }
            norm::add_inplace(&mut x, &o);
            if let Some(f) = on_layer.as_mut() {
                f(li, &x);
            }
        }
        norm::rms_norm(&x, &self.final_norm, eps, &mut xn);
        let mut sel = vec![0f32; b.logit_rows.len() * h];
        embed::gather_rows(&xn, h, &b.logit_rows, &mut sel);
        let mut logits = vec![0f32; b.logit_rows.len() * cfg.vocab];
        gemm::linear(&sel, &self.lm_head, None, h, &mut logits);
        Ok(logits)
    }

    /// Full-canvas forward of each sequence (all rows live); logits `[Σ len, vocab]`.
    pub fn forward_full(&self, seqs: &[Vec<u32>]) -> Result<Vec<f32>> {
        let b = RowBatch::full(seqs);
        let mut cache = self.new_cache(b.cache_rows_needed());
        self.forward(&b, &mut cache)
    }

    /// [`forward_full`](Self::forward_full) that also returns the residual stream after every
    /// transformer block: `[n_layers][Σ len * hidden]`.
    pub fn forward_full_layers(&self, seqs: &[Vec<u32>]) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let b = RowBatch::full(seqs);
        let mut cache = self.new_cache(b.cache_rows_needed());
        let mut layers = Vec::with_capacity(self.cfg.n_layers);
        let logits = self.forward_observed(&b, &mut cache, &mut |_, x| layers.push(x.to_vec()))?;
        Ok((logits, layers))
    }
}
