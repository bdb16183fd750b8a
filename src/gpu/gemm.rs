//! Dense GEMMs through cuBLASLt: `Y[t, n] = X[t, k] · W[n, k]ᵀ (+ bias[n])`, bf16 operands,
//! f32 accumulation, output bf16 or f32. Row-major Y is computed as column-major Yᵀ = W·Xᵀ
//! (m = n, n = t, transa = T). The descriptor, layouts and chosen algorithm are cached per
//! shape, so a decode step does no heuristic search and no allocation.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::CudaStream;

use super::{drv, DTensor, Gpu};
use crate::error::{Error, Result};

const WORKSPACE_BYTES: usize = 32 << 20;

pub fn blaslt_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { sys::is_culib_present() }
}

/// Element type of a GEMM output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    Bf16,
    F32,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    t: usize,
    n: usize,
    k: usize,
    bias: bool,
    out: OutType,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    /// Heuristic candidates not yet timed (emptied by the first call: autotuning).
    untuned: Vec<sys::cublasLtMatmulAlgo_t>,
}

/// Most heuristic candidates timed at a shape's first call.
pub(crate) const MAX_TUNE_CANDIDATES: usize = 64;

/// Candidates to time: `DEMASK_GEMM_TUNE=<n>` (0 or 1: keep the heuristic's first), default 16.
/// Timed launches per candidate algorithm when autotuning (the median is compared).
pub(crate) const TUNE_RUNS: usize = 5;

pub(crate) fn tune_candidates() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("DEMASK_GEMM_TUNE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(16)
            .clamp(1, MAX_TUNE_CANDIDATES)
    })
}

pub struct Blas {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: cudarc::driver::CudaSlice<u8>,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and descriptors are only used under the plans mutex or on the one stream.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

fn blas_err(op: &'static str) -> impl FnOnce(lt::CublasError) -> Error {
    move |e| Error::Driver { op: op.into(), msg: format!("{e:?}") }
}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(blas_err("cublasLtCreate"))?;
        // SAFETY: scratch memory for cuBLASLt; never read by demask.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(drv("cublasLt workspace"))?;
        Ok(Blas { handle, stream, workspace, plans: Mutex::new(HashMap::new()) })
    }

    fn plan(&self, key: Key) -> Result<()> {
        let mut plans = self.plans.lock().unwrap();
        if plans.contains_key(&key) {
            return Ok(());
        }
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let out_ty = match key.out {
            OutType::Bf16 => bf16,
            OutType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        };
        // SAFETY: descriptors are created here, owned by the plan, destroyed in Drop.
        unsafe {
            let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(blas_err("cublasLtMatmulDescCreate"))?;
            let trans: i32 = 1; // CUBLAS_OP_T
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const i32 as *const c_void,
                4,
            )
            .map_err(blas_err("CUBLASLT_MATMUL_DESC_TRANSA"))?;
            if key.bias {
                let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epi as *const u32 as *const c_void,
                    4,
                )
                .map_err(blas_err("CUBLASLT_MATMUL_DESC_EPILOGUE"))?;
                let bty = bf16 as i32;
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &bty as *const i32 as *const c_void,
                    4,
                )
                .map_err(blas_err("CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE"))?;
            }
            // A = W stored row-major [n, k] = column-major k x n, ld k; op(A) = Aᵀ (n x k).
            let a = lt::create_matrix_layout(bf16, key.k as u64, key.n as u64, key.k as i64)
                .map_err(blas_err("cublasLtMatrixLayoutCreate"))?;
            // B = X row-major [t, k] = column-major k x t, ld k.
            let b = lt::create_matrix_layout(bf16, key.k as u64, key.t as u64, key.k as i64)
                .map_err(blas_err("cublasLtMatrixLayoutCreate"))?;
            // D = Y row-major [t, n] = column-major n x t, ld n.
            let d = lt::create_matrix_layout(out_ty, key.n as u64, key.t as u64, key.n as i64)
                .map_err(blas_err("cublasLtMatrixLayoutCreate"))?;
            let pref = lt::create_matmul_pref().map_err(blas_err("cublasLtMatmulPreferenceCreate"))?;
            let ws = WORKSPACE_BYTES as u64;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(blas_err("CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES"))?;
            let mut heur: [sys::cublasLtMatmulHeuristicResult_t; MAX_TUNE_CANDIDATES] = std::mem::zeroed();
            let mut found = 0i32;
            let st = sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                a,
                b,
                d,
                d,
                pref,
                tune_candidates() as i32,
                heur.as_mut_ptr(),
                &mut found,
            );
            lt::destroy_matmul_pref(pref).map_err(blas_err("cublasLtMatmulPreferenceDestroy"))?;
            if st != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || found <= 0 {
                return Err(Error::Driver {
                    op: "cublasLtMatmulAlgoGetHeuristic".into(),
                    msg: format!("no algorithm for [{}x{}]·[{}x{}]ᵀ ({st:?})", key.t, key.k, key.n, key.k),
                });
            }
            let algos: Vec<_> = heur[..found as usize]
                .iter()
                .filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|h| h.algo)
                .collect();
            let untuned = if algos.len() > 1 { algos.clone() } else { Vec::new() };
            plans.insert(key, Plan { desc, a, b, d, algo: algos[0], untuned });
        }
        Ok(())
    }

    /// `y[0..t] = x[0..t] · wᵀ (+ bias)`. `w` is [n, k] bf16, `x` at least [t, k] bf16,
    /// `y` at least `[t, n]` (bf16 or f32 by `T`), `bias` `[n]` bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_raw(
        &self,
        gpu: &Gpu,
        t: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
        out: OutType,
    ) -> Result<()> {
        if t == 0 {
            return Ok(());
        }
        let key = Key { t, n, k, bias: bias.is_some(), out };
        self.plan(key)?;
        let mut plans = self.plans.lock().unwrap();
        let p = plans.get_mut(&key).expect("plan exists");
        if !p.untuned.is_empty() {
            let cands = std::mem::take(&mut p.untuned);
            p.algo = self.autotune(gpu, p, &cands, x, w, bias, y)?;
        }
        self.run(p, &p.algo, x, w, bias, y)?;
        gpu.after_launch("cublasLtMatmul")
    }

    /// Times every candidate algorithm on the real operands (after one warm-up launch, the
    /// median of `TUNE_RUNS` launches, each with a cold L2: `gpu::cold`) and returns the
    /// fastest. Runs once per shape, at its first call (host syncs).
    #[allow(clippy::too_many_arguments)]
    fn autotune(
        &self,
        gpu: &Gpu,
        p: &Plan,
        cands: &[sys::cublasLtMatmulAlgo_t],
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let mut timer = super::cold::ColdTimer::new(gpu)?;
        let mut best = (f32::MAX, cands[0]);
        for algo in cands {
            if self.run(p, algo, x, w, bias, y).is_err() {
                continue; // an algorithm the heuristic offered but this shape refuses
            }
            let ms = timer.median_ms(gpu, TUNE_RUNS, || self.run(p, algo, x, w, bias, y))?;
            if ms < best.0 {
                best = (ms, *algo);
            }
        }
        Ok(best.1)
    }

    fn run(&self, p: &Plan, algo: &sys::cublasLtMatmulAlgo_t, x: u64, w: u64, bias: Option<u64>, y: u64) -> Result<()> {
        let alpha = 1.0f32;
        let beta = 0.0f32;
        let (ws, _g) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, &self.stream);
        // SAFETY: pointers come from live DTensors whose sizes the callers checked; the plan's
        // descriptors are alive while the plans mutex is held by the caller.
        unsafe {
            if let Some(bp) = bias {
                lt::set_matmul_desc_attribute(
                    p.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bp as *const u64 as *const c_void,
                    8,
                )
                .map_err(blas_err("CUBLASLT_MATMUL_DESC_BIAS_POINTER"))?;
            }
            lt::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                p.a,
                x as *const c_void,
                p.b,
                y as *const c_void,
                p.d,
                y as *mut c_void,
                p.d,
                algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
            .map_err(blas_err("cublasLtMatmul"))?;
        }
        Ok(())
    }
}

/// Element types a GEMM can write.
pub trait GemmOut: cudarc::driver::DeviceRepr {
    const OUT: OutType;
}
impl GemmOut for half::bf16 {
    const OUT: OutType = OutType::Bf16;
}
impl GemmOut for f32 {
    const OUT: OutType = OutType::F32;
}

/// Typed entry point: checks every shape, then runs [`Blas::linear_raw`].
pub fn linear<Y: GemmOut>(
    gpu: &Gpu,
    t: usize,
    x: &DTensor<half::bf16>,
    w: &DTensor<half::bf16>,
    bias: Option<&DTensor<half::bf16>>,
    y: &mut DTensor<Y>,
) -> Result<()> {
    if w.dims.len() != 2 {
        return Err(Error::shape("linear", "w", &[0, 0], &w.dims));
    }
    let (n, k) = (w.dims[0], w.dims[1]);
    x.check_rows("linear", "x", t, k)?;
    y.check_rows("linear", "y", t, n)?;
    if let Some(b) = bias {
        if b.len() != n {
            return Err(Error::shape("linear", "bias", &[n], &b.dims));
        }
        if Y::OUT == OutType::F32 {
            // cuBLASLt takes a bf16 bias epilogue only with a bf16 output.
            return Err(Error::bad_input("linear: a bias with f32 output is not supported (use a bf16 output)"));
        }
    }
    let out = Y::OUT;
    let bp = bias.map(|b| b.ptr(gpu));
    gpu.blas.linear_raw(gpu, t, n, k, x.ptr(gpu), w.ptr(gpu), bp, y.ptr(gpu), out)
}

impl Drop for Blas {
    fn drop(&mut self) {
        let plans = std::mem::take(&mut *self.plans.lock().unwrap());
        // SAFETY: each descriptor was created by `plan` and is destroyed once.
        unsafe {
            for (_, p) in plans {
                let _ = lt::destroy_matrix_layout(p.a);
                let _ = lt::destroy_matrix_layout(p.b);
                let _ = lt::destroy_matrix_layout(p.d);
                let _ = lt::destroy_matmul_desc(p.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
