//! `fill_normal_bf16` / `fill_const_bf16` (kernels/fill.cu): device-side fills. fill_normal
//! synthesises random weights on the GPU (no host copy): element i is a function of
//! (seed, i) only (splitmix64 hash + Box-Muller), whatever the launch configuration.
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use crate::error::Result;
use crate::gpu::{drv, DTensor, Gpu};

const THREADS: u32 = 256;
/// Resident blocks per SM aimed at by the grid-stride launch.
const BLOCKS_PER_SM: usize = 8;

/// Mirrors `FillNormalParams` in kernels/fill.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct FillNormalParams {
    out: u64,  // bf16*
    n: u64,    // uint64_t
    seed: u64, // uint64_t
    mean: f32, // float
    std: f32,  // float
}

/// Mirrors `FillConstParams` in kernels/fill.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct FillConstParams {
    out: u64,   // bf16*
    n: u64,     // uint64_t
    value: f32, // float
}

// SAFETY: plain-old-data mirrors of the C structs (u64 pointers/sizes, f32 scalars).
unsafe impl cudarc::driver::DeviceRepr for FillNormalParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for FillConstParams {}

/// Grid for a grid-stride loop over `n` bf16 in 16-byte vectors: enough blocks to fill the
/// device, no more than the work needs.
fn grid(gpu: &Gpu, n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(8)
        .div_ceil(THREADS as usize)
        .clamp(1, gpu.sm_count.max(1) * BLOCKS_PER_SM);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fills all of `t` with samples of N(mean, std²) rounded to bf16, deterministic in (seed, index).
pub fn fill_normal(gpu: &Gpu, t: &mut DTensor<bf16>, seed: u64, mean: f32, std: f32) -> Result<()> {
    let n = t.len();
    if n == 0 {
        return Ok(());
    }
    let params = FillNormalParams {
        out: t.ptr_mut(gpu),
        n: n as u64,
        seed,
        mean,
        std,
    };
    let f = gpu.func("fill", "fill_normal_bf16")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: params mirror FillNormalParams; out holds exactly n elements (t.len()).
    unsafe { b.launch(grid(gpu, n)) }.map_err(drv("fill_normal_bf16"))?;
    gpu.after_launch("fill_normal_bf16")
}

/// Sets every element of `t` to bf16(value) (NaN and infinities included).
pub fn fill_const(gpu: &Gpu, t: &mut DTensor<bf16>, value: f32) -> Result<()> {
    let n = t.len();
    if n == 0 {
        return Ok(());
    }
    let params = FillConstParams {
        out: t.ptr_mut(gpu),
        n: n as u64,
        value,
    };
    let f = gpu.func("fill", "fill_const_bf16")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: params mirror FillConstParams; out holds exactly n elements (t.len()).
    unsafe { b.launch(grid(gpu, n)) }.map_err(drv("fill_const_bf16"))?;
    gpu.after_launch("fill_const_bf16")
}
