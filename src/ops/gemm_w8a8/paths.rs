//! The W8A8 paths ([`W8a8Path`]) and the choice among them ([`W8a8Select`],
//! `DEMASK_W8A8=auto|skinny|stream|outer-vec|split-scale|w8a16`); see the module doc of
//! `ops::gemm_w8a8`.
use std::str::FromStr;

use crate::error::{Error, Result};

/// How `W8a8` ran a GEMM (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W8a8Path {
    /// kernels/gemm_w8a8_skinny.cu (t ≤ 64): E4M3 MMAs with scales, bias and SwiGLU in the
    /// epilogue.
    Skinny,
    /// kernels/gemm_w8a8_stream.cu (t ≤ 64): the `skinny` contract, the weight streamed
    /// stream-K by one persistent block per SM.
    Stream,
    /// cuBLASLt FP8 with outer-vector scales (and bias) in its epilogue.
    OuterVec,
    /// cuBLASLt's plain FP8 GEMM into the output, then `w8a8_scale_bf16` /
    /// `w8a8_scale_swiglu_bf16`.
    SplitScale,
}

impl W8a8Path {
    pub fn name(self) -> &'static str {
        match self {
            W8a8Path::Skinny => "skinny",
            W8a8Path::Stream => "stream",
            W8a8Path::OuterVec => "outer-vec",
            W8a8Path::SplitScale => "split-scale",
        }
    }
}

/// Which paths a `W8a8` may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W8a8Select {
    /// `outer-vec` where cuBLASLt offers it, else `split-scale`, else the W8A16 fallback.
    /// (`skinny` is not tried: on the H100 it makes W1 steps slower than `split-scale`,
    /// benches/RESULTS.md v0.12.)
    Auto,
    /// Only `skinny` (else the fallback: above 64 rows, off Hopper).
    Skinny,
    /// Only `stream` (else the fallback: above 64 rows, k not a multiple of 128, off Hopper).
    Stream,
    /// Only `outer-vec` (else the fallback).
    OuterVec,
    /// Only `split-scale` (else the fallback).
    SplitScale,
    /// Neither: every call falls back to the chunked W8A16 kernel.
    W8a16,
}

impl W8a8Select {
    pub const ALL: [W8a8Select; 6] = [
        W8a8Select::Auto,
        W8a8Select::Skinny,
        W8a8Select::Stream,
        W8a8Select::OuterVec,
        W8a8Select::SplitScale,
        W8a8Select::W8a16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            W8a8Select::Auto => "auto",
            W8a8Select::Skinny => "skinny",
            W8a8Select::Stream => "stream",
            W8a8Select::OuterVec => "outer-vec",
            W8a8Select::SplitScale => "split-scale",
            W8a8Select::W8a16 => "w8a16",
        }
    }

    /// Whether it allows the `skinny` kernel (only when selected by name).
    pub(super) fn allows_skinny(self) -> bool {
        self == W8a8Select::Skinny
    }

    /// Whether it allows the `stream` kernel (only when selected by name).
    pub fn allows_stream(self) -> bool {
        self == W8a8Select::Stream
    }

    /// The cuBLASLt paths it allows, in the order they are tried.
    pub(super) fn paths(self) -> &'static [W8a8Path] {
        match self {
            W8a8Select::Skinny | W8a8Select::Stream => &[],
            W8a8Select::Auto => &[W8a8Path::OuterVec, W8a8Path::SplitScale],
            W8a8Select::OuterVec => &[W8a8Path::OuterVec],
            W8a8Select::SplitScale => &[W8a8Path::SplitScale],
            W8a8Select::W8a16 => &[],
        }
    }

    /// `DEMASK_W8A8` (unset: `auto`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("DEMASK_W8A8") {
            Ok(v) => v.parse().map_err(|e: Error| Error::bad_input(format!("DEMASK_W8A8: {e}"))),
            Err(_) => Ok(W8a8Select::Auto),
        }
    }
}

impl FromStr for W8a8Select {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        W8a8Select::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| Error::bad_input(format!("unknown W8A8 path `{s}` (expected auto, skinny, stream, outer-vec, split-scale or w8a16)")))
    }
}

impl std::fmt::Display for W8a8Select {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
