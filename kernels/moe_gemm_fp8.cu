// FP8 (E4M3, per-output-channel f32 scales) variants of the grouped expert GEMMs of
// kernels/moe_gemm.cu, over the same routing (counts[E], offsets[E + 1], perm[position] =
// row·top_k + slot, from kernels/moe_route.cu). Weights per expert are E4M3 codes
// [E, n, k] (one byte each) with scales [E, n] (`w[e, r, :] ≈ q · s[e, r]`).
//
// moe_gate_up_fp8{8,16,32,64}_bf16: act[position, ffn] = bf16(bf16(silu(g))·u) with
//   g = bf16(s_g · Σ x·q_g), u = bf16(s_u · Σ x·q_u): the scale multiplies the f32 sum in the
//   epilogue, then exactly the SwiGLU rounding sequence of moe_gate_up*_bf16 (and of
//   gemm_fp8_skinny*_swiglu_bf16). Grid (ceil(ffn / 64), E): block (b, e) pairs gate rows
//   [64b, 64b + 64) with their up rows.
// moe_down_fp8{8,16,32,64}_f32: y[position, hidden] (f32) = s[e, col] · Σ act·q; grid
//   (ceil(hidden / 128), E). moe_combine_bf16 (kernels/moe_gemm.cu) then sums the slots.
// The tile machinery is the W8A16 skinny GEMM's (kernels/fp8_tile.cuh: 128 W rows × 128
// k-columns of E4M3 per stage, codes dequantised in registers by `dequant4` as q · 2⁻¹²⁰ then
// × 2¹²⁰, exact for every code, subnormals included; bf16 mma.sync with f32 accumulation);
// the grouping is moe_gemm.cu's: a block reads its expert's row count first and exits before
// touching the expert's weights when it is 0; an expert with more rows than the tile (TP =
// 8·NT) loops over chunks of TP rows, re-streaming its slab; X rows of gate|up are gathered
// through perm, the down projection reads act by position. Each output row depends only on its
// own X row. Requirements (checked by src/ops/moe_fp8.rs): k % 16 == 0, n (gate|up: n / 2)
// a nonzero multiple of 8, 16-byte aligned x and w.
//
// moe_gate_up_fp8_ref_bf16 / moe_down_fp8_ref_f32: the reference variant, one thread per
// output, sequential f32 dot products of x with the decoded codes, the same scale and roundings.
#include "fp8_tile.cuh"

struct MoeFp8Params {
    const bf16* x;         // gate_up: token rows [>= t, k]; down: act [pairs, k] (by position)
    const uint8_t* w;      // [E, n, k] E4M3
    const float* scales;   // [E, n]
    void* y;               // gate_up: act bf16 [pairs, n / 2]; down: f32 [pairs, n]
    const int* counts;     // [E]
    const int* offsets;    // [E + 1]
    const int* perm;       // [pairs]: pair index (row·top_k + slot) at each position
    const int* ids;        // [pairs]: expert of each pair (the reference kernels)
    int n;                 // W rows per expert (gate_up: 2·ffn; down: hidden)
    int k;                 // W columns (gate_up: hidden; down: ffn), % 16 == 0
    int top_k;
    int pairs;             // t·top_k
};

#define REF_THREADS 128

namespace {

// W copies of stage kb of expert weight `w` ([n, k] bytes): 16-byte chunks, SWIGLU pairing 64
// gate rows with their up rows (+ n/2), as moe_gemm.cu's load_w.
template <bool SWIGLU>
__device__ __forceinline__ void load_w8(const uint8_t* w, int n, int k, uint8_t* st, int n0, int kb) {
    constexpr int CPR = BK / 16;  // 16-byte chunks per W row
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
        const int gk = kb + 16 * c;
        const bool ok = row_ok && gk < k;
        const uint8_t* src = ok ? w + (size_t)gr * k + gk : w;
        cp_async16_stream(smem_u32(st + w_off(r, c)), src, ok);
    }
}

// X copies of stage kb: tile row r reads source row xrow[r] (−1: zero-filled).
template <int NT>
__device__ __forceinline__ void load_x8(const bf16* x, int k, const int* xrow, uint8_t* st, int kb) {
    using T = Tile8<NT>;
    constexpr int CPR = BK / 8;  // 16-byte chunks per X row
    uint8_t* xs = st + T::W_BYTES;
#pragma unroll
    for (int u = 0; u < (T::TP * CPR + THREADS - 1) / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        if (i < T::TP * CPR) {
            const int r = i / CPR, c = i % CPR;
            const int gk = kb + 8 * c;
            const int src_row = xrow[r];
            const bool ok = src_row >= 0 && gk < k;
            const bf16* src = ok ? x + (size_t)src_row * k + gk : x;
            cp_async16(smem_u32(xs + x_off(r, c)), src, ok);
        }
    }
}

template <int NT, bool SWIGLU>
__device__ __forceinline__ void grouped_fp8_body(const MoeFp8Params& p) {
    using T = Tile8<NT>;
    extern __shared__ uint4 smem_raw[];
    __shared__ int xrow[T::TP];
    uint8_t* ring = reinterpret_cast<uint8_t*>(smem_raw);
    pdl_wait();  // counts, offsets, perm and X come from the kernels before
    pdl_trigger();
    const int e = blockIdx.y;
    const int cnt = p.counts[e];
    if (cnt == 0) return;  // an expert no row picked: its weights are never read
    const int off = p.offsets[e];
    const uint8_t* w = p.w + (size_t)e * p.n * p.k;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * BN;
    const int nst = (p.k + BK - 1) / BK;
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
        // Opaque per-chunk copies of the weight pointer and sizes (as moe_gemm.cu): otherwise
        // the compiler hoists every stage's address arithmetic out of the chunk loop and spills.
        const uint8_t* wc = w;
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
                uint8_t* st = ring + s * T::STAGE_BYTES;
                load_w8<SWIGLU>(wc, nc, kc, st, n0, s * BK);
                load_x8<NT>(p.x, kc, xrow, st, s * BK);
            }
            cp_async_commit();
        }
        for (int it = 0; it < nst; ++it) {
            cp_async_wait<T::STAGES - 2>();
            __syncthreads();
            const int nx = it + T::STAGES - 1;
            if (nx < nst) {
                uint8_t* st = ring + (nx % T::STAGES) * T::STAGE_BYTES;
                load_w8<SWIGLU>(wc, nc, kc, st, n0, nx * BK);
                load_x8<NT>(p.x, kc, xrow, st, nx * BK);
            }
            cp_async_commit();
            mma_stage<NT>(ring + (it % T::STAGES) * T::STAGE_BYTES, warp, lane, TWO_POW_120_X2, acc);
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
        const float* sc = p.scales + (size_t)blockIdx.y * p.n;  // the expert's channel scales
        for (int i = threadIdx.x; i < rows * BN; i += THREADS) {
            float v = red[i];
#pragma unroll
            for (int kg = 1; kg < T::KG; ++kg) v += red[kg * T::TP * BN + i];
            if constexpr (SWIGLU) {
                red[i] = v;
            } else {
                const int r = i / BN, col = n0 + (i - r * BN);
                if (col < p.n) static_cast<float*>(p.y)[(size_t)(off + c0 + r) * p.n + col] = v * __ldg(sc + col);
            }
        }
        if constexpr (SWIGLU) {
            // The channel scale on the f32 sums, then the bf16 kernel's SwiGLU roundings.
            __syncthreads();
            const int half = p.n >> 1, cb = n0 >> 1;
            for (int i = threadIdx.x; i < rows * 64; i += THREADS) {
                const int r = i >> 6, j = i & 63;
                if (cb + j < half) {
                    const float gv = round_bf16(red[r * BN + j] * __ldg(sc + cb + j));
                    const float uv = round_bf16(red[r * BN + 64 + j] * __ldg(sc + half + cb + j));
                    static_cast<bf16*>(p.y)[(size_t)(off + c0 + r) * half + cb + j] =
                        __float2bfloat16(round_bf16(gv / (1.f + expf(-gv))) * uv);
                }
            }
        }
        __syncthreads();  // red (the ring) and xrow are free for the next chunk
    }
}

// The value of E4M3 code `b` as f32, decoded field by field (exact, no subnormal f32
// arithmetic): normal (8 + m) · 2^(e − 10), subnormal m · 2^−9. NaN codes never occur (the
// quantisers and the checkpoint loader refuse them).
__device__ __forceinline__ float e4m3_value(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float v = e ? ldexpf((float)(8 + m), e - 10) : ldexpf((float)m, -9);
    return (b & 0x80) ? -v : v;
}

}  // namespace

#define MOE_FP8_ENTRY(name, NT, SWIGLU)                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(const MoeFp8Params p) { \
        grouped_fp8_body<NT, SWIGLU>(p);                                                    \
    }
MOE_FP8_ENTRY(moe_gate_up_fp8_8_bf16, 1, true)
MOE_FP8_ENTRY(moe_gate_up_fp8_16_bf16, 2, true)
MOE_FP8_ENTRY(moe_gate_up_fp8_32_bf16, 4, true)
MOE_FP8_ENTRY(moe_gate_up_fp8_64_bf16, 8, true)
MOE_FP8_ENTRY(moe_down_fp8_8_f32, 1, false)
MOE_FP8_ENTRY(moe_down_fp8_16_f32, 2, false)
MOE_FP8_ENTRY(moe_down_fp8_32_f32, 4, false)
MOE_FP8_ENTRY(moe_down_fp8_64_f32, 8, false)

// Reference: thread (position blockIdx.x, column blockIdx.y·128 + tid) of act.
extern "C" __global__ void __launch_bounds__(REF_THREADS) moe_gate_up_fp8_ref_bf16(const MoeFp8Params p) {
    pdl_wait();
    pdl_trigger();
    const int i = blockIdx.x, half = p.n >> 1;
    const int j = blockIdx.y * REF_THREADS + threadIdx.x;
    if (j >= half) return;
    const int pair = p.perm[i];
    const int e = p.ids[pair];
    const bf16* x = p.x + (size_t)(pair / p.top_k) * p.k;
    const uint8_t* wg = p.w + ((size_t)e * p.n + j) * p.k;
    const uint8_t* wu = p.w + ((size_t)e * p.n + half + j) * p.k;
    float gs = 0.f, us = 0.f;
    for (int c = 0; c < p.k; ++c) {
        const float xv = __bfloat162float(x[c]);
        gs += xv * e4m3_value(wg[c]);
        us += xv * e4m3_value(wu[c]);
    }
    const float* sc = p.scales + (size_t)e * p.n;
    const float gv = round_bf16(gs * sc[j]), uv = round_bf16(us * sc[half + j]);
    static_cast<bf16*>(p.y)[(size_t)i * half + j] = __float2bfloat16(round_bf16(gv / (1.f + expf(-gv))) * uv);
}

// Reference: thread (position blockIdx.x, column blockIdx.y·128 + tid) of y.
extern "C" __global__ void __launch_bounds__(REF_THREADS) moe_down_fp8_ref_f32(const MoeFp8Params p) {
    pdl_wait();
    pdl_trigger();
    const int i = blockIdx.x;
    const int col = blockIdx.y * REF_THREADS + threadIdx.x;
    if (col >= p.n) return;
    const int e = p.ids[p.perm[i]];
    const bf16* a = p.x + (size_t)i * p.k;
    const uint8_t* w = p.w + ((size_t)e * p.n + col) * p.k;
    float s = 0.f;
    for (int c = 0; c < p.k; ++c) s += __bfloat162float(a[c]) * e4m3_value(w[c]);
    static_cast<float*>(p.y)[(size_t)i * p.n + col] = s * p.scales[(size_t)e * p.n + col];
}
