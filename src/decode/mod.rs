//! Decoding (DESIGN.md §4): canvas and blocks, commit policies, candidates and confidences,
//! structure priors and stop rules.
pub mod policy;
pub mod sampling;
pub mod step;

pub use policy::{ConfKind, DreamAlg, Policy, StepCtx};
pub use sampling::{RngKey, Sampling};
pub mod canvas;
pub mod prior;
pub mod runner;
pub mod seq;
pub mod scheduler;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod gpu;
