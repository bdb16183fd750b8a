// Commit policy per sequence (DESIGN.md §4), mirroring src/decode/policy.rs: rank the eligible
// slots by confidence descending (ties → lower position; NaN ranks as −inf), count k by the
// sequence's count rule exactly as Policy::commit_count (at least 1, except Dream's count, which
// may be 0; the rule numbers are ops::commit::CountRule's), write the k committed
// tokens into the device canvas, and leave a compact
// commit list (rank order) for the host.
//
// commit_u32: one block per sequence. Output `out` (u32):
//   out[s]                              = k of sequence s
//   out[n_seqs + 2*(slot_offset + r)]   = position of rank r (every r < slot_count is written)
//   out[n_seqs + 2*(slot_offset + r)+1] = its token
// ranked_conf[slot_offset + r] = confidence of rank r.
#include "common.cuh"

#include <math_constants.h>

// Mirrors SeqCommitParams in src/ops/commit.rs (48 bytes).
struct CommitSeq {
    int slot_offset;        // first slot of this sequence in the slot arrays
    int slot_count;         // its eligible slots
    int policy;             // count rule: 0 schedule, 2 threshold (>= τ), 3 threshold or schedule,
                            // 4 factor prefix, 5 dream count, 6 max(#{> τ}, schedule of block_len)
    float tau;              // rules 2, 3, 6
    float factor;           // rule 4
    unsigned steps;         // rules 0, 3, 5, 6
    unsigned ctx_step;      // StepCtx.step
    unsigned block_masked;  // StepCtx.block_masked
    unsigned masked;        // StepCtx.masked
    int canvas_row;         // canvas row this sequence writes
    unsigned block_len;     // StepCtx.block_len: the slots of the block (rule 6 splits it)
    int pad1;
};

// Mirrors CommitParams in src/ops/commit.rs.
struct CommitParams {
    uint64_t seqs;         // const CommitSeq* [n_seqs]
    uint64_t positions;    // const unsigned* [n_slots]
    uint64_t tokens;       // const unsigned* [n_slots]
    uint64_t conf;         // const float* [n_slots]
    uint64_t canvas;       // unsigned* [canvas_rows, canvas_stride]
    uint64_t out;          // unsigned* [n_seqs + 2 * n_slots]
    uint64_t ranked_conf;  // float* [n_slots]
    int n_seqs;
    int n_slots;
    int canvas_stride;
    int canvas_rows;
};

#define COMMIT_THREADS 256
#define COMMIT_TILE 1024

__device__ __forceinline__ float rank_key(float c) { return isnan(c) ? -CUDART_INF_F : c; }

// LLaDA's get_num_transfer_tokens: m / S + (i < m % S), S = max(steps, 1).
__device__ __forceinline__ unsigned schedule_count(unsigned m, unsigned steps, unsigned i) {
    const unsigned s = steps > 1u ? steps : 1u;
    return m / s + (i < m % s ? 1u : 0u);
}

// torch.linspace(1, 1e-3, n)[j] in f32 as PyTorch's CPU kernel computes it (policy::dream_timestep):
// step = (end − start) / (n − 1); first half fma(step, j, start), second fma(−step, n − 1 − j, end).
__device__ __forceinline__ float dream_timestep(unsigned n, unsigned j) {
    const float start = 1.0f, end = 1e-3f;
    if (n <= 1u) return start;
    const float step = __fdiv_rn(__fsub_rn(end, start), (float)(n - 1u));
    return j < n / 2u ? __fmaf_rn(step, (float)j, start) : __fmaf_rn(-step, (float)(n - 1u - j), end);
}

// Dream (policy::dream_count): int(masked · (1 − ts[i+1] / ts[i])) in f32, all on the last step;
// 0 is a valid count. Explicit _rn intrinsics keep nvcc from contracting (the CPU rounds every op).
__device__ __forceinline__ unsigned dream_count(unsigned masked, unsigned steps, unsigned i) {
    const unsigned s = steps > 1u ? steps : 1u;
    if (i + 1u >= s) return masked;
    const float t = dream_timestep(s + 1u, i), u = dream_timestep(s + 1u, i + 1u);
    const float x = __fmul_rn((float)masked, __fsub_rn(1.0f, __fdiv_rn(u, t)));
    if (!(x > 0.f)) return 0u;  // Rust's saturating `as u32`
    if (x >= 4294967295.f) return 0xFFFFFFFFu;
    return (unsigned)x;
}

extern "C" __global__ void __launch_bounds__(COMMIT_THREADS) commit_u32(const CommitParams p) {
    __shared__ float tile_key[COMMIT_TILE];
    __shared__ unsigned tile_pos[COMMIT_TILE];
    __shared__ int red[COMMIT_THREADS / 32];
    __shared__ int k_shared;
    const CommitSeq q = reinterpret_cast<const CommitSeq*>(p.seqs)[blockIdx.x];
    const int n = q.slot_count, off = q.slot_offset;
    const unsigned* pos = reinterpret_cast<const unsigned*>(p.positions) + off;
    const unsigned* tok = reinterpret_cast<const unsigned*>(p.tokens) + off;
    const float* conf = reinterpret_cast<const float*>(p.conf) + off;
    unsigned* out = reinterpret_cast<unsigned*>(p.out);
    unsigned* list = out + p.n_seqs + 2 * off;
    float* ranked = reinterpret_cast<float*>(p.ranked_conf) + off;
    const int tid = threadIdx.x;

    // 1. Ranks by counting: rank_i = #{j : key_j > key_i or (key_j == key_i and pos_j < pos_i)}.
    for (int i0 = 0; i0 < n; i0 += COMMIT_THREADS) {
        const int i = i0 + tid;
        const bool have = i < n;
        const float ki = have ? rank_key(conf[i]) : 0.f;
        const unsigned pi = have ? pos[i] : 0u;
        int rank = 0;
        for (int t0 = 0; t0 < n; t0 += COMMIT_TILE) {
            const int tn = min(COMMIT_TILE, n - t0);
            __syncthreads();
            for (int j = tid; j < tn; j += COMMIT_THREADS) {
                tile_key[j] = rank_key(conf[t0 + j]);
                tile_pos[j] = pos[t0 + j];
            }
            __syncthreads();
            if (have) {
                for (int j = 0; j < tn; ++j) {
                    const float kj = tile_key[j];
                    rank += (kj > ki || (kj == ki && tile_pos[j] < pi)) ? 1 : 0;
                }
            }
        }
        if (have) {
            list[2 * rank] = pi;
            list[2 * rank + 1] = tok[i];
            ranked[rank] = conf[i];
        }
    }
    __syncthreads();

    // 2. How many commit (Policy::commit_count), then clamp to [1, n] ([0, n] for Dream).
    int k = 0;
    if (q.policy == 2 || q.policy == 3 || q.policy == 6) {  // how many pass τ (rule 6: strictly)
        const bool strict = q.policy == 6;
        int c = 0;
        for (int i = tid; i < n; i += COMMIT_THREADS) c += (strict ? conf[i] > q.tau : conf[i] >= q.tau) ? 1 : 0;
        for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
        if ((tid & 31) == 0) red[tid >> 5] = c;
        __syncthreads();
        if (tid == 0) {
            int s = 0;
            for (int w = 0; w < COMMIT_THREADS / 32; ++w) s += red[w];
            k_shared = s;
        }
    } else if (q.policy == 4) {  // factor: longest prefix with c_r >= 1 − f / (r + 2)
        int first_fail = n;
        for (int r = tid; r < n; r += COMMIT_THREADS) {
            const float thr = __fsub_rn(1.0f, __fdiv_rn(q.factor, __fadd_rn((float)r, 2.0f)));
            if (!(ranked[r] >= thr)) first_fail = min(first_fail, r);
        }
        for (int o = 16; o > 0; o >>= 1) first_fail = min(first_fail, __shfl_xor_sync(0xffffffffu, first_fail, o));
        if ((tid & 31) == 0) red[tid >> 5] = first_fail;
        __syncthreads();
        if (tid == 0) {
            int s = n;
            for (int w = 0; w < COMMIT_THREADS / 32; ++w) s = min(s, red[w]);
            k_shared = s;
        }
    }
    __syncthreads();
    if (tid == 0) {
        switch (q.policy) {
            case 0:  // schedule
            case 1:  // random
                k = q.ctx_step + 1u >= q.steps ? n : (int)min(schedule_count(q.block_masked, q.steps, q.ctx_step), (unsigned)n);
                break;
            case 2:  // threshold
            case 4:  // factor
                k = k_shared;
                break;
            case 3:  // confident: the passing ones, else the schedule count
                if (k_shared > 0) k = k_shared;
                else if (q.ctx_step + 1u >= q.steps) k = n;
                else k = (int)min(schedule_count(q.block_masked, q.steps, q.ctx_step), (unsigned)n);
                break;
            case 6:  // max(#{c > τ}, the schedule count capped at n; every slot on the last step)
                k = q.ctx_step + 1u >= q.steps ? n : (int)min(schedule_count(q.block_len, q.steps, q.ctx_step), (unsigned)n);
                k = max(k, k_shared);
                break;
            default:  // dream
                k = (int)min(dream_count(q.masked, q.steps, q.ctx_step), (unsigned)n);
                break;
        }
        if (n == 0) k = 0;
        else if (q.policy == 5) k = min(k, n);  // Dream: its count, 0 included
        else k = max(1, min(k, n));
        out[blockIdx.x] = (unsigned)k;
        k_shared = k;
    }
    __syncthreads();
    k = k_shared;

    // 3. Write the committed tokens into the canvas.
    unsigned* canvas = reinterpret_cast<unsigned*>(p.canvas) + (size_t)q.canvas_row * (size_t)p.canvas_stride;
    for (int r = tid; r < k; r += COMMIT_THREADS) canvas[list[2 * r]] = list[2 * r + 1];
}
