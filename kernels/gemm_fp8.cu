// W8A16 skinny GEMM: Y[t, n] = X[t, k] · dequant(W[n, k])ᵀ (+ bias[n]) for t ≤ 64, W in E4M3
// (one byte per weight) with f32 scales, X bf16, f32 accumulation, bf16 or f32 output. The
// design is kernels/gemm_skinny.cu's (read it first) with half the weight bytes:
//
// - A block owns BN = 128 W rows and one k range (split-K over gridDim.y as a thread-block
//   cluster reducing through distributed shared memory, sm_90). Stages of BK = 128 columns:
//   a 16 KB W tile (128 rows × 128 bytes, as the bf16 kernel's 64-column tile) and the X tile
//   (TP rows × 256 bytes) go global → shared with 16-byte cp.async through a STAGES-deep ring.
// - The MMA is the bf16 m16n8k16. Its A operand (W) is dequantised in registers straight from
//   the shared E4M3 bytes: 4 codes (one 32-bit word) become two bf16x2 by a byte permute, a
//   shift and two masks (the E4M3 bits placed in a bf16's exponent/mantissa fields read as
//   value · 2⁻¹²⁰, subnormals included), then one bf16x2 FMA by `mult` = 2¹²⁰ (channel
//   scales: exact) or 2¹²⁰ · bf16(s) (block scales: the operand is bf16(q · bf16(s))).
// - k order inside each 32-column pair of MMA k-steps is permuted the same way for A and B, so
//   a thread's fragments are contiguous: W row bytes [32p + 8q, +8) (one 8-byte load, both
//   k-steps) and X row columns [32p + 8q, +8) (one 16-byte load). The sum over k is the same.
//   Shared rows are XOR-swizzled so those loads are bank-conflict free (W: 16-byte chunk c of
//   row r at c ^ 2(r & 3); X: chunk c at c ^ 4(r & 1)).
// - Channel scales multiply the f32 result in the epilogue (after the split-K sum); block
//   scales (one per 128×128 block: a stage of a block is inside one scale block, n0 and every
//   k_split being multiples of 128) are folded into `mult` per stage and warp.
//
// Entry points gemm_fp8_skinny{8,16,32,64}_bf16 (NT = 1, 2, 4, 8 n-tiles; t ≤ 8·NT) and
// gemm_fp8_skinny{..}_swiglu_bf16 (gate|up with SwiGLU in the epilogue, as the bf16 kernel's;
// never split-K), 256 threads, dynamic shared memory Tile8<NT>::SMEM (the wrapper mirrors it).
// Requirements (checked by src/ops/gemm_fp8.rs): k % 16 == 0, 16-byte aligned x and w,
// k_split a multiple of 128; block scales with SwiGLU need ffn % 64 == 0.
#include "fp8.cuh"

namespace {

template <int NT>
__device__ __forceinline__ void load_x(const Fp8SkinnyParams& p, uint8_t* st, int kb, int k1) {
    using T = Tile8<NT>;
    constexpr int CPR = BK / 8;  // 16-byte chunks per X row
    uint8_t* xs = st + T::W_BYTES;
#pragma unroll
    for (int u = 0; u < (T::TP * CPR + THREADS - 1) / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        if (i < T::TP * CPR) {
            const int r = i / CPR, c = i % CPR;
            const int gk = kb + 8 * c;
            const bool ok = r < p.t && gk < k1;
            const bf16* src = ok ? p.x + (size_t)r * p.k + gk : p.x;
            cp_async16(smem_u32(xs + x_off(r, c)), src, ok);
        }
    }
}

template <int NT, bool SWIGLU>
__device__ __forceinline__ void fp8_body(const Fp8SkinnyParams& p) {
    using T = Tile8<NT>;
    extern __shared__ uint4 smem_raw[];
    uint8_t* ring = reinterpret_cast<uint8_t*>(smem_raw);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * BN;
    const int k0 = blockIdx.y * p.k_split;
    const int k1 = min(p.k, k0 + p.k_split);
    const int nst = k1 > k0 ? (k1 - k0 + BK - 1) / BK : 0;
    const int warp_row0 = 16 * (warp % T::MG) * T::MTW;

    float acc[T::MTW][NT][4];
#pragma unroll
    for (int mt = 0; mt < T::MTW; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

    // Prologue as the bf16 kernel's: W of the first STAGES - 1 stages before the
    // programmatic-launch wait, X (the previous kernel's output) after it.
#pragma unroll
    for (int s = 0; s < T::STAGES - 1; ++s)
        if (s < nst) load_w<SWIGLU, WSwizzle::Pairs>(p, ring + s * T::STAGE_BYTES, n0, k0 + s * BK, k1);
    pdl_wait();
    pdl_trigger();
#pragma unroll
    for (int s = 0; s < T::STAGES - 1; ++s) {
        if (s < nst) load_x<NT>(p, ring + s * T::STAGE_BYTES, k0 + s * BK, k1);
        cp_async_commit();
    }
    for (int it = 0; it < nst; ++it) {
        cp_async_wait<T::STAGES - 2>();
        __syncthreads();
        const int nx = it + T::STAGES - 1;
        if (nx < nst) {
            uint8_t* st = ring + (nx % T::STAGES) * T::STAGE_BYTES;
            load_w<SWIGLU, WSwizzle::Pairs>(p, st, n0, k0 + nx * BK, k1);
            load_x<NT>(p, st, k0 + nx * BK, k1);
        }
        cp_async_commit();
        const uint32_t mult = stage_mult<SWIGLU>(p, n0, warp_row0, k0 + it * BK);
        mma_stage<NT>(ring + (it % T::STAGES) * T::STAGE_BYTES, warp, lane, mult, acc);
    }

    // k-group partials → red[kg][x row][W row], summed in k-group order (as the bf16 kernel).
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

#define FP8_ENTRY(name, NT, SWIGLU) \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(const Fp8SkinnyParams p) { fp8_body<NT, SWIGLU>(p); }
FP8_ENTRY(gemm_fp8_skinny8_bf16, 1, false)
FP8_ENTRY(gemm_fp8_skinny16_bf16, 2, false)
FP8_ENTRY(gemm_fp8_skinny32_bf16, 4, false)
FP8_ENTRY(gemm_fp8_skinny64_bf16, 8, false)
FP8_ENTRY(gemm_fp8_skinny8_swiglu_bf16, 1, true)
FP8_ENTRY(gemm_fp8_skinny16_swiglu_bf16, 2, true)
FP8_ENTRY(gemm_fp8_skinny32_swiglu_bf16, 4, true)
FP8_ENTRY(gemm_fp8_skinny64_swiglu_bf16, 8, true)

// E4M3 quantisation on the device (bf16 in, as the CPU `quant` module): one block of 256
// threads per row (channel scales: s = max|w[r, :]| / 448, or 1 for a zero row) or per 128×128
// block (scales rounded up to bf16, see src/quant.rs), codes by __nv_cvt_float_to_fp8 (satfinite).
// Used to quantise weights synthesised on the GPU and as the device side of the encode parity
// test. Non-finite inputs are not checked here (the host path refuses them).

struct QuantParams {
    const bf16* w;   // [n, k]
    uint8_t* q;      // [n, k]
    float* scales;   // [n] or [ceil(n/128), ceil(k/128)]
    int n;
    int k;
    int block_scales;
    int pad;
};

__device__ __forceinline__ float bf16_ceil(float s) {
    const uint32_t b = __float_as_uint(s);
    return (b & 0xFFFFu) ? __uint_as_float((b & 0xFFFF0000u) + 0x10000u) : s;
}

extern "C" __global__ void __launch_bounds__(256) quantize_fp8_bf16(const QuantParams p) {
    __shared__ float scratch[32];
    const bool blk = p.block_scales != 0;
    const int kblocks = (p.k + BK - 1) / BK;
    // This block's rows [r0, r1) and columns [c0, c1).
    const int r0 = blk ? (int)(blockIdx.x / kblocks) * BN : (int)blockIdx.x;
    const int r1 = blk ? min(p.n, r0 + BN) : r0 + 1;
    const int c0 = blk ? (int)(blockIdx.x % kblocks) * BK : 0;
    const int c1 = blk ? min(p.k, c0 + BK) : p.k;
    const int w = c1 - c0, cnt = (r1 - r0) * w;
    float m = 0.f;
    for (int i = threadIdx.x; i < cnt; i += blockDim.x)
        m = fmaxf(m, fabsf(__bfloat162float(p.w[(size_t)(r0 + i / w) * p.k + c0 + i % w])));
    m = block_max(m, scratch);
    const float s = blk && m > 0.f ? bf16_ceil(e4m3_scale(m)) : e4m3_scale(m);
    if (threadIdx.x == 0) p.scales[blockIdx.x] = s;
    for (int i = threadIdx.x; i < cnt; i += blockDim.x) {
        const size_t o = (size_t)(r0 + i / w) * p.k + c0 + i % w;
        p.q[o] = (uint8_t)__nv_cvt_float_to_fp8(__bfloat162float(p.w[o]) / s, __NV_SATFINITE, __NV_E4M3);
    }
}

// The bare conversion, for the encode parity test: q[i] = e4m3(x[i]) (satfinite).
extern "C" __global__ void encode_e4m3_f32(const float* x, uint8_t* q, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) q[i] = (uint8_t)__nv_cvt_float_to_fp8(x[i], __NV_SATFINITE, __NV_E4M3);
}

// Per-row activation quantisation for the W8A8 path (src/ops/gemm_w8a8.rs): row r of x
// [t, k] bf16 → q[r, :] = e4m3(x / s[r]) with s[r] = max|x[r, :]| / 448 (1 for a zero row),
// exactly as `quant::Fp8Matrix::quantize_bf16` with channel scales. One block per row.
struct RowQuantParams {
    const bf16* x;  // [>= t, k]
    uint8_t* q;     // [>= t, k]
    float* s;       // [>= t]
    int t;
    int k;
};

extern "C" __global__ void __launch_bounds__(256) quantize_rows_fp8_bf16(const RowQuantParams p) {
    __shared__ float scratch[32];
    pdl_wait();
    pdl_trigger();
    const int r = blockIdx.x;
    const bf16* xr = p.x + (size_t)r * p.k;
    float m = 0.f;
    for (int i = threadIdx.x; i < p.k; i += blockDim.x) m = fmaxf(m, fabsf(__bfloat162float(xr[i])));
    m = block_max(m, scratch);
    const float s = e4m3_scale(m);
    if (threadIdx.x == 0) p.s[r] = s;
    uint8_t* qr = p.q + (size_t)r * p.k;
    for (int i = threadIdx.x; i < p.k; i += blockDim.x)
        qr[i] = (uint8_t)__nv_cvt_float_to_fp8(__bfloat162float(xr[i]) / s, __NV_SATFINITE, __NV_E4M3);
}

// The same quantiser for k % 8 == 0 and k <= 8 · QV_THREADS · QV_VPT (every W8A8 shape of the
// supported models): the row is read once, as 16-byte vectors kept in registers across the
// max and the encode, and the codes leave as 8-byte stores. Same values as
// quantize_rows_fp8_bf16 (the max does not depend on order; each code on its element only).
#define QV_THREADS 512
#define QV_VPT 8
extern "C" __global__ void __launch_bounds__(QV_THREADS) quantize_rows_vec_fp8_bf16(const RowQuantParams p) {
    __shared__ float scratch[32];
    pdl_wait();
    pdl_trigger();
    const int r = blockIdx.x, vecs = p.k >> 3;
    const uint4* x4 = reinterpret_cast<const uint4*>(p.x + (size_t)r * p.k);
    uint4 v[QV_VPT];
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < QV_VPT; ++j) {
        const int i = threadIdx.x + j * QV_THREADS;
        if (i < vecs) v[j] = __ldcs(x4 + i);
    }
#pragma unroll
    for (int j = 0; j < QV_VPT; ++j) {
        if (threadIdx.x + j * QV_THREADS < vecs) {
            float f[8];
            load8(reinterpret_cast<const bf16*>(&v[j]), f);
#pragma unroll
            for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(f[e]));
        }
    }
    m = block_max(m, scratch);
    const float s = e4m3_scale(m);
    if (threadIdx.x == 0) p.s[r] = s;
    uint2* q8 = reinterpret_cast<uint2*>(p.q + (size_t)r * p.k);
#pragma unroll
    for (int j = 0; j < QV_VPT; ++j) {
        const int i = threadIdx.x + j * QV_THREADS;
        if (i < vecs) {
            float f[8];
            load8(reinterpret_cast<const bf16*>(&v[j]), f);
            uint32_t c[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) c[e] = (uint32_t)__nv_cvt_float_to_fp8(f[e] / s, __NV_SATFINITE, __NV_E4M3);
            q8[i] = make_uint2(c[0] | c[1] << 8 | c[2] << 16 | c[3] << 24, c[4] | c[5] << 8 | c[6] << 16 | c[7] << 24);
        }
    }
}
