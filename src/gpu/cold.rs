//! Timing a GEMM the way a decode step runs it: with its weight cold in L2. The cuBLASLt
//! autotuners (`gpu::gemm`, `gpu::gemm_fp8lt`) pick among the heuristic's algorithms by timing
//! each on the real operands; timed back to back, a weight of about the L2's size (an 8B
//! model's 50 MB FP8 QKV or down projection against the H100's 50 MB L2) is partly served
//! from L2 on every repeat, which favours algorithms that stream DRAM worse. In a decode
//! step each weight is read once per step, after the rest of the layer has gone through L2,
//! so [`ColdTimer`] overwrites a buffer of twice the L2 before every timed launch and takes
//! the median of several launches (single launches of 10-40 µs are noisy).
use cudarc::driver::{sys, CudaSlice};

use super::{drv, Gpu, Timer};
use crate::error::Result;

/// Flush buffer and events for [`ColdTimer::median_ms`]; allocated when an autotuner starts
/// (the first eager call of a shape) and dropped when it is done. Where the device has no
/// room for the flush buffer (a model filling its memory), timing goes on with a warm L2
/// rather than failing the GEMM.
pub struct ColdTimer {
    timer: Timer,
    flush: Option<CudaSlice<u8>>,
}

impl ColdTimer {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let l2 = gpu
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(drv("cuDeviceGetAttribute (L2 size)"))?
            .max(0) as usize;
        let bytes = (2 * l2).max(64 << 20);
        let flush = gpu.stream.alloc_zeros::<u8>(bytes).ok();
        Ok(ColdTimer { timer: Timer::new(gpu)?, flush })
    }

    /// The median over `runs` (at least 1) of the time of one `launch`, each after the L2 is
    /// overwritten. `launch` enqueues the work on `gpu.stream`.
    pub fn median_ms(&mut self, gpu: &Gpu, runs: usize, mut launch: impl FnMut() -> Result<()>) -> Result<f32> {
        let mut times = Vec::with_capacity(runs.max(1));
        for _ in 0..runs.max(1) {
            if let Some(f) = self.flush.as_mut() {
                gpu.stream.memset_zeros(f).map_err(drv("cuMemsetD8Async (L2 flush)"))?;
            }
            self.timer.start(gpu)?;
            launch()?;
            times.push(self.timer.stop_ms(gpu)?);
        }
        times.sort_by(f32::total_cmp);
        Ok(times[times.len() / 2])
    }
}
