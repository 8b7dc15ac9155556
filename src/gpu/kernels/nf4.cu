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

// Every NF4 matmul kernel's parameters (the launch in src/gpu/nf4.rs pushes them in this order), and the same
// names as arguments, for the entry points that hand them to a template. `partial` and `tile_done` are the
// split-K scratch of the tensor-core kernels (see nf4_mma); the other kernels take and ignore them.
#define NF4_PARAMS                                                                                          \
    const float* __restrict__ x, const unsigned char* __restrict__ packed, int double_quant,                \
        const float* __restrict__ absmax_f32, const unsigned char* __restrict__ absmax_codes,               \
        const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,       \
        const float* __restrict__ code16, float* __restrict__ y, int M, int N, int K,                       \
        float* __restrict__ partial, unsigned int* __restrict__ tile_done
#define NF4_ARGS \
    x, packed, double_quant, absmax_f32, absmax_codes, nested_absmax, nested_code, offset, code16, y, M, N, K, partial, tile_done

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

// Decode-sized inputs (1..8 rows): R rows of x (1, 2, 4 or 8) by COLS consecutive output columns a block. The
// block's 4 warps split K into 256-element chunks (warp w takes chunks w, w + 4, ...); in a chunk, lane l
// takes elements 8l..8l+7: 4 bytes of codes per column (each column's 128 bytes a warp, contiguous) and two
// float4 of every row of x, loaded once and used for all COLS columns (the x traffic through L1, not the
// weight bytes, is what bounds a GEMV whose lanes read x apart). Sums: across the warp by shuffles, then the 4
// warps' partial sums in shared memory, added in warp order.
// Each chunk's global loads (x, every column's codes and scales) are issued together, branch-free, before any
// of them is used: ptxas does not move loads across branches, and a column's scale behind an `if` made every
// chunk a chain of one load round trip per column. A column past N loads column N - 1's bytes (never
// written). The double quantization's 256-entry map is staged in shared memory, so decoding a scale waits on
// one global load (the block's code byte and nested scale, together), not two in a row.
#define GEMV_CHUNK 256

template <int R, int COLS>
__device__ __forceinline__ void nf4_gemv(NF4_PARAMS, float* code, float* nested, float* part) {
    if (threadIdx.x < 16) code[threadIdx.x] = code16[threadIdx.x];
    if (double_quant) {
#pragma unroll
        for (int i = 0; i < 256 / (32 * WARPS_PER_BLOCK); i++)
            nested[threadIdx.x + 32 * WARPS_PER_BLOCK * i] = nested_code[threadIdx.x + 32 * WARPS_PER_BLOCK * i];
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n0 = blockIdx.x * COLS;
    float acc[R][COLS];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int c = 0; c < COLS; c++) acc[r][c] = 0.f;
    for (int k0 = warp * GEMV_CHUNK + 8 * lane; k0 < K; k0 += WARPS_PER_BLOCK * GEMV_CHUNK) {
        float4 xa[R], xb[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (r < M) {
                const float4* xv = reinterpret_cast<const float4*>(x + (long long)r * K + k0);
                xa[r] = xv[0];
                xb[r] = xv[1];
            } else {
                xa[r].x = xa[r].y = xa[r].z = xa[r].w = 0.f;
                xb[r].x = xb[r].y = xb[r].z = xb[r].w = 0.f;
            }
        }
        // K % 64 == 0 and k0 % 8 == 0: each column's 8 elements are one aligned 4-byte word of one NF4 block.
        unsigned int word[COLS];
        float scale[COLS];
        int block[COLS];  // e / 64 < 2^31 for any weight below 2^37 elements
#pragma unroll
        for (int c = 0; c < COLS; c++) {
            const long long e = (long long)min(n0 + c, N - 1) * K + k0;
            word[c] = *reinterpret_cast<const unsigned int*>(packed + e / 2);
            block[c] = (int)(e / 64);
        }
        if (double_quant) {
            unsigned int nested_index[COLS];
            float nested_scale[COLS];
#pragma unroll
            for (int c = 0; c < COLS; c++) {
                nested_index[c] = absmax_codes[block[c]];
                nested_scale[c] = nested_absmax[block[c] / 256];
            }
#pragma unroll
            for (int c = 0; c < COLS; c++) scale[c] = nested[nested_index[c]] * nested_scale[c] + offset;
        } else {
#pragma unroll
            for (int c = 0; c < COLS; c++) scale[c] = absmax_f32[block[c]];
        }
#pragma unroll
        for (int c = 0; c < COLS; c++) {
            float w[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const unsigned int byte = (word[c] >> (8 * j)) & 0xffu;  // elements 2j (high nibble), 2j + 1
                w[2 * j] = code[byte >> 4] * scale[c];
                w[2 * j + 1] = code[byte & 0xfu] * scale[c];
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float4 a = xa[r], b = xb[r];
                acc[r][c] += ((a.x * w[0] + a.y * w[1]) + (a.z * w[2] + a.w * w[3])) +
                             ((b.x * w[4] + b.y * w[5]) + (b.z * w[6] + b.w * w[7]));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int c = 0; c < COLS; c++) {
            float v = acc[r][c];
#pragma unroll
            for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) part[(warp * R + r) * COLS + c] = v;
        }
    __syncthreads();
    for (int o = threadIdx.x; o < R * COLS; o += 32 * WARPS_PER_BLOCK) {
        const int r = o / COLS, c = o % COLS, n = n0 + c;
        if (r < M && n < N) {
            const float* p = part + r * COLS + c;
            y[(long long)r * N + n] = ((p[0] + p[R * COLS]) + p[2 * R * COLS]) + p[3 * R * COLS];
        }
    }
}

// The shared arrays live in the entry points (as the tensor-core kernels' do).
#define NF4_GEMV(R, COLS)                                                       \
    extern "C" __global__ void nf4_gemv_r##R(NF4_PARAMS) {                      \
        __shared__ float code[16];                                              \
        __shared__ float nested[256];                                           \
        __shared__ float part[WARPS_PER_BLOCK * R * COLS];                      \
        nf4_gemv<R, COLS>(NF4_ARGS, code, nested, part);                        \
    }
NF4_GEMV(1, 4)
NF4_GEMV(2, 4)
NF4_GEMV(4, 8)
NF4_GEMV(8, 8)

// Tensor cores (sm_80+): mma.sync m16n8k8 with TF32 inputs and f32 accumulators. Each f32 operand is split
// into a TF32 high part and a TF32 low part (v = hi + lo, exact to ~2^-22) and every product is accumulated as
// lo·hi + hi·lo + hi·hi ("3xTF32": f32 accuracy at three MMAs a product; the lo·lo term is below f32 rounding).
// The CPU emulation of these kernels (tests/gpu_emulated/emu/cuda_emu.h) defines LORASERVE_EMULATION and supplies both
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

// More than 8 rows (decode batches and prefill): tensor cores. A block computes BM rows (BM = 16·MT: 16 rows
// for batches of 9..16, 32 beyond) by MMA_BN columns, over K in MMA_BK-wide steps (two NF4 blocks of every
// weight row). Its 4 warps split each step's K four ways (MMA_WARP_K columns each) and every warp computes the
// whole BM × MMA_BN tile on its slice: each staged x and W element is split into TF32 parts by exactly one
// warp, a warp keeps MT·4 independent accumulator tiles (MMAs in flight back to back), and small batches fill
// the GPU through narrow column slices (4096 outputs: 128 blocks) instead of idle warps on padding rows. The
// four warps' sums are added in a fixed order at the end. While a step computes, the next step's x and codes
// are already loading into registers (one shared buffer, no wait on global memory between steps).
//
// Split-K (gridDim.z = S > 1): block z takes steps [z·T/S, (z+1)·T/S) of the T steps of K, so a decode batch
// that makes only ~128 tiles still puts S blocks on every SM (one block of 4 warps an SM leaves each step's
// latency exposed). Each block writes its tile's sum to partial[z][tile], makes it visible device-wide, and
// counts itself in tile_done[tile]; the block that counts last adds the S partials in z order (the same sum
// whichever block finishes last) into y and sets the counter back to 0 for the next launch on the stream.
// Shared rows are padded by 4 floats, so the fragment reads (4g + t) and the staging stores hit distinct banks.
#define MMA_BN 32
#define MMA_BK 128
#define MMA_LD (MMA_BK + 4)
#define MMA_RED_LD (MMA_BN + 4)
#define MMA_THREADS 128
#define MMA_WARP_K (MMA_BK / 4)

template <int MT>
__device__ __forceinline__ void nf4_mma(NF4_PARAMS, float* sm, float* code, unsigned int* last) {
    constexpr int BM = 16 * MT;
    constexpr int XV = BM * MMA_BK / 4 / MMA_THREADS;  // float4s of x this thread stages per step
    float* xs = sm;                                    // [BM][MMA_LD]
    float* ws = sm + BM * MMA_LD;                      // [MMA_BN][MMA_LD]
    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int m_base = blockIdx.y * BM, n_base = blockIdx.x * MMA_BN;
    const int steps = (K + MMA_BK - 1) / MMA_BK;
    const int k_begin = MMA_BK * (int)((long long)steps * blockIdx.z / gridDim.z);
    const int k_end = min(K, MMA_BK * (int)((long long)steps * (blockIdx.z + 1) / gridDim.z));
    // This thread stages x float4s tid + 128 i (row q / 32, columns 4 (q % 32)..) and 32 codes of W row wr from
    // column wc: a warp's 8 rows × 64 bytes, lanes 8 apart on one row (the float4 stores of 8 lanes then fall
    // on 8 different bank groups).
    const int wr = 8 * warp + lane % 8, wc = 32 * (lane / 8);
    if (tid < 16) code[tid] = code16[tid];
    float4 xv[XV];
    uint4 wv;
    float wscale;
    // Loads step k0 into registers; columns past K (K % 128 == 64: the last step's upper half) and rows or
    // columns past the matrix are zeros.
    auto load = [&](int k0) {
#pragma unroll
        for (int i = 0; i < XV; i++) {
            const int q = tid + MMA_THREADS * i, r = q / (MMA_BK / 4), c = 4 * (q % (MMA_BK / 4));
            const int m = m_base + r;
            xv[i].x = xv[i].y = xv[i].z = xv[i].w = 0.f;
            if (m < M && k0 + c < K) xv[i] = *reinterpret_cast<const float4*>(x + (long long)m * K + k0 + c);
        }
        const int n = n_base + wr;
        wv.x = wv.y = wv.z = wv.w = 0u;
        wscale = 0.f;
        if (n < N && k0 + wc < K) {
            const long long e = (long long)n * K + k0 + wc;
            wscale = nf4_scale(e / 64, double_quant, absmax_f32, absmax_codes, nested_absmax, nested_code, offset);
            wv = *reinterpret_cast<const uint4*>(packed + e / 2);
        }
    };
    // acc: the running f32 sums; part: one step's MMA accumulators, started at zero every step, so a tensor
    // core that rounds its accumulation toward zero loses at most one step's worth, not all of K's.
    float acc[MT][MMA_BN / 8][4], part[MT][MMA_BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < MMA_BN / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mt][j][i] = 0.f;
    load(k_begin);
    __syncthreads();  // the code table
    for (int k0 = k_begin; k0 < k_end; k0 += MMA_BK) {
#pragma unroll
        for (int i = 0; i < XV; i++) {
            const int q = tid + MMA_THREADS * i, r = q / (MMA_BK / 4), c = 4 * (q % (MMA_BK / 4));
            *reinterpret_cast<float4*>(xs + r * MMA_LD + c) = xv[i];
        }
        float w[32];
        nf4_decode32(wv, code, wscale, w);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float4 v;
            v.x = w[4 * j];
            v.y = w[4 * j + 1];
            v.z = w[4 * j + 2];
            v.w = w[4 * j + 3];
            *reinterpret_cast<float4*>(ws + wr * MMA_LD + wc + 4 * j) = v;
        }
        __syncthreads();
        if (k0 + MMA_BK < k_end) load(k0 + MMA_BK);
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < MMA_BN / 8; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) part[mt][j][i] = 0.f;
#pragma unroll
        for (int kk = 0; kk < MMA_WARP_K; kk += 8) {
            const int kc = warp * MMA_WARP_K + kk + t;
            unsigned int ah[MT][4], al[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                const float* a = xs + (16 * mt + g) * MMA_LD + kc;
                split_tf32(a[0], ah[mt][0], al[mt][0]);
                split_tf32(a[8 * MMA_LD], ah[mt][1], al[mt][1]);
                split_tf32(a[4], ah[mt][2], al[mt][2]);
                split_tf32(a[8 * MMA_LD + 4], ah[mt][3], al[mt][3]);
            }
#pragma unroll
            for (int j = 0; j < MMA_BN / 8; j++) {
                // B = Wᵀ: B[k][n] = ws[n][k].
                const float* b = ws + (8 * j + g) * MMA_LD + kc;
                unsigned int bh[2], bl[2];
                split_tf32(b[0], bh[0], bl[0]);
                split_tf32(b[4], bh[1], bl[1]);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_tf32(part[mt][j], al[mt], bh);
                    mma_tf32(part[mt][j], ah[mt], bl);
                    mma_tf32(part[mt][j], ah[mt], bh);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < MMA_BN / 8; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[mt][j][i] += part[mt][j][i];
        __syncthreads();
    }
    // The four warps' partial tiles, added in warp order: red[warp][row][column] over the staging buffer.
    float* red = sm;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < MMA_BN / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = 16 * mt + g + (i >= 2 ? 8 : 0), c = 8 * j + 2 * t + (i & 1);
                red[(warp * BM + r) * MMA_RED_LD + c] = acc[mt][j][i];
            }
    __syncthreads();
    const int splits = gridDim.z;
    const long long tiles = (long long)gridDim.x * gridDim.y, tile = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    for (int o = tid; o < BM * MMA_BN; o += MMA_THREADS) {
        const int r = o / MMA_BN, c = o % MMA_BN, m = m_base + r, n = n_base + c;
        const float* v = red + r * MMA_RED_LD + c;
        const float sum = ((v[0] + v[BM * MMA_RED_LD]) + v[2 * BM * MMA_RED_LD]) + v[3 * BM * MMA_RED_LD];
        if (splits > 1) {
            partial[((long long)blockIdx.z * tiles + tile) * (BM * MMA_BN) + o] = sum;
        } else if (m < M && n < N) {
            y[(long long)m * N + n] = sum;
        }
    }
    if (splits == 1) return;
    // The hand-over (CUTLASS's semaphore pattern): the barrier orders every thread's partial stores before
    // thread 0's fence, which makes them visible device-wide before the count; after the count, thread 0's
    // fence and the barrier order the other blocks' partials (counted earlier) before this block's loads.
    __syncthreads();
    if (tid == 0) {
        __threadfence();
        *last = atomicAdd(tile_done + tile, 1u) == (unsigned int)(splits - 1);
        __threadfence();
    }
    __syncthreads();
    if (!*last) return;
    for (int o = tid; o < BM * MMA_BN; o += MMA_THREADS) {
        const int r = o / MMA_BN, c = o % MMA_BN, m = m_base + r, n = n_base + c;
        if (m < M && n < N) {
            // Through L2 (__ldcg): the other blocks' partials were written from other SMs.
            const float* p = partial + tile * (BM * MMA_BN) + o;
            float sum = __ldcg(p);
            for (int z = 1; z < splits; z++) sum += __ldcg(p + z * tiles * (BM * MMA_BN));
            y[(long long)m * N + n] = sum;
        }
    }
    if (tid == 0) tile_done[tile] = 0u;
}

// The shared arrays live in the entry points (one staging buffer, reused by the epilogue's partial tiles).
#define NF4_MMA(BM)                                                                                              \
    extern "C" __global__ void nf4_matmul_mma##BM(NF4_PARAMS) {                                                  \
        __shared__ float code[16];                                                                               \
        __shared__ float4 sm[(BM + MMA_BN) * MMA_LD / 4];                                                        \
        __shared__ unsigned int last;                                                                            \
        static_assert(4 * BM * MMA_RED_LD <= (BM + MMA_BN) * MMA_LD, "the partial tiles fit the staging buffer"); \
        nf4_mma<BM / 16>(NF4_ARGS, reinterpret_cast<float*>(sm), code, &last);                                   \
    }
NF4_MMA(16)
NF4_MMA(32)

// Any shape: one warp per output (m, n), lanes striding over K with scalar loads; element e = n * K + k of the
// flattened weight sits in byte e / 2 (high nibble when e is even) of block e / 64.
extern "C" __global__ void nf4_matmul_generic(NF4_PARAMS) {
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
