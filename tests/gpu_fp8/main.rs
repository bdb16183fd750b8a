//! FP8 weights on the GPU (docs/fp8.md), one test binary (the GPU pack has a size budget):
//! `gemm` the E4M3 encoder, device quantiser and W8A16 kernel against the CPU reference;
//! `w8a8` the activation quantiser, the cuBLASLt FP8 GEMM paths (`outer-vec`, `split-scale`) and
//! the split path's epilogue kernels; `fused` those epilogues fused into their consumers; `w8a8_skinny` and `w8a8_stream` the decode-size W8A8 kernels (`skinny`, `stream`); `model` the whole model with FP8
//! weights; `moe` the FP8 expert kernels and the MoE models with FP8 weights. Tests take one lock, so they run one at a time (timing tables, device-memory
//! accounting). Each skips without a GPU and fails with `DEMASK_REQUIRE_GPU=1`.
#![cfg(feature = "cuda")]

#[allow(dead_code)]
#[path = "../common/mod.rs"]
mod common;
mod fused;
mod gemm;
mod model;
mod moe;
#[path = "../common/moe_rows.rs"]
mod moe_rows;
mod w8a8;
mod w8a8_skinny;
mod w8a8_stream;

static GPU_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The GPU, one test at a time.
pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
