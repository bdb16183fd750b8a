//! Checkpoints end to end on the CPU: random checkpoint writer → loader round trip (sharded and
//! single-file), every kind of bad input as a clear error naming the item, inspect, the tiny
//! tokenizer and chat templates, and the llada-8b shard plan.
mod common;

use std::path::{Path, PathBuf};

use demask::checkpoint::{plan_shards, random_weights, write_checkpoint, write_checkpoint_with, SHARD_BYTES};
use demask::config::{TINY_EOS, TINY_EOT, TINY_MASK};
use demask::tokenizer::Tokenizer;
use demask::weights::{inspect, HostWeights};
use demask::{Error, ModelConfig};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use common::scratch::TempDir;

const SEED: u64 = 1234;

/// Writes a tiny checkpoint of `preset` with shards capped at `shard_bytes`.
fn tiny(preset: &str, shard_bytes: u64) -> (TempDir, ModelConfig) {
    let dir = TempDir::new(preset);
    let cfg = ModelConfig::preset(preset).unwrap();
    let mut calls = 0;
    let sum = write_checkpoint_with(&cfg, SEED, &dir.0, false, shard_bytes, |_| calls += 1).unwrap();
    assert!(sum.tokenizer, "tiny presets get a tokenizer");
    assert_eq!(calls, sum.shards.len() + 1, "progress per shard + tokenizer");
    assert_eq!(sum.params, cfg.param_count());
    (dir, cfg)
}

fn bits_eq(name: &str, got: &[half::bf16], want: &[half::bf16]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let bad: Vec<(usize, f32, f32)> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
        .map(|(i, (g, w))| (i, g.to_f32(), w.to_f32()))
        .take(5)
        .collect();
    assert!(bad.is_empty(), "{name}: first mismatches (index, got, want): {bad:?}");
}

/// Loaded weights equal `random_weights(cfg, SEED)` bit for bit.
fn assert_same(got: &HostWeights, want: &HostWeights) {
    assert_eq!(got.cfg, want.cfg);
    bits_eq("embed", &got.embed, &want.embed);
    bits_eq("final_norm", &got.final_norm, &want.final_norm);
    bits_eq("lm_head", &got.lm_head, &want.lm_head);
    assert_eq!(got.layers.len(), want.layers.len());
    for (i, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
        bits_eq(&format!("layer {i} attn_norm"), &g.attn_norm, &w.attn_norm);
        bits_eq(&format!("layer {i} wqkv"), &g.wqkv, &w.wqkv);
        assert_eq!(g.bqkv.is_some(), w.bqkv.is_some());
        if let (Some(gb), Some(wb)) = (&g.bqkv, &w.bqkv) {
            bits_eq(&format!("layer {i} bqkv"), gb, wb);
        }
        bits_eq(&format!("layer {i} wo"), &g.wo, &w.wo);
        bits_eq(&format!("layer {i} ffn_norm"), &g.ffn_norm, &w.ffn_norm);
        bits_eq(&format!("layer {i} w_gate_up"), &g.w_gate_up, &w.w_gate_up);
        bits_eq(&format!("layer {i} w_down"), &g.w_down, &w.w_down);
    }
}

/// Rewrites one shard file through `edit(name, dtype, shape, data)` → Some(replacement) or
/// None to drop the tensor.
fn rewrite_shard(path: &Path, edit: impl Fn(&str, Dtype, &[usize], &[u8]) -> Option<(Dtype, Vec<usize>, Vec<u8>)>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| edit(&n, v.dtype(), v.shape(), v.data()).map(|(d, s, b)| (n, d, s, b)))
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        kept.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, out).unwrap();
}

/// The only shard of a checkpoint written with the default cap.
fn only_shard(dir: &Path) -> PathBuf {
    dir.join("model-00001-of-00001.safetensors")
}

fn load_err(dir: &Path) -> String {
    match HostWeights::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` should mention `{p}`");
    }
}

#[test]
fn sharded_round_trip_is_bit_exact() {
    for preset in ["tiny-llada", "tiny-dream"] {
        // A 600 kB cap splits the tiny models over several shards.
        let (dir, cfg) = tiny(preset, 600_000);
        let n_shards = std::fs::read_dir(&dir.0)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors"))
            .count();
        assert!(n_shards >= 3, "{preset}: {n_shards} shards");
        let got = HostWeights::load(&dir.0).unwrap();
        let want = random_weights(&cfg, SEED);
        assert_same(&got, &want);
        assert_eq!(got.param_count(), cfg.param_count());
        assert_eq!(got.bytes(), 2 * cfg.param_count());
        let report = inspect(&dir.0).unwrap();
        assert!(report.trim_end().ends_with("OK"), "{report}");
        assert!(report.contains(&format!("{n_shards} file(s)")), "{report}");
        // Another seed gives other weights.
        let other = random_weights(&cfg, SEED + 1);
        assert_ne!(
            other.embed[..64].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.embed[..64].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn single_file_checkpoint_loads() {
    let (dir, cfg) = tiny("tiny-dream", u64::MAX);
    std::fs::rename(only_shard(&dir.0), dir.0.join("model.safetensors")).unwrap();
    std::fs::remove_file(dir.0.join("model.safetensors.index.json")).unwrap();
    let got = HostWeights::load(&dir.0).unwrap();
    assert_same(&got, &random_weights(&cfg, SEED));
    assert!(inspect(&dir.0).unwrap().trim_end().ends_with("OK"));
}

#[test]
fn f32_and_f16_tensors_are_converted() {
    let (dir, cfg) = tiny("tiny-llada", u64::MAX);
    let to = |data: &[u8], dtype: Dtype| -> Vec<u8> {
        data.chunks_exact(2)
            .flat_map(|b| {
                let x = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                match dtype {
                    Dtype::F32 => x.to_le_bytes().to_vec(),
                    _ => half::f16::from_f32(x).to_le_bytes().to_vec(),
                }
            })
            .collect()
    };
    rewrite_shard(&only_shard(&dir.0), |n, d, s, b| match n {
        "model.transformer.wte.weight" => Some((Dtype::F32, s.to_vec(), to(b, Dtype::F32))),
        "model.transformer.blocks.1.attn_norm.weight" => Some((Dtype::F16, s.to_vec(), to(b, Dtype::F16))),
        _ => Some((d, s.to_vec(), b.to_vec())),
    });
    let got = HostWeights::load(&dir.0).unwrap();
    let want = random_weights(&cfg, SEED);
    // bf16 → f32 → bf16 is exact.
    bits_eq("embed (F32)", &got.embed, &want.embed);
    // bf16 → f16 → bf16: norm weights near 1 are exact in f16 (11-bit mantissa, no range issue).
    bits_eq("layer 1 attn_norm (F16)", &got.layers[1].attn_norm, &want.layers[1].attn_norm);
    let report = inspect(&dir.0).unwrap();
    assert!(report.contains("F32 x1") && report.contains("F16 x1"), "{report}");
}

#[test]
fn missing_tensor_is_named() {
    let (dir, _) = tiny("tiny-dream", u64::MAX);
    let gone = ["model.layers.1.self_attn.k_proj.bias", "lm_head.weight"];
    rewrite_shard(&only_shard(&dir.0), |n, d, s, b| (!gone.contains(&n)).then(|| (d, s.to_vec(), b.to_vec())));
    let e = load_err(&dir.0);
    assert_mentions(&e, &["model.layers.1.self_attn.k_proj.bias", "missing", "model-00001-of-00001.safetensors"]);
    // inspect lists both, not just the first.
    let report = inspect(&dir.0).unwrap();
    assert_mentions(&report, &gone);
    assert!(report.trim_end().ends_with("2 problems"), "{report}");
}

#[test]
fn tensor_missing_from_index_is_named() {
    let (dir, _) = tiny("tiny-llada", u64::MAX);
    let index = dir.0.join("model.safetensors.index.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    j["weight_map"].as_object_mut().unwrap().remove("model.transformer.ln_f.weight");
    std::fs::write(&index, j.to_string()).unwrap();
    let e = load_err(&dir.0);
    assert_mentions(&e, &["model.transformer.ln_f.weight", "missing", "model.safetensors.index.json"]);
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let (dir, _) = tiny("tiny-llada", u64::MAX);
    // up_proj [512, 256] stored transposed as [256, 512]; attn_out stored with 8 rows fewer.
    rewrite_shard(&only_shard(&dir.0), |n, d, s, b| match n {
        "model.transformer.blocks.0.up_proj.weight" => Some((d, vec![s[1], s[0]], b.to_vec())),
        "model.transformer.blocks.1.attn_out.weight" => {
            Some((d, vec![s[0] - 8, s[1]], b[..(s[0] - 8) * s[1] * 2].to_vec()))
        }
        _ => Some((d, s.to_vec(), b.to_vec())),
    });
    let e = load_err(&dir.0);
    assert_mentions(&e, &["model.transformer.blocks.0.up_proj.weight", "[256, 512]", "[512, 256]"]);
    let report = inspect(&dir.0).unwrap();
    assert_mentions(&report, &["blocks.0.up_proj.weight", "blocks.1.attn_out.weight", "[248, 256]"]);
    assert!(report.trim_end().ends_with("2 problems"), "{report}");
}

#[test]
fn wrong_dtype_is_named() {
    let (dir, _) = tiny("tiny-dream", u64::MAX);
    rewrite_shard(&only_shard(&dir.0), |n, d, s, b| match n {
        // Right shape, I32 data (4 bytes a value).
        "model.layers.0.mlp.down_proj.weight" => Some((Dtype::I32, s.to_vec(), [b, b].concat())),
        _ => Some((d, s.to_vec(), b.to_vec())),
    });
    let e = load_err(&dir.0);
    assert_mentions(&e, &["model.layers.0.mlp.down_proj.weight", "I32"]);
    let report = inspect(&dir.0).unwrap();
    assert_mentions(&report, &["I32 x1", "down_proj"]);
}

#[test]
fn truncated_shard_is_a_file_error() {
    let (dir, _) = tiny("tiny-llada", 600_000);
    let mut shards: Vec<PathBuf> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    let shard = shards[1].clone();
    let shard_name = shard.file_name().unwrap().to_string_lossy().into_owned();
    assert!(shard_name.starts_with("model-00002-of-"), "{shard_name}");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&shard).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    match HostWeights::load(&dir.0) {
        Err(Error::File { path, msg }) => {
            assert_eq!(path, shard);
            assert!(msg.contains("truncated"), "{msg}");
        }
        Err(e) => panic!("expected a file error, got {e}"),
        Ok(_) => panic!("truncated shard loaded"),
    }
    let report = inspect(&dir.0).unwrap();
    assert_mentions(&report, &[&shard_name, "truncated"]);
    // Truncated inside the header too.
    std::fs::write(&shard, [1u8, 0, 0]).unwrap();
    assert_mentions(&load_err(&dir.0), &[&shard_name]);
}

#[test]
fn bad_json_is_named() {
    let (dir, _) = tiny("tiny-llada", u64::MAX);
    let config = dir.0.join("config.json");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, &good[..good.len() / 2]).unwrap();
    assert_mentions(&load_err(&dir.0), &["config.json", "JSON"]);
    let report = inspect(&dir.0).unwrap();
    assert_mentions(&report, &["config.json", "1 problem"]);
    std::fs::write(&config, &good).unwrap();

    let index = dir.0.join("model.safetensors.index.json");
    std::fs::write(&index, "{\"weight_map\": {\"a\": ").unwrap();
    assert_mentions(&load_err(&dir.0), &["model.safetensors.index.json", "JSON"]);
    std::fs::write(&index, "{\"metadata\": {}}").unwrap();
    assert_mentions(&load_err(&dir.0), &["model.safetensors.index.json", "weight_map"]);
}

#[test]
fn out_of_range_config_fields_are_named() {
    let (dir, cfg) = tiny("tiny-llada", u64::MAX);
    let config = dir.0.join("config.json");
    for (field, value) in [
        ("n_heads", serde_json::json!(3)),
        ("rms_norm_eps", serde_json::json!(0.0)),
        ("rms_norm_eps", serde_json::json!(-1e-5)),
        ("n_layers", serde_json::json!(0)),
    ] {
        let mut j = cfg.to_hf_json();
        j[field] = value.clone();
        std::fs::write(&config, j.to_string()).unwrap();
        let e = load_err(&dir.0);
        assert_mentions(&e, &[field]);
        assert_mentions(&inspect(&dir.0).unwrap(), &[field]);
    }
    let mut j = cfg.to_hf_json();
    j.as_object_mut().unwrap().remove("d_model");
    std::fs::write(&config, j.to_string()).unwrap();
    assert_mentions(&load_err(&dir.0), &["config.json", "d_model"]);
}

#[test]
fn index_pointing_at_missing_shard_is_named() {
    let (dir, _) = tiny("tiny-dream", u64::MAX);
    let index = dir.0.join("model.safetensors.index.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    j["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors".into();
    std::fs::write(&index, j.to_string()).unwrap();
    assert_mentions(&load_err(&dir.0), &["model-00009-of-00009.safetensors", "does not exist"]);
    let report = inspect(&dir.0).unwrap();
    assert_mentions(&report, &["model-00009-of-00009.safetensors"]);
    assert!(!report.trim_end().ends_with("OK"), "{report}");
    // A path instead of a file name is refused.
    j["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors".into();
    std::fs::write(&index, j.to_string()).unwrap();
    assert_mentions(&load_err(&dir.0), &["model.safetensors.index.json", "model.norm.weight"]);
}

#[test]
fn empty_dir_and_existing_checkpoint() {
    let dir = TempDir::new("empty");
    assert_mentions(&load_err(&dir.0), &["config.json"]);
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    std::fs::write(dir.0.join("config.json"), cfg.to_hf_json().to_string()).unwrap();
    assert_mentions(&load_err(&dir.0), &["model.safetensors"]);
    // write_checkpoint refuses an existing config.json unless asked to overwrite.
    let e = write_checkpoint(&cfg, 1, &dir.0, false, |_| {}).unwrap_err().to_string();
    assert_mentions(&e, &["config.json", "overwrite"]);
    std::fs::write(dir.0.join("model-00001-of-00007.safetensors"), b"stale").unwrap();
    let sum = write_checkpoint(&cfg, 1, &dir.0, true, |_| {}).unwrap();
    assert_eq!(sum.shards.len(), 1);
    assert!(!dir.0.join("model-00001-of-00007.safetensors").exists(), "stale shard removed");
    assert_same(&HostWeights::load(&dir.0).unwrap(), &random_weights(&cfg, 1));
    assert!(inspect(&dir.0.join("nope")).is_err());
}

#[test]
fn tokenizer_round_trips_utf8() {
    for preset in ["tiny-llada", "tiny-dream"] {
        let (dir, cfg) = tiny(preset, u64::MAX);
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        assert_eq!(tok.arch(), cfg.arch);
        let text = "Héllo, wörld! 日本語 🚀\n\ttabs  and   spaces\u{0}\u{7f} ∑x²";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>(), "{preset}: ids are the bytes");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        // Special tokens in text map to their ids, and skip_special drops them.
        let eot = if preset == "tiny-llada" { "<|eot_id|>" } else { "<|im_end|>" };
        let ids = tok.encode(&format!("ok{eot}<|mdm_mask|><|endoftext|>"), false).unwrap();
        assert_eq!(ids, vec![b'o' as u32, b'k' as u32, TINY_EOT, TINY_MASK, TINY_EOS]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "ok");
        assert_eq!(tok.decode(&ids, false).unwrap(), format!("ok{eot}<|mdm_mask|><|endoftext|>"));
        assert_eq!(tok.vocab_size(), cfg.vocab);
        // Every id of the vocab decodes to something.
        for id in 256..512u32 {
            assert!(!tok.decode(&[id], false).unwrap().is_empty(), "{preset}: id {id}");
        }
    }
}

const LLADA_CHAT: &str = "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
const DREAM_CHAT: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn chat_templates_render_expected_prompts() {
    for (preset, want) in [("tiny-llada", LLADA_CHAT), ("tiny-dream", DREAM_CHAT)] {
        let (dir, _) = tiny(preset, u64::MAX);
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        assert!(tok.chat_template().is_some(), "{preset}: template from tokenizer_config.json");
        assert_eq!(tok.apply_chat("What is 2+2?").unwrap(), want, "{preset}");
        // The rendered specials are single tokens.
        let ids = tok.encode(want, false).unwrap();
        assert!(ids.iter().any(|&i| i >= 505), "{preset}: {ids:?}");
        // Without tokenizer_config.json: the built-in template, same string.
        std::fs::remove_file(dir.0.join("tokenizer_config.json")).unwrap();
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        assert!(tok.chat_template().is_none());
        assert_eq!(tok.apply_chat("What is 2+2?").unwrap(), want, "{preset} built-in");
    }
}

#[test]
fn bad_tokenizer_files_are_named() {
    let (dir, _) = tiny("tiny-llada", u64::MAX);
    std::fs::write(dir.0.join("tokenizer_config.json"), "{oops").unwrap();
    match Tokenizer::from_dir(&dir.0) {
        Err(e) => assert_mentions(&e.to_string(), &["tokenizer_config.json"]),
        Ok(_) => panic!("bad tokenizer_config.json accepted"),
    }
    std::fs::remove_file(dir.0.join("tokenizer_config.json")).unwrap();
    std::fs::write(dir.0.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    match Tokenizer::from_dir(&dir.0) {
        Err(e) => assert_mentions(&e.to_string(), &["tokenizer.json"]),
        Ok(_) => panic!("bad tokenizer.json accepted"),
    }
}

#[test]
fn llada_8b_plan_matches_the_real_checkpoint() {
    let cfg = ModelConfig::preset("llada-8b").unwrap();
    let plan = plan_shards(&cfg);
    assert_eq!(plan.len(), 6);
    assert_eq!(plan.iter().map(|s| s.bytes).sum::<u64>(), 16_031_162_368);
    assert_eq!(plan[0].file, "model-00001-of-00006.safetensors");
    assert_eq!(plan[0].tensors[0].name, "model.transformer.wte.weight");
    assert_eq!(plan[5].tensors.last().unwrap().name, "model.transformer.ff_out.weight");
    assert!(
        plan.iter().all(|s| s.bytes <= SHARD_BYTES && s.bytes > 2_500_000_000),
        "{:?}",
        plan.iter().map(|s| s.bytes).collect::<Vec<_>>()
    );
    assert_eq!(plan.iter().map(|s| s.tensors.len()).sum::<usize>(), 3 + 9 * 32);
    let dream = plan_shards(&ModelConfig::preset("dream-7b").unwrap());
    assert_eq!(dream.iter().map(|s| s.bytes).sum::<u64>(), 2 * ModelConfig::preset("dream-7b").unwrap().param_count());
    assert_eq!(dream.iter().map(|s| s.tensors.len()).sum::<usize>(), 3 + 12 * 28);
}

/// Writes the full llada-8b checkpoint (16 GB) to `$DEMASK_BIG_DIR`, then inspects and loads
/// it, timing each, and spot-checks values. For a big machine:
/// `DEMASK_BIG_DIR=/disk/llada cargo test --test loader -- --ignored --nocapture big_`.
#[test]
#[ignore]
fn big_llada_8b_write_inspect_load() {
    let Ok(dir) = std::env::var("DEMASK_BIG_DIR") else {
        eprintln!("skipped: set DEMASK_BIG_DIR to a directory with 17 GB free");
        return;
    };
    let dir = PathBuf::from(dir);
    let cfg = ModelConfig::preset("llada-8b").unwrap();
    let t0 = std::time::Instant::now();
    let sum = write_checkpoint(&cfg, 7, &dir, true, |m| eprintln!("{:7.1}s {m}", t0.elapsed().as_secs_f64())).unwrap();
    eprintln!("{sum}\nwrite: {:.1}s", t0.elapsed().as_secs_f64());
    assert_eq!(sum.tensor_bytes, 16_031_162_368);
    let t1 = std::time::Instant::now();
    let report = inspect(&dir).unwrap();
    eprintln!("{report}inspect: {:.3}s", t1.elapsed().as_secs_f64());
    assert!(report.trim_end().ends_with("OK"));
    let t2 = std::time::Instant::now();
    let w = HostWeights::load(&dir).unwrap();
    let secs = t2.elapsed().as_secs_f64();
    eprintln!("load: {secs:.2}s, {:.2} GB/s", w.bytes() as f64 / secs / 1e9);
    assert_eq!(w.bytes(), 16_031_162_368);
    let specs = demask::weights::tensor_specs(&cfg);
    let spec = |n: &str| specs.iter().find(|s| s.name == n).unwrap();
    let emb = demask::checkpoint::random_tensor(7, spec("model.transformer.wte.weight"));
    bits_eq("embed", &w.embed, &emb);
    let k = demask::checkpoint::random_tensor(7, spec("model.transformer.blocks.31.k_proj.weight"));
    bits_eq("layer 31 k rows of wqkv", &w.layers[31].wqkv[cfg.q_dim() * cfg.hidden..][..k.len()], &k);
    let up = demask::checkpoint::random_tensor(7, spec("model.transformer.blocks.17.up_proj.weight"));
    bits_eq("layer 17 up rows of w_gate_up", &w.layers[17].w_gate_up[cfg.ffn * cfg.hidden..], &up);
}
