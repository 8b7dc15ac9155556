// Greedy decoding's pick on the device, the twin of engine::sampler::argmax: for each row of logits, the index
// of the largest value that is a number above -inf, the lowest index among equal ones; ARGMAX_NONE when the
// row has no such value (every logit NaN or -inf: nothing can be picked). Only the index crosses to the host.
// The pick does not depend on how the row is split between threads: (value, index) pairs are ordered totally,
// so any reduction order reaches the same pair.
//
// Compiled at run time by NVRTC, header-free.

#define ARGMAX_THREADS 256
#define ARGMAX_NONE 0xffffffffu

// (v, i) beats (bv, bi): NaN and -inf never do; a number beats NaN (the empty pick); a larger number wins;
// equal numbers go to the lower index.
__device__ __forceinline__ bool argmax_beats(float v, unsigned int i, float bv, unsigned int bi) {
    if (!(v > __int_as_float(0xff800000))) return false;
    return bv != bv || v > bv || (v == bv && i < bi);
}

// One block per row: each thread scans a stride of the row, then a warp butterfly, then warp 0's lane 0 over
// the warps' picks.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab, unsigned int* __restrict__ out) {
    __shared__ float warp_v[ARGMAX_THREADS / 32];
    __shared__ unsigned int warp_i[ARGMAX_THREADS / 32];
    const float* row = logits + (long long)blockIdx.x * vocab;
    float bv = __int_as_float(0x7fc00000);  // NaN: any number beats it
    unsigned int bi = ARGMAX_NONE;
    for (int i = threadIdx.x; i < vocab; i += ARGMAX_THREADS) {
        const float v = row[i];
        if (argmax_beats(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const unsigned int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_beats(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        warp_v[warp] = bv;
        warp_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < ARGMAX_THREADS / 32; w++) {
        if (argmax_beats(warp_v[w], warp_i[w], bv, bi)) {
            bv = warp_v[w];
            bi = warp_i[w];
        }
    }
    out[blockIdx.x] = bi;
}
