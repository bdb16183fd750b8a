// The W8A16 tile machinery shared by kernels/gemm_fp8.cu (the skinny FP8 GEMM) and
// kernels/moe_gemm_fp8.cu (the grouped FP8 expert GEMMs): 128 W rows × 128 k-columns of E4M3
// per stage (16 KB) with the X tile (TP rows × 128 bf16), the shared-memory swizzles, the
// cp.async copies (W without an L2 cache-policy hint, see below), the in-register E4M3 → bf16
// dequantisation (`dequant4`) and one stage of bf16 m16n8k16 MMAs (`mma_stage`). The design
// notes are at the top of kernels/gemm_fp8.cu. Nothing here is a kernel.
#pragma once
#include "mma.cuh"  // smem_u32, cp_async16, cp_async_commit/wait, mma_bf16

namespace {

constexpr int BN = 128;  // W rows per block
constexpr int BK = 128;  // k columns per stage
constexpr int THREADS = 256;
constexpr uint32_t TWO_POW_120_X2 = 0x7B807B80u;  // bf16x2 {2^120, 2^120}

// The 8 warps form MG m-groups × KG k-groups as in the bf16 kernel: warp w owns m-tiles
// [(w % MG)·MTW, +MTW) and, of each stage's 4 k-pairs (32 columns each), [(w / MG)·KPW, +KPW).
template <int NT>
struct Tile8 {
    static constexpr int TP = 8 * NT;
    static constexpr int STAGES = NT == 8 ? 3 : (NT == 4 ? 4 : 5);
    static constexpr int W_BYTES = BN * BK;
    static constexpr int STAGE_BYTES = W_BYTES + TP * BK * 2;
    static constexpr int SMEM = STAGES * STAGE_BYTES;
    static constexpr int MG = NT >= 4 ? 4 : 2;
    static constexpr int KG = 8 / MG;
    static constexpr int MTW = BN / 16 / MG;
    static constexpr int KPW = BK / 32 / KG;
    static_assert(SMEM >= KG * TP * BN * 4, "the k-group reduction tile must fit the ring");
};

__device__ __forceinline__ int w_off(int r, int c) { return r * BK + ((c ^ ((r & 3) << 1)) << 4); }
__device__ __forceinline__ int x_off(int r, int c) { return r * BK * 2 + ((c ^ ((r & 1) << 2)) << 4); }

// W streams with a 256-byte L2 prefetch and no L2 cache-policy hint: with the bf16 kernel's
// `L2::cache_hint` (an evict_first policy) ptxas 13.0 encoded this kernel's main-loop W copies
// as `LDGSTS [R+UR0], desc[UR1]`, which the H100 rejects as an illegal instruction
// (compute-sanitizer: CUDA_ERROR_ILLEGAL_INSTRUCTION in load_w; found 2026-12-06).
__device__ __forceinline__ void cp_async16_stream(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}


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

// One stage: warp (mg, kg) multiplies its MTW m-tiles by the NT X row tiles over its k-pairs.
// Each W fragment is dequantised once per warp; of the two operand sets, the smaller one is
// held in registers across the loop over the other (W for NT ≥ 4, X otherwise), which keeps
// the kernels within 128 registers.
template <int NT>
__device__ __forceinline__ void mma_stage(const uint8_t* st, int warp, int lane, uint32_t mult,
                                          float (&acc)[Tile8<NT>::MTW][NT][4]) {
    using T = Tile8<NT>;
    const uint8_t* xs = st + T::W_BYTES;
    const int mg = warp % T::MG, kg = warp / T::MG;
    const int g = lane >> 2, q = lane & 3;
    // The W fragments of m-tile `mt` for both k-steps of k-pair `kp`: a[step][register].
    auto load_a = [&](int kp, int mt, uint32_t (&a)[2][4]) {
        const int r0 = 16 * (mg * T::MTW + mt) + g;
        const int c = 2 * kp + (q >> 1), off = (q & 1) * 8;
        const uint2 w0 = *reinterpret_cast<const uint2*>(st + w_off(r0, c) + off);
        const uint2 w1 = *reinterpret_cast<const uint2*>(st + w_off(r0 + 8, c) + off);
        dequant4(w0.x, mult, a[0][0], a[0][2]);
        dequant4(w1.x, mult, a[0][1], a[0][3]);
        dequant4(w0.y, mult, a[1][0], a[1][2]);
        dequant4(w1.y, mult, a[1][1], a[1][3]);
    };
    auto load_x = [&](int kp, int j) {
        return *reinterpret_cast<const uint4*>(xs + x_off(8 * j + g, 4 * kp + q));
    };
#pragma unroll 1
    for (int kk = 0; kk < T::KPW; ++kk) {
        const int kp = kg * T::KPW + kk;
        if constexpr (T::MTW * 8 <= NT * 4) {
            uint32_t a[T::MTW][2][4];
#pragma unroll
            for (int mt = 0; mt < T::MTW; ++mt) load_a(kp, mt, a[mt]);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const uint4 xv = load_x(kp, j);
#pragma unroll
                for (int mt = 0; mt < T::MTW; ++mt) {
                    mma_bf16(acc[mt][j], a[mt][0], xv.x, xv.y);
                    mma_bf16(acc[mt][j], a[mt][1], xv.z, xv.w);
                }
            }
        } else {
            uint4 xv[NT];
#pragma unroll
            for (int j = 0; j < NT; ++j) xv[j] = load_x(kp, j);
#pragma unroll
            for (int mt = 0; mt < T::MTW; ++mt) {
                uint32_t a[2][4];
                load_a(kp, mt, a);
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    mma_bf16(acc[mt][j], a[0], xv[j].x, xv[j].y);
                    mma_bf16(acc[mt][j], a[1], xv[j].z, xv[j].w);
                }
            }
        }
    }
}

}  // namespace
