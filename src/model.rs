//! The GPU forward pass (in progress).
