// SwiGLU: out[r, j] = bf16( bf16(silu(g)) * u ), g = gu[r, j], u = gu[r, ffn + j],
// silu(g) = g / (1 + exp(-g)) in f32 (PyTorch's bf16 F.silu(gate) * up). ffn % 8 == 0.
#include "common.cuh"

struct SwigluParams {
    const bf16* gu;  // [rows, 2*ffn]: gate | up
    bf16* out;       // [rows, ffn]
    int rows;
    int ffn;
};

// Flat over rows * ffn/8 output vectors (fewer than 2^31), grid-stride; 16-byte loads and stores.
extern "C" __global__ void swiglu_bf16(const SwigluParams p) {
    const int vpr = p.ffn >> 3;
    // total < 2^31 (checked by the wrapper), so unsigned 32-bit index math never wraps.
    const unsigned total = (unsigned)p.rows * vpr;
    for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < total; v += gridDim.x * blockDim.x) {
        const int64_t r = v / vpr;
        const int c = (int)(v - (unsigned)r * vpr) << 3;
        const bf16* g_ptr = p.gu + r * 2 * p.ffn + c;
        float g[8], u[8], y[8];
        load8(g_ptr, g);
        load8(g_ptr + p.ffn, u);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float s = round_bf16(g[i] / (1.f + expf(-g[i])));
            y[i] = s * u[i];
        }
        store8(p.out + r * p.ffn + c, y);
    }
}
