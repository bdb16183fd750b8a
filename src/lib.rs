//! demask: a decoding engine for masked diffusion language models (LLaDA, Dream) on NVIDIA
//! GPUs. Hand-written CUDA kernels compiled at build time, a thin runtime over cudarc, and an
//! f32 CPU reference backend that is the oracle for every GPU op. See DESIGN.md.
pub mod batch;
pub mod bench;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod engine;
pub mod error;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod model;
#[cfg(feature = "cuda")]
pub mod ops;

pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
