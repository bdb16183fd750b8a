// Grouped expert GEMMs of a Mixture-of-Experts FFN and the weighted combine, over the pairs
// that kernels/moe_route.cu grouped by expert (counts[E], offsets[E + 1], perm[position] =
// row·top_k + slot). Everything the host does not know (how many rows each expert got) is read
// on the device, so the launches are fixed-shape and CUDA-graph safe.
//
// moe_gate_up{8,16,32,64}_bf16: act[position, ffn] = bf16(bf16(silu(bf16 g))·bf16 u) for the
//   gate|up weight of the position's expert, [E, 2·ffn, hidden]: exactly the numerics of
//   gemm_skinny*_swiglu_bf16. Grid (ceil(ffn / 64), E): block (b, e) pairs gate rows
//   [64b, 64b + 64) with their up rows and streams them once per chunk of TP = 8·NT of the
//   expert's rows (X rows gathered from the token rows through perm); a block whose expert got
//   no rows exits before touching its weights, so only the experts in use are read.
// moe_down{8,16,32,64}_f32: y[position, hidden] (f32) = act[position] · W_down[e]ᵀ,
//   W_down [E, hidden, ffn]; grid (ceil(hidden / 128), E), the same pipeline.
// The pipeline is the skinny GEMM's (kernels/gemm_skinny.cu): 128 W rows per block, 64-column
// stages through a 4-5 deep cp.async ring (W with L2 evict-first), swizzled tiles, ldmatrix,
// mma.sync m16n8k16, 8 warps as m-groups × k-groups, k-group partials summed in shared memory.
// Each output row depends only on its own X row, so results do not depend on which other rows
// share a tile or a chunk. An expert with more rows than TP loops over chunks (re-streaming W).
//
// moe_gate_up_ref_bf16 / moe_down_ref_f32: the reference variant, one thread per output,
// sequential f32 dot products (same roundings as the grouped kernels, different summation
// order), for parity tests and profiling.
// moe_combine_bf16: out[r] = bf16(Σ_s w[r, s]·y[pos[r·k + s]]) in f32, the k slots taken in
//   ascending expert id (separate multiply and add, no FMA contraction), shared by both variants;
//   with add_out the sum then adds out[r]'s old value (LLaDA2's shared expert) before rounding.
#include "mma.cuh"

struct MoeGemmParams {
    const bf16* x;        // gate_up: token rows [>= t, k]; down: act [pairs, k] (by position)
    const bf16* w;        // [E, n, k]
    void* y;              // gate_up: act bf16 [pairs, n / 2]; down: f32 [pairs, n]
    const int* counts;    // [E]
    const int* offsets;   // [E + 1]
    const int* perm;      // [pairs]: pair index (row·top_k + slot) at each position
    const int* ids;       // [pairs]: expert of each pair (the reference kernels)
    int n;                // W rows per expert (gate_up: 2·ffn; down: hidden)
    int k;                // W columns (gate_up: hidden; down: ffn), % 8 == 0
    int top_k;
    int pairs;            // t·top_k
};

struct MoeCombineParams {
    const float* y;        // [pairs, hidden], by position
    const float* weights;  // [t, top_k]
    const int* ids;        // [t, top_k]
    const int* pos;        // [t·top_k]: position of each pair
    bf16* out;             // [>= t, hidden]
    int t;
    int hidden;  // % 8 == 0
    int top_k;   // <= MOE_MAX_TOP_K
    int add_out; // 1: out[r] = bf16(Σ + out[r]) (LLaDA2: out holds the shared expert's output)
};

#define MOE_MAX_TOP_K 64  // MAX_TOP_K in src/ops/moe.rs
#define REF_THREADS 128
#define CB_THREADS 128

namespace {

constexpr int BN = 128;  // W rows per block
constexpr int BK = 64;   // k columns per stage
constexpr int THREADS = 256;

// NT n-tiles of 8 X rows (TP rows per chunk); see Tile in gemm_skinny.cu.
template <int NT>
struct Tile {
    static constexpr int TP = 8 * NT;
    static constexpr int STAGES = NT == 8 ? 4 : 5;
    static constexpr int W_ELEMS = BN * BK;
    static constexpr int STAGE_ELEMS = W_ELEMS + TP * BK;
    static constexpr int SMEM = STAGES * STAGE_ELEMS * 2;  // bytes
    static constexpr int MG = NT == 8 ? 4 : 2;
    static constexpr int KG = 8 / MG;
    static constexpr int MTW = BN / 16 / MG;
    static constexpr int KSW = BK / 16 / KG;
    static_assert(SMEM >= KG * TP * BN * 4, "the k-group reduction tile must fit the ring");
};

// W copies of stage kb of expert weight `w` ([n, k]); SWIGLU pairs 64 gate rows with their up
// rows (+ n/2), as gemm_skinny's load_w.
template <bool SWIGLU>
__device__ __forceinline__ void load_w(const bf16* w, int n, int k, bf16* st, int n0, int kb, uint64_t pol) {
    constexpr int CPR = BK / 8;
#pragma unroll
    for (int u = 0; u < BN * CPR / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        const int r = i / CPR, c = i % CPR;
        int gr = n0 + r;
        bool row_ok = gr < n;
        if constexpr (SWIGLU) {
            const int half = n >> 1, g = (n0 >> 1) + (r & 63);
            gr = g + (r >= 64 ? half : 0);
            row_ok = g < half;
        }
        const int gk = kb + 8 * c;
        const bool ok = row_ok && gk < k;
        const bf16* src = ok ? w + (size_t)gr * k + gk : w;
        cp_async16_stream(smem_u32(st + swz<BK>(r, c)), src, ok, pol);
    }
}

// X copies of stage kb: tile row r reads source row xrow[r] (−1: zero-filled).
template <int NT>
__device__ __forceinline__ void load_x(const MoeGemmParams& p, int k, const int* xrow, bf16* st, int kb) {
    using T = Tile<NT>;
    constexpr int CPR = BK / 8;
    bf16* xs = st + T::W_ELEMS;
#pragma unroll
    for (int u = 0; u < (T::TP * CPR + THREADS - 1) / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        if (i < T::TP * CPR) {
            const int r = i / CPR, c = i % CPR;
            const int gk = kb + 8 * c;
            const int src_row = xrow[r];
            const bool ok = src_row >= 0 && gk < k;
            const bf16* src = ok ? p.x + (size_t)src_row * k + gk : p.x;
            cp_async16(smem_u32(xs + swz<BK>(r, c)), src, ok);
        }
    }
}

template <int NT>
__device__ __forceinline__ void mma_stage(const bf16* st, int warp, int lane, float (&acc)[Tile<NT>::MTW][NT][4]) {
    using T = Tile<NT>;
    const bf16* xs = st + T::W_ELEMS;
    const int mg = warp % T::MG, kg = warp / T::MG;
    const int wr = 16 * mg * T::MTW + (lane & 7) + ((lane >> 3) & 1) * 8;
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

template <int NT, bool SWIGLU>
__device__ __forceinline__ void grouped_body(const MoeGemmParams& p) {
    using T = Tile<NT>;
    extern __shared__ uint4 smem_raw[];
    __shared__ int xrow[T::TP];
    bf16* ring = reinterpret_cast<bf16*>(smem_raw);
    pdl_wait();  // counts, offsets, perm and X come from the kernels before
    pdl_trigger();
    const int e = blockIdx.y;
    const int cnt = p.counts[e];
    if (cnt == 0) return;  // an expert no row picked: its weights are never read
    const int off = p.offsets[e];
    const bf16* w = p.w + (size_t)e * p.n * p.k;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * BN;
    const int nst = (p.k + BK - 1) / BK;
    const uint64_t pol = evict_first_policy();
    float* red = reinterpret_cast<float*>(smem_raw);

#pragma unroll 1
    for (int c0 = 0; c0 < cnt; c0 += T::TP) {
        const int rows = min(T::TP, cnt - c0);
        if (threadIdx.x < T::TP) {
            int src = -1;
            if ((int)threadIdx.x < rows) {
                const int i = off + c0 + threadIdx.x;
                src = SWIGLU ? p.perm[i] / p.top_k : i;
            }
            xrow[threadIdx.x] = src;
        }
        __syncthreads();  // xrow is set; the previous chunk is done with the ring
        // Opaque per-chunk copies of the weight pointer and k: otherwise the compiler hoists
        // every stage's address arithmetic out of the chunk loop and the kernel spills.
        const bf16* wc = w;
        int kc = p.k, nc = p.n;
        asm volatile("" : "+l"(wc), "+r"(kc), "+r"(nc));

        float acc[T::MTW][NT][4];
#pragma unroll
        for (int mt = 0; mt < T::MTW; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[mt][j][v] = 0.f;
#pragma unroll
        for (int s = 0; s < T::STAGES - 1; ++s) {
            if (s < nst) {
                bf16* st = ring + s * T::STAGE_ELEMS;
                load_w<SWIGLU>(wc, nc, kc, st, n0, s * BK, pol);
                load_x<NT>(p, kc, xrow, st, s * BK);
            }
            cp_async_commit();
        }
        for (int it = 0; it < nst; ++it) {
            cp_async_wait<T::STAGES - 2>();
            __syncthreads();
            const int nx = it + T::STAGES - 1;
            if (nx < nst) {
                bf16* st = ring + (nx % T::STAGES) * T::STAGE_ELEMS;
                load_w<SWIGLU>(wc, nc, kc, st, n0, nx * BK, pol);
                load_x<NT>(p, kc, xrow, st, nx * BK);
            }
            cp_async_commit();
            mma_stage<NT>(ring + (it % T::STAGES) * T::STAGE_ELEMS, warp, lane, acc);
        }

        // k-group partials → red[kg][r][c] (r < TP X rows, c < BN W rows), summed in kg order.
        cp_async_wait<0>();
        __syncthreads();
        {
            const int mg = warp % T::MG, kg = warp / T::MG;
            float* mine = red + kg * T::TP * BN;
#pragma unroll
            for (int mt = 0; mt < T::MTW; ++mt)
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int v = 0; v < 4; ++v)
                        mine[(8 * j + 2 * q + (v & 1)) * BN + 16 * (mg * T::MTW + mt) + g + 8 * (v >> 1)] = acc[mt][j][v];
        }
        __syncthreads();
        for (int i = threadIdx.x; i < rows * BN; i += THREADS) {
            float v = red[i];
#pragma unroll
            for (int kg = 1; kg < T::KG; ++kg) v += red[kg * T::TP * BN + i];
            if constexpr (SWIGLU) {
                red[i] = v;
            } else {
                const int r = i / BN, col = n0 + (i - r * BN);
                if (col < p.n) static_cast<float*>(p.y)[(size_t)(off + c0 + r) * p.n + col] = v;
            }
        }
        if constexpr (SWIGLU) {
            __syncthreads();
            const int half = p.n >> 1, cb = n0 >> 1;
            for (int i = threadIdx.x; i < rows * 64; i += THREADS) {
                const int r = i >> 6, j = i & 63;
                if (cb + j < half) {
                    const float gv = round_bf16(red[r * BN + j]), uv = round_bf16(red[r * BN + 64 + j]);
                    static_cast<bf16*>(p.y)[(size_t)(off + c0 + r) * half + cb + j] =
                        __float2bfloat16(round_bf16(gv / (1.f + expf(-gv))) * uv);
                }
            }
        }
        __syncthreads();  // red (the ring) and xrow are free for the next chunk
    }
}

}  // namespace

#define MOE_ENTRY(name, NT, SWIGLU) \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(const MoeGemmParams p) { grouped_body<NT, SWIGLU>(p); }
MOE_ENTRY(moe_gate_up8_bf16, 1, true)
MOE_ENTRY(moe_gate_up16_bf16, 2, true)
MOE_ENTRY(moe_gate_up32_bf16, 4, true)
MOE_ENTRY(moe_gate_up64_bf16, 8, true)
MOE_ENTRY(moe_down8_f32, 1, false)
MOE_ENTRY(moe_down16_f32, 2, false)
MOE_ENTRY(moe_down32_f32, 4, false)
MOE_ENTRY(moe_down64_f32, 8, false)

// Reference: thread (position blockIdx.x, column blockIdx.y·128 + tid) of act.
extern "C" __global__ void __launch_bounds__(REF_THREADS) moe_gate_up_ref_bf16(const MoeGemmParams p) {
    pdl_wait();
    pdl_trigger();
    const int i = blockIdx.x, half = p.n >> 1;
    const int j = blockIdx.y * REF_THREADS + threadIdx.x;
    if (j >= half) return;
    const int pair = p.perm[i];
    const int e = p.ids[pair];
    const bf16* x = p.x + (size_t)(pair / p.top_k) * p.k;
    const bf16* wg = p.w + ((size_t)e * p.n + j) * p.k;
    const bf16* wu = p.w + ((size_t)e * p.n + half + j) * p.k;
    float gs = 0.f, us = 0.f;
    for (int c = 0; c < p.k; ++c) {
        const float xv = __bfloat162float(x[c]);
        gs += xv * __bfloat162float(wg[c]);
        us += xv * __bfloat162float(wu[c]);
    }
    const float gv = round_bf16(gs), uv = round_bf16(us);
    static_cast<bf16*>(p.y)[(size_t)i * half + j] = __float2bfloat16(round_bf16(gv / (1.f + expf(-gv))) * uv);
}

// Reference: thread (position blockIdx.x, column blockIdx.y·128 + tid) of y.
extern "C" __global__ void __launch_bounds__(REF_THREADS) moe_down_ref_f32(const MoeGemmParams p) {
    pdl_wait();
    pdl_trigger();
    const int i = blockIdx.x;
    const int col = blockIdx.y * REF_THREADS + threadIdx.x;
    if (col >= p.n) return;
    const int e = p.ids[p.perm[i]];
    const bf16* a = p.x + (size_t)i * p.k;
    const bf16* w = p.w + ((size_t)e * p.n + col) * p.k;
    float s = 0.f;
    for (int c = 0; c < p.k; ++c) s += __bfloat162float(a[c]) * __bfloat162float(w[c]);
    static_cast<float*>(p.y)[(size_t)i * p.n + col] = s;
}

// Grid (t, ceil(hidden / (8·CB_THREADS))): thread → 8 columns of row blockIdx.x.
extern "C" __global__ void __launch_bounds__(CB_THREADS) moe_combine_bf16(const MoeCombineParams p) {
    __shared__ int s_pos[MOE_MAX_TOP_K];
    __shared__ float s_w[MOE_MAX_TOP_K];
    pdl_wait();
    pdl_trigger();
    const int r = blockIdx.x, k = p.top_k;
    if (threadIdx.x == 0) {
        // The row's slots by ascending expert id (insertion sort; ids of a row are distinct).
        int id[MOE_MAX_TOP_K];
        for (int s = 0; s < k; ++s) {
            const int e = p.ids[(size_t)r * k + s];
            const int ps = p.pos[(size_t)r * k + s];
            const float wv = p.weights[(size_t)r * k + s];
            int j = s;
            while (j > 0 && id[j - 1] > e) {
                id[j] = id[j - 1];
                s_pos[j] = s_pos[j - 1];
                s_w[j] = s_w[j - 1];
                --j;
            }
            id[j] = e;
            s_pos[j] = ps;
            s_w[j] = wv;
        }
    }
    __syncthreads();
    const int c = 8 * (blockIdx.y * CB_THREADS + threadIdx.x);
    if (c >= p.hidden) return;
    float acc[8];
#pragma unroll
    for (int v = 0; v < 8; ++v) acc[v] = 0.f;
    for (int s = 0; s < k; ++s) {
        const float4* yv = reinterpret_cast<const float4*>(p.y + (size_t)s_pos[s] * p.hidden + c);
        const float4 a = yv[0], b = yv[1];
        const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        const float wv = s_w[s];
#pragma unroll
        for (int v = 0; v < 8; ++v) acc[v] = __fadd_rn(acc[v], __fmul_rn(wv, f[v]));
    }
    bf16* dst = p.out + (size_t)r * p.hidden + c;
    if (p.add_out) {
        const uint4 raw = *reinterpret_cast<const uint4*>(dst);  // 8 bf16, 16-byte aligned
        const bf16* prev = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
        for (int v = 0; v < 8; ++v) acc[v] = __fadd_rn(acc[v], __bfloat162float(prev[v]));
    }
    store8(dst, acc);
}
