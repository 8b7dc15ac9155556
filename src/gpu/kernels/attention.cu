// Paged attention over the block KV cache, the device twin of model::attention::paged_attention.
// Cache layout per layer (as the CPU cache): k and v arenas of [num_blocks, block_size, kv_heads, head_dim]
// f32; a sequence's token position t lives in block table[t / block_size], slot t % block_size.
//
// kv_write: scatter this step's new keys (rotated, RoPE) and values ([rows, kv_heads * head_dim]) into their
// slots.
// paged_attention: for every new token (row) and kv head, the group of query heads sharing that kv head
// (rotated as they are read) attends over positions first..pos of its sequence (causal; `window` > 0 masks
// keys older than window positions), one pass with an online softmax, each key and value read once for the
// whole group.
//
// RoPE, the non-interleaved "rotate half" layout of Hugging Face checkpoints, as model::attention::
// rope_in_place: with cos, sin the row's tables (cos_t, sin_t: [rows, head_dim / 2]) and i < head_dim / 2,
//   x'[i] = x[i]·cos[i] − x[i + half]·sin[i],   x'[i + half] = x[i + half]·cos[i] + x[i]·sin[i],
// each product and sum rounded on its own (__fmul_rn, no fused multiply-add): the cache holds the CPU's keys
// bit for bit.
//
// Compiled at run time by NVRTC, header-free.

#define ATTN_WARPS 4
#define NEG_INF __int_as_float(0xff800000)

// Element d of a head (x: the head's first element) rotated with the row's tables.
__device__ __forceinline__ float rope_at(const float* __restrict__ x, int d, int half, const float* __restrict__ rc,
                                         const float* __restrict__ rs) {
    return d < half ? __fsub_rn(__fmul_rn(x[d], rc[d]), __fmul_rn(x[d + half], rs[d]))
                    : __fadd_rn(__fmul_rn(x[d], rc[d - half]), __fmul_rn(x[d - half], rs[d - half]));
}

// One block per row, threads over kv_heads * head_dim.
extern "C" __global__ void kv_write(const float* __restrict__ k, const float* __restrict__ v,
                                    float* __restrict__ k_cache, float* __restrict__ v_cache,
                                    const int* __restrict__ row_slot, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, int token_width, int head_dim) {
    const int r = blockIdx.x, half = head_dim / 2;
    const long long dst = (long long)row_slot[r] * token_width;
    const long long src = (long long)r * token_width;
    const float* rc = cos_t + (long long)r * half;  // this row's RoPE tables
    const float* rs = sin_t + (long long)r * half;
    for (int i = threadIdx.x; i < token_width; i += blockDim.x) {
        const int d = i % head_dim;
        k_cache[dst + i] = rope_at(k + src + (i - d), d, half, rc, rs);
        v_cache[dst + i] = v[src + i];
    }
}

// Grid (rows, kv_heads), ATTN_WARPS warps. Warp w takes positions first + w, first + w + ATTN_WARPS, ...;
// lane l holds head dims l, l + 32, ... below head_dim (lanes past a head_dim that is not a multiple of 32
// hold zeros). Per warp and head: running max m, sum l and weighted value sum; the warps' partial states are
// merged through shared memory at the end.
//   q [rows, heads * head_dim], out [rows, heads * head_dim]
//   row_pos[r]: the token's position; row_table[r]: offset of its sequence's block table in `tables`.
// Compiled for bounds G on the query heads per kv head (1, 2, 4, 8) and D on head_dim (64, 128, 256), the
// launcher picking the smallest that hold the model's: the per-thread query and accumulator arrays are G × D/32
// floats, so Llama 2's heads (G 1, D 128) take 8 of the 128 registers that bounds of 8 and 256 would hold,
// and more blocks fit on an SM. The arithmetic is the same for every bound (terms past the model's group or
// head_dim are never formed, or are zeros added to a dot product).
#define ATTN_PARAMS                                                                                         \
    const float* __restrict__ q, const float* __restrict__ k_cache, const float* __restrict__ v_cache,      \
        const int* __restrict__ tables, const int* __restrict__ row_pos, const int* __restrict__ row_table, \
        const float* __restrict__ cos_t, const float* __restrict__ sin_t, float* __restrict__ out, int heads, \
        int kv_heads, int head_dim, int block_size, int window, float scale
#define ATTN_ARGS \
    q, k_cache, v_cache, tables, row_pos, row_table, cos_t, sin_t, out, heads, kv_heads, head_dim, block_size, window, scale

// sm_m, sm_l: [ATTN_WARPS][G]; sm_acc: [ATTN_WARPS][G][D].
template <int G, int D>
__device__ __forceinline__ void paged_attention_impl(ATTN_PARAMS, float* sm_m, float* sm_l, float* sm_acc) {
    constexpr int DL = D / 32;  // head dims a lane holds
    const int r = blockIdx.x, g = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = heads / kv_heads;
    const int pos = row_pos[r];
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int* table = tables + row_table[r];
    const int token_width = kv_heads * head_dim;

    const int half = head_dim / 2;
    const float* rc = cos_t + (long long)r * half;  // this row's RoPE tables
    const float* rs = sin_t + (long long)r * half;
    float qr[G][DL];
    float acc[G][DL];
    float m[G], l[G];
#pragma unroll
    for (int h = 0; h < G; h++) {
        m[h] = NEG_INF;
        l[h] = 0.f;
        const float* qh = q + ((long long)r * heads + g * group + h) * head_dim;
#pragma unroll
        for (int d = 0; d < DL; d++) {
            acc[h][d] = 0.f;
            qr[h][d] = (h < group && d * 32 + lane < head_dim) ? rope_at(qh, d * 32 + lane, half, rc, rs) * scale : 0.f;
        }
    }
    for (int t = first + warp; t <= pos; t += ATTN_WARPS) {
        const long long o = ((long long)table[t / block_size] * block_size + t % block_size) * token_width +
                            (long long)g * head_dim;
        float kr[DL], vr[DL];
#pragma unroll
        for (int d = 0; d < DL; d++) {
            kr[d] = d * 32 + lane < head_dim ? k_cache[o + d * 32 + lane] : 0.f;
            vr[d] = d * 32 + lane < head_dim ? v_cache[o + d * 32 + lane] : 0.f;
        }
#pragma unroll
        for (int h = 0; h < G; h++) {
            if (h >= group) break;
            float s = 0.f;
#pragma unroll
            for (int d = 0; d < DL; d++) s += qr[h][d] * kr[d];
#pragma unroll
            for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
            const float m_new = fmaxf(m[h], s);
            const float correction = __expf(m[h] - m_new);
            const float p = __expf(s - m_new);
            l[h] = l[h] * correction + p;
#pragma unroll
            for (int d = 0; d < DL; d++) acc[h][d] = acc[h][d] * correction + p * vr[d];
            m[h] = m_new;
        }
    }
    // Merge the warps' states: every warp publishes, then all threads combine for their (head, dim) pairs.
#pragma unroll
    for (int h = 0; h < G; h++) {
        if (h >= group) break;
        if (lane == 0) {
            sm_m[warp * G + h] = m[h];
            sm_l[warp * G + h] = l[h];
        }
#pragma unroll
        for (int d = 0; d < DL; d++)
            if (d * 32 + lane < head_dim) sm_acc[(warp * G + h) * D + d * 32 + lane] = acc[h][d];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * head_dim; i += ATTN_WARPS * 32) {
        const int h = i / head_dim, d = i % head_dim;
        float mx = NEG_INF;
        for (int w = 0; w < ATTN_WARPS; w++) mx = fmaxf(mx, sm_m[w * G + h]);
        float sum = 0.f, val = 0.f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            if (sm_m[w * G + h] == NEG_INF) continue;  // a warp that saw no position
            const float c = __expf(sm_m[w * G + h] - mx);
            sum += sm_l[w * G + h] * c;
            val += sm_acc[(w * G + h) * D + d] * c;
        }
        out[((long long)r * heads + g * group + h) * head_dim + d] = val / sum;
    }
}

// The shared arrays live in the entry points (see nf4.cu).
#define PAGED_ATTENTION(G, D)                                                      \
    extern "C" __global__ void paged_attention_g##G##_d##D(ATTN_PARAMS) {          \
        __shared__ float sm_m[ATTN_WARPS * G];                                     \
        __shared__ float sm_l[ATTN_WARPS * G];                                     \
        __shared__ float sm_acc[ATTN_WARPS * G * D];                               \
        paged_attention_impl<G, D>(ATTN_ARGS, sm_m, sm_l, sm_acc);                 \
    }
PAGED_ATTENTION(1, 64)
PAGED_ATTENTION(1, 128)
PAGED_ATTENTION(1, 256)
PAGED_ATTENTION(2, 64)
PAGED_ATTENTION(2, 128)
PAGED_ATTENTION(2, 256)
PAGED_ATTENTION(4, 64)
PAGED_ATTENTION(4, 128)
PAGED_ATTENTION(4, 256)
PAGED_ATTENTION(8, 64)
PAGED_ATTENTION(8, 128)
PAGED_ATTENTION(8, 256)
