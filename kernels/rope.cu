// Rotate-half RoPE (head_dim 128) of q and k plus the kv_store, one block per live row:
//   q heads are rotated in place in qkv; rotated k goes to k_cache[cache_rows[r]];
//   v is copied unchanged to v_cache[cache_rows[r]].
// qkv row = [q: n_heads*128 | k: n_kv_heads*128 | v: n_kv_heads*128].
// inv_freq[i] = 1 / theta^(2i/128) as the correctly rounded f32 (computed through f64 so the
// CPU reference gets the same bits), angle = f32(pos) * inv_freq[i] in f32, precise sincosf.
// mode 0 (LLaDA): f32 rotation, one rounding to bf16.
// mode 1 (Dream / HF Qwen2 in bf16): c = bf16(cos), s = bf16(sin),
//   y[i] = bf16( bf16(x[i]*c) + bf16(-x[i+64]*s) ), y[i+64] = bf16( bf16(x[i+64]*c) + bf16(x[i]*s) ).
#include "common.cuh"

#define ROPE_HEAD_DIM 128
#define ROPE_HALF 64

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
};

extern "C" __global__ void rope_kv_store_bf16(const RopeParams p) {
    __shared__ float cs[ROPE_HALF], sn[ROPE_HALF];
    const int row = blockIdx.x;
    const uint32_t pos = p.positions[row];
    const uint32_t crow = p.cache_rows[row];
    if (crow >= (uint32_t)p.cache_cap) __trap();  // the host validates cache rows: this is a bug
    for (int t = threadIdx.x; t < ROPE_HALF; t += blockDim.x) {
        const float inv = (float)(1.0 / pow((double)p.theta, (double)(2 * t) / ROPE_HEAD_DIM));
        const float ang = (float)pos * inv;
        float s, c;
        sincosf(ang, &s, &c);
        if (p.mode == 1) {
            c = round_bf16(c);
            s = round_bf16(s);
        }
        cs[t] = c;
        sn[t] = s;
    }
    __syncthreads();

    const int qkv_dim = (p.n_heads + 2 * p.n_kv_heads) * ROPE_HEAD_DIM;
    const int kv_dim = p.n_kv_heads * ROPE_HEAD_DIM;
    bf16* src_row = p.qkv + (int64_t)row * qkv_dim;
    const int n_rot = (p.n_heads + p.n_kv_heads) * 8;  // 8 items of 8 pairs per rotated head
    const int n_items = n_rot + p.n_kv_heads * (ROPE_HEAD_DIM / 8);
    for (int w = threadIdx.x; w < n_items; w += blockDim.x) {
        if (w < n_rot) {
            const int h = w >> 3;
            const int i0 = (w & 7) * 8;
            const bf16* src = src_row + h * ROPE_HEAD_DIM;
            bf16* dst = h < p.n_heads
                ? src_row + h * ROPE_HEAD_DIM
                : p.k_cache + (int64_t)crow * kv_dim + (h - p.n_heads) * ROPE_HEAD_DIM;
            float a[8], b[8], y1[8], y2[8];
            load8(src + i0, a);
            load8(src + ROPE_HALF + i0, b);
            if (p.mode == 1) {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float c = cs[i0 + i], s = sn[i0 + i];
                    y1[i] = round_bf16(a[i] * c) + round_bf16(-b[i] * s);
                    y2[i] = round_bf16(b[i] * c) + round_bf16(a[i] * s);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float c = cs[i0 + i], s = sn[i0 + i];
                    y1[i] = a[i] * c - b[i] * s;
                    y2[i] = b[i] * c + a[i] * s;
                }
            }
            store8(dst + i0, y1);
            store8(dst + ROPE_HALF + i0, y2);
        } else {
            const int c = w - n_rot;  // 16-byte vector of the v part
            const uint4 x = reinterpret_cast<const uint4*>(src_row + (p.n_heads + p.n_kv_heads) * ROPE_HEAD_DIM)[c];
            reinterpret_cast<uint4*>(p.v_cache + (int64_t)crow * kv_dim)[c] = x;
        }
    }
}
