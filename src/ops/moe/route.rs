//! Routing on the device (kernels/moe_route.cu): [`moe_route`] (top-k per row, then the
//! (row, slot) pairs grouped by expert) and [`moe_tally_touched`] (expert-traffic statistics).
//! Part of `ops::moe`; it fills the parent's [`MoeWorkspace`](super::MoeWorkspace).
use super::{MoeWorkspace, RouteScoring, PERMUTE_THREADS, ROUTE_THREADS};
use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex, LaunchEx};
use crate::gpu::{DTensor, Gpu};

/// Mirrors `MoeRouteParams` in kernels/moe_route.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct RouteParams {
    logits: u64,         // const float* [t, E]
    bias: u64,           // const float* [E] or nullptr
    ids: u64,            // int* [t, top_k]
    weights: u64,        // float* [t, top_k]
    t: i32,              // int
    n_experts: i32,      // int
    top_k: i32,          // int
    mode: i32,           // int: 0 softmax, 1 sigmoid + groups
    norm_topk: i32,      // int
    n_group: i32,        // int
    topk_group: i32,     // int
    routed_scaling: f32, // float
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, 4-byte scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for RouteParams {}

/// Mirrors `MoePermuteParams` in kernels/moe_route.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct PermuteParams {
    ids: u64,       // const int* [pairs]
    counts: u64,    // int* [E]
    offsets: u64,   // int* [E + 1]
    perm: u64,      // int* [pairs]
    pos: u64,       // int* [pairs]
    pairs: i32,     // int
    n_experts: i32, // int
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for PermuteParams {}

/// Routes rows `0..t` of `logits` (`[>= t, E]`, f32) into `ws` (ids, weights) and groups the
/// pairs by expert (counts, offsets, perm, pos). Two launches, no host synchronisation.
pub fn moe_route(gpu: &Gpu, t: usize, logits: &DTensor<f32>, scoring: &RouteScoring, ws: &mut MoeWorkspace) -> Result<()> {
    const OP: &str = "moe_route";
    let (e, k) = (ws.n_experts, ws.top_k);
    logits.check_rows(OP, "logits", t, e)?;
    if t > ws.max_rows {
        return Err(Error::bad_input(format!("{OP}: {t} rows, the workspace holds {}", ws.max_rows)));
    }
    let (mode, norm_topk, bias, n_group, topk_group, scaling) = match *scoring {
        RouteScoring::Softmax { norm_topk } => (0, norm_topk, 0, 0, 0, 1.0),
        RouteScoring::SigmoidGroup { bias, n_group, topk_group, routed_scaling } => {
            if bias.dims != [e] {
                return Err(Error::shape(OP, "bias", &[e], &bias.dims));
            }
            if n_group == 0 || !e.is_multiple_of(n_group) || e / n_group < 2 {
                return Err(Error::bad_input(format!(
                    "{OP}: n_group {n_group} must divide the {e} experts into groups of at least 2"
                )));
            }
            if topk_group == 0 || topk_group > n_group || k > topk_group * (e / n_group) {
                return Err(Error::bad_input(format!(
                    "{OP}: topk_group {topk_group} of {n_group} groups cannot hold top_k {k}"
                )));
            }
            if !routed_scaling.is_finite() {
                return Err(Error::bad_input(format!("{OP}: routed_scaling {routed_scaling} is not finite")));
            }
            (1, false, bias.ptr(gpu), n_group, topk_group, routed_scaling)
        }
    };
    ws.routed_rows = Some(t);
    if t == 0 {
        return Ok(());
    }
    let params = RouteParams {
        logits: logits.ptr(gpu),
        bias,
        ids: ws.ids.ptr_mut(gpu),
        weights: ws.weights.ptr_mut(gpu),
        t: t as i32,
        n_experts: e as i32,
        top_k: k as i32,
        mode,
        norm_topk: norm_topk as i32,
        n_group: n_group as i32,
        topk_group: topk_group as i32,
        routed_scaling: scaling,
    };
    let lc = LaunchEx {
        grid: (t as u32, 1, 1),
        block: (ROUTE_THREADS, 1, 1),
        smem: (e * 12 + n_group * 8) as u32, // key[E] u64, gkey[n_group] u64, score[E] f32
        cluster: None,
        pdl: true,
    };
    // SAFETY: params mirror MoeRouteParams; logits holds >= t rows of E, bias [E] (mode 1),
    // ids and weights [max_rows >= t, top_k]; block r reads row r < t and writes its k slots;
    // the group parameters were checked so every group has >= 2 experts and enough candidates.
    unsafe { launch_ex(gpu, "moe_route", "moe_route_f32", lc, &params)? };
    let pairs = t * k;
    let params = PermuteParams {
        ids: ws.ids.ptr(gpu),
        counts: ws.counts.ptr_mut(gpu),
        offsets: ws.offsets.ptr_mut(gpu),
        perm: ws.perm.ptr_mut(gpu),
        pos: ws.pos.ptr_mut(gpu),
        pairs: pairs as i32,
        n_experts: e as i32,
    };
    let lc = LaunchEx { grid: (1, 1, 1), block: (PERMUTE_THREADS, 1, 1), smem: (e * 8) as u32, cluster: None, pdl: true };
    // SAFETY: params mirror MoePermuteParams; ids holds the t·k pairs the route just wrote
    // (each < E; the kernel traps otherwise), counts [E], offsets [E + 1], perm and pos
    // [max_rows·k >= pairs]; every position written is < pairs.
    unsafe { launch_ex(gpu, "moe_route", "moe_permute_i32", lc, &params) }
}

/// Expert-traffic statistics: adds to `tally` (`[2]` u32) the number of experts the last
/// [`moe_route`] gave at least one row (`tally[0]`) and one layer-forward (`tally[1]`). On the
/// device, so it can sit in a captured forward; the caller reads `tally` when it wants.
pub fn moe_tally_touched(gpu: &Gpu, ws: &MoeWorkspace, tally: &mut DTensor<u32>) -> Result<()> {
    const OP: &str = "moe_tally_touched";
    if tally.dims != [2] {
        return Err(Error::shape(OP, "tally", &[2], &tally.dims));
    }
    if ws.routed_rows.is_none() {
        return Err(Error::bad_input(format!("{OP}: the workspace holds no routing (call moe_route first)")));
    }
    let params = TallyParams { counts: ws.counts.ptr(gpu), tally: tally.ptr_mut(gpu), n_experts: ws.n_experts as i32, pad: 0 };
    let lc = LaunchEx { grid: (1, 1, 1), block: (256, 1, 1), smem: 0, cluster: None, pdl: true };
    // SAFETY: params mirror MoeTallyParams; counts holds n_experts i32 (the workspace's), tally
    // is [2] u32 (checked); one block reads counts[0..E) and one thread updates tally[0..2).
    unsafe { launch_ex(gpu, "moe_route", "moe_tally_touched", lc, &params) }
}

/// Mirrors `MoeTallyParams` in kernels/moe_route.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct TallyParams {
    counts: u64,    // const int*
    tally: u64,     // unsigned int*
    n_experts: i32, // int
    pad: i32,       // int
}
// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars, no holes).
unsafe impl cudarc::driver::DeviceRepr for TallyParams {}
const _: () = assert!(std::mem::size_of::<TallyParams>() == 24);
