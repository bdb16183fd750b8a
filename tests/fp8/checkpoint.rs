//! Published-layout FP8 checkpoints (`weights::fp8`): `make-checkpoint --weights fp8` writes
//! them, `HostWeights::load` reads them (dequantised bf16 for every backend, codes and block
//! scales kept as stored), `inspect` reports the format and a missing scale tensor by name.
use std::path::{Path, PathBuf};

use demask::checkpoint::write_checkpoint;
use demask::config::ModelConfig;
use demask::quant::{Fp8Matrix, ScaleLayout};
use demask::weights::{fp8, inspect_checkpoint, HostWeights, INDEX_FILE};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("demask-fp8ck-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn make(preset: &str, dir: &Path) -> (ModelConfig, HostWeights) {
    let cfg = ModelConfig::preset(preset).unwrap();
    write_checkpoint(&cfg, 11, dir, true, |_| {}).unwrap();
    let bf = HostWeights::load(dir).unwrap();
    assert!(bf.fp8.is_none());
    fp8::convert_to_fp8(dir, &cfg).unwrap();
    (cfg, bf)
}

#[test]
fn fp8_checkpoints_round_trip() {
    for preset in ["tiny-llada", "tiny-dream"] {
        let dir = scratch(preset);
        let (cfg, bf) = make(preset, &dir);
        assert!(fp8::declared_fp8(&dir));
        let w = HostWeights::load(&dir).unwrap();
        let lin = w.fp8.as_ref().expect("FP8 linears kept as stored");
        assert_eq!(lin.len(), cfg.n_layers);
        // Non-linear tensors are untouched.
        assert!(w.embed == bf.embed && w.lm_head == bf.lm_head && w.final_norm == bf.final_norm);
        assert_eq!(w.layers[0].bqkv, bf.layers[0].bqkv);
        for (i, (l, b)) in lin.iter().zip(&bf.layers).enumerate() {
            let (h, f) = (cfg.hidden, cfg.ffn);
            // The stored codes and scales are the block quantisation of each original part,
            // stacked (q | k | v, gate | up).
            let (q, kd) = (cfg.q_dim(), cfg.kv_dim());
            let parts = [(0, q), (q, kd), (q + kd, kd)];
            let mut want_q = Vec::new();
            for (r0, n) in parts {
                want_q.extend(Fp8Matrix::quantize_bf16("p", &b.wqkv[r0 * h..(r0 + n) * h], n, h, ScaleLayout::Block128).unwrap().q);
            }
            assert_eq!(l.wqkv.q, want_q, "{preset} layer {i} q|k|v codes");
            assert_eq!((l.w_gate_up.n, l.w_gate_up.k, l.w_down.n, l.w_down.k), (2 * f, h, h, f));
            // The bf16 weights are the dequantisation the kernel multiplies.
            let deq: Vec<f32> = l.w_gate_up.mma_operands().0;
            let got: Vec<f32> = w.layers[i].w_gate_up.iter().map(|v| v.to_f32()).collect();
            assert_eq!(got, deq, "{preset} layer {i} gate|up dequantisation");
            // And within E4M3's error of the original bf16 weights.
            let (num, den) = got.iter().zip(&b.w_gate_up).fold((0f64, 0f64), |(n, d), (x, y)| {
                let y = y.to_f32() as f64;
                (n + (*x as f64 - y).powi(2), d + y * y)
            });
            assert!((num / den).sqrt() < 0.04, "{preset} layer {i}: {}", (num / den).sqrt());
        }
        let ins = inspect_checkpoint(&dir).unwrap();
        assert!(ins.ok(), "{}", ins.report);
        assert!(ins.report.contains("format       fp8"), "{}", ins.report);
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn a_missing_scale_tensor_is_named() {
    let dir = scratch("missing");
    make("tiny-llada", &dir);
    // Drop one scale tensor from the index: the loader and inspect must name it.
    let idx_path = dir.join(INDEX_FILE);
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    let gone = "model.transformer.blocks.1.up_proj.weight_scale_inv";
    assert!(idx["weight_map"].as_object_mut().unwrap().remove(gone).is_some());
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let e = HostWeights::load(&dir).err().expect("load must fail").to_string();
    assert!(e.contains(gone) && e.contains("missing"), "{e}");
    let ins = inspect_checkpoint(&dir).unwrap();
    assert!(!ins.ok() && ins.report.contains(gone), "{}", ins.report);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn make_checkpoint_flag_writes_fp8_and_the_cpu_decodes_it() {
    let dir = scratch("cli");
    let d = dir.to_str().unwrap();
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_demask")).args(args).env_remove("RUST_BACKTRACE").output().unwrap();
    let bad = run(&["make-checkpoint", "--preset", "tiny-llada", "--out", d, "--weights", "int8"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--weights int8"));
    assert!(!dir.join("config.json").exists(), "nothing written for a refused --weights");
    let ok = run(&["make-checkpoint", "--preset", "tiny-llada", "--out", d, "--weights", "fp8"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let ins = run(&["inspect", "--model", d]);
    assert!(String::from_utf8_lossy(&ins.stdout).contains("format       fp8"));
    let gen = run(&["generate", "--model", d, "--device", "cpu", "--prompt-ids", "1,2,3", "--gen-len", "16", "--block-len", "8", "--policy", "schedule:4", "--json"]);
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    std::fs::remove_dir_all(&dir).ok();
}
