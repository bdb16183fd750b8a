// W8A8 decode GEMM, stream-K: y[t, n] = sx[r]·sw[c]·Σ_k qx[r, k]·qw[c, k] (+ bias[c]) for
// t ≤ 64, both operands E4M3, f32 accumulation, bf16 or f32 output; the gate|up entry points
// write SwiGLU's output. The contract and the output values are those of
// kernels/gemm_w8a8_skinny.cu (fp8.cuh's store_out / store_swiglu, here 8 columns at a time);
// what differs is how the weight reaches shared memory, how the work is spread and the
// multiply.
//
// Why: at decode row counts the GEMM only streams W, and the skinny kernels (and cuBLASLt's
// FP8 GEMM) stream it at 1.1-2.4 TB/s on an H100 where the copy ceiling is ≈ 3 TB/s
// (benches/RESULTS.md v0.12-v0.14). Their grids are n/128 slabs × a k split in waves of one or
// two blocks per SM: a slab count that does not divide into the SMs leaves some idle for the
// last wave, and each block ramps its pipeline up and drains it again. And their `mma.sync`
// E4M3 MMAs run far below the tensor cores' FP8 rate on Hopper: the skinny kernel takes twice
// as long at 64 rows as at 16, this kernel on `wgmma` 1.2× (v0.16).
//
// - Stream-K: the grid is one persistent block per SM (`gridDim.x` = G). The work is the
//   `tiles × ksteps` units (a 128-row W tile × one 128-column k step, 16 KB of codes), in
//   tile-major order, and block b takes the contiguous units [b·U/G, (b+1)·U/G): every block
//   streams the same number of bytes (±16 KB), whatever the shape.
// - A block's run crosses tiles: each stretch within one tile is a segment. A segment that
//   covers its whole tile is finished at once (epilogue from shared memory). Otherwise the
//   block owning the tile's last k step (its "home") adds the partial sums of the blocks
//   before it that hold the tile's other units ("contributors"), in block order, then its own,
//   and runs the epilogue. A block runs its contributed segment first and its home segment
//   last (RunOrder), so the contributors publish their parts (a workspace slot, then a release
//   flag, which the home consumes and resets) at the start of their runs, and the home finds
//   them written when it ends its own: no block waits on another at the end of the launch.
//   The sum order depends only on (n, k, G): results are deterministic per GPU model.
//   (Measured on the H100, v0.16: with the hand-over at the end of the runs, the fixup and
//   epilogue took 5-7 µs of a 25 µs LLaDA-8B qkv GEMM at 32 rows.)
// - Warp-specialised pipeline: one thread of warp 8 is the producer. It fills a STAGES-deep
//   ring through the TMA engine, three 2-D tensor copies per unit (two 64-row W boxes, the X
//   box of 8·NT rows; rows past n or t arrive as zeros) in its 128-byte swizzle, completing on
//   a per-slot mbarrier with a transaction count; the two consumer warpgroups wait on it,
//   multiply and release the slot on a second mbarrier. No __syncthreads in the main loop, and
//   up to STAGES × 16 KB of W in flight per SM.
// - The multiply: warpgroup w owns W rows [64w, 64w + 64) of each tile and issues four
//   `wgmma.mma_async` m64nNk32 E4M3 MMAs per unit (N = 8·NT ≥ t), both operands read from the
//   swizzled ring by descriptor. Each unit's MMAs start from zero and their sum is added to
//   the running f32 total: the FP8 tensor cores' internal accumulator is narrower than f32,
//   so it never sums more than 128 columns (cuBLASLt's default promotion interval).
//   (The first version copied 64-byte row halves with 1-D bulk copies: on the H100 the engine
//   took ≈ 35 ns per copy, 200-270 GB/s per GEMM; benches/RESULTS.md v0.15.)
// - Programmatic dependent launch: the W copies of the first STAGES units are issued before
//   the wait for the previous kernel (W does not depend on it); X, the row scales and every
//   global write come after.
//
// Workspace (`ws`, `flags`, owned by the wrapper): ws [G][64][128] f32 (slot b: block b's
// contributed segment), flags [G] u32, all zero between launches (every flag set in a launch
// is reset by its home in the same launch). Only one launch may use a workspace at a time (the
// engine's one stream; a launch's consumers wait for the previous kernel before any write).
//
// Entry points gemm_w8a8_stream{8,16,32,64}_bf16 and gemm_w8a8_stream{..}_swiglu_bf16 taking
// W8a8StreamArgs (the two tensor maps, encoded by the wrapper per launch: W as [n rows, k]
// bytes in 128 × 64 boxes, X as [t rows, k] in 128 × 8·NT boxes, both 128-byte swizzled),
// 288 threads, dynamic shared memory TileS<NT>::SMEM + 1 KB (the ring is aligned to 1 KB, as
// the swizzle needs; the wrapper mirrors it). Requirements (checked by
// src/ops/gemm_w8a8/stream.rs): k % 128 == 0, 16-byte aligned operands, channel scales,
// G ≤ units and G blocks co-resident (one per SM), an sm_90 GPU.
#include "fp8.cuh"

struct W8a8StreamParams {
    W8a8SkinnyParams g;  // k_split unused
    float* ws;           // [gridDim.x][64][128]
    unsigned* flags;     // [gridDim.x]
    int tiles;           // W tiles: ceil(n / 128) (SwiGLU: ceil(n/2 / 64), 64 gate + 64 up rows)
    int ksteps;          // k / 128
    int pad0;
    int pad1;
};

// A CUtensorMap (cuda.h), opaque here.
struct alignas(128) TmaDesc {
    uint64_t opaque[16];
};

struct W8a8StreamArgs {
    TmaDesc wmap;  // W codes [n][k]: box 128 columns × 64 rows
    TmaDesc xmap;  // X codes [t][k]: box 128 columns × 8·NT rows
    W8a8StreamParams sp;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DEMASK_BULK 1
#endif

namespace {

constexpr int CONSUMERS = 256;              // warps 0-7 multiply
constexpr int STREAM_THREADS = CONSUMERS + 32;  // warp 8 copies

template <int NT>
struct TileS {
    static constexpr int TP = 8 * NT;
    static constexpr int STAGES = NT == 8 ? 7 : 8;
    static constexpr int STAGE_BYTES = BN * BK + TP * BK;
    static constexpr int RING = STAGES * STAGE_BYTES;
    static constexpr int RED = TP * BN * 4;
    static constexpr int SMEM = RING + RED + 2 * STAGES * 8;
    static constexpr unsigned TX = STAGE_BYTES;  // bytes per unit (boxes count in full)
    static_assert(SMEM + 1024 <= 227 * 1024, "one block per SM");
    static_assert(STAGE_BYTES % 1024 == 0, "slots stay aligned to the swizzle's 1 KB");
};

#ifdef DEMASK_BULK

constexpr int WS_ROWS = 64;  // rows of a workspace slot
constexpr int HOME_LOADS = 4;  // contributor parts a home loads at once

__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
    asm volatile(
        "{\n"
        ".reg .pred P1;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\n"
        "bra WAIT;\n"
        "DONE:\n"
        "}\n" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
}
// The box at (column c, row r) of tensor map `map` into shared memory, counted on `bar`.
__device__ __forceinline__ void tma_2d(uint8_t* dst, const TmaDesc* map, int c, int r, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c), "r"(r), "r"(smem_u32(bar))
        : "memory");
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(CONSUMERS) : "memory"); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DEMASK_WGMMA_FP8 1
#endif

// Shared-memory matrix descriptor of a K-major operand in the TMA's 128-byte swizzle: start
// address, leading byte offset unused (1), stride byte offset 1024 (the next 8-row group),
// layout type 1 (128B swizzle). A k32 step starts 32 bytes further along the row.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
    return (uint64_t)((addr >> 4) & 0x3FFF) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

// d (N/2 f32 per thread) = (acc ? d : 0) + A · B, m64nNk32, both E4M3 operands from shared
// memory (A: 64 W rows, B: N X rows). sm_90a only.
template <int N>
__device__ __forceinline__ void wgmma_e4m3(float* d, uint64_t a, uint64_t b, int acc);

#ifdef DEMASK_WGMMA_FP8
template <>
__device__ __forceinline__ void wgmma_e4m3<8>(float* d, uint64_t a, uint64_t b, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, %4, %5, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(a), "l"(b), "r"(acc));
}
template <>
__device__ __forceinline__ void wgmma_e4m3<16>(float* d, uint64_t a, uint64_t b, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(a), "l"(b), "r"(acc));
}
template <>
__device__ __forceinline__ void wgmma_e4m3<32>(float* d, uint64_t a, uint64_t b, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(acc));
}
template <>
__device__ __forceinline__ void wgmma_e4m3<64>(float* d, uint64_t a, uint64_t b, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(acc));
}
#else
template <int N>
__device__ __forceinline__ void wgmma_e4m3(float*, uint64_t, uint64_t, int) {
    __trap();  // the warpgroup MMA needs sm_90a; the wrapper launches only there
}
#endif

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from moving accesses of the accumulators across the asynchronous MMAs.
template <int N>
__device__ __forceinline__ void fence_acc(float* d) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ int unit_start(int units, int b) { return (int)((long long)b * units / gridDim.x); }

// The order in which a block runs its units [u0, u1): first C = [s, u1), the start of the tile
// its run ends in (when the run ends inside a tile: a contributed segment), then F = [a1, s),
// the whole tiles, then H = [u0, a1), the end of the tile its run starts in (when it starts
// inside one: its home segment). So a contributor publishes its part at the start of its run
// and a home adds the others' parts at the end of its own, when they are long written: the
// hand-over leaves the tail of the launch.
struct RunOrder {
    int u0, a1, s, u1;
    __device__ __forceinline__ RunOrder(int units, int ksteps) {
        u0 = unit_start(units, blockIdx.x);
        u1 = unit_start(units, blockIdx.x + 1);
        s = u1 % ksteps == 0 ? u1 : max(u0, (u1 - 1) / ksteps * ksteps);
        a1 = u0 % ksteps == 0 ? u0 : min(s, (u0 / ksteps + 1) * ksteps);
    }
    __device__ __forceinline__ int count() const { return u1 - u0; }
    // The j-th unit the block runs.
    __device__ __forceinline__ int unit(int j) const {
        const int nc = u1 - s, nf = s - a1;
        return j < nc ? s + j : j < nc + nf ? a1 + (j - nc) : u0 + (j - nc - nf);
    }
};

// Warp 8, lane 0: fills the ring, three tensor copies per unit.
template <int NT, bool SWIGLU>
__device__ __forceinline__ void produce(const W8a8StreamArgs& a, uint8_t* ring, uint64_t* full, uint64_t* empty,
                                        const RunOrder& ord) {
    using T = TileS<NT>;
    const W8a8StreamParams& sp = a.sp;
    const int half = sp.g.n >> 1;
    auto copy_w = [&](int j) {
        const int u = ord.unit(j), tile = u / sp.ksteps, kb = (u % sp.ksteps) * BK, s = j % T::STAGES;
        uint8_t* st = ring + s * T::STAGE_BYTES;
        // Rows 0-63 and 64-127 of the tile (SwiGLU: 64 gate rows, then their up rows).
        const int r0 = SWIGLU ? 64 * tile : BN * tile, r1 = SWIGLU ? half + 64 * tile : BN * tile + 64;
        tma_2d(st, &a.wmap, kb, r0, full + s);
        tma_2d(st + 64 * BK, &a.wmap, kb, r1, full + s);
    };
    auto copy_x = [&](int j) {
        const int u = ord.unit(j), s = j % T::STAGES;
        tma_2d(ring + s * T::STAGE_BYTES + BN * BK, &a.xmap, (u % sp.ksteps) * BK, 0, full + s);
    };
    const int cnt = ord.count(), pre = min(T::STAGES, cnt);
    for (int j = 0; j < pre; ++j) {
        mbar_expect_tx(full + j, T::TX);
        copy_w(j);
    }
    pdl_wait();
    pdl_trigger();
    for (int j = 0; j < pre; ++j) copy_x(j);
    for (int j = pre; j < cnt; ++j) {
        const int s = j % T::STAGES;
        mbar_wait(empty + s, ((j / T::STAGES) - 1) & 1);
        mbar_expect_tx(full + s, T::TX);
        copy_w(j);
        copy_x(j);
    }
}

// n consecutive channel scales from column c (`n` columns exist): two 16-byte loads where c is
// 4-aligned and all 8 are in range, else one at a time (0 past the end).
__device__ __forceinline__ void channel8(const float* sw, int c, int n, float (&f)[8]) {
    if ((c & 3) == 0 && c + 8 <= n) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(sw + c)), b = __ldg(reinterpret_cast<const float4*>(sw + c) + 1);
        f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = c + i < n ? __ldg(sw + c + i) : 0.f;
    }
}

// Stores v[0..8) at columns c.. of row r of y (bf16, or f32 with p.out_f32; row length ld):
// 16-byte stores where the row allows them and all 8 columns exist (c < lim), else one by one.
__device__ __forceinline__ void store8_out(const W8a8SkinnyParams& p, size_t ld, int r, int c, int lim, const float (&v)[8]) {
    const size_t o = (size_t)r * ld + c;
    if (p.out_f32) {
        float* y = static_cast<float*>(p.y) + o;
        if ((o & 3) == 0 && c + 8 <= lim) {
            reinterpret_cast<float4*>(y)[0] = make_float4(v[0], v[1], v[2], v[3]);
            reinterpret_cast<float4*>(y)[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if (c + i < lim) y[i] = v[i];
        }
    } else {
        bf16* y = static_cast<bf16*>(p.y) + o;
        if ((o & 7) == 0 && c + 8 <= lim) {
            uint4 u;
            store8(reinterpret_cast<bf16*>(&u), v);
            *reinterpret_cast<uint4*>(y) = u;
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if (c + i < lim) y[i] = __float2bfloat16(v[i]);
        }
    }
}

// The epilogue of one tile from `sum8(i, v)`, which sets v to the f32 sums of elements
// i..i+7 (i a multiple of 8; element = (x row)·BN + (tile row)). The values are those of
// fp8.cuh's store_out / store_swiglu, but each thread takes 8 consecutive columns at a time,
// and every read of a thread (sums, scales, bias) is issued before its first store: at 64
// rows that is 4 (SwiGLU: 2) vectors a thread whose loads are in flight together, where one
// element at a time made the tile's epilogue 32 dependent round trips long.
template <bool SWIGLU, class F>
__device__ __forceinline__ void finish_tile(const W8a8SkinnyParams& p, int tile, F sum8) {
    if constexpr (SWIGLU) {
        constexpr int V = 64 * 64 / 8 / CONSUMERS;  // vectors per thread at t = 64
        const int half = p.n >> 1, c0 = 64 * tile, nv = p.t * 8;
        float o[V][8];
#pragma unroll
        for (int u = 0; u < V; ++u) {
            const int v = threadIdx.x + u * CONSUMERS, r = v >> 3, j = 8 * (v & 7);
            if (v < nv && c0 + j < half) {
                float g[8], up[8], fg[8], fu[8];
                sum8(r * BN + j, g);
                sum8(r * BN + 64 + j, up);
                channel8(p.scales, c0 + j, half, fg);
                channel8(p.scales + half, c0 + j, half, fu);
                const float sx = __ldg(p.sx + r);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float gv = round_bf16(g[i] * __fmul_rn(sx, fg[i]));
                    const float uv = round_bf16(up[i] * __fmul_rn(sx, fu[i]));
                    o[u][i] = round_bf16(gv / (1.f + expf(-gv))) * uv;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < V; ++u) {
            const int v = threadIdx.x + u * CONSUMERS, r = v >> 3, j = 8 * (v & 7);
            if (v < nv && c0 + j < half) store8_out(p, half, r, c0 + j, half, o[u]);
        }
    } else {
        constexpr int V = 64 * BN / 8 / CONSUMERS;
        const int n0 = BN * tile, nv = p.t * (BN / 8);
        float o[V][8];
#pragma unroll
        for (int u = 0; u < V; ++u) {
            const int v = threadIdx.x + u * CONSUMERS, r = v >> 4, c = n0 + 8 * (v & 15);
            if (v < nv && c < p.n) {
                float f[8], b[8];
                channel8(p.scales, c, p.n, f);
                sum8(8 * v, o[u]);
                if (p.bias) {
#pragma unroll
                    for (int i = 0; i < 8; ++i) b[i] = c + i < p.n ? __bfloat162float(p.bias[c + i]) : 0.f;
                }
                const float sx = __ldg(p.sx + r);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    float x = o[u][i] * __fmul_rn(sx, f[i]);
                    if (p.bias) x += b[i];
                    o[u][i] = x;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < V; ++u) {
            const int v = threadIdx.x + u * CONSUMERS, r = v >> 4, c = n0 + 8 * (v & 15);
            if (v < nv && c < p.n) store8_out(p, p.n, r, c, p.n, o[u]);
        }
    }
}

// v = the 8 floats at src + i (16-byte aligned).
__device__ __forceinline__ void smem8(const float* src, int i, float (&v)[8]) {
    const float4 a = reinterpret_cast<const float4*>(src + i)[0], b = reinterpret_cast<const float4*>(src + i)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void add_l2_8(const float* src, int i, float (&v)[8]) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(src + i)), b = __ldcg(reinterpret_cast<const float4*>(src + i) + 1);
    v[0] += a.x, v[1] += a.y, v[2] += a.z, v[3] += a.w, v[4] += b.x, v[5] += b.y, v[6] += b.z, v[7] += b.w;
}

// Warps 0-7 (two warpgroups, one per 64-row half of each tile): multiply each unit as it
// lands on the warpgroup MMA, finish or hand on each segment.
template <int NT, bool SWIGLU>
__device__ __forceinline__ void consume(const W8a8StreamParams& sp, uint8_t* ring, float* red, uint64_t* full,
                                        uint64_t* empty, const RunOrder& ord) {
    using T = TileS<NT>;
    const W8a8SkinnyParams& p = sp.g;
    constexpr int N = T::TP;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, q = lane & 3;
    const int wg = warp >> 2;                         // W rows [64·wg, +64) of each tile
    const int row0 = 64 * wg + 16 * (warp & 3) + g;   // this thread's accumulator rows row0, row0 + 8
    const int b = blockIdx.x, units = sp.tiles * sp.ksteps;
    pdl_wait();
    pdl_trigger();

    // Each unit's four k32 MMAs start from zero (`part`) and are added into `acc` in f32: the
    // FP8 tensor cores' own accumulator keeps fewer bits than f32, so it never sums more than
    // 128 columns (as cuBLASLt's default promotion).
    float acc[N / 2], part[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = part[i] = 0.f;
    int j = 0, home = -1;
    // Units [x, y) (C, F or H of RunOrder), segment by segment.
    auto run = [&](int x, int y) {
        for (int u = x; u < y;) {
            const int tile = u / sp.ksteps, tu0 = tile * sp.ksteps, tu1 = tu0 + sp.ksteps;
            const int seg0 = u, seg1 = min(y, tu1);
            for (; u < seg1; ++u, ++j) {
                const int s = j % T::STAGES;
                mbar_wait(full + s, (j / T::STAGES) & 1);
                const uint32_t st = smem_u32(ring + s * T::STAGE_BYTES);
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 32; ++kk)
                    wgmma_e4m3<N>(part, sw128_desc(st + wg * 64 * BK + 32 * kk), sw128_desc(st + BN * BK + 32 * kk), kk);
                wg_commit();
                wg_wait0();
                fence_acc<N>(part);
                mbar_arrive(empty + s);
#pragma unroll
                for (int i = 0; i < N / 2; ++i) acc[i] += part[i];
            }
            // acc → red[x row][tile row].
            consumer_sync();  // the previous segment's epilogue has read red
#pragma unroll
            for (int jj = 0; jj < N / 8; ++jj)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    red[(8 * jj + 2 * q + (e & 1)) * BN + row0 + 8 * (e >> 1)] = acc[4 * jj + e];
                    acc[4 * jj + e] = 0.f;
                }
            consumer_sync();
            if (seg0 == tu0 && seg1 == tu1) {
                finish_tile<SWIGLU>(p, tile, [&](int i, float(&v)[8]) { smem8(red, i, v); });
            } else if (seg1 == tu1) {
                home = tile;  // H, the run's last segment: its sums stay in red
            } else {
                // C: published in the block's workspace slot at once.
                float4* dst = reinterpret_cast<float4*>(sp.ws + (size_t)b * WS_ROWS * BN);
                for (int i = tid; i < p.t * BN / 4; i += CONSUMERS) dst[i] = reinterpret_cast<const float4*>(red)[i];
                // The barrier orders every thread's slot writes before thread 0's release
                // (cumulative at gpu scope), as CUTLASS's semaphores do: no fence per thread.
                consumer_sync();
                if (tid == 0) st_release(sp.flags + b, 1u);
            }
        }
    };
    run(ord.s, ord.u1);
    run(ord.a1, ord.s);
    run(ord.u0, ord.a1);
    if (home < 0) return;
    // The contributors to the home tile: blocks lo..b-1 (every block before b whose run ends
    // past the tile's first unit). They published at the start of their runs.
    const int tu0 = home * sp.ksteps;
    int lo = b;
    while (lo > 0 && unit_start(units, lo) > tu0) --lo;
    // One thread per contributor acquires its flag (all in parallel, not one L2 round trip
    // after another) and resets it; the barrier then orders their acquires before every
    // thread's reads of the slots.
    for (int c = lo + tid; c < b; c += CONSUMERS) {
        while (ld_acquire(sp.flags + c) != 1u) {
        }
        sp.flags[c] = 0u;
    }
    consumer_sync();
    const float* ws = sp.ws + (size_t)lo * WS_ROWS * BN;
    const int nc = b - lo;
    // The contributors' parts in block order, then the own part. Up to HOME_LOADS
    // contributors (every LLaDA-8B and Dream-7B shape on an H100), a straight-line path: every
    // load of a thread's vectors (parts, scales) can be in flight at once, one L2 round trip
    // where the loop over contributors took one per part and vector (most of the 4-7 µs the
    // hand-over cost in v0.16). More contributors (few units per block) add one by one.
    auto own = [&](int i, float(&v)[8]) {
        float o[8];
        smem8(red, i, o);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] += o[e];
    };
    if (nc <= HOME_LOADS) {
        finish_tile<SWIGLU>(p, home, [&](int i, float(&v)[8]) {
            float4 part[HOME_LOADS][2];
#pragma unroll
            for (int c = 0; c < HOME_LOADS; ++c)
                if (c < nc) {
                    const float4* src = reinterpret_cast<const float4*>(ws + (size_t)c * WS_ROWS * BN + i);
                    part[c][0] = __ldcg(src);
                    part[c][1] = __ldcg(src + 1);
                }
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = 0.f;
#pragma unroll
            for (int c = 0; c < HOME_LOADS; ++c)
                if (c < nc) {
                    v[0] += part[c][0].x, v[1] += part[c][0].y, v[2] += part[c][0].z, v[3] += part[c][0].w;
                    v[4] += part[c][1].x, v[5] += part[c][1].y, v[6] += part[c][1].z, v[7] += part[c][1].w;
                }
            own(i, v);
        });
    } else {
        finish_tile<SWIGLU>(p, home, [&](int i, float(&v)[8]) {
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = 0.f;
            for (int c = 0; c < nc; ++c) add_l2_8(ws + (size_t)c * WS_ROWS * BN, i, v);
            own(i, v);
        });
    }
}

#endif  // DEMASK_BULK

template <int NT, bool SWIGLU>
__device__ __forceinline__ void stream_body(const W8a8StreamArgs& a) {
#ifdef DEMASK_BULK
    using T = TileS<NT>;
    const W8a8StreamParams& sp = a.sp;
    extern __shared__ uint4 smem_raw[];
    uint8_t* base = reinterpret_cast<uint8_t*>(smem_raw);
    uint8_t* ring = base + ((1024 - (smem_u32(base) & 1023)) & 1023);
    float* red = reinterpret_cast<float*>(ring + T::RING);
    uint64_t* full = reinterpret_cast<uint64_t*>(ring + T::RING + T::RED);
    uint64_t* empty = full + T::STAGES;
    const RunOrder ord(sp.tiles * sp.ksteps, sp.ksteps);
    if (threadIdx.x == 0) {
        for (int s = 0; s < T::STAGES; ++s) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x >= CONSUMERS) {
        if (threadIdx.x == CONSUMERS) {
            // Fetch both descriptors ahead of the first copies that use them.
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&a.wmap)) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&a.xmap)) : "memory");
            produce<NT, SWIGLU>(a, ring, full, empty, ord);
        }
    } else {
        consume<NT, SWIGLU>(sp, ring, red, full, empty, ord);
    }
#else
    __trap();  // bulk copies and mbarrier transaction counts need sm_90; the wrapper refuses others
#endif
}

}  // namespace

#define STREAM_ENTRY(name, NT, SWIGLU)                                                        \
    extern "C" __global__ void __launch_bounds__(STREAM_THREADS, 1) name(const __grid_constant__ W8a8StreamArgs a) { \
        stream_body<NT, SWIGLU>(a);                                                           \
    }
STREAM_ENTRY(gemm_w8a8_stream8_bf16, 1, false)
STREAM_ENTRY(gemm_w8a8_stream16_bf16, 2, false)
STREAM_ENTRY(gemm_w8a8_stream32_bf16, 4, false)
STREAM_ENTRY(gemm_w8a8_stream64_bf16, 8, false)
STREAM_ENTRY(gemm_w8a8_stream8_swiglu_bf16, 1, true)
STREAM_ENTRY(gemm_w8a8_stream16_swiglu_bf16, 2, true)
STREAM_ENTRY(gemm_w8a8_stream32_swiglu_bf16, 4, true)
STREAM_ENTRY(gemm_w8a8_stream64_swiglu_bf16, 8, true)
