//! `--weights` on the command line without a GPU: FP8 is refused with a message naming the
//! flag (never a panic), an unknown format is refused by name; `demask fidelity` on the CPU,
//! the MoE models and `--w8a8` included.
use std::process::{Command, Output};

fn demask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_demask"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap()
}

fn refused(args: &[&str], want: &[&str]) {
    let out = demask(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for w in want {
        assert!(err.contains(w), "{args:?}: stderr lacks `{w}`:\n{err}");
    }
}

#[test]
fn fp8_bench_on_the_cpu_is_refused() {
    refused(&["bench", "--device", "cpu", "--weights", "fp8"], &["--weights fp8", "GPU"]);
    refused(&["bench", "--device", "cpu", "--workload", "w1", "--weights", "fp8-block"], &["--weights fp8-block", "GPU"]);
}

#[test]
fn unknown_weight_format_is_refused_by_name() {
    refused(&["bench", "--device", "cpu", "--weights", "fp4"], &["--weights", "fp4", "bf16, fp8 or fp8-block"]);
}

#[test]
fn fp8_generate_on_the_cpu_is_refused() {
    let dir = std::env::temp_dir().join(format!("demask-fp8-cli-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let made = demask(&["make-checkpoint", "--preset", "tiny-llada", "--seed", "1", "--out", d, "--overwrite"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    refused(
        &["generate", "--model", d, "--device", "cpu", "--weights", "fp8", "--prompt-ids", "1,2,3", "--gen-len", "8", "--block-len", "8", "--policy", "threshold:0.9"],
        &["fp8", "GPU"],
    );
    refused(&["generate", "--model", d, "--device", "cpu", "--weights", "int4", "--prompt-ids", "1,2", "--gen-len", "8", "--policy", "threshold:0.9"], &["--weights", "int4"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fidelity_command_reports_on_the_cpu() {
    let json = std::env::temp_dir().join(format!("demask-fp8-fid-{}.json", std::process::id()));
    let j = json.to_str().unwrap();
    let out = demask(&["fidelity", "--preset", "tiny-llada", "--device", "cpu", "--json", j]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("top-1 agreement") && stdout.contains("commits per step"), "{stdout}");
    assert!(stdout.contains("hidden state after each layer") && stdout.contains("worst row"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    assert_eq!(v["format"], "fp8");
    let rel = v["logits_fp8_vs_bf16"]["rel_l2"].as_f64().unwrap();
    assert!(rel > 0.0 && rel < 0.1, "{rel}");
    assert_eq!(v["commits"]["seq_steps"], 3 * 4 * 4); // 3 prompts, gen 32 / block 8, 4 steps each
    assert_eq!(v["weights"].as_array().unwrap().len(), 4 * 2); // 4 linear weights × 2 layers
    // Per-layer hidden state: one entry per layer, over the 3 × 32 prompt rows, FP8 error > 0.
    let layers = v["layers_fp8_vs_bf16"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (i, l) in layers.iter().enumerate() {
        assert_eq!((l["layer"].as_u64(), l["rows"].as_u64()), (Some(i as u64), Some(96)));
        let (rel, worst) = (l["rel_l2"].as_f64().unwrap(), l["worst_row_rel"].as_f64().unwrap());
        assert!(rel > 0.0 && rel < 0.1 && worst >= rel && worst.is_finite(), "layer {i}: {l}");
    }
    // Refusals: a bf16 "FP8 format", an 8B model on the CPU, neither --model nor --preset.
    refused(&["fidelity", "--preset", "tiny-llada", "--device", "cpu", "--weights", "bf16"], &["--weights bf16", "FP8"]);
    refused(&["fidelity", "--preset", "llada-8b", "--device", "cpu"], &["too large for the CPU"]);
    refused(&["fidelity", "--device", "cpu"], &["--model", "--preset"]);
}

#[test]
fn fidelity_command_measures_w8a8_next_to_w8a16() {
    let json = std::env::temp_dir().join(format!("demask-fp8-fid-w8a8-{}.json", std::process::id()));
    let j = json.to_str().unwrap();
    let out = demask(&["fidelity", "--preset", "tiny-dream", "--device", "cpu", "--w8a8", "--json", j]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in ["logits, FP8 W8A16 vs bf16", "logits, FP8 W8A8 vs bf16", "W8A8 vs bf16", "commits per step (FP8 W8A8"] {
        assert!(stdout.contains(want), "stdout lacks `{want}`:\n{stdout}");
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    // W8A16 under the keys it always had, W8A8 next to it; activations add error.
    let (r16, r8) = (v["logits_fp8_vs_bf16"]["rel_l2"].as_f64().unwrap(), v["logits_w8a8_vs_bf16"]["rel_l2"].as_f64().unwrap());
    assert!(r16 > 0.0 && r8 > r16 && r8 < 0.1, "W8A16 {r16}, W8A8 {r8}");
    assert_eq!(v["layers_w8a8_vs_bf16"].as_array().unwrap().len(), 2);
    assert_eq!(v["commits"]["seq_steps"], 48);
    assert_eq!(v["commits_w8a8"]["seq_steps"], 48);
    // Without the flag there is no W8A8 entry; block scales have no W8A8 path.
    let plain = demask(&["fidelity", "--preset", "tiny-llada", "--device", "cpu", "--seqs", "1", "--gen-len", "8"]);
    let so = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.status.success() && !so.contains("W8A8"), "{so}");
    refused(&["fidelity", "--preset", "tiny-llada", "--device", "cpu", "--weights", "fp8-block", "--w8a8"], &["--w8a8", "per-channel"]);
}

#[test]
fn fidelity_command_runs_the_moe_models_and_refuses_block_scales_for_them() {
    let json = std::env::temp_dir().join(format!("demask-fp8-fid-moe-{}.json", std::process::id()));
    let j = json.to_str().unwrap();
    let out = demask(&["fidelity", "--preset", "tiny-llada-moe", "--device", "cpu", "--weights", "fp8", "--json", j]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("top-1 agreement") && stdout.contains("commits per step"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    let names: Vec<&str> = v["weights"].as_array().unwrap().iter().filter_map(|w| w["name"].as_str()).collect();
    assert!(names.contains(&"experts gate|up") && names.contains(&"experts down"), "{names:?}");
    refused(&["fidelity", "--preset", "tiny-llada2", "--device", "cpu", "--weights", "fp8-block"], &["LLaDA2", "per-channel"]);
}
