//! CPU tests of `ops::gemm_fp8`: the C parameter layouts, kernel names and scale shapes.
use super::*;

#[test]
fn params_match_the_c_layout() {
    assert_eq!(std::mem::size_of::<Fp8SkinnyParams>(), 64); // 5 pointers + 6 ints
    assert_eq!(std::mem::size_of::<QuantParams>(), 40); // 3 pointers + 4 ints
    assert_eq!(kernel_for(32, false, Fp8Kernel::Mma), ("gemm_fp8", "gemm_fp8_skinny32_bf16", 4 * (16384 + 32 * 256)));
    assert_eq!(kernel_for(1, true, Fp8Kernel::Mma), ("gemm_fp8", "gemm_fp8_skinny8_swiglu_bf16", 5 * (16384 + 8 * 256)));
    assert_eq!(
        kernel_for(64, true, Fp8Kernel::Wgmma),
        ("gemm_fp8_wgmma", "gemm_fp8_wgmma64_swiglu_bf16", 3 * (16384 + 64 * 256))
    );
    for t in [1, 9, 17, 33, 64] {
        let smem = kernel_for(t, false, Fp8Kernel::Wgmma).2;
        // Two blocks per SM on an H100 (228 KB of shared memory per SM, 1 KB reserved each).
        assert!(2 * (smem + 1024) <= 228 << 10, "t={t}: {smem} bytes");
    }
}

#[test]
fn kernel_names_parse() {
    for k in [Fp8Kernel::Auto, Fp8Kernel::Wgmma, Fp8Kernel::Mma] {
        assert_eq!(k.name().parse::<Fp8Kernel>().unwrap(), k);
    }
    let e = "tensor".parse::<Fp8Kernel>().unwrap_err().to_string();
    assert!(e.contains("`tensor`") && e.contains("wgmma"), "{e}");
}

#[test]
fn scale_dims_follow_the_layout() {
    assert_eq!(scale_dims(ScaleLayout::Channel, 300, 400), vec![300]);
    assert_eq!(scale_dims(ScaleLayout::Block128, 300, 400), vec![3, 4]);
    assert_eq!(ScaleLayout::Block128.count(300, 400), 12);
}

#[test]
fn entry_points_follow_the_row_tiles() {
    for t in 1..=80usize {
        let rows = 8 * t.div_ceil(8).next_power_of_two().min(8);
        for (kernel, module, family) in [(Fp8Kernel::Mma, "gemm_fp8", "skinny"), (Fp8Kernel::Wgmma, "gemm_fp8_wgmma", "wgmma")] {
            let (m, plain, _) = kernel_for(t, false, kernel);
            assert_eq!((m, plain), (module, format!("gemm_fp8_{family}{rows}_bf16").as_str()), "t={t}");
            assert_eq!(kernel_for(t, true, kernel).1, format!("gemm_fp8_{family}{rows}_swiglu_bf16"), "t={t}");
        }
    }
}
