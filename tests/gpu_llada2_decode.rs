//! LLaDA2 block diffusion through the GPU engine (`Engine::on_gpu`): the exact block cache
//! (`block`), `dual` and `none` decode to the end with the live rows each scheme promises, the
//! `llada2:τ,S` rule runs on the GPU commit kernel, batching and CUDA graphs hold, and the
//! tokens follow the CPU f32 engine's. Token agreement with the CPU is printed and bounded from
//! below rather than required exact: a bf16 router picks another expert than the f32 one at
//! router near-ties, and one different commit changes every later step's context. Skips
//! without a GPU (`DEMASK_REQUIRE_GPU=1` makes that a failure).
#![cfg(feature = "cuda")]

mod common;

use common::{gpu_engine, req, sharp_weights};
use demask::config::ModelConfig;
use demask::engine::{Device, Engine, EngineOptions, Output};
use demask::gpu::test_gpu;

fn agreement(a: &Output, b: &Output) -> usize {
    a.tokens.iter().zip(&b.tokens).filter(|(x, y)| x == y).count()
}

#[test]
fn gpu_block_diffusion_decodes_every_scheme() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("tiny-llada2").unwrap();
    let w = sharp_weights(&cfg, 41);
    let mut g = gpu_engine(&gpu, &cfg, &w, &EngineOptions { max_batch: 4, ..Default::default() });
    let mut c = Engine::from_weights(w.clone(), None, EngineOptions { device: Device::Cpu, ..Default::default() }).unwrap();
    let prompt: Vec<u32> = (0..64).map(|i| 3 + (i * 7) % 400).collect();
    let (gen, block) = (96u32, 32u32);
    for (policy, cache) in [
        ("schedule:8", "block"),
        ("schedule:8", "dual"),
        ("schedule:8", "none"),
        ("llada2:0.5,8", "block"),
        ("threshold:0.6", "block"),
    ] {
        let r = req(&prompt, gen, block, policy, cache);
        let go = g.generate(std::slice::from_ref(&r)).unwrap().remove(0);
        let co = c.generate(std::slice::from_ref(&r)).unwrap().remove(0);
        let what = format!("tiny-llada2 {policy} {cache}");
        assert!(go.tokens.iter().all(|&t| t != cfg.mask_id), "{what}: masks left {:?}", go.tokens);
        assert_eq!(go.tokens.len(), gen as usize, "{what}");
        let agree = agreement(&go, &co);
        println!(
            "{what}: GPU {} steps, CPU {} steps; {agree}/{gen} tokens equal; GPU rows per step {:?}",
            go.steps, co.steps, go.rows_per_step
        );
        if policy == "schedule:8" {
            assert_eq!((go.steps, co.steps), (24, 24), "{what}: 8 steps per block");
            let want: Vec<u32> = match cache {
                // Prefill of the prompt with block 0, then the block's rows; a new block's
                // first step also rewrites the finished block.
                "block" => (0..24).map(|s| if s == 0 { 64 + 32 } else if s % 8 == 0 { 64 } else { 32 }).collect(),
                "dual" => (0..24).map(|s| if s % 8 == 0 { 64 + 96 } else { 32 }).collect(),
                _ => vec![64 + 96; 24],
            };
            assert_eq!(go.rows_per_step, want, "{what}: live rows");
        }
        // A broken cache or mask gives noise (about 1/512 agreement); bf16 vs f32 drifts.
        assert!(agree * 2 >= gen as usize, "{what}: only {agree}/{gen} tokens agree with the CPU");
    }
}

/// The block cache in a batch: three sequences of different lengths (prompts 32, 64, 96; one
/// finishing early) decode with `block` together, with CUDA graphs on (block steps repeat one
/// shape), with the live rows it has alone and tokens that follow it (different batch shapes
/// round differently in bf16, so near-ties may go the other way: at least half agree).
#[test]
fn gpu_block_cache_batched_equals_alone() {
    let Some(gpu) = test_gpu() else { return };
    let cfg = ModelConfig::preset("tiny-llada2").unwrap();
    let w = sharp_weights(&cfg, 42);
    let mut g = gpu_engine(&gpu, &cfg, &w, &EngineOptions { max_batch: 3, ..Default::default() });
    let reqs: Vec<_> = [(32usize, 64u32), (64, 96), (96, 32)]
        .into_iter()
        .map(|(p, gen)| req(&(0..p as u32).map(|i| 5 + (i * 11) % 400).collect::<Vec<_>>(), gen, 32, "schedule:4", "block"))
        .collect();
    let batched = g.generate(&reqs).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone = g.generate(std::slice::from_ref(r)).unwrap().remove(0);
        let agree = agreement(&alone, &batched[i]);
        println!("request {i}: alone vs batched {agree}/{} tokens equal", alone.tokens.len());
        assert!(batched[i].tokens.iter().all(|&t| t != cfg.mask_id), "request {i}: masks left");
        assert_eq!(alone.rows_per_step, batched[i].rows_per_step, "request {i}: live rows");
        assert!(agree * 2 >= alone.tokens.len(), "request {i}: {agree}/{} tokens agree", alone.tokens.len());
    }
}
