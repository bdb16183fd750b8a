// The skinny W8A16 GEMMs' own pieces on top of kernels/fp8_tile.cuh (the tile, copies and
// E4M3 → bf16 dequantisation shared with the grouped expert kernels): the parameter block, the
// W row map, the per-stage block-scale multiplier and the epilogue (k-group sum, channel scale,
// bias, SwiGLU, cluster split-K reduction). Used by kernels/gemm_fp8.cu (mma.sync) and
// kernels/gemm_fp8_wgmma.cu (sm_90a warpgroup MMA), and with the W8A8 parameter block
// (E4M3 activations and their row scales) by kernels/gemm_w8a8_skinny.cu: the row map, the W
// copies and the epilogue take either block (`P`), which differ only in the output scale
// (`out_scale`). Nothing here is a kernel.
#pragma once
#include <cooperative_groups.h>
#include <cuda_fp8.h>

#include "fp8_tile.cuh"

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

struct W8a8SkinnyParams {
    const uint8_t* x;      // [>= t, k] E4M3 activations, row r scaled by sx[r]
    const float* sx;       // [>= t] row scales
    const uint8_t* w;      // [n, k] E4M3
    const float* scales;   // [n] channel scales
    const bf16* bias;      // [n] or nullptr
    void* y;               // [>= t, n] (swiglu: [>= t, n/2]), bf16 or f32 (out_f32)
    int t;
    int n;
    int k;
    int k_split;  // k columns per split (multiple of 128)
    int out_f32;  // 0: y is bf16, 1: y is f32
    int pad;
};

namespace {

// Global W row of the block's local row `r` (SWIGLU: rows 0..63 are gate rows 64·b + r, rows
// 64..127 the matching up rows + n/2); `ok` is false past the end.
template <bool SWIGLU, class P>
__device__ __forceinline__ int w_row(const P& p, int n0, int r, bool& ok) {
    if constexpr (SWIGLU) {
        const int half = p.n >> 1, g = (n0 >> 1) + (r & 63);
        ok = g < half;
        return g + (r >= 64 ? half : 0);
    } else {
        ok = n0 + r < p.n;
        return n0 + r;
    }
}

// The W tile's shared layout: 128-byte rows of 16-byte chunks, the chunk index XOR-swizzled
// by `Pairs` (fp8_tile.cuh's `w_off`: 2·(r % 4), for the mma kernel's 8-byte fragment loads),
// `Row8` (r % 8: the wgmma kernel's 16-byte loads of one chunk from 8 rows at once) or `Half`
// (4·(r % 2): the W8A8 kernel's 16-byte loads of chunks 4h..4h+3 from rows 2i and 2i + 1, which
// then fall in opposite 64-byte halves of the 128-byte bank window).
enum class WSwizzle { Pairs, Row8, Half };
template <WSwizzle S>
__device__ __forceinline__ int w_off_as(int r, int c) {
    if constexpr (S == WSwizzle::Pairs) return w_off(r, c);
    if constexpr (S == WSwizzle::Row8) return r * BK + ((c ^ (r & 7)) << 4);
    return r * BK + ((c ^ ((r & 1) << 2)) << 4);
}

// Issues the W copies of the stage at column kb (columns ≥ k1 and rows past n zero-filled).
template <bool SWIGLU, WSwizzle S, class P>
__device__ __forceinline__ void load_w(const P& p, uint8_t* st, int n0, int kb, int k1) {
    constexpr int CPR = BK / 16;  // 16-byte chunks per W row
#pragma unroll
    for (int u = 0; u < BN * CPR / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        const int r = i / CPR, c = i % CPR;
        bool row_ok;
        const int gr = w_row<SWIGLU>(p, n0, r, row_ok);
        const int gk = kb + 16 * c;
        const bool ok = row_ok && gk < k1;
        const uint8_t* src = ok ? p.w + (size_t)gr * p.k + gk : p.w;
        cp_async16_stream(smem_u32(st + w_off_as<S>(r, c)), src, ok);
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

// The factor of output element (r, col) after the k sum: the channel scale (W8A16, 1 with
// block scales, which are folded into the operand); W8A8 also the row's activation scale,
// sx[r]·sw[col] rounded to f32 first.
__device__ __forceinline__ float out_scale(const Fp8SkinnyParams& p, int, int col) { return channel_scale(p, col); }
__device__ __forceinline__ float out_scale(const W8a8SkinnyParams& p, int r, int col) {
    return __fmul_rn(__ldg(p.sx + r), __ldg(p.scales + col));
}

template <class P>
__device__ __forceinline__ void store_out(const P& p, int r, int col, float v) {
    const size_t o = (size_t)r * p.n + col;
    v *= out_scale(p, r, col);
    if (p.bias) v += __bfloat162float(p.bias[col]);
    if (p.out_f32) {
        static_cast<float*>(p.y)[o] = v;
    } else {
        static_cast<bf16*>(p.y)[o] = __float2bfloat16(v);
    }
}

// SwiGLU's output act[r, c] = bf16(bf16(silu(g))·u) from the f32 sums of gate row c and up
// row n/2 + c, each scaled and rounded to bf16 first: exactly the plain kernel's bf16 gate|up
// output followed by swiglu_bf16.
template <class P>
__device__ __forceinline__ void store_swiglu(const P& p, int r, int c, float g, float u) {
    const int half = p.n >> 1;
    const float gv = round_bf16(g * out_scale(p, r, c));
    const float uv = round_bf16(u * out_scale(p, r, half + c));
    static_cast<bf16*>(p.y)[(size_t)r * half + c] = __float2bfloat16(round_bf16(gv / (1.f + expf(-gv))) * uv);
}

// The epilogue, after the block's f32 partial sums are in `red` as KG tiles [TP x rows][BN W
// rows] (tile kg at red + kg·TP·BN) and a __syncthreads: sums the KG tiles in order, then
// writes y (channel scale, bias), or SwiGLU's output (gate|up blocks), or (split-K, gridDim.y >
// 1) reduces the cluster's tiles through distributed shared memory in rank order.
template <int TP, int KG, bool SWIGLU, class P>
__device__ __forceinline__ void fp8_finish(const P& p, float* red, int n0) {
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
        __syncthreads();
        const int half = p.n >> 1, c0 = n0 >> 1;
        for (int i = threadIdx.x; i < rows * 64; i += THREADS) {
            const int r = i >> 6, j = i & 63;
            if (c0 + j < half) store_swiglu(p, r, c0 + j, red[r * BN + j], red[r * BN + 64 + j]);
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

}  // namespace
