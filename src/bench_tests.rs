//! Tests of `bench` (the rooflines, statistics), in their own file to keep bench.rs short.
use super::*;

fn h100() -> Ceilings {
    // docs/bench.md's measured H100 ceilings.
    Ceilings {
        device: "H100".into(),
        sm_count: 132,
        copy_gbps: 3030.0,
        gemm_tflops: 796.0,
        fp8_tflops: Some(1500.0),
        fp8_path: Some("split-scale"),
    }
}

#[test]
fn w1_dual_step_floor_is_the_weight_read() {
    let cfg = ModelConfig::preset("llada-8b").unwrap();
    let r = step_roofline(&cfg, 1, 32.0, 512, 32, None, &h100());
    assert_eq!(r.bound, "memory");
    // docs/bench.md: 16.03 GB of weights at ~3.08 TB/s ≈ 5.2 ms.
    assert!((5.0..5.5).contains(&r.floor_ms), "{}", r.floor_ms);
}

#[test]
fn fp8_w1_floor_counts_one_byte_per_linear_weight() {
    use crate::quant::ScaleLayout;
    let cfg = ModelConfig::preset("llada-8b").unwrap();
    let bf = step_roofline(&cfg, 1, 32.0, 512, 32, None, &h100());
    let f8 = step_roofline_as(&cfg, WeightFormat::Fp8(ScaleLayout::Channel), 1, 32.0, 512, 32, None, &h100());
    let fb = step_roofline_as(&cfg, WeightFormat::Fp8(ScaleLayout::Block128), 1, 32.0, 512, 32, None, &h100());
    // 32 layers × 218.1 M linear weights save one byte each; per-channel scales add
    // 4 B × 32 × (12288 + 4096 + 24576 + 4096) rows, block scales far less.
    let linear = 32.0 * (4096.0 * 12288.0 + 4096.0 * 4096.0 + 3.0 * 4096.0 * 12288.0);
    let ch_scales = 4.0 * 32.0 * (12288.0 + 4096.0 + 24576.0 + 4096.0);
    assert!((bf.bytes - f8.bytes - (linear - ch_scales)).abs() < 1.0, "{} {}", bf.bytes, f8.bytes);
    assert!(fb.bytes < f8.bytes);
    // docs/bench.md: ≈ 8.0 GB of FP8 weights (LM head bf16), a batch-1 step ≈ 2.6-2.7 ms.
    assert_eq!(f8.bound, "memory");
    assert!((2.55..2.8).contains(&f8.floor_ms), "{}", f8.floor_ms);
    eprintln!("W1 dual floor: bf16 {:.3} ms ({:.3} GB), fp8 {:.3} ms ({:.3} GB)", bf.floor_ms, bf.bytes / 1e9, f8.floor_ms, f8.bytes / 1e9);
    assert_eq!(f8.flops, bf.flops);
    // W4 (512 rows) is compute-bound: the linear layers at the FP8 rate lower the floor;
    // block scales (no W8A8 path) or no measured FP8 rate keep the bf16 one.
    let w4 = forward_roofline(&cfg, 512, 1, &h100());
    let w4f = forward_roofline_as(&cfg, WeightFormat::Fp8(ScaleLayout::Channel), 512, 1, &h100());
    let w4b = forward_roofline_as(&cfg, WeightFormat::Fp8(ScaleLayout::Block128), 512, 1, &h100());
    let no_fp8 = Ceilings { fp8_tflops: None, ..h100() };
    let w4n = forward_roofline_as(&cfg, WeightFormat::Fp8(ScaleLayout::Channel), 512, 1, &no_fp8);
    assert!(w4f.floor_ms < 0.6 * w4.floor_ms, "{} vs {}", w4f.floor_ms, w4.floor_ms);
    assert_eq!((w4b.floor_ms, w4n.floor_ms), (w4.floor_ms, w4.floor_ms));
}

#[test]
fn w4_floor_is_compute_bound() {
    let cfg = ModelConfig::preset("llada-8b").unwrap();
    let r = forward_roofline(&cfg, 512, 1, &h100());
    assert_eq!(r.bound, "compute");
    // 2·512·(6.98e9 layer + 0.52e9 LM head params) + attention 0.14 TFLOP ≈ 7.8 TFLOP.
    assert!((7.6e12..8.0e12).contains(&r.flops), "{}", r.flops);
    assert!((9.5..10.2).contains(&r.floor_ms), "{}", r.floor_ms);
}

#[test]
fn moe_floor_counts_the_experts_a_step_touches() {
    let cfg = ModelConfig::preset("llada-moe-7b").unwrap();
    let m = cfg.moe.as_ref().unwrap();
    let h = cfg.hidden as f64;
    let all_experts = cfg.n_layers as f64 * m.n_experts as f64 * 3.0 * h * cfg.ffn as f64 * 2.0;
    let rest = cfg.param_count() as f64 * 2.0 - cfg.vocab as f64 * h * 2.0 - all_experts;
    let c = h100();
    // Batch 1, 32 rows: each expert is missed with probability (56/64)^32 ≈ 1.4 %.
    let r1 = step_roofline(&cfg, 1, 32.0, 512, 32, None, &c);
    let kv_logits = r1.bytes - rest - all_experts * (1.0 - (56.0f64 / 64.0).powi(32));
    assert!(kv_logits.abs() < 0.05 * r1.bytes, "{} of {}", kv_logits, r1.bytes);
    assert!(r1.bytes < rest + all_experts + 0.2e9, "{}", r1.bytes);
    // One row touches 8 of 64 experts: the floor is far below the all-experts read.
    let r0 = step_roofline(&cfg, 1, 1.0, 512, 1, None, &c);
    assert!(r0.bytes < rest + 0.2 * all_experts, "{} vs {}", r0.bytes, rest + all_experts);
    // Batch 32: every expert is touched.
    let r32 = step_roofline(&cfg, 32, 32.0, 512, 32, None, &c);
    assert!(r32.bytes > rest + 0.999 * all_experts, "{}", r32.bytes);
    // A measured fraction replaces the estimate.
    let rm = step_roofline(&cfg, 1, 32.0, 512, 32, Some(0.25), &c);
    assert!((rm.bytes - (r1.bytes - all_experts * (0.986 - 0.25))).abs() < 0.01 * rm.bytes, "{}", rm.bytes);
}

#[test]
fn fp8_moe_floor_counts_one_byte_per_expert_weight_plus_channel_scales() {
    use crate::quant::ScaleLayout;
    let ch = WeightFormat::Fp8(ScaleLayout::Channel);
    for name in ["llada-moe-7b", "llada2-mini"] {
        let cfg = ModelConfig::preset(name).unwrap();
        let m = cfg.moe.as_ref().unwrap();
        let (h, f, e) = (cfg.hidden as f64, cfg.ffn as f64, m.n_experts as f64);
        let sf = cfg.llada2.as_ref().map_or(0, |l| l.shared_ffn) as f64;
        let (mut attn, mut dense, mut experts, mut shared) = (0.0, 0.0, 0.0, 0.0);
        let lin = |n: f64, k: f64| n * k - 4.0 * n; // bytes saved: one per weight, less a 4-byte scale per row
        for i in 0..cfg.n_layers {
            attn += lin(cfg.qkv_dim() as f64, h) + lin(h, cfg.q_dim() as f64);
            if cfg.is_moe_layer(i) {
                experts += e * (lin(2.0 * f, h) + lin(h, f));
                shared += if sf > 0.0 { lin(2.0 * sf, h) + lin(h, sf) } else { 0.0 };
            } else {
                let df = cfg.dense_ffn() as f64;
                dense += lin(2.0 * df, h) + lin(h, df);
            }
        }
        // Every expert touched: the whole model's saving; a quarter touched: the untouched
        // experts' FP8 bytes (codes and scales) come off too.
        for touched in [1.0, 0.25] {
            let bf = step_roofline(&cfg, 1, 32.0, 512, 32, Some(touched), &h100());
            let f8 = step_roofline_as(&cfg, ch, 1, 32.0, 512, 32, Some(touched), &h100());
            let want = attn + dense + shared + touched * experts;
            assert!((bf.bytes - f8.bytes - want).abs() < 1e3, "{name} touched {touched}: saved {} vs {want}", bf.bytes - f8.bytes);
            assert_eq!(f8.flops, bf.flops);
        }
        let (bf, f8) = (step_roofline(&cfg, 1, 32.0, 512, 32, None, &h100()), step_roofline_as(&cfg, ch, 1, 32.0, 512, 32, None, &h100()));
        eprintln!("{name} W1 floor: bf16 {:.3} ms ({:.2} GB), fp8 {:.3} ms ({:.2} GB)", bf.floor_ms, bf.bytes / 1e9, f8.floor_ms, f8.bytes / 1e9);
        assert!(f8.bytes < 0.6 * bf.bytes, "{name}: {} vs {}", f8.bytes, bf.bytes);
    }
}

#[test]
fn stats_median_and_mean() {
    let s = Stats::of(&[3.0, 1.0, 2.0, 10.0]);
    assert_eq!((s.median_ms, s.mean_ms, s.min_ms, s.max_ms, s.samples), (2.5, 4.0, 1.0, 10.0, 4));
}

#[test]
fn op_work_counts_the_linear_layers_as_stored() {
    use crate::quant::ScaleLayout;
    let cfg = ModelConfig::preset("llada-8b").unwrap();
    let (len, batch, live) = (512, 1, 32);
    let get = |w: &[(&'static str, f64, f64)], name: &str| w.iter().find(|x| x.0 == name).map(|x| (x.1, x.2)).unwrap();
    let bf = forward_op_work(&cfg, len, batch, live);
    assert_eq!(bf, forward_op_work_as(&cfg, WeightFormat::Bf16, len, batch, live));
    let (l, t) = (32.0, 32.0);
    // bf16 q|k|v: 2 B per weight, x in (32 × 4096 bf16), q|k|v out (32 × 12288 bf16).
    let qkv_bf = l * (2.0 * 12288.0 * 4096.0 + 2.0 * t * 4096.0 + 2.0 * t * 12288.0);
    assert_eq!(get(&bf, "gemm_qkv").1, qkv_bf);
    for (layout, scales) in [
        // one f32 per output channel / per 128 × 128 block
        (ScaleLayout::Channel, [12288.0, 4096.0, 24576.0, 4096.0]),
        (ScaleLayout::Block128, [96.0 * 32.0, 32.0 * 32.0, 192.0 * 32.0, 32.0 * 96.0]),
    ] {
        let f8 = forward_op_work_as(&cfg, WeightFormat::Fp8(layout), len, batch, live);
        // The same FLOPs everywhere; bytes differ only in the linear layers' weights.
        for (a, b) in bf.iter().zip(&f8) {
            assert_eq!((a.0, a.1), (b.0, b.1));
        }
        let shapes = [("gemm_qkv", 12288.0 * 4096.0), ("gemm_o", 4096.0 * 4096.0), ("gemm_gate_up", 24576.0 * 4096.0), ("gemm_down", 4096.0 * 12288.0)];
        for ((name, nk), s) in shapes.into_iter().zip(scales) {
            // bf16 → FP8: one byte saved per weight, 4 bytes per scale added, every layer.
            let saved = get(&bf, name).1 - get(&f8, name).1;
            assert_eq!(saved, l * (nk - 4.0 * s), "{layout:?} {name}");
        }
        assert_eq!(get(&f8, "gemm_gate_up+swiglu").1, get(&f8, "gemm_gate_up").1 - l * t * 12288.0 * 2.0);
        for name in ["gemm_lm_head", "attention", "embed", "swiglu", "add_rmsnorm", "rope_kv_store"] {
            assert_eq!(get(&bf, name), get(&f8, name), "{layout:?} {name}");
        }
    }
    // A W1 step's linear layers in FP8: 6.98 GB of weights (13.96 GB in bf16), 5.6 MB of
    // channel scales, 0.14 GB of bf16 activations in and out.
    let f8 = forward_op_work_as(&cfg, WeightFormat::Fp8(ScaleLayout::Channel), len, batch, live);
    let w: f64 = ["gemm_qkv", "gemm_o", "gemm_gate_up", "gemm_down"].iter().map(|n| get(&f8, n).1).sum();
    let want = 6.98e9 + 5.6e6 + 0.141e9;
    assert!((w - want).abs() < 0.005e9, "{w}");
}

#[test]
fn ceilings_line_names_the_fp8_path_and_accumulation() {
    let line = h100().line();
    assert!(line.starts_with("ceilings: copy 3030 GB/s (read+write), bf16 GEMM 796 TFLOP/s"), "{line}");
    let acc = if cfg!(feature = "cuda") && std::env::var("DEMASK_FP8_FAST_ACCUM").is_ok_and(|v| v == "1") {
        "fast accumulation"
    } else {
        "f32 promotion"
    };
    assert!(line.ends_with(&format!("FP8 GEMM 1500 TFLOP/s (split-scale, {acc})")), "{line}");
    let none = Ceilings { fp8_tflops: None, ..h100() };
    assert!(none.line().ends_with("FP8 GEMM unavailable"), "{}", none.line());
}
