//! FP8 expert weights of a Mixture-of-Experts layer and their grouped GEMMs
//! (kernels/moe_gemm_fp8.cu), on the routing of `ops::moe` (same workspace, same combine).
//!
//! [`Fp8Experts`] holds an `[E, n, k]` expert weight as E4M3 codes with one f32 scale per
//! output channel of each expert (`[E, n]`, `w[e, r, :] ≈ q · s[e, r]`, `quant`'s `fp8`
//! layout): exactly `Fp8Matrix` channel quantisation of each expert's `[n, k]` matrix, which is
//! also the channel quantisation of the `[E·n, k]` stack. 128×128 block scales are not offered
//! for experts (refused by name). [`ExpertWeight`] is either format; [`moe_gate_up_swiglu_any`]
//! and [`moe_down_combine_any`] run the matching kernels.
//!
//! Numerics (the CPU reference is `cpu::moe_fp8::expert_ffn_fp8`): codes dequantised exactly
//! in registers, f32 accumulation of x · q, the channel scale on the f32 sum, then the bf16
//! kernels' roundings (gate|up: g and u rounded to bf16, silu rounded, times u, rounded; down:
//! f32 per slot, summed by `moe_combine_bf16`).
use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};
use crate::ops::gemm_fp8::Fp8Weight;
use crate::ops::moe::{self, Combine, MoeGemmVariant, MoeWorkspace};
use crate::quant::{quantize_experts_bf16, ScaleLayout, WeightFormat};

const GEMM_THREADS: u32 = 256; // THREADS in kernels/fp8_tile.cuh
const REF_THREADS: u32 = 128; // REF_THREADS in moe_gemm_fp8.cu
/// W rows per grouped block (`BN`); the SwiGLU kernels pair 64 gate with 64 up rows.
const BLOCK_ROWS: usize = 128;
/// k columns (bytes of W) per pipeline stage (`BK`).
const STAGE_K: usize = 128;

/// An `[E, n, k]` expert weight in E4M3 with per-expert channel scales `[E, n]`.
pub struct Fp8Experts {
    /// `[E, n, k]` E4M3 codes.
    pub q: DTensor<u8>,
    /// `[E, n]` dequantisation multipliers.
    pub scales: DTensor<f32>,
}

impl Fp8Experts {
    /// `[E, n, k]`.
    pub fn dims(&self) -> [usize; 3] {
        [self.q.dims[0], self.q.dims[1], self.q.dims[2]]
    }

    /// Device bytes (codes and scales).
    pub fn bytes(&self) -> usize {
        self.q.bytes() + self.scales.bytes()
    }

    /// Quantises a host bf16 expert weight `[E, n, k]` (named `name` in errors) expert by
    /// expert on the host (`Fp8Matrix::quantize_bf16`, channel scales; a NaN or ±∞ weight is
    /// refused naming the tensor, the expert and the element) and uploads it.
    pub fn upload(gpu: &Gpu, name: &str, w: &[bf16], dims: [usize; 3]) -> Result<Self> {
        let m = quantize_experts_bf16(name, w, dims)?;
        Self::from_host(gpu, dims, &m.0, &m.1)
    }

    /// Uploads codes `[E, n, k]` and scales `[E, n]` made on the host.
    pub fn from_host(gpu: &Gpu, dims: [usize; 3], q: &[u8], scales: &[f32]) -> Result<Self> {
        let [e, n, k] = dims;
        if q.len() != e * n * k || scales.len() != e * n {
            return Err(Error::shape("Fp8Experts", "codes and scales", &[e * n * k, e * n], &[q.len(), scales.len()]));
        }
        Ok(Fp8Experts { q: gpu.upload(q, &[e, n, k])?, scales: gpu.upload(scales, &[e, n])? })
    }

    /// Quantises a device bf16 expert weight `[E, n, k]` on the device (`quantize_fp8_bf16`
    /// on its `[E·n, k]` view: per-expert channel scales, the same codes and scales as
    /// [`Fp8Experts::upload`] for finite inputs); the bf16 tensor is consumed.
    pub fn quantize(gpu: &Gpu, mut w: DTensor<bf16>) -> Result<Self> {
        let [e, n, k] = match w.dims[..] {
            [e, n, k] if e > 0 && n > 0 && k > 0 => [e, n, k],
            _ => return Err(Error::shape("quantize_fp8_experts", "w", &[0, 0, 0], &w.dims)),
        };
        w.dims = vec![e * n, k];
        let Fp8Weight { mut q, mut scales, .. } = Fp8Weight::quantize(gpu, &w, ScaleLayout::Channel)?;
        q.dims = vec![e, n, k];
        scales.dims = vec![e, n];
        Ok(Fp8Experts { q, scales })
    }

    /// Downloads codes and scales (synchronising).
    pub fn to_host(&self, gpu: &Gpu) -> Result<(Vec<u8>, Vec<f32>)> {
        Ok((self.q.to_host(gpu)?, self.scales.to_host(gpu)?))
    }
}

/// An expert weight stack on the device in either format.
pub enum ExpertWeight {
    Bf16(DTensor<bf16>),
    Fp8(Fp8Experts),
}

impl ExpertWeight {
    /// A host bf16 expert stack `[E, n, k]` named `name` as `format` (FP8: channel scales,
    /// quantised on the host; block scales refused by name).
    pub fn upload(gpu: &Gpu, name: &str, w: &[bf16], dims: [usize; 3], format: WeightFormat) -> Result<Self> {
        match format {
            WeightFormat::Bf16 => Ok(ExpertWeight::Bf16(gpu.upload(w, &dims)?)),
            WeightFormat::Fp8(ScaleLayout::Channel) => Ok(ExpertWeight::Fp8(Fp8Experts::upload(gpu, name, w, dims)?)),
            WeightFormat::Fp8(ScaleLayout::Block128) => Err(block_refusal(name)),
        }
    }

    /// A device bf16 expert stack as `format` (FP8: quantised on the device, the bf16 copy
    /// dropped; block scales refused).
    pub fn from_bf16(gpu: &Gpu, name: &str, w: DTensor<bf16>, format: WeightFormat) -> Result<Self> {
        match format {
            WeightFormat::Bf16 => Ok(ExpertWeight::Bf16(w)),
            WeightFormat::Fp8(ScaleLayout::Channel) => Ok(ExpertWeight::Fp8(Fp8Experts::quantize(gpu, w)?)),
            WeightFormat::Fp8(ScaleLayout::Block128) => Err(block_refusal(name)),
        }
    }

    /// `[E, n, k]` (the codes' dims for FP8).
    pub fn dims(&self) -> &[usize] {
        match self {
            ExpertWeight::Bf16(w) => &w.dims,
            ExpertWeight::Fp8(w) => &w.q.dims,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            ExpertWeight::Bf16(w) => w.bytes(),
            ExpertWeight::Fp8(w) => w.bytes(),
        }
    }

    /// (device address, element count) of each buffer, for graph-binding fingerprints.
    pub fn fingerprint(&self, gpu: &Gpu) -> [u64; 4] {
        match self {
            ExpertWeight::Bf16(w) => [w.ptr(gpu), w.len() as u64, 0, 0],
            ExpertWeight::Fp8(w) => [w.q.ptr(gpu), w.q.len() as u64, w.scales.ptr(gpu), w.scales.len() as u64],
        }
    }
}

/// The error for block-scaled (`fp8-block`) expert weights.
pub fn block_refusal(name: &str) -> Error {
    Error::bad_input(format!(
        "tensor `{name}`: the FP8 expert kernels take per-channel scales only (--weights fp8); \
         --weights fp8-block is not supported for MoE experts"
    ))
}

/// Mirrors `MoeFp8Params` in kernels/moe_gemm_fp8.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Fp8GemmParams {
    x: u64,       // const bf16*
    w: u64,       // const uint8_t* [E, n, k]
    scales: u64,  // const float* [E, n]
    y: u64,       // void*
    counts: u64,  // const int* [E]
    offsets: u64, // const int* [E + 1]
    perm: u64,    // const int* [pairs]
    ids: u64,     // const int* [pairs]
    n: i32,       // int
    k: i32,       // int
    top_k: i32,   // int
    pairs: i32,   // int
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for Fp8GemmParams {}

/// The grouped FP8 kernel for up to `t` rows per expert chunk and its dynamic shared memory
/// (`Tile8<NT>` in kernels/fp8_tile.cuh: STAGES × (128·128 W bytes + 8·NT·128 bf16 X)).
fn grouped_kernel_fp8(t: usize, swiglu: bool) -> (&'static str, u32) {
    let (nt, stages) = match t {
        0..=8 => (1, 5),
        9..=16 => (2, 5),
        17..=32 => (4, 4),
        _ => (8, 3),
    };
    let sym = match (nt, swiglu) {
        (1, true) => "moe_gate_up_fp8_8_bf16",
        (2, true) => "moe_gate_up_fp8_16_bf16",
        (4, true) => "moe_gate_up_fp8_32_bf16",
        (_, true) => "moe_gate_up_fp8_64_bf16",
        (1, false) => "moe_down_fp8_8_f32",
        (2, false) => "moe_down_fp8_16_f32",
        (4, false) => "moe_down_fp8_32_f32",
        _ => "moe_down_fp8_64_f32",
    };
    (sym, (stages * (BLOCK_ROWS * STAGE_K + 8 * nt * STAGE_K * 2)) as u32)
}

fn check_experts(op: &str, name: &str, w: &Fp8Experts, want: [usize; 3]) -> Result<()> {
    if w.q.dims != want {
        return Err(Error::shape(op, name, &want, &w.q.dims));
    }
    if w.scales.dims != want[..2] {
        return Err(Error::shape(op, &format!("{name} scales"), &want[..2], &w.scales.dims));
    }
    if !want[2].is_multiple_of(16) {
        return Err(Error::bad_input(format!(
            "{op}: tensor `{name}` {want:?}: the FP8 expert kernels need k a multiple of 16"
        )));
    }
    Ok(())
}

/// [`moe::moe_gate_up_swiglu`] with FP8 experts: `act[pos] = bf16(bf16(silu(g))·u)`, `g`, `u`
/// the bf16-rounded, channel-scaled products of the pair's row of `x` (`[>= t, hidden]`) with
/// its expert's codes (`w_gate_up` `[E, 2·ffn, hidden]`, scales `[E, 2·ffn]`).
pub fn moe_gate_up_swiglu_fp8(
    gpu: &Gpu,
    variant: MoeGemmVariant,
    ws: &mut MoeWorkspace,
    t: usize,
    x: &DTensor<bf16>,
    w_gate_up: &Fp8Experts,
) -> Result<()> {
    const OP: &str = "moe_gate_up_swiglu_fp8";
    let (e, h, f, k) = (ws.n_experts(), ws.hidden(), ws.ffn(), ws.top_k());
    ws.check_routed(OP, t)?;
    x.check_rows(OP, "x", t, h)?;
    check_experts(OP, "w_gate_up", w_gate_up, [e, 2 * f, h])?;
    if t == 0 {
        return Ok(());
    }
    let pairs = t * k;
    let params = Fp8GemmParams {
        x: x.ptr(gpu),
        w: w_gate_up.q.ptr(gpu),
        scales: w_gate_up.scales.ptr(gpu),
        y: ws.act.ptr_mut(gpu),
        counts: ws.counts.ptr(gpu),
        offsets: ws.offsets.ptr(gpu),
        perm: ws.perm.ptr(gpu),
        ids: ws.ids.ptr(gpu),
        n: (2 * f) as i32,
        k: h as i32,
        top_k: k as i32,
        pairs: pairs as i32,
    };
    let (sym, lc) = match variant {
        MoeGemmVariant::Grouped => {
            let (sym, smem) = grouped_kernel_fp8(t, true);
            let grid = (f.div_ceil(BLOCK_ROWS / 2) as u32, e as u32, 1);
            (sym, LaunchEx { grid, block: (GEMM_THREADS, 1, 1), smem, cluster: None, pdl: true })
        }
        MoeGemmVariant::Reference => {
            let grid = (pairs as u32, f.div_ceil(REF_THREADS as usize) as u32, 1);
            ("moe_gate_up_fp8_ref_bf16", LaunchEx { grid, block: (REF_THREADS, 1, 1), smem: 0, cluster: None, pdl: true })
        }
    };
    // SAFETY: params mirror MoeFp8Params; x holds >= t rows of hidden, the codes are
    // [E, 2·ffn, hidden] with hidden % 16 == 0 (every 16-byte copy inside its row), scales
    // [E, 2·ffn], act [max_rows·k >= pairs, ffn]; the routing covers exactly t rows
    // (check_routed), so every position is < pairs, every pair's row < t and expert < E.
    unsafe { launch_ex(gpu, "moe_gemm_fp8", sym, lc, &params) }
}

/// [`moe::moe_down_combine_as`] with FP8 experts: `y[pos] = s[e, col] · (act[pos] · q_e)` in
/// f32 (`w_down` `[E, hidden, ffn]`, scales `[E, hidden]`), then the same combine into `out`.
pub fn moe_down_combine_fp8_as(
    gpu: &Gpu,
    variant: MoeGemmVariant,
    ws: &mut MoeWorkspace,
    t: usize,
    w_down: &Fp8Experts,
    mode: Combine,
    out: &mut DTensor<bf16>,
) -> Result<()> {
    const OP: &str = "moe_down_combine_fp8";
    let (e, h, f, k) = (ws.n_experts(), ws.hidden(), ws.ffn(), ws.top_k());
    ws.check_routed(OP, t)?;
    check_experts(OP, "w_down", w_down, [e, h, f])?;
    out.check_rows(OP, "out", t, h)?;
    if t == 0 {
        return Ok(());
    }
    let pairs = t * k;
    let params = Fp8GemmParams {
        x: ws.act.ptr(gpu),
        w: w_down.q.ptr(gpu),
        scales: w_down.scales.ptr(gpu),
        y: ws.y.ptr_mut(gpu),
        counts: ws.counts.ptr(gpu),
        offsets: ws.offsets.ptr(gpu),
        perm: ws.perm.ptr(gpu),
        ids: ws.ids.ptr(gpu),
        n: h as i32,
        k: f as i32,
        top_k: k as i32,
        pairs: pairs as i32,
    };
    let (sym, lc) = match variant {
        MoeGemmVariant::Grouped => {
            let (sym, smem) = grouped_kernel_fp8(t, false);
            let grid = (h.div_ceil(BLOCK_ROWS) as u32, e as u32, 1);
            (sym, LaunchEx { grid, block: (GEMM_THREADS, 1, 1), smem, cluster: None, pdl: true })
        }
        MoeGemmVariant::Reference => {
            let grid = (pairs as u32, h.div_ceil(REF_THREADS as usize) as u32, 1);
            ("moe_down_fp8_ref_f32", LaunchEx { grid, block: (REF_THREADS, 1, 1), smem: 0, cluster: None, pdl: true })
        }
    };
    // SAFETY: params mirror MoeFp8Params; act [>= pairs, ffn] by position, codes
    // [E, hidden, ffn] with ffn % 16 == 0, scales [E, hidden], y [>= pairs, hidden]; the routing
    // covers exactly t rows (check_routed), so positions < pairs and experts < E.
    unsafe { launch_ex(gpu, "moe_gemm_fp8", sym, lc, &params)? };
    moe::combine(gpu, ws, t, mode, out)
}

/// The gate|up + SwiGLU expert GEMM for either weight format.
pub fn moe_gate_up_swiglu_any(
    gpu: &Gpu,
    variant: MoeGemmVariant,
    ws: &mut MoeWorkspace,
    t: usize,
    x: &DTensor<bf16>,
    w_gate_up: &ExpertWeight,
) -> Result<()> {
    match w_gate_up {
        ExpertWeight::Bf16(w) => moe::moe_gate_up_swiglu(gpu, variant, ws, t, x, w),
        ExpertWeight::Fp8(w) => moe_gate_up_swiglu_fp8(gpu, variant, ws, t, x, w),
    }
}

/// The down expert GEMM and the combine for either weight format.
pub fn moe_down_combine_any(
    gpu: &Gpu,
    variant: MoeGemmVariant,
    ws: &mut MoeWorkspace,
    t: usize,
    w_down: &ExpertWeight,
    mode: Combine,
    out: &mut DTensor<bf16>,
) -> Result<()> {
    match w_down {
        ExpertWeight::Bf16(w) => moe::moe_down_combine_as(gpu, variant, ws, t, w, mode, out),
        ExpertWeight::Fp8(w) => moe_down_combine_fp8_as(gpu, variant, ws, t, w, mode, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Fp8Matrix;

    #[test]
    fn params_match_the_c_layout_and_kernels_fit_two_blocks_per_sm() {
        assert_eq!(std::mem::size_of::<Fp8GemmParams>(), 8 * 8 + 4 * 4);
        assert_eq!(grouped_kernel_fp8(1, true), ("moe_gate_up_fp8_8_bf16", 5 * (16384 + 8 * 256)));
        assert_eq!(grouped_kernel_fp8(32, false), ("moe_down_fp8_32_f32", 4 * (16384 + 32 * 256)));
        assert_eq!(grouped_kernel_fp8(200, true), ("moe_gate_up_fp8_64_bf16", 3 * (16384 + 64 * 256)));
        for t in [1, 8, 9, 16, 17, 32, 33, 64, 65, 4096] {
            for sw in [false, true] {
                let smem = grouped_kernel_fp8(t, sw).1 as usize;
                // 228 KB per SM, 1 KB reserved per block, 256 B of static xrow.
                assert!(2 * (smem + 1024 + 256) <= 228 << 10, "t={t} swiglu={sw}: {smem} bytes");
            }
        }
    }

    #[test]
    fn host_quantisation_is_per_expert_channel_and_names_the_expert() {
        use rand::{rngs::StdRng, SeedableRng};
        use rand_distr::{Distribution, Normal};
        let (e, n, k) = (3, 5, 32);
        let mut rng = StdRng::seed_from_u64(8);
        let nd = Normal::new(0.0f32, 1.0).unwrap();
        // Experts at very different magnitudes: each gets its own channel scales.
        let w: Vec<bf16> = (0..e * n * k).map(|i| bf16::from_f32(nd.sample(&mut rng) * 10f32.powi((i / (n * k)) as i32 - 1))).collect();
        let (q, s) = quantize_experts_bf16("layer 2 experts gate|up", &w, [e, n, k]).unwrap();
        assert_eq!((q.len(), s.len()), (e * n * k, e * n));
        // The [E·n, k] stack quantised as one channel-scaled matrix gives the same codes and scales.
        let whole = Fp8Matrix::quantize_bf16("stack", &w, e * n, k, ScaleLayout::Channel).unwrap();
        assert_eq!((&whole.q, &whole.scales), (&q, &s));
        for ex in 0..e {
            let m = Fp8Matrix::quantize_bf16("one", &w[ex * n * k..(ex + 1) * n * k], n, k, ScaleLayout::Channel).unwrap();
            assert_eq!(m.q, q[ex * n * k..(ex + 1) * n * k]);
            assert_eq!(m.scales, s[ex * n..(ex + 1) * n]);
        }
        let mut bad = w.clone();
        bad[2 * n * k + k + 3] = bf16::NAN;
        let err = quantize_experts_bf16("layer 2 experts gate|up", &bad, [e, n, k]).unwrap_err().to_string();
        assert!(err.contains("layer 2 experts gate|up expert 2") && err.contains("[1, 3]"), "{err}");
        let err = quantize_experts_bf16("layer 2 experts down", &w[1..], [e, n, k]).unwrap_err().to_string();
        assert!(err.contains("layer 2 experts down") && err.contains("[3, 5, 32]"), "{err}");
        let err = block_refusal("layer 1 experts down").to_string();
        assert!(err.contains("layer 1 experts down") && err.contains("fp8-block"), "{err}");
    }
}
