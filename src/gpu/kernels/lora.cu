// Batched LoRA for one linear layer over a batch whose rows belong to different adapters, each at its own
// rank (no padding to the largest), in the spirit of Punica's BGMV: per row r with adapter a = seg[r],
//   shrink:  t[r, j]  = sum_i x[r, i] * A_a[j, i]                (j < rank_a)
//   expand:  y[r, o] += scale_a * sum_j t[r, j] * Bt_a[j, o]
// Adapters are described by a table indexed by segment: device pointers to A [rank, in] and Bt [rank, out]
// (row-major f32, Bt = B transposed so the expand reads rows of it coalesced), the rank and the scale.
// row_seg[r] < 0 marks a base-model row: t and y are left alone. The CPU oracle is lora::batched.
//
// Compiled at run time by NVRTC, header-free.

#define MAX_RANK 128
#define SHRINK_WARPS 8
#define EXPAND_THREADS 256

// One block per row; each warp takes ranks j = warp, warp + 8, ...; lanes stride over the input features
// with float4 loads (in % 4 == 0), then a warp reduction.
extern "C" __global__ void lora_shrink(const float* __restrict__ x, float* __restrict__ t,
                                       const int* __restrict__ row_seg,
                                       const unsigned long long* __restrict__ a_ptrs,
                                       const int* __restrict__ ranks, int in_features) {
    const int r = blockIdx.x;
    const int s = row_seg[r];
    if (s < 0) return;
    const float* a = reinterpret_cast<const float*>(a_ptrs[s]);
    const int rank = ranks[s];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float4* xr = reinterpret_cast<const float4*>(x + (long long)r * in_features);
    const int in4 = in_features / 4;
    for (int j = warp; j < rank; j += SHRINK_WARPS) {
        const float4* aj = reinterpret_cast<const float4*>(a + (long long)j * in_features);
        float acc = 0.f;
        for (int i = lane; i < in4; i += 32) {
            const float4 xv = xr[i], av = aj[i];
            acc += xv.x * av.x + xv.y * av.y + xv.z * av.z + xv.w * av.w;
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) t[(long long)r * MAX_RANK + j] = acc;
    }
}

// Grid (rows, ceil(out / 256)); the row's t (rank ≤ 128 floats) is staged in shared memory, each thread
// owns one output feature and walks the rank: reads of Bt rows are coalesced across the block.
extern "C" __global__ void lora_expand(const float* __restrict__ t, float* __restrict__ y,
                                       const int* __restrict__ row_seg,
                                       const unsigned long long* __restrict__ bt_ptrs,
                                       const int* __restrict__ ranks, const float* __restrict__ scales,
                                       int out_features) {
    __shared__ float ts[MAX_RANK];
    const int r = blockIdx.x;
    const int s = row_seg[r];
    if (s < 0) return;
    const int rank = ranks[s];
    for (int j = threadIdx.x; j < rank; j += EXPAND_THREADS) ts[j] = t[(long long)r * MAX_RANK + j];
    __syncthreads();
    const int o = blockIdx.y * EXPAND_THREADS + threadIdx.x;
    if (o >= out_features) return;
    const float* bt = reinterpret_cast<const float*>(bt_ptrs[s]);
    float acc = 0.f;
    for (int j = 0; j < rank; j++) acc += ts[j] * bt[(long long)j * out_features + o];
    y[(long long)r * out_features + o] += scales[s] * acc;
}
