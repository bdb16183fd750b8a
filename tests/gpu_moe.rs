//! The MoE kernels (`ops::moe`, kernels/moe_route.cu, kernels/moe_gemm.cu) against the CPU:
//! routing exactly as `cpu::moe::route_row` (softmax) and `cpu::llada2::route_row` (sigmoid,
//! group-limited) — same experts in the same order, weights within 1e-6 relative; the grouping
//! (counts, offsets and the stable order of pairs) exactly as a CPU counting sort; the expert
//! FFN of both variants against `cpu::moe::expert_ffn_bf16` (the same bf16 roundings, f32
//! accumulation); run-to-run bit identity; and the refusals of bad shapes and parameters.
//!
//! Inputs: x ~ N(0, 1), w_gate_up ~ N(0, 1/hidden), w_down ~ N(0, 1/ffn) (bf16), logits
//! ~ N(0, σ²) f32, so g, u, y are O(1). Tolerances against the emulation (which differs only
//! by f32 summation order, so a bf16 rounding of g, u or silu may land on the other side):
//! act: at most 5 % of elements not bit-identical, each within 3 % of its value + 1 % of the
//! RMS (a flipped rounding of g moves silu by up to about two bf16 ulps); y (f32): |d| ≤ 5e-3·RMS + 1e-3·|ref|; out (bf16): |d| ≤ 5e-3·RMS + 8e-3·|ref| (two
//! bf16 ulps).
#![cfg(feature = "cuda")]
use std::sync::Mutex;

use demask::config::Llada2Config;
use demask::cpu::moe::{self as cpu_moe, Route};
use demask::cpu::llada2;
use demask::gpu::{test_gpu, DTensor, Gpu};
use demask::ops::fill::fill_normal;
use demask::ops::moe::{moe_down_combine, moe_gate_up_swiglu, moe_route, MoeGemmVariant, MoeWorkspace, RouteScoring, MAX_EXPERTS, MAX_TOP_K};
use half::bf16;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Tests in this file share the GPU one at a time.
static GPU_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    let d = Normal::new(0.0f32, std).unwrap();
    (0..n).map(|_| d.sample(rng)).collect()
}

fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>() / v.len().max(1) as f64).sqrt() as f32
}

fn llada2_cfg(n_group: usize, topk_group: usize, routed_scaling: f32) -> Llada2Config {
    Llada2Config { first_k_dense: 1, dense_ffn: 16, shared_ffn: 0, n_group, topk_group, routed_scaling, rotary_dim: 64, block: 32 }
}

/// Routes `logits` (`[t, E]`) on the device; returns the ids and weights `[t, k]`.
fn gpu_route(gpu: &Gpu, ws: &mut MoeWorkspace, t: usize, logits: &[f32], scoring: &RouteScoring) -> (Vec<i32>, Vec<f32>) {
    let e = ws.n_experts();
    let l = gpu.upload(logits, &[t.max(1), e]).unwrap();
    moe_route(gpu, t, &l, scoring, ws).unwrap();
    let k = ws.top_k();
    (ws.ids().to_host_n(gpu, t * k).unwrap(), ws.weights().to_host_n(gpu, t * k).unwrap())
}

/// Same experts in the same order, weights within 1e-6 relative.
fn check_routes(what: &str, k: usize, ids: &[i32], weights: &[f32], want: &[Route]) {
    let mut bad = Vec::new();
    for (r, route) in want.iter().enumerate() {
        assert_eq!(route.len(), k, "{what}: CPU route length");
        for (s, &(e, w)) in route.iter().enumerate() {
            let (gi, gw) = (ids[r * k + s], weights[r * k + s]);
            let close = (gw - w).abs() <= 1e-6 * w.abs(); // false for NaN
            if gi != e as i32 || !close {
                bad.push((r, s, gi, e, gw, w));
            }
        }
    }
    assert!(bad.is_empty(), "{what}: {} mismatches, first (row, slot, gpu id, cpu id, gpu w, cpu w) {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

/// counts, offsets, perm and pos exactly as a stable CPU counting sort of `ids`.
fn check_grouping(what: &str, gpu: &Gpu, ws: &MoeWorkspace, ids: &[i32]) {
    let (e, pairs) = (ws.n_experts(), ids.len());
    let mut counts = vec![0i32; e];
    for &i in ids {
        counts[i as usize] += 1;
    }
    let mut offsets = vec![0i32; e + 1];
    for x in 0..e {
        offsets[x + 1] = offsets[x] + counts[x];
    }
    let mut perm = vec![0i32; pairs];
    let mut cur = offsets.clone();
    for (p, &i) in ids.iter().enumerate() {
        perm[cur[i as usize] as usize] = p as i32;
        cur[i as usize] += 1;
    }
    assert_eq!(ws.counts().to_host(gpu).unwrap(), counts, "{what}: counts");
    assert_eq!(ws.offsets().to_host(gpu).unwrap(), offsets, "{what}: offsets");
    assert_eq!(ws.perm().to_host_n(gpu, pairs).unwrap(), perm, "{what}: perm");
    let pos = ws.pos().to_host_n(gpu, pairs).unwrap();
    for (slot, &p) in perm.iter().enumerate() {
        assert_eq!(pos[p as usize], slot as i32, "{what}: pos of pair {p}");
    }
}

/// Logits ~ N(0, σ²); `ties`: rounded to multiples of 1/4, so many values tie exactly.
fn logits(rng: &mut StdRng, n: usize, sigma: f32, ties: bool) -> Vec<f32> {
    let v = normal(rng, n, sigma);
    if ties { v.into_iter().map(|x| (x * 4.0).round() / 4.0).collect() } else { v }
}

#[test]
fn route_softmax_matches_cpu() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(1);
    // (E, k, rows, σ, ties): tiny, awkward, LLaDA-MoE at 1 / 32 / 256 rows, ties, huge logits.
    let cases = [
        (4usize, 2usize, 5usize, 1.0f32, false),
        (6, 3, 19, 2.0, false),
        (64, 8, 1, 1.0, false),
        (64, 8, 32, 1.0, false),
        (64, 8, 256, 1.0, false),
        (64, 8, 99, 1.0, true),
        (256, 8, 33, 3.0, false),
        (7, 7, 11, 1.0, true),
        (64, 8, 17, 300.0, false),
    ];
    for (i, &(e, k, t, sigma, ties)) in cases.iter().enumerate() {
        let mut ws = MoeWorkspace::new(&gpu, t + 3, e, k, 64, 64).unwrap();
        let l = logits(&mut rng, t * e, sigma, ties);
        for norm in [false, true] {
            let what = format!("case {i}: softmax E={e} k={k} t={t} sigma={sigma} ties={ties} norm={norm}");
            let (ids, w) = gpu_route(&gpu, &mut ws, t, &l, &RouteScoring::Softmax { norm_topk: norm });
            let want: Vec<Route> = l.chunks(e).map(|row| cpu_moe::route_row(row, k, norm)).collect();
            check_routes(&what, k, &ids, &w, &want);
            check_grouping(&what, &gpu, &ws, &ids);
        }
    }
}

#[test]
fn route_sigmoid_group_matches_cpu() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(2);
    // (E, n_group, topk_group, k, rows, ties): LLaDA2-mini's router at 1 / 19 / 32 / 256 rows,
    // with ties, a small one, and top-1 (no renormalisation).
    let cases = [
        (256usize, 8usize, 4usize, 8usize, 1usize, false),
        (256, 8, 4, 8, 19, false),
        (256, 8, 4, 8, 32, false),
        (256, 8, 4, 8, 256, false),
        (256, 8, 4, 8, 64, true),
        (8, 4, 2, 3, 23, false),
        (6, 3, 2, 1, 9, false),
        (64, 64 / 2, 5, 6, 13, true),
    ];
    for (i, &(e, ng, tg, k, t, ties)) in cases.iter().enumerate() {
        let what = format!("case {i}: sigmoid E={e} groups {ng} keep {tg} k={k} t={t} ties={ties}");
        let mut ws = MoeWorkspace::new(&gpu, t, e, k, 64, 64).unwrap();
        let l = logits(&mut rng, t * e, 2.0, ties);
        let bias_h = logits(&mut rng, e, 0.1, ties);
        let bias = gpu.upload(&bias_h, &[e]).unwrap();
        let scoring = RouteScoring::SigmoidGroup { bias: &bias, n_group: ng, topk_group: tg, routed_scaling: 2.5 };
        let (ids, w) = gpu_route(&gpu, &mut ws, t, &l, &scoring);
        let cfg = llada2_cfg(ng, tg, 2.5);
        let want: Vec<Route> = l.chunks(e).map(|row| llada2::route_row(row, &bias_h, &cfg, k)).collect();
        check_routes(&what, k, &ids, &w, &want);
        check_grouping(&what, &gpu, &ws, &ids);
    }
}

/// One expert FFN problem: weights on the device and their f32 values on the host.
struct Ffn {
    e: usize,
    k: usize,
    hidden: usize,
    ffn: usize,
    w_gate_up: DTensor<bf16>,
    w_down: DTensor<bf16>,
    gu_f: Vec<f32>,
    down_f: Vec<f32>,
}

impl Ffn {
    fn new(gpu: &Gpu, e: usize, k: usize, hidden: usize, ffn: usize, seed: u64) -> Ffn {
        let mut w_gate_up = gpu.alloc::<bf16>(&[e, 2 * ffn, hidden]).unwrap();
        fill_normal(gpu, &mut w_gate_up, seed, 0.0, 1.0 / (hidden as f32).sqrt()).unwrap();
        let mut w_down = gpu.alloc::<bf16>(&[e, hidden, ffn]).unwrap();
        fill_normal(gpu, &mut w_down, seed ^ 0xd0, 0.0, 1.0 / (ffn as f32).sqrt()).unwrap();
        let f = |t: &DTensor<bf16>| t.to_host(gpu).unwrap().iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let (gu_f, down_f) = (f(&w_gate_up), f(&w_down));
        Ffn { e, k, hidden, ffn, w_gate_up, w_down, gu_f, down_f }
    }
}

/// What one run of the GPU expert FFN produced: act and y re-ordered by pair, out `[t, hidden]`.
struct FfnOut {
    ids: Vec<i32>,
    act_bits: Vec<u16>,
    y: Vec<f32>,
    out: Vec<f32>,
}

/// Routes `logits` (softmax, not renormalised), runs both GEMMs by `variant` into an output of
/// t + 2 rows poisoned with NaN, and checks rows ≥ t are untouched.
fn run_ffn(gpu: &Gpu, p: &Ffn, variant: MoeGemmVariant, t: usize, x: &DTensor<bf16>, logits: &[f32]) -> FfnOut {
    let mut ws = MoeWorkspace::new(gpu, t, p.e, p.k, p.hidden, p.ffn).unwrap();
    let (ids, _) = gpu_route(gpu, &mut ws, t, logits, &RouteScoring::Softmax { norm_topk: false });
    moe_gate_up_swiglu(gpu, variant, &mut ws, t, x, &p.w_gate_up).unwrap();
    let mut out = gpu.upload(&vec![bf16::NAN; (t + 2) * p.hidden], &[t + 2, p.hidden]).unwrap();
    moe_down_combine(gpu, variant, &mut ws, t, &p.w_down, &mut out).unwrap();
    let pairs = t * p.k;
    let pos = ws.pos().to_host_n(gpu, pairs).unwrap();
    let act = ws.act().to_host_n(gpu, pairs * p.ffn).unwrap();
    let y = ws.y().to_host_n(gpu, pairs * p.hidden).unwrap();
    let out: Vec<f32> = out.to_host(gpu).unwrap().iter().map(|v| v.to_f32()).collect();
    let untouched = out[t * p.hidden..].iter().all(|v| v.is_nan());
    assert!(untouched, "{variant} t={t}: rows >= t of out were written");
    let (mut act_bits, mut y_pair) = (Vec::with_capacity(pairs * p.ffn), Vec::with_capacity(pairs * p.hidden));
    for &ps in &pos {
        let ps = ps as usize;
        act_bits.extend(act[ps * p.ffn..(ps + 1) * p.ffn].iter().map(|v| v.to_bits()));
        y_pair.extend_from_slice(&y[ps * p.hidden..(ps + 1) * p.hidden]);
    }
    FfnOut { ids, act_bits, y: y_pair, out: out[..t * p.hidden].to_vec() }
}

/// `y[i, n] = Σ_j act[i, j] · down[e_i, n, j]` (f64, rounded to f32) for every (row, slot) pair
/// `i` in pair order, `e_i = ids[i]`.
fn down_of(p: &Ffn, ids: &[i32], act: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let (h, f) = (p.hidden, p.ffn);
    let mut y = vec![0f32; ids.len() * h];
    y.par_chunks_mut(h).enumerate().for_each(|(i, yr)| {
        let e = ids[i] as usize;
        let a = &act[i * f..(i + 1) * f];
        for (n, yv) in yr.iter_mut().enumerate() {
            let d = &p.down_f[(e * h + n) * f..(e * h + n + 1) * f];
            *yv = a.iter().zip(d).map(|(&x, &w)| x as f64 * w as f64).sum::<f64>() as f32;
        }
    });
    y
}

/// `|got − want| ≤ atol + rtol·|want|` for all (NaN fails); at most `max_frac` not bit-equal.
fn check_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32, max_frac: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = Vec::new();
    let mut inexact = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        inexact += (g.to_bits() != w.to_bits()) as usize;
        let close = (g - w).abs() <= atol + rtol * w.abs(); // false for NaN
        if !close {
            bad.push((i, g, w));
        }
    }
    assert!(bad.is_empty(), "{what}: {} of {} outside atol {atol} rtol {rtol}, first (index, got, want) {:?}", bad.len(), got.len(), &bad[..bad.len().min(5)]);
    let frac = inexact as f64 / got.len().max(1) as f64;
    assert!(frac <= max_frac, "{what}: {:.3} % not bit-identical (at most {:.3} %)", 100.0 * frac, 100.0 * max_frac);
    eprintln!("{what}: ok, {:.3} % not bit-identical", 100.0 * frac);
}

/// Both variants at `t` rows against the emulation (x ~ N(0, 1) from `seed`).
fn check_ffn(gpu: &Gpu, name: &str, p: &Ffn, t: usize, logits: &[f32], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let xh: Vec<bf16> = normal(&mut rng, t * p.hidden, 1.0).into_iter().map(bf16::from_f32).collect();
    let xf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
    let x = gpu.upload(&xh, &[t, p.hidden]).unwrap();
    let routes: Vec<Route> = logits.chunks(p.e).map(|row| cpu_moe::route_row(row, p.k, false)).collect();
    let want = cpu_moe::expert_ffn_bf16(&xf, &routes, &p.gu_f, &p.down_f, p.hidden, p.ffn).unwrap();
    let (act_rms, y_rms, out_rms) = (rms(&want.act), rms(&want.y), rms(&want.out));
    for variant in MoeGemmVariant::ALL {
        let what = format!("{name} {variant} t={t} E={} k={} hidden={} ffn={}", p.e, p.k, p.hidden, p.ffn);
        let got = run_ffn(gpu, p, variant, t, &x, logits);
        let cpu_ids: Vec<i32> = routes.iter().flat_map(|r| r.iter().map(|&(e, _)| e as i32)).collect();
        assert_eq!(got.ids, cpu_ids, "{what}: routing");
        let act: Vec<f32> = got.act_bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        check_close(&format!("{what} act"), &act, &want.act, 0.01 * act_rms, 0.03, 0.05);
        // The down GEMM on its own: y from the GPU's own act (an act element one bf16 ulp off
        // the emulation's would otherwise move a whole y row past f32 summation noise).
        let y_want = down_of(p, &got.ids, &act);
        check_close(&format!("{what} y"), &got.y, &y_want, 1e-4 * y_rms, 1e-4, 1.0);
        check_close(&format!("{what} out"), &got.out, &want.out, 5e-3 * out_rms, 8e-3, 1.0);
    }
}

#[test]
fn expert_ffn_small_and_awkward_shapes() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(3);
    // (name, E, k, hidden, ffn, rows): hidden not a multiple of the 64-column stage or of the
    // 128-row slab, ffn = 3 SwiGLU slabs, E = 256 (LLaDA2's expert count) at a small width.
    let cases = [
        ("tiny", 4usize, 2usize, 128usize, 64usize, &[1usize, 5, 8][..]),
        ("awkward", 6, 3, 200, 192, &[19, 1, 64][..]),
        ("e256", 256, 8, 256, 128, &[32, 9][..]),
    ];
    for (i, &(name, e, k, hidden, ffn, ts)) in cases.iter().enumerate() {
        let p = Ffn::new(&gpu, e, k, hidden, ffn, 30 + i as u64);
        for &t in ts {
            let l = logits(&mut rng, t * e, 1.0, false);
            check_ffn(&gpu, name, &p, t, &l, 40 + t as u64);
        }
    }
}

#[test]
fn expert_ffn_llada_moe_shape() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(4);
    let p = Ffn::new(&gpu, 64, 8, 2048, 1024, 50);
    for t in [1usize, 32, 256] {
        let l = logits(&mut rng, t * p.e, 1.0, false);
        check_ffn(&gpu, "llada-moe", &p, t, &l, 60 + t as u64);
    }
}

/// Every row picks the same experts (their logits lifted), so each of them gets all t rows:
/// more than one 64-row tile, and the grouped kernels loop over row chunks.
#[test]
fn expert_ffn_skewed_routing_loops_over_row_chunks() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(5);
    let p = Ffn::new(&gpu, 8, 4, 256, 128, 70);
    for t in [200usize, 65, 129] {
        let mut l = logits(&mut rng, t * p.e, 0.5, false);
        for row in l.chunks_mut(p.e) {
            for hot in [1, 3, 4, 6] {
                row[hot] += 8.0;
            }
        }
        check_ffn(&gpu, "skewed", &p, t, &l, 80 + t as u64);
    }
}

#[test]
fn expert_ffn_is_deterministic() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(6);
    let p = Ffn::new(&gpu, 64, 8, 512, 256, 90);
    let t = 256;
    let l = logits(&mut rng, t * p.e, 1.0, false);
    let xh: Vec<bf16> = normal(&mut rng, t * p.hidden, 1.0).into_iter().map(bf16::from_f32).collect();
    let x = gpu.upload(&xh, &[t, p.hidden]).unwrap();
    for variant in MoeGemmVariant::ALL {
        let a = run_ffn(&gpu, &p, variant, t, &x, &l);
        let b = run_ffn(&gpu, &p, variant, t, &x, &l);
        assert_eq!(a.ids, b.ids, "{variant}: ids");
        assert_eq!(a.act_bits, b.act_bits, "{variant}: act");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.y), bits(&b.y), "{variant}: y");
        assert_eq!(bits(&a.out), bits(&b.out), "{variant}: out");
    }
}

#[test]
fn bad_shapes_and_parameters_are_refused() {
    let _g = lock();
    let Some(gpu) = test_gpu() else { return };
    let err = |r: demask::Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let new_err = |m, e, k, h, f| MoeWorkspace::new(&gpu, m, e, k, h, f).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(new_err(4, 0, 1, 64, 64).contains("0 experts"));
    assert!(new_err(4, MAX_EXPERTS + 1, 1, 64, 64).contains("experts"));
    assert!(new_err(4, 8, 9, 64, 64).contains("top_k 9"));
    assert!(new_err(4, 8, 0, 64, 64).contains("top_k 0"));
    assert!(new_err(4, 2 * MAX_TOP_K, MAX_TOP_K + 1, 64, 64).contains("top_k"));
    assert!(new_err(4, 8, 2, 100, 64).contains("hidden 100"));
    assert!(new_err(4, 8, 2, 64, 0).contains("ffn 0"));
    assert!(new_err(0, 8, 2, 64, 64).contains("max_rows 0"));

    let (e, k, h, f, t) = (8usize, 2usize, 64usize, 32usize, 5usize);
    let mut ws = MoeWorkspace::new(&gpu, t, e, k, h, f).unwrap();
    assert!(ws.bytes() >= t * k * (f * 2 + h * 4));
    let mut rng = StdRng::seed_from_u64(7);
    let l = gpu.upload(&logits(&mut rng, t * e, 1.0, false), &[t, e]).unwrap();
    let x = gpu.upload(&vec![bf16::from_f32(0.5); t * h], &[t, h]).unwrap();
    let gu = gpu.alloc::<bf16>(&[e, 2 * f, h]).unwrap();
    let down = gpu.alloc::<bf16>(&[e, h, f]).unwrap();
    let mut out = gpu.alloc::<bf16>(&[t, h]).unwrap();
    let g = MoeGemmVariant::Grouped;
    // Before any route.
    assert!(err(moe_gate_up_swiglu(&gpu, g, &mut ws, t, &x, &gu)).contains("moe_route first"));
    let soft = RouteScoring::Softmax { norm_topk: false };
    let wide = gpu.upload(&vec![0.5f32; t * (e + 1)], &[t, e + 1]).unwrap();
    assert!(err(moe_route(&gpu, t, &wide, &soft, &mut ws)).contains("`logits`"));
    assert!(err(moe_route(&gpu, t + 1, &l, &soft, &mut ws)).contains("`logits`"));
    let bias_bad = gpu.upload(&[0.1f32; 7], &[7]).unwrap();
    let bias = gpu.upload(&[0.1f32; 8], &[8]).unwrap();
    let sg = |b, ng, tg| RouteScoring::SigmoidGroup { bias: b, n_group: ng, topk_group: tg, routed_scaling: 2.5 };
    assert!(err(moe_route(&gpu, t, &l, &sg(&bias_bad, 4, 2), &mut ws)).contains("`bias`"));
    assert!(err(moe_route(&gpu, t, &l, &sg(&bias, 3, 2), &mut ws)).contains("n_group 3"));
    assert!(err(moe_route(&gpu, t, &l, &sg(&bias, 8, 2), &mut ws)).contains("n_group 8"));
    assert!(err(moe_route(&gpu, t, &l, &sg(&bias, 4, 5), &mut ws)).contains("topk_group 5"));
    let mut ws1 = MoeWorkspace::new(&gpu, t, e, 5, h, f).unwrap();
    assert!(err(moe_route(&gpu, t, &l, &sg(&bias, 4, 2), &mut ws1)).contains("top_k 5"));
    let big = gpu.upload(&vec![0.5f32; (t + 1) * e], &[t + 1, e]).unwrap();
    assert!(err(moe_route(&gpu, t + 1, &big, &soft, &mut ws)).contains("workspace holds"));
    // Routed for t rows: the GEMMs check the row count and every tensor.
    moe_route(&gpu, t, &l, &soft, &mut ws).unwrap();
    assert!(err(moe_gate_up_swiglu(&gpu, g, &mut ws, t - 1, &x, &gu)).contains("routed for 5"));
    let x_bad = gpu.alloc::<bf16>(&[t, h + 8]).unwrap();
    assert!(err(moe_gate_up_swiglu(&gpu, g, &mut ws, t, &x_bad, &gu)).contains("`x`"));
    let gu_bad = gpu.alloc::<bf16>(&[e, f, h]).unwrap();
    assert!(err(moe_gate_up_swiglu(&gpu, g, &mut ws, t, &x, &gu_bad)).contains("`w_gate_up`"));
    let down_bad = gpu.alloc::<bf16>(&[e - 1, h, f]).unwrap();
    assert!(err(moe_down_combine(&gpu, g, &mut ws, t, &down_bad, &mut out)).contains("`w_down`"));
    let mut out_bad = gpu.alloc::<bf16>(&[t - 1, h]).unwrap();
    assert!(err(moe_down_combine(&gpu, g, &mut ws, t, &down, &mut out_bad)).contains("`out`"));
    // And the good calls go through.
    let (mut gu, mut down) = (gu, down);
    fill_normal(&gpu, &mut gu, 1, 0.0, 0.1).unwrap();
    fill_normal(&gpu, &mut down, 2, 0.0, 0.1).unwrap();
    moe_gate_up_swiglu(&gpu, g, &mut ws, t, &x, &gu).unwrap();
    moe_down_combine(&gpu, g, &mut ws, t, &down, &mut out).unwrap();
    gpu.synchronize().unwrap();
    // Zero rows is a no-op.
    moe_route(&gpu, 0, &l, &soft, &mut ws).unwrap();
    moe_gate_up_swiglu(&gpu, g, &mut ws, 0, &x, &gu).unwrap();
    moe_down_combine(&gpu, g, &mut ws, 0, &down, &mut out).unwrap();
}
