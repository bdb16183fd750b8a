//! Varlen attention over the KV cache (`kernels/attention.cu`): live queries of several
//! sequences × each sequence's cache rows `[cache_base, cache_base + kv_len)`, GQA, head_dim
//! 128, bf16 in/out with f32 accumulation; bidirectional or block-causal ([`AttnMask`]). Two
//! variants selectable by name.
use std::str::FromStr;


use half::bf16;

use crate::config::HEAD_DIM;
use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

/// Which kernel computes attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnVariant {
    /// `attention_ref_bf16`: one warp per (row, head), keys one at a time (simple, slow).
    Reference,
    /// `attention_bf16`: FA2-style mma.sync tiles with cp.async double buffering.
    Flash,
}

impl AttnVariant {
    pub const ALL: [AttnVariant; 2] = [AttnVariant::Reference, AttnVariant::Flash];

    pub fn name(self) -> &'static str {
        match self {
            AttnVariant::Reference => "reference",
            AttnVariant::Flash => "flash",
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            AttnVariant::Reference => "attention_ref_bf16",
            AttnVariant::Flash => "attention_bf16",
        }
    }
}

impl FromStr for AttnVariant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        AttnVariant::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                Error::bad_input(format!(
                    "unknown attention variant `{s}` (expected reference or flash)"
                ))
            })
    }
}

impl std::fmt::Display for AttnVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Mirrors `struct AttnParams` in kernels/attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnParams {
    /// const bf16* q: row r, head h at q + r*q_stride + h*128
    q: u64,
    /// const bf16* k_cache: [cache_rows, n_kv_heads*128]
    k_cache: u64,
    /// const bf16* v_cache: [cache_rows, n_kv_heads*128]
    v_cache: u64,
    /// bf16* out: [rows, n_heads*128]
    out: u64,
    /// const uint32_t* seqs: [n_seqs*4] row_start, row_count, cache_base, kv_len
    seqs: u64,
    /// int n_seqs
    n_seqs: i32,
    /// int max_rows
    max_rows: i32,
    /// int q_stride
    q_stride: i32,
    /// int n_heads
    n_heads: i32,
    /// int n_kv_heads
    n_kv_heads: i32,
    /// float scale
    scale: f32,
    /// const uint32_t* positions: [rows] canvas positions, read only when causal_block > 0
    positions: u64,
    /// int causal_block: 0 bidirectional, B > 0 block-causal
    causal_block: i32,
    /// const uint32_t* fresh: [n_seqs*2] keys [lo, hi) the kernels before may write, or null
    fresh: u64,
}

/// Which keys a query may see.
#[derive(Clone, Copy, Default)]
pub enum AttnMask<'a> {
    /// Every key of its sequence (LLaDA, Dream, LLaDA-MoE).
    #[default]
    Bidirectional,
    /// Block-causal (LLaDA2): the live row at canvas position `positions[r]` sees only the
    /// first `min(kv_len, (positions[r] / block + 1) · block)` keys of its sequence — its own
    /// block and the ones before. Keys past a tile's largest bound are never read.
    BlockCausal { positions: &'a DTensor<u32>, block: usize },
}

// SAFETY: plain-old-data with the C layout of `AttnParams`.
unsafe impl cudarc::driver::DeviceRepr for AttnParams {}

/// Flash tile: 64 M-rows (query row × head of a kv group) per block, 128 threads.
const FA_M: usize = 64;
/// Blocks per cluster of `attention_split_bf16` (FA_SPLIT in the .cu): each takes every
/// FA_SPLIT-th key tile of the same M-tile.
const FA_SPLIT: usize = 4;
/// One 64×128 bf16 shared tile.
const FA_TILE_BYTES: usize = 64 * HEAD_DIM * 2;

/// How the flash variant covers the keys (`attention` picks; `attention_forced` names one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashPath {
    /// `Whole` when its grid fills the GPU (≥ one block per SM) or below sm_90, else `SplitKv`.
    Auto,
    /// `attention_bf16`: one block of 4 warps per 64-row tile over all keys, 2 K/V stages
    /// (80 KiB).
    Whole,
    /// `attention_split_bf16`: clusters of 4 blocks (4 warps each) split the key tiles of a
    /// 64-row tile and merge through distributed shared memory, 2 stages (sm_90+).
    SplitKv,
}

/// `out[r, h] = softmax(q[r, h]·Kᵀ / sqrt(128)) · V` for every live row `r` of every sequence
/// (see `batch::SeqSpan`), keys/values being the sequence's cache rows
/// `[cache_base, cache_base + kv_len)` of kv head `h / (n_heads / n_kv_heads)`.
///
/// - `q`: `[rows, q_stride]` bf16 (usually the fused QKV buffer, q_stride = (n_heads +
///   2·n_kv_heads)·128); only the first `n_heads·128` columns of each row are read.
/// - `seqs`: `[n_seqs, 4]` u32 on the device, the `SeqSpan` layout; `max_rows` ≥ every
///   `row_count` (it sizes the grid: sequences with more rows would be cut short). The spans
///   are trusted (the scheduler validated them with `RowBatch::validate`).
/// - `k_cache`, `v_cache`: `[cache_rows, n_kv_heads·128]` bf16 (this layer).
/// - `fresh`: `None`, or `[n_seqs, 2]` u32 on the device: per sequence the keys `[lo, hi)` that
///   the kernels launched just before may still be writing (a forward's live rows: RoPE stores
///   their K/V). The flash kernels copy the key tiles outside that range before they wait for
///   those kernels (programmatic dependent launch), so the copies overlap them; the caller
///   promises that no kernel still running writes those keys, nor `seqs`, `fresh` or the
///   positions. `None`: every key is read after the wait.
/// - `out`: `[≥ rows, n_heads·128]` bf16; rows outside every sequence are not written.
///
/// The flash variant picks its path ([`FlashPath::Auto`]): one block per 64-row tile
/// (`attention_bf16`) when that grid fills the GPU; for short query sets (decode steps) the
/// key tiles of each 64-row tile are split over a cluster of 4 blocks on sm_90+
/// (`attention_split_bf16`). Within a block, warps that a short tile leaves idle split each
/// key tile with the others.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    variant: AttnVariant,
    rows: usize,
    q: &DTensor<bf16>,
    q_stride: usize,
    seqs: &DTensor<u32>,
    n_seqs: usize,
    max_rows: usize,
    k_cache: &DTensor<bf16>,
    v_cache: &DTensor<bf16>,
    n_heads: usize,
    n_kv_heads: usize,
    mask: AttnMask<'_>,
    fresh: Option<&DTensor<u32>>,
    out: &mut DTensor<bf16>,
) -> Result<()> {
    attention_forced(
        gpu,
        variant,
        FlashPath::Auto,
        rows,
        q,
        q_stride,
        seqs,
        n_seqs,
        max_rows,
        k_cache,
        v_cache,
        n_heads,
        n_kv_heads,
        mask,
        fresh,
        out,
    )
}

/// As [`attention`], with the flash variant's path named (tests, profiling). The reference
/// variant ignores `path`; `FlashPath::SplitKv` needs sm_90+.
#[allow(clippy::too_many_arguments)]
pub fn attention_forced(
    gpu: &Gpu,
    variant: AttnVariant,
    path: FlashPath,
    rows: usize,
    q: &DTensor<bf16>,
    q_stride: usize,
    seqs: &DTensor<u32>,
    n_seqs: usize,
    max_rows: usize,
    k_cache: &DTensor<bf16>,
    v_cache: &DTensor<bf16>,
    n_heads: usize,
    n_kv_heads: usize,
    mask: AttnMask<'_>,
    fresh: Option<&DTensor<u32>>,
    out: &mut DTensor<bf16>,
) -> Result<()> {
    const OP: &str = "attention";
    let (positions, causal_block) = match mask {
        AttnMask::Bidirectional => (0, 0),
        AttnMask::BlockCausal { positions, block } => {
            if block == 0 || block > i32::MAX as usize {
                return Err(Error::bad_input(format!("{OP}: block-causal block length {block} must be in 1..2^31")));
            }
            if positions.len() < rows {
                return Err(Error::shape(OP, "positions", &[rows], &positions.dims));
            }
            (positions.ptr(gpu), block as i32)
        }
    };
    if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(Error::bad_input(format!(
            "{OP}: n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}"
        )));
    }
    let q_width = n_heads * HEAD_DIM;
    let kv_width = n_kv_heads * HEAD_DIM;
    if q_stride < q_width || !q_stride.is_multiple_of(8) {
        return Err(Error::bad_input(format!(
            "{OP}: q_stride {q_stride} must be >= n_heads*128 = {q_width} and a multiple of 8 (16-byte rows)"
        )));
    }
    if q.len() < rows * q_stride {
        return Err(Error::shape(OP, "q", &[rows, q_stride], &q.dims));
    }
    out.check_rows(OP, "out", rows, q_width)?;
    if seqs.len() < n_seqs * 4 {
        return Err(Error::shape(OP, "seqs", &[n_seqs, 4], &seqs.dims));
    }
    if let Some(f) = fresh {
        if f.len() < n_seqs * 2 {
            return Err(Error::shape(OP, "fresh", &[n_seqs, 2], &f.dims));
        }
    }
    if !k_cache.len().is_multiple_of(kv_width) || k_cache.is_empty() {
        return Err(Error::shape(
            OP,
            "k_cache",
            &[k_cache.len() / kv_width.max(1), kv_width],
            &k_cache.dims,
        ));
    }
    if v_cache.len() != k_cache.len() {
        return Err(Error::shape(OP, "v_cache", &k_cache.dims, &v_cache.dims));
    }
    if max_rows > rows {
        return Err(Error::bad_input(format!(
            "{OP}: max_rows {max_rows} exceeds the {rows} rows"
        )));
    }
    if rows == 0 || n_seqs == 0 || max_rows == 0 {
        return Ok(());
    }
    if rows * q_stride > i32::MAX as usize || n_seqs > 65535 {
        return Err(Error::bad_input(format!(
            "{OP}: {rows} rows × {q_stride} or {n_seqs} sequences is too large"
        )));
    }

    let params = AttnParams {
        q: q.ptr(gpu),
        k_cache: k_cache.ptr(gpu),
        v_cache: v_cache.ptr(gpu),
        out: out.ptr_mut(gpu),
        seqs: seqs.ptr(gpu),
        n_seqs: n_seqs as i32,
        max_rows: max_rows as i32,
        q_stride: q_stride as i32,
        n_heads: n_heads as i32,
        n_kv_heads: n_kv_heads as i32,
        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
        positions,
        causal_block,
        fresh: fresh.map_or(0, |f| f.ptr(gpu)),
    };
    let group = n_heads / n_kv_heads;
    let m_tiles = (max_rows * group).div_ceil(FA_M);
    let path = match (variant, path) {
        (AttnVariant::Reference, _) => None,
        (AttnVariant::Flash, FlashPath::SplitKv) => {
            if !split_kv_supported(gpu)? {
                return Err(Error::bad_input(format!(
                    "{OP}: split-KV needs thread-block clusters (sm_90+)"
                )));
            }
            Some(FlashPath::SplitKv)
        }
        (AttnVariant::Flash, FlashPath::Auto) => {
            Some(if m_tiles * n_seqs * n_kv_heads >= gpu.sm_count {
                FlashPath::Whole
            } else if split_kv_supported(gpu)? {
                FlashPath::SplitKv
            } else {
                FlashPath::Whole
            })
        }
        (AttnVariant::Flash, other) => Some(other),
    };
    // (symbol, blocks per M-tile, threads per block); shared memory: Q tile + 2 K and V stages
    let (symbol, per_tile, threads) = match path {
        None => (variant.symbol(), 0, 128),
        Some(FlashPath::SplitKv) => ("attention_split_bf16", FA_SPLIT, 128),
        Some(_) => ("attention_bf16", 1, 128),
    };
    let lc = match path {
        None => LaunchEx {
            grid: (max_rows as u32, n_seqs as u32, n_heads.div_ceil(4) as u32),
            block: (128, 1, 1),
            smem: 0,
            cluster: None,
            pdl: true,
        },
        Some(_) => LaunchEx {
            grid: ((m_tiles * per_tile) as u32, n_seqs as u32, n_kv_heads as u32),
            block: (threads, 1, 1),
            smem: (5 * FA_TILE_BYTES) as u32,
            // attention_split_bf16 carries its cluster shape in the binary (__cluster_dims__).
            cluster: None,
            pdl: true,
        },
    };
    // SAFETY: `params` mirrors the kernel's AttnParams; q, out and the caches were checked to
    // hold the rows and widths the kernel indexes, given spans within them (RowBatch::validate);
    // every attention kernel waits for its predecessor (pdl_wait) before reading q or writing,
    // and before that reads only the cache keys outside `fresh` (the caller's contract).
    unsafe { launch_ex(gpu, "attention", symbol, lc, &params) }
}

/// Whether this device can run `attention_split_bf16` (thread-block clusters: sm_90+).
pub fn split_kv_supported(gpu: &Gpu) -> Result<bool> {
    // Queried once in `Gpu::new`: this runs on every attention and skinny-GEMM launch.
    Ok(gpu.cc_major >= 9)
}
