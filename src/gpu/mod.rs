//! The GPU backend's core: device context and stream, kernel modules loaded from the fatbins
//! that build.rs embedded, typed device tensors, events. Everything here sits behind the
//! `cuda` feature; a machine without libcuda gets `Error::NoCuda`, never a panic.
pub mod cold;
pub mod gemm;
pub mod gemm_fp8lt;
pub mod graph;
pub mod launch;
pub mod nvtx;
pub mod profile;
pub mod tensor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream};

pub use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
pub use tensor::DTensor;

use crate::error::{Error, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Converts any cudarc error into `Error::Driver` naming the operation.
pub(crate) fn drv<E: std::fmt::Debug>(op: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Driver { op: op.to_string(), msg: format!("{e:?}") }
}

/// One device: context, the stream every op runs on, loaded kernel modules, cuBLASLt.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    pub blas: gemm::Blas,
    pub name: String,
    pub sm_count: usize,
    pub ordinal: usize,
    /// `DEMASK_SYNC_LAUNCHES=1`: synchronise after every launch so a fault names its kernel.
    pub sync_launches: bool,
    /// Programmatic dependent launch for kernels launched with it (sm_90+; `DEMASK_PDL=0` or
    /// `DEMASK_SYNC_LAUNCHES=1` turn it off): a kernel's prologue overlaps its predecessor.
    pub pdl: bool,
    /// Compute capability major version (9 = Hopper), queried once.
    pub cc_major: i32,
}

/// Whether libcuda can be loaded here (checked without panicking).
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { sys::is_culib_present() }
}

/// Whether this build carries compiled kernels (nvcc was found at build time).
pub fn kernels_built() -> bool {
    !embedded::FATBINS.is_empty()
}

impl Gpu {
    /// Opens device `ordinal`: context, stream, all kernel modules, cuBLASLt.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        if !kernels_built() {
            return Err(Error::NoCuda(
                "this build has no GPU kernels (nvcc was not found at build time; run tools/install-nvcc.sh and rebuild)".into(),
            ));
        }
        if !driver_present() {
            return Err(Error::NoCuda("libcuda could not be loaded (no NVIDIA driver on this machine)".into()));
        }
        if !gemm::blaslt_present() {
            return Err(Error::NoCuda("libcublasLt could not be loaded (install the CUDA runtime libraries)".into()));
        }
        let n = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))?;
        if n <= 0 {
            return Err(Error::NoCuda("the driver reports no CUDA device".into()));
        }
        if ordinal >= n as usize {
            return Err(Error::NoCuda(format!("device cuda:{ordinal} does not exist ({n} present)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuCtxCreate"))?;
        // SAFETY: demask runs every op on one stream, so cross-stream event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own (non-blocking): the legacy default stream cannot be captured into
        // a CUDA graph. One stream serves every op, so a `Gpu` is driven by one thread at a time
        // (a capture would otherwise record another thread's launches).
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let mut modules = HashMap::new();
        for (name, image) in embedded::FATBINS {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(drv(&format!("loading kernels/{name}.cu")))?;
            modules.insert(*name, m);
        }
        let name = ctx.name().map_err(drv("cuDeviceGetName"))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("cuDeviceGetAttribute"))? as usize;
        let major = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(drv("cuDeviceGetAttribute"))?;
        let sync_launches = std::env::var("DEMASK_SYNC_LAUNCHES").is_ok_and(|v| v == "1");
        let pdl = major >= 9 && !sync_launches && std::env::var("DEMASK_PDL").map_or(true, |v| v != "0");
        let blas = gemm::Blas::new(stream.clone())?;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            modules,
            funcs: Mutex::new(HashMap::new()),
            blas,
            name,
            sm_count,
            ordinal,
            sync_launches,
            pdl,
            cc_major: major,
        }))
    }

    /// Makes this device's context current on the calling thread (cheap when it already is).
    /// A `Gpu` may be driven from a thread other than the one that opened it (one thread at a
    /// time); raw driver launches (`launch::launch_ex`, cuBLASLt) need the context current, so
    /// entry points that start device work (a model's forward, a decode step) call this first.
    pub fn bind_to_thread(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))
    }

    /// The kernel `symbol` of `kernels/<module>.cu` (looked up once, then cached).
    pub fn func(&self, module: &'static str, symbol: &'static str) -> Result<CudaFunction> {
        let mut funcs = self.funcs.lock().unwrap();
        if let Some(f) = funcs.get(symbol) {
            return Ok(f.clone());
        }
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| Error::NoCuda(format!("kernel module `{module}` is not in this build")))?;
        let f = m.load_function(symbol).map_err(drv(symbol))?;
        funcs.insert(symbol, f.clone());
        Ok(f)
    }

    /// Called after each launch: with `DEMASK_SYNC_LAUNCHES=1`, synchronise and name the kernel.
    pub fn after_launch(&self, symbol: &str) -> Result<()> {
        if self.sync_launches {
            self.stream.synchronize().map_err(drv(symbol))?;
        }
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("cuStreamSynchronize"))
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(drv("cuMemGetInfo"))
    }

    /// Allocates an uninitialised tensor. Callers write before reading (tests poison first).
    pub fn alloc<T: DeviceRepr>(&self, dims: &[usize]) -> Result<DTensor<T>> {
        DTensor::alloc(self, dims)
    }

    /// Copies a host slice into a new device tensor of the given dims.
    pub fn upload<T: DeviceRepr>(&self, host: &[T], dims: &[usize]) -> Result<DTensor<T>> {
        DTensor::from_host(self, host, dims)
    }
}

/// CUDA events around a region, for timing.
pub struct Timer {
    start: cudarc::driver::CudaEvent,
    stop: cudarc::driver::CudaEvent,
}

impl Timer {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Timer {
            start: gpu.ctx.new_event(flags).map_err(drv("cuEventCreate"))?,
            stop: gpu.ctx.new_event(flags).map_err(drv("cuEventCreate"))?,
        })
    }
    pub fn start(&self, gpu: &Gpu) -> Result<()> {
        self.start.record(&gpu.stream).map_err(drv("cuEventRecord"))
    }
    /// Records the stop event, waits for it, returns elapsed milliseconds.
    pub fn stop_ms(&self, gpu: &Gpu) -> Result<f32> {
        self.stop.record(&gpu.stream).map_err(drv("cuEventRecord"))?;
        self.stop.synchronize().map_err(drv("cuEventSynchronize"))?;
        self.start.elapsed_ms(&self.stop).map_err(drv("cuEventElapsedTime"))
    }
}

/// For GPU tests: the device, or `None` after printing why it is skipped.
/// With `DEMASK_REQUIRE_GPU=1` (the GPU suite) a missing device fails the test instead.
pub fn test_gpu() -> Option<Arc<Gpu>> {
    static GPU: std::sync::OnceLock<std::result::Result<Arc<Gpu>, String>> = std::sync::OnceLock::new();
    let got = GPU.get_or_init(|| Gpu::new(0).map_err(|e| e.to_string()));
    match got {
        Ok(g) => Some(g.clone()),
        Err(e) => {
            if std::env::var("DEMASK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("DEMASK_REQUIRE_GPU=1 but no usable GPU: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// Whether the GPU tests run at sanitizer scale (`DEMASK_SANITIZE_SHAPES=small`, set by the GPU
/// suite's compute-sanitizer mode): racecheck is 100-1000× slower than a plain run, so the
/// production-shape tests cut their sizes (fewer weight rows, heads, rows or samples) while
/// keeping each launch's configuration (entry point, split count, k loop, tails). Plain runs
/// always use the full shapes.
pub fn sanitizer_shapes() -> bool {
    std::env::var("DEMASK_SANITIZE_SHAPES").is_ok_and(|v| v == "small")
}

/// Names of the kernel modules (kernels/*.cu) compiled into this build.
pub fn kernel_modules() -> Vec<&'static str> {
    embedded::FATBINS.iter().map(|(n, _)| *n).collect()
}
