// Candidates and confidences of eligible slots, one pass over each logits row (DESIGN.md §4).
// Mirrors src/decode/sampling.rs bit for bit where it can: argmax ties go to the lowest id;
// sampling is Gumbel-max with Philox4x32-10 and 53-bit uniforms in double precision; top-k /
// top-p keep every logit >= a cut-off value (ties at the cut-off survive).
//
// confidence_cutoff_f32: one block per slot; for sampled slots with top-k / top-p it finds the
//   cut-off logit by radix select (8-bit digits over an order-preserving key) and writes it to
//   cut[slot] (-inf when the slot has no filter).
// confidence_f32: grid (splits, n_slots); each block streams one chunk of its slot's row with
//   16-byte loads (online max and Σexp, Σe·(l−m), argmax, second max, Gumbel argmax) and writes
//   a partial record; the last block of a slot to finish (atomic counter) merges the partials
//   and writes the slot's token and confidence, then resets the counter to 0.
// Both kernels read logit column `exclude_token` (the mask token; -1 = none) as CONF_MASK_LOGIT,
// substituted at load time: the same values, hence the same bits, as writing -1e30 into the
// column first (set_column_f32, src/decode/cpu.rs MASK_LOGIT) and running without exclusion.
// Slots with dist = 1 (Dream's confidences, sampling::ConfDist::Filtered) read every logit as
// l / T (f32 division, T > 0), filter at any temperature, and read logits below the cut-off as
// CONF_MASK_LOGIT too, so argmax, sample and confidence come from the filtered distribution.
#include "common.cuh"

#include <math_constants.h>

// Mirrors SlotParams in src/ops/confidence.rs (48 bytes).
struct ConfSlot {
    int logit_row;      // row of the logits buffer that predicts this slot
    int kind;           // 0 prob, 1 margin, 2 neg_entropy, 3 random
    float temperature;  // <= 0: argmax
    int top_k;          // 0 = off
    float top_p;        // >= 1 = off
    unsigned seed_lo;   // RNG key word 0
    unsigned seed_hi;   // RNG key word 1
    unsigned seq;       // counter word 3
    unsigned step;      // counter word 2
    unsigned slot;      // counter word 1 (canvas position)
    unsigned dist;      // 0 raw softmax; 1 Dream's: logits / T, filtered, renormalised
    unsigned pad;
};

// Mirrors ConfidenceParams in src/ops/confidence.rs.
struct ConfidenceParams {
    uint64_t logits;    // const float* [logit_rows, vocab]
    uint64_t slots;     // const ConfSlot* [n_slots]
    uint64_t cut;       // float* [n_slots]: filter cut-off (written by confidence_cutoff_f32)
    uint64_t partials;  // Partial* [n_slots * splits]
    uint64_t counters;  // unsigned* [n_slots], zero between launches
    uint64_t tokens;    // unsigned* [n_slots] out
    uint64_t conf;      // float* [n_slots] out
    int n_slots;
    int vocab;
    int logit_rows;
    int splits;         // blocks per slot (1..=32)
    int exclude_token;  // logit column read as CONF_MASK_LOGIT (-1 = none)
    int pad;            // unused (keeps the size a multiple of 8 explicitly)
};
static_assert(sizeof(ConfidenceParams) == 80, "ConfidenceParams must match src/ops/confidence.rs");

// What an excluded logit column reads as (src/decode/cpu.rs MASK_LOGIT).
#define CONF_MASK_LOGIT -1e30f

// What slot `s` reads for column `v`: excluded column → CONF_MASK_LOGIT; Dream slots scale by
// 1/T (T > 0) and read values below `cut` as CONF_MASK_LOGIT (cut = -inf: nothing filtered).
struct ValCtx {
    int ex;
    float t;    // > 0: divide by it
    float cut;  // values below are filtered out
    __device__ __forceinline__ float operator()(float l, int v) const {
        if (v == ex) return CONF_MASK_LOGIT;
        if (t > 0.f) l = __fdiv_rn(l, t);
        return l < cut ? CONF_MASK_LOGIT : l;
    }
    __device__ __forceinline__ float4 four(float4 x, int v) const {
        return make_float4((*this)(x.x, v), (*this)(x.y, v + 1), (*this)(x.z, v + 2), (*this)(x.w, v + 3));
    }
};

struct Partial {
    double z;      // Σ exp(l − m)
    double zl;     // Σ exp(l − m)·(l − m)
    double best;   // best Gumbel score (−inf when none)
    float m;       // max logit
    float second;  // second-largest logit (the max again if it occurs twice)
    unsigned arg;  // lowest id of the max (0xFFFFFFFF when the chunk is empty)
    unsigned tok;  // id of the best Gumbel score
};

#define CONF_THREADS 256
#define CUT_THREADS 1024
#define UNROLL 8  // 16-byte loads in flight per thread

// ---------------------------------------------------------------- Philox, uniforms, Gumbel

__device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
#pragma unroll
    for (int i = 0; i < 10; ++i) {
        const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

__device__ __forceinline__ double uniform53(unsigned hi, unsigned lo) {
    const unsigned long long k = ((unsigned long long)hi << 21) | (unsigned long long)(lo >> 11);
    if (k == 0ull) return 1.0 / 18014398509481984.0;  // 2^-54
    return (double)k * (1.0 / 9007199254740992.0);     // 2^-53
}

// Gumbel noise of vocabulary entries, caching the Philox block of the last pair.
struct Gumbel {
    uint2 key;
    unsigned slot, step, seq;
    unsigned pair;
    uint4 r;
    __device__ void init(const ConfSlot& s) {
        key = make_uint2(s.seed_lo, s.seed_hi);
        slot = s.slot;
        step = s.step;
        seq = s.seq;
        pair = 0xFFFFFFFFu;  // never a vocab pair (vocab < 2^31)
    }
    __device__ __forceinline__ double operator()(unsigned v) {
        if ((v >> 1) != pair) {
            pair = v >> 1;
            r = philox4x32(make_uint4(pair, slot, step, seq), key);
        }
        const double u = (v & 1u) ? uniform53(r.z, r.w) : uniform53(r.x, r.y);
        return -log(-log(u));
    }
};

// Largest Gumbel value: u <= 1 − 2^-53 gives −ln(−ln u) ≈ 36.74; a score whose logit part plus
// this bound is below the best so far cannot win.
#define GUMBEL_MAX 38.0

// ---------------------------------------------------------------- per-thread state

struct Acc {
    float m, second;
    unsigned arg;
    double z, zl;
    double best;
    unsigned tok;
    __device__ void init() {
        m = -CUDART_INF_F;
        second = -CUDART_INF_F;
        arg = 0xFFFFFFFFu;
        z = 0.0;
        zl = 0.0;
        best = -CUDART_INF;
        tok = 0xFFFFFFFFu;
    }
    // Max / argmax / second, elements seen in ascending id order (row_stats' rule).
    __device__ __forceinline__ void see(unsigned v, float l) {
        if (l > m) {
            second = m;
            m = l;
            arg = v;
        } else if (l > second) {
            second = l;
        }
    }
    // Rescales z, zl from max `old` to the current max m.
    __device__ __forceinline__ void rescale(float old) {
        if (z > 0.0) {
            const double dm = (double)old - (double)m;
            const double sc = exp(dm);
            zl = (zl + z * dm) * sc;
            z *= sc;
        }
    }
};

struct SampleCtx {
    bool on;
    double inv_t;
    float cut;
    Gumbel g;
};

__device__ __forceinline__ void sample_one(Acc& a, SampleCtx& s, unsigned v, float l) {
    if (!(l >= s.cut)) return;
    // __dmul_rn: never contracted with the add below into one DFMA (ptxas did that in some
    // inlined copies), so score = round(round(l / T) + g) everywhere, as sampling::candidate.
    const double base = __dmul_rn((double)l, s.inv_t);
    if (base + GUMBEL_MAX < a.best) return;
    const double score = base + s.g(v);
    if (score > a.best) {
        a.best = score;
        a.tok = v;
    }
}

__device__ __forceinline__ void consume1(Acc& a, SampleCtx& s, unsigned v, float l) {
    const float old = a.m;
    a.see(v, l);
    if (a.m > old) a.rescale(old);
    const float d = l - a.m;
    const float e = expf(d);
    a.z += (double)e;
    a.zl += (double)(e * d);
    if (s.on) sample_one(a, s, v, l);
}

__device__ __forceinline__ void consume4(Acc& a, SampleCtx& s, unsigned v, float4 x) {
    const float old = a.m;
    a.see(v, x.x);
    a.see(v + 1, x.y);
    a.see(v + 2, x.z);
    a.see(v + 3, x.w);
    if (a.m > old) a.rescale(old);
    const float d0 = x.x - a.m, d1 = x.y - a.m, d2 = x.z - a.m, d3 = x.w - a.m;
    const float e0 = expf(d0), e1 = expf(d1), e2 = expf(d2), e3 = expf(d3);
    a.z += (double)((e0 + e1) + (e2 + e3));
    a.zl += (double)((e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3));
    if (s.on) {
        sample_one(a, s, v, x.x);
        sample_one(a, s, v + 1, x.y);
        sample_one(a, s, v + 2, x.z);
        sample_one(a, s, v + 3, x.w);
    }
}

// Combines the states of a warp's lanes; lane 0 ends with the result (other lanes' z / zl may
// differ in rounding and are not used). No chained transcendental work: one max, one rescale per
// lane, then plain reductions, so the cost per block is small and fixed.
__device__ __forceinline__ void warp_combine(Acc& a) {
    float M = a.m;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    if (a.z > 0.0 && a.m != M) {
        const double dm = (double)a.m - (double)M, sc = exp(dm);
        a.zl = (a.zl + a.z * dm) * sc;
        a.z *= sc;
    }
    unsigned A = a.m == M ? a.arg : 0xFFFFFFFFu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a.z += __shfl_down_sync(0xffffffffu, a.z, o);
        a.zl += __shfl_down_sync(0xffffffffu, a.zl, o);
        A = min(A, __shfl_xor_sync(0xffffffffu, A, o));
    }
    // Second: the max again if another lane also holds it, else the largest other value.
    float S = (a.m == M && a.arg == A) ? a.second : a.m;
    double B = a.best;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        S = fmaxf(S, __shfl_xor_sync(0xffffffffu, S, o));
        B = fmax(B, __shfl_xor_sync(0xffffffffu, B, o));
    }
    unsigned T = a.best == B ? a.tok : 0xFFFFFFFFu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) T = min(T, __shfl_xor_sync(0xffffffffu, T, o));
    a.m = M;
    a.arg = A;
    a.second = S;
    a.best = B;
    a.tok = T;
}

__device__ __forceinline__ Partial to_partial(const Acc& a) {
    Partial p;
    p.z = a.z;
    p.zl = a.zl;
    p.best = a.best;
    p.m = a.m;
    p.second = a.second;
    p.arg = a.arg;
    p.tok = a.tok;
    return p;
}

// Reads a record through volatile loads (the partials of other blocks are not cached in L1).
__device__ __forceinline__ Acc from_partial(const volatile Partial* p) {
    Acc a;
    a.z = p->z;
    a.zl = p->zl;
    a.best = p->best;
    a.m = p->m;
    a.second = p->second;
    a.arg = p->arg;
    a.tok = p->tok;
    return a;
}

// One warp merges records parts[0..n) (n <= 32), lane i taking record i and the other lanes an
// empty state; lane 0 ends with the result. Used for the warps of a block (shared memory) and
// for the splits of a slot (global memory, written by other blocks).
__device__ __forceinline__ Acc merge_partials(const volatile Partial* parts, int n) {
    const int lane = threadIdx.x & 31;
    Acc a;
    if (lane < n) a = from_partial(parts + lane);
    else a.init();
    warp_combine(a);
    return a;
}

// ---------------------------------------------------------------- confidence_f32

extern "C" __global__ void __launch_bounds__(CONF_THREADS) confidence_f32(const ConfidenceParams p) {
    __shared__ Partial warp_part[CONF_THREADS / 32];
    __shared__ int is_last;
    const int slot_i = blockIdx.y;
    const int split = blockIdx.x;
    const ConfSlot s = reinterpret_cast<const ConfSlot*>(p.slots)[slot_i];
    const int vocab = p.vocab;
    const float* row = reinterpret_cast<const float*>(p.logits) + (size_t)s.logit_row * (size_t)vocab;

    const bool dream = s.dist == 1u;
    const bool k_on = s.top_k > 0 && s.top_k < vocab;
    const bool p_on = s.top_p < 1.f;
    SampleCtx sc;
    sc.on = s.temperature > 0.f;
    // Dream slots are already scaled by 1/T when read: the Gumbel score is value + g.
    sc.inv_t = sc.on ? (dream ? 1.0 : 1.0 / (double)s.temperature) : 0.0;
    sc.cut = -CUDART_INF_F;
    const float cut = (sc.on || dream) && (k_on || p_on) ? reinterpret_cast<const float*>(p.cut)[slot_i] : -CUDART_INF_F;
    if (sc.on) {
        if (!dream) sc.cut = cut;
        sc.g.init(s);
    }
    ValCtx val;
    val.ex = p.exclude_token;
    val.t = dream && sc.on ? s.temperature : 0.f;
    val.cut = dream ? cut : -CUDART_INF_F;

    // Row layout: [0, head) scalar, then nvec 16-byte vectors, then the scalar tail.
    const int mis = (int)(((size_t)s.logit_row * (size_t)vocab) & 3);
    const int head = min((4 - mis) & 3, vocab);
    const int nvec = (vocab - head) >> 2;
    const int tail0 = head + 4 * nvec;
    const int per = (nvec + p.splits - 1) / p.splits;
    const int v_lo = min(split * per, nvec), v_hi = min(v_lo + per, nvec);

    Acc a;
    a.init();
    const int tid = threadIdx.x;
    if (split == 0 && tid < head) consume1(a, sc, tid, val(__ldg(row + tid), tid));
    const float4* vrow = reinterpret_cast<const float4*>(row + head);
    int i = v_lo + tid;
    for (; i + (UNROLL - 1) * CONF_THREADS < v_hi; i += UNROLL * CONF_THREADS) {
        float4 x[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) x[u] = __ldcs(vrow + i + u * CONF_THREADS);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int v = head + 4 * (i + u * CONF_THREADS);
            consume4(a, sc, v, val.four(x[u], v));
        }
    }
    for (; i < v_hi; i += CONF_THREADS) {
        const int v = head + 4 * i;
        consume4(a, sc, v, val.four(__ldcs(vrow + i), v));
    }
    if (split == p.splits - 1 && tail0 + tid < vocab)
        consume1(a, sc, tail0 + tid, val(__ldg(row + tail0 + tid), tail0 + tid));

    // Block merge: warps, then warp 0 over the warp results.
    warp_combine(a);
    const int lane = tid & 31, warp = tid >> 5;
    if (lane == 0) warp_part[warp] = to_partial(a);
    __syncthreads();
    Partial* parts = reinterpret_cast<Partial*>(p.partials) + (size_t)slot_i * p.splits;
    if (warp == 0) {
        const Acc b = merge_partials(warp_part, CONF_THREADS / 32);
        if (lane == 0) {
            parts[split] = to_partial(b);
            __threadfence();
            unsigned* counter = reinterpret_cast<unsigned*>(p.counters) + slot_i;
            const unsigned done = atomicAdd(counter, 1u);
            is_last = done == (unsigned)(p.splits - 1);
        }
    }
    __syncthreads();
    if (!is_last || warp != 0) return;

    // Last block of this slot: merge the partials (splits <= 32) in split order.
    __threadfence();
    const Acc f = merge_partials(parts, p.splits);
    if (lane != 0) return;
    reinterpret_cast<unsigned*>(p.counters)[slot_i] = 0u;

    const unsigned argmax = f.arg == 0xFFFFFFFFu ? 0u : f.arg;
    unsigned tok = argmax;
    if (sc.on && f.tok != 0xFFFFFFFFu) tok = f.tok;
    const double z = f.z;
    float conf;
    switch (s.kind) {
        case 0: {  // prob: exp(l_tok − max) / Σ
            const float d = val(row[tok], (int)tok) - f.m;
            conf = (float)(exp((double)d) / z);
            break;
        }
        case 1: {  // margin: p1 − p2, each rounded to f32 first (as the CPU)
            const float p1 = (float)(1.0 / z);
            const float p2 = (float)(exp((double)(f.second - f.m)) / z);
            conf = p1 - p2;
            break;
        }
        case 2:  // neg_entropy: zl / z − ln z
            conf = (float)(f.zl / z - log(z));
            break;
        default: {  // random: uniform53 of counter [0xFFFFFFFF, slot, step, seq]
            const uint4 r = philox4x32(make_uint4(0xFFFFFFFFu, s.slot, s.step, s.seq), make_uint2(s.seed_lo, s.seed_hi));
            conf = (float)uniform53(r.x, r.y);
            break;
        }
    }
    reinterpret_cast<unsigned*>(p.tokens)[slot_i] = tok;
    reinterpret_cast<float*>(p.conf)[slot_i] = conf;
}

// ---------------------------------------------------------------- confidence_cutoff_f32

// Order-preserving key of a float (−0 maps to +0's key).
__device__ __forceinline__ unsigned fkey(float l) {
    unsigned b = __float_as_uint(l);
    if (l == 0.f) b = 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

__device__ float block_max_f(float v, float* red) {
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? red[lane] : -CUDART_INF_F;
        v = warp_max(v);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

__device__ double block_sum_d(double v, double* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

// Radix select of the cut-off key: the largest key c with count(key >= c) >= k (by_mass = false)
// or Σ_{key >= c} exp(l − max) >= target (by_mass = true), column `ex` read as CONF_MASK_LOGIT.
// Returns false when no key qualifies.
__device__ bool radix_cut(unsigned* out, const float* row, int vocab, const ValCtx& val, bool by_mass, unsigned k, double target, float mx,
                              unsigned* hc, double* hm, unsigned* sel, double* selm) {
    unsigned prefix = 0u, hi_mask = 0u;
    unsigned need = k;      // count still needed within the current prefix
    double mass_above = 0.0;  // mass of keys above the current prefix
    const int lane = threadIdx.x & 31;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) {
            hc[b] = 0u;
            hm[b] = 0.0;
        }
        __syncthreads();
        const int span = (vocab + 31) / 32 * 32;
        for (int i = threadIdx.x; i < span; i += blockDim.x) {
            unsigned digit = 0xFFFFFFFFu;
            double w = 0.0;
            if (i < vocab) {
                const float l = val(row[i], i);
                const unsigned key = fkey(l);
                if ((key & hi_mask) == prefix) {
                    digit = (key >> shift) & 255u;
                    if (by_mass) w = exp((double)(l - mx));
                }
            }
            // Warp-aggregated histogram update: one atomic per distinct digit per warp.
            const unsigned group = __match_any_sync(0xffffffffu, digit);
            if (digit != 0xFFFFFFFFu) {
                const int leader = __ffs(group) - 1;
                double sum = 0.0;
                if (by_mass) {
                    // Sum the group's weights in lane order (every member follows the same order).
                    unsigned rest = group;
                    while (rest) {
                        const int src = __ffs(rest) - 1;
                        rest &= rest - 1;
                        sum += __shfl_sync(group, w, src);
                    }
                }
                if (lane == leader) {
                    atomicAdd(&hc[digit], (unsigned)__popc(group));
                    if (by_mass) atomicAdd(&hm[digit], sum);
                }
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int chosen = -1;
            if (by_mass) {
                double acc = mass_above;
                for (int d = 255; d >= 0; --d) {
                    if (acc + hm[d] >= target) {
                        chosen = d;
                        break;
                    }
                    acc += hm[d];
                }
                if (chosen >= 0) mass_above = acc;
            } else {
                unsigned acc = 0u;
                for (int d = 255; d >= 0; --d) {
                    if (acc + hc[d] >= need) {
                        chosen = d;
                        need -= acc;
                        break;
                    }
                    acc += hc[d];
                }
            }
            sel[0] = (unsigned)chosen;
            selm[0] = mass_above;
            sel[1] = need;
        }
        __syncthreads();
        const int chosen = (int)sel[0];
        mass_above = selm[0];
        need = sel[1];
        __syncthreads();
        if (chosen < 0) return false;
        prefix |= (unsigned)chosen << shift;
        hi_mask |= 255u << shift;
    }
    *out = prefix;
    return true;
}

extern "C" __global__ void __launch_bounds__(CUT_THREADS) confidence_cutoff_f32(const ConfidenceParams p) {
    __shared__ unsigned hc[256];
    __shared__ double hm[256];
    __shared__ float redf[32];
    __shared__ double redd[32];
    __shared__ unsigned sel[2];
    __shared__ double selm[1];
    const int slot_i = blockIdx.x;
    const ConfSlot s = reinterpret_cast<const ConfSlot*>(p.slots)[slot_i];
    const int vocab = p.vocab;
    const bool dream = s.dist == 1u;
    const bool on = s.temperature > 0.f || dream;  // Dream filters at temperature 0 too
    const bool k_on = on && s.top_k > 0 && s.top_k < vocab;
    const bool p_on = on && s.top_p < 1.f;
    float* cut_out = reinterpret_cast<float*>(p.cut) + slot_i;
    if (!k_on && !p_on) {
        if (threadIdx.x == 0) *cut_out = -CUDART_INF_F;
        return;
    }
    const float* row = reinterpret_cast<const float*>(p.logits) + (size_t)s.logit_row * (size_t)vocab;
    float mx = -CUDART_INF_F;
    ValCtx val;  // the values the filters see: Dream slots' are scaled by 1/T, none is cut yet
    val.ex = p.exclude_token;
    val.t = dream && s.temperature > 0.f ? s.temperature : 0.f;
    val.cut = -CUDART_INF_F;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, val(row[i], i));
    mx = block_max_f(mx, redf);
    const unsigned max_key = fkey(mx);

    float cut = -CUDART_INF_F;
    if (k_on) {
        unsigned c;
        if (radix_cut(&c, row, vocab, val, false, (unsigned)s.top_k, 0.0, mx, hc, hm, sel, selm))
            cut = key_to_float(min(c, max_key));
    }
    if (p_on) {
        double z = 0.0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += exp((double)(val(row[i], i) - mx));
        z = block_sum_d(z, redd);
        const double target = (double)s.top_p * z;
        unsigned c;
        if (radix_cut(&c, row, vocab, val, true, 0u, target, mx, hc, hm, sel, selm))
            cut = fmaxf(cut, key_to_float(min(c, max_key)));
    }
    if (threadIdx.x == 0) *cut_out = cut;
}

// Sets logits[r, col] = value for r < rows: the mask token is never a candidate (its logit
// becomes −1e30 before confidences are computed, as src/decode/cpu.rs does on the host).
extern "C" __global__ void set_column_f32(float* logits, int rows, int vocab, int col, float value) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) logits[(size_t)r * vocab + col] = value;
}
