// Fused element-wise steps of the decoder layer, each one launch where candle takes two:
//   add_rms_norm: the residual add and the RMS norm after it,
//     x_out = x + d,   h = x_out / sqrt(mean(x_out²) + eps) · w          (per row of `hidden` features)
//   silu_mul: the SwiGLU gate, out = silu(g) · u = g / (1 + exp(-g)) · u
// Same formulas as the CPU path (candle's rms_norm and silu), f32 throughout; only the order of the sum of
// squares differs (per thread, then per warp, then the warps in a fixed order: deterministic).
//
// Compiled at run time by NVRTC, header-free.

#define NORM_THREADS 256
#define NORM_WARPS (NORM_THREADS / 32)

// Grid (rows), NORM_THREADS threads; thread t takes features t, t + NORM_THREADS, ... of its row.
// x_out may not alias x or d (the host gives it a fresh buffer).
extern "C" __global__ void add_rms_norm(const float* __restrict__ x, const float* __restrict__ d,
                                        const float* __restrict__ w, float* __restrict__ x_out,
                                        float* __restrict__ h, int hidden, float eps) {
    __shared__ float warp_sums[NORM_WARPS];
    __shared__ float row_scale;
    const long long base = (long long)blockIdx.x * hidden;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += NORM_THREADS) {
        const float s = x[base + i] + d[base + i];
        x_out[base + i] = s;
        ss += s * s;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) warp_sums[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int i = 0; i < NORM_WARPS; i++) total += warp_sums[i];
        row_scale = sqrtf(total / (float)hidden + eps);
    }
    __syncthreads();
    const float m = row_scale;
    for (int i = threadIdx.x; i < hidden; i += NORM_THREADS) {
        const float s = x[base + i] + d[base + i];
        h[base + i] = s / m * w[i];
    }
}

// Grid-stride over n elements, NORM_THREADS threads a block.
extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u,
                                    float* __restrict__ out, int n) {
    for (long long i = (long long)blockIdx.x * NORM_THREADS + threadIdx.x; i < n;
         i += (long long)gridDim.x * NORM_THREADS) {
        const float v = g[i];
        out[i] = v / (1.f + expf(-v)) * u[i];
    }
}
