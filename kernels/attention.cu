// Varlen attention over the KV cache, head_dim 128, GQA: bidirectional (no mask), or
// block-causal (LLaDA2).
//
// Queries are the packed live rows of several sequences; a query of sequence s attends to the
// cache rows [cache_base, cache_base + kv_len) of s. Query head h reads kv head
// h / (n_heads / n_kv_heads). bf16 in, f32 accumulation and online softmax, bf16 out.
// Block-causal (causal_block B > 0): packed row r at canvas position positions[r] attends only
// to the first min(kv_len, (positions[r] / B + 1) * B) of those keys (its block and the ones
// before). Keys past the largest such bound of a tile are never read, so cache rows that no
// query may see (a later block not yet written) need not hold finite values.
//
// Entry points (same params struct):
//   attention_ref_bf16  reference: one warp per (row, head), keys one at a time, f32.
//   attention_bf16      flash: FA2-style tiling, mma.sync m16n8k16 bf16 + ldmatrix, K/V tiles
//                       in shared memory with cp.async double buffering. The M dimension of a
//                       block is (row, head-of-group) pairs of one kv head, so the heads that
//                       share a kv head share its K/V tiles (GQA) and short sequences still
//                       fill the tile. Warps left idle by a short tile split each key tile with
//                       the busy ones.
//   attention_split_bf16  flash for grids too small to fill the GPU (decode steps, sm_90):
//                       a cluster of 4 blocks splits the key tiles of one M-tile and merges
//                       the partial softmax states through distributed shared memory.
#include "common.cuh"
#include <cooperative_groups.h>

#define HEAD_DIM 128

struct AttnParams {
    const bf16* q;          // row r, head h at q + r*q_stride + h*128
    const bf16* k_cache;    // [cache_rows, n_kv_heads*128]
    const bf16* v_cache;    // [cache_rows, n_kv_heads*128]
    bf16* out;              // [rows, n_heads*128]
    const uint32_t* seqs;   // [n_seqs*4]: row_start, row_count, cache_base, kv_len
    int n_seqs;
    int max_rows;
    int q_stride;
    int n_heads;
    int n_kv_heads;
    float scale;
    const uint32_t* positions;  // [rows] canvas positions; read only when causal_block > 0
    int causal_block;           // 0: bidirectional; B > 0: block-causal with blocks of B
    // [n_seqs*2] or null: keys [lo, hi) of sequence s (cache rows cache_base + lo..) that the
    // kernels just before this one may have written (this forward's live rows). The flash
    // kernels copy the key tiles outside it before their wait for those kernels (pdl_wait), so
    // the copies overlap them; null: every key is read after the wait.
    const uint32_t* fresh;
};

// How many of its sequence's kv_len keys packed row `row` may see.
__device__ __forceinline__ int key_bound(const AttnParams& p, int row, int kv_len) {
    if (p.causal_block <= 0) return kv_len;
    const long long cap = ((long long)p.positions[row] / p.causal_block + 1) * p.causal_block;
    return cap < kv_len ? (int)cap : kv_len;
}

// ---------------------------------------------------------------------------------------------
// Reference: block = 4 warps = 4 heads of one row; grid (max_rows, n_seqs, ceil(n_heads/4)).
extern "C" __global__ void __launch_bounds__(128) attention_ref_bf16(const AttnParams p) {
    pdl_wait();
    pdl_trigger();
    const uint32_t* s = p.seqs + 4 * blockIdx.y;
    const int row_start = s[0], row_count = s[1], cache_base = s[2];
    const int r = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.z * 4 + (threadIdx.x >> 5);
    if (r >= row_count || h >= p.n_heads) return;
    const int kv_len = key_bound(p, row_start + r, (int)s[3]);
    const int kvh = h / (p.n_heads / p.n_kv_heads);
    const size_t kv_stride = (size_t)p.n_kv_heads * HEAD_DIM;

    const bf16* q = p.q + (size_t)(row_start + r) * p.q_stride + (size_t)h * HEAD_DIM + lane * 4;
    float qv[4], acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < 4; ++i) qv[i] = __bfloat162float(q[i]) * p.scale;
    float m = -INFINITY, l = 0.f;
    for (int j = 0; j < kv_len; ++j) {
        const size_t off = (size_t)(cache_base + j) * kv_stride + (size_t)kvh * HEAD_DIM + lane * 4;
        const bf16* k = p.k_cache + off;
        const bf16* v = p.v_cache + off;
        float d = 0.f;
        for (int i = 0; i < 4; ++i) d += qv[i] * __bfloat162float(k[i]);
        d = warp_sum(d);
        const float m_new = fmaxf(m, d);
        const float corr = __expf(m - m_new);  // exp(-inf) = 0 on the first key
        const float e = __expf(d - m_new);
        l = l * corr + e;
        for (int i = 0; i < 4; ++i) acc[i] = acc[i] * corr + e * __bfloat162float(v[i]);
        m = m_new;
    }
    bf16* o = p.out + (size_t)(row_start + r) * p.n_heads * HEAD_DIM + (size_t)h * HEAD_DIM + lane * 4;
    const float inv = 1.f / l;
    for (int i = 0; i < 4; ++i) o[i] = __float2bfloat16(acc[i] * inv);
}

// ---------------------------------------------------------------------------------------------
// Flash: block = 4 warps, 64 M-rows (16 per warp) x 64-key tiles; grid
// (ceil(max_rows*group / 64), n_seqs, n_kv_heads). M-row m of a sequence is query row m / group,
// head kvh*group + m % group.
#define FA_M 64
#define FA_N 64
// Shared tiles are [64][128] bf16 = 16 chunks of 16 bytes per row; chunk c of row r is stored
// at chunk c ^ (r & 7) so that ldmatrix's 8 row addresses hit distinct banks.
#define TILE_ELEMS (64 * HEAD_DIM)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ int swz(int row, int chunk) { return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
// D = A(16x16, row) * B(16x8, col) + D, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Copies a 64-key tile of K or V (rows key0.., kv head kvh) into a swizzled shared tile;
// keys at or past kv_len are zero-filled.
template <int NT>
__device__ __forceinline__ void load_kv_tile(bf16* dst, const bf16* cache, size_t kv_stride, int cache_base,
                                             int key0, int kv_len, int kvh) {
#pragma unroll
    for (int i = 0; i < (FA_N * 16) / NT; ++i) {
        const int idx = threadIdx.x + i * NT;
        const int row = idx >> 4, chunk = idx & 15;
        const bool valid = key0 + row < kv_len;
        const int key = valid ? key0 + row : 0;
        const bf16* src = cache + (size_t)(cache_base + key) * kv_stride + (size_t)kvh * HEAD_DIM + chunk * 8;
        cp_async16(smem_u32(dst + swz(row, chunk)), src, valid);
    }
}

// One key tile for one warp: S = Q·Kᵀ over keys [key_off, key_off + 8·NJ) of the tile, online
// softmax update of (row_m, row_l, o), O += P·V. This thread holds rows lane/4 (index 0) and
// lane/4 + 8 (index 1) of the warp's 16.
template <int NJ>
__device__ __forceinline__ void tile_step(const bf16* k_t, const bf16* v_t, const uint32_t (&qf)[8][4],
                                          float (&o)[16][4], float* row_m, float* row_l, int key_off,
                                          int key_base, const int (&cap)[2], float sl2, int lane) {
    float sc[NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
        for (int j = 0; j < NJ; j += 2) {
            const int key = key_off + j * 8 + (lane & 7) + (lane >> 4) * 8;
            const int chunk = kk * 2 + ((lane >> 3) & 1);
            uint32_t b0, b1, b2, b3;
            ldsm_x4(smem_u32(k_t + swz(key, chunk)), b0, b1, b2, b3);
            mma16816(sc[j], qf[kk], b0, b1);
            mma16816(sc[j + 1], qf[kk], b2, b3);
        }
    }
    // Mask keys past each row's bound (kv_len, or its block's end when block-causal; only
    // tiles at or past the smaller bound have any).
    if (key_base + key_off + NJ * 8 > min(cap[0], cap[1])) {
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int c = key_base + key_off + j * 8 + (lane & 3) * 2;
            if (c >= cap[0]) sc[j][0] = -INFINITY;
            if (c + 1 >= cap[0]) sc[j][1] = -INFINITY;
            if (c >= cap[1]) sc[j][2] = -INFINITY;
            if (c + 1 >= cap[1]) sc[j][3] = -INFINITY;
        }
    }
    float mx[2] = {row_m[0], row_m[1]};
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        mx[0] = fmaxf(mx[0], fmaxf(sc[j][0], sc[j][1]) * sl2);
        mx[1] = fmaxf(mx[1], fmaxf(sc[j][2], sc[j][3]) * sl2);
    }
    float mb[2];  // the exponent base: the running max, or 0 while no valid key has been seen
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        // A warp's share of a tile can lie wholly past a row's bound: m stays -inf, and exp2 of
        // (-inf) - 0 gives 0 where (-inf) - (-inf) would give NaN.
        mb[i] = mx[i] == -INFINITY ? 0.f : mx[i];
    }
    const float corr0 = exp2f(row_m[0] - mb[0]), corr1 = exp2f(row_m[1] - mb[1]);
    row_m[0] = mx[0];
    row_m[1] = mx[1];
    float sum0 = 0.f, sum1 = 0.f;
    uint32_t pf[NJ / 2][4];  // P as A fragments: k-steps of 16 keys
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        const float p0 = exp2f(fmaf(sc[j][0], sl2, -mb[0]));
        const float p1 = exp2f(fmaf(sc[j][1], sl2, -mb[0]));
        const float p2 = exp2f(fmaf(sc[j][2], sl2, -mb[1]));
        const float p3 = exp2f(fmaf(sc[j][3], sl2, -mb[1]));
        sum0 += p0 + p1;
        sum1 += p2 + p3;
        pf[j >> 1][(j & 1) * 2 + 0] = pack_bf16(p0, p1);
        pf[j >> 1][(j & 1) * 2 + 1] = pack_bf16(p2, p3);
    }
    row_l[0] = row_l[0] * corr0 + sum0;
    row_l[1] = row_l[1] * corr1 + sum1;
#pragma unroll
    for (int d = 0; d < 16; ++d) {
        o[d][0] *= corr0;
        o[d][1] *= corr0;
        o[d][2] *= corr1;
        o[d][3] *= corr1;
    }
#pragma unroll
    for (int kk = 0; kk < NJ / 2; ++kk) {
#pragma unroll
        for (int d = 0; d < 16; d += 2) {
            const int key = key_off + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            const int chunk = d + (lane >> 4);
            uint32_t b0, b1, b2, b3;
            ldsm_x4_t(smem_u32(v_t + swz(key, chunk)), b0, b1, b2, b3);
            mma16816(o[d], pf[kk], b0, b1);
            mma16816(o[d + 1], pf[kk], b2, b3);
        }
    }
}

// Normalises this block's output tile, stages it as bf16 in sQ (each warp its own 16 rows) and
// stores 16 bytes per thread.
template <int NT>
__device__ __forceinline__ void flash_store(const AttnParams& p, bf16* sQ, const float (&o)[16][4],
                                            const float* row_l, bool writes, int slice, int m0, int m_count,
                                            int row_start, int group, int kvh) {
    const int tid = threadIdx.x, lane = tid & 31;
    const float inv0 = 1.f / row_l[0], inv1 = 1.f / row_l[1];
    const int r0 = slice * 16 + (lane >> 2), r1 = r0 + 8;
#pragma unroll
    for (int d = 0; d < 16 && writes; ++d) {
        *reinterpret_cast<uint32_t*>(sQ + swz(r0, d) + (lane & 3) * 2) = pack_bf16(o[d][0] * inv0, o[d][1] * inv0);
        *reinterpret_cast<uint32_t*>(sQ + swz(r1, d) + (lane & 3) * 2) = pack_bf16(o[d][2] * inv1, o[d][3] * inv1);
    }
    __syncthreads();
    const size_t out_stride = (size_t)p.n_heads * HEAD_DIM;
#pragma unroll
    for (int i = 0; i < (FA_M * 16) / NT; ++i) {
        const int idx = tid + i * NT;
        const int row = idx >> 4, chunk = idx & 15;
        const int m = m0 + row;
        if (m < m_count) {
            const int r = m / group, h = kvh * group + m % group;
            bf16* dst = p.out + (size_t)(row_start + r) * out_stride + (size_t)h * HEAD_DIM + chunk * 8;
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(sQ + swz(row, chunk));  // one 16-byte access
        }
    }
}

#define FA_SPLIT 4
// f32 row stride of the partial-output tile in the merge (padded against bank conflicts).
#define FA_OPAD (HEAD_DIM + 4)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Split-KV merge across the SPLIT blocks of a cluster. Each block publishes its unnormalised
// O tile [64][FA_OPAD] f32 (over its K/V stages) and per-row m (log2 units) and l (over sQ);
// after a cluster barrier, block `rank` merges rows [rank*64/SPLIT, (rank+1)*64/SPLIT) from
// every block's shared memory and writes them out; a second barrier keeps the shared memory
// alive until every block has read it.
template <int SPLIT, int NT>
__device__ __forceinline__ void flash_merge(const AttnParams& p, unsigned char* smem, const float (&o)[16][4],
                                            const float* row_m, const float* row_l, bool writes, int slice,
                                            int rank, int m0, int m_count, int row_start, int group, int kvh) {
    namespace cg = cooperative_groups;
    float* sML = reinterpret_cast<float*>(smem);                             // [2][64]: m, l
    float* sO = reinterpret_cast<float*>(smem + TILE_ELEMS * sizeof(bf16));  // [64][FA_OPAD]
    const int tid = threadIdx.x, lane = tid & 31;
    cp_async_wait<0>();  // a block with no key tile still has its Q copy in flight
    __syncthreads();
    const int r0 = slice * 16 + (lane >> 2), r1 = r0 + 8;
#pragma unroll
    for (int d = 0; d < 16 && writes; ++d) {
        const int c = d * 8 + (lane & 3) * 2;
        *reinterpret_cast<float2*>(sO + r0 * FA_OPAD + c) = make_float2(o[d][0], o[d][1]);
        *reinterpret_cast<float2*>(sO + r1 * FA_OPAD + c) = make_float2(o[d][2], o[d][3]);
    }
    if (writes && (lane & 3) == 0) {
        sML[r0] = row_m[0];
        sML[r1] = row_m[1];
        sML[FA_M + r0] = row_l[0];
        sML[FA_M + r1] = row_l[1];
    }
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    constexpr int ROWS = FA_M / SPLIT;
    constexpr int COLS = ROWS * HEAD_DIM / NT;  // per thread, a multiple of 8
    static_assert(COLS % 8 == 0, "merge columns per thread");
    const int row = rank * ROWS + tid / (HEAD_DIM / COLS);
    const int c0 = (tid % (HEAD_DIM / COLS)) * COLS;
    const int m = m0 + row;
    if (m < m_count) {
        float mj[SPLIT], M = -INFINITY;
#pragma unroll
        for (int j = 0; j < SPLIT; ++j) {
            mj[j] = cluster.map_shared_rank(sML, j)[row];
            M = fmaxf(M, mj[j]);
        }
        float acc[COLS], L = 0.f;
#pragma unroll
        for (int c = 0; c < COLS; ++c) acc[c] = 0.f;
#pragma unroll
        for (int j = 0; j < SPLIT; ++j) {
            const float w = exp2f(mj[j] - M);  // 0 for a block that saw no key (m = -inf)
            L += w * cluster.map_shared_rank(sML, j)[FA_M + row];
            const float* src = cluster.map_shared_rank(sO, j) + row * FA_OPAD + c0;
#pragma unroll
            for (int c = 0; c < COLS; c += 4) {
                const float4 v = *reinterpret_cast<const float4*>(src + c);
                acc[c] += w * v.x;
                acc[c + 1] += w * v.y;
                acc[c + 2] += w * v.z;
                acc[c + 3] += w * v.w;
            }
        }
        const float inv = 1.f / L;
#pragma unroll
        for (int c = 0; c < COLS; ++c) acc[c] *= inv;
        const int r = m / group, h = kvh * group + m % group;
        bf16* dst = p.out + (size_t)(row_start + r) * p.n_heads * HEAD_DIM + (size_t)h * HEAD_DIM + c0;
#pragma unroll
        for (int c = 0; c < COLS; c += 8) store8(dst + c, acc + c);
    }
    cluster.sync();
}
#else
template <int SPLIT, int NT>
__device__ __forceinline__ void flash_merge(const AttnParams&, unsigned char*, const float (&)[16][4], const float*,
                                            const float*, bool, int, int, int, int, int, int, int) {
    __trap();  // split-KV needs thread-block clusters (sm_90); the wrapper never launches it below
}
#endif

// One block's work: M-tile `m_tile` of sequence blockIdx.y, kv head blockIdx.z, key tiles
// rank, rank + SPLIT, ... With SPLIT > 1 the SPLIT blocks of a thread-block cluster share one
// M-tile, each takes every SPLIT-th key tile, and they merge their partial softmax states
// through distributed shared memory (sm_90): short query sets then still fill the GPU.
// STAGES K/V tiles are in flight or in use at once (cp.async ring); NW warps per block.
template <int SPLIT, int STAGES, int NW>
__device__ __forceinline__ void flash_body(const AttnParams& p, const int m_tile, const int rank) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sK = sQ + TILE_ELEMS;           // STAGES tiles
    bf16* sV = sK + STAGES * TILE_ELEMS;  // STAGES tiles

    const uint32_t* s = p.seqs + 4 * blockIdx.y;
    const int row_start = s[0], row_count = s[1], cache_base = s[2], seq_kv_len = s[3];
    const int group = p.n_heads / p.n_kv_heads;
    const int m_count = row_count * group;
    const int m0 = m_tile * FA_M;
    if (m0 >= m_count || seq_kv_len <= 0) return;  // uniform across a cluster (same M-tile)
    const int kvh = blockIdx.z;
    const size_t kv_stride = (size_t)p.n_kv_heads * HEAD_DIM;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // Keys this tile reads: [0, kv_len), the largest bound of its rows (every block of a
    // cluster computes the same value).
    int kv_len = seq_kv_len;
    if (p.causal_block > 0) {
        __shared__ int s_bound;
        if (tid == 0) s_bound = 0;
        __syncthreads();
        const int r_lo = m0 / group, r_hi = (min(m0 + FA_M, m_count) - 1) / group;
        for (int r = r_lo + tid; r <= r_hi; r += NW * 32) atomicMax(&s_bound, key_bound(p, row_start + r, seq_kv_len));
        __syncthreads();
        kv_len = s_bound;
    }

    // Keys that the kernels before this one may still be writing ([f_lo, f_hi), this forward's
    // live rows): every other key was written by an earlier forward, and the memory these reads
    // depend on (seqs, positions, fresh) was uploaded before the forward, so the first STAGES
    // key tiles that miss the fresh range are copied before the wait (commit group 0) and
    // overlap the kernel before (RoPE); Q and the fresh tiles follow the wait (group 1).
    constexpr int NT = NW * 32;
    int f_lo = 0, f_hi = kv_len;
    if (p.fresh) f_lo = (int)p.fresh[2 * blockIdx.y], f_hi = (int)p.fresh[2 * blockIdx.y + 1];
    const int n_tiles = (kv_len + FA_N - 1) / FA_N;
    auto stable = [&](int t) { return t * FA_N >= f_hi || (t + 1) * FA_N <= f_lo; };
    auto load_tile = [&](int st, int t) {
        load_kv_tile<NT>(sK + st * TILE_ELEMS, p.k_cache, kv_stride, cache_base, t * FA_N, kv_len, kvh);
        load_kv_tile<NT>(sV + st * TILE_ELEMS, p.v_cache, kv_stride, cache_base, t * FA_N, kv_len, kvh);
    };
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
        const int t = rank + st * SPLIT;
        if (t < n_tiles && stable(t)) load_tile(st, t);
    }
    cp_async_commit();
    pdl_wait();
    pdl_trigger();
    // Q tile: 64 M-rows x 16 chunks.
#pragma unroll
    for (int i = 0; i < (FA_M * 16) / NT; ++i) {
        const int idx = tid + i * NT;
        const int row = idx >> 4, chunk = idx & 15;
        const int m = m0 + row;
        const bool valid = m < m_count;
        const int r = valid ? m / group : 0, h = kvh * group + (valid ? m % group : 0);
        const bf16* src = p.q + (size_t)(row_start + r) * p.q_stride + (size_t)h * HEAD_DIM + chunk * 8;
        cp_async16(smem_u32(sQ + swz(row, chunk)), src, valid);
    }
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
        const int t = rank + st * SPLIT;
        if (t < n_tiles && !stable(t)) load_tile(st, t);
    }
    cp_async_commit();

    // Warps that would idle on a short M-tile share the key tiles instead: `ways` warps take
    // the same 16 rows (a slice), each 64/ways keys of every tile, and merge their softmax
    // states after the loop.
    const int slices = (min(FA_M, m_count - m0) + 15) >> 4;
    const int ways = min(4, NW / (slices <= 1 ? 1 : slices <= 2 ? 2 : 4));
    const int n_pos = NW / ways;  // slice positions; n_pos >= slices
    const int slice = warp % n_pos, way = warp / n_pos;
    const int key_off = way * (FA_N / ways);
    const bool warp_active = m0 + slice * 16 < m_count;
    const float sl2 = p.scale * 1.4426950408889634f;  // scores in log2 units
    // Key bounds of this thread's two rows (M-rows slice*16 + lane/4 and + 8 of the tile).
    int cap[2] = {kv_len, kv_len};
    if (p.causal_block > 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int m = m0 + slice * 16 + (lane >> 2) + i * 8;
            if (m < m_count) cap[i] = key_bound(p, row_start + m / group, kv_len);
        }
    }
    uint32_t qf[8][4];
    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};

    // Tile `it` of the block sits in stage it % STAGES. The first STAGES came with groups 0
    // and 1; tile it + STAGES is copied (group 2 + it, empty past the end) once iteration it
    // has released its stage, so at iteration it >= 1 at most STAGES - 1 groups may be pending.
    for (int t = rank, it = 0; t < n_tiles; t += SPLIT, ++it) {
        const int st = it % STAGES;
        if (it == 0) {
            cp_async_wait<0>();
        } else {
            cp_async_wait<STAGES - 1>();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                const int row = slice * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int chunk = kk * 2 + (lane >> 4);
                ldsm_x4(smem_u32(sQ + swz(row, chunk)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
            }
        }
        if (warp_active) {
            const bf16* k_t = sK + st * TILE_ELEMS;
            const bf16* v_t = sV + st * TILE_ELEMS;
            if (ways == 1) {
                tile_step<8>(k_t, v_t, qf, o, row_m, row_l, 0, t * FA_N, cap, sl2, lane);
            } else if (ways == 2) {
                tile_step<4>(k_t, v_t, qf, o, row_m, row_l, key_off, t * FA_N, cap, sl2, lane);
            } else {
                tile_step<2>(k_t, v_t, qf, o, row_m, row_l, key_off, t * FA_N, cap, sl2, lane);
            }
        }
        __syncthreads();  // the copy below overwrites the stage just read
        const int tn = t + STAGES * SPLIT;
        if (tn < n_tiles) load_tile(st, tn);
        cp_async_commit();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        row_l[i] += __shfl_xor_sync(0xffffffffu, row_l[i], 1);
        row_l[i] += __shfl_xor_sync(0xffffffffu, row_l[i], 2);
    }
    if (ways > 1) {
        // Warps of way > 0 publish their partial state over the K/V stages (at most
        // 3 ways x 2 slices x 8 KiB + 3 KiB); way 0 folds them in.
        float4* sP = reinterpret_cast<float4*>(sK);    // [ways-1][n_pos][16 d][32 lanes]
        float4* sS = sP + 3 * 4 * 16 * 32 / 2;         // [ways-1][n_pos][32 lanes]: m0, m1, l0, l1
        cp_async_wait<0>();
        const int slot = ((way - 1) * n_pos + slice);
        if (way > 0) {
#pragma unroll
            for (int d = 0; d < 16; ++d) sP[(slot * 16 + d) * 32 + lane] = make_float4(o[d][0], o[d][1], o[d][2], o[d][3]);
            sS[slot * 32 + lane] = make_float4(row_m[0], row_m[1], row_l[0], row_l[1]);
        }
        __syncthreads();
        if (way == 0) {
            for (int w = 1; w < ways; ++w) {
                const int src = (w - 1) * n_pos + slice;
                const float4 st = sS[src * 32 + lane];
                const float mo[2] = {st.x, st.y}, lo[2] = {st.z, st.w};
                float a[2], b[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    // -inf on both sides: no valid key yet (a split-KV block without a tile).
                    const float mnew = fmaxf(row_m[i], mo[i]);
                    const float base = mnew == -INFINITY ? 0.f : mnew;
                    a[i] = exp2f(row_m[i] - base);
                    b[i] = exp2f(mo[i] - base);
                    row_l[i] = row_l[i] * a[i] + lo[i] * b[i];
                    row_m[i] = mnew;
                }
#pragma unroll
                for (int d = 0; d < 16; ++d) {
                    const float4 v = sP[(src * 16 + d) * 32 + lane];
                    o[d][0] = o[d][0] * a[0] + v.x * b[0];
                    o[d][1] = o[d][1] * a[0] + v.y * b[0];
                    o[d][2] = o[d][2] * a[1] + v.z * b[1];
                    o[d][3] = o[d][3] * a[1] + v.w * b[1];
                }
            }
        }
        __syncthreads();
    }
    const bool writes = warp_active && way == 0;
    if constexpr (SPLIT == 1) {
        flash_store<NT>(p, sQ, o, row_l, writes, slice, m0, m_count, row_start, group, kvh);
    } else {
        flash_merge<SPLIT, NT>(p, smem_raw, o, row_m, row_l, writes, slice, rank, m0, m_count, row_start, group, kvh);
    }
}

// Whole key range per block, 2 stages (80 KiB of shared memory: 2 blocks per SM).
extern "C" __global__ void __launch_bounds__(128) attention_bf16(const AttnParams p) {
    flash_body<1, 2, 4>(p, blockIdx.x, 0);
}


// Split-KV flash for short query sets: grid x = M-tiles × FA_SPLIT, clusters of FA_SPLIT blocks
// along x, 2 stages (80 KiB), 4 warps. sm_90 only (the wrapper checks); traps elsewhere.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FA_SPLIT_CLUSTER __cluster_dims__(FA_SPLIT, 1, 1)
#else
#define FA_SPLIT_CLUSTER
#endif
extern "C" __global__ void FA_SPLIT_CLUSTER __launch_bounds__(128) attention_split_bf16(const AttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    flash_body<FA_SPLIT, 2, 4>(p, blockIdx.x / FA_SPLIT, (int)cooperative_groups::this_cluster().block_rank());
#else
    __trap();
#endif
}
