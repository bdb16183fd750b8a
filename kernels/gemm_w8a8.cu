// Epilogues of the W8A8 `split-scale` path (src/ops/gemm_w8a8.rs). cuBLASLt's plain FP8 GEMM
// (no scales: the per-row × per-channel outer-vector scaling is not offered everywhere) writes
// D[r, c] = bf16(Σ_k qx[r, k] · qw[c, k]) into the layer's output buffer; since the row scale
// and the channel scale factor out of the dot product, these kernels finish the layer:
//
//   w8a8_scale_bf16         y[r, c] = bf16(s · D[r, c] + bias[c])   (in place; s · D without a bias)
//   w8a8_scale_swiglu_bf16  act[r, j] = bf16(bf16(silu(g)) · u), g = bf16(s_g · D[r, j]),
//                           u = bf16(s_u · D[r, ffn + j])            (gate | up → act)
//
// with s = sx[r] · sw[c] rounded to f32 first (`__fmul_rn`), the bias added by one fma
// (`__fmaf_rn`), so `cpu::gemm_fp8::w8a8_scale` mirrors the first bit for bit. The second is
// exactly the first (no bias) followed by swiglu_bf16 (the same silu expression), one pass
// over gate|up instead of two. Layout as kernels/swiglu.cu: grid (rows, chunks), thread t of
// block (r, c) takes the 16-byte vectors t + k·blockDim.x (k < W8_VPT) of chunk c of row r;
// every access is 16 bytes. Requirements (checked by the wrapper): n % 8 == 0 (ffn % 8 == 0),
// 16-byte aligned y, gu, act, bias and sw.
//
//   w8a8_scale_swiglu_quant_bf16  the SwiGLU epilogue, then the per-row E4M3 quantisation of its
//                           output for the down projection (q, s as quantize_rows_fp8_bf16 in
//                           kernels/gemm_fp8.cu gives them from act), act written only if asked
//
// The blocks of a row (a thread-block cluster, sm_90) hold the row's act values (bf16, in
// registers) across the row max and the encode, so the down projection needs no quantiser
// launch and, once its GEMM plan is known, no act round trip (ffn % 8 == 0, ffn <= 8 · 512 ·
// WQ_VPT · WQ_MAX_SPLIT; one block per row, no cluster, where ffn <= 8 · 512 · WQ_VPT).
#include <cooperative_groups.h>
#include <cuda_fp8.h>

#include "common.cuh"

#define W8_THREADS 256  // largest block (THREADS in the wrapper)
#define W8_VPT 2        // 16-byte vectors per thread (VPT in the wrapper)

struct W8a8ScaleParams {
    bf16* y;           // [>= t, n]: in the unscaled product D, out the layer output
    const float* sx;   // [>= t] per-row activation scales
    const float* sw;   // [n] per-channel weight scales
    const bf16* bias;  // [n] or nullptr
    int t;
    int n;
};

struct W8a8SwigluParams {
    const bf16* gu;    // [>= t, 2·ffn]: the unscaled product of gate | up
    bf16* act;         // [>= t, ffn]
    const float* sx;   // [>= t]
    const float* sw;   // [2·ffn]: gate channel scales, then up
    int t;
    int ffn;
};

// The SwiGLU of 8 gate and up products of row scale sx (channel scales sg, su): g and u
// scaled and rounded to bf16 as w8a8_scale_bf16 stores them, then swiglu_bf16's expression.
__device__ __forceinline__ void scaled_swiglu8(float sx, const float* g, const float* u, const float* sg,
                                               const float* su, float* y) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float gv = round_bf16(__fmul_rn(__fmul_rn(sx, sg[i]), g[i]));
        const float uv = round_bf16(__fmul_rn(__fmul_rn(sx, su[i]), u[i]));
        const float s = round_bf16(gv / (1.f + expf(-gv)));
        y[i] = s * uv;
    }
}

extern "C" __global__ void __launch_bounds__(W8_THREADS) w8a8_scale_bf16(const W8a8ScaleParams p) {
    pdl_wait();
    pdl_trigger();
    const int vpr = p.n >> 3;
    const int64_t r = blockIdx.x;
    uint4* y4 = reinterpret_cast<uint4*>(p.y + r * p.n);
    const float sx = p.sx[r];
    const int c0 = blockIdx.y * (blockDim.x * W8_VPT) + threadIdx.x;
    uint4 dr[W8_VPT];
#pragma unroll
    for (int k = 0; k < W8_VPT; ++k) {
        const int c = c0 + k * blockDim.x;
        if (c < vpr) dr[k] = y4[c];
    }
#pragma unroll
    for (int k = 0; k < W8_VPT; ++k) {
        const int c = c0 + k * blockDim.x;
        if (c < vpr) {
            float d[8];
            load8(reinterpret_cast<const bf16*>(&dr[k]), d);
            w8a8_scale8(sx, p.sw + 8 * c, p.bias ? p.bias + 8 * c : nullptr, d);
            uint4 o;
            store8(reinterpret_cast<bf16*>(&o), d);  // packs in registers
            y4[c] = o;
        }
    }
}

extern "C" __global__ void __launch_bounds__(W8_THREADS) w8a8_scale_swiglu_bf16(const W8a8SwigluParams p) {
    pdl_wait();
    pdl_trigger();
    const int vpr = p.ffn >> 3;
    const int64_t r = blockIdx.x;
    const uint4* g4 = reinterpret_cast<const uint4*>(p.gu + r * 2 * p.ffn);
    const uint4* u4 = g4 + vpr;
    uint4* o4 = reinterpret_cast<uint4*>(p.act + r * p.ffn);
    const float sx = p.sx[r];
    const int c0 = blockIdx.y * (blockDim.x * W8_VPT) + threadIdx.x;
    uint4 gr[W8_VPT], ur[W8_VPT];
#pragma unroll
    for (int k = 0; k < W8_VPT; ++k) {
        const int c = c0 + k * blockDim.x;
        if (c < vpr) {
            gr[k] = __ldcs(g4 + c);  // dead after this kernel: streaming (evict-first)
            ur[k] = __ldcs(u4 + c);
        }
    }
#pragma unroll
    for (int k = 0; k < W8_VPT; ++k) {
        const int c = c0 + k * blockDim.x;
        if (c < vpr) {
            float g[8], u[8], sg[8], su[8], y[8];
            load8(reinterpret_cast<const bf16*>(&gr[k]), g);
            load8(reinterpret_cast<const bf16*>(&ur[k]), u);
            load_scales8(p.sw + 8 * c, sg);
            load_scales8(p.sw + p.ffn + 8 * c, su);
            scaled_swiglu8(sx, g, u, sg, su, y);
            uint4 o;
            store8(reinterpret_cast<bf16*>(&o), y);
            o4[c] = o;
        }
    }
}

#define WQ_VPT 2        // 16-byte vectors per thread (WQ_VPT in the wrapper)
#define WQ_MAX_SPLIT 8  // blocks per row: one thread-block cluster

struct W8a8SwigluQuantParams {
    const bf16* gu;   // [>= t, 2·ffn]: the unscaled product of gate | up
    bf16* act;        // [>= t, ffn] or nullptr (not written)
    uint8_t* q;       // [>= t, ffn] E4M3 codes of act (8-byte aligned)
    float* s;         // [>= t]: in the GEMM's row scales (sx), out act's row scales
    const float* sw;  // [2·ffn]
    int t;
    int ffn;
};

// Grid (t, split), clusters of (1, split) when split > 1 (sm_90): block (r, c) takes the
// vectors c·B·WQ_VPT + i + k·B (B = blockDim.x, thread i, k < WQ_VPT) of row r, every load
// issued before any arithmetic. The row max is the max of the blocks' maxima, exchanged
// through distributed shared memory (a max does not depend on the order, so any split gives
// the same scale and codes).
extern "C" __global__ void __launch_bounds__(512) w8a8_scale_swiglu_quant_bf16(const W8a8SwigluQuantParams p) {
    __shared__ float scratch[32];
    pdl_wait();
    pdl_trigger();
    const int vpr = p.ffn >> 3;
    const int64_t r = blockIdx.x;
    const int c0 = blockIdx.y * blockDim.x * WQ_VPT + threadIdx.x;
    const uint4* g4 = reinterpret_cast<const uint4*>(p.gu + r * 2 * p.ffn);
    const uint4* u4 = g4 + vpr;
    // s[r] is read here, before any barrier of the block or the cluster, and overwritten
    // (by block 0 of the row) only after the cluster barrier.
    const float sx = p.s[r];
    uint4 gr[WQ_VPT], ur[WQ_VPT];
#pragma unroll
    for (int k = 0; k < WQ_VPT; ++k) {
        const int c = c0 + k * blockDim.x;
        if (c < vpr) {
            gr[k] = __ldcs(g4 + c);  // dead after this kernel: streaming (evict-first)
            ur[k] = __ldcs(u4 + c);
        }
    }
    float m = 0.f;
#pragma unroll
    for (int k = 0; k < WQ_VPT; ++k) {
        const int c = c0 + k * blockDim.x;
        if (c < vpr) {
            float g[8], u[8], sg[8], su[8], y[8];
            load8(reinterpret_cast<const bf16*>(&gr[k]), g);
            load8(reinterpret_cast<const bf16*>(&ur[k]), u);
            load_scales8(p.sw + 8 * c, sg);
            load_scales8(p.sw + p.ffn + 8 * c, su);
            scaled_swiglu8(sx, g, u, sg, su, y);
            store8(reinterpret_cast<bf16*>(&gr[k]), y);       // act, packed in place of g
            load8(reinterpret_cast<const bf16*>(&gr[k]), y);  // the bf16 values, as act holds them
#pragma unroll
            for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(y[i]));
        }
    }
    m = block_max(m, scratch);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (gridDim.y > 1) {
        // scratch[0] holds this block's max (block_max); every block of the cluster reads
        // every other's, then a second barrier keeps the shared memory alive until all did.
        cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
        cluster.sync();
        for (unsigned j = 0; j < gridDim.y; ++j) m = fmaxf(m, *cluster.map_shared_rank(scratch, j));
        cluster.sync();
    }
#else
    if (gridDim.y > 1) __trap();  // the wrapper splits rows only on sm_90+
#endif
    const float s = e4m3_scale(m);
    if (blockIdx.y == 0 && threadIdx.x == 0) p.s[r] = s;
    uint2* q8 = reinterpret_cast<uint2*>(p.q + r * p.ffn);
    uint4* o4 = p.act ? reinterpret_cast<uint4*>(p.act + r * p.ffn) : nullptr;
#pragma unroll
    for (int k = 0; k < WQ_VPT; ++k) {
        const int c = c0 + k * blockDim.x;
        if (c < vpr) {
            if (o4) o4[c] = gr[k];
            float y[8];
            load8(reinterpret_cast<const bf16*>(&gr[k]), y);
            uint32_t e[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) e[i] = (uint32_t)__nv_cvt_float_to_fp8(y[i] / s, __NV_SATFINITE, __NV_E4M3);
            q8[c] = make_uint2(e[0] | e[1] << 8 | e[2] << 16 | e[3] << 24, e[4] | e[5] << 8 | e[6] << 16 | e[7] << 24);
        }
    }
}
