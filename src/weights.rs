//! Host-side weights in the engine's layout (bf16, [out, in] row-major), with Q|K|V and
//! gate|up fused at load. Loaded from Hugging Face safetensors checkpoints (sharded with
//! `model.safetensors.index.json`, or one `model.safetensors`), memory-mapped, every tensor
//! checked for name, dtype and shape. Also the per-architecture tensor table
//! ([`tensor_specs`]) shared with the checkpoint writer, and [`inspect`].
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;

use half::vec::HalfBitsVecExt;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};

pub mod fp8;
mod inspect;
mod llada2;
mod moe;
pub use inspect::{inspect, inspect_checkpoint, Inspection};

/// One transformer block.
#[derive(Clone)]
pub struct HostLayer {
    /// `[hidden]`
    pub attn_norm: Vec<bf16>,
    /// [(n_heads + 2 n_kv_heads) * head_dim, hidden]: rows q | k | v.
    pub wqkv: Vec<bf16>,
    /// [(n_heads + 2 n_kv_heads) * head_dim] when the model has q/k/v biases (Dream).
    pub bqkv: Option<Vec<bf16>>,
    /// [hidden, n_heads * head_dim]
    pub wo: Vec<bf16>,
    /// `[hidden]`
    pub ffn_norm: Vec<bf16>,
    /// [2 * ffn, hidden]: rows gate | up (empty for MoE layers).
    pub w_gate_up: Vec<bf16>,
    /// [hidden, ffn] (empty for MoE layers)
    pub w_down: Vec<bf16>,
    /// `[head_dim]` per-head RMSNorm weights of q and k (when `cfg.qk_norm`).
    pub q_norm: Option<Vec<bf16>>,
    pub k_norm: Option<Vec<bf16>>,
    /// The mixture-of-experts FFN (when `cfg.moe`); then `w_gate_up` and `w_down` are empty.
    pub moe: Option<HostMoe>,
}

/// One layer's experts, stacked at load (docs/design.md §8).
#[derive(Clone)]
pub struct HostMoe {
    /// Router `[n_experts, hidden]`.
    pub router: Vec<bf16>,
    /// LLaDA2's selection bias `[n_experts]`, kept in f32 as stored (empty for LLaDA-MoE).
    pub expert_bias: Vec<f32>,
    /// LLaDA2's shared expert: `[2 * shared_ffn, hidden]` (gate | up) and
    /// `[hidden, shared_ffn]` (empty when there is none).
    pub shared_gate_up: Vec<bf16>,
    pub shared_down: Vec<bf16>,
    /// `[n_experts, 2 * ffn, hidden]`: per expert, rows gate | up.
    pub w_gate_up: Vec<bf16>,
    /// `[n_experts, hidden, ffn]`.
    pub w_down: Vec<bf16>,
}

#[derive(Clone)]
pub struct HostWeights {
    pub cfg: ModelConfig,
    /// [vocab, hidden]
    pub embed: Vec<bf16>,
    pub layers: Vec<HostLayer>,
    /// `[hidden]`
    pub final_norm: Vec<bf16>,
    /// [vocab, hidden]
    pub lm_head: Vec<bf16>,
    /// A published FP8 checkpoint's linear weights as stored (codes and block scales, fused
    /// like `layers`); the bf16 linear weights above are their dequantisation. `None` for bf16
    /// checkpoints.
    pub fp8: Option<Vec<fp8::Fp8Linears>>,
}

/// What a checkpoint tensor is; fixes its initialisation in random checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorRole {
    /// Token embedding [vocab, hidden].
    Embedding,
    /// RMSNorm weight `[hidden]`.
    Norm,
    /// Linear weight [out, in].
    Linear,
    /// Linear bias `[out]` (Dream q/k/v).
    Bias,
    /// LLaDA2's router selection bias `[n_experts]`, stored and held as f32.
    ExpertBias,
}

/// One tensor of a transformer block, as stored in the checkpoint (before fusion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerPart {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    Wo,
    FfnNorm,
    Gate,
    Up,
    Down,
    /// Per-head q / k RMSNorm weight `[head_dim]` (LLaDA-MoE).
    QNorm,
    KNorm,
    /// MoE router `[n_experts, hidden]`.
    Router,
    /// Expert `e`'s gate / up `[ffn, hidden]` and down `[hidden, ffn]` projections.
    ExpertGate(usize),
    ExpertUp(usize),
    ExpertDown(usize),
    /// LLaDA2's packed Q|K|V `[(n_heads + 2 n_kv_heads) * head_dim, hidden]`.
    Qkv,
    /// LLaDA2's router bias `[n_experts]` (f32).
    ExpertBias,
    /// LLaDA2's shared expert projections.
    SharedGate,
    SharedUp,
    SharedDown,
}

/// Where a checkpoint tensor lands in [`HostWeights`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Embed,
    Layer(usize, LayerPart),
    FinalNorm,
    LmHead,
}

/// One tensor of the Hugging Face checkpoint (unfused): its real name and exact shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
    pub slot: Slot,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether the checkpoint stores (and the host holds) it as f32 (LLaDA2's expert bias).
    pub fn is_f32(&self) -> bool {
        self.role == TensorRole::ExpertBias
    }
    /// Bytes as stored: bf16, or f32 for [`is_f32`](Self::is_f32) tensors.
    pub fn bytes(&self) -> u64 {
        (if self.is_f32() { 4 } else { 2 }) * self.numel() as u64
    }
}

/// Every tensor the engine needs from a checkpoint of `cfg`, in the checkpoint's order
/// (embedding, blocks 0.., final norm, LM head), with its per-architecture name (docs/design.md §3).
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    use LayerPart::*;
    match cfg.arch {
        Arch::LladaMoe => return moe::llada_moe_specs(cfg),
        Arch::Llada2 => return llada2::llada2_specs(cfg),
        Arch::Llada | Arch::Dream => {}
    }
    let (h, f, v, qd, kvd) = (cfg.hidden, cfg.ffn, cfg.vocab, cfg.q_dim(), cfg.kv_dim());
    let spec = |name: String, shape: Vec<usize>, role, slot| TensorSpec { name, shape, role, slot };
    let (embed, final_norm, head, prefix) = match cfg.arch {
        Arch::Llada => (
            "model.transformer.wte.weight",
            "model.transformer.ln_f.weight",
            "model.transformer.ff_out.weight",
            "model.transformer.blocks",
        ),
        Arch::Dream | Arch::LladaMoe | Arch::Llada2 => ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers"),
    };
    // (part, LLaDA name, Dream name, shape, role)
    let mut parts: Vec<(LayerPart, &str, &str, Vec<usize>, TensorRole)> = vec![
        (AttnNorm, "attn_norm.weight", "input_layernorm.weight", vec![h], TensorRole::Norm),
        (Q, "q_proj.weight", "self_attn.q_proj.weight", vec![qd, h], TensorRole::Linear),
        (K, "k_proj.weight", "self_attn.k_proj.weight", vec![kvd, h], TensorRole::Linear),
        (V, "v_proj.weight", "self_attn.v_proj.weight", vec![kvd, h], TensorRole::Linear),
    ];
    if cfg.qkv_bias {
        parts.extend([
            (QBias, "q_proj.bias", "self_attn.q_proj.bias", vec![qd], TensorRole::Bias),
            (KBias, "k_proj.bias", "self_attn.k_proj.bias", vec![kvd], TensorRole::Bias),
            (VBias, "v_proj.bias", "self_attn.v_proj.bias", vec![kvd], TensorRole::Bias),
        ]);
    }
    parts.extend([
        (Wo, "attn_out.weight", "self_attn.o_proj.weight", vec![h, qd], TensorRole::Linear),
        (FfnNorm, "ff_norm.weight", "post_attention_layernorm.weight", vec![h], TensorRole::Norm),
        (Gate, "ff_proj.weight", "mlp.gate_proj.weight", vec![f, h], TensorRole::Linear),
        (Up, "up_proj.weight", "mlp.up_proj.weight", vec![f, h], TensorRole::Linear),
        (Down, "ff_out.weight", "mlp.down_proj.weight", vec![h, f], TensorRole::Linear),
    ]);
    let mut out = vec![spec(embed.into(), vec![v, h], TensorRole::Embedding, Slot::Embed)];
    for i in 0..cfg.n_layers {
        for (part, llada, dream, shape, role) in &parts {
            let leaf = if cfg.arch == Arch::Llada { llada } else { dream };
            out.push(spec(format!("{prefix}.{i}.{leaf}"), shape.clone(), *role, Slot::Layer(i, *part)));
        }
    }
    out.push(spec(final_norm.into(), vec![h], TensorRole::Norm, Slot::FinalNorm));
    out.push(spec(head.into(), vec![v, h], TensorRole::Linear, Slot::LmHead));
    out
}

/// A lazily zeroed bf16 buffer (calloc: untouched pages cost nothing until written).
fn zeros(n: usize) -> Vec<bf16> {
    vec![0u16; n].reinterpret_into()
}

/// Allocates the fused layout of `cfg` and fills every checkpoint tensor's destination with
/// `fill(spec, dst)` in parallel (rayon over tensors), the f32 ones ([`TensorSpec::is_f32`])
/// with `fill_f32`. Q|K|V, their biases and gate|up land in their rows of the fused buffers.
/// The first error in checkpoint order is returned.
pub(crate) fn assemble<F, G>(cfg: &ModelConfig, fill: F, fill_f32: G) -> Result<HostWeights>
where
    F: Fn(&TensorSpec, &mut [bf16]) -> Result<()> + Sync,
    G: Fn(&TensorSpec, &mut [f32]) -> Result<()>,
{
    let specs = tensor_specs(cfg);
    let (h, f, v, qd, kvd, qkv) = (cfg.hidden, cfg.ffn, cfg.vocab, cfg.q_dim(), cfg.kv_dim(), cfg.qkv_dim());
    let mut embed = zeros(v * h);
    let mut final_norm = zeros(h);
    let mut lm_head = zeros(v * h);
    let shared_f = cfg.llada2.as_ref().map_or(0, |l| l.shared_ffn);
    // Dense FFN width of layer i (LLaDA2's first layers are dense; LLaDA-MoE has none).
    let dense_of = |i: usize| match (&cfg.llada2, &cfg.moe) {
        (Some(l), _) if crate::config::llada2_dense_layer(cfg, i) => l.dense_ffn,
        (_, Some(_)) => 0,
        _ => f,
    };
    let mut layers: Vec<HostLayer> = (0..cfg.n_layers)
        .map(|i| (i, dense_of(i)))
        .map(|(i, dense_f)| HostLayer {
            attn_norm: zeros(h),
            wqkv: zeros(qkv * h),
            bqkv: cfg.qkv_bias.then(|| zeros(qkv)),
            wo: zeros(h * qd),
            ffn_norm: zeros(h),
            w_gate_up: zeros(2 * dense_f * h),
            w_down: zeros(h * dense_f),
            q_norm: cfg.qk_norm.then(|| zeros(cfg.head_dim)),
            k_norm: cfg.qk_norm.then(|| zeros(cfg.head_dim)),
            moe: cfg.moe.as_ref().filter(|_| !crate::config::llada2_dense_layer(cfg, i)).map(|m| HostMoe {
                router: zeros(m.n_experts * h),
                expert_bias: if cfg.llada2.is_some() { vec![0.0; m.n_experts] } else { Vec::new() },
                shared_gate_up: zeros(2 * shared_f * h),
                shared_down: zeros(h * shared_f),
                w_gate_up: zeros(m.n_experts * 2 * f * h),
                w_down: zeros(m.n_experts * h * f),
            }),
        })
        .collect();

    let mut dst: HashMap<Slot, &mut [bf16]> = HashMap::new();
    let mut dst_f32: HashMap<Slot, &mut [f32]> = HashMap::new();
    dst.insert(Slot::Embed, &mut embed);
    dst.insert(Slot::FinalNorm, &mut final_norm);
    dst.insert(Slot::LmHead, &mut lm_head);
    let packed_qkv = cfg.arch == Arch::Llada2;
    for (i, l) in layers.iter_mut().enumerate() {
        let dense_f = l.w_down.len() / h;
        let at = |p: LayerPart| Slot::Layer(i, p);
        let (q, kv) = if packed_qkv {
            dst.insert(at(LayerPart::Qkv), &mut l.wqkv);
            (&mut [][..], &mut [][..])
        } else {
            l.wqkv.split_at_mut(qd * h)
        };
        let (k, vv) = kv.split_at_mut(if packed_qkv { 0 } else { kvd * h });
        let (g, u) = l.w_gate_up.split_at_mut(dense_f * h);
        if let Some(n) = l.q_norm.as_mut() {
            dst.insert(at(LayerPart::QNorm), n);
        }
        if let Some(n) = l.k_norm.as_mut() {
            dst.insert(at(LayerPart::KNorm), n);
        }
        if let Some(m) = l.moe.as_mut() {
            dst.insert(at(LayerPart::Router), &mut m.router);
            for (e, gu) in m.w_gate_up.chunks_mut(2 * f * h).enumerate() {
                let (eg, eu) = gu.split_at_mut(f * h);
                dst.insert(at(LayerPart::ExpertGate(e)), eg);
                dst.insert(at(LayerPart::ExpertUp(e)), eu);
            }
            for (e, d) in m.w_down.chunks_mut(h * f).enumerate() {
                dst.insert(at(LayerPart::ExpertDown(e)), d);
            }
            if cfg.llada2.is_some() {
                dst_f32.insert(at(LayerPart::ExpertBias), &mut m.expert_bias);
            }
            if shared_f > 0 {
                let (sg, su) = m.shared_gate_up.split_at_mut(shared_f * h);
                dst.insert(at(LayerPart::SharedGate), sg);
                dst.insert(at(LayerPart::SharedUp), su);
                dst.insert(at(LayerPart::SharedDown), &mut m.shared_down);
            }
        }
        dst.insert(at(LayerPart::AttnNorm), &mut l.attn_norm);
        if !packed_qkv {
            dst.insert(at(LayerPart::Q), q);
            dst.insert(at(LayerPart::K), k);
            dst.insert(at(LayerPart::V), vv);
        }
        if let Some(b) = l.bqkv.as_mut() {
            let (bq, bkv) = b.split_at_mut(qd);
            let (bk, bv) = bkv.split_at_mut(kvd);
            dst.insert(at(LayerPart::QBias), bq);
            dst.insert(at(LayerPart::KBias), bk);
            dst.insert(at(LayerPart::VBias), bv);
        }
        dst.insert(at(LayerPart::Wo), &mut l.wo);
        dst.insert(at(LayerPart::FfnNorm), &mut l.ffn_norm);
        if dense_f > 0 {
            dst.insert(at(LayerPart::Gate), g);
            dst.insert(at(LayerPart::Up), u);
            dst.insert(at(LayerPart::Down), &mut l.w_down);
        }
    }
    let mut jobs = Vec::with_capacity(specs.len());
    for s in specs.iter().filter(|s| s.is_f32()) {
        let d = dst_f32.remove(&s.slot).ok_or_else(|| Error::weights(&s.name, "internal: no f32 destination buffer"))?;
        if d.len() != s.numel() {
            return Err(Error::weights(&s.name, format!("internal: destination holds {} values, not {}", d.len(), s.numel())));
        }
        fill_f32(s, d)?;
    }
    for s in specs.iter().filter(|s| !s.is_f32()) {
        let d = dst.remove(&s.slot).ok_or_else(|| Error::weights(&s.name, "internal: no destination buffer"))?;
        if d.len() != s.numel() {
            return Err(Error::weights(
                &s.name,
                format!("internal: destination holds {} values, not {}", d.len(), s.numel()),
            ));
        }
        jobs.push((s, d));
    }
    let results: Vec<Result<()>> = jobs.into_par_iter().map(|(s, d)| fill(s, d)).collect();
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(HostWeights { cfg: cfg.clone(), embed, layers, final_norm, lm_head, fp8: None })
}

/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of a non-sharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Which shard holds each tensor: from the index's `weight_map`, or one file for all.
enum ShardLayout {
    Single,
    Indexed(HashMap<String, String>),
}

impl ShardLayout {
    /// Reads `model.safetensors.index.json` if present, else expects `model.safetensors`.
    fn read(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if !index.exists() {
            if dir.join(SINGLE_FILE).exists() {
                return Ok(ShardLayout::Single);
            }
            return Err(Error::file(dir, format!("no {INDEX_FILE} or {SINGLE_FILE} in this directory")));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "no `weight_map` object"))?;
        let mut out = HashMap::with_capacity(map.len());
        for (name, file) in map {
            let file = file
                .as_str()
                .filter(|f| !f.is_empty() && !f.contains(['/', '\\']) && *f != "." && *f != "..")
                .ok_or_else(|| {
                Error::file(&index, format!("weight_map[\"{name}\"] = {file} is not a shard file name"))
            })?;
            out.insert(name.clone(), file.to_string());
        }
        Ok(ShardLayout::Indexed(out))
    }

    /// The shard file named for `tensor`, or None when the index does not list it.
    fn shard_of(&self, tensor: &str) -> Option<&str> {
        match self {
            ShardLayout::Single => Some(SINGLE_FILE),
            ShardLayout::Indexed(m) => m.get(tensor).map(String::as_str),
        }
    }

    /// Every shard file the layout names, sorted.
    fn files(&self) -> Vec<String> {
        let set: BTreeSet<&str> = match self {
            ShardLayout::Single => [SINGLE_FILE].into_iter().collect(),
            ShardLayout::Indexed(m) => m.values().map(String::as_str).collect(),
        };
        set.into_iter().map(String::from).collect()
    }

    /// What "missing" means for a tensor the layout does not place.
    fn missing_msg(&self, tensor: &str) -> String {
        match self.shard_of(tensor) {
            Some(f) => format!("missing (expected in {f})"),
            None => format!("missing (not listed in {INDEX_FILE})"),
        }
    }
}

/// Memory-maps one shard file; the error names the file.
fn map_shard(path: &Path, layout: &ShardLayout) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| match (e.kind(), layout) {
        (std::io::ErrorKind::NotFound, ShardLayout::Indexed(_)) => {
            Error::file(path, format!("shard listed in {INDEX_FILE} does not exist"))
        }
        _ => Error::file(path, format!("cannot open: {e}")),
    })?;
    // SAFETY: the map is read-only; a checkpoint must not be modified while it is loaded
    // (the same contract as every mmap-based safetensors loader).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, format!("cannot memory-map: {e}")))
}

/// Error for a shard whose header or length is inconsistent.
fn corrupt(path: &Path, e: safetensors::SafeTensorError) -> Error {
    Error::file(path, format!("not a valid safetensors file (truncated or corrupt): {e}"))
}

/// Checks a stored tensor's dtype and shape against the spec.
fn check_tensor(spec: &TensorSpec, dtype: Dtype, shape: &[usize]) -> Result<()> {
    let fp8_linear = dtype == Dtype::F8_E4M3 && spec.role == TensorRole::Linear;
    if !matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) && !fp8_linear {
        return Err(Error::weights(
            &spec.name,
            format!("dtype {dtype:?} is not supported (expected BF16; F16 and F32 are converted)"),
        ));
    }
    if shape != spec.shape.as_slice() {
        return Err(Error::weights(&spec.name, format!("shape {shape:?}, expected {:?} from config.json", spec.shape)));
    }
    Ok(())
}

/// Copies (BF16) or converts (F16, F32; round to nearest even) little-endian tensor data.
fn convert_into(name: &str, dtype: Dtype, src: &[u8], dst: &mut [bf16]) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let size = match dtype {
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F32 => 4,
        other => return Err(Error::weights(name, format!("dtype {other:?} is not supported"))),
    };
    if src.len() != dst.len() * size {
        return Err(Error::weights(name, format!("{} bytes of data, expected {}", src.len(), dst.len() * size)));
    }
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK * size)).for_each(|(d, s)| match dtype {
        // safetensors data is little-endian, as is every host CUDA runs on.
        Dtype::BF16 => bytemuck::cast_slice_mut::<bf16, u8>(d).copy_from_slice(s),
        Dtype::F16 => {
            for (x, b) in d.iter_mut().zip(s.chunks_exact(2)) {
                *x = bf16::from_f32(f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        _ => {
            for (x, b) in d.iter_mut().zip(s.chunks_exact(4)) {
                *x = bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
    });
    Ok(())
}

/// Converts little-endian F32 / BF16 / F16 data to f32 (exact) for the f32-held tensors.
fn convert_into_f32(name: &str, dtype: Dtype, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let size = match dtype {
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F32 => 4,
        other => return Err(Error::weights(name, format!("dtype {other:?} is not supported"))),
    };
    if src.len() != dst.len() * size {
        return Err(Error::weights(name, format!("{} bytes of data, expected {}", src.len(), dst.len() * size)));
    }
    for (x, b) in dst.iter_mut().zip(src.chunks_exact(size)) {
        *x = match dtype {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        };
    }
    Ok(())
}

impl HostWeights {
    /// Loads a Hugging Face checkpoint directory: `config.json`, then the safetensors
    /// (`model.safetensors.index.json` + shards, or one `model.safetensors`), memory-mapped.
    /// Every tensor is checked (present, shape as the config implies, dtype BF16/F16/F32)
    /// before any data is copied; Q|K|V (+ biases) and gate|up are fused; tensors are copied
    /// in parallel. Tensors the engine does not use are ignored.
    pub fn load(dir: &Path) -> Result<HostWeights> {
        let cfg = ModelConfig::from_dir(dir)?;
        let layout = ShardLayout::read(dir)?;
        let specs = tensor_specs(&cfg);
        let mut files: Vec<&str> = Vec::new();
        for s in &specs {
            let f = layout.shard_of(&s.name).ok_or_else(|| Error::weights(&s.name, layout.missing_msg(&s.name)))?;
            if !files.contains(&f) {
                files.push(f);
            }
        }
        let maps: Vec<Mmap> = files
            .par_iter()
            .map(|f| {
                let m = map_shard(&dir.join(f), &layout)?;
                // Start read-ahead of cold shards; only a hint, so its failure is harmless.
                let _ = m.advise(memmap2::Advice::WillNeed);
                Ok(m)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<_>>()?;
        let mut shards: HashMap<&str, SafeTensors<'_>> = HashMap::new();
        for (f, m) in files.iter().zip(&maps) {
            shards.insert(f, SafeTensors::deserialize(m).map_err(|e| corrupt(&dir.join(f), e))?);
        }
        let view = |s: &TensorSpec| -> Result<safetensors::tensor::TensorView<'_>> {
            let f = layout.shard_of(&s.name).ok_or_else(|| Error::weights(&s.name, layout.missing_msg(&s.name)))?;
            let st = shards.get(f).ok_or_else(|| Error::weights(&s.name, layout.missing_msg(&s.name)))?;
            let v = st.tensor(&s.name).map_err(|_| Error::weights(&s.name, layout.missing_msg(&s.name)))?;
            check_tensor(s, v.dtype(), v.shape())?;
            Ok(v)
        };
        // An FP8 linear weight's block scales, wherever the index puts them.
        let scales = |s: &TensorSpec| -> Result<Vec<f32>> {
            let sn = fp8::scale_name(&s.name);
            let sv = layout
                .shard_of(&sn)
                .and_then(|f| shards.get(f))
                .and_then(|st| st.tensor(&sn).ok())
                .ok_or_else(|| Error::weights(&s.name, format!("is F8_E4M3 but its scales `{sn}` are missing")))?;
            fp8::read_scales(&s.name, &sv, s.shape[0], s.shape[1])
        };
        let mut n_fp8 = 0;
        for s in &specs {
            if view(s)?.dtype() == Dtype::F8_E4M3 {
                scales(s)?;
                n_fp8 += 1;
            }
        }
        if n_fp8 > 0 && (cfg.moe.is_some() || cfg.llada2.is_some()) {
            return Err(Error::weights(
                dir.display().to_string(),
                format!("holds {n_fp8} F8_E4M3 tensors; FP8 checkpoints load for the dense architectures only (LLaDA, Dream), not {:?}", cfg.arch),
            ));
        }
        let stored: std::sync::Mutex<HashMap<Slot, crate::quant::Fp8Matrix>> = Default::default();
        let mut w = assemble(
            &cfg,
            |s, dst| {
                let v = view(s)?;
                if v.dtype() == Dtype::F8_E4M3 {
                    let m = fp8::dequant_into(&s.name, v.data(), scales(s)?, s.shape[0], s.shape[1], dst)?;
                    stored.lock().unwrap_or_else(|e| e.into_inner()).insert(s.slot, m);
                    return Ok(());
                }
                convert_into(&s.name, v.dtype(), v.data(), dst)
            },
            |s, dst| {
                let v = view(s)?;
                convert_into_f32(&s.name, v.dtype(), v.data(), dst)
            },
        )?;
        let n_linear = specs.iter().filter(|s| fp8::is_layer_linear(s)).count();
        let n_fp8_layer = stored.lock().unwrap_or_else(|e| e.into_inner()).keys().filter(|k| matches!(k, Slot::Layer(..))).count();
        if n_fp8 > 0 && n_fp8_layer == n_linear {
            let mut m = stored.into_inner().unwrap_or_else(|e| e.into_inner());
            let mut take = |i: usize, p: LayerPart| {
                m.remove(&Slot::Layer(i, p)).ok_or_else(|| Error::weights(format!("layer {i} {p:?}"), "internal: FP8 part not loaded"))
            };
            let mut lin = Vec::with_capacity(cfg.n_layers);
            for i in 0..cfg.n_layers {
                let (q, k, v) = (take(i, LayerPart::Q)?, take(i, LayerPart::K)?, take(i, LayerPart::V)?);
                let (g, u) = (take(i, LayerPart::Gate)?, take(i, LayerPart::Up)?);
                lin.push(fp8::Fp8Linears {
                    wqkv: fp8::fuse(&format!("layer {i} q|k|v projection"), &[&q, &k, &v])?,
                    wo: take(i, LayerPart::Wo)?,
                    w_gate_up: fp8::fuse(&format!("layer {i} gate|up projection"), &[&g, &u])?,
                    w_down: take(i, LayerPart::Down)?,
                });
            }
            w.fp8 = Some(lin);
        }
        Ok(w)
    }

    /// Bytes of all host tensors (bf16).
    pub fn bytes(&self) -> u64 {
        2 * self.param_count()
    }

    /// Number of parameters held (embedding, layers with biases, q/k norms, routers and
    /// experts, final norm, LM head).
    pub fn param_count(&self) -> u64 {
        let layer = |l: &HostLayer| {
            l.attn_norm.len()
                + l.wqkv.len()
                + l.bqkv.as_ref().map_or(0, Vec::len)
                + l.wo.len()
                + l.ffn_norm.len()
                + l.w_gate_up.len()
                + l.w_down.len()
                + l.q_norm.as_ref().map_or(0, Vec::len)
                + l.k_norm.as_ref().map_or(0, Vec::len)
                + l.moe.as_ref().map_or(0, |m| {
                    m.router.len()
                        + m.expert_bias.len()
                        + m.w_gate_up.len()
                        + m.w_down.len()
                        + m.shared_gate_up.len()
                        + m.shared_down.len()
                })
        };
        let n = self.embed.len()
            + self.final_norm.len()
            + self.lm_head.len()
            + self.layers.iter().map(layer).sum::<usize>();
        n as u64
    }
}
