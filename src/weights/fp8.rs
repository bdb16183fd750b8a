//! FP8 checkpoints in the published layout (DeepSeek-V3, Qwen3-FP8): each linear weight
//! `<name>` stored as `F8_E4M3` `[n, k]` next to `<name>_scale_inv`, F32 (or BF16) block
//! scales `[ceil(n/128), ceil(k/128)]` that multiply the codes (`w ≈ q · s`), and
//! `quantization_config` `{quant_method: "fp8", fmt: "e4m3", weight_block_size: [128, 128]}`
//! in config.json. Other tensors (embedding, norms, LM head, biases) stay bf16; an FP8 LM head
//! in a published checkpoint is dequantised to bf16 at load.
//!
//! Loading (`HostWeights::load`): the linear tensors are dequantised to bf16 — `bf16(q ·
//! bf16(s))`, exactly the operand the FP8 kernel multiplies — so every backend runs them; and
//! their codes and scales are kept, fused as the engine fuses (q|k|v, gate|up), in
//! `HostWeights::fp8`, which `GpuWeights::upload_as` uploads as they are for `--weights fp8`.
//! [`convert_to_fp8`] rewrites a bf16 checkpoint in this layout (`make-checkpoint --weights
//! fp8`).
use std::collections::HashMap;
use std::path::Path;

use half::bf16;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use super::{map_shard, tensor_specs, ShardLayout, TensorRole, INDEX_FILE};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::{Fp8Matrix, ScaleLayout, BLOCK};

/// Suffix of a linear weight's scale tensor.
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// The scale tensor of linear weight `name`.
pub fn scale_name(name: &str) -> String {
    format!("{name}{SCALE_SUFFIX}")
}

/// One layer's linear weights, fused as `HostLayer` fuses them.
#[derive(Clone, Debug)]
pub struct Fp8Linears {
    pub wqkv: Fp8Matrix,
    pub wo: Fp8Matrix,
    pub w_gate_up: Fp8Matrix,
    pub w_down: Fp8Matrix,
}

/// Reads a scale tensor (F32 or BF16) of the block shape of an `[n, k]` weight `name`.
pub(crate) fn read_scales(name: &str, v: &TensorView<'_>, n: usize, k: usize) -> Result<Vec<f32>> {
    let sname = scale_name(name);
    let want = [n.div_ceil(BLOCK), k.div_ceil(BLOCK)];
    if v.shape() != want {
        return Err(Error::weights(&sname, format!("shape {:?}, expected {want:?} (128×128 blocks of {name})", v.shape())));
    }
    let d = v.data();
    match v.dtype() {
        Dtype::F32 => Ok(d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        Dtype::BF16 => Ok(d.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()),
        other => Err(Error::weights(&sname, format!("dtype {other:?} is not supported (expected F32 or BF16)"))),
    }
}

/// Checks the codes and scales of `name` and dequantises them into `dst` (`bf16(q · bf16(s))`).
pub(crate) fn dequant_into(name: &str, codes: &[u8], scales: Vec<f32>, n: usize, k: usize, dst: &mut [bf16]) -> Result<Fp8Matrix> {
    let m = Fp8Matrix::from_parts(name, n, k, codes.to_vec(), scales, ScaleLayout::Block128)?;
    let (ops, _) = m.mma_operands();
    for (d, v) in dst.iter_mut().zip(ops) {
        *d = bf16::from_f32(v);
    }
    Ok(m)
}

/// Stacks the rows of `parts` (same k, block scales, each n a multiple of 128) into one matrix.
pub(crate) fn fuse(name: &str, parts: &[&Fp8Matrix]) -> Result<Fp8Matrix> {
    let k = parts[0].k;
    let mut q = Vec::new();
    let mut s = Vec::new();
    for p in parts {
        if p.k != k || p.layout != ScaleLayout::Block128 || (!p.n.is_multiple_of(BLOCK) && parts.len() > 1) {
            return Err(Error::weights(
                name,
                format!("cannot fuse a [{}, {}] FP8 part: fused parts need block scales and row counts that are multiples of 128", p.n, p.k),
            ));
        }
        q.extend_from_slice(&p.q);
        s.extend_from_slice(&p.scales);
    }
    let n = parts.iter().map(|p| p.n).sum();
    Fp8Matrix::from_parts(name, n, k, q, s, ScaleLayout::Block128)
}

/// A linear weight of a transformer block (the LM head is not one: it stays bf16, as the
/// engine keeps it, see docs/fp8.md).
pub fn is_layer_linear(s: &super::TensorSpec) -> bool {
    s.role == TensorRole::Linear && matches!(s.slot, super::Slot::Layer(..))
}

/// Whether the checkpoint's config.json declares FP8 block quantisation.
pub fn declared_fp8(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    v.get("quantization_config").and_then(|q| q.get("quant_method")).and_then(|m| m.as_str()) == Some("fp8")
}

/// Rewrites the bf16 checkpoint in `dir` (as `make-checkpoint` writes it) in the published FP8
/// layout: every linear weight quantised to E4M3 with 128×128 block scales
/// (`Fp8Matrix::quantize_bf16`), a `_scale_inv` F32 tensor next to it, the index and
/// config.json updated. One shard in memory at a time; each shard is written to a `.partial`
/// file and renamed.
pub fn convert_to_fp8(dir: &Path, cfg: &ModelConfig) -> Result<()> {
    let layout = ShardLayout::read(dir)?;
    let linear: HashMap<String, Vec<usize>> =
        tensor_specs(cfg).into_iter().filter(is_layer_linear).map(|s| (s.name, s.shape)).collect();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for file in layout.files() {
        let path = dir.join(&file);
        let map = map_shard(&path, &layout)?;
        let st = SafeTensors::deserialize(&map).map_err(|e| super::corrupt(&path, e))?;
        // (name, dtype, shape, bytes) of the new shard.
        let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        for name in names {
            let v = st.tensor(&name).map_err(|e| super::corrupt(&path, e))?;
            match linear.get(&name) {
                Some(shape) if v.dtype() == Dtype::BF16 => {
                    let w: Vec<bf16> = v.data().chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect();
                    let m = Fp8Matrix::quantize_bf16(&name, &w, shape[0], shape[1], ScaleLayout::Block128)?;
                    let sdims = vec![shape[0].div_ceil(BLOCK), shape[1].div_ceil(BLOCK)];
                    let sbytes: Vec<u8> = m.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                    out.push((name.clone(), Dtype::F8_E4M3, shape.clone(), m.q));
                    out.push((scale_name(&name), Dtype::F32, sdims, sbytes));
                }
                _ => out.push((name.clone(), v.dtype(), v.shape().to_vec(), v.data().to_vec())),
            }
        }
        drop(st);
        drop(map);
        let views = out
            .iter()
            .map(|(n, dt, sh, b)| Ok((n.clone(), TensorView::new(*dt, sh.clone(), b).map_err(|e| super::corrupt(&path, e))?)))
            .collect::<Result<Vec<_>>>()?;
        let partial = path.with_extension("safetensors.partial");
        let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(views, meta, &partial).map_err(|e| Error::file(&partial, e))?;
        std::fs::rename(&partial, &path).map_err(|e| Error::file(&path, e))?;
        for (n, _, _, b) in &out {
            weight_map.insert(n.clone(), file.clone().into());
            total += b.len() as u64;
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let index_path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::file(&index_path, e))?;
    std::fs::write(&index_path, text + "\n").map_err(|e| Error::file(&index_path, e))?;
    let config_path = dir.join("config.json");
    let mut config = cfg.to_hf_json();
    config["quantization_config"] = serde_json::json!({
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::file(&config_path, e))?;
    std::fs::write(&config_path, text + "\n").map_err(|e| Error::file(&config_path, e))
}
