//! LLaDA2's layer pieces in f32 (the reference for a future GPU path), semantics of the
//! official `LLaDA2MoeGate` / `LLaDA2MoeSparseMoeBlock` / `apply_rotary_pos_emb`
//! (inclusionAI/dFactory `models/llada2_moe/modeling_llada2_moe.py`):
//! - router: `s = sigmoid(x · Wgᵀ)` in f32; selection on `s + expert_bias`: each of `n_group`
//!   groups is scored by the sum of its two largest biased scores, the `topk_group` best groups
//!   are kept, and the `top_k` best biased scores inside them are taken (ties to the lower id);
//!   weights are the unbiased `s` of those experts divided by `(Σ s + 1e-20)` (not when
//!   `top_k` is 1), times `routed_scaling_factor`;
//! - the routed experts' SwiGLU outputs weighted and summed, plus the shared expert's (its
//!   inputs optionally fake-quantised to E4M3 per row, [`moe_ffn_quant`]: the W8A8 reference);
//! - partial RoPE: rotate-half over the first `rotary_dim` dims of each head with
//!   `inv_freq[i] = theta^(-2i / rotary_dim)`, the rest passed through;
//! - block-causal key caps: a row at position p sees keys `[0, (p / B + 1) · B)`.
use rayon::prelude::*;

use crate::config::Llada2Config;
use crate::cpu::gemm;
use crate::cpu::gemm_fp8::ActQuant;
use crate::cpu::moe::Route;
use crate::error::{Error, Result};

/// One LLaDA2 MoE layer in f32 (stacked as [`crate::weights::HostMoe`]).
pub struct CpuLlada2Moe {
    /// `[n_experts, hidden]`
    pub router: Vec<f32>,
    /// `[n_experts]`, for selection only.
    pub expert_bias: Vec<f32>,
    /// `[n_experts, 2 * ffn, hidden]` (gate | up per expert)
    pub w_gate_up: Vec<f32>,
    /// `[n_experts, hidden, ffn]`
    pub w_down: Vec<f32>,
    /// Shared expert `[2 * shared_ffn, hidden]` and `[hidden, shared_ffn]` (empty: none).
    pub shared_gate_up: Vec<f32>,
    pub shared_down: Vec<f32>,
}

/// Indices of the `k` largest `v[i]` for `i` in `candidates`, largest first, ties to the lower
/// index.
fn top_k_of(v: &[f32], mut candidates: Vec<usize>, k: usize) -> Vec<usize> {
    candidates.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    candidates.truncate(k);
    candidates
}

/// The routing of one row from its router logits (see the module doc), experts in selection
/// order (largest biased score first).
pub fn route_row(logits: &[f32], bias: &[f32], l: &Llada2Config, top_k: usize) -> Route {
    let n = logits.len();
    let scores: Vec<f32> = logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
    let biased: Vec<f32> = scores.iter().zip(bias).map(|(&s, &b)| s + b).collect();
    let gsize = n / l.n_group;
    let group_score: Vec<f32> = (0..l.n_group)
        .map(|g| {
            let top2 = top_k_of(&biased, (g * gsize..(g + 1) * gsize).collect(), 2);
            biased[top2[0]] + biased[top2[1]]
        })
        .collect();
    let groups = top_k_of(&group_score, (0..l.n_group).collect(), l.topk_group);
    let cand: Vec<usize> = groups.iter().flat_map(|&g| g * gsize..(g + 1) * gsize).collect();
    let sel = top_k_of(&biased, cand, top_k);
    let sum: f32 = sel.iter().map(|&e| scores[e]).sum();
    sel.into_iter()
        .map(|e| {
            let w = if top_k > 1 { scores[e] / (sum + 1e-20) } else { scores[e] };
            (e, w * l.routed_scaling)
        })
        .collect()
}

/// `down(silu(gate(x)) · up(x))` of one row for a `[2 * ffn, hidden]` / `[hidden, ffn]` pair,
/// scaled by `w` and added into `out`; the SwiGLU output goes through `aq` before `down` (the
/// caller passes `x` already through it).
#[allow(clippy::too_many_arguments)]
fn swiglu_add(x: &[f32], gu: &[f32], down: &[f32], ffn: usize, w: f32, aq: ActQuant, act: &mut Vec<f32>, out: &mut [f32]) -> Result<()> {
    let hidden = x.len();
    act.resize(ffn, 0.0);
    for (j, a) in act.iter_mut().enumerate() {
        let g = gemm::dot(x, &gu[j * hidden..(j + 1) * hidden]);
        let u = gemm::dot(x, &gu[(ffn + j) * hidden..(ffn + j + 1) * hidden]);
        *a = g / (1.0 + (-g).exp()) * u;
    }
    aq.apply(act, ffn, || "shared expert down input".into())?;
    for (n, o) in out.iter_mut().enumerate() {
        *o += gemm::dot(act, &down[n * ffn..(n + 1) * ffn]) * w;
    }
    Ok(())
}

/// LLaDA2's MoE FFN of every row of `xn` (`[t, hidden]`) into `out` (overwritten): the routed
/// experts (width `ffn`) weighted as [`route_row`], plus the shared expert.
pub fn moe_ffn(xn: &[f32], m: &CpuLlada2Moe, l: &Llada2Config, hidden: usize, ffn: usize, top_k: usize, out: &mut [f32]) -> Result<()> {
    moe_ffn_quant(xn, m, l, hidden, ffn, top_k, ActQuant::None, out)
}

/// [`moe_ffn`] with the shared expert's inputs (`xn` rows for gate|up, the SwiGLU output for
/// down) through `aq`, as the GPU's W8A8 path quantises them; the router and the routed
/// experts take `xn` as it is.
#[allow(clippy::too_many_arguments)]
pub fn moe_ffn_quant(
    xn: &[f32],
    m: &CpuLlada2Moe,
    l: &Llada2Config,
    hidden: usize,
    ffn: usize,
    top_k: usize,
    aq: ActQuant,
    out: &mut [f32],
) -> Result<()> {
    let ne = m.router.len() / hidden;
    if ne == 0
        || m.router.len() != ne * hidden
        || m.expert_bias.len() != ne
        || m.w_gate_up.len() != ne * 2 * ffn * hidden
        || m.w_down.len() != ne * hidden * ffn
        || m.shared_gate_up.len() != 2 * l.shared_ffn * hidden
        || m.shared_down.len() != hidden * l.shared_ffn
    {
        return Err(Error::shape(
            "llada2_moe_ffn",
            "experts",
            &[ne, 2 * ffn, hidden, l.shared_ffn],
            &[m.router.len(), m.expert_bias.len(), m.w_gate_up.len(), m.w_down.len(), m.shared_gate_up.len()],
        ));
    }
    if top_k == 0 || top_k > ne || l.n_group == 0 || !ne.is_multiple_of(l.n_group) || xn.len() != out.len() {
        return Err(Error::bad_input(format!(
            "llada2_moe_ffn: top_k {top_k} of {ne} experts in {} groups, x {} values, out {}",
            l.n_group,
            xn.len(),
            out.len()
        )));
    }
    let t = xn.len() / hidden;
    let mut logits = vec![0f32; t * ne];
    gemm::linear(xn, &m.router, None, hidden, &mut logits);
    // The shared expert's input: `xn` itself, or its quantised copy.
    let mut xq = Vec::new();
    let xs = if aq == ActQuant::None || l.shared_ffn == 0 {
        xn
    } else {
        xq.extend_from_slice(xn);
        aq.apply(&mut xq, hidden, || "shared expert gate|up input".into())?;
        &xq
    };
    let rows = out.par_chunks_mut(hidden).zip(xn.par_chunks(hidden)).zip(xs.par_chunks(hidden)).zip(logits.par_chunks(ne));
    rows.try_for_each(|(((o, x), xs), lg)| {
        o.fill(0.0);
        let mut act = Vec::new();
        for (e, w) in route_row(lg, &m.expert_bias, l, top_k) {
            let gu = &m.w_gate_up[e * 2 * ffn * hidden..(e + 1) * 2 * ffn * hidden];
            let down = &m.w_down[e * hidden * ffn..(e + 1) * hidden * ffn];
            swiglu_add(x, gu, down, ffn, w, ActQuant::None, &mut act, o)?;
        }
        if l.shared_ffn > 0 {
            swiglu_add(xs, &m.shared_gate_up, &m.shared_down, l.shared_ffn, 1.0, aq, &mut act, o)?;
        }
        Ok(())
    })
}

/// Partial rotate-half RoPE in place over heads `[col_offset, col_offset + n_heads·head_dim)`
/// of each row (row r at `positions[r]`): the first `rot` dims of each head rotate with
/// `inv_freq[i] = theta^(-2i/rot)` (f32, through f64), angle `f32(pos) · inv_freq[i]` in f32,
/// cos/sin in f32; dims `rot..head_dim` pass through.
#[allow(clippy::too_many_arguments)]
pub fn partial_rope_inplace(x: &mut [f32], row_stride: usize, col_offset: usize, n_heads: usize, head_dim: usize, rot: usize, positions: &[u32], theta: f64) {
    assert!(rot.is_multiple_of(2) && rot <= head_dim, "partial_rope: {rot} rotary dims of {head_dim}");
    assert!(col_offset + n_heads * head_dim <= row_stride, "partial_rope: heads overrun the row");
    let half = rot / 2;
    let theta = theta as f32 as f64;
    let inv: Vec<f32> = (0..half).map(|i| (1.0 / theta.powf((2 * i) as f64 / rot as f64)) as f32).collect();
    x[..positions.len() * row_stride].par_chunks_mut(row_stride).zip(positions.par_iter()).for_each(|(row, &pos)| {
        let cs: Vec<(f32, f32)> = inv
            .iter()
            .map(|&f| {
                let a = (pos as f32 * f) as f64;
                (a.cos() as f32, a.sin() as f32)
            })
            .collect();
        for head in row[col_offset..col_offset + n_heads * head_dim].chunks_mut(head_dim) {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    });
}

/// Block-causal key caps of rows at `positions`: `(p / block + 1) · block`.
pub fn block_caps(positions: &[u32], block: usize) -> Vec<usize> {
    positions.iter().map(|&p| (p as usize / block + 1) * block).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_group: usize, topk_group: usize) -> Llada2Config {
        Llada2Config {
            first_k_dense: 1,
            dense_ffn: 16,
            shared_ffn: 8,
            n_group,
            topk_group,
            routed_scaling: 2.5,
            rotary_dim: 64,
            block: 32,
        }
    }

    #[test]
    fn router_picks_groups_by_top2_biased_then_top_k_inside_with_unbiased_weights() {
        // 8 experts in 4 groups of 2; logits 0 everywhere (score 0.5) except as set.
        let mut logits = [0f32; 8];
        logits[0] = 3.0; // group 0: one strong expert
        logits[7] = 2.0; // group 3
        logits[6] = 1.5; // group 3: two good ones -> best group by its top-2 sum
        let mut bias = [0f32; 8];
        bias[3] = 0.6; // group 1 lifted by bias only: 0.5 + 1.1 beats group 0's 0.953 + 0.5
        let l = cfg(4, 2);
        let r = route_row(&logits, &bias, &l, 3);
        let ids: Vec<usize> = r.iter().map(|x| x.0).collect();
        // Groups kept: 3 (0.818 + 0.881) and 1 (0.5 + 1.1); top-3 biased: 3 (1.1), 7, 6.
        assert_eq!(ids, vec![3, 7, 6]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let sum = s(0.0) + s(2.0) + s(1.5);
        for (&(e, w), want) in r.iter().zip([s(0.0), s(2.0), s(1.5)]) {
            assert!((w - want / sum * 2.5).abs() < 1e-6, "expert {e}: {w}");
        }
        // Expert 0 has the highest score but its group lost.
        assert!(!ids.contains(&0));
        // Top-1: no renormalisation.
        let r1 = route_row(&logits, &bias, &l, 1);
        assert_eq!(r1[0].0, 3);
        assert!((r1[0].1 - 0.5 * 2.5).abs() < 1e-6);
        // Ties go to the lower id.
        let r = route_row(&[0f32; 8], &[0f32; 8], &l, 3);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn partial_rope_rotates_the_first_dims_only() {
        let (hd, rot) = (128usize, 64usize);
        let x0: Vec<f32> = (0..2 * hd).map(|i| (i as f32 * 0.31).sin()).collect();
        let mut x = x0.clone();
        partial_rope_inplace(&mut x, 2 * hd, 0, 2, hd, rot, &[5], 600000.0);
        for h in 0..2 {
            let b = h * hd;
            assert_eq!(&x[b + rot..b + hd], &x0[b + rot..b + hd], "pass-through dims");
            for i in [0usize, 1, 17, 31] {
                let ang = 5.0 * 600000f64.powf(-(2.0 * i as f64) / rot as f64);
                let (a, c) = (x0[b + i] as f64, x0[b + i + 32] as f64);
                let want = (a * ang.cos() - c * ang.sin(), c * ang.cos() + a * ang.sin());
                assert!((x[b + i] as f64 - want.0).abs() < 1e-5 && (x[b + i + 32] as f64 - want.1).abs() < 1e-5, "head {h} dim {i}");
            }
        }
        let mut y = x0.clone();
        partial_rope_inplace(&mut y, 2 * hd, 0, 2, hd, rot, &[0], 600000.0);
        assert_eq!(y, x0, "position 0 is the identity");
    }

    #[test]
    fn block_caps_end_at_the_rows_block() {
        assert_eq!(block_caps(&[0, 31, 32, 63, 64, 100], 32), vec![32, 32, 64, 64, 96, 128]);
        assert_eq!(block_caps(&[0, 4, 5], 5), vec![5, 5, 10]);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let l = cfg(2, 1);
        let m = CpuLlada2Moe {
            router: vec![0.1; 4 * 8],
            expert_bias: vec![0.0; 3],
            w_gate_up: vec![0.1; 4 * 2 * 2 * 8],
            w_down: vec![0.1; 4 * 8 * 2],
            shared_gate_up: vec![0.1; 2 * 8 * 8],
            shared_down: vec![0.1; 8 * 8],
        };
        let mut out = vec![0f32; 8];
        let e = moe_ffn(&[0.5; 8], &m, &l, 8, 2, 2, &mut out).unwrap_err().to_string();
        assert!(e.contains("experts"), "{e}");
    }
}
