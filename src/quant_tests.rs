//! CPU tests of `quant`: the E4M3 code (every code, rounding, saturation), scales, round trips
//! and refusals.
use super::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Every finite code, ascending by value (positive codes 0x00..=0x7E).
fn positive_values() -> Vec<(u8, f32)> {
    (0u8..=0x7E).map(|b| (b, e4m3_decode(b))).collect()
}

#[test]
fn decode_known_codes() {
    assert_eq!(e4m3_decode(0x00), 0.0);
    assert!(e4m3_decode(0x80) == 0.0 && e4m3_decode(0x80).is_sign_negative());
    assert_eq!(e4m3_decode(0x01), 2f32.powi(-9)); // smallest subnormal
    assert_eq!(e4m3_decode(0x07), 7.0 / 8.0 * 2f32.powi(-6)); // largest subnormal
    assert_eq!(e4m3_decode(0x08), 2f32.powi(-6)); // smallest normal
    assert_eq!(e4m3_decode(0x38), 1.0);
    assert_eq!(e4m3_decode(0x3C), 1.5);
    assert_eq!(e4m3_decode(0x7E), 448.0);
    assert_eq!(e4m3_decode(0xFE), -448.0);
    assert!(e4m3_decode(0x7F).is_nan() && e4m3_decode(0xFF).is_nan());
    // Strictly increasing over the positive codes: the code order is the value order.
    let v = positive_values();
    assert!(v.windows(2).all(|w| w[0].1 < w[1].1));
}

#[test]
fn encode_decode_round_trips_every_code() {
    for b in 0u8..=255 {
        if b & 0x7F == 0x7F {
            continue;
        }
        assert_eq!(e4m3_encode(e4m3_decode(b)), b, "code {b:#04x} = {}", e4m3_decode(b));
    }
}

#[test]
fn encode_rounds_to_nearest_even_at_every_midpoint() {
    let v = positive_values();
    for w in v.windows(2) {
        let ((lo_b, lo), (hi_b, hi)) = (w[0], w[1]);
        let mid = 0.5 * (lo + hi); // exact: both are short binary fractions
        let even = if lo_b % 2 == 0 { lo_b } else { hi_b };
        assert_eq!(e4m3_encode(mid), even, "midpoint of {lo} and {hi}");
        assert_eq!(e4m3_encode(-mid), 0x80 | even, "midpoint of -{lo} and -{hi}");
        let below = f32::from_bits(mid.to_bits() - 1);
        let above = f32::from_bits(mid.to_bits() + 1);
        assert_eq!(e4m3_encode(below), lo_b, "just below the midpoint of {lo} and {hi}");
        assert_eq!(e4m3_encode(above), hi_b, "just above the midpoint of {lo} and {hi}");
    }
}

#[test]
fn encode_is_the_nearest_code_on_random_values() {
    let v = positive_values();
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..20000 {
        // Log-uniform magnitudes from 2^-12 to 2^9 (subnormals, normals and saturation).
        let x = 2f32.powf(rng.gen_range(-12.0..9.0)) * if i % 2 == 0 { 1.0 } else { -1.0 };
        let got = e4m3_decode(e4m3_encode(x));
        let a = x.abs().min(448.0);
        let best = v.iter().map(|&(_, y)| (y - a).abs()).fold(f32::INFINITY, f32::min);
        assert_eq!((got.abs() - a).abs(), best, "x = {x}: got {got}");
        assert_eq!(got.is_sign_negative(), x < 0.0, "x = {x}: sign");
    }
}

#[test]
fn encode_saturates_and_keeps_nan() {
    for x in [448.0, 448.5, 464.0, 480.0, 500.0, 1e6, f32::MAX, f32::INFINITY] {
        assert_eq!(e4m3_encode(x), 0x7E, "{x}");
        assert_eq!(e4m3_encode(-x), 0xFE, "-{x}");
    }
    assert_eq!(e4m3_encode(f32::NAN), 0x7F);
    // Below half the smallest subnormal: signed zero; f32 subnormals too.
    assert_eq!(e4m3_encode(2f32.powi(-10)), 0x00); // tie → even (0)
    assert_eq!(e4m3_encode(-1e-40), 0x80);
    assert_eq!(e4m3_encode(1.5 * 2f32.powi(-10)), 0x01);
    assert_eq!(e4m3_encode(3.0 * 2f32.powi(-10)), 0x02); // 1.5 ulp: tie → even (2)
    assert_eq!(e4m3_encode(15.5 * 2f32.powi(-10)), 0x08); // rounds up into the first normal
}

fn normal_matrix(n: usize, k: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let d = Normal::new(0.0f32, std).unwrap();
    (0..n * k).map(|_| bf16::from_f32(d.sample(&mut rng)).to_f32()).collect()
}

/// |w − q·s| within half an E4M3 step of w/s (relative 2⁻⁴ for normals, 2⁻¹⁰·s below 2⁻⁶·s).
fn assert_round_trip(m: &Fp8Matrix, w: &[f32]) {
    let d = m.dequantize();
    for r in 0..m.n {
        for c in 0..m.k {
            let (x, y, s) = (w[r * m.k + c], d[r * m.k + c], m.scale_at(r, c));
            let bound = (x.abs() * 2f32.powi(-4)).max(s * 2f32.powi(-10)) * 1.0001;
            assert!((x - y).abs() <= bound, "{:?} [{r}, {c}]: {x} → {y} (scale {s})", m.layout);
        }
    }
}

#[test]
fn channel_quantisation_round_trips() {
    for &(n, k) in &[(1, 16), (19, 136), (128, 256), (200, 384)] {
        let w = normal_matrix(n, k, 0.05, (n * k) as u64);
        let m = Fp8Matrix::quantize("t", &w, n, k, ScaleLayout::Channel).unwrap();
        assert_eq!((m.q.len(), m.scales.len()), (n * k, n));
        assert_round_trip(&m, &w);
        for r in 0..n {
            let row = &w[r * k..(r + 1) * k];
            let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(m.scales[r], amax / 448.0, "row {r} scale");
            // The row's largest element lands on ±448 (the code range is fully used).
            let i = row.iter().position(|v| v.abs() == amax).unwrap();
            assert_eq!(m.q[r * k + i] & 0x7F, 0x7E, "row {r}: the max element's code");
        }
    }
}

#[test]
fn block_quantisation_round_trips_with_bf16_scales() {
    for &(n, k) in &[(1, 16), (19, 136), (128, 256), (300, 400)] {
        let mut w = normal_matrix(n, k, 0.05, 7 + (n * k) as u64);
        // One block with much larger values: its scale is larger, the others are unaffected.
        w[0] = 30.0;
        let m = Fp8Matrix::quantize("t", &w, n, k, ScaleLayout::Block128).unwrap();
        let (nb, kb) = (n.div_ceil(128), k.div_ceil(128));
        assert_eq!(m.scales.len(), nb * kb);
        assert_round_trip(&m, &w);
        for (i, &s) in m.scales.iter().enumerate() {
            assert_eq!(s, bf16::from_f32(s).to_f32(), "scale {i} = {s} is not a bf16 value");
            let (bi, bj) = (i / kb, i % kb);
            let amax = (bi * 128..((bi + 1) * 128).min(n))
                .flat_map(|r| (bj * 128..((bj + 1) * 128).min(k)).map(move |c| (r, c)))
                .fold(0f32, |a, (r, c)| a.max(w[r * k + c].abs()));
            // Rounded up by less than one bf16 step: the code range is (almost) fully used.
            assert!(amax / s <= 448.0 && amax / s > 448.0 * (1.0 - 2f32.powi(-7)), "block {i}: amax {amax} / scale {s}");
        }
        assert_eq!(m.scales[0], bf16_ceil(30.0 / 448.0));
        assert!(m.scales[0] > 30.0 / 448.0);
        // The MMA operand is the dequantised weight rounded to bf16 (≤ 2⁻⁸ relative).
        let (ops, post) = m.mma_operands();
        for (a, b) in ops.iter().zip(m.dequantize()) {
            assert_eq!(*a, bf16::from_f32(b).to_f32());
        }
        assert!(post.iter().all(|&p| p == 1.0));
    }
}

#[test]
fn channel_mma_operands_are_codes_and_scales() {
    let w = normal_matrix(9, 32, 1.0, 3);
    let m = Fp8Matrix::quantize("t", &w, 9, 32, ScaleLayout::Channel).unwrap();
    let (ops, post) = m.mma_operands();
    assert_eq!(post, m.scales);
    let d = m.dequantize();
    for r in 0..9 {
        for c in 0..32 {
            assert_eq!(ops[r * 32 + c], e4m3_decode(m.q[r * 32 + c]));
            assert_eq!(ops[r * 32 + c] * post[r], d[r * 32 + c]);
        }
    }
}

#[test]
fn published_block_scales_round_in_the_mma_operand() {
    // A scale that is not a power of two (as published checkpoints have): the operand is
    // bf16(q · bf16(s)): two bf16 roundings, within 2⁻⁷ relative of q · s.
    let q: Vec<u8> = (0..16u8).map(|i| 0x30 + i).collect();
    let m = Fp8Matrix::from_parts("p", 1, 16, q, vec![0.0123], ScaleLayout::Block128).unwrap();
    let (ops, _) = m.mma_operands();
    for (a, b) in ops.iter().zip(m.dequantize()) {
        assert_eq!(*a, bf16::from_f32(*a).to_f32(), "operand is a bf16 value");
        assert!((a - b).abs() <= b.abs() * 2f32.powi(-7), "{a} vs {b}");
    }
}

#[test]
fn zero_rows_and_blocks_get_unit_scales() {
    let mut w = normal_matrix(130, 16, 1.0, 5);
    w[16..32].iter_mut().for_each(|v| *v = 0.0); // row 1
    let m = Fp8Matrix::quantize("z", &w, 130, 16, ScaleLayout::Channel).unwrap();
    assert_eq!(m.scales[1], 1.0);
    assert!(m.q[16..32].iter().all(|&b| b == 0));
    let z = vec![0f32; 4 * 16];
    let b = Fp8Matrix::quantize("z", &z, 4, 16, ScaleLayout::Block128).unwrap();
    assert_eq!(b.scales, vec![1.0]);
    assert_eq!(b.dequantize(), z);
}

#[test]
fn non_finite_weights_are_refused_by_name() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for layout in [ScaleLayout::Channel, ScaleLayout::Block128] {
            let mut w = normal_matrix(4, 32, 1.0, 9);
            w[2 * 32 + 5] = bad;
            let e = Fp8Matrix::quantize("model.layers.3.mlp.up_proj.weight", &w, 4, 32, layout).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Weights { .. }), "{msg}");
            assert!(msg.contains("model.layers.3.mlp.up_proj.weight") && msg.contains("[2, 5]"), "{msg}");
        }
    }
    let e = Fp8Matrix::quantize_bf16("emb", &[bf16::NAN; 16], 1, 16, ScaleLayout::Channel).unwrap_err();
    assert!(e.to_string().contains("`emb`"), "{e}");
}

#[test]
fn bad_shapes_and_scales_are_refused() {
    let w = normal_matrix(2, 16, 1.0, 1);
    assert!(Fp8Matrix::quantize("s", &w, 3, 16, ScaleLayout::Channel).unwrap_err().to_string().contains("`s`"));
    assert!(Fp8Matrix::quantize("s", &[], 0, 16, ScaleLayout::Channel).is_err());
    let q = vec![0x38u8; 2 * 16];
    let ok = Fp8Matrix::from_parts("p", 2, 16, q.clone(), vec![0.5, 0.25], ScaleLayout::Channel).unwrap();
    assert_eq!(ok.dequantize(), [vec![0.5f32; 16], vec![0.25f32; 16]].concat());
    let cases: [(Vec<u8>, Vec<f32>, ScaleLayout, &str); 6] = [
        (q.clone(), vec![0.5], ScaleLayout::Channel, "1 scales"),
        (q.clone(), vec![0.5, 0.5], ScaleLayout::Block128, "2 scales"),
        (q.clone(), vec![0.5, f32::NAN], ScaleLayout::Channel, "scale 1"),
        (q.clone(), vec![0.5, 0.0], ScaleLayout::Channel, "scale 1"),
        (q.clone(), vec![-0.5, 0.5], ScaleLayout::Channel, "scale 0"),
        ([vec![0x38u8; 31], vec![0xFF]].concat(), vec![0.5, 0.5], ScaleLayout::Channel, "[1, 15] is NaN"),
    ];
    for (q, s, layout, want) in cases {
        let e = Fp8Matrix::from_parts("pub.weight", 2, 16, q, s, layout).unwrap_err().to_string();
        assert!(e.contains("pub.weight") && e.contains(want), "{e} (want {want})");
    }
    // A weight too large for the kernel's scale range (|w| > 128 · 448) is refused, not clipped.
    let e = Fp8Matrix::quantize("big", &[1e6; 16], 1, 16, ScaleLayout::Block128).unwrap_err();
    assert!(e.to_string().contains("`big`"), "{e}");
}

#[test]
fn format_names_parse() {
    for f in [WeightFormat::Bf16, WeightFormat::Fp8(ScaleLayout::Channel), WeightFormat::Fp8(ScaleLayout::Block128)] {
        assert_eq!(f.name().parse::<WeightFormat>().unwrap(), f);
    }
    assert!("fp4".parse::<WeightFormat>().unwrap_err().to_string().contains("fp4"));
    assert_eq!("block".parse::<ScaleLayout>().unwrap(), ScaleLayout::Block128);
    assert_eq!(WeightFormat::Fp8(ScaleLayout::Channel).bytes_per_weight(), 1);
}

#[test]
fn fp8_lm_head_switch_parses_zero_one_and_refuses_the_rest() {
    assert!(!parse_fp8_lm_head("0").unwrap() && !parse_fp8_lm_head("").unwrap() && !parse_fp8_lm_head(" 0 ").unwrap());
    assert!(parse_fp8_lm_head("1").unwrap());
    let e = parse_fp8_lm_head("yes").unwrap_err().to_string();
    assert!(e.contains("DEMASK_FP8_LM_HEAD") && e.contains("`yes`"), "{e}");
}
