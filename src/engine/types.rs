//! The engine's option and result types: where it runs (`Device`, `DType`,
//! `EngineOptions`, KV budgets) and what it answers (`Output`). Re-exported from `engine`.
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// Where the engine runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// A GPU when one is usable, else the CPU backend.
    #[default]
    Auto,
    Cpu,
    /// CUDA device ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            t => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::bad_input(format!("device `{s}`: expected auto, cpu, cuda or cuda:N"))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Compute precision. The CPU backend computes in f32 (over bf16 weights), the GPU in bf16
/// with f32 accumulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DType {
    /// The backend's native precision.
    #[default]
    Auto,
    Bf16,
    F32,
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(DType::Auto),
            "bf16" => Ok(DType::Bf16),
            "f32" => Ok(DType::F32),
            _ => Err(Error::bad_input(format!("dtype `{s}`: expected auto, bf16 or f32"))),
        }
    }
}

/// How an engine is built: where it runs and how much it may hold at once. Every field has a
/// default (`EngineOptions::default()`: auto device, native precision, no limits), so set the
/// ones that matter: `EngineOptions { device: Device::Cpu, max_batch: 8, ..Default::default() }`.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Where the engine runs (default `Auto`: GPU 0 when it opens, else the CPU backend).
    pub device: Device,
    /// Compute precision (default `Auto`: the backend's native one).
    pub dtype: DType,
    /// Most sequences per forward (0 = no limit). More requests wait in the queue and join as
    /// others finish; a request's output does not depend on its batch neighbours.
    pub max_batch: usize,
    /// Most canvas rows (prompt + gen, summed over the active sequences) per forward (0 = no
    /// limit). What a fixed-size backend (the GPU) sizes its buffers for.
    pub max_rows: usize,
    /// Bytes the KV cache may take (every active sequence together). `None`: on the CPU no
    /// limit; on the GPU 90% of the device memory left free after the weights and workspace.
    pub kv_budget: Option<u64>,
    /// Format of the linear layers' weights on the GPU (default bf16; FP8 quantises a bf16
    /// checkpoint at load). The CPU backend runs bf16 checkpoints only.
    pub weights: crate::quant::WeightFormat,
}

/// Parses a byte count: plain bytes (`1048576`) or a number with a binary suffix K, M, G or T
/// (`512M`, `8G`, `1.5G`; an optional trailing `B`/`iB` is accepted: `8GiB`).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || Error::bad_input(format!("byte count `{s}`: expected bytes or a number with K, M, G or T (e.g. 8G)"));
    let u = t.to_ascii_uppercase();
    let u = u.strip_suffix("IB").or_else(|| u.strip_suffix('B')).unwrap_or(&u);
    let (num, mult) = match u.chars().last() {
        Some('K') => (&u[..u.len() - 1], 1u64 << 10),
        Some('M') => (&u[..u.len() - 1], 1 << 20),
        Some('G') => (&u[..u.len() - 1], 1 << 30),
        Some('T') => (&u[..u.len() - 1], 1 << 40),
        _ => (u, 1),
    };
    if mult == 1 {
        return num.trim().parse::<u64>().map_err(|_| bad());
    }
    let x: f64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = x * mult as f64;
    if !(x.is_finite() && x >= 0.0 && bytes < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Share of the free device memory (after weights and workspace) the KV cache takes by default.
pub const DEFAULT_KV_FRACTION: f64 = 0.9;

/// KV-cache rows to preallocate on a device: `kv_budget` bytes, or by default
/// [`DEFAULT_KV_FRACTION`] of the memory left after the workspace (`free` = device bytes free
/// with the weights loaded, `workspace` = the workspace's bytes), divided by `row_bytes`, and
/// at most `max_rows` (the active sequences never hold more canvas rows). An explicit budget
/// beyond what is free, or room for no row at all, is an error that says so (not an
/// out-of-memory crash).
pub fn kv_cache_rows(
    kv_budget: Option<u64>,
    free: u64,
    workspace: u64,
    row_bytes: u64,
    max_rows: usize,
) -> Result<usize> {
    let gb = |b: u64| b as f64 / 1e9;
    let left = free.saturating_sub(workspace);
    let budget = match kv_budget {
        Some(b) if b > left => {
            return Err(Error::OutOfMemory(format!(
                "the KV budget of {b} bytes ({:.2} GB) exceeds the {:.2} GB free after the weights and a {:.2} GB workspace",
                gb(b),
                gb(left),
                gb(workspace)
            )))
        }
        Some(b) => b,
        None => (left as f64 * DEFAULT_KV_FRACTION) as u64,
    };
    let rows = usize::try_from(budget / row_bytes.max(1)).unwrap_or(usize::MAX).min(max_rows);
    if rows == 0 {
        return Err(Error::OutOfMemory(format!(
            "a KV budget of {budget} bytes holds no cache row ({row_bytes} bytes each; {:.2} GB free after the workspace)",
            gb(left)
        )));
    }
    Ok(rows)
}

/// The result of one request.
#[derive(Clone, Debug, Serialize)]
pub struct Output {
    /// The gen region (gen_len tokens; after an EOS stop, EOS-filled).
    pub tokens: Vec<u32>,
    /// The gen region decoded (special tokens skipped) up to the first EOS/EOT, when the
    /// model has a tokenizer.
    pub text: Option<String>,
    pub prompt_len: usize,
    /// Steps (forwards) this sequence took.
    pub steps: u32,
    pub commits_per_step: Vec<u32>,
    /// Canvas rows this sequence recomputed at each of its steps (the rest came from the KV
    /// cache; every row with the `none` scheme).
    pub rows_per_step: Vec<u32>,
    /// Wall time of each of its steps (the batch's step), ms.
    pub step_ms: Vec<f64>,
    pub total_ms: f64,
    /// Generated tokens that are not EOS/EOT (fixed prior slots excluded).
    pub generated_tokens: usize,
    /// `generated_tokens` per second of `total_ms`.
    pub tokens_per_s: f64,
    pub stopped_at_eos: bool,
}
