//! The Mixture-of-Experts FFN on the device (kernels/moe_route.cu, kernels/moe_gemm.cu), with
//! no host synchronisation and no allocation per call, so a forward can capture it in a CUDA
//! graph: how many rows each expert got lives only on the device, and the kernels read it.
//!
//! One layer is three calls on a [`MoeWorkspace`] sized once for the largest batch:
//! 1. [`moe_route`]: router logits `[t, E]` (f32, the router GEMM's output) → top-k expert ids
//!    and weights per row ([`RouteScoring`]: LLaDA-MoE's softmax or LLaDA2's sigmoid with
//!    group-limited selection), then the (row, slot) pairs grouped by expert: per-expert counts,
//!    exclusive offsets, the pair at each position (`perm`) and the position of each pair
//!    (`pos`), a stable counting sort (deterministic layout);
//! 2. [`moe_gate_up_swiglu`]: per expert, its rows' gate|up projection with SwiGLU into `act`
//!    (one row per position);
//! 3. [`moe_down_combine`]: per expert, the down projection of its positions into f32 `y`, then
//!    `out[r] = bf16(Σ weight · y)` over the row's k slots in ascending expert id.
//!
//! [`MoeGemmVariant`] picks the grouped tensor-core kernels or a one-thread-per-output
//! reference (same roundings, for parity and profiling). Results never depend on the order
//! of pairs inside an expert's group: each output row reads only its own input row.
use std::str::FromStr;

use half::bf16;

use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

mod route;
pub use route::{moe_route, moe_tally_touched};

/// Most experts a route selects per row (`MOE_MAX_TOP_K` in the kernels).
pub const MAX_TOP_K: usize = 64;
/// Most experts per layer on this path: the router keeps a row's scores and 64-bit rank keys
/// in shared memory (12 bytes an expert, under the 48 KB default). Released models have 64
/// (LLaDA-MoE) and 256 (LLaDA2); the config accepts up to `config::MAX_EXPERTS`.
pub const MAX_EXPERTS: usize = 1024;

const ROUTE_THREADS: u32 = 256; // RT_THREADS
const PERMUTE_THREADS: u32 = 1024; // PM_THREADS
const GEMM_THREADS: u32 = 256; // THREADS in moe_gemm.cu
const REF_THREADS: u32 = 128; // REF_THREADS
const COMBINE_THREADS: u32 = 128; // CB_THREADS
/// W rows per grouped-GEMM block (`BN`); the SwiGLU kernels pair 64 gate with 64 up rows.
const BLOCK_ROWS: usize = 128;
/// k columns per pipeline stage (`BK`).
const STAGE_K: usize = 64;
/// Largest `hidden` / `ffn` accepted (keeps every grid dimension and index in range).
const MAX_WIDTH: usize = 1 << 20;

/// Which implementation runs the expert GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeGemmVariant {
    /// Tensor-core grouped GEMMs (`moe_gate_up*_bf16`, `moe_down*_f32`).
    Grouped,
    /// One thread per output, sequential f32 dot products (`moe_*_ref_*`).
    Reference,
}

impl MoeGemmVariant {
    pub const ALL: [MoeGemmVariant; 2] = [MoeGemmVariant::Grouped, MoeGemmVariant::Reference];

    pub fn name(self) -> &'static str {
        match self {
            MoeGemmVariant::Grouped => "grouped",
            MoeGemmVariant::Reference => "reference",
        }
    }
}

impl FromStr for MoeGemmVariant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        MoeGemmVariant::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| Error::bad_input(format!("unknown MoE GEMM variant `{s}` (expected grouped or reference)")))
    }
}

impl std::fmt::Display for MoeGemmVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How router logits become expert weights.
#[derive(Clone, Copy)]
pub enum RouteScoring<'a> {
    /// LLaDA-MoE: softmax over all experts (f32), top-k (ties → lower id), weights renormalised
    /// over the k only when `norm_topk` (`cpu::moe::route_row`).
    Softmax { norm_topk: bool },
    /// LLaDA2: sigmoid scores, selection on score + `bias` (`[E]`, f32) within the `topk_group`
    /// best of `n_group` groups (ranked by the sum of their top-2 biased scores), weights the
    /// unbiased scores renormalised, × `routed_scaling` (`cpu::llada2::route_row`).
    SigmoidGroup { bias: &'a DTensor<f32>, n_group: usize, topk_group: usize, routed_scaling: f32 },
}

/// Preallocated device buffers of one MoE layer for up to `max_rows` rows (reused by every
/// layer of the same shape). Pairs are `row · top_k + slot`; positions index the grouped order.
pub struct MoeWorkspace {
    max_rows: usize,
    n_experts: usize,
    top_k: usize,
    hidden: usize,
    ffn: usize,
    /// Rows of the last [`moe_route`] (the GEMMs must be called with the same count).
    routed_rows: Option<usize>,
    /// `[max_rows, top_k]` expert ids, selection order.
    pub(crate) ids: DTensor<i32>,
    /// `[max_rows, top_k]` routing weights.
    pub(crate) weights: DTensor<f32>,
    /// `[E]` pairs per expert.
    pub(crate) counts: DTensor<i32>,
    /// `[E + 1]` exclusive prefix of `counts`.
    pub(crate) offsets: DTensor<i32>,
    /// `[max_rows · top_k]` pair at each position (grouped by expert, ascending pair inside).
    pub(crate) perm: DTensor<i32>,
    /// `[max_rows · top_k]` position of each pair.
    pub(crate) pos: DTensor<i32>,
    /// `[max_rows · top_k, ffn]` SwiGLU activations, by position.
    pub(crate) act: DTensor<bf16>,
    /// `[max_rows · top_k, hidden]` down-projection output per position (f32).
    pub(crate) y: DTensor<f32>,
}

impl MoeWorkspace {
    pub fn new(gpu: &Gpu, max_rows: usize, n_experts: usize, top_k: usize, hidden: usize, ffn: usize) -> Result<Self> {
        const OP: &str = "MoeWorkspace::new";
        if n_experts == 0 || n_experts > MAX_EXPERTS {
            return Err(Error::bad_input(format!("{OP}: {n_experts} experts (expected 1..={MAX_EXPERTS})")));
        }
        if top_k == 0 || top_k > n_experts || top_k > MAX_TOP_K {
            return Err(Error::bad_input(format!(
                "{OP}: top_k {top_k} of {n_experts} experts (expected 1..={})",
                n_experts.min(MAX_TOP_K)
            )));
        }
        for (name, v) in [("hidden", hidden), ("ffn", ffn)] {
            if v == 0 || !v.is_multiple_of(8) || v > MAX_WIDTH {
                return Err(Error::bad_input(format!(
                    "{OP}: {name} {v} must be a nonzero multiple of 8 up to {MAX_WIDTH}"
                )));
            }
        }
        let pairs = max_rows.checked_mul(top_k).filter(|&p| max_rows > 0 && p <= i32::MAX as usize);
        let Some(pairs) = pairs else {
            return Err(Error::bad_input(format!("{OP}: max_rows {max_rows} × top_k {top_k} is out of range")));
        };
        Ok(MoeWorkspace {
            max_rows,
            n_experts,
            top_k,
            hidden,
            ffn,
            routed_rows: None,
            ids: gpu.alloc(&[max_rows, top_k])?,
            weights: gpu.alloc(&[max_rows, top_k])?,
            counts: gpu.alloc(&[n_experts])?,
            offsets: gpu.alloc(&[n_experts + 1])?,
            perm: gpu.alloc(&[pairs])?,
            pos: gpu.alloc(&[pairs])?,
            act: gpu.alloc(&[pairs, ffn])?,
            y: gpu.alloc(&[pairs, hidden])?,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.ids.bytes()
            + self.weights.bytes()
            + self.counts.bytes()
            + self.offsets.bytes()
            + self.perm.bytes()
            + self.pos.bytes()
            + self.act.bytes()
            + self.y.bytes()
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    pub fn ffn(&self) -> usize {
        self.ffn
    }
    /// `[max_rows, top_k]` expert ids of the last route (selection order).
    pub fn ids(&self) -> &DTensor<i32> {
        &self.ids
    }
    /// `[max_rows, top_k]` routing weights of the last route.
    pub fn weights(&self) -> &DTensor<f32> {
        &self.weights
    }
    /// `[E]` pairs per expert.
    pub fn counts(&self) -> &DTensor<i32> {
        &self.counts
    }
    /// `[E + 1]` first position of each expert's group.
    pub fn offsets(&self) -> &DTensor<i32> {
        &self.offsets
    }
    /// Pair (`row · top_k + slot`) at each position.
    pub fn perm(&self) -> &DTensor<i32> {
        &self.perm
    }
    /// Position of each pair.
    pub fn pos(&self) -> &DTensor<i32> {
        &self.pos
    }
    /// `[pairs, ffn]` activations by position.
    pub fn act(&self) -> &DTensor<bf16> {
        &self.act
    }
    /// `[pairs, hidden]` f32 expert outputs by position.
    pub fn y(&self) -> &DTensor<f32> {
        &self.y
    }

    /// Errors unless the last [`moe_route`] routed exactly `t` rows.
    pub(crate) fn check_routed(&self, op: &str, t: usize) -> Result<()> {
        match self.routed_rows {
            Some(r) if r == t => Ok(()),
            Some(r) => Err(Error::bad_input(format!("{op}: {t} rows, but the workspace was routed for {r}"))),
            None => Err(Error::bad_input(format!("{op}: the workspace holds no routing (call moe_route first)"))),
        }
    }
}

/// Mirrors `MoeGemmParams` in kernels/moe_gemm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GemmParams {
    x: u64,       // const bf16*
    w: u64,       // const bf16* [E, n, k]
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
unsafe impl cudarc::driver::DeviceRepr for GemmParams {}

/// Mirrors `MoeCombineParams` in kernels/moe_gemm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CombineParams {
    y: u64,       // const float* [pairs, hidden]
    weights: u64, // const float* [t, top_k]
    ids: u64,     // const int* [t, top_k]
    pos: u64,     // const int* [pairs]
    out: u64,     // bf16* [>= t, hidden]
    t: i32,       // int
    hidden: i32,  // int
    top_k: i32,   // int
    add_out: i32, // int: 1 adds the old out (Combine::Add)
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for CombineParams {}

/// The grouped kernel for up to `t` rows per expert chunk: NT n-tiles of 8 rows (1, 2, 4, 8),
/// its symbol, and its dynamic shared memory (STAGES ring slots of (128 + 8·NT) × 64 bf16).
fn grouped_kernel(t: usize, swiglu: bool) -> (&'static str, u32) {
    let nt = match t {
        0..=8 => 1,
        9..=16 => 2,
        17..=32 => 4,
        _ => 8,
    };
    let sym = match (nt, swiglu) {
        (1, true) => "moe_gate_up8_bf16",
        (2, true) => "moe_gate_up16_bf16",
        (4, true) => "moe_gate_up32_bf16",
        (_, true) => "moe_gate_up64_bf16",
        (1, false) => "moe_down8_f32",
        (2, false) => "moe_down16_f32",
        (4, false) => "moe_down32_f32",
        _ => "moe_down64_f32",
    };
    let stages = if nt == 8 { 4 } else { 5 };
    (sym, (stages * (BLOCK_ROWS + 8 * nt) * STAGE_K * 2) as u32)
}

fn check_weight(op: &str, name: &str, w: &DTensor<bf16>, want: [usize; 3]) -> Result<()> {
    if w.dims != want {
        return Err(Error::shape(op, name, &want, &w.dims));
    }
    Ok(())
}

/// `act[pos] = bf16(bf16(silu(bf16 g))·bf16 u)` for every routed pair, with `[g | u]` the
/// pair's row of `x` (`[>= t, hidden]`) times its expert's `w_gate_up` (`[E, 2·ffn, hidden]`,
/// gate rows then up rows). Needs `moe_route` of the same `t` before it on the stream.
pub fn moe_gate_up_swiglu(
    gpu: &Gpu,
    variant: MoeGemmVariant,
    ws: &mut MoeWorkspace,
    t: usize,
    x: &DTensor<bf16>,
    w_gate_up: &DTensor<bf16>,
) -> Result<()> {
    const OP: &str = "moe_gate_up_swiglu";
    let (e, h, f, k) = (ws.n_experts, ws.hidden, ws.ffn, ws.top_k);
    ws.check_routed(OP, t)?;
    x.check_rows(OP, "x", t, h)?;
    check_weight(OP, "w_gate_up", w_gate_up, [e, 2 * f, h])?;
    if t == 0 {
        return Ok(());
    }
    let pairs = t * k;
    let params = GemmParams {
        x: x.ptr(gpu),
        w: w_gate_up.ptr(gpu),
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
            let (sym, smem) = grouped_kernel(t, true);
            let grid = (f.div_ceil(BLOCK_ROWS / 2) as u32, e as u32, 1);
            (sym, LaunchEx { grid, block: (GEMM_THREADS, 1, 1), smem, cluster: None, pdl: true })
        }
        MoeGemmVariant::Reference => {
            let grid = (pairs as u32, f.div_ceil(REF_THREADS as usize) as u32, 1);
            ("moe_gate_up_ref_bf16", LaunchEx { grid, block: (REF_THREADS, 1, 1), smem: 0, cluster: None, pdl: true })
        }
    };
    // SAFETY: params mirror MoeGemmParams; x holds >= t rows of hidden, w_gate_up is
    // [E, 2·ffn, hidden], act [max_rows·k >= pairs, ffn]; counts/offsets/perm/ids hold the
    // routing of exactly t rows (check_routed), so every position is < pairs, every pair's row
    // < t and every expert < E; hidden % 8 == 0 keeps each 16-byte copy inside its row.
    unsafe { launch_ex(gpu, "moe_gemm", sym, lc, &params) }
}

/// `out[r] = bf16(Σ_s weight[r, s] · y[pos(r, s)])` (f32, slots in ascending expert id) with
/// `y[pos] = act[pos] · w_down[e]ᵀ` (f32), `w_down` `[E, hidden, ffn]`, `out` `[>= t, hidden]`.
/// Needs [`moe_gate_up_swiglu`] of the same `t` before it on the stream.
pub fn moe_down_combine(
    gpu: &Gpu,
    variant: MoeGemmVariant,
    ws: &mut MoeWorkspace,
    t: usize,
    w_down: &DTensor<bf16>,
    out: &mut DTensor<bf16>,
) -> Result<()> {
    moe_down_combine_as(gpu, variant, ws, t, w_down, Combine::Write, out)
}

/// What [`moe_down_combine_as`] does with `out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// `out[r] = bf16(Σ weight·y)`.
    Write,
    /// `out[r] = bf16(Σ weight·y + out[r])`: the routed sum first, then the value `out` held
    /// (LLaDA2: the shared expert's output), one rounding.
    Add,
}

/// [`moe_down_combine`], writing or adding into `out` as `mode` says.
pub fn moe_down_combine_as(
    gpu: &Gpu,
    variant: MoeGemmVariant,
    ws: &mut MoeWorkspace,
    t: usize,
    w_down: &DTensor<bf16>,
    mode: Combine,
    out: &mut DTensor<bf16>,
) -> Result<()> {
    const OP: &str = "moe_down_combine";
    let (e, h, f, k) = (ws.n_experts, ws.hidden, ws.ffn, ws.top_k);
    ws.check_routed(OP, t)?;
    check_weight(OP, "w_down", w_down, [e, h, f])?;
    out.check_rows(OP, "out", t, h)?;
    if t == 0 {
        return Ok(());
    }
    let pairs = t * k;
    let params = GemmParams {
        x: ws.act.ptr(gpu),
        w: w_down.ptr(gpu),
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
            let (sym, smem) = grouped_kernel(t, false);
            let grid = (h.div_ceil(BLOCK_ROWS) as u32, e as u32, 1);
            (sym, LaunchEx { grid, block: (GEMM_THREADS, 1, 1), smem, cluster: None, pdl: true })
        }
        MoeGemmVariant::Reference => {
            let grid = (pairs as u32, h.div_ceil(REF_THREADS as usize) as u32, 1);
            ("moe_down_ref_f32", LaunchEx { grid, block: (REF_THREADS, 1, 1), smem: 0, cluster: None, pdl: true })
        }
    };
    // SAFETY: params mirror MoeGemmParams; act [>= pairs, ffn] by position, w_down
    // [E, hidden, ffn], y [>= pairs, hidden]; the routing covers exactly t rows
    // (check_routed), so positions < pairs and experts < E; ffn % 8 == 0 (16-byte copies).
    unsafe { launch_ex(gpu, "moe_gemm", sym, lc, &params)? };
    combine(gpu, ws, t, mode, out)
}

/// `out[r] = bf16(Σ weight · y[pos])` (`Combine::Add`: plus the old `out[r]`) from the f32
/// expert outputs `ws.y` of the last down GEMM (bf16 or FP8 experts) of the `t` routed rows;
/// the caller has checked `out` and the routing.
pub(crate) fn combine(gpu: &Gpu, ws: &MoeWorkspace, t: usize, mode: Combine, out: &mut DTensor<bf16>) -> Result<()> {
    let (h, k) = (ws.hidden, ws.top_k);
    let params = CombineParams {
        y: ws.y.ptr(gpu),
        weights: ws.weights.ptr(gpu),
        ids: ws.ids.ptr(gpu),
        pos: ws.pos.ptr(gpu),
        out: out.ptr_mut(gpu),
        t: t as i32,
        hidden: h as i32,
        top_k: k as i32,
        add_out: (mode == Combine::Add) as i32,
    };
    let grid = (t as u32, h.div_ceil(8 * COMBINE_THREADS as usize) as u32, 1);
    let lc = LaunchEx { grid, block: (COMBINE_THREADS, 1, 1), smem: 0, cluster: None, pdl: true };
    // SAFETY: params mirror MoeCombineParams; y [>= pairs, hidden] (f32, 16-byte aligned rows
    // since hidden % 8 == 0), weights/ids [>= t, k], pos [>= pairs] (each < pairs), out >= t
    // rows of hidden; top_k <= MAX_TOP_K fits the kernel's slot arrays.
    unsafe { launch_ex(gpu, "moe_gemm", "moe_combine_bf16", lc, &params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_round_trip() {
        for v in MoeGemmVariant::ALL {
            assert_eq!(v.name().parse::<MoeGemmVariant>().unwrap(), v);
            assert_eq!(v.to_string(), v.name());
        }
        let e = "cublas".parse::<MoeGemmVariant>().unwrap_err().to_string();
        assert!(e.contains("grouped or reference"), "{e}");
    }

    #[test]
    fn params_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<route::RouteParams>(), 4 * 8 + 8 * 4);
        assert_eq!(std::mem::size_of::<route::PermuteParams>(), 5 * 8 + 2 * 4);
        assert_eq!(std::mem::size_of::<GemmParams>(), 7 * 8 + 4 * 4);
        assert_eq!(std::mem::size_of::<CombineParams>(), 5 * 8 + 4 * 4);
    }

    #[test]
    fn grouped_kernels_fit_two_blocks_per_sm() {
        assert_eq!(grouped_kernel(1, true), ("moe_gate_up8_bf16", 5 * 136 * 64 * 2));
        assert_eq!(grouped_kernel(32, false), ("moe_down32_f32", 5 * 160 * 64 * 2));
        assert_eq!(grouped_kernel(256, true), ("moe_gate_up64_bf16", 4 * 192 * 64 * 2));
        for t in [1, 8, 9, 16, 17, 32, 33, 64, 65, 4096] {
            for sw in [false, true] {
                let smem = grouped_kernel(t, sw).1 as usize;
                assert!(2 * (smem + 1024 + 256) <= 228 << 10, "t={t} swiglu={sw}: {smem} bytes");
            }
        }
    }
}
