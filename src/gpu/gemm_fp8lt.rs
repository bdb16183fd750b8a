//! W8A8 GEMM through cuBLASLt FP8: `Y[t, n] = (sx[r] · sw[c]) · Xq[t, k] · Wq[n, k]ᵀ (+ bias)`,
//! Xq and Wq E4M3, f32 accumulation (cuBLASLt's default, not fast-accumulate), bf16 output.
//! The per-row activation scales and per-output-channel weight scales go to cuBLASLt as
//! outer-vector scales (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F` on A and B, cuBLAS ≥
//! 12.9), so the scaling happens in the GEMM's epilogue with no extra pass. As in
//! `gpu::gemm`, row-major Y is column-major Yᵀ = Wq·Xqᵀ (TN, the layout FP8 requires), and
//! the descriptor, layouts and algorithm are made once per shape (the heuristic's first
//! algorithm; no autotuning, so a first call inside a graph capture never synchronises).
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::CudaStream;

use super::{drv, Gpu};
use crate::error::{Error, Result};

const WORKSPACE_BYTES: usize = 32 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    t: usize,
    n: usize,
    k: usize,
    bias: bool,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
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

/// Sets a descriptor attribute from a plain value.
///
/// # Safety
/// `desc` must be a live descriptor and `T` the attribute's C type.
unsafe fn set<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T, what: &'static str) -> Result<()> {
    lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()).map_err(lt_err(what))
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
        // SAFETY: descriptors are created here and owned by the plan (destroyed in Drop).
        unsafe {
            let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(lt_err("cublasLtMatmulDescCreate"))?;
            set(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32, "CUBLASLT_MATMUL_DESC_TRANSA")?; // CUBLAS_OP_T
            let vec = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as u32;
            set(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &vec, "CUBLASLT_MATMUL_DESC_A_SCALE_MODE")?;
            set(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec, "CUBLASLT_MATMUL_DESC_B_SCALE_MODE")?;
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
            let mut heur: sys::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let mut found = 0i32;
            let st = sys::cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, d, d, pref, 1, &mut heur, &mut found);
            lt::destroy_matmul_pref(pref).map_err(lt_err("cublasLtMatmulPreferenceDestroy"))?;
            if st != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || found <= 0 || heur.state != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                for l in [a, b, d] {
                    let _ = lt::destroy_matrix_layout(l);
                }
                let _ = lt::destroy_matmul_desc(desc);
                return Err(Error::Driver {
                    op: "cublasLtMatmulAlgoGetHeuristic (FP8, outer-vector scales)".into(),
                    msg: format!("no algorithm for [{}x{}]·[{}x{}]ᵀ ({st:?}); this cuBLASLt may predate per-channel FP8 scaling (12.9)", key.t, key.k, key.n, key.k),
                });
            }
            Ok(Plan { desc, a, b, d, algo: heur.algo })
        }
    }

    /// `y[0..t] = sx[r] · sw[c] · (xq · wqᵀ)[r, c] (+ bias[c])`: device addresses of xq
    /// (`[t, k]` E4M3), wq (`[n, k]` E4M3), sx (`[t]` f32), sw (`[n]` f32), bias (`[n]` bf16)
    /// and y (`[t, n]` bf16). The caller checks every shape.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_raw(&mut self, gpu: &Gpu, t: usize, n: usize, k: usize, xq: u64, wq: u64, sx: u64, sw: u64, bias: Option<u64>, y: u64) -> Result<()> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        if t == 0 {
            return Ok(());
        }
        let key = Key { t, n, k, bias: bias.is_some() };
        self.ensure_plan(key)?;
        let (ws, _g) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, &self.stream);
        let (handle, cu_stream) = (self.handle, self.stream.cu_stream());
        let p = &self.plans[&key];
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan's descriptors are alive (owned by self); the pointers come from live
        // device tensors whose shapes the caller checked.
        unsafe {
            set(p.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw, "CUBLASLT_MATMUL_DESC_A_SCALE_POINTER")?;
            set(p.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx, "CUBLASLT_MATMUL_DESC_B_SCALE_POINTER")?;
            if let Some(bp) = bias {
                set(p.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, "CUBLASLT_MATMUL_DESC_BIAS_POINTER")?;
            }
            lt::matmul(
                handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                wq as *const c_void,
                p.a,
                xq as *const c_void,
                p.b,
                y as *const c_void,
                p.d,
                y as *mut c_void,
                p.d,
                &p.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                cu_stream as sys::cudaStream_t,
            )
            .map_err(lt_err("cublasLtMatmul (FP8)"))?;
        }
        gpu.after_launch("cublasLtMatmul (FP8)")
    }
}

impl Drop for Fp8Lt {
    fn drop(&mut self) {
        // SAFETY: every descriptor and the handle were created by this object and are
        // destroyed once; errors at teardown are ignored.
        unsafe {
            for p in self.plans.values() {
                for l in [p.a, p.b, p.d] {
                    let _ = lt::destroy_matrix_layout(l);
                }
                let _ = lt::destroy_matmul_desc(p.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
