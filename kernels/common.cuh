// Shared device helpers for every kernels/*.cu. Entry points elsewhere are
// `extern "C" __global__ void <op>_<dtype>(...)`; nothing here is a kernel.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; `scratch` holds >= 32 floats of shared memory. All threads get the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// Block-wide max, as block_sum (the max does not depend on the order, so neither does the
// result). `scratch` holds >= 32 floats of shared memory; all threads get the result.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// The E4M3 scale of a row or block whose largest magnitude is m: m / 448 (the largest finite
// E4M3), floored at 1e-30 so no code overflows, and 1 for an all-zero row. The host twin is
// quant::channel_scale (and block_scale is bf16_ceil of it).
__device__ __forceinline__ float e4m3_scale(float m) { return m > 0.f ? fmaxf(m / 448.f, 1.0e-30f) : 1.f; }

// Rounds an f32 to bf16 and back (round-to-nearest-even), to emulate PyTorch's bf16 steps.
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16(x)); }

// 16-byte vector of 8 bf16.
struct __align__(16) bf16x8 { __nv_bfloat162 h[4]; };

// Through a uint4, so global and shared accesses compile to one 16-byte instruction (a copy of
// the bf16x8 struct itself becomes four 4-byte accesses).
__device__ __forceinline__ void load8(const bf16* p, float* f) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        __nv_bfloat162 h;
        memcpy(&h, &w[i], 4);
        const float2 t = __bfloat1622float2(h);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ void store8(bf16* p, const float* f) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
        memcpy(&w[i], &h, 4);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// sw[c .. c + 8) as floats (c a multiple of 8: two 16-byte loads).
__device__ __forceinline__ void load_scales8(const float* s, float* f) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(s));
    const float4 b = __ldg(reinterpret_cast<const float4*>(s) + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
    f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// The W8A8 `split-scale` epilogue of 8 unscaled products d of row scale sx, channel scales
// sw[0..8) and bias[0..8) (nullptr: none): d = sx·sw·d (+ bias), with s = sx·sw rounded to f32
// first and the bias added by one fma, unrounded (the caller rounds to bf16). Used by
// w8a8_scale_bf16 and rope_scale_kv_store_bf16; add_rmsnorm_*_scaled_bf16 (norm.cu) spells the
// same steps out on scales it loaded into registers before its wait (cpu::gemm_fp8::w8a8_scale
// is the host twin of all three).
__device__ __forceinline__ void w8a8_scale8(float sx, const float* sw, const bf16* bias, float* d) {
    float s[8], b[8];
    load_scales8(sw, s);
    if (bias) load8(bias, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float sc = __fmul_rn(sx, s[i]);
        d[i] = bias ? __fmaf_rn(sc, d[i], b[i]) : __fmul_rn(sc, d[i]);
    }
}

// Programmatic dependent launch (sm_90+). A kernel launched with the PDL attribute may start
// while the kernel before it on the stream is still running: it must call pdl_wait() before
// reading that kernel's output or writing any global memory. pdl_trigger() lets the next
// kernel launch early (it still waits for this one's completion in its own pdl_wait()).
// Both are no-ops before sm_90 and for launches without the attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
