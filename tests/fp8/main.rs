//! FP8 weights without a GPU (docs/fp8.md), one test binary: `cli` the `--weights` flags and
//! `demask fidelity`; `fidelity` the FP8 model against bf16 on the f32 CPU backend (channel vs
//! block scales, the LM head); `checkpoint` published-layout FP8 checkpoints; `moe` the MoE
//! models' FP8 version (experts per expert and channel, router bf16); `w8a8` the W8A8 reference
//! (`ActQuant::Fp8Row`: activations quantised per row too) against bf16 and `linear_w8a8`.
#[allow(dead_code)]
#[path = "../common/mod.rs"]
mod common;
mod checkpoint;
mod cli;
mod fidelity;
mod moe;
mod w8a8;
