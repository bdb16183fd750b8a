// Bidirectional varlen attention over the KV cache (no mask), head_dim 128, GQA.
//
// Queries are the packed live rows of several sequences; a query of sequence s attends to the
// cache rows [cache_base, cache_base + kv_len) of s. Query head h reads kv head
// h / (n_heads / n_kv_heads). bf16 in, f32 accumulation and online softmax, bf16 out.
//
// Entry points (same params struct):
//   attention_ref_bf16  reference: one warp per (row, head), keys one at a time, f32.
//   attention_bf16      flash: FA2-style tiling, mma.sync m16n8k16 bf16 + ldmatrix, K/V tiles
//                       in shared memory with cp.async double buffering. The M dimension of a
//                       block is (row, head-of-group) pairs of one kv head, so the heads that
//                       share a kv head share its K/V tiles (GQA) and short sequences still
//                       fill the tile.
#include "common.cuh"

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
};

// ---------------------------------------------------------------------------------------------
// Reference: block = 4 warps = 4 heads of one row; grid (max_rows, n_seqs, ceil(n_heads/4)).
extern "C" __global__ void __launch_bounds__(128) attention_ref_bf16(const AttnParams p) {
    const uint32_t* s = p.seqs + 4 * blockIdx.y;
    const int row_start = s[0], row_count = s[1], cache_base = s[2], kv_len = s[3];
    const int r = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.z * 4 + (threadIdx.x >> 5);
    if (r >= row_count || h >= p.n_heads) return;
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
#define FA_THREADS 128
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
__device__ __forceinline__ void load_kv_tile(bf16* dst, const bf16* cache, size_t kv_stride, int cache_base,
                                             int key0, int kv_len, int kvh) {
#pragma unroll
    for (int i = 0; i < (FA_N * 16) / FA_THREADS; ++i) {
        const int idx = threadIdx.x + i * FA_THREADS;
        const int row = idx >> 4, chunk = idx & 15;
        const bool valid = key0 + row < kv_len;
        const int key = valid ? key0 + row : 0;
        const bf16* src = cache + (size_t)(cache_base + key) * kv_stride + (size_t)kvh * HEAD_DIM + chunk * 8;
        cp_async16(smem_u32(dst + swz(row, chunk)), src, valid);
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_bf16(const AttnParams p) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sK = sQ + TILE_ELEMS;          // 2 stages
    bf16* sV = sK + 2 * TILE_ELEMS;      // 2 stages

    const uint32_t* s = p.seqs + 4 * blockIdx.y;
    const int row_start = s[0], row_count = s[1], cache_base = s[2], kv_len = s[3];
    const int group = p.n_heads / p.n_kv_heads;
    const int m_count = row_count * group;
    const int m0 = blockIdx.x * FA_M;
    if (m0 >= m_count || kv_len <= 0) return;
    const int kvh = blockIdx.z;
    const size_t kv_stride = (size_t)p.n_kv_heads * HEAD_DIM;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // Q tile: 64 M-rows x 16 chunks.
#pragma unroll
    for (int i = 0; i < (FA_M * 16) / FA_THREADS; ++i) {
        const int idx = tid + i * FA_THREADS;
        const int row = idx >> 4, chunk = idx & 15;
        const int m = m0 + row;
        const bool valid = m < m_count;
        const int r = valid ? m / group : 0, h = kvh * group + (valid ? m % group : 0);
        const bf16* src = p.q + (size_t)(row_start + r) * p.q_stride + (size_t)h * HEAD_DIM + chunk * 8;
        cp_async16(smem_u32(sQ + swz(row, chunk)), src, valid);
    }
    load_kv_tile(sK, p.k_cache, kv_stride, cache_base, 0, kv_len, kvh);
    load_kv_tile(sV, p.v_cache, kv_stride, cache_base, 0, kv_len, kvh);
    cp_async_commit();

    const bool warp_active = m0 + warp * 16 < m_count;
    const float sl2 = p.scale * 1.4426950408889634f;  // scores in log2 units
    uint32_t qf[8][4];
    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};

    const int n_tiles = (kv_len + FA_N - 1) / FA_N;
    for (int t = 0; t < n_tiles; ++t) {
        const int st = t & 1;
        if (t + 1 < n_tiles) {
            load_kv_tile(sK + (st ^ 1) * TILE_ELEMS, p.k_cache, kv_stride, cache_base, (t + 1) * FA_N, kv_len, kvh);
            load_kv_tile(sV + (st ^ 1) * TILE_ELEMS, p.v_cache, kv_stride, cache_base, (t + 1) * FA_N, kv_len, kvh);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (t == 0) {
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int chunk = kk * 2 + (lane >> 4);
                ldsm_x4(smem_u32(sQ + swz(row, chunk)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
            }
        }
        if (warp_active) {
            const bf16* k_t = sK + st * TILE_ELEMS;
            const bf16* v_t = sV + st * TILE_ELEMS;
            // S = Q K^T: 16 rows x 64 keys per warp, 8 n-tiles of 8 keys.
            float sc[8][4];
#pragma unroll
            for (int j = 0; j < 8; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
                for (int j = 0; j < 8; j += 2) {
                    const int key = j * 8 + (lane & 7) + (lane >> 4) * 8;
                    const int chunk = kk * 2 + ((lane >> 3) & 1);
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4(smem_u32(k_t + swz(key, chunk)), b0, b1, b2, b3);
                    mma16816(sc[j], qf[kk], b0, b1);
                    mma16816(sc[j + 1], qf[kk], b2, b3);
                }
            }
            // Mask keys past kv_len (only the last tile has any).
            const int key_base = t * FA_N;
            if (key_base + FA_N > kv_len) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int c = key_base + j * 8 + (lane & 3) * 2;
                    if (c >= kv_len) sc[j][0] = sc[j][2] = -INFINITY;
                    if (c + 1 >= kv_len) sc[j][1] = sc[j][3] = -INFINITY;
                }
            }
            // Online softmax; this thread holds rows lane/4 (index 0) and lane/4 + 8 (index 1).
            float mx[2] = {row_m[0], row_m[1]};
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                mx[0] = fmaxf(mx[0], fmaxf(sc[j][0], sc[j][1]) * sl2);
                mx[1] = fmaxf(mx[1], fmaxf(sc[j][2], sc[j][3]) * sl2);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            }
            // Every tile holds at least one valid key, so mx is finite here.
            const float corr0 = exp2f(row_m[0] - mx[0]), corr1 = exp2f(row_m[1] - mx[1]);
            row_m[0] = mx[0];
            row_m[1] = mx[1];
            float sum0 = 0.f, sum1 = 0.f;
            uint32_t pf[4][4];  // P as A fragments: 4 k-steps of 16 keys
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float p0 = exp2f(fmaf(sc[j][0], sl2, -mx[0]));
                const float p1 = exp2f(fmaf(sc[j][1], sl2, -mx[0]));
                const float p2 = exp2f(fmaf(sc[j][2], sl2, -mx[1]));
                const float p3 = exp2f(fmaf(sc[j][3], sl2, -mx[1]));
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
            // O += P V: 16 dim-tiles of 8, 4 k-steps of 16 keys.
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
                for (int d = 0; d < 16; d += 2) {
                    const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int chunk = d + (lane >> 4);
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4_t(smem_u32(v_t + swz(key, chunk)), b0, b1, b2, b3);
                    mma16816(o[d], pf[kk], b0, b1);
                    mma16816(o[d + 1], pf[kk], b2, b3);
                }
            }
        }
        __syncthreads();  // the next iteration's loads overwrite the stage just read
    }

    // Epilogue: normalise, stage the bf16 tile in sQ (each warp its own 16 rows), store 16 bytes
    // per thread.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        row_l[i] += __shfl_xor_sync(0xffffffffu, row_l[i], 1);
        row_l[i] += __shfl_xor_sync(0xffffffffu, row_l[i], 2);
    }
    const float inv0 = warp_active ? 1.f / row_l[0] : 0.f, inv1 = warp_active ? 1.f / row_l[1] : 0.f;
    {
        const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8;
#pragma unroll
        for (int d = 0; d < 16; ++d) {
            *reinterpret_cast<uint32_t*>(sQ + swz(r0, d) + (lane & 3) * 2) = pack_bf16(o[d][0] * inv0, o[d][1] * inv0);
            *reinterpret_cast<uint32_t*>(sQ + swz(r1, d) + (lane & 3) * 2) = pack_bf16(o[d][2] * inv1, o[d][3] * inv1);
        }
    }
    __syncthreads();
    const size_t out_stride = (size_t)p.n_heads * HEAD_DIM;
#pragma unroll
    for (int i = 0; i < (FA_M * 16) / FA_THREADS; ++i) {
        const int idx = tid + i * FA_THREADS;
        const int row = idx >> 4, chunk = idx & 15;
        const int m = m0 + row;
        if (m < m_count) {
            const int r = m / group, h = kvh * group + m % group;
            bf16* dst = p.out + (size_t)(row_start + r) * out_stride + (size_t)h * HEAD_DIM + chunk * 8;
            *reinterpret_cast<bf16x8*>(dst) = *reinterpret_cast<const bf16x8*>(sQ + swz(row, chunk));
        }
    }
}
