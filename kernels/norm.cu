// Fused residual add + RMSNorm, one block per row:
//   if delta: residual = bf16(residual + delta)   (stored back; with dsx, delta is scaled
//             first: the deferred epilogue of a W8A8 GEMM, see NormParams)
//   out = bf16( w * bf16( x * rsqrt(mean(x^2) + eps) ) ),  x = residual in f32
// (PyTorch: normalise in f32, cast to bf16, multiply by the bf16 weight).
// hidden % 8 == 0 and hidden <= 8 * blockDim.x * NORM_MAX_VPT (checked by the wrapper).
//
// Numerics are fixed by the thread layout: thread t owns 16-byte vectors t + k*blockDim.x
// (k < NORM_MAX_VPT), sums its squares in (k, element) order with fmaf, then block_sum (warp
// butterfly, then warp 0 over the warp totals). The wrapper keeps blockDim.x =
// round_up(ceil(hidden / 8 / NORM_MAX_VPT), 32), so any change here must keep that layout to
// keep the outputs bit for bit.
//
// Performance (what changed, and why it should be faster; outputs are bit for bit the same):
// - Every global access is one 16-byte LDG.128 / STG.128. common.cuh's load8 / store8 copy a
//   struct of four bf16x2 and compile to four 4-byte accesses (checked in the SASS): the old
//   kernel stored `out` and `residual` and loaded the weight that way, 4x the load/store
//   instructions and L2 write transactions for half of its bytes. load8 / store8 now only
//   (un)pack registers; memory goes through uint4.
// - All loads of a block (residual, delta, weight) are issued up front, so a row costs one
//   memory round trip, the reduction, then the stores. The weight used to be loaded after the
//   reduction: a second, dependent L2 round trip on every block's critical path (it matters
//   most in the 32-row decode case, where the kernel is pure latency).
// - The updated residual stays packed in the uint4 it was loaded into (bf16(r + d) is exact
//   in bf16) rather than in 32 floats, which pays for most of the prefetched weight: 80
//   registers at sm_90a (56 before); NORM_MAX_THREADS caps the block so that always fits
//   (hidden <= 24576; 512 blocks of 128 threads at LLaDA's 4096 are one wave either way).
// - Launched with programmatic dependent launch (PDL): blocks start while the previous kernel
//   finishes and wait (pdl_wait) before their first load, so the launch latency overlaps it.
//   (Fetching the weight before the wait was tried: no shorter critical path, since the
//   residual load follows the wait anyway, and 92 registers instead of 80.)
// - delta is read with the streaming hint (__ldcs, evict-first): it is dead after this
//   kernel and should not push the residual or the next GEMM's input out of L2.
#include <cuda_fp8.h>

#include "common.cuh"

// 16-byte vectors held in registers per thread; the wrapper sizes the block so that
// hidden / 8 <= blockDim.x * NORM_MAX_VPT.
#define NORM_MAX_VPT 4
// Largest block (MAX_THREADS in the wrapper): 80 registers x 768 threads fit one SM's 64K.
#define NORM_MAX_THREADS 768

struct NormParams {
    bf16* residual;      // [rows, hidden], in/out
    const bf16* delta;   // [rows, hidden] or null (no add)
    const bf16* weight;  // [hidden]
    bf16* out;           // [rows, hidden]
    // With dsx: delta holds the unscaled product D of a W8A8 `split-scale` GEMM, and the value
    // added is bf16(dsx[row]·dsw[c]·D (+ dbias[c])), exactly what w8a8_scale_bf16
    // (kernels/gemm_w8a8.cu) would have stored in delta: that launch and round trip saved.
    const float* dsx;    // [rows] or null
    const float* dsw;    // [hidden] (with dsx)
    const bf16* dbias;   // [hidden] or null
    int rows;
    int hidden;
    float eps;
};

namespace {

// QUANT: also q[row, :] = e4m3(out / s[row]), s[row] = max|out[row, :]| / 448 (1 for a zero
// row), from the bf16-rounded outputs: exactly quantize_rows_fp8_bf16 (kernels/gemm_fp8.cu)
// run on `out`, without its launch and its re-read of the row.
template <bool QUANT, bool DSCALE>
__device__ __forceinline__ void norm_body(const NormParams& p, uint8_t* qx, float* sx) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const int vecs = p.hidden >> 3;
    bf16* res = p.residual + row * p.hidden;
    const uint4* res4 = reinterpret_cast<const uint4*>(res);
    const uint4* del4 = p.delta ? reinterpret_cast<const uint4*>(p.delta + row * p.hidden) : nullptr;
    const uint4* w4 = reinterpret_cast<const uint4*>(p.weight);
    // The delta's channel scales are weights (no predecessor writes them): fetched before
    // the programmatic-launch wait, so they are not a second round trip after it.
    float4 swr[DSCALE ? 2 * NORM_MAX_VPT : 1];
    if constexpr (DSCALE) {
#pragma unroll
        for (int k = 0; k < NORM_MAX_VPT; ++k) {
            const int v = threadIdx.x + k * blockDim.x;
            if (v < vecs) {
                swr[2 * k] = __ldg(reinterpret_cast<const float4*>(p.dsw) + 2 * v);
                swr[2 * k + 1] = __ldg(reinterpret_cast<const float4*>(p.dsw) + 2 * v + 1);
            }
        }
    }
    pdl_wait();
    pdl_trigger();
    // Read before any barrier: with QUANT, sx may be the buffer dsx points to (the W8A8
    // scratch), and its row is overwritten after the block reductions.
    const float dsx = DSCALE ? p.dsx[row] : 0.f;
    // All loads first (raw 16-byte vectors), so they are in flight together.
    uint4 xr[NORM_MAX_VPT], dr[NORM_MAX_VPT], wr[NORM_MAX_VPT];
#pragma unroll
    for (int k = 0; k < NORM_MAX_VPT; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        if (v < vecs) {
            xr[k] = res4[v];
            if (del4) dr[k] = __ldcs(del4 + v);
            wr[k] = __ldg(w4 + v);
        }
    }
    // The residual (after the add) stays packed in xr: bf16(r + d) is exact in bf16, so
    // repacking loses nothing and holds 16 registers instead of 32 floats.
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_MAX_VPT; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        if (v < vecs) {
            float x[8];
            load8(reinterpret_cast<const bf16*>(&xr[k]), x);
            if (del4) {
                float d[8];
                load8(reinterpret_cast<const bf16*>(&dr[k]), d);
                if constexpr (DSCALE) {
                    float sw[8], b[8];
                    const float4 s0 = swr[2 * k], s1 = swr[2 * k + 1];
                    sw[0] = s0.x, sw[1] = s0.y, sw[2] = s0.z, sw[3] = s0.w;
                    sw[4] = s1.x, sw[5] = s1.y, sw[6] = s1.z, sw[7] = s1.w;
                    if (p.dbias) load8(p.dbias + 8 * v, b);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        const float sc = __fmul_rn(dsx, sw[i]);
                        d[i] = round_bf16(p.dbias ? __fmaf_rn(sc, d[i], b[i]) : __fmul_rn(sc, d[i]));
                    }
                }
#pragma unroll
                for (int i = 0; i < 8; ++i) x[i] = round_bf16(x[i] + d[i]);
                store8(reinterpret_cast<bf16*>(&xr[k]), x);  // exact: values are already bf16
                reinterpret_cast<uint4*>(res)[v] = xr[k];
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) ss = fmaf(x[i], x[i], ss);
        }
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)p.hidden + p.eps);
    bf16* out = p.out + row * p.hidden;
#pragma unroll
    for (int k = 0; k < NORM_MAX_VPT; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        if (v < vecs) {
            float x[8], w[8], y[8];
            load8(reinterpret_cast<const bf16*>(&xr[k]), x);
            load8(reinterpret_cast<const bf16*>(&wr[k]), w);
#pragma unroll
            for (int i = 0; i < 8; ++i) y[i] = w[i] * round_bf16(x[i] * inv);
            uint4 o;
            store8(reinterpret_cast<bf16*>(&o), y);  // packs in registers
            reinterpret_cast<uint4*>(out)[v] = o;    // one 16-byte store
            if constexpr (QUANT) xr[k] = o;          // the rounded outputs, for the codes
        }
    }
    if constexpr (QUANT) {
        float m = 0.f;
#pragma unroll
        for (int k = 0; k < NORM_MAX_VPT; ++k) {
            if (threadIdx.x + k * blockDim.x < vecs) {
                float y[8];
                load8(reinterpret_cast<const bf16*>(&xr[k]), y);
#pragma unroll
                for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(y[i]));
            }
        }
        m = block_max(m, scratch);
        const float s = e4m3_scale(m);
        if (threadIdx.x == 0) sx[row] = s;
        uint2* q8 = reinterpret_cast<uint2*>(qx + row * p.hidden);
#pragma unroll
        for (int k = 0; k < NORM_MAX_VPT; ++k) {
            const int v = threadIdx.x + k * blockDim.x;
            if (v < vecs) {
                float y[8];
                load8(reinterpret_cast<const bf16*>(&xr[k]), y);
                uint32_t c[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) c[i] = (uint32_t)__nv_cvt_float_to_fp8(y[i] / s, __NV_SATFINITE, __NV_E4M3);
                q8[v] = make_uint2(c[0] | c[1] << 8 | c[2] << 16 | c[3] << 24, c[4] | c[5] << 8 | c[6] << 16 | c[7] << 24);
            }
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS) add_rmsnorm_bf16(const NormParams p) {
    norm_body<false, false>(p, nullptr, nullptr);
}

// add_rmsnorm_bf16 and the E4M3 codes of its output for the skinny W8A8 GEMM that reads it
// (src/ops/gemm_w8a8.rs): q [rows, hidden] (16-byte aligned rows: hidden % 16 == 0), s [rows].
struct NormQuantParams {
    NormParams n;
    uint8_t* q;
    float* s;
};

extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS) add_rmsnorm_quant_bf16(const NormQuantParams p) {
    norm_body<true, false>(p.n, p.q, p.s);
}

// The same two with a scaled delta (p.dsx set; NormParams): the scales take registers, so
// these cap the block at NORM_SCALED_THREADS (hidden <= 8 * 512 * NORM_MAX_VPT = 16384).
#define NORM_SCALED_THREADS 512
extern "C" __global__ void __launch_bounds__(NORM_SCALED_THREADS) add_rmsnorm_scaled_bf16(const NormParams p) {
    norm_body<false, true>(p, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(NORM_SCALED_THREADS) add_rmsnorm_quant_scaled_bf16(const NormQuantParams p) {
    norm_body<true, true>(p.n, p.q, p.s);
}
