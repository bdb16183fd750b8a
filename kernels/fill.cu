// Device-side fills. fill_normal_bf16 synthesises random weights without a host copy: the
// value at index i depends only on (seed, i) (counter-based hash + Box-Muller), never on the
// launch configuration. fill_const_bf16 poisons / sets buffers. Both write 16-byte vectors,
// grid-stride, with a scalar tail when n % 8 != 0.
#include "common.cuh"

struct FillNormalParams {
    bf16* out;
    uint64_t n;
    uint64_t seed;
    float mean;
    float std;
};

struct FillConstParams {
    bf16* out;
    uint64_t n;
    float value;
};

// splitmix64 finaliser: a bijective 64-bit mix.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Bits `b` (at most 23 used, from the top of a 32-bit field shifted into place by the caller)
// in the mantissa: 1.m - 1 is uniform in [0, 1).
__device__ __forceinline__ float unit_mantissa(uint32_t mantissa23) {
    return __uint_as_float(0x3f800000u | mantissa23) - 1.0f;
}

// One Box-Muller pair from a 32-bit word: 20 bits for the radius (u1 in (0, 1), so the
// tails reach 5.27 std), 12 bits for the angle (finer than bf16 resolves).
// Fast intrinsics are fine here: the angle is in [-pi, pi) and u1 in (0, 1).
__device__ __forceinline__ void box_muller(uint32_t w, float mean, float std, float* z) {
    const float u1 = unit_mantissa((w >> 12) << 3) + 0x1p-21f;
    const float u2 = unit_mantissa((w & 0xfffu) << 11);
    const float r2 = fmaxf(-2.f * __logf(u1), 1e-30f);  // lg2.approx may round to 0 near 1
    const float r = r2 * rsqrtf(r2) * std;
    float s, c;
    __sincosf(6.28318530717958647692f * u2 - 3.14159265358979323846f, &s, &c);
    z[0] = fmaf(r, c, mean);
    z[1] = fmaf(r, s, mean);
}

// Eight normals for vector `v` (indices 8v .. 8v+7): two splitmix64 outputs (the stream of
// counter 2v, 2v+1 from `key`), one 32-bit word per Box-Muller pair.
__device__ __forceinline__ void normal8(uint64_t key, uint64_t v, float mean, float std, float* z) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const uint64_t h = mix64(key + (2 * v + j) * 0x9e3779b97f4a7c15ull);
        box_muller((uint32_t)h, mean, std, z + 4 * j);
        box_muller((uint32_t)(h >> 32), mean, std, z + 4 * j + 2);
    }
}

extern "C" __global__ void fill_normal_bf16(const FillNormalParams p) {
    const uint64_t key = mix64(p.seed ^ 0x6a09e667f3bcc909ull);
    const uint64_t nvec = p.n >> 3;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    float z[8];
    for (uint64_t v = tid; v < nvec; v += stride) {
        normal8(key, v, p.mean, p.std, z);
        store8(p.out + v * 8, z);
    }
    if (tid == 0 && (p.n & 7)) {
        normal8(key, nvec, p.mean, p.std, z);
        for (uint64_t i = nvec * 8; i < p.n; ++i) p.out[i] = __float2bfloat16(z[i - nvec * 8]);
    }
}

extern "C" __global__ void fill_const_bf16(const FillConstParams p) {
    const uint64_t nvec = p.n >> 3;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const __nv_bfloat162 h = __float2bfloat162_rn(p.value);
    uint32_t w;
    memcpy(&w, &h, 4);
    const uint4 x = make_uint4(w, w, w, w);  // a uint4, so the store is one 16-byte access
    for (uint64_t v = tid; v < nvec; v += stride) reinterpret_cast<uint4*>(p.out)[v] = x;
    for (uint64_t i = nvec * 8 + tid; i < p.n; i += stride) p.out[i] = h.x;
}
