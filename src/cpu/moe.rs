//! LLaDA-MoE's layer pieces in f32 (the reference of the GPU path, `ops::moe`): the router
//! (softmax over all experts, top-k with ties to the lower expert id, renormalised only when
//! asked), the expert FFN (SwiGLU per selected expert, weighted sum), the per-head q/k RMSNorm,
//! and [`expert_ffn_bf16`], the expert FFN with the GPU kernels' bf16 roundings.
//! Semantics of the official `LLaDAMoESparseMoeBlock` / `LLaDAMoEAttention` (dInfer
//! `tools/modeling_fused_lladamoe.py`): router logits `x · Wgᵀ`, `softmax(dim=-1, f32)`,
//! `topk`, each selected expert's `down(silu(gate(x)) · up(x))` times its weight, summed in
//! expert-id order (the official loop's `index_add_` order).
use rayon::prelude::*;

use crate::cpu::gemm;
use crate::error::{Error, Result};

/// One layer's experts in f32, stacked as in [`crate::weights::HostMoe`].
pub struct CpuMoe {
    /// `[n_experts, hidden]`
    pub router: Vec<f32>,
    /// `[n_experts, 2 * ffn, hidden]` (gate | up per expert)
    pub w_gate_up: Vec<f32>,
    /// `[n_experts, hidden, ffn]`
    pub w_down: Vec<f32>,
}

/// The routing of one row: `top_k` (expert, weight) pairs, most probable first (ties: lower
/// expert id first).
pub type Route = Vec<(usize, f32)>;

/// Softmax of one row of router logits (f32, max-subtracted; the sum in f64), then the `top_k`
/// most probable experts (ties to the lower id); weights renormalised to sum 1 when `norm`.
pub fn route_row(logits: &[f32], top_k: usize, norm: bool) -> Route {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum = exps.iter().map(|&e| e as f64).sum::<f64>() as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
    let mut route: Route = order.into_iter().take(top_k).map(|e| (e, exps[e] / sum)).collect();
    if norm {
        let s: f32 = route.iter().map(|r| r.1).sum();
        for r in route.iter_mut() {
            r.1 /= s;
        }
    }
    route
}

/// Routes every row of `xn` (`[t, hidden]`) over `router` (`[n_experts, hidden]`).
pub fn route(xn: &[f32], router: &[f32], hidden: usize, top_k: usize, norm: bool) -> Vec<Route> {
    let n_experts = router.len() / hidden;
    let t = xn.len() / hidden;
    let mut logits = vec![0f32; t * n_experts];
    gemm::linear(xn, router, None, hidden, &mut logits);
    logits.par_chunks(n_experts).map(|l| route_row(l, top_k, norm)).collect()
}

/// `out[r] = Σ_{(e, w) ∈ route(r)} w · down_e(silu(gate_e(x_r)) · up_e(x_r))` for every row of
/// `xn` (`[t, hidden]`), `out` `[t, hidden]` (overwritten), `ffn` the expert width.
pub fn moe_ffn(xn: &[f32], m: &CpuMoe, hidden: usize, ffn: usize, top_k: usize, norm: bool, out: &mut [f32]) -> Result<()> {
    let n_experts = m.router.len() / hidden;
    if n_experts == 0
        || m.router.len() != n_experts * hidden
        || m.w_gate_up.len() != n_experts * 2 * ffn * hidden
        || m.w_down.len() != n_experts * hidden * ffn
    {
        return Err(Error::shape(
            "moe_ffn",
            "experts",
            &[n_experts, 2 * ffn, hidden],
            &[m.router.len(), m.w_gate_up.len(), m.w_down.len()],
        ));
    }
    if top_k == 0 || top_k > n_experts || xn.len() != out.len() || !xn.len().is_multiple_of(hidden) {
        return Err(Error::bad_input(format!(
            "moe_ffn: top_k {top_k} of {n_experts} experts, x {} values, out {} values, hidden {hidden}",
            xn.len(),
            out.len()
        )));
    }
    let routes = route(xn, &m.router, hidden, top_k, norm);
    out.par_chunks_mut(hidden).zip(xn.par_chunks(hidden)).zip(routes.par_iter()).for_each(|((o, x), r)| {
        o.fill(0.0);
        let mut sel = r.clone();
        sel.sort_by_key(|&(e, _)| e);
        let mut act = vec![0f32; ffn];
        for (e, w) in sel {
            let gu = &m.w_gate_up[e * 2 * ffn * hidden..(e + 1) * 2 * ffn * hidden];
            for (j, a) in act.iter_mut().enumerate() {
                let g = gemm::dot(x, &gu[j * hidden..(j + 1) * hidden]);
                let u = gemm::dot(x, &gu[(ffn + j) * hidden..(ffn + j + 1) * hidden]);
                *a = g / (1.0 + (-g).exp()) * u;
            }
            let down = &m.w_down[e * hidden * ffn..(e + 1) * hidden * ffn];
            for (n, on) in o.iter_mut().enumerate() {
                *on += gemm::dot(&act, &down[n * ffn..(n + 1) * ffn]) * w;
            }
        }
    });
    Ok(())
}

/// Rounds an f32 to bf16 (nearest, ties to even) and back.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The expert FFN with the GPU path's roundings (`ops::moe`): see [`expert_ffn_bf16`].
pub struct ExpertFfnBf16 {
    /// `[t · k, ffn]` by pair (`row · k + slot`): `bf16(bf16(silu(bf16 g)) · bf16 u)`.
    pub act: Vec<f32>,
    /// `[t · k, hidden]` by pair: `act · w_downᵀ` in f32.
    pub y: Vec<f32>,
    /// `[t, hidden]`: `bf16(Σ weight · y)`, the slots summed in f32 in ascending expert id.
    pub out: Vec<f32>,
}

/// The bf16 numerics of the GPU expert FFN on given routes (`routes[r]`: `k` (expert, weight)
/// pairs in any order): `x` `[t, hidden]`, `w_gate_up` `[E, 2·ffn, hidden]` and `w_down`
/// `[E, hidden, ffn]` hold bf16 values; dot products in f32; g, u, silu(g) and the activation
/// rounded to bf16 (the skinny GEMM's SwiGLU epilogue); expert outputs kept in f32; the
/// weighted sum (multiply, then add; first slot onto 0) rounded to bf16 once.
pub fn expert_ffn_bf16(x: &[f32], routes: &[Route], w_gate_up: &[f32], w_down: &[f32], hidden: usize, ffn: usize) -> Result<ExpertFfnBf16> {
    expert_ffn_scaled(x, routes, w_gate_up, None, w_down, None, hidden, ffn)
}

/// [`expert_ffn_bf16`] with optional per-output-channel factors on the f32 dot products
/// (`gu_post` `[E, 2·ffn]`, `down_post` `[E, hidden]`), applied before any rounding: the FP8
/// experts' channel scales (`cpu::moe_fp8`), with the weights holding the E4M3 code values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn expert_ffn_scaled(
    x: &[f32],
    routes: &[Route],
    w_gate_up: &[f32],
    gu_post: Option<&[f32]>,
    w_down: &[f32],
    down_post: Option<&[f32]>,
    hidden: usize,
    ffn: usize,
) -> Result<ExpertFfnBf16> {
    const OP: &str = "expert_ffn_bf16";
    let t = routes.len();
    let k = routes.first().map_or(0, |r| r.len());
    let n_experts = w_down.len().checked_div(hidden * ffn).unwrap_or(0);
    if n_experts == 0 || w_down.len() != n_experts * hidden * ffn || w_gate_up.len() != n_experts * 2 * ffn * hidden {
        return Err(Error::shape(OP, "experts", &[n_experts, 2 * ffn, hidden], &[w_gate_up.len(), w_down.len()]));
    }
    if x.len() != t * hidden {
        return Err(Error::shape(OP, "x", &[t, hidden], &[x.len()]));
    }
    if gu_post.is_some_and(|p| p.len() != n_experts * 2 * ffn) || down_post.is_some_and(|p| p.len() != n_experts * hidden) {
        return Err(Error::shape(OP, "scales", &[n_experts * 2 * ffn, n_experts * hidden], &[gu_post.map_or(0, <[f32]>::len), down_post.map_or(0, <[f32]>::len)]));
    }
    let gs = |e: usize, row: usize| gu_post.map_or(1.0, |p| p[e * 2 * ffn + row]);
    let ds = |e: usize, row: usize| down_post.map_or(1.0, |p| p[e * hidden + row]);
    for (r, route) in routes.iter().enumerate() {
        if route.len() != k || route.iter().any(|&(e, _)| e >= n_experts) {
            return Err(Error::bad_input(format!("{OP}: route of row {r} {route:?}: expected {k} experts < {n_experts}")));
        }
    }
    let mut act = vec![0f32; t * k * ffn];
    let mut y = vec![0f32; t * k * hidden];
    act.par_chunks_mut(ffn).zip(y.par_chunks_mut(hidden)).enumerate().for_each(|(pair, (a, yp))| {
        let (r, e) = (pair / k, routes[pair / k][pair % k].0);
        let xr = &x[r * hidden..(r + 1) * hidden];
        let gu = &w_gate_up[e * 2 * ffn * hidden..(e + 1) * 2 * ffn * hidden];
        for (j, aj) in a.iter_mut().enumerate() {
            let g = round_bf16(gemm::dot(xr, &gu[j * hidden..(j + 1) * hidden]) * gs(e, j));
            let u = round_bf16(gemm::dot(xr, &gu[(ffn + j) * hidden..(ffn + j + 1) * hidden]) * gs(e, ffn + j));
            *aj = round_bf16(round_bf16(g / (1.0 + (-g).exp())) * u);
        }
        let down = &w_down[e * hidden * ffn..(e + 1) * hidden * ffn];
        for (n, yn) in yp.iter_mut().enumerate() {
            *yn = gemm::dot(a, &down[n * ffn..(n + 1) * ffn]) * ds(e, n);
        }
    });
    let mut out = vec![0f32; t * hidden];
    out.par_chunks_mut(hidden).enumerate().for_each(|(r, o)| {
        let mut slots: Vec<(usize, usize, f32)> = routes[r].iter().enumerate().map(|(s, &(e, w))| (e, s, w)).collect();
        slots.sort_by_key(|&(e, s, _)| (e, s));
        for (n, on) in o.iter_mut().enumerate() {
            let mut acc = 0f32;
            for &(_, s, w) in &slots {
                acc += w * y[(r * k + s) * hidden + n];
            }
            *on = round_bf16(acc);
        }
    });
    Ok(ExpertFfnBf16 { act, y, out })
}

/// Per-head RMSNorm in place: for every row of `qkv` (`row_len` values), the `n_heads` heads of
/// `w.len()` values starting at `offset` become `x / sqrt(mean(x²) + eps) · w` (sum of squares
/// in f64, as [`crate::cpu::norm::rms_norm`]).
pub fn head_rms_norm_inplace(qkv: &mut [f32], row_len: usize, offset: usize, n_heads: usize, w: &[f32], eps: f32) {
    let hd = w.len();
    assert!(hd > 0 && offset + n_heads * hd <= row_len, "head_rms_norm: heads do not fit the row");
    qkv.par_chunks_mut(row_len).for_each(|row| {
        for head in row[offset..offset + n_heads * hd].chunks_mut(hd) {
            let ss: f64 = head.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let inv = 1.0 / ((ss / hd as f64) as f32 + eps).sqrt();
            for (x, &wv) in head.iter_mut().zip(w) {
                *x = *x * inv * wv;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn randn(rng: &mut rand::rngs::StdRng, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * std * 1.732).collect()
    }

    #[test]
    fn router_is_softmax_top_k_with_ties_to_the_lower_id() {
        // Experts 1 and 3 tie for the top; 0 and 4 tie for third.
        let l = [0.5f32, 2.0, -1.0, 2.0, 0.5];
        let r = route_row(&l, 3, false);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 0]);
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        for &(e, w) in &r {
            let want = ((l[e] as f64).exp() / z) as f32;
            assert!((w - want).abs() <= 1e-6 * want, "expert {e}: {w} vs {want}");
        }
        // Not renormalised: the three weights sum to less than one.
        let s: f32 = r.iter().map(|x| x.1).sum();
        assert!(s < 0.95, "{s}");
        let n = route_row(&l, 3, true);
        assert!((n.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((n[0].1 / n[2].1 - r[0].1 / r[2].1).abs() < 1e-5, "renormalising keeps the ratios");
        // Huge logits do not overflow.
        let r = route_row(&[1000.0, 999.0, -1000.0], 1, false);
        assert_eq!(r[0].0, 0);
        assert!((r[0].1 - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
    }

    /// The expert FFN against a direct, naive evaluation on random inputs of awkward sizes.
    #[test]
    fn moe_ffn_matches_a_naive_evaluation() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(t, hidden, ffn, experts, k) in &[(1usize, 16usize, 8usize, 4usize, 1usize), (19, 24, 40, 8, 2), (5, 32, 8, 6, 6)] {
            let x = randn(&mut rng, t * hidden, 1.0);
            let m = CpuMoe {
                router: randn(&mut rng, experts * hidden, 1.0),
                w_gate_up: randn(&mut rng, experts * 2 * ffn * hidden, 0.3),
                w_down: randn(&mut rng, experts * hidden * ffn, 0.3),
            };
            for norm in [false, true] {
                let mut out = vec![f32::NAN; t * hidden];
                moe_ffn(&x, &m, hidden, ffn, k, norm, &mut out).unwrap();
                for r in 0..t {
                    let xr = &x[r * hidden..(r + 1) * hidden];
                    // Naive: probabilities in f64, experts picked by a full sort.
                    let logits: Vec<f64> = (0..experts)
                        .map(|e| (0..hidden).map(|i| xr[i] as f64 * m.router[e * hidden + i] as f64).sum())
                        .collect();
                    let z: f64 = logits.iter().map(|l| l.exp()).sum();
                    let mut p: Vec<(usize, f64)> = logits.iter().map(|l| l.exp() / z).enumerate().collect();
                    p.sort_by(|a, b| b.1.total_cmp(&a.1));
                    p.truncate(k);
                    let s: f64 = p.iter().map(|x| x.1).sum();
                    let mut want = vec![0f64; hidden];
                    for &(e, pe) in &p {
                        let w = if norm { pe / s } else { pe };
                        let gu = &m.w_gate_up[e * 2 * ffn * hidden..];
                        let act: Vec<f64> = (0..ffn)
                            .map(|j| {
                                let g: f64 = (0..hidden).map(|i| xr[i] as f64 * gu[j * hidden + i] as f64).sum();
                                let u: f64 = (0..hidden).map(|i| xr[i] as f64 * gu[(ffn + j) * hidden + i] as f64).sum();
                                g / (1.0 + (-g).exp()) * u
                            })
                            .collect();
                        for (n, wn) in want.iter_mut().enumerate() {
                            let d = &m.w_down[e * hidden * ffn + n * ffn..];
                            *wn += w * (0..ffn).map(|j| act[j] * d[j] as f64).sum::<f64>();
                        }
                    }
                    for n in 0..hidden {
                        let got = out[r * hidden + n] as f64;
                        assert!(
                            (got - want[n]).abs() <= 1e-4 + 1e-4 * want[n].abs(),
                            "t{t} h{hidden} k{k} norm {norm}: row {r} col {n}: {got} vs {}",
                            want[n]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_and_top_k_are_refused() {
        let m = CpuMoe { router: vec![0.1; 4 * 8], w_gate_up: vec![0.1; 4 * 2 * 2 * 8], w_down: vec![0.1; 4 * 8 * 2] };
        let x = vec![0.5f32; 8];
        let mut out = vec![0f32; 8];
        assert!(moe_ffn(&x, &m, 8, 2, 2, false, &mut out).is_ok());
        let e = moe_ffn(&x, &m, 8, 2, 5, false, &mut out).unwrap_err().to_string();
        assert!(e.contains("top_k 5 of 4"), "{e}");
        let e = moe_ffn(&x, &m, 8, 3, 2, false, &mut out).unwrap_err().to_string();
        assert!(e.contains("experts"), "{e}");
    }

    /// The bf16 emulation: activations are bf16 values, a hand-checked row, and the output
    /// within bf16 rounding of the f32 reference on bf16-valued inputs.
    #[test]
    fn expert_ffn_bf16_follows_the_f32_reference_within_bf16_rounding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (t, hidden, ffn, experts, k) = (7usize, 32usize, 24usize, 5usize, 3usize);
        let bf = |v: Vec<f32>| v.into_iter().map(round_bf16).collect::<Vec<_>>();
        let x = bf(randn(&mut rng, t * hidden, 1.0));
        let m = CpuMoe {
            router: bf(randn(&mut rng, experts * hidden, 1.0)),
            w_gate_up: bf(randn(&mut rng, experts * 2 * ffn * hidden, 0.3)),
            w_down: bf(randn(&mut rng, experts * hidden * ffn, 0.3)),
        };
        let routes = route(&x, &m.router, hidden, k, false);
        let got = expert_ffn_bf16(&x, &routes, &m.w_gate_up, &m.w_down, hidden, ffn).unwrap();
        assert!(got.act.iter().chain(&got.out).all(|&v| v == round_bf16(v)), "act and out are bf16 values");
        let mut want = vec![0f32; t * hidden];
        moe_ffn(&x, &m, hidden, ffn, k, false, &mut want).unwrap();
        let scale = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
        for (i, (&g, &w)) in got.out.iter().zip(&want).enumerate() {
            // A few bf16 roundings of g, u, silu, act (2^-9 relative each) and of the output.
            assert!((g - w).abs() <= 0.02 * scale + 8e-3 * w.abs(), "element {i}: {g} vs {w}");
        }
        // Row 0 by hand: slots summed in ascending expert id, each y a plain f32 dot.
        let r0 = &routes[0];
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by_key(|&s| r0[s].0);
        for n in [0usize, 5, hidden - 1] {
            let mut acc = 0f32;
            for &s in &order {
                let e = r0[s].0;
                let y = gemm::dot(&got.act[s * ffn..(s + 1) * ffn], &m.w_down[(e * hidden + n) * ffn..(e * hidden + n + 1) * ffn]);
                assert_eq!(y, got.y[s * hidden + n]);
                acc += r0[s].1 * y;
            }
            assert_eq!(got.out[n], round_bf16(acc), "column {n}");
        }
    }

    #[test]
    fn expert_ffn_bf16_refuses_bad_shapes_and_routes() {
        let (gu, down) = (vec![0.1f32; 3 * 2 * 8 * 16], vec![0.1f32; 3 * 16 * 8]);
        let x = vec![0.5f32; 2 * 16];
        let ok: Vec<Route> = vec![vec![(0, 0.5), (2, 0.5)], vec![(1, 0.25), (0, 0.75)]];
        assert!(expert_ffn_bf16(&x, &ok, &gu, &down, 16, 8).is_ok());
        let e = expert_ffn_bf16(&x, &ok, &gu[1..], &down, 16, 8).err().unwrap().to_string();
        assert!(e.contains("experts"), "{e}");
        let e = expert_ffn_bf16(&x[1..], &ok, &gu, &down, 16, 8).err().unwrap().to_string();
        assert!(e.contains("`x`"), "{e}");
        let bad: Vec<Route> = vec![vec![(0, 0.5), (3, 0.5)], vec![(1, 0.25), (0, 0.75)]];
        let e = expert_ffn_bf16(&x, &bad, &gu, &down, 16, 8).err().unwrap().to_string();
        assert!(e.contains("row 0"), "{e}");
    }

    #[test]
    fn head_norm_normalises_each_head_of_the_chosen_span() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (hd, heads, row) = (4usize, 2usize, 13usize);
        let x = randn(&mut rng, 3 * row, 2.0);
        let w = [0.5f32, 1.0, 1.5, 2.0];
        let mut y = x.clone();
        head_rms_norm_inplace(&mut y, row, 3, heads, &w, 1e-5);
        for r in 0..3 {
            for i in 0..row {
                let (a, b) = (x[r * row + i], y[r * row + i]);
                if !(3..3 + heads * hd).contains(&i) {
                    assert_eq!(a, b, "outside the heads nothing changes");
                    continue;
                }
                let h0 = 3 + (i - 3) / hd * hd;
                let ms: f32 = x[r * row + h0..r * row + h0 + hd].iter().map(|v| v * v).sum::<f32>() / hd as f32;
                let want = a / (ms + 1e-5).sqrt() * w[(i - 3) % hd];
                assert!((b - want).abs() <= 1e-5 * (1.0 + want.abs()), "row {r} col {i}: {b} vs {want}");
            }
        }
    }
}
