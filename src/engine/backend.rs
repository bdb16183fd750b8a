//! The engine's backends: what it needs of one ([`EngineBackend`], implemented by the CPU and
//! GPU steppers), which one a set of options picks, and the KV-cache row cap it allows.
#[cfg(feature = "cuda")]
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::decode::cpu::CpuStepper;
use crate::decode::step::StepBackend;
use crate::error::{Error, Result};

use super::{DType, Device, EngineOptions};

/// What the engine needs of a backend beyond `StepBackend`: the size of its KV cache, which
/// the engine sets only while no sequence is active (never during a decode). `Send`, so an
/// [`Engine`](super::Engine) can move to the thread that drives it (one thread at a time).
pub trait EngineBackend: StepBackend + Send {
    /// Bytes one KV-cache row takes (K and V of every layer).
    fn cache_row_bytes(&self) -> u64;
    /// Most cache rows the backend can hold: `None` when it can grow (the CPU), else the rows
    /// it preallocated.
    fn cache_row_limit(&self) -> Option<usize>;
    /// Makes sure `rows` cache rows are ready (may allocate, and may drop what the cache held;
    /// an error when it cannot).
    fn reserve_cache(&mut self, rows: usize) -> Result<()>;
    /// Device memory `(used, total)` bytes, for backends on a device (monitoring).
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }
    /// Starts (resets) or stops counting the experts each MoE layer touches; `Ok(false)` where
    /// the backend does not count (the CPU, dense models).
    fn set_expert_stats(&mut self, _on: bool) -> Result<bool> {
        Ok(false)
    }
    /// `(experts touched, layer forwards)` since `set_expert_stats(true)`, where counted.
    fn expert_stats(&self) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }
}

impl EngineBackend for CpuStepper {
    fn cache_row_bytes(&self) -> u64 {
        CpuStepper::cache_row_bytes(self)
    }
    fn cache_row_limit(&self) -> Option<usize> {
        None
    }
    fn reserve_cache(&mut self, rows: usize) -> Result<()> {
        self.reserve(rows);
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl EngineBackend for crate::decode::gpu::GpuStepper {
    fn cache_row_bytes(&self) -> u64 {
        let cfg = &self.model().cfg;
        (2 * cfg.n_layers * cfg.kv_dim() * std::mem::size_of::<half::bf16>()) as u64
    }
    fn cache_row_limit(&self) -> Option<usize> {
        Some(self.model().cache.rows)
    }
    fn reserve_cache(&mut self, rows: usize) -> Result<()> {
        let have = self.model().cache.rows;
        if rows > have {
            return Err(Error::bad_input(format!(
                "{rows} KV-cache rows needed, the GPU preallocated {have} (raise --kv-budget or lower the batch)"
            )));
        }
        Ok(())
    }
    fn device_memory(&self) -> Option<(u64, u64)> {
        let (free, total) = self.model().gpu.mem_info().ok()?;
        Some(((total - free) as u64, total as u64))
    }
    fn set_expert_stats(&mut self, on: bool) -> Result<bool> {
        if self.model().cfg.moe.is_none() {
            return Ok(false);
        }
        self.model_mut().set_expert_stats(on)?;
        Ok(true)
    }
    fn expert_stats(&self) -> Result<Option<(u64, u64)>> {
        self.model().expert_stats()
    }
}

/// Models the CPU backend accepts (its f32 copy must fit comfortably in host memory); checked
/// before weights are read so a large checkpoint fails fast.
const CPU_MAX_PARAMS: u64 = 2_000_000_000;

/// KV-cache rows the active sequences may hold together, and the budget in bytes behind that
/// number (for messages): the smaller of `kv_budget / bytes per row` and what the backend
/// holds (`usize::MAX` / `None`: no limit).
pub(super) fn cache_row_cap(backend: &dyn EngineBackend, kv_budget: Option<u64>) -> (usize, Option<u64>) {
    let per_row = backend.cache_row_bytes().max(1);
    let by_budget = kv_budget.map(|b| usize::try_from(b / per_row).unwrap_or(usize::MAX));
    let by_backend = backend.cache_row_limit();
    let rows = by_budget.unwrap_or(usize::MAX).min(by_backend.unwrap_or(usize::MAX));
    let budget = match (kv_budget, by_backend) {
        (Some(b), Some(r)) => Some(b.min(r as u64 * per_row)),
        (Some(b), None) => Some(b),
        (None, Some(r)) => Some(r as u64 * per_row),
        (None, None) => None,
    };
    (rows, budget)
}

/// The GPU `opts.device` asks for: `Cuda(i)` must open (else an error naming it); `Auto` takes
/// device 0 when it opens and the CPU otherwise; `Cpu` takes none.
#[cfg(feature = "cuda")]
pub(super) fn open_gpu(opts: &EngineOptions) -> Result<Option<Arc<crate::gpu::Gpu>>> {
    match opts.device {
        Device::Cpu => Ok(None),
        Device::Cuda(i) => {
            crate::gpu::Gpu::new(i).map(Some).map_err(|e| match e {
                // Gpu::new's NoCuda already reads "no CUDA device: ...": name the device once.
                Error::NoCuda(m) if m.contains(&format!("cuda:{i}")) => Error::NoCuda(m),
                Error::NoCuda(m) => Error::NoCuda(format!("device cuda:{i}: {m}")),
                other => other,
            })
        }
        Device::Auto => Ok(crate::gpu::Gpu::new(0).ok()),
    }
}

/// Checks that the options name a backend `load` / `from_weights` can run for `cfg`: the CPU
/// backend. The GPU backend comes through [`Engine::on_gpu`](super::Engine::on_gpu) (or
/// `with_backend`).
pub(super) fn pick_backend(cfg: &ModelConfig, opts: &EngineOptions) -> Result<()> {
    if let Device::Cuda(i) = opts.device {
        return Err(Error::bad_input(format!(
            "device cuda:{i}: weights in host memory run on the CPU backend here (use Engine::load or Engine::on_gpu for the GPU{})",
            if cfg!(feature = "cuda") { "" } else { "; this build has no GPU backend" }
        )));
    }
    if opts.dtype == DType::Bf16 {
        return Err(Error::bad_input("dtype bf16: the CPU backend computes in f32 (use dtype auto or f32)"));
    }
    if opts.weights != crate::quant::WeightFormat::Bf16 {
        return Err(Error::bad_input(format!("weights {}: FP8 weights run on the GPU backend only", opts.weights)));
    }
    let params = cfg.param_count();
    if params > CPU_MAX_PARAMS {
        return Err(Error::bad_input(format!(
            "the CPU backend runs small models only ({params} parameters; limit {CPU_MAX_PARAMS}), and no GPU backend is available"
        )));
    }
    Ok(())
}
