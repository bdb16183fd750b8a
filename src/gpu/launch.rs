//! Kernel launches that cudarc's launch builder cannot express: thread-block clusters chosen at
//! run time (`cuLaunchKernelEx` with a cluster-dimension attribute) and dynamic shared memory
//! above the default 48 KB (the function attribute is raised once per kernel).
use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::driver::{sys, CudaFunction, DeviceRepr};

use super::{drv, Gpu};
use crate::error::{Error, Result};

/// Grid, block, dynamic shared memory and an optional cluster shape of one launch.
#[derive(Clone, Copy, Debug)]
pub struct LaunchEx {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
    /// Thread-block cluster dimensions (sm_90+); `None` launches without clusters.
    pub cluster: Option<(u32, u32, u32)>,
    /// Programmatic dependent launch (sm_90+): the kernel may start before the previous one on
    /// the stream finishes; it must execute `griddepcontrol.wait` before reading that kernel's
    /// output or writing anything (every demask kernel launched this way does).
    pub pdl: bool,
}

/// Kernels whose dynamic shared memory limit was already raised (by symbol and size).
static RAISED: Mutex<Option<HashSet<(String, u32)>>> = Mutex::new(None);

fn raise_smem(f: &CudaFunction, symbol: &str, smem: u32) -> Result<()> {
    if smem <= 48 << 10 {
        return Ok(());
    }
    let mut raised = RAISED.lock().unwrap_or_else(|e| e.into_inner());
    let set = raised.get_or_insert_with(HashSet::new);
    if set.contains(&(symbol.to_string(), smem)) {
        return Ok(());
    }
    f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(drv(symbol))?;
    set.insert((symbol.to_string(), smem));
    Ok(())
}

/// Launches `symbol` of kernel module `module` on the GPU's stream with one by-value parameter
/// (the kernel's params struct).
///
/// # Safety
/// `params` must match the kernel's parameter struct, every device pointer in it must be valid
/// for what the kernel reads and writes with this launch shape, and a cluster shape must divide
/// the grid (checked) on a device that supports clusters (the caller checks).
pub unsafe fn launch_ex<P: DeviceRepr>(
    gpu: &Gpu,
    module: &'static str,
    symbol: &'static str,
    cfg: LaunchEx,
    params: &P,
) -> Result<()> {
    launch_ex_on(gpu, &gpu.stream, module, symbol, cfg, params)
}

/// [`launch_ex`] on another stream of the GPU's context (a side branch of the forward).
///
/// # Safety
/// As [`launch_ex`]; the caller orders the launch against the main stream (events).
pub unsafe fn launch_ex_on<P: DeviceRepr>(
    gpu: &Gpu,
    stream: &cudarc::driver::CudaStream,
    module: &'static str,
    symbol: &'static str,
    cfg: LaunchEx,
    params: &P,
) -> Result<()> {
    if let Some((cx, cy, cz)) = cfg.cluster {
        let (gx, gy, gz) = cfg.grid;
        if cx == 0 || cy == 0 || cz == 0 || gx % cx != 0 || gy % cy != 0 || gz % cz != 0 {
            return Err(Error::bad_input(format!(
                "{symbol}: cluster {:?} does not divide grid {:?}",
                cfg.cluster, cfg.grid
            )));
        }
    }
    let f = gpu.func(module, symbol)?;
    raise_smem(&f, symbol, cfg.smem)?;
    let mut attrs: [sys::CUlaunchAttribute; 2] = std::mem::zeroed();
    let mut n_attrs = 0;
    if let Some((x, y, z)) = cfg.cluster {
        attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attrs[n_attrs].value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x, y, z };
        n_attrs += 1;
    }
    if cfg.pdl && gpu.pdl {
        attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
        n_attrs += 1;
    }
    let lc = sys::CUlaunchConfig {
        gridDimX: cfg.grid.0,
        gridDimY: cfg.grid.1,
        gridDimZ: cfg.grid.2,
        blockDimX: cfg.block.0,
        blockDimY: cfg.block.1,
        blockDimZ: cfg.block.2,
        sharedMemBytes: cfg.smem,
        hStream: stream.cu_stream(),
        attrs: attrs.as_mut_ptr(),
        numAttrs: n_attrs as u32,
    };
    let mut args: [*mut c_void; 1] = [params as *const P as *mut c_void];
    sys::cuLaunchKernelEx(&lc, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut())
        .result()
        .map_err(drv(symbol))?;
    gpu.after_launch(symbol)
}
