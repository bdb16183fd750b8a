//! FP8 (E4M3) weights on the device and the W8A16 GEMM of kernels/gemm_fp8.cu:
//! `y[0..t] = x[0..t] · dequant(W)ᵀ (+ bias)`, x bf16, W one byte per weight with f32 scales
//! (`quant::ScaleLayout`: per output channel, or per 128×128 block), f32 accumulation.
//!
//! The kernel is the skinny GEMM's design (`ops::gemm`: 128-row slabs, cluster split-K over
//! 128-column stages) for t ≤ 64 rows. Larger row counts (a full-canvas refresh step) run it
//! on successive 64-row chunks, reading W once per chunk: correct, but ⌈t/64⌉ weight reads;
//! [`linear_any`] sends them to the W8A8 paths (`ops::gemm_w8a8`) where one applies.
//! [`Fp8Weight::quantize`] quantises a device bf16 weight in place of the host path (for
//! weights synthesised on the GPU), with the same scales and codes as `quant::Fp8Matrix`.
use cudarc::driver::PushKernelArg;
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::gemm::{GemmOut, OutType};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{drv, DTensor, Gpu};
use crate::ops::gemm::{skinny_plan, SkinnyConfig, SKINNY_ROW_LIMIT};
use crate::ops::gemm_w8a8::W8a8;
use crate::quant::{Fp8Matrix, ScaleLayout, BLOCK};

const OP: &str = "gemm_fp8";
/// k columns per pipeline stage (`BK`); split boundaries are multiples of it.
const STAGE_K: usize = 128;
const THREADS: u32 = 256;

/// A quantised `[n, k]` weight on the device: E4M3 codes and f32 scales (layout in
/// `quant`'s module doc).
pub struct Fp8Weight {
    /// `[n, k]` E4M3 codes.
    pub q: DTensor<u8>,
    /// `[n]` (channel) or `[ceil(n/128), ceil(k/128)]` (block).
    pub scales: DTensor<f32>,
    pub layout: ScaleLayout,
}

impl Fp8Weight {
    pub fn n(&self) -> usize {
        self.q.dims[0]
    }
    pub fn k(&self) -> usize {
        self.q.dims[1]
    }
    /// Device bytes (codes and scales).
    pub fn bytes(&self) -> usize {
        self.q.bytes() + self.scales.bytes()
    }

    /// Uploads a host-quantised matrix.
    pub fn upload(gpu: &Gpu, m: &Fp8Matrix) -> Result<Self> {
        let sdims = scale_dims(m.layout, m.n, m.k);
        Ok(Fp8Weight { q: gpu.upload(&m.q, &[m.n, m.k])?, scales: gpu.upload(&m.scales, &sdims)?, layout: m.layout })
    }

    /// Downloads codes and scales (synchronising).
    pub fn to_host(&self, gpu: &Gpu) -> Result<Fp8Matrix> {
        Fp8Matrix::from_parts("device weight", self.n(), self.k(), self.q.to_host(gpu)?, self.scales.to_host(gpu)?, self.layout)
    }

    /// Quantises a bf16 device weight `[n, k]` on the device (`quantize_fp8_bf16`): the same
    /// scales and codes as `Fp8Matrix::quantize_bf16` for finite inputs. Non-finite values are
    /// not checked here: use the host path for checkpoints.
    pub fn quantize(gpu: &Gpu, w: &DTensor<bf16>, layout: ScaleLayout) -> Result<Self> {
        if w.dims.len() != 2 || w.dims[0] == 0 || w.dims[1] == 0 {
            return Err(Error::shape("quantize_fp8", "w", &[0, 0], &w.dims));
        }
        let (n, k) = (w.dims[0], w.dims[1]);
        if n > i32::MAX as usize || k > i32::MAX as usize {
            return Err(Error::bad_input(format!("quantize_fp8: tensor `w` {:?} is too large", w.dims)));
        }
        let mut out = Fp8Weight { q: gpu.alloc(&[n, k])?, scales: gpu.alloc(&scale_dims(layout, n, k))?, layout };
        let params = QuantParams {
            w: w.ptr(gpu),
            q: out.q.ptr_mut(gpu),
            scales: out.scales.ptr_mut(gpu),
            n: n as i32,
            k: k as i32,
            block_scales: (layout == ScaleLayout::Block128) as i32,
            pad: 0,
        };
        let blocks = layout.count(n, k) as u32;
        let f = gpu.func("gemm_fp8", "quantize_fp8_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&params);
        let cfg = cudarc::driver::LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: params mirror QuantParams; w and q are [n, k], scales holds layout.count(n, k)
        // floats, one block per scale.
        unsafe { b.launch(cfg) }.map_err(drv("quantize_fp8_bf16"))?;
        gpu.after_launch("quantize_fp8_bf16")?;
        Ok(out)
    }
}

/// Device dims of the scales of an `[n, k]` weight.
pub fn scale_dims(layout: ScaleLayout, n: usize, k: usize) -> Vec<usize> {
    match layout {
        ScaleLayout::Channel => vec![n],
        ScaleLayout::Block128 => vec![n.div_ceil(BLOCK), k.div_ceil(BLOCK)],
    }
}

/// Encodes `x` to E4M3 on the device with `__nv_cvt_float_to_fp8` (satfinite): the reference
/// `quant::e4m3_encode` must match it bit for bit (tests/gpu_fp8/gemm.rs).
pub fn encode_e4m3(gpu: &Gpu, x: &DTensor<f32>, q: &mut DTensor<u8>) -> Result<()> {
    let n = x.len();
    if q.len() != n {
        return Err(Error::shape("encode_e4m3", "q", &x.dims, &q.dims));
    }
    if n == 0 {
        return Ok(());
    }
    let n_i = i32::try_from(n).map_err(|_| Error::bad_input("encode_e4m3: too many elements"))?;
    let (xp, qp) = (x.ptr(gpu), q.ptr_mut(gpu));
    let f = gpu.func("gemm_fp8", "encode_e4m3_f32")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&xp); // const float*
    b.arg(&qp); // uint8_t*
    b.arg(&n_i); // int
    let cfg = cudarc::driver::LaunchConfig { grid_dim: ((n as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: x and q both hold n elements; the kernel guards i < n.
    unsafe { b.launch(cfg) }.map_err(drv("encode_e4m3_f32"))?;
    gpu.after_launch("encode_e4m3_f32")
}

/// Mirrors `struct QuantParams` in kernels/gemm_fp8.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct QuantParams {
    w: u64,            // const bf16* [n, k]
    q: u64,            // uint8_t* [n, k]
    scales: u64,       // float*
    n: i32,            // int
    k: i32,            // int
    block_scales: i32, // int
    pad: i32,          // int
}
// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for QuantParams {}

/// Mirrors `struct Fp8SkinnyParams` in kernels/fp8.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Fp8SkinnyParams {
    x: u64,            // const bf16* [>= t, k]
    w: u64,            // const uint8_t* [n, k]
    scales: u64,       // const float*
    bias: u64,         // const bf16* [n] or nullptr
    y: u64,            // void* [>= t, n] (swiglu: n/2)
    t: i32,            // int
    n: i32,            // int
    k: i32,            // int
    k_split: i32,      // int
    out_f32: i32,      // int
    block_scales: i32, // int
}
// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for Fp8SkinnyParams {}

/// Which W8A16 kernel multiplies. Both have the same contract, tiling and epilogue and give
/// the same sums up to f32 summation order; they differ in the tensor-core instruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fp8Kernel {
    /// `DEMASK_FP8_KERNEL` if set, else `Mma`. (`Wgmma` is written to be the sm_90 default but
    /// has not run on a GPU yet; it becomes the default once its parity tests and timings do.)
    #[default]
    Auto,
    /// kernels/gemm_fp8_wgmma.cu: one warpgroup MMA (`wgmma.mma_async`, W from registers, X from
    /// shared memory) per 64 W rows and 16 columns; sm_90a only. Opt-in, not yet GPU-tested.
    Wgmma,
    /// kernels/gemm_fp8.cu: `mma.sync` m16n8k16 per warp (sm_80+).
    Mma,
}

impl Fp8Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Fp8Kernel::Auto => "auto",
            Fp8Kernel::Wgmma => "wgmma",
            Fp8Kernel::Mma => "mma",
        }
    }

    /// The kernel that runs on `gpu`: `Auto` resolved, `Wgmma` refused off Hopper.
    pub fn resolve(self, gpu: &Gpu) -> Result<Fp8Kernel> {
        let k = match self {
            Fp8Kernel::Auto => env_kernel()?.unwrap_or(Fp8Kernel::Mma),
            k => k,
        };
        if k == Fp8Kernel::Wgmma && gpu.cc_major != 9 {
            return Err(Error::bad_input(format!(
                "{OP}: the `wgmma` W8A16 kernel needs an sm_90 GPU (Hopper); {} is compute capability {}.x \
                 (use DEMASK_FP8_KERNEL=mma or auto)",
                gpu.name, gpu.cc_major
            )));
        }
        Ok(k)
    }
}

impl std::str::FromStr for Fp8Kernel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(Fp8Kernel::Auto),
            "wgmma" => Ok(Fp8Kernel::Wgmma),
            "mma" => Ok(Fp8Kernel::Mma),
            other => Err(Error::bad_input(format!("unknown FP8 kernel `{other}` (expected auto, wgmma or mma)"))),
        }
    }
}

/// `DEMASK_FP8_KERNEL`, parsed once (unset or `auto`: `None`).
fn env_kernel() -> Result<Option<Fp8Kernel>> {
    static ENV: std::sync::OnceLock<std::result::Result<Option<Fp8Kernel>, String>> = std::sync::OnceLock::new();
    let v = ENV.get_or_init(|| match std::env::var("DEMASK_FP8_KERNEL") {
        Ok(v) => match v.parse::<Fp8Kernel>() {
            Ok(Fp8Kernel::Auto) => Ok(None),
            Ok(k) => Ok(Some(k)),
            Err(e) => Err(format!("DEMASK_FP8_KERNEL: {e}")),
        },
        Err(_) => Ok(None),
    });
    v.clone().map_err(Error::bad_input)
}

/// Launch-shape overrides of the W8A16 kernel for tests and sweeps; `Default` is what
/// [`linear_fp8`] uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fp8Config {
    /// Number of k splits (`None`: from the SM count, as `ops::gemm::skinny_plan`).
    pub splits: Option<usize>,
    pub kernel: Fp8Kernel,
}

/// (module, entry point, dynamic shared memory) for `t ≤ 64` rows. Both kernels stage
/// STAGES × (128·128 W bytes + 8·NT·128 bf16 X) (`Tile8<NT>` / `TileW<NT>`).
fn kernel_for(t: usize, swiglu: bool, kernel: Fp8Kernel) -> (&'static str, &'static str, u32) {
    use crate::ops::gemm::{by_row_tiles, row_tiles};
    let nt = row_tiles(t);
    let stages = match nt {
        1 | 2 => 5,
        4 => 4,
        _ => 3,
    };
    let smem = (stages * (128 * STAGE_K + 8 * nt * STAGE_K * 2)) as u32;
    let (module, names) = match (kernel == Fp8Kernel::Wgmma, swiglu) {
        (true, false) => ("gemm_fp8_wgmma", ["gemm_fp8_wgmma8_bf16", "gemm_fp8_wgmma16_bf16", "gemm_fp8_wgmma32_bf16", "gemm_fp8_wgmma64_bf16"]),
        (true, true) => (
            "gemm_fp8_wgmma",
            ["gemm_fp8_wgmma8_swiglu_bf16", "gemm_fp8_wgmma16_swiglu_bf16", "gemm_fp8_wgmma32_swiglu_bf16", "gemm_fp8_wgmma64_swiglu_bf16"],
        ),
        (false, false) => ("gemm_fp8", ["gemm_fp8_skinny8_bf16", "gemm_fp8_skinny16_bf16", "gemm_fp8_skinny32_bf16", "gemm_fp8_skinny64_bf16"]),
        (false, true) => (
            "gemm_fp8",
            ["gemm_fp8_skinny8_swiglu_bf16", "gemm_fp8_skinny16_swiglu_bf16", "gemm_fp8_skinny32_swiglu_bf16", "gemm_fp8_skinny64_swiglu_bf16"],
        ),
    };
    (module, by_row_tiles(nt, names), smem)
}

/// `y[0..t] = x[0..t] · dequant(w)ᵀ (+ bias)`: `x` at least `[t, k]` bf16, `y` at least
/// `[t, n]` (bf16 or f32), `bias` `[n]`; rows of `y` from t on are not written. Any t (see the
/// module doc for t > 64).
pub fn linear_fp8<Y: GemmOut>(
    gpu: &Gpu,
    t: usize,
    x: &DTensor<bf16>,
    w: &Fp8Weight,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
) -> Result<()> {
    fp8_impl(gpu, &Fp8Config::default(), t, x, false, w, bias, y)
}

/// The gate|up projection with SwiGLU: `act[0..t] = SwiGLU(x[0..t] · dequant(w_gate_up)ᵀ)`,
/// `w_gate_up` `[2·ffn, k]`, `act` at least `[t, ffn]` bf16; bit-identical to [`linear_fp8`]
/// into bf16 followed by `ops::swiglu`.
pub fn linear_fp8_swiglu(gpu: &Gpu, t: usize, x: &DTensor<bf16>, w_gate_up: &Fp8Weight, act: &mut DTensor<bf16>) -> Result<()> {
    fp8_impl(gpu, &Fp8Config::default(), t, x, true, w_gate_up, None, act)
}

/// [`linear_fp8_swiglu`] with an explicit kernel (`cfg.splits` is ignored: never split-K).
pub fn skinny_fp8_swiglu(
    gpu: &Gpu,
    cfg: &Fp8Config,
    t: usize,
    x: &DTensor<bf16>,
    w_gate_up: &Fp8Weight,
    act: &mut DTensor<bf16>,
) -> Result<()> {
    fp8_impl(gpu, cfg, t, x, true, w_gate_up, None, act)
}

/// [`linear_fp8`] with an explicit split count and kernel, for tests and tuning.
pub fn skinny_fp8<Y: GemmOut>(
    gpu: &Gpu,
    cfg: &Fp8Config,
    t: usize,
    x: &DTensor<bf16>,
    w: &Fp8Weight,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
) -> Result<()> {
    fp8_impl(gpu, cfg, t, x, false, w, bias, y)
}

#[allow(clippy::too_many_arguments)]
fn fp8_impl<Y: GemmOut>(
    gpu: &Gpu,
    cfg: &Fp8Config,
    t: usize,
    x: &DTensor<bf16>,
    swiglu: bool,
    w: &Fp8Weight,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
) -> Result<()> {
    if w.q.dims.len() != 2 {
        return Err(Error::shape(OP, "w", &[0, 0], &w.q.dims));
    }
    let (n, k) = (w.q.dims[0], w.q.dims[1]);
    if n == 0 || k == 0 || !k.is_multiple_of(16) || n > i32::MAX as usize || k > i32::MAX as usize {
        return Err(Error::bad_input(format!(
            "{OP}: tensor `w` {:?}: needs n > 0 and k a nonzero multiple of 16 (below 2^31)",
            w.q.dims
        )));
    }
    let sdims = scale_dims(w.layout, n, k);
    if w.scales.dims != sdims {
        return Err(Error::shape(OP, "scales", &sdims, &w.scales.dims));
    }
    x.check_rows(OP, "x", t, k)?;
    let y_cols = if swiglu { n / 2 } else { n };
    if swiglu {
        let half_ok = n.is_multiple_of(2) && (w.layout == ScaleLayout::Channel || (n / 2).is_multiple_of(64));
        if !half_ok || bias.is_some() || Y::OUT != OutType::Bf16 {
            return Err(Error::bad_input(format!(
                "{OP}: SwiGLU epilogue needs an even row count of `w` {:?} (ffn % 64 == 0 with block scales), \
                 no bias and bf16 output",
                w.q.dims
            )));
        }
        y.check_rows(OP, "act", t, y_cols)?;
    } else {
        y.check_rows(OP, "y", t, n)?;
    }
    if let Some(b) = bias {
        if b.len() != n {
            return Err(Error::shape(OP, "bias", &[n], &b.dims));
        }
    }
    let kernel = cfg.kernel.resolve(gpu)?;
    let clusters = crate::ops::attention::split_kv_supported(gpu)?;
    let cfg = SkinnyConfig { splits: if swiglu { Some(1) } else { cfg.splits }, k128: true };
    let plan = skinny_plan(&cfg, gpu.sm_count, clusters, n, k);
    debug_assert!(plan.k_split.is_multiple_of(STAGE_K));
    let (xp, yp) = (x.ptr(gpu), y.ptr_mut(gpu));
    let y_elem = std::mem::size_of::<Y>() as u64;
    // Chunks of at most 64 rows (one launch for t ≤ 64).
    for r0 in (0..t).step_by(SKINNY_ROW_LIMIT) {
        let rows = (t - r0).min(SKINNY_ROW_LIMIT);
        let params = Fp8SkinnyParams {
            x: xp + (r0 * k * 2) as u64,
            w: w.q.ptr(gpu),
            scales: w.scales.ptr(gpu),
            bias: bias.map_or(0, |b| b.ptr(gpu)),
            y: yp + (r0 * y_cols) as u64 * y_elem,
            t: rows as i32,
            n: n as i32,
            k: k as i32,
            k_split: plan.k_split as i32,
            out_f32: (Y::OUT == OutType::F32) as i32,
            block_scales: (w.layout == ScaleLayout::Block128) as i32,
        };
        let (module, sym, smem) = kernel_for(rows, swiglu, kernel);
        let lc = LaunchEx {
            grid: (plan.blocks_n as u32, plan.splits as u32, 1),
            block: (THREADS, 1, 1),
            smem,
            cluster: (plan.splits > 1).then_some((1, plan.splits as u32, 1)),
            pdl: true,
        };
        // SAFETY: params mirror Fp8SkinnyParams; x holds >= t rows of k and y >= t rows of
        // y_cols (checked), so the chunk's rows [r0, r0 + rows) are in bounds; w is [n, k] with
        // k % 16 == 0 (every 16-byte access of a row in bounds), scales match the layout,
        // bias is [n]; clusters only where supported.
        unsafe { launch_ex(gpu, module, sym, lc, &params)? };
    }
    Ok(())
}

/// A linear layer's weight on the device in either format; [`linear_any`] and
/// [`linear_swiglu_any`] run the matching GEMM.
pub enum LinearWeight {
    Bf16(DTensor<bf16>),
    Fp8(Fp8Weight),
}

impl LinearWeight {
    /// A bf16 device weight as `format` (FP8: quantised on the device, the bf16 copy dropped).
    pub fn from_bf16(gpu: &Gpu, w: DTensor<bf16>, format: crate::quant::WeightFormat) -> Result<Self> {
        match format {
            crate::quant::WeightFormat::Bf16 => Ok(LinearWeight::Bf16(w)),
            crate::quant::WeightFormat::Fp8(layout) => Ok(LinearWeight::Fp8(Fp8Weight::quantize(gpu, &w, layout)?)),
        }
    }

    /// A host bf16 weight `[n, k]` named `name` as `format` (FP8: quantised on the host, so a
    /// NaN or ±∞ weight is refused with an error naming the tensor).
    pub fn upload(gpu: &Gpu, name: &str, w: &[bf16], dims: [usize; 2], format: crate::quant::WeightFormat) -> Result<Self> {
        match format {
            crate::quant::WeightFormat::Bf16 => Ok(LinearWeight::Bf16(gpu.upload(w, &dims)?)),
            crate::quant::WeightFormat::Fp8(layout) => {
                let m = Fp8Matrix::quantize_bf16(name, w, dims[0], dims[1], layout)?;
                Ok(LinearWeight::Fp8(Fp8Weight::upload(gpu, &m)?))
            }
        }
    }

    /// `[n, k]` (the codes' dims for FP8).
    pub fn dims(&self) -> &[usize] {
        match self {
            LinearWeight::Bf16(w) => &w.dims,
            LinearWeight::Fp8(w) => &w.q.dims,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            LinearWeight::Bf16(w) => w.bytes(),
            LinearWeight::Fp8(w) => w.bytes(),
        }
    }

    /// (device address, element count) of each buffer, for graph-binding fingerprints.
    pub fn fingerprint(&self, gpu: &Gpu) -> [u64; 4] {
        match self {
            LinearWeight::Bf16(w) => [w.ptr(gpu), w.len() as u64, 0, 0],
            LinearWeight::Fp8(w) => [w.q.ptr(gpu), w.q.len() as u64, w.scales.ptr(gpu), w.scales.len() as u64],
        }
    }

    /// (device address, bytes) of the matrix a GEMM streams: the bf16 weight, or the E4M3
    /// codes (an L2 prefetch's region, `ops::prefetch`).
    pub fn stream_span(&self, gpu: &Gpu) -> (u64, usize) {
        match self {
            LinearWeight::Bf16(w) => (w.ptr(gpu), w.bytes()),
            LinearWeight::Fp8(w) => (w.q.ptr(gpu), w.q.bytes()),
        }
    }

    /// Whether the gate|up projection of `t` rows runs with SwiGLU fused into its epilogue
    /// (always for FP8; for bf16 where `variant` resolves to the skinny kernel).
    pub fn fuses_swiglu(&self, variant: crate::ops::gemm::GemmVariant, t: usize, k: usize) -> bool {
        match self {
            LinearWeight::Bf16(_) => variant.resolve(t, k) == crate::ops::gemm::GemmVariant::Skinny,
            LinearWeight::Fp8(_) => true,
        }
    }
}

/// `ops::gemm::linear` (bf16, by `variant`), or for FP8 weights the W8A16 kernel below
/// `w8a8.min_rows()` rows (default 17) and from there the W8A8 path (`w8a8`, where it takes
/// the shape: `outer-vec` or `split-scale`, see `ops::gemm_w8a8`; else the W8A16 kernel, in
/// 64-row chunks above 64 rows).
#[allow(clippy::too_many_arguments)]
pub fn linear_any<Y: GemmOut>(
    gpu: &Gpu,
    variant: crate::ops::gemm::GemmVariant,
    t: usize,
    x: &DTensor<bf16>,
    w: &LinearWeight,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<Y>,
    w8a8: Option<&mut W8a8>,
) -> Result<()> {
    match w {
        LinearWeight::Bf16(w) => crate::ops::gemm::linear(gpu, variant, t, x, w, bias, y),
        LinearWeight::Fp8(w) => {
            if let Some(m) = w8a8 {
                if t >= m.min_rows() && m.takes::<Y>(t, w, bias.is_some()) {
                    if m.linear(gpu, t, x, w, bias, y)?.is_some() {
                        return Ok(());
                    }
                } else {
                    m.note_w8a16();
                }
            }
            linear_fp8(gpu, t, x, w, bias, y)
        }
    }
}

/// [`linear_any`] for an output `y` that a residual add reads next and nothing before it:
/// where the GEMM takes the W8A8 `split-scale` path, its scale epilogue is left to that add
/// (`W8a8::linear_deferred`; the caller passes `W8a8::take_deferred(y)` to
/// `ops::norm::add_rmsnorm_deferred`). Every other path finishes `y` here.
#[allow(clippy::too_many_arguments)]
pub fn linear_any_deferred(
    gpu: &Gpu,
    variant: crate::ops::gemm::GemmVariant,
    t: usize,
    x: &DTensor<bf16>,
    w: &LinearWeight,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<bf16>,
    w8a8: Option<&mut W8a8>,
) -> Result<()> {
    linear_any_deferred_to(gpu, variant, t, x, w, bias, y, w8a8, crate::ops::norm::MAX_SCALED_HIDDEN)
}

/// [`linear_any_deferred`] for a consumer other than the residual add that takes outputs of
/// up to `max_n` columns (`W8a8::linear_deferred_to`): the QKV projection, whose epilogue
/// `ops::rope::rope_kv_store_scaled` fuses.
#[allow(clippy::too_many_arguments)]
pub fn linear_any_deferred_to(
    gpu: &Gpu,
    variant: crate::ops::gemm::GemmVariant,
    t: usize,
    x: &DTensor<bf16>,
    w: &LinearWeight,
    bias: Option<&DTensor<bf16>>,
    y: &mut DTensor<bf16>,
    w8a8: Option<&mut W8a8>,
    max_n: usize,
) -> Result<()> {
    match w {
        LinearWeight::Fp8(fw) => match w8a8 {
            Some(m) if t >= m.min_rows() && m.takes::<bf16>(t, fw, bias.is_some()) => {
                if m.linear_deferred_to(gpu, t, x, fw, bias, y, max_n)?.is_some() {
                    return Ok(());
                }
                linear_fp8(gpu, t, x, fw, bias, y)
            }
            m => linear_any(gpu, variant, t, x, w, bias, y, m),
        },
        LinearWeight::Bf16(_) => linear_any(gpu, variant, t, x, w, bias, y, w8a8),
    }
}

/// `ops::gemm::linear_swiglu` (bf16); for FP8 the fused W8A16 kernel, or from
/// `w8a8.min_rows()` rows (default 17) `W8a8::linear_swiglu` where `w8a8` takes the shape
/// (the GEMM into `gu`, then `ops::swiglu` or, on the `split-scale` path, the fused scale +
/// SwiGLU epilogue into `act`). `down`, if given, must be the next GEMM on `w8a8` and read
/// `act`: the epilogue then quantises `act` for it (`W8a8::linear_swiglu_for`) and, once the
/// down GEMM's plan has run, leaves `act` itself unwritten.
#[allow(clippy::too_many_arguments)]
pub fn linear_swiglu_any(
    gpu: &Gpu,
    variant: crate::ops::gemm::GemmVariant,
    t: usize,
    x: &DTensor<bf16>,
    w_gate_up: &LinearWeight,
    gu: &mut DTensor<bf16>,
    act: &mut DTensor<bf16>,
    w8a8: Option<&mut W8a8>,
    down: Option<&LinearWeight>,
) -> Result<()> {
    match w_gate_up {
        LinearWeight::Bf16(w) => crate::ops::gemm::linear_swiglu(gpu, variant, t, x, w, gu, act),
        LinearWeight::Fp8(w) => {
            if let Some(m) = w8a8 {
                if t >= m.min_rows() && m.takes_swiglu(t, w) {
                    let down = match down {
                        Some(LinearWeight::Fp8(d)) => Some(d),
                        _ => None,
                    };
                    if m.linear_swiglu_for(gpu, t, x, w, gu, act, down)?.is_some() {
                        return Ok(());
                    }
                } else {
                    m.note_w8a16();
                }
            }
            linear_fp8_swiglu(gpu, t, x, w, act)
        }
    }
}

#[cfg(test)]
#[path = "gemm_fp8_tests.rs"]
mod tests;
