// W8A16 skinny GEMM on Hopper's warpgroup MMA (sm_90a): Y[t, n] = X[t, k] · dequant(W[n, k])ᵀ
// (+ bias[n]) for t ≤ 64, W in E4M3 with f32 scales, X bf16, f32 accumulation — the same
// contract, tiling, pipeline and epilogue as kernels/gemm_fp8.cu (read it first); only the
// multiply differs.
//
// Why: the mma.sync kernel multiplies each weight into t rows with m16n8k16 instructions that
// the warps issue one by one, and at t = 32 it streamed W at 1.3-1.7 TB/s on an H100 (half its
// bytes per weight, but the bf16 kernel's per-weight instruction stream). Here each warpgroup
// (4 warps) owns 64 W rows and issues one `wgmma.mma_async.m64nNk16` (N = 8·NT ≥ t) per 16
// columns: the tensor cores run it asynchronously, reading the X tile straight from shared
// memory through a matrix descriptor, while the warps only dequantise W.
//
// - A operand (W, M = 64 rows per warpgroup) from registers, in the m16n8k16 A-fragment layout
//   per warp: thread (g = lane/4, q = lane%4) of warp w holds rows 16w + g and 16w + g + 8,
//   columns 2q, 2q+1 and 2q+8, 2q+9 of the k16 step. Its bytes are read with one 16-byte
//   shared load per row and step (the 16 codes of the step; the 4 threads of a quad read the
//   same 16 bytes, a broadcast), picked into place with a byte permute and dequantised exactly
//   as in gemm_fp8.cu (fp8.cuh: the code's bits as a bf16 read q·2⁻¹²⁰, times 2¹²⁰ or 2¹²⁰·s).
//   W shared rows are 128 bytes with the 16-byte chunk index XOR-swizzled by row % 8, so the 8
//   rows a warp reads at one step hit 8 different bank groups.
// - B operand (X, N = 8·NT rows, K-major) from shared memory in the canonical no-swizzle
//   layout: 8-row × 16-byte core matrices of 128 contiguous bytes, core (row group a, column
//   chunk c) at (16a + c)·128; the descriptor's leading byte offset (next core matrix along K)
//   is 128 and its stride byte offset (next along N) 2048. Step s starts 2s core matrices in.
// - Per stage, in two halves of 4 steps: the half's A fragments are built (16 registers),
//   then `wgmma.fence`, its 4 MMAs and a commit, so the first half multiplies while the second
//   is dequantised; a wait for both groups ends the stage before its shared slot can be
//   refilled (the next iteration's copies target the slot read one stage earlier).
//
// Entry points gemm_fp8_wgmma{8,16,32,64}_bf16 and gemm_fp8_wgmma{..}_swiglu_bf16 (warpgroup 0:
// the 64 gate rows, warpgroup 1: the 64 matching up rows), 256 threads, dynamic shared memory
// STAGES × (16 KB + 256·8·NT B) as gemm_fp8.cu's Tile8 (the wrapper mirrors it). Built for
// sm_90a only; on other targets the entry points trap (the wrapper never launches them there).
#include "fp8.cuh"

// Everything below is sm_90a code; other targets get trapping entry points.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DEMASK_WGMMA 1
#endif

namespace {

#ifdef DEMASK_WGMMA

template <int NT>
struct TileW {
    static constexpr int TP = 8 * NT;  // X rows staged (N of the MMA; zero beyond t)
    static constexpr int STAGES = NT == 8 ? 3 : (NT == 4 ? 4 : 5);
    static constexpr int W_BYTES = BN * BK;
    static constexpr int STAGE_BYTES = W_BYTES + TP * BK * 2;
    static constexpr int SMEM = STAGES * STAGE_BYTES;
    static_assert(SMEM >= TP * BN * 4, "the reduction tile must fit the ring");
    static_assert(STAGE_BYTES % 1024 == 0, "stage slots stay 1 KB aligned");
};

// Byte offset of 16-byte chunk c (8 columns) of X row r in the no-swizzle canonical layout.
__device__ __forceinline__ int wg_x_off(int r, int c) { return ((r >> 3) * (BK / 8) + c) * 128 + (r & 7) * 16; }

// X copies: consecutive threads fill the 8 rows of one core matrix (contiguous shared bytes).
template <int NT>
__device__ __forceinline__ void wg_load_x(const Fp8SkinnyParams& p, uint8_t* st, int kb, int k1) {
    using T = TileW<NT>;
    constexpr int CPR = BK / 8;  // 16-byte chunks per X row
    uint8_t* xs = st + T::W_BYTES;
#pragma unroll
    for (int u = 0; u < (T::TP * CPR + THREADS - 1) / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS;
        if (i < T::TP * CPR) {
            const int r = (i / (8 * CPR)) * 8 + (i & 7), c = (i >> 3) % CPR;
            const int gk = kb + 8 * c;
            const bool ok = r < p.t && gk < k1;
            const bf16* src = ok ? p.x + (size_t)r * p.k + gk : p.x;
            cp_async16(smem_u32(xs + wg_x_off(r, c)), src, ok);
        }
    }
}

// Shared-memory matrix descriptor (no swizzle): start address, leading byte offset 128 (the
// next core matrix along K), stride byte offset 2048 (the next along N), all >> 4.
__device__ __forceinline__ uint64_t x_desc(uint32_t addr) {
    return (uint64_t)((addr >> 4) & 0x3FFF) | ((uint64_t)(128 >> 4) << 16) | ((uint64_t)(2048 >> 4) << 32);
}

__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait0() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// d (N/2 f32 per thread) += A (4 bf16x2 registers) · B (descriptor), m64nNk16, scale-d = 1.
template <int N>
__device__ __forceinline__ void wgmma_rs(float* d, const uint32_t (&a)[4], uint64_t desc);

template <>
__device__ __forceinline__ void wgmma_rs<8>(float* d, const uint32_t (&a)[4], uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma_rs<16>(float* d, const uint32_t (&a)[4], uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma_rs<32>(float* d, const uint32_t (&a)[4], uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma_rs<64>(float* d, const uint32_t (&a)[4], uint64_t desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

// Keeps the compiler from moving accesses of the accumulators across the asynchronous MMAs.
template <int N>
__device__ __forceinline__ void fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The MMAs read their A registers asynchronously: this keeps those registers (and their
// values) untouched until after the wait that follows them.
__device__ __forceinline__ void fence_a(uint32_t (&a)[BK / 16][4]) {
#pragma unroll
    for (int s = 0; s < BK / 16; ++s)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[s][i])::"memory");
}

// One bf16x2 A register from 16 codes (bytes of v0, v1: columns 0..7 of the step, or of v2,
// v3: columns 8..15): codes 2q, 2q+1 into the high bytes of its halves (`sel`), the low bytes
// are don't-cares (the masks below drop them), then dequantised as fp8.cuh's dequant4.
__device__ __forceinline__ uint32_t wg_dequant2(uint32_t v0, uint32_t v1, uint32_t sel, uint32_t mult) {
    const uint32_t h = __byte_perm(v0, v1, sel);
    return bf16x2_mul((h & 0x80008000u) | ((h >> 4) & 0x07F007F0u), mult);
}

template <int NT, bool SWIGLU>
__device__ __forceinline__ void wgmma_body(const Fp8SkinnyParams& p) {
    using T = TileW<NT>;
    constexpr int N = T::TP;
    extern __shared__ __align__(1024) uint4 smem_raw[];
    uint8_t* ring = reinterpret_cast<uint8_t*>(smem_raw);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const int wg = warp >> 2;                 // warpgroup: W rows [64·wg, +64) of the block
    const int row0 = 64 * wg + 16 * (warp & 3) + g;  // this thread's first A row (and row0 + 8)
    const int n0 = blockIdx.x * BN;
    const int k0 = blockIdx.y * p.k_split;
    const int k1 = min(p.k, k0 + p.k_split);
    const int nst = k1 > k0 ? (k1 - k0 + BK - 1) / BK : 0;
    // Byte selector: codes 2q, 2q+1 of 8 into bytes 1 and 3 (bytes 0 and 2: the same codes).
    const uint32_t sel = (uint32_t)(2 * q) * 0x0011u | (uint32_t)(2 * q + 1) * 0x1100u;

    float acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;

#pragma unroll
    for (int s = 0; s < T::STAGES - 1; ++s)
        if (s < nst) load_w<SWIGLU, WSwizzle::Row8>(p, ring + s * T::STAGE_BYTES, n0, k0 + s * BK, k1);
    pdl_wait();
    pdl_trigger();
#pragma unroll
    for (int s = 0; s < T::STAGES - 1; ++s) {
        if (s < nst) wg_load_x<NT>(p, ring + s * T::STAGE_BYTES, k0 + s * BK, k1);
        cp_async_commit();
    }
    for (int it = 0; it < nst; ++it) {
        cp_async_wait<T::STAGES - 2>();
        __syncthreads();
        const int nx = it + T::STAGES - 1;
        if (nx < nst) {
            uint8_t* st = ring + (nx % T::STAGES) * T::STAGE_BYTES;
            load_w<SWIGLU, WSwizzle::Row8>(p, st, n0, k0 + nx * BK, k1);
            wg_load_x<NT>(p, st, k0 + nx * BK, k1);
        }
        cp_async_commit();
        const uint8_t* st = ring + (it % T::STAGES) * T::STAGE_BYTES;
        const uint32_t mult = stage_mult<SWIGLU>(p, n0, 64 * wg, k0 + it * BK);
        const uint32_t xb = smem_u32(st + T::W_BYTES);
        // Two halves of 4 steps, each its own commit group: the tensor cores multiply the
        // first half while the warps dequantise the second (into other registers).
        uint32_t a[BK / 16][4];
        fence_acc<N>(acc);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int s = 4 * h; s < 4 * h + 4; ++s) {
                const uint4 lo = *reinterpret_cast<const uint4*>(st + w_off_as<WSwizzle::Row8>(row0, s));
                const uint4 hi = *reinterpret_cast<const uint4*>(st + w_off_as<WSwizzle::Row8>(row0 + 8, s));
                a[s][0] = wg_dequant2(lo.x, lo.y, sel, mult);  // row g,     columns 2q, 2q+1
                a[s][1] = wg_dequant2(hi.x, hi.y, sel, mult);  // row g + 8, columns 2q, 2q+1
                a[s][2] = wg_dequant2(lo.z, lo.w, sel, mult);  // row g,     columns 2q+8, 2q+9
                a[s][3] = wg_dequant2(hi.z, hi.w, sel, mult);  // row g + 8, columns 2q+8, 2q+9
            }
            wg_fence();
#pragma unroll
            for (int s = 4 * h; s < 4 * h + 4; ++s) wgmma_rs<N>(acc, a[s], x_desc(xb + 2 * s * 128));
            wg_commit();
        }
        wg_wait0();
        fence_a(a);
        fence_acc<N>(acc);
    }

    // Accumulators → red[x row][W row] (one k group), then the shared epilogue.
    cp_async_wait<0>();
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem_raw);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            red[(8 * j + 2 * q + (e & 1)) * BN + row0 + 8 * (e >> 1)] = acc[4 * j + e];
    __syncthreads();
    fp8_finish<T::TP, 1, SWIGLU>(p, red, n0);
}

#endif  // DEMASK_WGMMA

}  // namespace

// sm_90a only: src/ops/gemm_fp8.rs launches these on compute capability 9.0 only.
#ifdef DEMASK_WGMMA
#define WG_BODY(NT, SWIGLU) wgmma_body<NT, SWIGLU>(p)
#else
#define WG_BODY(NT, SWIGLU) __trap()
#endif

#define WG_ENTRY(name, NT, SWIGLU) \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) name(const Fp8SkinnyParams p) { WG_BODY(NT, SWIGLU); }
WG_ENTRY(gemm_fp8_wgmma8_bf16, 1, false)
WG_ENTRY(gemm_fp8_wgmma16_bf16, 2, false)
WG_ENTRY(gemm_fp8_wgmma32_bf16, 4, false)
WG_ENTRY(gemm_fp8_wgmma64_bf16, 8, false)
WG_ENTRY(gemm_fp8_wgmma8_swiglu_bf16, 1, true)
WG_ENTRY(gemm_fp8_wgmma16_swiglu_bf16, 2, true)
WG_ENTRY(gemm_fp8_wgmma32_swiglu_bf16, 4, true)
WG_ENTRY(gemm_fp8_wgmma64_swiglu_bf16, 8, true)
