//! The `stream` W8A8 path for decode-sized row counts (t ≤ 64): kernels/gemm_w8a8_stream.cu,
//! the `skinny` kernel's contract (scales, bias and SwiGLU in the epilogue) on Hopper's
//! warpgroup MMA (`wgmma` m64nNk32 E4M3, both operands from shared memory, each 128-column
//! unit's product added into an f32 total), with the weight streamed stream-K: one persistent
//! block per SM takes an equal share of the (128-row tile × 128-column k step) units, fed by
//! 2-D TMA copies (tensor maps encoded here per launch, a host-only call) through a
//! warp-specialised mbarrier ring, and the blocks that share a tile add their partial sums in
//! a fixed order through [`StreamScratch`]. Only when selected (`DEMASK_W8A8=stream`): on the
//! H100 it is the fastest W8A8 kernel from 16 rows up when launched back to back, but W1
//! decode steps are slower on it than on `split-scale` (benches/RESULTS.md v0.16).
//!
//! Output as `skinny`: `y[r, c] = bf16(f32(sx[r]·sw[c])·Σ + bias[c])`; the gate|up entry points
//! write `act = bf16(bf16(silu(g))·u)`. Σ is summed in an order fixed by (n, k, block count), so
//! a GPU model gives the same bits on every run; another block count (`ctas`) may differ in
//! the last f32 bits of Σ.
use half::bf16;

use super::skinny::{check_quantized, Operands, W8a8SkinnyParams};
use crate::error::{Error, Result};
use crate::gpu::gemm::{GemmOut, OutType};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};
use crate::ops::gemm::SKINNY_ROW_LIMIT;
use crate::ops::gemm_fp8::Fp8Weight;
use cudarc::driver::sys;

const OP: &str = "gemm_w8a8_stream";
/// 8 consumer warps and the producer warp.
const THREADS: u32 = 288;
/// k columns per unit (`BK`).
const STAGE_K: usize = 128;
/// W rows per tile (`BN`).
const TILE_ROWS: usize = 128;
/// Rows of a workspace slot (`WS_ROWS`): the most rows a launch takes.
const SLOT_ROWS: usize = SKINNY_ROW_LIMIT;

/// Mirrors `struct W8a8StreamParams` in kernels/gemm_w8a8_stream.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct W8a8StreamParams {
    g: W8a8SkinnyParams,
    ws: u64,    // float* [G][64][128]
    flags: u64, // unsigned* [G]
    tiles: i32,
    ksteps: i32,
    pad0: i32,
    pad1: i32,
}
// SAFETY: plain-old-data mirror of the C struct (the skinny block, two pointers, four ints).
unsafe impl cudarc::driver::DeviceRepr for W8a8StreamParams {}

/// Mirrors `struct W8a8StreamArgs` (the kernel's one parameter, `__grid_constant__`): the
/// tensor maps of W and X, then the parameter block.
#[repr(C)]
#[derive(Clone, Copy)]
struct W8a8StreamArgs {
    wmap: sys::CUtensorMap,
    xmap: sys::CUtensorMap,
    sp: W8a8StreamParams,
}
// SAFETY: plain-old-data mirror of the C struct (two 128-byte-aligned opaque descriptors and
// the parameter block; the trailing padding is never read).
unsafe impl cudarc::driver::DeviceRepr for W8a8StreamArgs {}

/// A 2-D TMA map of `rows` rows of `k` E4M3 codes at `ptr` (row stride k bytes), boxes of
/// 128 columns × `box_rows` rows, 128-byte swizzle, rows past `rows` read as zeros.
fn tensor_map(ptr: u64, rows: usize, k: usize, box_rows: u32) -> Result<sys::CUtensorMap> {
    use sys::{CUtensorMapDataType as D, CUtensorMapFloatOOBfill as F, CUtensorMapInterleave as I, CUtensorMapL2promotion as L, CUtensorMapSwizzle as S};
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let dims = [k as u64, rows as u64];
    let strides = [k as u64];
    let boxes = [STAGE_K as u32, box_rows];
    let elem = [1u32, 1];
    // SAFETY: a host-side encoding into `map` from the arrays above (rank 2); no device access.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            D::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            I::CU_TENSOR_MAP_INTERLEAVE_NONE,
            S::CU_TENSOR_MAP_SWIZZLE_128B,
            L::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            F::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::bad_input(format!("{OP}: encoding the tensor map of [{rows}, {k}] codes (box {box_rows} rows): {r:?}")));
    }
    // SAFETY: cuTensorMapEncodeTiled succeeded, so it wrote the whole map.
    Ok(unsafe { map.assume_init() })
}

/// The stream-K kernel's workspace for up to `ctas` blocks: a partial-sum slot per block
/// and a flag per block (zero between launches). One per `W8a8`; launches on it must not
/// overlap (the engine runs one stream).
pub struct StreamScratch {
    ws: DTensor<f32>,
    flags: DTensor<u32>,
    ctas: usize,
}

impl StreamScratch {
    /// Workspace for one block per SM (4.3 MB on a 132-SM H100).
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let ctas = gpu.sm_count.max(1);
        Ok(StreamScratch {
            ws: gpu.alloc(&[ctas, SLOT_ROWS, TILE_ROWS])?,
            flags: gpu.upload(&vec![0u32; ctas], &[ctas])?,
            ctas,
        })
    }

    /// The most blocks a launch may use (the SM count).
    pub fn ctas(&self) -> usize {
        self.ctas
    }
}

/// (entry point, dynamic shared memory): NT = 1, 2, 4, 8 row tiles of 8; STAGES × (16 KB of W +
/// 8·NT·128 X codes), the f32 reduction tile 8·NT × 128 and 2·STAGES mbarriers (`TileS<NT>`),
/// plus 1 KB to align the ring to the swizzle's 1 KB.
fn kernel_for(t: usize, swiglu: bool) -> (&'static str, u32) {
    use crate::ops::gemm::{by_row_tiles, row_tiles};
    let nt = row_tiles(t);
    let stages = if nt == 8 { 7 } else { 8 };
    let tp = 8 * nt;
    let smem = (stages * (TILE_ROWS * STAGE_K + tp * STAGE_K) + tp * TILE_ROWS * 4 + 2 * stages * 8 + 1024) as u32;
    let sym = if swiglu {
        by_row_tiles(nt, ["gemm_w8a8_stream8_swiglu_bf16", "gemm_w8a8_stream16_swiglu_bf16", "gemm_w8a8_stream32_swiglu_bf16", "gemm_w8a8_stream64_swiglu_bf16"])
    } else {
        by_row_tiles(nt, ["gemm_w8a8_stream8_bf16", "gemm_w8a8_stream16_bf16", "gemm_w8a8_stream32_bf16", "gemm_w8a8_stream64_bf16"])
    };
    (sym, smem)
}

/// Why the stream kernel cannot run `t` rows of `w` on a GPU of compute capability
/// `cc_major`.x (`None`: it can): what the skinny kernel refuses (Hopper only, t ≤ 64, channel
/// scales, n and k in range), and k not a multiple of 128 (whole units: every LLaDA, Dream and
/// MoE linear layer has it).
pub(super) fn refusal(cc_major: i32, t: usize, w: &Fp8Weight) -> Option<String> {
    super::skinny::refusal(cc_major, t, w).or_else(|| {
        (!w.k().is_multiple_of(STAGE_K)).then(|| format!("needs k to be a multiple of {STAGE_K}, got [{}, {}]", w.n(), w.k()))
    })
}

/// (tiles, k steps) of an `[n, k]` weight (SwiGLU: tiles of 64 gate rows and their 64 up rows).
fn units(n: usize, k: usize, swiglu: bool) -> (usize, usize) {
    let tiles = if swiglu { (n / 2).div_ceil(TILE_ROWS / 2) } else { n.div_ceil(TILE_ROWS) };
    (tiles, k / STAGE_K)
}

/// Launches the kernel for `t ≤ 64` quantised rows on `ctas` blocks (`None`: one per SM; never
/// more than the units, nor than `scratch` holds). The caller checked the operands' shapes and
/// [`refusal`].
#[allow(clippy::too_many_arguments)]
pub(super) fn launch(
    gpu: &Gpu,
    scratch: &mut StreamScratch,
    t: usize,
    w: &Fp8Weight,
    ops: &Operands,
    out_f32: bool,
    swiglu: bool,
    ctas: Option<usize>,
) -> Result<()> {
    if t == 0 {
        return Ok(());
    }
    let (n, k) = (w.n(), w.k());
    let (tiles, ksteps) = units(n, k, swiglu);
    let total = tiles * ksteps;
    if total > i32::MAX as usize {
        return Err(Error::bad_input(format!("{OP}: [{n}, {k}] weight: {total} work units exceed 2^31")));
    }
    let g = ctas.unwrap_or(scratch.ctas);
    if g == 0 || g > scratch.ctas {
        return Err(Error::bad_input(format!("{OP}: {g} blocks requested; between 1 and {} (one per SM) can run", scratch.ctas)));
    }
    let g = g.min(total);
    let wq = w.q.ptr(gpu);
    let sp = W8a8StreamParams {
        g: W8a8SkinnyParams::new(ops, wq, w.scales.ptr(gpu), t, n, k, out_f32),
        ws: scratch.ws.ptr_mut(gpu),
        flags: scratch.flags.ptr_mut(gpu),
        tiles: tiles as i32,
        ksteps: ksteps as i32,
        pad0: 0,
        pad1: 0,
    };
    let x_box = 8 * crate::ops::gemm::row_tiles(t) as u32;
    let params = W8a8StreamArgs { wmap: tensor_map(wq, n, k, 64)?, xmap: tensor_map(ops.xq, t, k, x_box)?, sp };
    let (sym, smem) = kernel_for(t, swiglu);
    let lc = LaunchEx { grid: (g as u32, 1, 1), block: (THREADS, 1, 1), smem, cluster: None, pdl: true };
    // SAFETY: params mirror W8a8StreamArgs (maps of exactly w's n × k codes and xq's t × k);
    // the caller checked xq >= t rows of k codes, sx >=
    // t, y >= t rows of n (n/2 for SwiGLU), w [n, k] with k % 128 == 0 and channel scales [n],
    // bias [n]; t ≤ 64; ws holds g slots of 64 × 128 f32 and flags g zeros; g ≤ the SM count,
    // so every block is resident at once (the blocks wait on each other's flags).
    unsafe { launch_ex(gpu, "gemm_w8a8_stream", sym, lc, &params) }
}

/// The kernel on its own, for tests and sweeps: `y[0..t] = sx·sw·(xq · wᵀ) (+ bias)` from rows
/// already quantised (`xq` `[>= t, k]` codes, `sx` `[>= t]`) on `ctas` blocks (`None`: one per
/// SM).
#[allow(clippy::too_many_arguments)]
pub fn stream_w8a8<Y: GemmOut>(
    gpu: &Gpu,
    scratch: &mut StreamScratch,
    ctas: Option<usize>,
    t: usize,
    xq: &DTensor<u8>,
    sx: &DTensor<f32>,
    w: &Fp8Weight,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
) -> Result<()> {
    check_quantized(OP, refusal(gpu.cc_major, t, w), t, xq, sx, w, bias)?;
    y.check_rows(OP, "y", t, w.n())?;
    let ops = Operands { xq: xq.ptr(gpu), sx: sx.ptr(gpu), bias: bias.map(|b| b.ptr(gpu)), y: y.ptr_mut(gpu) };
    launch(gpu, scratch, t, w, &ops, Y::OUT == OutType::F32, false, ctas)
}

/// The gate|up entry point on its own: `act[0..t] = SwiGLU(sx·sw·(xq · wᵀ))` for a gate|up
/// weight `w` (`[2·ffn, k]`, gate rows first), `act` `[>= t, ffn]`, on `ctas` blocks.
#[allow(clippy::too_many_arguments)]
pub fn stream_w8a8_swiglu(
    gpu: &Gpu,
    scratch: &mut StreamScratch,
    ctas: Option<usize>,
    t: usize,
    xq: &DTensor<u8>,
    sx: &DTensor<f32>,
    w: &Fp8Weight,
    act: &mut DTensor<bf16>,
) -> Result<()> {
    check_quantized(OP, refusal(gpu.cc_major, t, w), t, xq, sx, w, None)?;
    let n = w.n();
    // ffn = n/2 a multiple of 4: the epilogue reads the up rows' channel scales (from scales +
    // ffn) 16 bytes at a time. Every model's gate|up has it (the W8A8 paths need n % 16).
    if !n.is_multiple_of(8) {
        return Err(Error::bad_input(format!("{OP}: a gate|up weight needs a row count that is a multiple of 8, got {n}")));
    }
    act.check_rows(OP, "act", t, n / 2)?;
    let ops = Operands { xq: xq.ptr(gpu), sx: sx.ptr(gpu), bias: None, y: act.ptr_mut(gpu) };
    launch(gpu, scratch, t, w, &ops, false, true, ctas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<W8a8StreamParams>(), 72 + 16 + 16);
        // Two 128-byte maps, the block, padded to the maps' 128-byte alignment.
        assert_eq!(std::mem::size_of::<W8a8StreamArgs>(), 384);
        assert_eq!(std::mem::align_of::<W8a8StreamArgs>(), 128);
        // 8 stages of (16 KB + 32·128) + the 32 × 128 f32 tile + 16 mbarriers + 1 KB alignment.
        assert_eq!(kernel_for(32, false), ("gemm_w8a8_stream32_bf16", 8 * (16384 + 4096) + 16384 + 128 + 1024));
        assert_eq!(kernel_for(64, true), ("gemm_w8a8_stream64_swiglu_bf16", 7 * (16384 + 8192) + 32768 + 112 + 1024));
        for t in 1..=64 {
            // One block per SM within the H100's 227 KB of shared memory per block.
            assert!(kernel_for(t, false).1 <= 227 << 10, "t={t}");
        }
    }

    #[test]
    fn units_cover_every_row() {
        assert_eq!(units(12288, 4096, false), (96, 32));
        assert_eq!(units(136, 512, false), (2, 4));
        // SwiGLU tiles pair 64 gate rows with their up rows: ffn = 68 is two tiles.
        assert_eq!(units(2 * 68, 512, true), (2, 4));
        assert_eq!(units(2 * 18944, 3584, true), (296, 28));
    }
}
