// Batched LoRA for one linear layer over a batch whose rows belong to different adapters, each at its own
// rank (no padding to the largest), in the spirit of Punica's BGMV: per row r with adapter a = seg[r],
//   shrink:  t[r, j]  = sum_i x[r, i] * A_a[j, i]                (j < rank_a; in partial sums over chunks of i)
//   expand:  y[r, o] += scale_a * sum_j t[r, j] * Bt_a[j, o]
// Adapters are described by a table indexed by segment: device pointers to A [rank, in] and Bt [rank, out]
// (row-major f32, Bt = B transposed so the expand reads rows of it coalesced), the rank and the scale.
// row_seg[r] < 0 marks a base-model row: t and y are left alone. The CPU oracle is lora::batched.
//
// Compiled at run time by NVRTC, header-free.

#define MAX_RANK 128
#define SHRINK_WARPS 4
#define SHRINK_CHUNK 512
#define EXPAND_THREADS 256

// Grid (rows, splits = ceil(in / SHRINK_CHUNK)): block (r, s) takes input features [s·512, (s+1)·512) of row r
// and writes the partial sums t[(r·splits + s)·MAX_RANK + j] = sum over its chunk of x[r, i]·A[j, i], j < rank.
// Splitting K keeps a decode batch's few rows spread over the SMs (one block per row left 100 of 132 idle and
// each SM with one row's adapter to stream); the expand adds the partials in a fixed order, so results do not
// depend on scheduling. Each lane holds its 4 float4s of the chunk's x; warp w takes ranks w, w + 4, ...
extern "C" __global__ void lora_shrink(const float* __restrict__ x, float* __restrict__ t,
                                       const int* __restrict__ row_seg,
                                       const unsigned long long* __restrict__ a_ptrs,
                                       const int* __restrict__ ranks, int in_features) {
    constexpr int PER_LANE = SHRINK_CHUNK / 4 / 32;
    const int r = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int s = row_seg[r];
    if (s < 0) return;
    const float* a = reinterpret_cast<const float*>(a_ptrs[s]);
    const int rank = ranks[s];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int in4 = in_features / 4, c0 = split * (SHRINK_CHUNK / 4);
    const float4* xr = reinterpret_cast<const float4*>(x + (long long)r * in_features);
    float4 xv[PER_LANE];
#pragma unroll
    for (int q = 0; q < PER_LANE; q++) {
        const int i = c0 + lane + 32 * q;
        xv[q].x = xv[q].y = xv[q].z = xv[q].w = 0.f;
        if (i < in4) xv[q] = xr[i];
    }
#pragma unroll 2
    for (int j = warp; j < rank; j += SHRINK_WARPS) {
        const float4* aj = reinterpret_cast<const float4*>(a + (long long)j * in_features);
        float acc = 0.f;
#pragma unroll
        for (int q = 0; q < PER_LANE; q++) {
            const int i = c0 + lane + 32 * q;
            if (i < in4) {
                const float4 av = aj[i];
                acc += xv[q].x * av.x + xv[q].y * av.y + xv[q].z * av.z + xv[q].w * av.w;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) t[((long long)r * splits + split) * MAX_RANK + j] = acc;
    }
}

// Grid (rows, ceil(out / 256)); the row's t (rank ≤ 128 floats, each the sum of the shrink's `splits` partials
// in split order) is staged in shared memory, each thread owns one output feature and walks the rank: reads of
// Bt rows are coalesced across the block.
extern "C" __global__ void lora_expand(const float* __restrict__ t, float* __restrict__ y,
                                       const int* __restrict__ row_seg,
                                       const unsigned long long* __restrict__ bt_ptrs,
                                       const int* __restrict__ ranks, const float* __restrict__ scales,
                                       int splits, int out_features) {
    __shared__ float ts[MAX_RANK];
    const int r = blockIdx.x;
    const int s = row_seg[r];
    if (s < 0) return;
    const int rank = ranks[s];
    for (int j = threadIdx.x; j < rank; j += EXPAND_THREADS) {
        const float* tj = t + (long long)r * splits * MAX_RANK + j;
        float sum = 0.f;
        for (int p = 0; p < splits; p++) sum += tj[p * MAX_RANK];
        ts[j] = sum;
    }
    __syncthreads();
    const int o = blockIdx.y * EXPAND_THREADS + threadIdx.x;
    if (o >= out_features) return;
    const float* bt = reinterpret_cast<const float*>(bt_ptrs[s]);
    float acc = 0.f;
    for (int j = 0; j < rank; j++) acc += ts[j] * bt[(long long)j * out_features + o];
    y[(long long)r * out_features + o] += scales[s] * acc;
}
