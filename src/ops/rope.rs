//! `rope_kv_store_bf16` (kernels/rope.cu): rotate-half RoPE of q (in place in the fused qkv
//! activations) and k, with the kv_store: rotated k and unchanged v of live row r go to row
//! `cache_rows[r]` of this layer's K and V caches. Numerics per [`RopeMode`] (see cpu::rope).
//! With a [`RopeExtras`] option on (per-head q/k RMSNorm before the rotation, partial RoPE:
//! LLaDA-MoE, LLaDA2) the op runs `rope_qknorm_kv_store_bf16` instead (same grid; reference
//! `cpu::rope::rope_qk_bf16`); with none on it launches exactly what it did before.
//! [`rope_kv_store_scaled`] also finishes a W8A8 `split-scale` QKV product first (its deferred
//! scale epilogue, fused into `rope_scale_kv_store_bf16` on the plain path).
use half::bf16;

pub use crate::cpu::rope::RopeMode;

use crate::config::HEAD_DIM;
use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};
use crate::ops::norm::DeltaScale;

/// The op's options beyond a full rotation, with the norm weights (`[128]` bf16 each) on the
/// device; `RopeExtras::none()` (or `Default`) is the plain op. Fields: see
/// [`crate::cpu::rope::RopeExtras`].
pub type RopeExtras<'a> = crate::cpu::rope::RopeExtras<&'a DTensor<bf16>>;

const OP: &str = "rope_kv_store";
/// Work items per thread (`ROPE_IPT` in the kernel).
const IPT: usize = 4;
/// Block size (`ROPE_MAX_THREADS`), halved when the grid would not cover the SMs.
const THREADS: usize = 128;

/// Mirrors `RopeParams` in kernels/rope.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeParams {
    qkv: u64,        // bf16*
    k_cache: u64,    // bf16*
    v_cache: u64,    // bf16*
    positions: u64,  // const uint32_t*
    cache_rows: u64, // const uint32_t*
    rows: i32,       // int
    n_heads: i32,    // int
    n_kv_heads: i32, // int
    theta: f32,      // float
    mode: i32,       // int (0 LLaDA, 1 Dream)
    cache_cap: i32,  // int (rows of k_cache / v_cache)
    sx: u64,         // const float* (rope_scale_kv_store_bf16 only)
    sw: u64,         // const float*
    bias: u64,       // const bf16* (0: none)
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32/f32 scalars).
unsafe impl cudarc::driver::DeviceRepr for RopeParams {}

/// Mirrors `RopeExtParams` in kernels/rope.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeExtParams {
    qkv: u64,        // bf16*
    k_cache: u64,    // bf16*
    v_cache: u64,    // bf16*
    positions: u64,  // const uint32_t*
    cache_rows: u64, // const uint32_t*
    q_norm: u64,     // const bf16* (0: no q norm)
    k_norm: u64,     // const bf16* (0: no k norm)
    rows: i32,       // int
    n_heads: i32,    // int
    n_kv_heads: i32, // int
    theta: f32,      // float
    mode: i32,       // int (0 LLaDA, 1 Dream)
    cache_cap: i32,  // int (rows of k_cache / v_cache)
    eps: f32,        // float
    rotary_dim: i32, // int (even, 2..=128)
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32/f32 scalars).
unsafe impl cudarc::driver::DeviceRepr for RopeExtParams {}

/// For live rows `r < rows` of `qkv` (`[>= rows, (n_heads + 2*n_kv_heads)*128]`, q | k | v):
/// rotates q in place, writes rotated k to `k_cache[cache_rows[r]]` and v to
/// `v_cache[cache_rows[r]]` (caches `[cache_cap, n_kv_heads*128]`); k and v in `qkv` are left
/// as they were. `positions` and `cache_rows` hold >= rows entries; cache rows must be <
/// cache_cap (validated by the caller on the host; the kernel traps otherwise) and distinct
/// within one call. `extras`: with `q_norm` / `k_norm` each q / k head is first RMS-normalised
/// (`bf16(w · bf16(x / sqrt(mean x² + eps)))`, q normed in place too); `rotary_dim` < 128
/// rotates only the first `rotary_dim` dims of each head (see [`RopeExtras`]).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_store(
    gpu: &Gpu,
    rows: usize,
    qkv: &mut DTensor<bf16>,
    positions: &DTensor<u32>,
    cache_rows: &DTensor<u32>,
    k_cache: &mut DTensor<bf16>,
    v_cache: &mut DTensor<bf16>,
    n_heads: usize,
    n_kv_heads: usize,
    theta: f32,
    mode: RopeMode,
    extras: &RopeExtras<'_>,
) -> Result<()> {
    rope_kv_store_scaled(gpu, rows, qkv, None, positions, cache_rows, k_cache, v_cache, n_heads, n_kv_heads, theta, mode, extras)
}

/// [`rope_kv_store`] on the unscaled product of a W8A8 `split-scale` QKV GEMM whose scale
/// epilogue `scale` was deferred (`W8a8::take_deferred` of `qkv`; `None`: `qkv` is finished,
/// as [`rope_kv_store`]). Without extras the epilogue is fused (`rope_scale_kv_store_bf16`:
/// the same bits as the epilogue's own launch followed by the rotation; q finished in place,
/// k and v finished in the caches, k and v in `qkv` left unscaled); with extras it runs as its
/// own launch first. An error when `scale` is not `qkv`'s (rows, width).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_store_scaled(
    gpu: &Gpu,
    rows: usize,
    qkv: &mut DTensor<bf16>,
    scale: Option<&DeltaScale>,
    positions: &DTensor<u32>,
    cache_rows: &DTensor<u32>,
    k_cache: &mut DTensor<bf16>,
    v_cache: &mut DTensor<bf16>,
    n_heads: usize,
    n_kv_heads: usize,
    theta: f32,
    mode: RopeMode,
    extras: &RopeExtras<'_>,
) -> Result<()> {
    if n_heads == 0 || n_kv_heads == 0 || n_heads > 4096 || n_kv_heads > n_heads {
        return Err(Error::bad_input(format!(
            "{OP}: heads {n_heads} / kv heads {n_kv_heads} are out of range"
        )));
    }
    if !(theta.is_finite() && theta > 1.0) {
        return Err(Error::bad_input(format!(
            "{OP}: theta {theta} must be finite and > 1"
        )));
    }
    extras.check_scalars(OP)?;
    for (name, w) in [("q_norm", extras.q_norm), ("k_norm", extras.k_norm)] {
        if let Some(w) = w {
            if w.dims != [HEAD_DIM] {
                return Err(Error::shape(OP, name, &[HEAD_DIM], &w.dims));
            }
        }
    }
    let qkv_dim = (n_heads + 2 * n_kv_heads) * HEAD_DIM;
    let kv_dim = n_kv_heads * HEAD_DIM;
    qkv.check_rows(OP, "qkv", rows, qkv_dim)?;
    if positions.len() < rows {
        return Err(Error::shape(OP, "positions", &[rows], &positions.dims));
    }
    if cache_rows.len() < rows {
        return Err(Error::shape(OP, "cache_rows", &[rows], &cache_rows.dims));
    }
    let cache_cap = k_cache.rows();
    k_cache.check_rows(OP, "k_cache", cache_cap, kv_dim)?;
    if v_cache.dims != k_cache.dims {
        return Err(Error::shape(OP, "v_cache", &k_cache.dims, &v_cache.dims));
    }
    if let Some(d) = scale {
        if d.y != qkv.ptr(gpu) || d.rows != rows || d.n != qkv_dim {
            return Err(Error::bad_input(format!(
                "{OP}: the deferred scale epilogue ([{}, {}]) is not that of qkv ([{rows}, {qkv_dim}])",
                d.rows, d.n
            )));
        }
        d.check_aligned()?;
        if !extras.is_none() {
            crate::ops::gemm_w8a8::W8a8::apply_deferred(gpu, d)?;
        }
    }
    if rows == 0 {
        return Ok(());
    }
    if rows > i32::MAX as usize || cache_cap > i32::MAX as usize {
        return Err(Error::bad_input(format!(
            "{OP}: {rows} rows / {cache_cap} cache rows is too many"
        )));
    }
    // Work items per row: 8 per rotated head (8 pairs each) + 16 per v head (16-byte copies);
    // a block takes threads * IPT items of one row. Few rows (a decode step): smaller blocks,
    // so that the grid spreads each row over more SMs.
    let items = (n_heads + n_kv_heads) * 8 + n_kv_heads * (HEAD_DIM / 8);
    let threads = if rows * items.div_ceil(THREADS * IPT) >= gpu.sm_count {
        THREADS
    } else {
        THREADS / 2
    };
    let chunks = items.div_ceil(threads * IPT);
    // The kernels wait for their predecessor (pdl_wait) before touching memory, so they may be
    // launched early (PDL).
    let lc = LaunchEx {
        grid: (rows as u32, chunks as u32, 1),
        block: (threads as u32, 1, 1),
        smem: 0,
        cluster: None,
        pdl: true,
    };
    let mode = match mode {
        RopeMode::Llada => 0,
        RopeMode::Dream => 1,
    };
    if extras.is_none() {
        let params = RopeParams {
            qkv: qkv.ptr_mut(gpu),
            k_cache: k_cache.ptr_mut(gpu),
            v_cache: v_cache.ptr_mut(gpu),
            positions: positions.ptr(gpu),
            cache_rows: cache_rows.ptr(gpu),
            rows: rows as i32,
            n_heads: n_heads as i32,
            n_kv_heads: n_kv_heads as i32,
            theta,
            mode,
            cache_cap: cache_cap as i32,
            sx: scale.map_or(0, |d| d.sx),
            sw: scale.map_or(0, |d| d.sw),
            bias: scale.and_then(|d| d.bias).unwrap_or(0),
        };
        let symbol = if scale.is_some() { "rope_scale_kv_store_bf16" } else { "rope_kv_store_bf16" };
        // SAFETY: params mirror RopeParams; qkv holds >= rows rows of qkv_dim, positions and
        // cache_rows >= rows entries, both caches are [cache_cap, kv_dim] (checked above);
        // block (r, c) touches row r < rows only and items < items (the kernel checks);
        // chunks <= 512 (heads <= 4096) fits grid y; the kernel traps on a cache row >=
        // cache_cap. A scale's sx holds >= rows entries and sw / bias qkv_dim, 16-byte aligned
        // (the W8A8 GEMM that deferred it checked them; checked again above).
        return unsafe { launch_ex(gpu, "rope", symbol, lc, &params) };
    }
    let params = RopeExtParams {
        qkv: qkv.ptr_mut(gpu),
        k_cache: k_cache.ptr_mut(gpu),
        v_cache: v_cache.ptr_mut(gpu),
        positions: positions.ptr(gpu),
        cache_rows: cache_rows.ptr(gpu),
        q_norm: extras.q_norm.map_or(0, |w| w.ptr(gpu)),
        k_norm: extras.k_norm.map_or(0, |w| w.ptr(gpu)),
        rows: rows as i32,
        n_heads: n_heads as i32,
        n_kv_heads: n_kv_heads as i32,
        theta,
        mode,
        cache_cap: cache_cap as i32,
        eps: extras.eps,
        rotary_dim: extras.rotary_dim as i32,
    };
    // SAFETY: as above, and the norm weights (when given) are [128] bf16 (checked above; a
    // device allocation is 16-byte aligned for the kernel's vector loads), rotary_dim is even
    // in 2..=128 (checked), eps finite and > 0 with a norm (checked).
    unsafe { launch_ex(gpu, "rope", "rope_qknorm_kv_store_bf16", lc, &params) }
}
