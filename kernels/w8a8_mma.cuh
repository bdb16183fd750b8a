// The E4M3 × E4M3 stage multiply of kernels/gemm_w8a8_skinny.cu (the design notes are at
// the top of that file): a stage is a 128-row × 128-column W tile of codes followed by the
// X tile (8·NT rows × 128 codes), both in 128-byte rows with the `Half` swizzle (16-byte
// chunk c of row r at c ^ 4(r % 2)); 8 warps as 4 m-groups (2 m-tiles of 16 W rows each) × 2 k-groups (one
// 64-column half each) run `mma.sync` m16n8k32 E4M3 MMAs. Nothing here is a kernel.
#pragma once
#include "fp8.cuh"

namespace {

constexpr int QMG = 4;                // m-groups of warps
constexpr int QKG = 2;                // k-groups of warps (one 64-column half of a stage each)
constexpr int QMTW = BN / 16 / QMG;   // m-tiles per warp
static_assert(QKG * 64 == BK, "each k-group takes one 64-column half of a stage");

__device__ __forceinline__ int q_off(int r, int c) { return w_off_as<WSwizzle::Half>(r, c); }

__device__ __forceinline__ void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // E4M3 MMAs need sm_89+; the wrapper refuses older GPUs
#endif
}

// One stage: warp (mg, kg) multiplies its MTW m-tiles by the NT X row tiles over the 64
// columns [64·kg, 64·kg + 64) of the stage: two k32 MMAs per (m-tile, n-tile).
template <int NT>
__device__ __forceinline__ void mma_stage_q(const uint8_t* st, int warp, int lane, float (&acc)[QMTW][NT][4]) {
    const uint8_t* xs = st + BN * BK;
    const int mg = warp % QMG, kg = warp / QMG;
    const int g = lane >> 2, q = lane & 3;
    const int c = 4 * kg + q;
    // The W fragments (16 registers) stay while the X fragments stream through one n-tile at
    // a time, which keeps NT = 8 (64 accumulators) within 128 registers.
    uint4 wa[QMTW], wb[QMTW];
#pragma unroll
    for (int mt = 0; mt < QMTW; ++mt) {
        const int r0 = 16 * (mg * QMTW + mt) + g;
        wa[mt] = *reinterpret_cast<const uint4*>(st + q_off(r0, c));
        wb[mt] = *reinterpret_cast<const uint4*>(st + q_off(r0 + 8, c));
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xs + q_off(8 * j + g, c));
#pragma unroll
        for (int mt = 0; mt < QMTW; ++mt) {
            mma_e4m3(acc[mt][j], wa[mt].x, wb[mt].x, wa[mt].y, wb[mt].y, xv.x, xv.y);
            mma_e4m3(acc[mt][j], wa[mt].z, wb[mt].z, wa[mt].w, wb[mt].w, xv.z, xv.w);
        }
    }
}

}  // namespace
