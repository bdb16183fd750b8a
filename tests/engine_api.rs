//! The library API a server embeds: an `Engine` moves to a worker thread (it is `Send`),
//! `Engine::load` takes any path-like value, `Request` builds with defaults, and the prelude
//! names everything a caller needs.
mod common;

use std::path::PathBuf;

use common::{cpu_engine, ids_request};
use demask::prelude::*;

fn assert_send<T: Send>() {}

/// Compile-time: the engine and what crosses a thread boundary with it are `Send`.
#[test]
fn engine_and_requests_are_send() {
    assert_send::<Engine>();
    assert_send::<Request>();
    assert_send::<Output>();
    assert_send::<Error>();
    #[cfg(feature = "cuda")]
    assert_send::<demask::decode::gpu::GpuStepper>();
}

/// A CPU engine built on this thread decodes on another, exactly as it would here.
#[test]
fn cpu_engine_moves_to_a_worker_thread_and_generates_there() {
    let reqs = vec![ids_request(&[1, 2, 3], 16, 4, "schedule:2"), ids_request(&[7; 9], 8, 8, "threshold:0.8")];
    let here = cpu_engine("tiny-llada", EngineOptions::default()).generate(&reqs).unwrap();

    let mut engine = cpu_engine("tiny-llada", EngineOptions::default());
    let worker = std::thread::spawn(move || {
        let outs = engine.generate(&reqs).unwrap();
        // The engine stays usable on the worker: a server loop with submit/step.
        let id = engine.submit(Request::ids(vec![4, 5]).gen_len(8).stop_at_eos(false)).unwrap();
        let mut done = Vec::new();
        while engine.pending() + engine.active() > 0 {
            done.extend(engine.step().unwrap());
        }
        (outs, id, done, engine)
    });
    let (there, id, done, engine) = worker.join().expect("the worker thread");
    for (a, b) in here.iter().zip(&there) {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.commits_per_step, b.commits_per_step);
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, id);
    assert_eq!(done[0].1.tokens.len(), 8);
    // ... and back again.
    assert_eq!(engine.active(), 0);
}

/// `Engine::load` takes `&Path`, `PathBuf`, `&str` and `String`.
#[test]
fn load_takes_any_path_like_value() {
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let dir: PathBuf = std::env::temp_dir().join(format!("demask-engine-api-{}", std::process::id()));
    demask::checkpoint::write_checkpoint(&cfg, 2, &dir, true, |_: &str| {}).unwrap();
    let opts = || EngineOptions { device: Device::Cpu, ..Default::default() };
    let s: String = dir.to_str().unwrap().to_string();
    for e in [
        Engine::load(dir.as_path(), opts()),
        Engine::load(&dir, opts()),
        Engine::load(dir.clone(), opts()),
        Engine::load(s.as_str(), opts()),
        Engine::load(s.clone(), opts()),
    ] {
        assert_eq!(e.unwrap().config(), &cfg);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The builder's defaults, and each setter sets exactly its field.
#[test]
fn request_builder_defaults_and_setters() {
    let r = Request::text("Hello");
    assert_eq!(r.prompt, Prompt::Text { text: "Hello".into(), chat: false });
    assert_eq!(r.gen_len, DEFAULT_GEN_LEN);
    assert_eq!(r.block_len, None);
    assert_eq!(r.effective_block_len(), DEFAULT_GEN_LEN);
    assert_eq!(r.policy, DEFAULT_POLICY);
    assert_eq!(r.sampling, Sampling::default());
    assert_eq!((r.seed, r.seq_id), (0, 0));
    assert_eq!(r.prior, None);
    assert!(r.stop_at_eos);
    assert_eq!(r.cache, CacheScheme::None);

    let r = Request::text("Hello")
        .chat(true)
        .gen_len(64)
        .block_len(16)
        .policy(Policy::Schedule { steps: 8 })
        .sampling(Sampling { temperature: 0.5, top_k: 4, top_p: 0.9 })
        .seed(7)
        .seq_id(3)
        .prior(Prior::Fixed(vec![(0, 65)]))
        .stop_at_eos(false)
        .cache(CacheScheme::Dkv { refresh: 4 });
    assert_eq!(r.prompt, Prompt::Text { text: "Hello".into(), chat: true });
    assert_eq!((r.gen_len, r.block_len, r.effective_block_len()), (64, Some(16), 16));
    assert_eq!(r.policy, Policy::Schedule { steps: 8 });
    assert_eq!(r.sampling, Sampling { temperature: 0.5, top_k: 4, top_p: 0.9 });
    assert_eq!((r.seed, r.seq_id), (7, 3));
    assert_eq!(r.prior, Some(Prior::Fixed(vec![(0, 65)])));
    assert!(!r.stop_at_eos);
    assert_eq!(r.cache, CacheScheme::Dkv { refresh: 4 });

    // Ids: `chat` has nothing to wrap.
    let r = Request::ids(vec![1, 2]).chat(true);
    assert_eq!(r.prompt, Prompt::Ids(vec![1, 2]));
    assert_eq!(Request::new(&[1u32, 2][..]).prompt, Prompt::Ids(vec![1, 2]));
    assert_eq!(Request::new("x").prompt, Prompt::Text { text: "x".into(), chat: false });
}

/// A request built with nothing but defaults decodes (one block, threshold policy).
#[test]
fn default_request_decodes() {
    let mut e = cpu_engine("tiny-dream", EngineOptions::default());
    let o = e.generate(&[Request::ids(vec![1, 2, 3]).gen_len(32).stop_at_eos(false)]).unwrap().remove(0);
    assert_eq!(o.tokens.len(), 32);
    assert!(o.tokens.iter().all(|&t| t != e.config().mask_id));
}

/// The GPU engine moves too: decoded on one thread (eager, then captured CUDA graphs), moved
/// with its graphs to a worker that replays them, and dropped on a third thread; the worker's
/// tokens equal this thread's, and the context records no error. Skips without a GPU.
#[cfg(feature = "cuda")]
#[test]
fn gpu_engine_moves_to_a_worker_thread_and_generates_there() {
    let Some(gpu) = demask::gpu::test_gpu() else { return };
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let w = common::sharp_weights(&cfg, 5);
    let opts = EngineOptions { max_batch: 2, max_rows: 256, ..Default::default() };
    let reqs = vec![
        ids_request(&[1, 2, 3], 16, 4, "schedule:2"),
        ids_request(&[7; 9], 8, 8, "threshold:0.8").cache(CacheScheme::Dual),
    ];
    let mut engine = common::gpu_engine(&gpu, &cfg, &w, &opts);
    let first = engine.generate(&reqs).unwrap();
    let second = engine.generate(&reqs).unwrap();
    let worker = std::thread::spawn(move || {
        let outs = engine.generate(&reqs).unwrap();
        let id = engine.submit(Request::ids(vec![4, 5]).gen_len(8).stop_at_eos(false)).unwrap();
        let mut done = Vec::new();
        while engine.pending() + engine.active() > 0 {
            done.extend(engine.step().unwrap());
        }
        (outs, id, done, engine)
    });
    let (third, id, done, engine) = worker.join().expect("the worker thread");
    for (i, ((a, b), c)) in first.iter().zip(&second).zip(&third).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}: second run on this thread");
        assert_eq!(a.tokens, c.tokens, "request {i}: run on the worker thread");
        assert!(c.tokens.iter().all(|&t| t != cfg.mask_id));
    }
    assert_eq!((done.len(), done[0].0), (1, id));
    std::thread::spawn(move || drop(engine)).join().expect("dropping on a third thread");
    gpu.synchronize().unwrap();
    gpu.ctx.check_err().expect("no CUDA error recorded by the moves and the drop");
}
