//! W8A8 GEMMs through cuBLASLt FP8: Xq[t, k] · Wq[n, k]ᵀ with Xq and Wq E4M3, cuBLASLt's default
//! accumulation (partial sums promoted to f32 periodically; `DEMASK_FP8_FAST_ACCUM=1` keeps the
//! tensor cores' accumulator instead, see [`fast_accum`]), bf16 output, in two forms:
//! - [`Fp8Lt::matmul_raw`] (`ops::gemm_w8a8`'s `outer-vec` path):
//!   `Y = (sx[r] · sw[c]) · Xq·Wqᵀ (+ bias)`, the per-row activation scales and per-output-channel
//!   weight scales given to cuBLASLt as outer-vector scales
//!   (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F` on A and B, cuBLAS ≥ 12.9), so the scaling
//!   happens in the GEMM's epilogue with no extra pass. Not every cuBLASLt offers an algorithm
//!   for it (the H100 with the CUDA 13.0 cuBLASLt does not).
//! - [`Fp8Lt::matmul_unscaled_raw`] (the `split-scale` path): the plain FP8 GEMM, no scales
//!   (per-tensor scale pointers unset, i.e. 1) and no bias, `D = bf16(Xq·Wqᵀ)`; the caller
//!   applies the scales and bias in its own epilogue kernel.
//!
//! As in `gpu::gemm`, row-major Y is column-major Yᵀ = Wq·Xqᵀ: A = Wq with op T, B = Xq, no
//! transpose (the "TN" layout cuBLASLt's FP8 kernels require), compute type 32F, scale type
//! 32F. FP8 also requires 16-byte aligned pointers and leading dimensions: k % 16 == 0 (A and B
//! rows of E4M3 bytes) and n % 8 == 0 (bf16 D rows); the callers check them.
//! The descriptor, layouts and algorithm are made once per shape and scaling, and the
//! heuristic's top candidates (`DEMASK_GEMM_TUNE`, as `gpu::gemm`) are timed on the real
//! operands at the shape's first call — unless that call is inside a CUDA-graph capture (a
//! timing would synchronise the capturing stream): then the heuristic's first algorithm runs
//! and the timing waits for the next eager call. The 32 MB workspace is allocated once, with
//! the handle, so a call allocates nothing and is graph-capturable.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::CudaStream;

use super::cold::ColdTimer;
use super::gemm::{tune_candidates, MAX_TUNE_CANDIDATES, TUNE_RUNS};
use super::{drv, Gpu};
use crate::error::{Error, Result};

const WORKSPACE_BYTES: usize = 32 << 20;
/// Prefix of the error [`Fp8Lt`] returns when cuBLASLt offers no algorithm (see [`no_algorithm`]).
const NO_ALGO: &str = "cublasLtMatmulAlgoGetHeuristic (FP8";

/// How the row and channel scales reach the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Scaling {
    /// Outer-vector scales in cuBLASLt's epilogue (and the bias, if any).
    OuterVec,
    /// None: D is the plain product.
    Unscaled,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    t: usize,
    n: usize,
    k: usize,
    bias: bool,
    scaling: Scaling,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    /// Heuristic candidates not yet timed (emptied by the first eager call: autotuning).
    untuned: Vec<sys::cublasLtMatmulAlgo_t>,
}

/// Device addresses of one GEMM's operands (shapes checked by the callers).
#[derive(Clone, Copy)]
struct Operands {
    xq: u64,
    wq: u64,
    /// Outer-vector scales: (sx, sw) for [`Scaling::OuterVec`].
    scales: Option<(u64, u64)>,
    bias: Option<u64>,
    y: u64,
}

/// A cuBLASLt handle, workspace and per-shape plans for FP8 GEMMs.
pub struct Fp8Lt {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: cudarc::driver::CudaSlice<u8>,
    plans: HashMap<Key, Plan>,
}

// SAFETY: the handle and descriptors are used only through `&mut self` on the one stream.
unsafe impl Send for Fp8Lt {}

fn lt_err(op: &'static str) -> impl FnOnce(lt::CublasError) -> Error {
    move |e| Error::Driver { op: op.into(), msg: format!("{e:?}") }
}

/// Whether `e` is [`Fp8Lt`]'s "cuBLASLt has no algorithm for this" (as opposed to a failed
/// launch): the caller may then take another path.
pub fn no_algorithm(e: &Error) -> bool {
    matches!(e, Error::Driver { op, .. } if op.starts_with(NO_ALGO))
}

/// The [`no_algorithm`] error for `key` (`status`: what cuBLASLt said).
fn no_algo_error(key: Key, status: &str) -> Error {
    let (what, hint) = match key.scaling {
        Scaling::OuterVec => {
            ("outer-vector scales", "this cuBLASLt may predate per-channel FP8 scaling (12.9) or not offer it on this GPU")
        }
        Scaling::Unscaled => ("unscaled", "FP8 tensor cores need sm_89 or newer"),
    };
    Error::Driver {
        op: format!("{NO_ALGO}, {what}{})", if key.bias { ", bias epilogue" } else { "" }),
        msg: format!("no algorithm for [{}x{}]·[{}x{}]ᵀ ({status}); {hint}", key.t, key.k, key.n, key.k),
    }
}

/// Destroys a plan's descriptors (errors at teardown are ignored).
fn destroy(p: &Plan) {
    // SAFETY: the descriptors were created by `make_plan` and are destroyed once (the plan is
    // dropped from the map by the caller).
    unsafe {
        for l in [p.a, p.b, p.d] {
            let _ = lt::destroy_matrix_layout(l);
        }
        let _ = lt::destroy_matmul_desc(p.desc);
    }
}

/// Sets a descriptor attribute from a plain value.
///
/// # Safety
/// `desc` must be a live descriptor and `T` the attribute's C type.
unsafe fn set<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T, what: &'static str) -> Result<()> {
    lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()).map_err(lt_err(what))
}

/// cuBLASLt's FP8 fast accumulation (`CUBLASLT_MATMUL_DESC_FAST_ACCUM`: the tensor cores'
/// accumulator throughout the k loop, no periodic promotion to f32), opt-in with
/// `DEMASK_FP8_FAST_ACCUM=1`. Measured on the H100 (benches/RESULTS.md v0.14): the 8192-row
/// LLaDA-8B forward 147.4 → 134.4 ms, W2 batch 64 at 1.63-1.66× bf16, and no change in the
/// FP8-vs-bf16 error at three digits (the E4M3 rounding dominates); off by default until the GPU
/// suite has run with it (docs/fp8.md).
pub fn fast_accum() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DEMASK_FP8_FAST_ACCUM").is_ok_and(|v| v == "1"))
}

/// Whether `stream` is capturing a CUDA graph (raw call: cudarc's wrapper would first report
/// errors recorded earlier).
fn capturing(stream: &CudaStream) -> bool {
    use cudarc::driver::{result, sys as dsys};
    // SAFETY: the stream is alive (held by the caller).
    let st = unsafe { result::stream::is_capturing(stream.cu_stream()) };
    !matches!(st, Ok(dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE))
}

impl Fp8Lt {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        if !super::gemm::blaslt_present() {
            return Err(Error::NoCuda("libcublasLt could not be loaded".into()));
        }
        let handle = lt::create_handle().map_err(lt_err("cublasLtCreate"))?;
        // SAFETY: scratch memory for cuBLASLt; never read by demask.
        let workspace = unsafe { gpu.stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(drv("cublasLt FP8 workspace"))?;
        Ok(Fp8Lt { handle, stream: gpu.stream.clone(), workspace, plans: HashMap::new() })
    }

    fn ensure_plan(&mut self, key: Key) -> Result<()> {
        if !self.plans.contains_key(&key) {
            let plan = self.make_plan(key)?;
            self.plans.insert(key, plan);
        }
        Ok(())
    }

    fn make_plan(&self, key: Key) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let e4m3 = sys::cudaDataType_t::CUDA_R_8F_E4M3;
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        // SAFETY: descriptors are created here and owned by the plan (destroyed in Drop, or
        // here when no algorithm is found).
        unsafe {
            let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(lt_err("cublasLtMatmulDescCreate"))?;
            set(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32, "CUBLASLT_MATMUL_DESC_TRANSA")?; // CUBLAS_OP_T
            if fast_accum() {
                set(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8, "CUBLASLT_MATMUL_DESC_FAST_ACCUM")?;
            }
            if key.scaling == Scaling::OuterVec {
                let vec = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as u32;
                set(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &vec, "CUBLASLT_MATMUL_DESC_A_SCALE_MODE")?;
                set(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec, "CUBLASLT_MATMUL_DESC_B_SCALE_MODE")?;
            }
            if key.bias {
                let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
                set(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, "CUBLASLT_MATMUL_DESC_EPILOGUE")?;
                set(desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(bf16 as i32), "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE")?;
            }
            // A = Wq row-major [n, k] = column-major k × n (op T); B = Xq column-major k × t;
            // D = Y column-major n × t (row-major [t, n]).
            let a = lt::create_matrix_layout(e4m3, key.k as u64, key.n as u64, key.k as i64).map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            let b = lt::create_matrix_layout(e4m3, key.k as u64, key.t as u64, key.k as i64).map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            let d = lt::create_matrix_layout(bf16, key.n as u64, key.t as u64, key.n as i64).map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            let pref = lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
            let ws = WORKSPACE_BYTES as u64;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(lt_err("CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES"))?;
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
            lt::destroy_matmul_pref(pref).map_err(lt_err("cublasLtMatmulPreferenceDestroy"))?;
            let algos: Vec<_> = heur[..found.clamp(0, MAX_TUNE_CANDIDATES as i32) as usize]
                .iter()
                .filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|h| h.algo)
                .collect();
            if st != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || algos.is_empty() {
                for l in [a, b, d] {
                    let _ = lt::destroy_matrix_layout(l);
                }
                let _ = lt::destroy_matmul_desc(desc);
                return Err(no_algo_error(key, &format!("{st:?}")));
            }
            let untuned = if algos.len() > 1 { algos.clone() } else { Vec::new() };
            Ok(Plan { desc, a, b, d, algo: algos[0], untuned })
        }
    }

    /// `y[0..t] = sx[r] · sw[c] · (xq · wqᵀ)[r, c] (+ bias[c])`: device addresses of xq
    /// (`[t, k]` E4M3), wq (`[n, k]` E4M3), sx (`[t]` f32), sw (`[n]` f32), bias (`[n]` bf16)
    /// and y (`[t, n]` bf16). The caller checks every shape and the alignment (module doc).
    /// Errors with [`no_algorithm`] true where cuBLASLt has no outer-vector FP8 algorithm.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_raw(&mut self, gpu: &Gpu, t: usize, n: usize, k: usize, xq: u64, wq: u64, sx: u64, sw: u64, bias: Option<u64>, y: u64) -> Result<()> {
        let key = Key { t, n, k, bias: bias.is_some(), scaling: Scaling::OuterVec };
        self.matmul(gpu, key, Operands { xq, wq, scales: Some((sx, sw)), bias, y })
    }

    /// Whether a `[t, k] × [n, k]ᵀ` GEMM without a bias (outer-vector scaled, or plain) has a
    /// plan that has run eagerly (tuned): a later call of that shape will not find cuBLASLt
    /// without an algorithm.
    pub fn has_plan(&self, t: usize, n: usize, k: usize, scaled: bool) -> bool {
        let scaling = if scaled { Scaling::OuterVec } else { Scaling::Unscaled };
        self.plans.get(&Key { t, n, k, bias: false, scaling }).is_some_and(|p| p.untuned.is_empty())
    }

    /// `y[0..t] = bf16(xq · wqᵀ)`: the plain FP8 GEMM, no scales, no bias (addresses as
    /// [`Fp8Lt::matmul_raw`]). Errors with [`no_algorithm`] true where cuBLASLt has none.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_unscaled_raw(&mut self, gpu: &Gpu, t: usize, n: usize, k: usize, xq: u64, wq: u64, y: u64) -> Result<()> {
        let key = Key { t, n, k, bias: false, scaling: Scaling::Unscaled };
        self.matmul(gpu, key, Operands { xq, wq, scales: None, bias: None, y })
    }

    fn matmul(&mut self, gpu: &Gpu, key: Key, ops: Operands) -> Result<()> {
        if key.t == 0 {
            return Ok(());
        }
        self.ensure_plan(key)?;
        let cands = std::mem::take(&mut self.plans.get_mut(&key).expect("plan exists").untuned);
        if !cands.is_empty() {
            if capturing(&self.stream) {
                // Timing would synchronise the capture: tune at the next eager call.
                self.plans.get_mut(&key).expect("plan exists").untuned = cands;
            } else {
                let best = self.autotune(gpu, &self.plans[&key], &cands, &ops)?;
                self.plans.get_mut(&key).expect("plan exists").algo = best;
            }
        }
        let p = &self.plans[&key];
        if let Err(e) = self.launch(p, &p.algo, &ops) {
            // The heuristic offered an algorithm that the call then refuses: as no algorithm
            // (the plan is dropped; a later call of this shape plans again).
            if matches!(&e, Error::Driver { msg, .. } if msg.contains("CUBLAS_STATUS_NOT_SUPPORTED")) {
                if let Some(p) = self.plans.remove(&key) {
                    destroy(&p);
                }
                return Err(no_algo_error(key, &e.to_string()));
            }
            return Err(e);
        }
        gpu.after_launch("cublasLtMatmul (FP8)")
    }

    /// Times every candidate algorithm on the real operands (after one warm-up launch, the
    /// median of `TUNE_RUNS` launches, each with a cold L2: `gpu::cold`) and returns the
    /// fastest. Runs once per shape, at its first eager call (host syncs).
    fn autotune(&self, gpu: &Gpu, p: &Plan, cands: &[sys::cublasLtMatmulAlgo_t], ops: &Operands) -> Result<sys::cublasLtMatmulAlgo_t> {
        let mut timer = ColdTimer::new(gpu)?;
        let mut best = (f32::MAX, p.algo);
        for algo in cands {
            if self.launch(p, algo, ops).is_err() {
                continue; // an algorithm the heuristic offered but this shape refuses
            }
            let ms = timer.median_ms(gpu, TUNE_RUNS, || self.launch(p, algo, ops))?;
            if ms < best.0 {
                best = (ms, *algo);
            }
        }
        Ok(best.1)
    }

    fn launch(&self, p: &Plan, algo: &sys::cublasLtMatmulAlgo_t, ops: &Operands) -> Result<()> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let (ws, _g) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, &self.stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan's descriptors are alive (owned by self); the pointers come from live
        // device tensors whose shapes the caller checked.
        unsafe {
            if let Some((sx, sw)) = ops.scales {
                set(p.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw, "CUBLASLT_MATMUL_DESC_A_SCALE_POINTER")?;
                set(p.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx, "CUBLASLT_MATMUL_DESC_B_SCALE_POINTER")?;
            }
            if let Some(bp) = ops.bias {
                set(p.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, "CUBLASLT_MATMUL_DESC_BIAS_POINTER")?;
            }
            lt::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                ops.wq as *const c_void,
                p.a,
                ops.xq as *const c_void,
                p.b,
                ops.y as *const c_void,
                p.d,
                ops.y as *mut c_void,
                p.d,
                algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
            .map_err(lt_err("cublasLtMatmul (FP8)"))
        }
    }
}

impl Drop for Fp8Lt {
    fn drop(&mut self) {
        for p in self.plans.values() {
            destroy(p);
        }
        // SAFETY: the handle was created by this object and is destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
