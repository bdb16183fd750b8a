// Fused residual add + RMSNorm, one block per row:
//   if delta: residual = bf16(residual + delta)   (stored back)
//   out = bf16( w * bf16( x * rsqrt(mean(x^2) + eps) ) ),  x = residual in f32
// (PyTorch: normalise in f32, cast to bf16, multiply by the bf16 weight).
// hidden % 8 == 0 and hidden <= 8 * blockDim.x * NORM_MAX_VPT (checked by the wrapper).
#include "common.cuh"

// 16-byte vectors held in registers per thread; the wrapper sizes the block so that
// hidden / 8 <= blockDim.x * NORM_MAX_VPT.
#define NORM_MAX_VPT 4

struct NormParams {
    bf16* residual;      // [rows, hidden], in/out
    const bf16* delta;   // [rows, hidden] or null (no add)
    const bf16* weight;  // [hidden]
    bf16* out;           // [rows, hidden]
    int rows;
    int hidden;
    float eps;
};

extern "C" __global__ void add_rmsnorm_bf16(const NormParams p) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const int vecs = p.hidden >> 3;
    bf16* res = p.residual + row * p.hidden;
    // All loads first (raw 16-byte vectors), so they are in flight together.
    uint4 xr[NORM_MAX_VPT], dr[NORM_MAX_VPT];
#pragma unroll
    for (int k = 0; k < NORM_MAX_VPT; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        if (v < vecs) {
            xr[k] = reinterpret_cast<const uint4*>(res)[v];
            if (p.delta) dr[k] = reinterpret_cast<const uint4*>(p.delta + row * p.hidden)[v];
        }
    }
    float x[NORM_MAX_VPT][8];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_MAX_VPT; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        if (v < vecs) {
            load8(reinterpret_cast<const bf16*>(&xr[k]), x[k]);
            if (p.delta) {
                float d[8];
                load8(reinterpret_cast<const bf16*>(&dr[k]), d);
#pragma unroll
                for (int i = 0; i < 8; ++i) x[k][i] = round_bf16(x[k][i] + d[i]);
                store8(res + v * 8, x[k]);  // exact: values are already bf16
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) ss = fmaf(x[k][i], x[k][i], ss);
        }
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)p.hidden + p.eps);
#pragma unroll
    for (int k = 0; k < NORM_MAX_VPT; ++k) {
        const int v = threadIdx.x + k * blockDim.x;
        if (v < vecs) {
            float w[8], y[8];
            load8(p.weight + v * 8, w);
#pragma unroll
            for (int i = 0; i < 8; ++i) y[i] = w[i] * round_bf16(x[k][i] * inv);
            store8(p.out + row * p.hidden + v * 8, y);
        }
    }
}
