//! The `demask` command line, run as a user runs it (the built binary): arguments are
//! honoured or refused with a non-zero exit and a message naming the argument, checks run
//! before anything slow, and reports do not say OK about something a later command rejects.
//! Every test runs without a GPU (GPU-only paths are asked for with `--device cpu` or refused).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::scratch::{shards, TempDir as Scratch};

/// Runs `demask args...` (no backtraces, so messages are what a user sees).
fn demask<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_demask"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("running the demask binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failed run (non-zero exit) whose stderr contains every one of `needles`.
#[track_caller]
fn refused(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a non-zero exit; stdout:\n{}\nstderr:\n{err}", stdout(o));
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "a panic, not a message:\n{err}");
    err
}

#[track_caller]
fn succeeded(o: &Output) {
    assert!(o.status.success(), "exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status.code(), stdout(o), stderr(o));
}

/// A tiny checkpoint written by `make-checkpoint` into `dir/name`.
fn tiny_checkpoint(s: &Scratch, preset: &str) -> PathBuf {
    let out = s.path(preset);
    succeeded(&demask(&["make-checkpoint", "--preset", preset, "--seed", "3", "--out", out.to_str().unwrap()]));
    out
}

// ---- bench (defects 1 and 5) ----

#[test]
fn bench_refuses_a_preset_the_cpu_cannot_run_instead_of_substituting() {
    let o = demask(&["bench", "--device", "cpu", "--preset", "dream-7b", "--lengths", "512,2048", "--iters", "20"]);
    let err = refused(&o, &["--preset dream-7b", "--device cpu --preset tiny-llada"]);
    assert!(!err.contains("cpu forward"), "it ran something anyway:\n{err}");
    // The decode workloads refuse the same way.
    let o = demask(&["bench", "--device", "cpu", "--workload", "w1", "--preset", "llada-8b"]);
    refused(&o, &["--preset llada-8b", "tiny-llada"]);
}

#[test]
fn bench_refuses_an_unknown_preset() {
    refused(&demask(&["bench", "--preset", "bogus"]), &["--preset bogus", "unknown preset", "tiny-llada"]);
    refused(&demask(&["bench", "--device", "cpu", "--preset", "bogus"]), &["bogus"]);
}

#[test]
fn bench_refuses_lengths_beyond_the_context_and_flags_of_other_workloads() {
    let o = demask(&["bench", "--device", "cpu", "--preset", "tiny-llada", "--lengths", "512,2048"]);
    refused(&o, &["--lengths 2048", "1024"]);
    let o = demask(&["bench", "--device", "cpu", "--preset", "tiny-llada", "--lengths", "0"]);
    refused(&o, &["--lengths"]);
    let o = demask(&["bench", "--device", "cpu", "--preset", "tiny-llada", "--cache", "dual"]);
    refused(&o, &["--cache", "w4"]);
    let o = demask(&["bench", "--device", "cpu", "--preset", "tiny-llada", "--workload", "w1", "--iters", "5"]);
    refused(&o, &["--iters", "w4"]);
    let o = demask(&["bench", "--device", "cpu", "--preset", "tiny-llada", "--variant", "attention=reference"]);
    refused(&o, &["--variant", "CPU"]);
    let o = demask(&["bench", "--workload", "w9"]);
    refused(&o, &["--workload", "w9"]);
    // W5's prompt of 3840 does not fit a tiny model's context: refused, with the fix.
    let o = demask(&["bench", "--device", "cpu", "--workload", "w5"]);
    refused(&o, &["w5", "1024", "--prompt-len"]);
}

#[test]
fn bench_honours_lengths_iters_and_a_batch_list_on_the_cpu() {
    let s = Scratch::new("bench");
    let json = s.path("w4.json");
    let o = demask(&[
        "bench", "--device", "cpu", "--preset", "tiny-llada", "--lengths", "16,40", "--iters", "7", "--warmup", "0",
        "--batch", "1,2", "--json", json.to_str().unwrap(),
    ]);
    succeeded(&o);
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    let got: Vec<(u64, u64, u64, &str)> = rows
        .iter()
        .map(|r| {
            (r["len"].as_u64().unwrap(), r["batch"].as_u64().unwrap(), r["stats"]["samples"].as_u64().unwrap(), r["model"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        got,
        [(16, 1, 7, "tiny-llada"), (40, 1, 7, "tiny-llada"), (16, 2, 7, "tiny-llada"), (40, 2, 7, "tiny-llada")],
        "every length x batch, --iters samples each"
    );
    assert_eq!(doc["notes"].as_array().unwrap().len(), 0, "nothing substituted: {}", doc["notes"]);
    // `--batches` is a hidden alias of the one documented flag, `--batch`.
    let o = demask(&["bench", "--device", "cpu", "--preset", "tiny-llada", "--lengths", "8", "--iters", "1", "--batches", "3"]);
    succeeded(&o);
    assert!(stdout(&o).lines().any(|l| l.starts_with("W4-cpu") && l.split_whitespace().nth(3) == Some("3")), "{}", stdout(&o));
    let help = stdout(&demask(&["bench", "--help"]));
    assert!(help.contains("--batch <BATCH>"), "{help}");
    assert!(!help.contains("--batches"), "one documented flag:\n{help}");
}

#[test]
fn bench_default_on_the_cpu_runs_a_tiny_model_and_says_what_it_substituted() {
    let s = Scratch::new("bench-default");
    let json = s.path("d.json");
    let o = demask(&["bench", "--device", "cpu", "--iters", "1", "--warmup", "0", "--json", json.to_str().unwrap()]);
    succeeded(&o);
    let err = stderr(&o);
    assert!(err.contains("note: benchmarking tiny-llada") && err.contains("llada-8b"), "{err}");
    assert!(err.contains("lengths 512,1024 instead of the default 512,2048"), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["notes"].as_array().unwrap().len(), 2, "{}", doc["notes"]);
    let lens: Vec<u64> = doc["rows"].as_array().unwrap().iter().map(|r| r["len"].as_u64().unwrap()).collect();
    assert_eq!(lens, [512, 1024]);
}

#[test]
fn a_missing_cuda_device_is_named_once() {
    // Ordinal 99 exists on no machine, so this fails with or without a GPU.
    let s = Scratch::new("cuda");
    let ck = tiny_checkpoint(&s, "tiny-llada");
    for o in [
        demask(&["generate", "--model", ck.to_str().unwrap(), "--device", "cuda:99", "--prompt-ids", "1,2", "--gen-len", "8", "--policy", "threshold:0.9"]),
        demask(&["bench", "--device", "cuda:99", "--preset", "tiny-llada"]),
    ] {
        let err = refused(&o, &["no CUDA device", "cuda:99"]);
        assert_eq!(err.matches("no CUDA device").count(), 1, "{err}");
    }
}

// ---- inspect (defect 2) ----

#[test]
fn inspect_exits_zero_only_for_a_sound_checkpoint() {
    let s = Scratch::new("inspect-ok");
    let ck = tiny_checkpoint(&s, "tiny-dream");
    let o = demask(&["inspect", "--model", ck.to_str().unwrap()]);
    succeeded(&o);
    assert!(stdout(&o).trim_end().ends_with("OK"), "{}", stdout(&o));
    assert!(stdout(&o).contains("tokenizer.json loads"), "{}", stdout(&o));
}

#[test]
fn inspect_reports_a_corrupt_shard_with_its_real_size_and_fails() {
    let s = Scratch::new("inspect-shard");
    let ck = tiny_checkpoint(&s, "tiny-llada");
    let files = shards(&ck);
    let garbage = vec![0xabu8; 4321];
    std::fs::write(&files[0], &garbage).unwrap();
    let total: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    let o = demask(&["inspect", "--model", ck.to_str().unwrap()]);
    refused(&o, &["problem"]);
    let out = stdout(&o);
    assert!(out.contains(&format!("{total} bytes on disk")), "real size {total} expected:\n{out}");
    assert!(!out.contains(" 0 bytes on disk"), "{out}");
    let name = files[0].file_name().unwrap().to_str().unwrap();
    assert!(out.lines().any(|l| l.starts_with("problem:") && l.contains(name) && l.contains("not a valid safetensors")), "{out}");
}

#[test]
fn llada_moe_make_checkpoint_inspect_and_generate_on_the_cpu() {
    let s = Scratch::new("llada-moe");
    let ck = tiny_checkpoint(&s, "tiny-llada-moe");
    let o = demask(&["inspect", "--model", ck.to_str().unwrap()]);
    succeeded(&o);
    let out = stdout(&o);
    for part in ["LladaMoe", "experts      8 per layer (width 128), top-2", "active", "OK"] {
        assert!(out.contains(part), "inspect should show `{part}`:\n{out}");
    }
    let o = demask(&[
        "generate", "--model", ck.to_str().unwrap(), "--device", "cpu", "--prompt", "Hi", "--gen-len", "16",
        "--block-len", "8", "--policy", "threshold:0.9", "--cache", "dual", "--json",
    ]);
    succeeded(&o);
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert_eq!(j["tokens"].as_array().map(Vec::len), Some(16), "{j}");
}

#[test]
fn inspect_loads_the_tokenizer_as_generate_does() {
    let s = Scratch::new("inspect-tok");
    let ck = tiny_checkpoint(&s, "tiny-llada");
    std::fs::write(ck.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let o = demask(&["inspect", "--model", ck.to_str().unwrap()]);
    refused(&o, &["problem"]);
    assert!(stdout(&o).lines().any(|l| l.starts_with("problem:") && l.contains("tokenizer.json")), "{}", stdout(&o));
    // generate rejects the same file: inspect must not have said OK.
    let o = demask(&["generate", "--model", ck.to_str().unwrap(), "--prompt", "hi", "--gen-len", "8", "--policy", "threshold:0.9"]);
    refused(&o, &["tokenizer.json"]);
    // A chat template that does not render is a problem too.
    let ck = tiny_checkpoint(&s, "tiny-dream");
    let cfg_path = ck.join("tokenizer_config.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    j["chat_template"] = "{% for m in messages %}{{ m['content'] }".into();
    std::fs::write(&cfg_path, j.to_string()).unwrap();
    let o = demask(&["inspect", "--model", ck.to_str().unwrap()]);
    refused(&o, &["problem"]);
    assert!(stdout(&o).contains("chat template"), "{}", stdout(&o));
}

#[test]
fn inspect_names_a_zero_vocab_size() {
    let s = Scratch::new("inspect-vocab");
    let ck = tiny_checkpoint(&s, "tiny-llada");
    let path = ck.join("config.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    j["vocab_size"] = 0.into();
    std::fs::write(&path, j.to_string()).unwrap();
    let o = demask(&["inspect", "--model", ck.to_str().unwrap()]);
    refused(&o, &["problem"]);
    assert!(stdout(&o).contains("`vocab_size`: must be > 0"), "{}", stdout(&o));
}

// ---- make-checkpoint (defect 3) ----

#[test]
fn make_checkpoint_refuses_an_existing_checkpoint_before_announcing_a_write() {
    let s = Scratch::new("mk");
    let ck = tiny_checkpoint(&s, "tiny-llada");
    let before = std::fs::read(ck.join("config.json")).unwrap();
    let o = demask(&["make-checkpoint", "--preset", "tiny-dream", "--out", ck.to_str().unwrap()]);
    let err = refused(&o, &["--overwrite", "config.json"]);
    assert!(!err.contains("(pass overwrite)"), "{err}");
    assert!(!err.to_lowercase().contains("writing"), "announced a write it refused:\n{err}");
    assert_eq!(std::fs::read(ck.join("config.json")).unwrap(), before, "the checkpoint was touched");
    let o = demask(&["make-checkpoint", "--preset", "tiny-dream", "--out", ck.to_str().unwrap(), "--overwrite"]);
    succeeded(&o);
    assert!(std::fs::read_to_string(ck.join("config.json")).unwrap().contains("\"Dream\""));
    refused(&demask(&["make-checkpoint", "--preset", "bogus", "--out", s.path("x").to_str().unwrap()]), &["--preset bogus"]);
}

// ---- generate (defect 4) ----

/// A tiny-llada checkpoint whose weights are gone: any check that runs before loading reports
/// its own message; anything that reaches the load fails on the missing shards instead.
fn config_only_checkpoint(s: &Scratch) -> PathBuf {
    let ck = tiny_checkpoint(s, "tiny-llada");
    for f in shards(&ck) {
        std::fs::remove_file(f).unwrap();
    }
    ck
}

#[test]
fn generate_checks_every_argument_before_loading() {
    let s = Scratch::new("gen");
    let ck = config_only_checkpoint(&s);
    let m = ck.to_str().unwrap();
    let base = ["generate", "--model", m, "--policy", "threshold:0.9"];
    let cases: &[(&[&str], &[&str])] = &[
        (&["--prompt-ids", "1,2", "--gen-len", "0"], &["--gen-len"]),
        (&["--prompt-ids", "1,2", "--gen-len", "16", "--block-len", "5"], &["--block-len 5", "16"]),
        (&["--prompt-ids", "1,2", "--gen-len", "16", "--block-len", "0"], &["--block-len"]),
        (&["--prompt-ids", "1,2", "--gen-len", "16", "--temperature", "-1"], &["--temperature"]),
        (&["--prompt-ids", "1,2", "--gen-len", "16", "--top-p", "0"], &["--top-p"]),
        (&["--prompt-ids", "1,2", "--gen-len", "16", "--top-p", "1.5"], &["--top-p"]),
        (&["--prompt-ids", "1,600", "--gen-len", "16"], &["--prompt-ids", "600", "512"]),
        (&["--prompt-ids", "1,2", "--gen-len", "1024"], &["--gen-len 1024", "1026", "1024", "max_sequence_length"]),
        (&["--prompt", "hello", "--gen-len", "1020"], &["--prompt", "context of 1024"]),
        (&["--prompt-ids", "1,2", "--gen-len", "16", "--prior-ids", "3:999"], &["--prior-ids", "999"]),
        (&["--prompt-ids", "1,2", "--gen-len", "16", "--cache", "bogus"], &["--cache"]),
        (&["--prompt-ids", "1,2", "--gen-len", "16", "--kv-budget", "lots"], &["--kv-budget"]),
    ];
    for (extra, needles) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let err = refused(&demask(&args), needles);
        assert!(!err.contains("loading"), "{extra:?}: checked only after starting to load:\n{err}");
    }
}

#[test]
fn generate_refuses_more_steps_than_masked_slots_in_a_block() {
    let s = Scratch::new("gen-steps");
    let ck = config_only_checkpoint(&s);
    let m = ck.to_str().unwrap();
    let run = |policy: &str, extra: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--prompt-ids", "1,2", "--gen-len", "32", "--block-len", "16", "--policy", policy];
        args.extend_from_slice(extra);
        demask(&args)
    };
    let err = refused(&run("schedule:100", &[]), &["--policy schedule:100", "16 masked slots", "schedule:16"]);
    assert!(!err.contains("loading"), "{err}");
    refused(&run("random:17", &[]), &["random:17", "16 masked slots", "random:16"]);
    // A prior that fixes slots leaves fewer masked slots in its block.
    refused(&run("schedule:16", &["--prior-ids", "0:5,1:6"]), &["schedule:16", "14 masked slots", "schedule:14"]);
    // Within the masked slots the check passes and loading starts (and fails: no weights here).
    let err = refused(&run("schedule:16", &[]), &["loading"]);
    assert!(!err.contains("masked slots"), "{err}");
}

#[test]
fn generate_refuses_chat_with_prompt_ids() {
    let s = Scratch::new("gen-chat");
    let ck = tiny_checkpoint(&s, "tiny-llada");
    let o = demask(&["generate", "--model", ck.to_str().unwrap(), "--prompt-ids", "1,2", "--chat", "--gen-len", "8", "--policy", "threshold:0.9"]);
    refused(&o, &["--chat", "--prompt-ids"]);
}

// ---- README and tools (defect 6) ----

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

#[test]
fn readme_fences_balance_and_its_docs_are_in_the_repository() {
    let text = readme();
    let mut open = false;
    for (i, line) in text.lines().enumerate() {
        if let Some(at) = line.find("```") {
            assert!(line.trim_start().starts_with("```"), "line {}: a fence must start its line: {line:?}", i + 1);
            assert_eq!(at, line.len() - line.trim_start().len());
            open = !open;
        }
    }
    assert!(!open, "README.md ends inside a code fence");
    for outside in ["DESIGN.md", "BENCH.md"] {
        assert!(!text.contains(outside), "README cites {outside}, which is not in the repository");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for doc in ["docs/design.md", "docs/bench.md"] {
        assert!(text.contains(doc), "README does not point at {doc}");
        assert!(root.join(doc).is_file(), "{doc} is missing");
    }
    assert!(text.contains("cargo install --path ."), "README does not say how to put demask on the PATH");
}

#[test]
fn readme_commands_only_use_checkpoints_they_create() {
    let text = readme();
    let start = text.find("## Commands").expect("a Commands section");
    let section = &text[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut created: Vec<String> = Vec::new();
    let mut used = 0;
    for line in section.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |flag: &str| words.iter().position(|w| *w == flag).and_then(|i| words.get(i + 1)).map(|s| s.to_string());
        if words.contains(&"make-checkpoint") {
            created.push(after("--out").expect("make-checkpoint with --out"));
        } else if let Some(m) = after("--model") {
            used += 1;
            assert!(created.contains(&m), "README uses --model {m} before any make-checkpoint creates it");
        }
    }
    assert!(used >= 4, "expected the Commands section to use checkpoints ({used} uses)");
}

#[test]
fn install_nvcc_leaves_no_staging_folder() {
    // The fast path (pins already installed) must also clear a staging folder an older version
    // of the script left behind, without reinstalling.
    let s = Scratch::new("nvcc");
    let prefix = s.path("cuda");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/install-nvcc.sh");
    let text = std::fs::read_to_string(&script).unwrap();
    let pins: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("pins=("))
        .skip(1)
        .take_while(|l| !l.starts_with(')'))
        .map(str::trim)
        .collect();
    assert_eq!(pins.len(), 6, "{pins:?}");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir_all(prefix.join("include/nvtx3")).unwrap();
    std::fs::create_dir_all(prefix.join("site/nvidia")).unwrap();
    std::fs::write(prefix.join("include/nvtx3/nvToolsExt.h"), "").unwrap();
    let nvcc = prefix.join("bin/nvcc");
    std::fs::write(&nvcc, "#!/bin/sh\necho fake nvcc\n").unwrap();
    Command::new("chmod").arg("+x").arg(&nvcc).status().unwrap();
    std::fs::write(prefix.join(".pins"), pins.join(" ") + "\n").unwrap();
    let o = Command::new("bash").arg(&script).env("DEMASK_NVCC_PREFIX", &prefix).output().unwrap();
    succeeded(&o);
    assert!(stdout(&o).contains("already installed"), "{}", stdout(&o));
    assert!(!prefix.join("site").exists(), "the pip staging folder is still there");
    assert!(nvcc.exists(), "the fast path removed the install");
}

// ---- profile ----

/// `profile` checks its arguments before it opens a GPU, so these refusals are the same on a
/// machine with one or without.
#[test]
fn profile_refuses_unknown_ablations_and_w8a8_paths_by_name() {
    let err = refused(&demask(&["profile", "--ablate", "qkv,norm"]), &["--ablate", "`norm`", "gate_up"]);
    assert!(!err.contains("GPU"), "checked after opening the GPU:\n{err}");
    let err = refused(&demask(&["profile", "--variants", "w8a8=stream,fastest"]), &["`fastest`", "split-scale"]);
    assert!(!err.contains("GPU"), "checked after opening the GPU:\n{err}");
}
