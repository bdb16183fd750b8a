//! What a program embedding demask usually needs, in one import:
//!
//! ```
//! use demask::prelude::*;
//! ```
//!
//! The engine and its options ([`Engine`], [`EngineOptions`], [`Device`], [`DType`]), requests
//! and results ([`Request`], [`Prompt`], [`Output`], [`RequestId`], [`StepEvent`]), how a
//! request decodes ([`Policy`], [`Sampling`], [`CacheScheme`], [`Prior`]), the model's
//! configuration and tokenizer ([`ModelConfig`], [`Arch`], [`Tokenizer`]), and the error type
//! ([`Error`], [`Result`]).
pub use crate::cache::CacheScheme;
pub use crate::config::{Arch, ModelConfig};
pub use crate::decode::prior::Prior;
pub use crate::decode::{DreamAlg, Policy, Sampling};
pub use crate::engine::{
    DType, Device, Engine, EngineOptions, Output, Prompt, Request, RequestId, StepEvent, DEFAULT_GEN_LEN,
    DEFAULT_POLICY,
};
pub use crate::error::{Error, Result};
pub use crate::tokenizer::Tokenizer;
