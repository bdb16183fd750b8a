// W8A8 skinny GEMM: y[t, n] = sx[r]·sw[c]·Σ_k qx[r, k]·qw[c, k] (+ bias[c]) for t ≤ 64, both
// operands E4M3 (the activations quantised per row by quantize_rows_fp8_bf16, the weight per
// output channel), f32 accumulation, bf16 or f32 output. The `skinny` W8A8 path of
// src/ops/gemm_w8a8.rs (only when selected: on the H100 it streams W at 1.6-2.4 TB/s, about as
// the W8A16 kernel, and W1 steps are faster on cuBLASLt's FP8 GEMM; benches/RESULTS.md v0.12).
// It is the W8A16 kernel's design (kernels/gemm_fp8.cu, read it first) without the
// dequantisation:
//
// - A block owns BN = 128 W rows and one k range (cluster split-K over gridDim.y, reduced
//   through distributed shared memory as in the W8A16 kernel). Stages of BK = 128 columns: a
//   16 KB W tile and the X tile (TP rows × 128 codes), both global → shared by 16-byte cp.async
//   through a STAGES-deep ring (4-6 stages: the X tile is half the W8A16 kernel's).
// - The MMA is the E4M3 m16n8k32 (`mma.sync ... e4m3.e4m3.f32`, sm_89+), W rows as M and X rows
//   as N. The W bytes go to the tensor core as they are: no conversion, no scale per stage.
// - k order is permuted identically for A and B inside each 64-column half of a stage: thread
//   (g, q) of a warp loads 16 contiguous codes [16q, 16q + 16) of its rows (W rows g and g + 8
//   of each m-tile, X row g of each n-tile); words 0-1 are its A/B registers of the first k32
//   MMA (logical k 4q.. and 16 + 4q..) and words 2-3 those of the second. Every column is
//   multiplied once, so the sum over k is unchanged. One 16-byte shared load per row and half.
// - The 8 warps are 4 m-groups (2 m-tiles each) × 2 k-groups (one 64-column half of each
//   stage); the two k-group partials are added in shared memory at the end.
// - Shared rows are 128 bytes with 16-byte chunk c of row r at c ^ 4(r % 2), so the 8 lanes of
//   a load phase (rows 2i, 2i + 1; chunks 4h..4h+3) cover all 32 banks.
// - Epilogue (fp8.cuh's fp8_finish with the W8A8 parameter block): y = f32(sx[r]·sw[c])·Σ, then
//   the bias, in the output type; the gate|up entry points pair 64 gate rows with their 64 up
//   rows per block and write act = bf16(bf16(silu(g))·u) with g, u the bf16-rounded scaled sums
//   (never split-K).
//
// Entry points gemm_w8a8_skinny{8,16,32,64}_bf16 (NT = 1, 2, 4, 8 n-tiles; t ≤ 8·NT) and
// gemm_w8a8_skinny{..}_swiglu_bf16, 256 threads, dynamic shared memory TileQ<NT>::SMEM (the
// wrapper mirrors it). Requirements (checked by src/ops/gemm_w8a8/skinny.rs): k % 16 == 0,
// 16-byte aligned x and w, k_split a multiple of 128, channel scales, an sm_89+ GPU (the MMA
// traps on the sm_80 build).
#include "w8a8_mma.cuh"

namespace {

template <int NT>
struct TileQ {
    static constexpr int TP = 8 * NT;
    static constexpr int STAGES = NT == 8 ? 4 : (NT == 4 ? 5 : 6);
    static constexpr int W_BYTES = BN * BK;
    static constexpr int STAGE_BYTES = W_BYTES + TP * BK;
    static constexpr int SMEM = STAGES * STAGE_BYTES;
    static constexpr int MG = QMG;
    static constexpr int KG = QKG;
    static constexpr int MTW = QMTW;
    static_assert(KG * 64 == BK, "each k-group takes one 64-column half of a stage");
    static_assert(SMEM >= KG * TP * BN * 4, "the k-group reduction tile must fit the ring");
};

// The X copies of the stage at column kb (rows ≥ t and columns ≥ k1 zero-filled).
template <int NT>
__device__ __forceinline__ void load_xq(const W8a8SkinnyParams& p, uint8_t* st, int kb, int k1) {
    using T = TileQ<NT>;
    constexpr int CPR = BK / 16;  // 16-byte chunks per X row
    uint8_t* xs = st + T::W_BYTES;
#pragma unroll
    for (int u = 0; u < (T::TP * CPR + THREADS - 1) / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        if (i < T::TP * CPR) {
            const int r = i / CPR, c = i % CPR;
            const int gk = kb + 16 * c;
            const bool ok = r < p.t && gk < k1;
            const uint8_t* src = ok ? p.x + (size_t)r * p.k + gk : p.x;
            cp_async16(smem_u32(xs + q_off(r, c)), src, ok);
        }
    }
}

template <int NT, bool SWIGLU>
__device__ __forceinline__ void w8a8_body(const W8a8SkinnyParams& p) {
    using T = TileQ<NT>;
    extern __shared__ uint4 smem_raw[];
    uint8_t* ring = reinterpret_cast<uint8_t*>(smem_raw);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * BN;
    const int k0 = blockIdx.y * p.k_split;
    const int k1 = min(p.k, k0 + p.k_split);
    const int nst = k1 > k0 ? (k1 - k0 + BK - 1) / BK : 0;

    float acc[T::MTW][NT][4];
#pragma unroll
    for (int mt = 0; mt < T::MTW; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

    // Prologue as the W8A16 kernel's: W of the first STAGES - 1 stages before the
    // programmatic-launch wait, X (the quantiser's output) after it.
#pragma unroll 1
    for (int s = 0; s < T::STAGES - 1; ++s)
        if (s < nst) load_w<SWIGLU, WSwizzle::Half>(p, ring + s * T::STAGE_BYTES, n0, k0 + s * BK, k1);
    pdl_wait();
    pdl_trigger();
#pragma unroll 1
    for (int s = 0; s < T::STAGES - 1; ++s) {
        if (s < nst) load_xq<NT>(p, ring + s * T::STAGE_BYTES, k0 + s * BK, k1);
        cp_async_commit();
    }
    for (int it = 0; it < nst; ++it) {
        cp_async_wait<T::STAGES - 2>();
        __syncthreads();
        const int nx = it + T::STAGES - 1;
        if (nx < nst) {
            uint8_t* st = ring + (nx % T::STAGES) * T::STAGE_BYTES;
            load_w<SWIGLU, WSwizzle::Half>(p, st, n0, k0 + nx * BK, k1);
            load_xq<NT>(p, st, k0 + nx * BK, k1);
        }
        cp_async_commit();
        mma_stage_q<NT>(ring + (it % T::STAGES) * T::STAGE_BYTES, warp, lane, acc);
    }

    // k-group partials → red[kg][x row][W row], summed in k-group order.
    cp_async_wait<0>();
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem_raw);
    {
        const int mg = warp % T::MG, kg = warp / T::MG;
        float* mine = red + kg * T::TP * BN;
#pragma unroll
        for (int mt = 0; mt < T::MTW; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    mine[(8 * j + 2 * q + (e & 1)) * BN + 16 * (mg * T::MTW + mt) + g + 8 * (e >> 1)] = acc[mt][j][e];
    }
    __syncthreads();
    fp8_finish<T::TP, T::KG, SWIGLU>(p, red, n0);
}

}  // namespace

#define W8A8_ENTRY(name, NT, SWIGLU) \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(const W8a8SkinnyParams p) { w8a8_body<NT, SWIGLU>(p); }
W8A8_ENTRY(gemm_w8a8_skinny8_bf16, 1, false)
W8A8_ENTRY(gemm_w8a8_skinny16_bf16, 2, false)
W8A8_ENTRY(gemm_w8a8_skinny32_bf16, 4, false)
W8A8_ENTRY(gemm_w8a8_skinny64_bf16, 8, false)
W8A8_ENTRY(gemm_w8a8_skinny8_swiglu_bf16, 1, true)
W8A8_ENTRY(gemm_w8a8_skinny16_swiglu_bf16, 2, true)
W8A8_ENTRY(gemm_w8a8_skinny32_swiglu_bf16, 4, true)
W8A8_ENTRY(gemm_w8a8_skinny64_swiglu_bf16, 8, true)
