// Skinny GEMM for decode-shaped steps: Y[t, n] = X[t, k] · W[n, k]ᵀ (+ bias[n]), t ≤ 64,
// bf16 operands, f32 accumulation, bf16 or f32 output. Purely memory-bound on W (32 rows of
// LLaDA-8B's QKV read 100 MB of weights for 3 GFLOP), so the design is about keeping enough
// W bytes in flight on every SM and touching each W byte exactly once:
//
// - A block owns BN = 128 W rows (8 warps: m-groups × k-groups, see Tile) and one k range
//   (split-K over gridDim.y). W and X tiles of BK = 64 (or 128) columns go global → shared memory with
//   cp.async (16-byte, L2 evict_first + 256-byte L2 prefetch for W) through a STAGES-deep ring:
//   STAGES - 1 tiles (≈ 64–80 KB per block, two blocks per SM) are in flight while one is
//   multiplied. The previous version streamed W into a register ring and kept too few bytes in
//   flight at t = 32 (0.61–0.90× cuBLASLt, benches/RESULTS.md v0.3).
// - Shared tiles are 64-column rows (128 B) with the 16-byte chunk index XOR-swizzled by
//   row % 8, so the ldmatrix.x4 fragment loads (8 rows × 16 B each) are bank-conflict free.
//   W rows are the mma M dimension, X rows the N dimension (m16n8k16, NT = t/8 n-tiles).
// - Split-K (gridDim.y = S > 1) runs as a thread-block cluster of S blocks along y (sm_90):
//   each block leaves its f32 partial tile in its shared memory, and after a cluster barrier
//   every block sums a 1/S slice of the tile over the S ranks in rank order through
//   distributed shared memory. One launch, no global scratch, deterministic.
// - Programmatic dependent launch: the first STAGES - 1 W tiles are requested before
//   griddepcontrol.wait, so with the launch attribute the weight stream starts while the
//   kernel before (norm, RoPE, attention, SwiGLU) is still finishing; X is read after the wait.
//
// Entry points gemm_skinny{8,16,32,64}_bf16 (NT = 1, 2, 4, 8; t ≤ 8·NT; BK = 64),
// gemm_skinny{..}_k128_bf16 (BK = 128) and gemm_skinny{..}_swiglu_bf16 (the gate|up projection
// writing SwiGLU's output; gate and up halves paired per block, never split-K), 256 threads, dynamic shared memory Tile<NT, BK>::SMEM
// (the wrapper mirrors it). Requirements (checked
// by the wrapper): k % 8 == 0, x and w 16-byte aligned, k_split a multiple of BK.
#include <cooperative_groups.h>

#include "common.cuh"
#include "mma.cuh"

namespace cg = cooperative_groups;

struct SkinnyParams {
    const bf16* x;     // [>= t, k]
    const bf16* w;     // [n, k]
    const bf16* bias;  // [n] or nullptr
    void* y;           // [>= t, n], bf16 or f32 (out_f32)
    int t;
    int n;
    int k;
    int k_split;  // k columns per split (multiple of BK); split s covers [s*k_split, min(k, ..))
    int out_f32;  // 0: y is bf16, 1: y is f32
    int pad;
};

namespace {

constexpr int BN = 128;     // W rows per block
constexpr int THREADS = 256;

// NT n-tiles of 8 X rows; BK k columns per stage (64 or 128). The 8 warps form MG m-groups ×
// KG k-groups: warp w owns m-tiles [(w % MG)·MTW, +MTW) (16 W rows each) and, of every stage,
// the k-steps [(w / MG)·KSW, +KSW) (16 columns each). Splitting k across warps means each X
// fragment is read from shared memory by MG warps instead of all 8 (shared-memory bandwidth,
// not HBM, limited the one-m-tile-per-warp layout at t = 32); the KG partial sums are added in
// shared memory once, at the end.
template <int NT, int BK>
struct Tile {
    static constexpr int TP = 8 * NT;  // X rows staged (zero beyond t)
    static constexpr int STAGES = BK == 64 ? (NT == 8 ? 4 : 5) : (NT == 8 ? 3 : 4);  // ring depth
    static constexpr int W_ELEMS = BN * BK;
    static constexpr int STAGE_ELEMS = W_ELEMS + TP * BK;
    static constexpr int SMEM = STAGES * STAGE_ELEMS * 2;  // bytes
    static constexpr int MG = NT == 8 ? 4 : 2;
    static constexpr int KG = 8 / MG;
    static constexpr int MTW = BN / 16 / MG;
    static constexpr int KSW = BK / 16 / KG;
    static_assert(SMEM >= KG * TP * BN * 4, "the k-group reduction tile must fit the ring");
};

// Issues the W copies of stage `kb` (k columns [kb, kb + BK) ∩ [.., k1)) into `st`.
// SWIGLU (the gate|up projection with SwiGLU in its epilogue): the block's first 64 rows are
// gate rows [64·b, 64·b + 64) and the next 64 the matching up rows (+ n/2), so each block holds
// both halves of its 64 output columns.
template <int NT, int BK, bool SWIGLU>
__device__ __forceinline__ void load_w(const SkinnyParams& p, bf16* st, int n0, int kb, int k1, uint64_t pol) {
    constexpr int CPR = BK / 8;  // 16-byte chunks per row
#pragma unroll
    for (int u = 0; u < BN * CPR / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        const int r = i / CPR, c = i % CPR;
        int gr = n0 + r;
        bool row_ok = gr < p.n;
        if constexpr (SWIGLU) {
            const int half = p.n >> 1, g = (n0 >> 1) + (r & 63);
            gr = g + (r >= 64 ? half : 0);
            row_ok = g < half;
        }
        const int gk = kb + 8 * c;
        const bool ok = row_ok && gk < k1;
        const bf16* src = ok ? p.w + (size_t)gr * p.k + gk : p.w;
        cp_async16_stream(smem_u32(st + swz<BK>(r, c)), src, ok, pol);
    }
}

// The X copies of the same stage (rows >= t and columns >= k1 zero-filled).
template <int NT, int BK>
__device__ __forceinline__ void load_x(const SkinnyParams& p, bf16* st, int kb, int k1) {
    using T = Tile<NT, BK>;
    constexpr int CPR = BK / 8;
    bf16* xs = st + T::W_ELEMS;
#pragma unroll
    for (int u = 0; u < (T::TP * CPR + THREADS - 1) / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        if (i < T::TP * CPR) {
            const int r = i / CPR, c = i % CPR;
            const int gk = kb + 8 * c;
            const bool ok = r < p.t && gk < k1;
            const bf16* src = ok ? p.x + (size_t)r * p.k + gk : p.x;
            cp_async16(smem_u32(xs + swz<BK>(r, c)), src, ok);
        }
    }
}

// One stage: warp (mg, kg) multiplies its MTW m-tiles by all TP X rows over its KSW k-steps.
template <int NT, int BK>
__device__ __forceinline__ void mma_stage(const bf16* st, int warp, int lane, float (&acc)[Tile<NT, BK>::MTW][NT][4]) {
    using T = Tile<NT, BK>;
    const bf16* xs = st + T::W_ELEMS;
    const int mg = warp % T::MG, kg = warp / T::MG;
    const int wr = 16 * mg * T::MTW + (lane & 7) + ((lane >> 3) & 1) * 8;  // ldmatrix row for A
#pragma unroll
    for (int kk = 0; kk < T::KSW; ++kk) {
        const int ks = kg * T::KSW + kk;
        uint32_t b[NT][2];
        if constexpr (NT == 1) {
            ldmatrix_x2(b[0], xs + swz<BK>(lane & 7, 2 * ks + ((lane >> 3) & 1)));
        } else {
#pragma unroll
            for (int jp = 0; jp < NT / 2; ++jp) {
                uint32_t r[4];
                ldmatrix_x4(r, xs + swz<BK>(16 * jp + (lane & 7) + (lane >> 4) * 8, 2 * ks + ((lane >> 3) & 1)));
                b[2 * jp][0] = r[0];
                b[2 * jp][1] = r[1];
                b[2 * jp + 1][0] = r[2];
                b[2 * jp + 1][1] = r[3];
            }
        }
#pragma unroll
        for (int mt = 0; mt < T::MTW; ++mt) {
            uint32_t a[4];
            ldmatrix_x4(a, st + swz<BK>(wr + 16 * mt, 2 * ks + (lane >> 4)));
#pragma unroll
            for (int j = 0; j < NT; ++j) mma_bf16(acc[mt][j], a, b[j][0], b[j][1]);
        }
    }
}

__device__ __forceinline__ void store_out(const SkinnyParams& p, int r, int col, float v) {
    const size_t o = (size_t)r * p.n + col;
    if (p.bias) v += __bfloat162float(p.bias[col]);
    if (p.out_f32) {
        static_cast<float*>(p.y)[o] = v;
    } else {
        static_cast<bf16*>(p.y)[o] = __float2bfloat16(v);
    }
}

template <int NT, int BK, bool SWIGLU>
__device__ __forceinline__ void skinny_body(const SkinnyParams& p) {
    using T = Tile<NT, BK>;
    extern __shared__ uint4 smem_raw[];
    bf16* ring = reinterpret_cast<bf16*>(smem_raw);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * BN;
    const int k0 = blockIdx.y * p.k_split;
    const int k1 = min(p.k, k0 + p.k_split);
    const int nst = k1 > k0 ? (k1 - k0 + BK - 1) / BK : 0;
    const uint64_t pol = evict_first_policy();

    float acc[T::MTW][NT][4];
#pragma unroll
    for (int mt = 0; mt < T::MTW; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

    // Prologue: the W tiles of the first STAGES - 1 stages do not depend on the previous
    // kernel, so they are issued before the programmatic-launch wait (overlapping that kernel's
    // tail); X (its output) only after. Group s = {W of stages 0..STAGES-2 when s = 0} ∪ X of s,
    // so waiting for group s still means stage s has landed.
#pragma unroll
    for (int s = 0; s < T::STAGES - 1; ++s)
        if (s < nst) load_w<NT, BK, SWIGLU>(p, ring + s * T::STAGE_ELEMS, n0, k0 + s * BK, k1, pol);
    pdl_wait();
    pdl_trigger();
#pragma unroll
    for (int s = 0; s < T::STAGES - 1; ++s) {
        if (s < nst) load_x<NT, BK>(p, ring + s * T::STAGE_ELEMS, k0 + s * BK, k1);
        cp_async_commit();
    }
    for (int it = 0; it < nst; ++it) {
        cp_async_wait<T::STAGES - 2>();  // this thread's copies of stage `it` have landed
        __syncthreads();                 // ... everyone's; and stage it-1's slot is free
        const int nx = it + T::STAGES - 1;
        if (nx < nst) {
            bf16* st = ring + (nx % T::STAGES) * T::STAGE_ELEMS;
            load_w<NT, BK, SWIGLU>(p, st, n0, k0 + nx * BK, k1, pol);
            load_x<NT, BK>(p, st, k0 + nx * BK, k1);
        }
        cp_async_commit();
        mma_stage<NT, BK>(ring + (it % T::STAGES) * T::STAGE_ELEMS, warp, lane, acc);
    }

    // Sum the KG k-group partials: red[kg][r][c] (r < TP X rows, c < BN W rows of the block).
    // acc[mt][j][e]: X row 8j + 2q + (e & 1), W row 16·(mg·MTW + mt) + g + 8(e >> 1).
    cp_async_wait<0>();
    __syncthreads();  // every warp is done reading the ring
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
    const int rows = min(p.t, T::TP);
    // Each element is summed (in k-group order) and rewritten in place by one thread.
    for (int i = threadIdx.x; i < rows * BN; i += THREADS) {
        float v = red[i];
#pragma unroll
        for (int kg = 1; kg < T::KG; ++kg) v += red[kg * T::TP * BN + i];
        if (gridDim.y == 1 && !SWIGLU) {
            const int r = i / BN, col = n0 + (i - r * BN);
            if (col < p.n) store_out(p, r, col, v);
        } else {
            red[i] = v;
        }
    }
    if constexpr (SWIGLU) {
        // y = act [t, n/2]: act[r, c] = bf16(bf16(silu(g)) · u) with g, u the bf16-rounded GEMM
        // outputs — exactly the gate|up GEMM's bf16 output followed by swiglu_bf16. (The wrapper
        // never splits k here.)
        __syncthreads();
        const int half = p.n >> 1, c0 = n0 >> 1;
        for (int i = threadIdx.x; i < rows * 64; i += THREADS) {
            const int r = i >> 6, j = i & 63;
            if (c0 + j < half) {
                const float g = round_bf16(red[r * BN + j]), u = round_bf16(red[r * BN + 64 + j]);
                static_cast<bf16*>(p.y)[(size_t)r * half + c0 + j] =
                    __float2bfloat16(round_bf16(g / (1.f + expf(-g))) * u);
            }
        }
        return;
    }
    if (gridDim.y == 1) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Split-K: the block partials red[0 .. rows·BN) of the cluster's S blocks, summed in rank
    // order through distributed shared memory; block `rank` writes every S-th slice.
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
    cluster.sync();  // no block leaves while a peer still reads its tile
#else
    __trap();  // split-K needs thread-block clusters (sm_90+); the wrapper never launches it below
#endif
}

}  // namespace

#define SKINNY_ENTRY(name, NT, BK, SWIGLU, MINB) \
    extern "C" __global__ void __launch_bounds__(THREADS, MINB) name(const SkinnyParams p) { skinny_body<NT, BK, SWIGLU>(p); }
SKINNY_ENTRY(gemm_skinny8_bf16, 1, 64, false, 2)
SKINNY_ENTRY(gemm_skinny16_bf16, 2, 64, false, 2)
SKINNY_ENTRY(gemm_skinny32_bf16, 4, 64, false, 2)
SKINNY_ENTRY(gemm_skinny64_bf16, 8, 64, false, 2)
// 128-column stages (one block per SM, 256-byte runs of each W row per stage): a tuning variant.
SKINNY_ENTRY(gemm_skinny8_k128_bf16, 1, 128, false, 1)
SKINNY_ENTRY(gemm_skinny16_k128_bf16, 2, 128, false, 1)
SKINNY_ENTRY(gemm_skinny32_k128_bf16, 4, 128, false, 1)
SKINNY_ENTRY(gemm_skinny64_k128_bf16, 8, 128, false, 1)
// The gate|up projection with SwiGLU in the epilogue (see load_w): y = act [t, n/2].
SKINNY_ENTRY(gemm_skinny8_swiglu_bf16, 1, 64, true, 2)
SKINNY_ENTRY(gemm_skinny16_swiglu_bf16, 2, 64, true, 2)
SKINNY_ENTRY(gemm_skinny32_swiglu_bf16, 4, 64, true, 2)
SKINNY_ENTRY(gemm_skinny64_swiglu_bf16, 8, 64, true, 2)
