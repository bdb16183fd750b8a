//! demask: a decoding engine for masked diffusion language models (LLaDA, Dream) on NVIDIA
//! GPUs. Hand-written CUDA kernels compiled at build time, a thin runtime over cudarc, and an
//! f32 CPU reference backend that is the oracle for every GPU op. See DESIGN.md.
//!
//! # Library use
//!
//! [`Engine::load`](engine::Engine::load) opens a checkpoint directory (Hugging Face layout:
//! `config.json`, safetensors, `tokenizer.json`) on a GPU or the CPU backend. Then either
//! [`Engine::generate`](engine::Engine::generate) decodes a slice of requests, or, in a
//! server loop, [`Engine::submit`](engine::Engine::submit) queues one and
//! [`Engine::step`](engine::Engine::step) runs one forward over the running batch and returns
//! the requests that finished in it (continuous batching: requests join and leave at step
//! boundaries, and a request's tokens do not depend on its neighbours). A [`Request`](engine::Request)
//! is built with defaults and chained setters; [`prelude`] imports everything a caller needs.
//! An engine is `Send`: move it to the worker thread that drives it.
//!
//! ```
//! use demask::prelude::*;
//!
//! # fn main() -> Result<()> {
//! // A random tiny checkpoint to decode with (real ones load the same way).
//! let dir = std::env::temp_dir().join(format!("demask-doc-crate-{}", std::process::id()));
//! demask::checkpoint::write_checkpoint(&ModelConfig::preset("tiny-llada")?, 0, &dir, true, |_| {})?;
//!
//! let mut engine = Engine::load(&dir, EngineOptions { device: Device::Cpu, ..Default::default() })?;
//! let request = Request::text("Hello")
//!     .chat(true)
//!     .gen_len(32)
//!     .block_len(8)
//!     .policy("threshold:0.9".parse()?)
//!     .cache(CacheScheme::Dual);
//! let out = &engine.generate(&[request])?[0];
//! println!("{} ({} steps)", out.text.as_deref().unwrap_or(""), out.steps);
//! assert_eq!(out.tokens.len(), 32);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```
pub mod batch;
pub mod bench;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod engine;
pub mod error;
pub mod fp8_fidelity;
pub mod prelude;
pub mod quant;
pub mod serve;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod model;
#[cfg(feature = "cuda")]
pub mod ops;

pub use config::{Arch, ModelConfig, MoeConfig};
pub use error::{Error, Result};
