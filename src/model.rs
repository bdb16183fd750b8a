//! The GPU forward pass.
