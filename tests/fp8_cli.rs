//! `--weights` on the command line without a GPU: FP8 is refused with a message naming the
//! flag (never a panic), an unknown format is refused by name.
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
