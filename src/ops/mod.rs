//! One safe wrapper per kernel: check shapes, compute the launch config, launch. No allocation.
pub mod attention;
pub mod embed;
pub mod fill;
pub mod gemm;
pub mod gemm_fp8;
pub mod gemm_w8a8;
pub mod moe;
pub mod moe_fp8;
pub mod norm;
pub mod prefetch;
pub mod rope;
pub mod swiglu;
pub mod commit;
pub mod confidence;
