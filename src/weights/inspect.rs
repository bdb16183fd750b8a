//! `demask inspect`: a report on a checkpoint directory from `config.json`, the safetensors
//! headers and the tokenizer files, without reading tensor data (fast on 16 GB), and the list
//! of problems a load or `generate` would hit.
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::{check_tensor, corrupt, map_shard, tensor_specs, ShardLayout};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What [`inspect_checkpoint`] found.
#[derive(Clone, Debug)]
pub struct Inspection {
    /// The human-readable report; its last line is "OK" or "N problem(s)".
    pub report: String,
    /// Every problem found, one message each (empty: the checkpoint loads).
    pub problems: Vec<String>,
}

impl Inspection {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// [`inspect_checkpoint`]'s report text (the problems are listed in it).
pub fn inspect(dir: &Path) -> Result<String> {
    inspect_checkpoint(dir).map(|i| i.report)
}

/// Inspects a checkpoint directory: architecture, sizes, special ids, parameter count, shard
/// sizes on disk (each file's real size, parsed or not), dtype counts, the tokenizer, and every
/// problem found: an invalid config.json, missing, misshapen or mistyped tensors, unreadable
/// shards (with the parse error), a tokenizer.json or tokenizer_config.json that does not load
/// the way `generate` loads it, a chat template that does not render. Errs only when `dir` is
/// not a directory.
pub fn inspect_checkpoint(dir: &Path) -> Result<Inspection> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "not a directory"));
    }
    let mut out = String::new();
    let mut problems: Vec<String> = Vec::new();
    let _ = writeln!(out, "checkpoint   {}", dir.display());
    let cfg = match ModelConfig::from_dir(dir) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    if let Some(c) = &cfg {
        let _ = writeln!(
            out,
            "architecture {:?} ({})",
            c.arch,
            if c.shifted() { "shifted logits" } else { "unshifted logits" }
        );
        let _ = writeln!(
            out,
            "sizes        layers {}, hidden {}, ffn {}, heads {}, kv heads {}, head dim {}, vocab {}",
            c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab
        );
        let _ = writeln!(out, "rope theta   {}, rms norm eps {:e}, qkv bias {}", c.rope_theta, c.norm_eps, c.qkv_bias);
        let _ = writeln!(
            out,
            "special ids  mask {}, eos {}, eot {}; max seq len {}",
            c.mask_id, c.eos_id, c.eot_id, c.max_seq_len
        );
        if let (Some(m), Some(l)) = (&c.moe, &c.llada2) {
            let _ = writeln!(
                out,
                "experts      {} per layer (width {}) in {} groups (keep {}), top-{} routing (sigmoid + f32 expert bias, \
                 renormalised, x{}), shared expert width {}; layers 0..{} dense (width {})",
                m.n_experts, c.ffn, l.n_group, l.topk_group, m.top_k, l.routed_scaling, l.shared_ffn, l.first_k_dense, l.dense_ffn
            );
            let _ = writeln!(
                out,
                "attention    block-causal (block {}), q/k norm, partial RoPE over {} of {} dims",
                l.block, l.rotary_dim, c.head_dim
            );
        } else if let Some(m) = &c.moe {
            let _ = writeln!(
                out,
                "experts      {} per layer (width {}), top-{} routing (softmax, {}), q/k norm {}",
                m.n_experts,
                c.ffn,
                m.top_k,
                if m.norm_topk_prob { "renormalised" } else { "not renormalised" },
                c.qk_norm
            );
        }
        let _ = writeln!(out, "parameters   {} ({} bytes as bf16)", c.param_count(), 2 * c.param_count());
        if c.moe.is_some() {
            let _ = writeln!(out, "active       {} parameters per token", c.active_param_count());
        }
    }

    let layout = match ShardLayout::read(dir) {
        Ok(l) => Some(l),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    // Shard headers: name -> (dtype, shape); unreadable shards are problems.
    let mut headers: HashMap<String, HashMap<String, (Dtype, Vec<usize>)>> = HashMap::new();
    let (mut disk_bytes, mut n_stored, mut stored_params) = (0u64, 0usize, 0u64);
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    if let Some(layout) = &layout {
        let files = layout.files();
        let mut unreadable = 0usize;
        for f in &files {
            let path = dir.join(f);
            // The file's real size, whether or not its header parses.
            if let Ok(m) = std::fs::metadata(&path) {
                disk_bytes += m.len();
            }
            let header = map_shard(&path, layout).and_then(|m| {
                let (_, meta) = SafeTensors::read_metadata(&m).map_err(|e| corrupt(&path, e))?;
                let t = meta.tensors();
                Ok(t.into_iter().map(|(n, i)| (n, (i.dtype, i.shape.clone()))).collect::<HashMap<_, _>>())
            });
            match header {
                Ok(h) => {
                    for (dt, shape) in h.values() {
                        *dtypes.entry(format!("{dt:?}")).or_default() += 1;
                        stored_params += shape.iter().product::<usize>() as u64;
                    }
                    n_stored += h.len();
                    headers.insert(f.clone(), h);
                }
                Err(e) => {
                    unreadable += 1;
                    problems.push(e.to_string());
                }
            }
        }
        let dt: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
        let _ = writeln!(
            out,
            "shards       {} file(s), {} bytes on disk{}",
            files.len(),
            disk_bytes,
            if unreadable > 0 { format!(" ({unreadable} unreadable)") } else { String::new() }
        );
        let _ = writeln!(out, "tensors      {n_stored} stored ({stored_params} values), dtypes: {}", dt.join(", "));
    }

    if let (Some(c), Some(layout)) = (&cfg, &layout) {
        let specs = tensor_specs(c);
        let (mut unchecked, mut known) = (0usize, 0usize);
        let (mut linear, mut fp8) = (0usize, 0usize);
        for s in &specs {
            let Some(f) = layout.shard_of(&s.name) else {
                problems.push(Error::weights(&s.name, layout.missing_msg(&s.name)).to_string());
                continue;
            };
            let Some(h) = headers.get(f) else {
                unchecked += 1;
                continue;
            };
            match h.get(&s.name) {
                None => problems.push(Error::weights(&s.name, layout.missing_msg(&s.name)).to_string()),
                Some((dt, shape)) => {
                    known += 1;
                    if let Err(e) = check_tensor(s, *dt, shape) {
                        problems.push(e.to_string());
                    }
                    linear += super::fp8::is_layer_linear(s) as usize;
                    if *dt == safetensors::Dtype::F8_E4M3 && s.role == super::TensorRole::Linear {
                        fp8 += super::fp8::is_layer_linear(s) as usize;
                        let sn = super::fp8::scale_name(&s.name);
                        let want = [shape[0].div_ceil(crate::quant::BLOCK), shape[1].div_ceil(crate::quant::BLOCK)];
                        match layout.shard_of(&sn).and_then(|f| headers.get(f)).and_then(|h| h.get(&sn)) {
                            None => problems.push(Error::weights(&s.name, format!("is F8_E4M3 but its scales `{sn}` are missing")).to_string()),
                            Some((_, ss)) if ss.as_slice() != want => problems.push(
                                Error::weights(&sn, format!("shape {ss:?}, expected {want:?} (128×128 blocks)")).to_string(),
                            ),
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "expected     {} tensors; {} found, {} ignored extra",
            specs.len(),
            known,
            n_stored.saturating_sub(known)
        );
        if unchecked > 0 {
            let _ = writeln!(out, "unchecked    {unchecked} tensors placed in unreadable shards");
        }
        let format = match fp8 {
            0 => "bf16 (--weights fp8 quantises the linear layers at load)".to_string(),
            n if n == linear => "fp8: E4M3 linear weights with 128x128 block scales (`_scale_inv`), loaded as stored".to_string(),
            n => format!("mixed: {n} of {linear} linear weights are F8_E4M3 (dequantised to bf16 at load)"),
        };
        let _ = writeln!(out, "format       {format}");
    }

    let _ = writeln!(out, "tokenizer    {}", tokenizer_line(dir, &mut problems));
    for p in &problems {
        let _ = writeln!(out, "problem: {p}");
    }
    match problems.len() {
        0 => out.push_str("OK\n"),
        1 => out.push_str("1 problem\n"),
        n => {
            let _ = writeln!(out, "{n} problems");
        }
    }
    Ok(Inspection { report: out, problems })
}

/// Loads the tokenizer exactly as `generate` does and renders the chat template once; what
/// fails is a problem. Returns the report line.
fn tokenizer_line(dir: &Path, problems: &mut Vec<String>) -> String {
    let has_tok_cfg = dir.join("tokenizer_config.json").is_file();
    match Tokenizer::load_optional(dir) {
        Ok(None) => {
            // Without tokenizer.json generate runs on token ids only; a tokenizer_config.json
            // is not read then.
            "no tokenizer.json (prompts must be token ids)".to_string()
        }
        Ok(Some(tok)) => {
            let chat = if tok.chat_template().is_some() { "in tokenizer_config.json" } else { "built-in" };
            if let Err(e) = tok.apply_chat("Hello") {
                problems.push(format!("chat template ({chat}) does not render: {e}"));
            }
            format!(
                "tokenizer.json loads ({} tokens{}); chat template {chat}",
                tok.vocab_size(),
                if has_tok_cfg { ", with tokenizer_config.json" } else { "" }
            )
        }
        Err(e) => {
            problems.push(e.to_string());
            "tokenizer.json does not load (see problems)".to_string()
        }
    }
}
