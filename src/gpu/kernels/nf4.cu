// NF4 (QLoRA 4-bit NormalFloat, blocksize 64, optional double quantization) fused dequantize + matmul:
// y[m, n] = sum_k x[m, k] * W[n, k], W never materialised in global memory.
//
// Weight layout, exactly bitsandbytes' (see src/quant/nf4.rs): W is [N, K] row-major, flattened into blocks
// of 64 elements, two 4-bit codes a byte with the FIRST element in the HIGH nibble, one scale per block:
// either f32 (absmax_f32) or double-quantized (nested_code[absmax_codes[b]] * nested_absmax[b / 256] + offset).
// Element value = code16[nibble] * scale, one f32 multiply, as bitsandbytes' dequantize_4bit.
// The fast kernels (GEMV, tiled) need K % 64 == 0 (true of every production Llama-family linear), so a row of
// W is K / 64 whole blocks read with aligned vector loads; nf4_matmul_generic takes any shape (blocks and
// bytes may straddle rows) at scalar-load speed, for small and odd models.
//
// Compiled at run time by NVRTC (no headers, no templates across the C boundary beyond the wrappers below).

#define WARPS_PER_BLOCK 4

__device__ __forceinline__ float nf4_scale(long long b, int double_quant, const float* __restrict__ absmax_f32,
                                           const unsigned char* __restrict__ absmax_codes,
                                           const float* __restrict__ nested_absmax,
                                           const float* __restrict__ nested_code, float offset) {
    if (double_quant) {
        return nested_code[absmax_codes[b]] * nested_absmax[b / 256] + offset;
    }
    return absmax_f32[b];
}

// Decode-sized inputs (1..32 rows): one warp per output column n, all R rows of x at once, so each weight
// byte is read once (16-byte loads: a lane takes 32 codes, a warp 1024 elements per step).
template <int R>
__device__ void nf4_gemv(const float* __restrict__ x, const unsigned char* __restrict__ packed,
                         int double_quant, const float* __restrict__ absmax_f32,
                         const unsigned char* __restrict__ absmax_codes, const float* __restrict__ nested_absmax,
                         const float* __restrict__ nested_code, float offset, const float* __restrict__ code16,
                         float* __restrict__ y, int M, int N, int K) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
    __syncthreads();
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * WARPS_PER_BLOCK + warp;
    if (n >= N) return;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    const long long row = (long long)n * K;
    for (int k0 = lane * 32; k0 < K; k0 += 32 * 32) {
        const long long e = row + k0;
        const uint4 bytes = *reinterpret_cast<const uint4*>(packed + e / 2);
        const float scale = nf4_scale(e / 64, double_quant, absmax_f32, absmax_codes, nested_absmax, nested_code, offset);
        const unsigned int words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
        float w[32];
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const unsigned int byte = (words[i] >> (8 * j)) & 0xffu;  // byte 4i+j of the 16 (little endian)
                w[8 * i + 2 * j] = code[byte >> 4] * scale;
                w[8 * i + 2 * j + 1] = code[byte & 0xfu] * scale;
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (r < M) {
                const float4* xv = reinterpret_cast<const float4*>(x + (long long)r * K + k0);
                float s = 0.f;
#pragma unroll
                for (int q = 0; q < 8; q++) {
                    const float4 v = xv[q];
                    s += v.x * w[4 * q] + v.y * w[4 * q + 1] + v.z * w[4 * q + 2] + v.w * w[4 * q + 3];
                }
                acc[r] += s;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float v = acc[r];
#pragma unroll
        for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0 && r < M) y[(long long)r * N + n] = v;
    }
}

#define NF4_GEMV(R)                                                                                              \
    extern "C" __global__ void nf4_gemv_r##R(                                                                    \
        const float* __restrict__ x, const unsigned char* __restrict__ packed, int double_quant,                 \
        const float* __restrict__ absmax_f32, const unsigned char* __restrict__ absmax_codes,                    \
        const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,            \
        const float* __restrict__ code16, float* __restrict__ y, int M, int N, int K) {                          \
        nf4_gemv<R>(x, packed, double_quant, absmax_f32, absmax_codes, nested_absmax, nested_code, offset,       \
                    code16, y, M, N, K);                                                                         \
    }
NF4_GEMV(1)
NF4_GEMV(2)
NF4_GEMV(4)
NF4_GEMV(8)
NF4_GEMV(16)
NF4_GEMV(32)

// Prefill-sized inputs: 64x64 output tiles, 256 threads with 4x4 outputs each; per 64-wide step of K the x
// tile is staged in shared memory and the W tile (one NF4 block per row) is dequantized straight into shared
// memory. CUDA-core FMAs for now; a tensor-core (MMA) version is the next step.
#define TILE 64
extern "C" __global__ void nf4_matmul_tiled(const float* __restrict__ x, const unsigned char* __restrict__ packed,
                                            int double_quant, const float* __restrict__ absmax_f32,
                                            const unsigned char* __restrict__ absmax_codes,
                                            const float* __restrict__ nested_absmax,
                                            const float* __restrict__ nested_code, float offset,
                                            const float* __restrict__ code16, float* __restrict__ y, int M, int N,
                                            int K) {
    __shared__ float code[16];
    __shared__ float xs[TILE][TILE + 1];
    __shared__ float ws[TILE][TILE + 1];
    const int tid = threadIdx.x;
    if (tid < 16) code[tid] = code16[tid];
    const int tx = tid % 16, ty = tid / 16;
    const int m_base = blockIdx.y * TILE, n_base = blockIdx.x * TILE;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
    __syncthreads();
    for (int k0 = 0; k0 < K; k0 += TILE) {
        for (int i = tid; i < TILE * TILE; i += 256) {
            const int r = i / TILE, c = i % TILE, m = m_base + r;
            xs[r][c] = m < M ? x[(long long)m * K + k0 + c] : 0.f;
        }
        for (int i = tid; i < TILE * TILE / 2; i += 256) {
            const int r = i / (TILE / 2), byte_i = i % (TILE / 2), n = n_base + r;
            float hi = 0.f, lo = 0.f;
            if (n < N) {
                const long long e = (long long)n * K + k0;
                const float scale =
                    nf4_scale(e / 64, double_quant, absmax_f32, absmax_codes, nested_absmax, nested_code, offset);
                const unsigned int byte = packed[e / 2 + byte_i];
                hi = code[byte >> 4] * scale;
                lo = code[byte & 0xfu] * scale;
            }
            ws[r][2 * byte_i] = hi;
            ws[r][2 * byte_i + 1] = lo;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < TILE; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = xs[ty * 4 + i][kk];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = ws[tx * 4 + j][kk];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int m = m_base + ty * 4 + i;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int n = n_base + tx * 4 + j;
            if (m < M && n < N) y[(long long)m * N + n] = acc[i][j];
        }
    }
}

// Any shape: one warp per output (m, n), lanes striding over K with scalar loads; element e = n * K + k of the
// flattened weight sits in byte e / 2 (high nibble when e is even) of block e / 64.
extern "C" __global__ void nf4_matmul_generic(const float* __restrict__ x, const unsigned char* __restrict__ packed,
                                              int double_quant, const float* __restrict__ absmax_f32,
                                              const unsigned char* __restrict__ absmax_codes,
                                              const float* __restrict__ nested_absmax,
                                              const float* __restrict__ nested_code, float offset,
                                              const float* __restrict__ code16, float* __restrict__ y, int M, int N,
                                              int K) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n = blockIdx.x * WARPS_PER_BLOCK + warp;
    const int m = blockIdx.y;
    if (n >= N) return;
    float acc = 0.f;
    for (int k = lane; k < K; k += 32) {
        const long long e = (long long)n * K + k;
        const unsigned int byte = packed[e / 2];
        const unsigned int nibble = (e & 1) ? (byte & 0xfu) : (byte >> 4);
        const float scale = nf4_scale(e / 64, double_quant, absmax_f32, absmax_codes, nested_absmax, nested_code, offset);
        acc += x[(long long)m * K + k] * (code16[nibble] * scale);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[(long long)m * N + n] = acc;
}
