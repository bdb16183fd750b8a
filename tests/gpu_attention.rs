//! GPU attention (both variants of kernels/attention.cu) against the f32 CPU reference.
//!
//! Inputs are seeded normal values rounded to bf16; the CPU reference gets the rounded values.
//! Tolerance for the bf16 output against the f32 reference: |gpu − ref| ≤ 2e-2 + 2e-2·|ref| for
//! every element, and the flash variant's largest error is at most 2× the reference variant's
//! (plus 2e-3 for the bf16 rounding of P, which the f32 reference kernel does not do).
//! Outputs are poisoned with NaN before each launch; rows outside every sequence must stay NaN.
//! Block-causal cases (LLaDA2) check against `cpu::attention::attention_capped` and fill the
//! cache rows no query may see with NaN: a kernel that reads them fails.
use demask::batch::SeqSpan;
use demask::gpu::{test_gpu, DTensor, Gpu, Timer};
use demask::ops::attention::{
    attention, attention_forced, split_kv_supported, AttnMask, AttnVariant, FlashPath,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

const D: usize = 128;
const ATOL: f32 = 2e-2;
const RTOL: f32 = 2e-2;

/// One sequence of a test batch: live rows, keys attended, gap before its cache rows.
#[derive(Clone, Copy)]
struct Seq {
    rows: usize,
    kv_len: usize,
    gap: usize,
}

struct Case {
    name: &'static str,
    seqs: Vec<Seq>,
    n_heads: usize,
    n_kv: usize,
    /// Standard deviation of q and k (large → peaked softmax).
    std: f32,
    seed: u64,
}

fn rounded(rng: &mut StdRng, n: usize, std: f32) -> (Vec<bf16>, Vec<f32>) {
    let dist = Normal::new(0.0f32, std).unwrap();
    let b: Vec<bf16> = (0..n).map(|_| bf16::from_f32(dist.sample(rng))).collect();
    let f = b.iter().map(|x| x.to_f32()).collect();
    (b, f)
}

struct Built {
    rows: usize,
    q_stride: usize,
    spans: Vec<SeqSpan>,
    max_rows: usize,
    qkv: (Vec<bf16>, Vec<f32>),
    k: (Vec<bf16>, Vec<f32>),
    v: (Vec<bf16>, Vec<f32>),
    /// Canvas position of each packed live row.
    positions: Vec<u32>,
}

/// Packs the sequences' live rows from row 0; cache rows are laid out with a gap before each
/// sequence (cache_base not packed from 0). Each sequence's live rows sit at a random subset of
/// its positions, and their K/V (the k/v parts of the fused QKV rows) are written into the cache
/// there, as rope + kv_store would.
fn build(c: &Case) -> Built {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let q_stride = (c.n_heads + 2 * c.n_kv) * D;
    let kv_w = c.n_kv * D;
    let rows: usize = c.seqs.iter().map(|s| s.rows).sum();
    let mut spans = Vec::new();
    let (mut row, mut base) = (0usize, 0usize);
    for s in &c.seqs {
        assert!(s.rows <= s.kv_len);
        base += s.gap;
        spans.push(SeqSpan {
            row_start: row as u32,
            row_count: s.rows as u32,
            cache_base: base as u32,
            kv_len: s.kv_len as u32,
        });
        row += s.rows;
        base += s.kv_len;
    }
    let cache_rows = base + 3;
    let qkv = rounded(&mut rng, rows * q_stride, c.std);
    let mut k = rounded(&mut rng, cache_rows * kv_w, c.std);
    let mut v = rounded(&mut rng, cache_rows * kv_w, 1.0);
    let mut positions = vec![0u32; rows];
    for sp in &spans {
        let mut pos: Vec<usize> = (0..sp.kv_len as usize).collect();
        pos.shuffle(&mut rng);
        for (i, &p) in pos[..sp.row_count as usize].iter().enumerate() {
            let r = sp.row_start as usize + i;
            positions[r] = p as u32;
            let dst = (sp.cache_base as usize + p) * kv_w;
            let ks = r * q_stride + c.n_heads * D;
            let vs = ks + kv_w;
            k.0[dst..dst + kv_w].copy_from_slice(&qkv.0[ks..ks + kv_w]);
            k.1[dst..dst + kv_w].copy_from_slice(&qkv.1[ks..ks + kv_w]);
            v.0[dst..dst + kv_w].copy_from_slice(&qkv.0[vs..vs + kv_w]);
            v.1[dst..dst + kv_w].copy_from_slice(&qkv.1[vs..vs + kv_w]);
        }
    }
    let max_rows = c.seqs.iter().map(|s| s.rows).max().unwrap_or(0);
    Built {
        rows,
        q_stride,
        spans,
        max_rows,
        qkv,
        k,
        v,
        positions,
    }
}

/// Block-causal key bound of each packed row: `min(kv_len, (pos / block + 1) · block)`.
fn caps(b: &Built, block: usize) -> Vec<usize> {
    let mut caps = vec![0; b.rows];
    for sp in &b.spans {
        for r in sp.row_start as usize..(sp.row_start + sp.row_count) as usize {
            caps[r] = ((b.positions[r] as usize / block + 1) * block).min(sp.kv_len as usize);
        }
    }
    caps
}

/// NaN in every cache row of a sequence at or past the largest bound of its rows: no query may
/// read them (a block not yet written holds whatever the memory held).
fn poison_unseen_keys(b: &mut Built, block: usize, kv_w: usize) {
    let caps = caps(b, block);
    for sp in &b.spans {
        let (lo, hi) = (sp.row_start as usize, (sp.row_start + sp.row_count) as usize);
        let seen = caps[lo..hi].iter().copied().max().unwrap_or(0);
        let (from, to) = ((sp.cache_base as usize + seen) * kv_w, (sp.cache_base + sp.kv_len) as usize * kv_w);
        for t in [&mut b.k, &mut b.v] {
            t.0[from..to].fill(bf16::NAN);
            t.1[from..to].fill(f32::NAN);
        }
    }
}

fn spans_flat(spans: &[SeqSpan]) -> Vec<u32> {
    spans
        .iter()
        .flat_map(|s| [s.row_start, s.row_count, s.cache_base, s.kv_len])
        .collect()
}

struct Dev {
    q: DTensor<bf16>,
    k: DTensor<bf16>,
    v: DTensor<bf16>,
    seqs: DTensor<u32>,
    out: DTensor<bf16>,
    positions: DTensor<u32>,
}

/// Output rows allocated past `rows`, which no sequence covers: they must stay poisoned.
const EXTRA_ROWS: usize = 2;

fn upload(gpu: &Gpu, b: &Built, c: &Case) -> Dev {
    let kv_w = c.n_kv * D;
    Dev {
        q: gpu.upload(&b.qkv.0, &[b.rows, b.q_stride]).unwrap(),
        k: gpu.upload(&b.k.0, &[b.k.0.len() / kv_w, kv_w]).unwrap(),
        v: gpu.upload(&b.v.0, &[b.v.0.len() / kv_w, kv_w]).unwrap(),
        seqs: gpu
            .upload(&spans_flat(&b.spans), &[b.spans.len(), 4])
            .unwrap(),
        out: gpu.alloc(&[b.rows + EXTRA_ROWS, c.n_heads * D]).unwrap(),
        positions: gpu.upload(&b.positions, &[b.rows]).unwrap(),
    }
}

/// Runs one variant (for flash: along the given path) into a poisoned output.
fn run(
    gpu: &Gpu,
    variant: AttnVariant,
    path: FlashPath,
    b: &Built,
    c: &Case,
    block: Option<usize>,
    d: &mut Dev,
) -> Vec<f32> {
    let poison = vec![bf16::NAN; d.out.len()];
    d.out.write(gpu, &poison).unwrap();
    let (rows, n_seqs) = (b.rows, b.spans.len());
    let mask = match block {
        Some(block) => AttnMask::BlockCausal { positions: &d.positions, block },
        None => AttnMask::Bidirectional,
    };
    attention_forced(
        gpu, variant, path, rows, &d.q, b.q_stride, &d.seqs, n_seqs, b.max_rows, &d.k, &d.v,
        c.n_heads, c.n_kv, mask, None, &mut d.out,
    )
    .unwrap_or_else(|e| panic!("{}: {variant} ({path:?}) launch: {e}", c.name));
    gpu.synchronize()
        .unwrap_or_else(|e| panic!("{}: {variant}: {e}", c.name));
    d.out
        .to_host(gpu)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect()
}

/// Checks every element against the reference; returns the largest |got − want|.
fn check(case: &str, variant: &str, got: &[f32], want: &[f32], width: usize) -> f32 {
    let mut bad = Vec::new();
    let mut max_err = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        // NaN or ±inf in `got` fails too.
        let ok = err <= ATOL + RTOL * w.abs();
        if !ok {
            bad.push((i / width, i % width, g, w));
        }
        if err.is_finite() {
            max_err = max_err.max(err);
        }
    }
    for &(r, col, g, w) in bad.iter().take(8) {
        eprintln!(
            "{case} {variant}: row {r} head {} dim {}: got {g}, want {w}",
            col / D,
            col % D
        );
    }
    assert!(
        bad.is_empty(),
        "{case} {variant}: {} of {} elements out of tolerance",
        bad.len(),
        want.len()
    );
    let extra = &got[want.len()..];
    assert!(
        extra.iter().all(|x| x.is_nan()),
        "{case} {variant}: rows outside every sequence were written"
    );
    max_err
}

fn run_case(c: &Case) {
    run_case_with(c, None)
}

/// `block`: block-causal with that block length (else bidirectional).
fn run_case_with(c: &Case, block: Option<usize>) {
    let Some(gpu) = test_gpu() else { return };
    let mut b = build(c);
    let width = c.n_heads * D;
    let mut want = vec![0f32; b.rows * width];
    let caps = block.map(|bl| {
        poison_unseen_keys(&mut b, bl, c.n_kv * D);
        caps(&b, bl)
    });
    demask::cpu::attention::attention_capped(
        &b.qkv.1, b.q_stride, &b.k.1, &b.v.1, &b.spans, c.n_heads, c.n_kv, caps.as_deref(), &mut want,
    );
    assert!(want.iter().all(|x| x.is_finite()), "{}: the reference read a poisoned key", c.name);
    let mut d = upload(&gpu, &b, c);
    let got_ref = run(&gpu, AttnVariant::Reference, FlashPath::Auto, &b, c, block, &mut d);
    let err_ref = check(c.name, "reference", &got_ref, &want, width);
    let mut paths = vec![FlashPath::Whole];
    if split_kv_supported(&gpu).unwrap() {
        paths.push(FlashPath::SplitKv);
    } else {
        eprintln!("{}: split-KV path not checked (needs sm_90+)", c.name);
    }
    for path in paths {
        let label = format!("flash {path:?}");
        let label = label.as_str();
        let got_fa = run(&gpu, AttnVariant::Flash, path, &b, c, block, &mut d);
        let err_fa = check(c.name, label, &got_fa, &want, width);
        eprintln!(
            "{}: max |err| reference {err_ref:.2e}, {label} {err_fa:.2e}",
            c.name
        );
        assert!(
            err_fa <= 2.0 * err_ref + 2e-3,
            "{}: {label} error {err_fa:.3e} is more than 2x the reference variant's {err_ref:.3e} (+2e-3)",
            c.name
        );
    }
}

fn seq(rows: usize, kv_len: usize, gap: usize) -> Seq {
    Seq { rows, kv_len, gap }
}

#[test]
fn tiny_heads_awkward_lengths() {
    run_case(&Case {
        name: "tiny 2/2",
        seqs: vec![seq(1, 1, 0), seq(19, 33, 5), seq(7, 7, 0), seq(1, 513, 2)],
        n_heads: 2,
        n_kv: 2,
        std: 1.0,
        seed: 1,
    });
    run_case(&Case {
        name: "tiny 4/2",
        seqs: vec![
            seq(99, 511, 3),
            seq(111, 111, 1),
            seq(3, 65, 0),
            seq(64, 64, 0),
            seq(65, 129, 7),
        ],
        n_heads: 4,
        n_kv: 2,
        std: 1.0,
        seed: 2,
    });
}

#[test]
fn gqa_dream_heads() {
    run_case(&Case {
        name: "gqa 28/4",
        seqs: vec![
            seq(19, 300, 11),
            seq(1, 1, 0),
            seq(111, 513, 4),
            seq(32, 1000, 0),
        ],
        n_heads: 28,
        n_kv: 4,
        std: 1.0,
        seed: 3,
    });
}

#[test]
fn mha_llada_heads() {
    run_case(&Case {
        name: "mha 32/32",
        seqs: vec![seq(99, 257, 9), seq(7, 33, 1), seq(1, 64, 0)],
        n_heads: 32,
        n_kv: 32,
        std: 1.0,
        seed: 4,
    });
}

#[test]
fn peaked_softmax() {
    // q, k with std 4: scores have std ~16 after scaling, so a few keys dominate each row.
    run_case(&Case {
        name: "peaked 28/4",
        seqs: vec![seq(19, 200, 3), seq(64, 129, 0)],
        n_heads: 28,
        n_kv: 4,
        std: 4.0,
        seed: 5,
    });
    run_case(&Case {
        name: "peaked 4/2",
        seqs: vec![seq(33, 77, 1)],
        n_heads: 4,
        n_kv: 2,
        std: 6.0,
        seed: 6,
    });
}

/// (query heads, kv heads) of a production test: the model's, or at sanitizer scale
/// (`gpu::sanitizer_shapes`) `kv` kv heads with the model's group size (the rows, key lengths
/// and both flash paths stay; only the grid shrinks).
fn production_heads(n_heads: usize, n_kv: usize, kv: usize) -> (usize, usize) {
    if demask::gpu::sanitizer_shapes() {
        (n_heads / n_kv * kv, kv)
    } else {
        (n_heads, n_kv)
    }
}

#[test]
fn production_full_canvas_512() {
    let (n_heads, n_kv) = production_heads(32, 32, 2);
    run_case(&Case {
        name: "llada 512x512",
        seqs: vec![seq(512, 512, 0)],
        n_heads,
        n_kv,
        std: 1.0,
        seed: 7,
    });
    let (n_heads, n_kv) = production_heads(28, 4, 1);
    run_case(&Case {
        name: "dream 512x512",
        seqs: vec![seq(512, 512, 0)],
        n_heads,
        n_kv,
        std: 1.0,
        seed: 8,
    });
}

#[test]
fn production_decode_32_live_of_512() {
    run_case(&Case {
        name: "llada decode 32x512",
        seqs: vec![seq(32, 512, 0)],
        n_heads: 32,
        n_kv: 32,
        std: 1.0,
        seed: 9,
    });
    run_case(&Case {
        name: "dream decode batch",
        seqs: vec![seq(32, 512, 0), seq(32, 700, 16), seq(33, 290, 0)],
        n_heads: 28,
        n_kv: 4,
        std: 1.0,
        seed: 10,
    });
}

#[test]
fn production_full_canvas_2048() {
    let (n_heads, n_kv) = production_heads(32, 32, 1);
    run_case(&Case {
        name: "llada 2048x2048",
        seqs: vec![seq(2048, 2048, 0)],
        n_heads,
        n_kv,
        std: 1.0,
        seed: 11,
    });
}

/// Block-causal (LLaDA2, blocks of 32 and odd ones): live rows at random positions, so an
/// M-tile mixes rows of different blocks; cache rows past every row's block are NaN.
#[test]
fn block_causal_random_positions() {
    run_case_with(
        &Case {
            name: "block-causal 16/4",
            seqs: vec![seq(1, 1, 0), seq(19, 300, 5), seq(64, 64, 0), seq(100, 513, 2)],
            n_heads: 16,
            n_kv: 4,
            std: 1.0,
            seed: 21,
        },
        Some(32),
    );
    run_case_with(
        &Case {
            name: "block-causal 4/2 block 7",
            seqs: vec![seq(33, 77, 1), seq(7, 200, 0)],
            n_heads: 4,
            n_kv: 2,
            std: 3.0,
            seed: 22,
        },
        Some(7),
    );
}

/// The shapes block diffusion runs: a prefill of whole blocks (512 rows over 512 keys) and a
/// decode step (32 rows of one block over 512 keys, the later ones NaN), LLaDA2-mini heads.
#[test]
fn block_causal_llada2_shapes() {
    run_case_with(
        &Case { name: "llada2 prefill 512", seqs: vec![seq(512, 512, 0)], n_heads: 16, n_kv: 4, std: 1.0, seed: 23 },
        Some(32),
    );
    run_case_with(
        &Case {
            name: "llada2 step 32 of 512",
            seqs: vec![seq(32, 512, 0), seq(64, 300, 3)],
            n_heads: 16,
            n_kv: 4,
            std: 1.0,
            seed: 24,
        },
        Some(32),
    );
}

/// A bad block length, too few positions or a short `fresh` array is refused by name.
#[test]
fn block_causal_refusals() {
    let Some(gpu) = test_gpu() else { return };
    let c = Case { name: "refuse", seqs: vec![seq(8, 40, 0)], n_heads: 4, n_kv: 2, std: 1.0, seed: 25 };
    let b = build(&c);
    let mut d = upload(&gpu, &b, &c);
    let short: DTensor<u32> = gpu.upload(&[0u32; 4], &[4]).unwrap();
    let one: DTensor<u32> = gpu.upload(&[0u32; 1], &[1]).unwrap();
    for (mask, fresh, want) in [
        (AttnMask::BlockCausal { positions: &d.positions, block: 0 }, None, "block length 0"),
        (AttnMask::BlockCausal { positions: &short, block: 32 }, None, "`positions`"),
        (AttnMask::Bidirectional, Some(&one), "`fresh`"),
    ] {
        let e = attention(&gpu, AttnVariant::Flash, b.rows, &d.q, b.q_stride, &d.seqs, 1, b.max_rows, &d.k, &d.v, 4, 2, mask, fresh, &mut d.out)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// Times the flash kernel on the target shapes (H100 targets: 512² ≤ 30 µs, 2048² ≤ 300 µs,
/// 32×512 decode ≤ 10 µs, all at 32 heads). Prints; does not fail on time.
#[test]
fn flash_timing() {
    let Some(gpu) = test_gpu() else { return };
    let shapes: [(&'static str, usize, usize, usize, usize); 8] = [
        ("llada decode 32x64", 32, 64, 32, 32),
        ("llada decode 32x2048", 32, 2048, 32, 32),
        ("llada decode 1x512", 1, 512, 32, 32),
        ("llada 512x512", 512, 512, 32, 32),
        ("llada 2048x2048", 2048, 2048, 32, 32),
        ("llada decode 32x512", 32, 512, 32, 32),
        ("dream 512x512", 512, 512, 28, 4),
        ("dream decode 32x512", 32, 512, 28, 4),
    ];
    for (name, rows, kv, h, kvh) in shapes {
        let c = Case {
            name,
            seqs: vec![seq(rows, kv, 0)],
            n_heads: h,
            n_kv: kvh,
            std: 1.0,
            seed: 12,
        };
        let b = build(&c);
        let mut d = upload(&gpu, &b, &c);
        let split_ok = split_kv_supported(&gpu).unwrap();
        let runs: [(&str, AttnVariant, FlashPath); 4] = [
            ("reference", AttnVariant::Reference, FlashPath::Auto),
            ("flash", AttnVariant::Flash, FlashPath::Auto),
            ("flash-whole", AttnVariant::Flash, FlashPath::Whole),
            ("flash-split", AttnVariant::Flash, FlashPath::SplitKv),
        ];
        for (label, variant, path) in runs {
            if path == FlashPath::SplitKv && !split_ok {
                continue;
            }
            let iters = 50;
            let launch = |d: &mut Dev| {
                match path {
                    FlashPath::Auto => attention(
                        &gpu, variant, b.rows, &d.q, b.q_stride, &d.seqs, 1, b.max_rows, &d.k,
                        &d.v, h, kvh, AttnMask::Bidirectional, None, &mut d.out,
                    ),
                    p => attention_forced(
                        &gpu, variant, p, b.rows, &d.q, b.q_stride, &d.seqs, 1, b.max_rows, &d.k,
                        &d.v, h, kvh, AttnMask::Bidirectional, None, &mut d.out,
                    ),
                }
                .unwrap()
            };
            for _ in 0..5 {
                launch(&mut d);
            }
            let t = Timer::new(&gpu).unwrap();
            t.start(&gpu).unwrap();
            for _ in 0..iters {
                launch(&mut d);
            }
            let us = t.stop_ms(&gpu).unwrap() * 1e3 / iters as f32;
            let flops = 4.0 * rows as f64 * kv as f64 * D as f64 * h as f64;
            eprintln!(
                "attention/{label}/{name}: {us:.1} us, {:.0} TFLOP/s",
                flops / (us as f64 * 1e-6) / 1e12
            );
        }
    }
}

/// Bit-pattern equality of two bf16 outputs (NaN-poisoned rows included).
fn same_bits(a: &[bf16], b: &[bf16]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits())
}

/// `fresh` (keys copied before the wait when outside it) changes no value: with no kernel
/// writing the cache, every fresh range — none, a tile-aligned block, one straddling two tiles,
/// the last keys, an empty range, all keys, a range past kv_len — gives the bits of `None`, on
/// both flash paths, one and several sequences (each with its own range).
#[test]
fn fresh_ranges_change_no_value() {
    let Some(gpu) = test_gpu() else { return };
    let split_ok = split_kv_supported(&gpu).unwrap();
    let cases = [
        Case { name: "llada decode", seqs: vec![seq(32, 512, 0)], n_heads: 32, n_kv: 32, std: 1.0, seed: 41 },
        Case { name: "dream batch", seqs: vec![seq(32, 512, 0), seq(32, 700, 16), seq(33, 290, 0)], n_heads: 28, n_kv: 4, std: 1.0, seed: 42 },
        Case { name: "long", seqs: vec![seq(8, 1000, 5)], n_heads: 8, n_kv: 2, std: 1.0, seed: 43 },
    ];
    for c in &cases {
        let b = build(c);
        let mut d = upload(&gpu, &b, c);
        let ranges = |s: usize| -> Vec<[u32; 2]> {
            let kv = b.spans[s].kv_len;
            vec![[256, 288], [250, 270], [kv - 33, kv], [7, 7], [0, kv], [kv - 5, kv + 90], [0, 1], [64, 128]]
        };
        let paths: &[FlashPath] = if split_ok { &[FlashPath::Whole, FlashPath::SplitKv] } else { &[FlashPath::Whole] };
        for &path in paths {
            let none = run_fresh(&gpu, path, &b, c, None, &mut d);
            for i in 0..ranges(0).len() {
                // Sequence s takes range i + s: each sequence its own.
                let flat: Vec<u32> = (0..b.spans.len()).flat_map(|s| ranges(s)[(i + s) % ranges(s).len()]).collect();
                let f = gpu.upload(&flat, &[b.spans.len(), 2]).unwrap();
                let got = run_fresh(&gpu, path, &b, c, Some(&f), &mut d);
                if let Some(at) = same_bits(&got, &none) {
                    panic!("{} {path:?} fresh {flat:?}: element {at} is {} with the range, {} without", c.name, got[at], none[at]);
                }
            }
        }
        eprintln!("{}: fresh ranges bit-identical on {} path(s)", c.name, paths.len());
    }
}

fn run_fresh(gpu: &Gpu, path: FlashPath, b: &Built, c: &Case, fresh: Option<&DTensor<u32>>, d: &mut Dev) -> Vec<bf16> {
    d.out.write(gpu, &vec![bf16::NAN; d.out.len()]).unwrap();
    attention_forced(
        gpu, AttnVariant::Flash, path, b.rows, &d.q, b.q_stride, &d.seqs, b.spans.len(), b.max_rows, &d.k, &d.v,
        c.n_heads, c.n_kv, AttnMask::Bidirectional, fresh, &mut d.out,
    )
    .unwrap();
    gpu.synchronize().unwrap();
    d.out.to_host(gpu).unwrap()
}

/// The contract `fresh` exists for, as the model runs it: RoPE stores the live rows' K/V into
/// the cache and attention is launched right behind it (programmatic dependent launch, no sync).
/// The live rows' cache rows hold NaN before RoPE, so attention reading any of them before its
/// wait gives NaN; the output must be the bits of RoPE, a sync, then attention without `fresh`.
/// LLaDA-8B's decode shape (32 live rows at positions 256..288 of 512 keys, 32 heads) and a
/// block straddling two key tiles, on both flash paths, 5 trials each.
#[test]
fn fresh_keys_written_just_before_are_read_after_the_wait() {
    use demask::cpu::rope::RopeMode;
    use demask::ops::rope::{rope_kv_store, RopeExtras};
    let Some(gpu) = test_gpu() else { return };
    let split_ok = split_kv_supported(&gpu).unwrap();
    let (h, kv, rows) = (32usize, 512usize, 32usize);
    let (qkv_dim, kv_w) = (3 * h * D, h * D);
    let mut rng = StdRng::seed_from_u64(44);
    let qkv = rounded(&mut rng, rows * qkv_dim, 1.0).0;
    let k0 = rounded(&mut rng, kv * kv_w, 1.0).0;
    let v0 = rounded(&mut rng, kv * kv_w, 1.0).0;
    let seqs = gpu.upload(&[0u32, rows as u32, 0, kv as u32], &[1, 4]).unwrap();
    let paths: &[FlashPath] = if split_ok { &[FlashPath::Whole, FlashPath::SplitKv] } else { &[FlashPath::Whole] };
    for first in [256u32, 232] {
        let positions: Vec<u32> = (first..first + rows as u32).collect();
        let pos_d = gpu.upload(&positions, &[rows]).unwrap();
        let fresh = gpu.upload(&[first, first + rows as u32], &[1, 2]).unwrap();
        // The caches as they stand before this forward's RoPE: its rows poisoned.
        let (mut kp, mut vp) = (k0.clone(), v0.clone());
        for &p in &positions {
            let r = p as usize * kv_w..(p as usize + 1) * kv_w;
            kp[r.clone()].fill(bf16::NAN);
            vp[r].fill(bf16::NAN);
        }
        let mut q = gpu.upload(&qkv, &[rows, qkv_dim]).unwrap();
        let mut k = gpu.upload(&kp, &[kv, kv_w]).unwrap();
        let mut v = gpu.upload(&vp, &[kv, kv_w]).unwrap();
        let mut out = gpu.alloc::<bf16>(&[rows, h * D]).unwrap();
        let step = |q: &mut DTensor<bf16>, k: &mut DTensor<bf16>, v: &mut DTensor<bf16>, out: &mut DTensor<bf16>, path: FlashPath, f: Option<&DTensor<u32>>, sync: bool| {
            q.write(&gpu, &qkv).unwrap();
            k.write(&gpu, &kp).unwrap();
            v.write(&gpu, &vp).unwrap();
            out.write(&gpu, &vec![bf16::NAN; rows * h * D]).unwrap();
            gpu.synchronize().unwrap();
            rope_kv_store(&gpu, rows, q, &pos_d, &pos_d, k, v, h, h, 500000.0, RopeMode::Llada, &RopeExtras::none()).unwrap();
            if sync {
                gpu.synchronize().unwrap();
            }
            attention_forced(&gpu, AttnVariant::Flash, path, rows, q, qkv_dim, &seqs, 1, rows, k, v, h, h, AttnMask::Bidirectional, f, out).unwrap();
            gpu.synchronize().unwrap();
            out.to_host(&gpu).unwrap()
        };
        for &path in paths {
            let want = step(&mut q, &mut k, &mut v, &mut out, path, None, true);
            assert!(want.iter().all(|x| x.is_finite()), "block at {first} {path:?}: the synced reference has non-finite values");
            for trial in 0..5 {
                let got = step(&mut q, &mut k, &mut v, &mut out, path, Some(&fresh), false);
                if let Some(at) = same_bits(&got, &want) {
                    panic!("block at {first} {path:?} trial {trial}: element {at} is {} right behind RoPE, {} after a sync", got[at], want[at]);
                }
            }
        }
    }
}
