// Row gather: out[r, :] = table[ids[r], :]. Used for the token embedding and to gather the
// rows that go through the LM head. 16-byte copies; row_len % 8 == 0 (checked by the wrapper).
#include "common.cuh"

struct EmbedParams {
    const uint32_t* ids;  // [n]
    const bf16* table;    // [table_rows, row_len]
    bf16* out;            // [n, row_len]
    int n;
    int row_len;
    int table_rows;
};

// Flat over n * row_len/8 16-byte vectors (fewer than 2^31), grid-stride.
extern "C" __global__ void embed_bf16(const EmbedParams p) {
    pdl_wait();
    pdl_trigger();
    const int vpr = p.row_len >> 3;
    // total < 2^31 (checked by the wrapper), so unsigned 32-bit index math never wraps.
    const unsigned total = (unsigned)p.n * vpr;
    for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < total; v += gridDim.x * blockDim.x) {
        const int r = (int)(v / vpr);
        const int c = (int)(v - r * vpr);
        const uint32_t id = __ldg(p.ids + r);
        if (id >= (uint32_t)p.table_rows) __trap();  // the host validates ids: this is a bug
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(p.table + (int64_t)id * p.row_len) + c);
        reinterpret_cast<uint4*>(p.out + (int64_t)r * p.row_len)[c] = x;
    }
}
