// Mixture-of-Experts routing on the device, with no host round trip (CUDA-graph safe):
//
// - moe_route_f32: one block of RT_THREADS per token row turns its router logits [E] (f32)
//   into top_k (expert id, weight) pairs, in selection order:
//   mode 0 (LLaDA-MoE): softmax over all experts — numerators exp(l − max) in f32 (rounded
//     from a double exp, so they match a correctly rounded f32 exp), their sum in f64 — the
//     top_k largest numerators (ties → lower id), weight = numerator / sum, renormalised over
//     the k picked when norm_topk (the sum of the k weights taken in selection order);
//   mode 1 (LLaDA2): s = 1 / (1 + exp(−l)) in f32, selection on s + bias: each of n_group
//     groups is scored by the sum of its two largest biased scores, the topk_group best groups
//     kept (ties → lower group), the top_k best biased scores inside them taken (ties → lower
//     id); weight = s / (Σ s + 1e-20) (plain s when top_k = 1) × routed_scaling.
//   Both exactly as src/cpu/moe.rs::route_row / src/cpu/llada2.rs::route_row (same experts, same
//   order; f32 operations in the same order). Ranking uses a 64-bit key (an order-preserving
//   integer image of the f32 value, as Rust's total_cmp, above the complement of the index),
//   so one block-wide max picks the largest value with ties to the lower index.
// - moe_permute_i32: one block groups the t·top_k (row, slot) pairs by expert: counts[E],
//   exclusive offsets[E + 1], perm[position] = pair index (row·top_k + slot) with each
//   expert's pairs at [offsets[e], offsets[e + 1]) in increasing pair order (a stable counting
//   sort, so the layout is deterministic), and pos[pair] = its position. Traps on an id ≥ E.
#include "common.cuh"

#define RT_THREADS 256
#define MOE_MAX_TOP_K 64  // MAX_TOP_K in src/ops/moe.rs
#define PM_THREADS 1024

struct MoeRouteParams {
    const float* logits;  // [t, E]
    const float* bias;    // [E] (mode 1) or nullptr
    int* ids;             // [t, top_k]
    float* weights;       // [t, top_k]
    int t;
    int n_experts;
    int top_k;
    int mode;       // 0: softmax, 1: sigmoid + group-limited top-k
    int norm_topk;  // mode 0: renormalise the k weights
    int n_group;    // mode 1
    int topk_group; // mode 1
    float routed_scaling;  // mode 1
};

struct MoePermuteParams {
    const int* ids;  // [pairs]
    int* counts;     // [E]
    int* offsets;    // [E + 1]
    int* perm;       // [pairs]
    int* pos;        // [pairs]
    int pairs;
    int n_experts;
};

namespace {

typedef unsigned long long u64;

// Order-preserving image of an f32 (as total_cmp: −NaN < −inf < … < −0 < +0 < … < +inf < NaN)
// above the complement of the index, so a larger key is a larger value or, on a tie, a lower
// index. Every key of a real entry is ≥ 1; 0 marks a taken or excluded entry.
__device__ __forceinline__ u64 rank_key(float v, int i) {
    uint32_t b = __float_as_uint(v);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((u64)b << 32) | (u64)(0xFFFFFFFFu - (uint32_t)i);
}
__device__ __forceinline__ int key_index(u64 k) { return (int)(0xFFFFFFFFu - (uint32_t)(k & 0xFFFFFFFFu)); }

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u64 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// Block-wide max of `v`; `scratch` holds >= 33 u64 of shared memory. All threads get it.
__device__ __forceinline__ u64 block_max_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max_u64(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0ull;
        v = warp_max_u64(v);
        if (lane == 0) scratch[32] = v;
    }
    __syncthreads();
    return scratch[32];
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Takes the `count` largest keys of keys[0, len) in order, marking each taken (0); their
// indices go to out[] (which holds count entries) unless out is nullptr.
__device__ void select_top(u64* keys, int len, int count, int* out, u64* scratch) {
    for (int r = 0; r < count; ++r) {
        u64 best = 0;
        for (int i = threadIdx.x; i < len; i += blockDim.x) best = keys[i] > best ? keys[i] : best;
        best = block_max_u64(best, scratch);
        const int i = key_index(best);
        if (threadIdx.x == 0) {
            if (out) out[r] = i;
            keys[i] = 0;
        }
        __syncthreads();
    }
}

// f32 exp rounded from a double exp: matches a correctly rounded expf (what the CPU reference's
// libm returns) except in vanishingly rare halfway cases; plain expf may differ by an ulp.
__device__ __forceinline__ float exp_f32(float x) { return (float)exp((double)x); }

}  // namespace

extern "C" __global__ void __launch_bounds__(RT_THREADS) moe_route_f32(const MoeRouteParams p) {
    // Dynamic shared memory: score[E] f32, key[E] u64, gkey[n_group] u64 (8-byte aligned first).
    extern __shared__ u64 dyn[];
    u64* key = dyn;
    u64* gkey = key + p.n_experts;
    float* score = reinterpret_cast<float*>(gkey + p.n_group);
    __shared__ u64 scratch[33];
    __shared__ double dsum[32];
    __shared__ float fmx[32];
    __shared__ int sel[MOE_MAX_TOP_K];
    pdl_wait();
    pdl_trigger();
    const int row = blockIdx.x, E = p.n_experts;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* l = p.logits + (size_t)row * E;

    float sum_f = 0.f;
    if (p.mode == 0) {
        float mx = -INFINITY;
        for (int i = threadIdx.x; i < E; i += blockDim.x) mx = fmaxf(mx, l[i]);
        mx = warp_max(mx);
        if (lane == 0) fmx[warp] = mx;
        __syncthreads();
        mx = -INFINITY;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) mx = fmaxf(mx, fmx[w]);
        double s = 0.0;
        for (int i = threadIdx.x; i < E; i += blockDim.x) {
            const float ex = exp_f32(l[i] - mx);
            score[i] = ex;
            key[i] = rank_key(ex, i);
            s += (double)ex;
        }
        s = warp_sum_f64(s);
        if (lane == 0) dsum[warp] = s;
        __syncthreads();
        double tot = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) tot += dsum[w];
        sum_f = (float)tot;
    } else {
        for (int i = threadIdx.x; i < E; i += blockDim.x) {
            const float s = 1.f / (1.f + exp_f32(-l[i]));
            score[i] = s;
            key[i] = rank_key(s + p.bias[i], i);
        }
        __syncthreads();
        // Group g's score: the sum of its two largest biased scores (ties → lower id).
        const int gs = E / p.n_group;
        for (int g = threadIdx.x; g < p.n_group; g += blockDim.x) {
            u64 a = 0, b = 0;
            for (int i = g * gs; i < (g + 1) * gs; ++i) {
                const u64 k = key[i];
                if (k > a) {
                    b = a;
                    a = k;
                } else if (k > b) {
                    b = k;
                }
            }
            const int ia = key_index(a), ib = key_index(b);
            gkey[g] = rank_key((score[ia] + p.bias[ia]) + (score[ib] + p.bias[ib]), g);
        }
        __syncthreads();
        select_top(gkey, p.n_group, p.topk_group, nullptr, scratch);  // kept groups now have key 0
        for (int i = threadIdx.x; i < E; i += blockDim.x)
            if (gkey[i / gs] != 0) key[i] = 0;
        __syncthreads();
    }
    select_top(key, E, p.top_k, sel, scratch);

    if (threadIdx.x == 0) {
        const int k = p.top_k;
        int* ids = p.ids + (size_t)row * k;
        float* wts = p.weights + (size_t)row * k;
        if (p.mode == 0) {
            float tot = 0.f;
            for (int r = 0; r < k; ++r) {
                wts[r] = score[sel[r]] / sum_f;
                tot += wts[r];
            }
            if (p.norm_topk)
                for (int r = 0; r < k; ++r) wts[r] = wts[r] / tot;
        } else {
            float tot = 0.f;
            for (int r = 0; r < k; ++r) tot += score[sel[r]];
            for (int r = 0; r < k; ++r) {
                const float w = k > 1 ? score[sel[r]] / (tot + 1e-20f) : score[sel[r]];
                wts[r] = w * p.routed_scaling;
            }
        }
        for (int r = 0; r < k; ++r) ids[r] = sel[r];
    }
}

extern "C" __global__ void __launch_bounds__(PM_THREADS) moe_permute_i32(const MoePermuteParams p) {
    extern __shared__ int cnt[];  // [E] counts, then [E] running cursors
    int* cur = cnt + p.n_experts;
    pdl_wait();
    pdl_trigger();
    const int E = p.n_experts;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < p.pairs; i += blockDim.x) {
        const int e = p.ids[i];
        if (e < 0 || e >= E) __trap();  // the router never writes one; a corrupt workspace
        atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    if (warp == 0) {
        // Exclusive scan of the counts, 32 experts at a time.
        int carry = 0;
        for (int base = 0; base < E; base += 32) {
            const int e = base + lane;
            const int v = e < E ? cnt[e] : 0;
            int inc = v;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int u = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += u;
            }
            if (e < E) {
                cur[e] = carry + inc - v;
                p.offsets[e] = carry + inc - v;
                p.counts[e] = v;
            }
            carry += __shfl_sync(0xffffffffu, inc, 31);
        }
        if (lane == 0) p.offsets[E] = carry;
        __syncwarp();
        // Stable placement: pairs in index order, 32 at a time; lanes with the same expert get
        // consecutive slots in lane order. Ids are loaded 8 batches ahead.
        const unsigned lt = (1u << lane) - 1u;
        for (int base = 0; base < p.pairs; base += 32 * 8) {
            int ev[8];
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                const int i = base + 32 * b + lane;
                ev[b] = i < p.pairs ? p.ids[i] : -1;
            }
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                const int i = base + 32 * b + lane;
                const unsigned active = __ballot_sync(0xffffffffu, i < p.pairs);
                if (i < p.pairs) {
                    const int e = ev[b];
                    const unsigned peers = __match_any_sync(active, e);
                    const int rank = __popc(peers & lt);
                    const int slot = cur[e] + rank;
                    __syncwarp(active);
                    if (rank == 0) cur[e] += __popc(peers);
                    p.perm[slot] = i;
                    p.pos[i] = slot;
                }
                __syncwarp();
            }
        }
    }
}

// Expert-traffic statistics (bench, profile): tally[0] += number of experts with at least one
// row this forward layer, tally[1] += 1. One block; counts[E] as written by moe_permute_i32.
struct MoeTallyParams {
    const int* counts;    // [E]
    unsigned int* tally;  // [2]
    int n_experts;
    int pad;
};

extern "C" __global__ void __launch_bounds__(256) moe_tally_touched(const MoeTallyParams p) {
    __shared__ unsigned int sum;
    pdl_wait();
    pdl_trigger();
    if (threadIdx.x == 0) sum = 0;
    __syncthreads();
    unsigned int mine = 0;
    for (int e = threadIdx.x; e < p.n_experts; e += blockDim.x) mine += p.counts[e] > 0 ? 1u : 0u;
    atomicAdd(&sum, mine);
    __syncthreads();
    if (threadIdx.x == 0) {
        p.tally[0] += sum;
        p.tally[1] += 1;
    }
}
