// NF4 (QLoRA 4-bit NormalFloat, blocksize 64, optional double quantization) fused dequantize + matmul:
// y[m, n] = sum_k x[m, k] * W[n, k], W never materialised in global memory.
//
// Weight layout, exactly bitsandbytes' (see src/quant/nf4.rs): W is [N, K] row-major, flattened into blocks
// of 64 elements, two 4-bit codes a byte with the FIRST element in the HIGH nibble, one scale per block:
// either f32 (absmax_f32) or double-quantized (nested_code[absmax_codes[b]] * nested_absmax[b / 256] + offset).
// Element value = code16[nibble] * scale, one f32 multiply, as bitsandbytes' dequantize_4bit.
// The fast kernels (GEMV, MMA) need K % 64 == 0 (true of every production Llama-family linear), so a row of
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

// The 32 weights in 16 bytes of codes (byte i holds elements 2i, high nibble, and 2i + 1), scaled.
__device__ __forceinline__ void nf4_decode32(const uint4 bytes, const float* code, float scale, float* out) {
    const unsigned int words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const unsigned int byte = (words[i] >> (8 * j)) & 0xffu;  // byte 4i+j of the 16 (little endian)
            out[8 * i + 2 * j] = code[byte >> 4] * scale;
            out[8 * i + 2 * j + 1] = code[byte & 0xfu] * scale;
        }
    }
}

// Decode-sized inputs (1..8 rows): one warp per output column n, all R rows of x at once, so each weight
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
        float w[32];
        nf4_decode32(bytes, code, scale, w);
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

// Tensor cores (sm_80+): mma.sync m16n8k8 with TF32 inputs and f32 accumulators. Each f32 operand is split
// into a TF32 high part and a TF32 low part (v = hi + lo, exact to ~2^-22) and every product is accumulated as
// lo·hi + hi·lo + hi·hi ("3xTF32": f32 accuracy at three MMAs a product; the lo·lo term is below f32 rounding).
// The CPU emulation of these kernels (tests/gpu_emu/cuda_emu.h) defines LORASERVE_EMULATION and supplies both
// functions, implementing the fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k8", .tf32).
#ifndef LORASERVE_EMULATION
__device__ __forceinline__ unsigned int tf32_round(float v) {
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r & 0xffffe000u;
}

// d += A·B for one 16x8x8 tile; a0..a3 hold A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4], b0..b1 hold B[t][g],
// B[t+4][g], d0..d3 hold D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1] (g = lane / 4, t = lane % 4).
__device__ __forceinline__ void mma_tf32(float d[4], const unsigned int a[4], const unsigned int b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

__device__ __forceinline__ void split_tf32(float v, unsigned int& hi, unsigned int& lo) {
    hi = tf32_round(v);
    lo = tf32_round(v - __uint_as_float(hi));
}

// More than 8 rows (decode batches and prefill): MMA_BM x MMA_BN output tiles, 4 warps, warp w computing rows
// 16w..16w+15 of the tile across all MMA_BN columns (MMA_BN / 8 accumulator tiles). Per 64-wide step of K (one
// NF4 block per weight row) the x tile is staged in shared memory with 16-byte loads (rows past M as zeros)
// and the W tile is dequantized straight into shared memory from 16-byte loads of the codes; rows are padded
// by 4 floats so the fragment reads hit 32 distinct banks.
#define MMA_BM 64
#define MMA_BN 64
#define MMA_BK 64
#define MMA_PAD 4
#define MMA_THREADS 128
extern "C" __global__ void nf4_matmul_mma(const float* __restrict__ x, const unsigned char* __restrict__ packed,
                                          int double_quant, const float* __restrict__ absmax_f32,
                                          const unsigned char* __restrict__ absmax_codes,
                                          const float* __restrict__ nested_absmax,
                                          const float* __restrict__ nested_code, float offset,
                                          const float* __restrict__ code16, float* __restrict__ y, int M, int N,
                                          int K) {
    __shared__ float code[16];
    __shared__ float xs[MMA_BM][MMA_BK + MMA_PAD];
    __shared__ float ws[MMA_BN][MMA_BK + MMA_PAD];
    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int m_base = blockIdx.y * MMA_BM, n_base = blockIdx.x * MMA_BN;
    if (tid < 16) code[tid] = code16[tid];
    // acc: the running f32 sums; part: one 64-wide step's MMA accumulators, started at zero every step, so a
    // tensor core that rounds its accumulation toward zero loses at most one step's worth, not all of K's.
    float acc[MMA_BN / 8][4], part[MMA_BN / 8][4];
#pragma unroll
    for (int j = 0; j < MMA_BN / 8; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[j][i] = 0.f;
    __syncthreads();
    for (int k0 = 0; k0 < K; k0 += MMA_BK) {
#pragma unroll
        for (int j = 0; j < MMA_BN / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) part[j][i] = 0.f;
        for (int i = tid; i < MMA_BM * MMA_BK / 4; i += MMA_THREADS) {
            const int r = i / (MMA_BK / 4), c = 4 * (i % (MMA_BK / 4)), m = m_base + r;
            float4 v;
            v.x = v.y = v.z = v.w = 0.f;
            if (m < M) v = *reinterpret_cast<const float4*>(x + (long long)m * K + k0 + c);
            xs[r][c] = v.x;
            xs[r][c + 1] = v.y;
            xs[r][c + 2] = v.z;
            xs[r][c + 3] = v.w;
        }
        // A W row's 64 codes are 32 bytes: two 16-byte loads, each decoded into 32 floats.
        for (int i = tid; i < MMA_BN * 2; i += MMA_THREADS) {
            const int r = i / 2, half = i % 2, n = n_base + r;
            float* dst = &ws[r][32 * half];
            if (n < N) {
                const long long e = (long long)n * K + k0;
                const float scale =
                    nf4_scale(e / 64, double_quant, absmax_f32, absmax_codes, nested_absmax, nested_code, offset);
                const uint4 bytes = *reinterpret_cast<const uint4*>(packed + e / 2 + 16 * half);
                nf4_decode32(bytes, code, scale, dst);
            } else {
#pragma unroll
                for (int j = 0; j < 32; j++) dst[j] = 0.f;
            }
        }
        __syncthreads();
        const int ra = 16 * warp + g;
#pragma unroll
        for (int kk = 0; kk < MMA_BK; kk += 8) {
            unsigned int ah[4], al[4];
            split_tf32(xs[ra][kk + t], ah[0], al[0]);
            split_tf32(xs[ra + 8][kk + t], ah[1], al[1]);
            split_tf32(xs[ra][kk + t + 4], ah[2], al[2]);
            split_tf32(xs[ra + 8][kk + t + 4], ah[3], al[3]);
#pragma unroll
            for (int j = 0; j < MMA_BN / 8; j++) {
                // B = Wᵀ: B[k][n] = ws[n][k].
                unsigned int bh[2], bl[2];
                split_tf32(ws[8 * j + g][kk + t], bh[0], bl[0]);
                split_tf32(ws[8 * j + g][kk + t + 4], bh[1], bl[1]);
                mma_tf32(part[j], al, bh);
                mma_tf32(part[j], ah, bl);
                mma_tf32(part[j], ah, bh);
            }
        }
#pragma unroll
        for (int j = 0; j < MMA_BN / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[j][i] += part[j][i];
        __syncthreads();
    }
    const int m0 = m_base + 16 * warp + g;
#pragma unroll
    for (int j = 0; j < MMA_BN / 8; j++) {
        const int n = n_base + 8 * j + 2 * t;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int m = m0 + (i >= 2 ? 8 : 0), nn = n + (i & 1);
            if (m < M && nn < N) y[(long long)m * N + nn] = acc[j][i];
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
