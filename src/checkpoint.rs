//! `demask make-checkpoint`: random-weight checkpoints in the exact Hugging Face layout.
