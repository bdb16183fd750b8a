// L2 prefetch of weights a later kernel will read: a hint, it changes no value.
//
// A decode step at 32 rows leaves DRAM mostly idle between two GEMMs (RoPE, attention and the
// quantisers are latency-bound), so the next GEMMs' weights can be pulled into L2 in that gap.
// Each region is cut into chunks; chunk i of a region is prefetched when i % period < take, so
// a region can be taken whole (period 1) or a fraction of it spread evenly over its rows (every
// tile of the GEMM that reads it then finds the same share in L2).
//
// l2_prefetch: one thread per chunk, grid-stride. sm_90: one `cp.async.bulk.prefetch.L2` per
// chunk (the TMA engine does the rest; nothing waits for it). Older GPUs: `prefetch.global.L2`
// per 128-byte line.
#include "common.cuh"

#define PF_MAX_REGIONS 4

struct PrefetchRegion {
    const unsigned char* base;  // 16-byte aligned
    unsigned long long bytes;   // a multiple of 16
    unsigned int chunk;         // bytes per prefetch: a multiple of 16
    unsigned int period;        // >= 1
    unsigned int take;          // 1..=period
    unsigned int selected;      // chunks of this region prefetched (the host counts them)
};

struct PrefetchParams {
    PrefetchRegion r[PF_MAX_REGIONS];
    int n_regions;
    int pad;
};

__device__ __forceinline__ void prefetch_chunk(const unsigned char* p, unsigned int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#else
    for (unsigned int o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p + o));
#endif
}

extern "C" __global__ void __launch_bounds__(32) l2_prefetch(const PrefetchParams p) {
    // The prefetch reads no output of the kernel before it and writes nothing, but the kernel
    // after it waits for this one's completion as its stand-in for the one before: wait first.
    pdl_wait();
    pdl_trigger();
    unsigned long long total = 0;
#pragma unroll
    for (int i = 0; i < PF_MAX_REGIONS; ++i)
        if (i < p.n_regions) total += p.r[i].selected;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long j = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; j < total; j += stride) {
        unsigned long long k = j;
        int ri = 0;
        while (ri + 1 < p.n_regions && k >= p.r[ri].selected) k -= p.r[ri++].selected;
        const PrefetchRegion& r = p.r[ri];
        const unsigned long long chunk = (k / r.take) * r.period + k % r.take;
        const unsigned long long off = chunk * r.chunk;
        if (off >= r.bytes) continue;  // the host's count never gets here
        const unsigned long long left = r.bytes - off;
        prefetch_chunk(r.base + off, (unsigned int)(left < r.chunk ? left : r.chunk));
    }
}
