// Skinny GEMM for decode-shaped steps: Y[t, n] = X[t, k] · W[n, k]ᵀ (+ bias[n]), t ≤ 64,
// bf16 operands, f32 accumulation, bf16 or f32 output. Purely memory-bound on W, so the
// design is about streaming W at full bandwidth:
//
// - mma.sync m16n8k16 with W rows as M (16 per tile) and X rows as N (8 per tile). The
//   reduction index k is permuted identically for A and B so that each thread's fragment
//   registers come from one 16-byte load: thread (g = lane/4, q = lane%4) loads W[row g][kb +
//   8q .. 8q+8) and W[row g+8][same]; elements 0..3 feed one mma (logical k 2q,2q+1,2q+8,2q+9)
//   and elements 4..7 the next. X fragments use the same permutation, read from shared memory.
// - A warp owns 32 W rows (2 m-tiles); a block owns nwarps·32 rows (blockDim.x / 32 warps) and
//   one k range of `k_split` (split-K over gridDim.y). W goes global → registers with
//   L1::no_allocate + L2 evict_first loads through a register ring of D 64-k stages (8 × 16 B
//   per thread each): D - 1 stages are in flight while one is multiplied (D = 3 for t ≤ 32,
//   2 for t ≤ 64, where the accumulators need the registers).
// - X[0:t, chunk] is staged in shared memory in chunks of KC columns, double-buffered with
//   cp.async (zero-filled for rows ≥ t and columns ≥ the block's k end), rows padded by 64 B
//   so the 16-byte fragment reads are bank-conflict free.
// - splits == 1: the epilogue adds the bias and writes Y. splits > 1: each block writes f32
//   partials to partial[split][t][n] and gemm_skinny_reduce_bf16 sums them in split order
//   (deterministic: no atomics), adds the bias and writes Y.
//
// Entry points: gemm_skinny{8,16,32,64}_bf16 for t ≤ 8, 16, 32, 64 (NT = 1, 2, 4, 8 n-tiles
// of 8 X rows), gemm_skinny_reduce_bf16. All take SkinnyParams. Requires k % 8 == 0 (the
// wrapper checks) and 16-byte aligned x and w (DTensor buffers are); any n, any t ≤ 64.
#include "common.cuh"

struct SkinnyParams {
    const bf16* x;     // [>= t, k]
    const bf16* w;     // [n, k]
    const bf16* bias;  // [n] or nullptr
    void* y;           // [>= t, n], bf16 or f32 (out_f32)
    float* partial;    // [splits, t, n] f32 when splits > 1
    int t;
    int n;
    int k;
    int k_split;  // k columns per split, a multiple of 64; split s covers [s*k_split, min(k, ..))
    int splits;   // gridDim.y
    int out_f32;  // 0: y is bf16, 1: y is f32
};

namespace {

constexpr int MT = 2;         // m-tiles (16 W rows each) per warp
constexpr int WROWS = 16 * MT;  // W rows per warp
constexpr int U = 2;          // 32-column k chunks per stage
constexpr int STAGE_K = 32 * U;  // 64 columns per stage

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte copy global → shared; zero-fills when !valid (src is then not read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
    return pol;
}

// Streaming 16-byte load of weights: not kept in L1, first to leave L2.
__device__ __forceinline__ uint4 ld_stream(const bf16* p, uint64_t pol) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(pol));
    return v;
}

__device__ __forceinline__ void mma_bf16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// X chunk width (columns staged per shared-memory buffer): two buffers stay under 48 KB.
template <int NT>
struct XChunk {
    static constexpr int KC = NT <= 2 ? 512 : (NT == 4 ? 256 : 128);
    static constexpr int STRIDE = KC + 32;  // +64 B: rows r, r+1 land in opposite bank halves
    static constexpr int ROWS = NT * 8;
    static constexpr int BUF = ROWS * STRIDE;  // elements per buffer
    static constexpr int SPC = KC / STAGE_K;   // stages per chunk
};

// Stages X[0:ROWS, kc0 : kc0 + KC) into `buf` (zeros outside rows < t, columns < k1).
template <int NT>
__device__ __forceinline__ void load_x_chunk(const SkinnyParams& p, bf16* buf, int kc0, int k1) {
    using C = XChunk<NT>;
    constexpr int VPR = C::KC / 8;  // 16-byte vectors per row
    for (int v = threadIdx.x; v < C::ROWS * VPR; v += blockDim.x) {
        const int r = v / VPR;
        const int c = (v - r * VPR) * 8;
        const int kk = kc0 + c;
        const bool valid = r < p.t && kk < k1;
        const bf16* src = valid ? p.x + (size_t)r * p.k + kk : p.x;
        cp_async16(smem_u32(buf + r * C::STRIDE + c), src, valid);
    }
}

// NT n-tiles of 8 X rows; D register stages of W (D - 1 in flight ahead of the one in use).
template <int NT, int D>
__device__ __forceinline__ void skinny_body(const SkinnyParams& p) {
    using C = XChunk<NT>;
    extern __shared__ uint4 smem_raw[];
    bf16* xs = reinterpret_cast<bf16*>(smem_raw);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int nwarps = blockDim.x >> 5;
    const int row0 = (blockIdx.x * nwarps + warp) * WROWS;  // first W row of this warp
    const int k0 = blockIdx.y * p.k_split;
    const int k1 = min(p.k, k0 + p.k_split);
    const int nst = (k1 - k0 + STAGE_K - 1) / STAGE_K;
    const int nchunks = (k1 - k0 + C::KC - 1) / C::KC;
    const uint64_t pol = evict_first_policy();

    // The four W rows this thread loads: row0 + 16m + g + 8h.
    const bf16* wrow[MT][2];
    bool wok[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = row0 + 16 * m + g + 8 * h;
            wok[m][h] = r < p.n;
            wrow[m][h] = p.w + (size_t)(wok[m][h] ? r : 0) * p.k + 8 * q;
        }

    float acc[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;

    // W register ring: ring[d][m][h][u] = 16 B of row (16m + g + 8h) at columns
    // stage_k0 + 32u + 8q; stage s lives in ring[s % D], so D - 1 stages are in flight while
    // one is multiplied.
    uint4 ring[D][MT][2][U];
    auto load_stage = [&](uint4 (&dst)[MT][2][U], int s) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int kk = k0 + s * STAGE_K + 32 * u;  // + 8q, and k1 - kk is a multiple of 8
            const bool kin = kk + 8 * q < k1;
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    dst[m][h][u] = (kin && wok[m][h]) ? ld_stream(wrow[m][h] + kk, pol) : make_uint4(0, 0, 0, 0);
        }
    };

#pragma unroll
    for (int d = 0; d + 1 < D; ++d) load_stage(ring[d], d);  // past k1 this loads zeros
    load_x_chunk<NT>(p, xs, k0, k1);
    cp_async_commit();

    for (int s0 = 0; s0 < nst; s0 += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            const int s = s0 + d;
            if (s >= nst) break;  // block-uniform
            const int c = s / C::SPC;
            const int sc = s - c * C::SPC;  // stage within the chunk
            if (sc == 0) {
                __syncthreads();  // every warp is done with chunk c-1, whose buffer is refilled next
                if (c + 1 < nchunks) {
                    load_x_chunk<NT>(p, xs + ((c + 1) & 1) * C::BUF, k0 + (c + 1) * C::KC, k1);
                    cp_async_commit();
                    cp_async_wait<1>();  // this thread's copies of chunk c have landed
                } else {
                    cp_async_wait<0>();
                }
                __syncthreads();  // ... and everyone's
            }
            load_stage(ring[(d + D - 1) % D], s + D - 1);  // the slot stage s-1 used
            const uint4(&cur)[MT][2][U] = ring[d];
            const bf16* xb = xs + (c & 1) * C::BUF + sc * STAGE_K + 8 * q;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                uint4 xv[NT];
#pragma unroll
                for (int j = 0; j < NT; ++j)
                    xv[j] = *reinterpret_cast<const uint4*>(xb + (j * 8 + g) * C::STRIDE + 32 * u);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const uint4 lo = cur[m][0][u], hi = cur[m][1][u];
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        mma_bf16(acc[m][j], lo.x, hi.x, lo.y, hi.y, xv[j].x, xv[j].y);
                        mma_bf16(acc[m][j], lo.z, hi.z, lo.w, hi.w, xv[j].z, xv[j].w);
                    }
                }
            }
        }
    }

    // acc[m][j][e]: X row j*8 + 2q + (e & 1), W row row0 + 16m + g + 8(e >> 1).
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = row0 + 16 * m + g + 8 * (e >> 1);
            if (col >= p.n) continue;
            const float b = (p.splits == 1 && p.bias) ? __bfloat162float(p.bias[col]) : 0.f;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int r = j * 8 + 2 * q + (e & 1);
                if (r >= p.t) continue;
                const float v = acc[m][j][e];
                const size_t o = (size_t)r * p.n + col;
                if (p.splits > 1) {
                    p.partial[(size_t)blockIdx.y * p.t * p.n + o] = v;
                } else if (p.out_f32) {
                    static_cast<float*>(p.y)[o] = v + b;
                } else {
                    static_cast<bf16*>(p.y)[o] = __float2bfloat16(v + b);
                }
            }
        }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) gemm_skinny8_bf16(const SkinnyParams p) { skinny_body<1, 3>(p); }
extern "C" __global__ void __launch_bounds__(256) gemm_skinny16_bf16(const SkinnyParams p) { skinny_body<2, 3>(p); }
extern "C" __global__ void __launch_bounds__(256) gemm_skinny32_bf16(const SkinnyParams p) { skinny_body<4, 3>(p); }
extern "C" __global__ void __launch_bounds__(256) gemm_skinny64_bf16(const SkinnyParams p) { skinny_body<8, 2>(p); }

// Y[r, c] = Σ_s partial[s, r, c] (s = 0, 1, ... in order) + bias[c]; flat grid-stride over t·n.
extern "C" __global__ void gemm_skinny_reduce_bf16(const SkinnyParams p) {
    const size_t total = (size_t)p.t * p.n;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        float v = 0.f;
        for (int s = 0; s < p.splits; ++s) v += p.partial[s * total + i];
        if (p.bias) v += __bfloat162float(p.bias[i % p.n]);
        if (p.out_f32) {
            static_cast<float*>(p.y)[i] = v;
        } else {
            static_cast<bf16*>(p.y)[i] = __float2bfloat16(v);
        }
    }
}
