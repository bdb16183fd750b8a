// Rotate-half RoPE (head_dim 128) of q and k plus the kv_store (rope_kv_store_bf16; with the
// per-head q/k RMSNorm and partial RoPE of LLaDA-MoE / LLaDA2: rope_qknorm_kv_store_bf16, below):
//   q heads are rotated in place in qkv; rotated k goes to k_cache[cache_rows[r]];
//   v is copied unchanged to v_cache[cache_rows[r]].
// qkv row = [q: n_heads*128 | k: n_kv_heads*128 | v: n_kv_heads*128].
// inv_freq[i] = 1 / theta^(2i/128) as the correctly rounded f32 (computed through f64 so the
// CPU reference gets the same bits), angle = f32(pos) * inv_freq[i] in f32, precise sincosf.
// mode 0 (LLaDA): f32 rotation, one rounding to bf16 (the exact f32 steps: rotate_llada).
// mode 1 (Dream / HF Qwen2 in bf16): c = bf16(cos), s = bf16(sin),
//   y[i] = bf16( bf16(x[i]*c) + bf16(-x[i+64]*s) ), y[i+64] = bf16( bf16(x[i+64]*c) + bf16(x[i]*s) ).
//
// Work items of a row: (n_heads + n_kv_heads) * 8 rotation items (8 pairs (i, i+64) of one
// head: two 16-byte loads and stores), then n_kv_heads * 16 v items (one 16-byte copy).
// Grid (rows, chunks): block (r, c) takes items [c*B*ROPE_IPT, (c+1)*B*ROPE_IPT) of row r
// (B = blockDim.x, 64 or 128), thread t items t + k*B, k < ROPE_IPT.
//
// Performance (what changed, and why it should be faster; outputs are bit for bit the same):
// - Every access is one 16-byte LDG.128 / STG.128. common.cuh's load8 / store8 copy a struct of
//   four bf16x2 and compile to four 4-byte accesses (checked in the SASS): the old kernel moved
//   q and k that way, 4x the instructions and L2 transactions for 2/3 of its bytes.
// - One memory round trip per block instead of three: the old block loaded positions[r], then
//   computed the cos/sin table (f64 pow + sincosf: ~1 us of dependent math), synchronised, and
//   only then loaded its data, in two dependent load -> rotate -> store rounds per thread (512
//   threads, 1024 items at LLaDA). Now every data load of the block is issued first, the table
//   is computed while they are in flight, and each thread rotates and stores ROPE_IPT items.
// - Launched with programmatic dependent launch (PDL): a block starts while the QKV GEMM
//   finishes, computes its inv_freq entry (the f64 pow) and only then waits (pdl_wait) to read
//   positions, cache rows and qkv.
// - Smaller blocks, more of them: 128 threads and 512 items per block (LLaDA: 2 blocks per row,
//   1024 blocks at 512 rows, 6 resident per SM at 78 registers, each with 16 KB of loads in
//   flight; capping registers at 64 for 8 per SM spills); at few rows the wrapper halves the
//   block to 64 threads (LLaDA 32 rows: 128 blocks instead of 32) so that more SMs share the
//   row's bytes, which is what bounds a latency-bound decode step.
#include "common.cuh"

#define ROPE_HEAD_DIM 128
#define ROPE_HALF 64
#define ROPE_IPT 4            // work items per thread (IPT in the wrapper)
#define ROPE_MAX_THREADS 128  // largest block (the wrapper launches 64 or 128)

struct RopeParams {
    bf16* qkv;                   // [rows, (n_heads + 2*n_kv_heads)*128]
    bf16* k_cache;               // [cache_cap, n_kv_heads*128], this layer
    bf16* v_cache;               // [cache_cap, n_kv_heads*128], this layer
    const uint32_t* positions;   // [rows]
    const uint32_t* cache_rows;  // [rows], destination cache row of each live row
    int rows;
    int n_heads;
    int n_kv_heads;
    float theta;
    int mode;
    int cache_cap;  // rows of k_cache / v_cache; a cache row >= cache_cap traps
    // rope_scale_kv_store_bf16 only: qkv holds the unscaled product of a W8A8 `split-scale`
    // GEMM, finished here as w8a8_scale_bf16 would have (common.cuh's w8a8_scale8, rounded to
    // bf16) before the rotation and the store.
    const float* sx;   // [rows] row scales
    const float* sw;   // [qkv_dim] channel scales
    const bf16* bias;  // [qkv_dim] or nullptr
};

// The LLaDA rotation of 8 pairs with the f32 steps of the previous kernel, pinned with
// intrinsics (never re-contracted): nvcc 13.0 had compiled `a*c - b*s` and `b*c + a*s` to
//   y1[i] = fma(a, c, -(b*s)), y2[i] = fma(b, c, a*s)   for i = 1..7,
//   y1[0] = fma(-b, s, a*c)    (a*c shared with the Dream branch's first product),
// (read from its sm_90a SASS). Any other choice moves some outputs by one bf16 ulp.
__device__ __forceinline__ void rotate_llada(const float* a, const float* b, const float* c, const float* s,
                                             float* y1, float* y2) {
    y1[0] = __fmaf_rn(-b[0], s[0], __fmul_rn(a[0], c[0]));
    y2[0] = __fmaf_rn(b[0], c[0], __fmul_rn(a[0], s[0]));
#pragma unroll
    for (int i = 1; i < 8; ++i) {
        y1[i] = __fmaf_rn(a[i], c[i], -__fmul_rn(b[i], s[i]));
        y2[i] = __fmaf_rn(b[i], c[i], __fmul_rn(a[i], s[i]));
    }
}

__device__ __forceinline__ void rotate_dream(const float* a, const float* b, const float* c, const float* s,
                                             float* y1, float* y2) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        y1[i] = round_bf16(__fmul_rn(a[i], c[i])) + round_bf16(__fmul_rn(-b[i], s[i]));
        y2[i] = round_bf16(__fmul_rn(b[i], c[i])) + round_bf16(__fmul_rn(a[i], s[i]));
    }
}

// 8 bf16 packed in a uint4 (registers) <-> 8 floats.
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
    load8(reinterpret_cast<const bf16*>(&v), f);
}
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 v;
    store8(reinterpret_cast<bf16*>(&v), f);
    return v;
}

// 8 values at column col of the row (row scale sx) through the split-scale epilogue, rounded
// to bf16 as w8a8_scale_bf16 stores them, back in the uint4.
__device__ __forceinline__ void scale_in_place(uint4& v, const RopeParams& p, float sx, int col) {
    float d[8];
    unpack8(v, d);
    w8a8_scale8(sx, p.sw + col, p.bias ? p.bias + col : nullptr, d);
    v = pack8(d);
}

template <bool SCALED>
__device__ __forceinline__ void rope_body(const RopeParams& p) {
    __shared__ float cs[ROPE_HALF], sn[ROPE_HALF];
    const int row = blockIdx.x;
    const int qkv_dim = (p.n_heads + 2 * p.n_kv_heads) * ROPE_HEAD_DIM;
    const int kv_dim = p.n_kv_heads * ROPE_HEAD_DIM;
    const int n_rot = (p.n_heads + p.n_kv_heads) * 8;  // 8 items of 8 pairs per rotated head
    const int n_items = n_rot + p.n_kv_heads * (ROPE_HEAD_DIM / 8);
    const int w_first = blockIdx.y * blockDim.x * ROPE_IPT;
    bf16* src_row = p.qkv + (int64_t)row * qkv_dim;
    const uint4* v_src = reinterpret_cast<const uint4*>(src_row + (p.n_heads + p.n_kv_heads) * ROPE_HEAD_DIM);
    // Blocks with rotation items need the cos/sin table (uniform over the block).
    const bool has_rot = w_first < n_rot;

    // 0. inv_freq needs only theta: its f64 pow runs before waiting for the previous kernel
    //    (PDL), one entry per thread (blockDim.x >= ROPE_HALF, the wrapper launches 64 or 128).
    float inv = 0.f;
    if (has_rot && threadIdx.x < ROPE_HALF)
        inv = (float)(1.0 / pow((double)p.theta, (double)(2 * threadIdx.x) / ROPE_HEAD_DIM));
    pdl_wait();
    pdl_trigger();

    // 1. Every load of the block, in flight together: position, cache row, data.
    const uint32_t pos = p.positions[row];
    const uint32_t crow = p.cache_rows[row];
    const float sx = SCALED ? p.sx[row] : 0.f;
    uint4 ra[ROPE_IPT], rb[ROPE_IPT];
#pragma unroll
    for (int k = 0; k < ROPE_IPT; ++k) {
        const int w = w_first + threadIdx.x + k * blockDim.x;
        if (w < n_rot) {
            const bf16* head = src_row + (w >> 3) * ROPE_HEAD_DIM + (w & 7) * 8;
            const uint4* src = reinterpret_cast<const uint4*>(head);
            ra[k] = src[0];
            rb[k] = src[ROPE_HALF / 8];
        } else if (w < n_items) {
            ra[k] = v_src[w - n_rot];
        }
    }

    // 2. The cos/sin table while the loads are in flight.
    if (has_rot) {
        if (threadIdx.x < ROPE_HALF) {
            const float ang = (float)pos * inv;
            float s, c;
            sincosf(ang, &s, &c);
            if (p.mode == 1) {
                c = round_bf16(c);
                s = round_bf16(s);
            }
            cs[threadIdx.x] = c;
            sn[threadIdx.x] = s;
        }
        __syncthreads();
    }
    if (crow >= (uint32_t)p.cache_cap) __trap();  // the host validates cache rows: this is a bug

    // 3. Rotate and store (the scaled kernel first finishes the GEMM's output).
#pragma unroll
    for (int k = 0; k < ROPE_IPT; ++k) {
        const int w = w_first + threadIdx.x + k * blockDim.x;
        if (SCALED && w < n_rot) {
            const int col = (w >> 3) * ROPE_HEAD_DIM + (w & 7) * 8;
            scale_in_place(ra[k], p, sx, col);
            scale_in_place(rb[k], p, sx, col + ROPE_HALF);
        } else if (SCALED && w < n_items) {
            scale_in_place(ra[k], p, sx, (p.n_heads + p.n_kv_heads) * ROPE_HEAD_DIM + (w - n_rot) * 8);
        }
        if (w < n_rot) {
            const int h = w >> 3;
            const int i0 = (w & 7) * 8;
            bf16* dst = h < p.n_heads ? src_row + h * ROPE_HEAD_DIM
                                      : p.k_cache + (int64_t)crow * kv_dim + (h - p.n_heads) * ROPE_HEAD_DIM;
            float a[8], b[8], c[8], s[8], y1[8], y2[8];
            unpack8(ra[k], a);
            unpack8(rb[k], b);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                c[i] = cs[i0 + i];
                s[i] = sn[i0 + i];
            }
            if (p.mode == 1) rotate_dream(a, b, c, s, y1, y2);
            else rotate_llada(a, b, c, s, y1, y2);
            reinterpret_cast<uint4*>(dst + i0)[0] = pack8(y1);
            reinterpret_cast<uint4*>(dst + ROPE_HALF + i0)[0] = pack8(y2);
        } else if (w < n_items) {
            reinterpret_cast<uint4*>(p.v_cache + (int64_t)crow * kv_dim)[w - n_rot] = ra[k];
        }
    }
}

extern "C" __global__ void __launch_bounds__(ROPE_MAX_THREADS) rope_kv_store_bf16(const RopeParams p) {
    rope_body<false>(p);
}

// The same op on the unscaled product of a W8A8 `split-scale` QKV GEMM, its scale epilogue
// (w8a8_scale_bf16: a launch and a pass over qkv) fused in, the same bits: q is written back
// finished and rotated, the caches get finished k and v; k and v in qkv stay unscaled.
extern "C" __global__ void __launch_bounds__(ROPE_MAX_THREADS) rope_scale_kv_store_bf16(const RopeParams p) {
    rope_body<true>(p);
}

// ---------------------------------------------------------------------------------------------
// rope_qknorm_kv_store_bf16: the same op with the options of LLaDA-MoE / LLaDA2 (the wrapper
// launches it only when one is on, so rope_kv_store_bf16 above stays the plain path):
// - per-head RMSNorm of q (q_norm) and / or k (k_norm) before the rotation, the official bf16
//   module's rounding points: x = bf16( w * bf16( x * inv ) ), inv = 1 / sqrt(ss/128 + eps)
//   (__fsqrt_rn, __fdiv_rn: correctly rounded, so the CPU reproduces it), ss summed in a fixed
//   order: each of the head's 8 lanes takes the squares of its 16 values with an fma chain
//   (dims [8j, 8j+8) then [64+8j, 64+8j+8)), then a butterfly over the 8 lanes (xor 1, 2, 4);
// - partial RoPE: rotate-half over the first rotary_dim dims (pairs (i, i + rotary_dim/2),
//   inv_freq[i] = 1 / theta^(2i / rotary_dim)), the other dims pass through (normed).
// Rotation: mode 1 (Dream) exactly as rope_kv_store_bf16; mode 0 (LLaDA) as
//   y1 = bf16(a*c - b*s), y2 = bf16(b*c + a*s), every product and sum rounded to f32 (no fma:
//   the plain kernel's pinned fma pattern above may differ from this by one bf16 ulp).
// Work items and grid as rope_kv_store_bf16: the 8 items of one head sit in 8 consecutive lanes
// (w & 7 == lane & 7), which is what the butterfly and the partial rotation rely on. A partial
// rotation needs values of other lanes of the head: each group of 8 lanes stages its head's
// normed values in shared memory (hx), fenced by __syncwarp over the group.
#define ROPE_SLOTS (ROPE_MAX_THREADS / 8)  // heads a block holds at once (8 lanes each)

struct RopeExtParams {
    bf16* qkv;                   // [rows, (n_heads + 2*n_kv_heads)*128]
    bf16* k_cache;               // [cache_cap, n_kv_heads*128], this layer
    bf16* v_cache;               // [cache_cap, n_kv_heads*128], this layer
    const uint32_t* positions;   // [rows]
    const uint32_t* cache_rows;  // [rows], destination cache row of each live row
    const bf16* q_norm;          // [128] or null (no q norm)
    const bf16* k_norm;          // [128] or null (no k norm)
    int rows;
    int n_heads;
    int n_kv_heads;
    float theta;
    int mode;
    int cache_cap;   // rows of k_cache / v_cache; a cache row >= cache_cap traps
    float eps;       // the norms' epsilon
    int rotary_dim;  // even, 2..=128
};

// y[i] = a*c - b*s (a = x[i], b = x[i + half]) and y[i + half] = b*c + a*s, in f32 before the
// final bf16 rounding (see the numerics above).
__device__ __forceinline__ float rot_first(float a, float b, float c, float s, int mode) {
    return mode == 1 ? __fadd_rn(round_bf16(__fmul_rn(a, c)), round_bf16(__fmul_rn(-b, s)))
                     : __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}
__device__ __forceinline__ float rot_second(float b, float a, float c, float s, int mode) {
    return mode == 1 ? __fadd_rn(round_bf16(__fmul_rn(b, c)), round_bf16(__fmul_rn(a, s)))
                     : __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

extern "C" __global__ void __launch_bounds__(ROPE_MAX_THREADS) rope_qknorm_kv_store_bf16(const RopeExtParams p) {
    __shared__ float cs[ROPE_HALF], sn[ROPE_HALF];
    __shared__ float wn[2][ROPE_HEAD_DIM];           // q_norm, k_norm weights
    __shared__ float hx[ROPE_SLOTS][ROPE_HEAD_DIM];  // one head per 8 lanes (partial rotation)
    const int row = blockIdx.x;
    const int qkv_dim = (p.n_heads + 2 * p.n_kv_heads) * ROPE_HEAD_DIM;
    const int kv_dim = p.n_kv_heads * ROPE_HEAD_DIM;
    const int n_rot = (p.n_heads + p.n_kv_heads) * 8;
    const int n_items = n_rot + p.n_kv_heads * (ROPE_HEAD_DIM / 8);
    const int w_first = blockIdx.y * blockDim.x * ROPE_IPT;
    const int half = p.rotary_dim >> 1;
    bf16* src_row = p.qkv + (int64_t)row * qkv_dim;
    const uint4* v_src = reinterpret_cast<const uint4*>(src_row + (p.n_heads + p.n_kv_heads) * ROPE_HEAD_DIM);
    const bool has_rot = w_first < n_rot;

    // 0. inv_freq before waiting for the previous kernel (PDL).
    float inv = 0.f;
    if (has_rot && threadIdx.x < half)
        inv = (float)(1.0 / pow((double)p.theta, (double)(2 * threadIdx.x) / p.rotary_dim));
    pdl_wait();
    pdl_trigger();

    // 1. Every load of the block in flight together: position, cache row, data, norm weights
    //    (threads [0, 16) the q weight, [16, 32) the k weight, 8 values each).
    const uint32_t pos = p.positions[row];
    const uint32_t crow = p.cache_rows[row];
    uint4 ra[ROPE_IPT], rb[ROPE_IPT];
#pragma unroll
    for (int k = 0; k < ROPE_IPT; ++k) {
        const int w = w_first + threadIdx.x + k * blockDim.x;
        if (w < n_rot) {
            const uint4* src = reinterpret_cast<const uint4*>(src_row + (w >> 3) * ROPE_HEAD_DIM + (w & 7) * 8);
            ra[k] = src[0];
            rb[k] = src[ROPE_HALF / 8];
        } else if (w < n_items) {
            ra[k] = v_src[w - n_rot];
        }
    }
    const bf16* wsrc = threadIdx.x < 16 ? p.q_norm : p.k_norm;
    if (has_rot && threadIdx.x < 32 && wsrc) {
        float f[8];
        load8(wsrc + (threadIdx.x & 15) * 8, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) wn[threadIdx.x >> 4][(threadIdx.x & 15) * 8 + i] = f[i];
    }

    // 2. The cos/sin table while the loads are in flight.
    if (has_rot) {
        if (threadIdx.x < half) {
            float s, c;
            sincosf((float)pos * inv, &s, &c);
            if (p.mode == 1) {
                c = round_bf16(c);
                s = round_bf16(s);
            }
            cs[threadIdx.x] = c;
            sn[threadIdx.x] = s;
        }
        __syncthreads();
    }
    if (crow >= (uint32_t)p.cache_cap) __trap();  // the host validates cache rows: this is a bug

    // 3. Norm, rotate, store.
    const int lane = threadIdx.x & 31;
    const unsigned group = 0xffu << (lane & 24);  // this lane's 8-lane head group
#pragma unroll
    for (int k = 0; k < ROPE_IPT; ++k) {
        const int w = w_first + threadIdx.x + k * blockDim.x;
        const int h = w >> 3;
        const int i0 = (w & 7) * 8;
        const bool is_q = h < p.n_heads;
        const bool norm = w < n_rot && (is_q ? p.q_norm : p.k_norm) != nullptr;
        float a[8], b[8];
        float ss = 0.f;
        if (w < n_rot) {
            unpack8(ra[k], a);
            unpack8(rb[k], b);
            if (norm) {
#pragma unroll
                for (int i = 0; i < 8; ++i) ss = fmaf(a[i], a[i], ss);
#pragma unroll
                for (int i = 0; i < 8; ++i) ss = fmaf(b[i], b[i], ss);
            }
        }
        // Every lane of the warp takes part (lanes without a normed head add zeros that no
        // normed head reads: a head's 8 lanes are all normed or none is).
        ss = __fadd_rn(ss, __shfl_xor_sync(0xffffffffu, ss, 1));
        ss = __fadd_rn(ss, __shfl_xor_sync(0xffffffffu, ss, 2));
        ss = __fadd_rn(ss, __shfl_xor_sync(0xffffffffu, ss, 4));
        if (w < n_rot) {
            if (norm) {
                const float r = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fmul_rn(ss, 1.f / ROPE_HEAD_DIM), p.eps)));
                const float* wv = wn[is_q ? 0 : 1];
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    a[i] = round_bf16(__fmul_rn(wv[i0 + i], round_bf16(__fmul_rn(a[i], r))));
                    b[i] = round_bf16(__fmul_rn(wv[ROPE_HALF + i0 + i], round_bf16(__fmul_rn(b[i], r))));
                }
            }
            bf16* dst = is_q ? src_row + h * ROPE_HEAD_DIM
                             : p.k_cache + (int64_t)crow * kv_dim + (h - p.n_heads) * ROPE_HEAD_DIM;
            float y1[8], y2[8];
            if (p.rotary_dim == ROPE_HEAD_DIM) {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    y1[i] = rot_first(a[i], b[i], cs[i0 + i], sn[i0 + i], p.mode);
                    y2[i] = rot_second(b[i], a[i], cs[i0 + i], sn[i0 + i], p.mode);
                }
            } else {
                float* hv = hx[threadIdx.x >> 3];
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    hv[i0 + i] = a[i];
                    hv[ROPE_HALF + i0 + i] = b[i];
                }
                __syncwarp(group);
#pragma unroll
                for (int e = 0; e < 16; ++e) {
                    const int d = (e < 8 ? 0 : ROPE_HALF) + i0 + (e & 7);
                    const float x = e < 8 ? a[e] : b[e - 8];
                    float y = x;
                    if (d < half) y = rot_first(x, hv[d + half], cs[d], sn[d], p.mode);
                    else if (d < p.rotary_dim) y = rot_second(x, hv[d - half], cs[d - half], sn[d - half], p.mode);
                    if (e < 8) y1[e] = y;
                    else y2[e - 8] = y;
                }
                __syncwarp(group);  // the next item overwrites hv
            }
            reinterpret_cast<uint4*>(dst + i0)[0] = pack8(y1);
            reinterpret_cast<uint4*>(dst + ROPE_HALF + i0)[0] = pack8(y2);
        } else if (w < n_items) {
            reinterpret_cast<uint4*>(p.v_cache + (int64_t)crow * kv_dim)[w - n_rot] = ra[k];
        }
    }
}
