//! f32 CPU reference backend: the oracle for every GPU op and the backend for tiny models.
//! Every function here is plain f32 math over row-major slices (rayon across rows).
pub mod attention;
pub mod embed;
pub mod forward;
pub mod gemm;
pub mod gemm_fp8;
pub mod llada2;
pub mod moe;
pub mod moe_fp8;
pub mod norm;
pub mod rope;
pub mod swiglu;
