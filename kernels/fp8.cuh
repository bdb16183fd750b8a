// Shared pieces of the W8A16 skinny GEMMs (kernels/gemm_fp8.cu: mma.sync; kernels/gemm_fp8_wgmma.cu:
// sm_90a warpgroup MMA): the parameter block, the E4M3 → bf16 register dequantisation, the
// per-stage block-scale multiplier and the epilogue (k-group sum, channel scale, bias, SwiGLU,
// cluster split-K reduction). Nothing here is a kernel.
#pragma once
#include <cooperative_groups.h>
#include <cuda_fp8.h>

#include "common.cuh"

namespace cg = cooperative_groups;

struct Fp8SkinnyParams {
    const bf16* x;         // [>= t, k]
    const uint8_t* w;      // [n, k] E4M3
    const float* scales;   // [n] (channel) or [ceil(n/128), ceil(k/128)] (block)
    const bf16* bias;      // [n] or nullptr
    void* y;               // [>= t, n] (swiglu: [>= t, n/2]), bf16 or f32 (out_f32)
    int t;
    int n;
    int k;
    int k_split;       // k columns per split (multiple of 128)
    int out_f32;       // 0: y is bf16, 1: y is f32
    int block_scales;  // 0: channel scales, 1: 128×128 block scales
};

namespace fp8 {

constexpr int BN = 128;  // W rows per block
constexpr int BK = 128;  // k columns per stage
constexpr int THREADS = 256;
constexpr uint32_t TWO_POW_120_X2 = 0x7B807B80u;  // bf16x2 {2^120, 2^120}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// W streams with a 256-byte L2 prefetch and no L2 cache-policy hint: with the bf16 kernel's
// `L2::cache_hint` (an evict_first policy) ptxas 13.0 encoded this kernel's main-loop W copies
// as `LDGSTS [R+UR0], desc[UR1]`, which the H100 rejects as an illegal instruction
// (compute-sanitizer: CUDA_ERROR_ILLEGAL_INSTRUCTION in load_w; found 2026-12-06).
__device__ __forceinline__ void cp_async16_stream(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Codes b0..b3 of `w` (byte 0 first) → bf16x2 {b0, b1} (lo) and {b2, b3} (hi), each value
// q · mult / 2^120. The bf16 bit pattern sign | (e4m3 & 0x7F) << 4 is q · 2^-120 for every
// code (normal or subnormal); the FMA with -0 as addend is an exact-or-rounded product.
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}
__device__ __forceinline__ void dequant4(uint32_t w, uint32_t mult, uint32_t& lo, uint32_t& hi) {
    const uint32_t a = __byte_perm(w, 0, 0x1404);  // bytes [0, b0, 0, b1]
    const uint32_t b = __byte_perm(w, 0, 0x3424);  // bytes [0, b2, 0, b3]
    lo = bf16x2_mul((a & 0x80008000u) | ((a >> 4) & 0x07F007F0u), mult);
    hi = bf16x2_mul((b & 0x80008000u) | ((b >> 4) & 0x07F007F0u), mult);
}

// Global W row of the block's local row `r` (SWIGLU: rows 0..63 are gate rows 64·b + r, rows
// 64..127 the matching up rows + n/2); `ok` is false past the end.
template <bool SWIGLU>
__device__ __forceinline__ int w_row(const Fp8SkinnyParams& p, int n0, int r, bool& ok) {
    if constexpr (SWIGLU) {
        const int half = p.n >> 1, g = (n0 >> 1) + (r & 63);
        ok = g < half;
        return g + (r >= 64 ? half : 0);
    } else {
        ok = n0 + r < p.n;
        return n0 + r;
    }
}

// The dequantisation multiplier of a warp for the stage starting at column kb.
template <bool SWIGLU>
__device__ __forceinline__ uint32_t stage_mult(const Fp8SkinnyParams& p, int n0, int warp_row0, int kb) {
    if (!p.block_scales) return TWO_POW_120_X2;
    bool ok;
    const int gr = w_row<SWIGLU>(p, n0, warp_row0, ok);
    const int kblocks = (p.k + BK - 1) / BK;
    const float s = ok ? __ldg(p.scales + (size_t)(gr / BN) * kblocks + kb / BK) : 1.f;
    const __nv_bfloat16 m = __float2bfloat16_rn(s * 0x1p120f);
    uint16_t bits;
    memcpy(&bits, &m, 2);
    return (uint32_t)bits * 0x10001u;
}

__device__ __forceinline__ float channel_scale(const Fp8SkinnyParams& p, int row) {
    return p.block_scales ? 1.f : __ldg(p.scales + row);
}

__device__ __forceinline__ void store_out(const Fp8SkinnyParams& p, int r, int col, float v) {
    const size_t o = (size_t)r * p.n + col;
    v *= channel_scale(p, col);
    if (p.bias) v += __bfloat162float(p.bias[col]);
    if (p.out_f32) {
        static_cast<float*>(p.y)[o] = v;
    } else {
        static_cast<bf16*>(p.y)[o] = __float2bfloat16(v);
    }
}

// The epilogue, after the block's f32 partial sums are in `red` as KG tiles [TP x rows][BN W
// rows] (tile kg at red + kg·TP·BN) and a __syncthreads: sums the KG tiles in order, then
// writes y (channel scale, bias), or SwiGLU's output (gate|up blocks), or (split-K, gridDim.y >
// 1) reduces the cluster's tiles through distributed shared memory in rank order.
template <int TP, int KG, bool SWIGLU>
__device__ __forceinline__ void fp8_finish(const Fp8SkinnyParams& p, float* red, int n0) {
    const int rows = min(p.t, TP);
    for (int i = threadIdx.x; i < rows * BN; i += THREADS) {
        float v = red[i];
#pragma unroll
        for (int kg = 1; kg < KG; ++kg) v += red[kg * TP * BN + i];
        if (gridDim.y == 1 && !SWIGLU) {
            const int r = i / BN, col = n0 + (i - r * BN);
            if (col < p.n) store_out(p, r, col, v);
        } else {
            red[i] = v;
        }
    }
    if constexpr (SWIGLU) {
        // act[r, c] = bf16(bf16(silu(g)) · u), g and u the bf16-rounded scaled GEMM outputs:
        // exactly the plain kernel's bf16 gate|up output followed by swiglu_bf16.
        __syncthreads();
        const int half = p.n >> 1, c0 = n0 >> 1;
        for (int i = threadIdx.x; i < rows * 64; i += THREADS) {
            const int r = i >> 6, j = i & 63;
            if (c0 + j < half) {
                const float gv = round_bf16(red[r * BN + j] * channel_scale(p, c0 + j));
                const float uv = round_bf16(red[r * BN + 64 + j] * channel_scale(p, half + c0 + j));
                static_cast<bf16*>(p.y)[(size_t)r * half + c0 + j] =
                    __float2bfloat16(round_bf16(gv / (1.f + expf(-gv))) * uv);
            }
        }
        return;
    }
    if (gridDim.y == 1) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const int S = (int)cluster.num_blocks();
    const int rank = (int)cluster.block_rank();
    for (int i = rank * THREADS + threadIdx.x; i < rows * BN; i += S * THREADS) {
        float v = 0.f;
        for (int s = 0; s < S; ++s) v += cluster.map_shared_rank(red, s)[i];
        const int r = i / BN, col = n0 + (i - r * BN);
        if (col < p.n) store_out(p, r, col, v);
    }
    cluster.sync();
#else
    __trap();  // split-K needs thread-block clusters (sm_90+); the wrapper never launches it below
#endif
}

}  // namespace fp8
