//! The NF4 linear op on the CPU: `y[m, n] = x[m, k] · Wᵀ` with `W [n, k]` in NF4, plus the transposed
//! product used by the backward pass (`g[m, n] · W → [m, k]`).
//!
//! Three implementations behind one signature:
//! - [`matmul_reference`]: dequantize the whole weight, then a plain triple loop. The oracle.
//! - decode path (`m ≤ GEMV_MAX_ROWS`, the decode steps of serving): each weight byte is read once and its two
//!   codes go straight into the dot products of every input row — on x86-64 with AVX2+FMA the 16-entry code
//!   table lives in two registers and a byte becomes two f32 lanes with permutes; elsewhere a byte→pair
//!   lookup table. The input rows are de-interleaved once per call (even/odd elements of each 64-block) so
//!   high and low nibbles need no shuffling back into order.
//! - panel path (prefill and training): 64 weight rows at a time are dequantized into a thread-local panel
//!   (never the whole weight) and multiplied with the `gemm` crate's micro-kernels.
//!
//! Work is split over output columns with rayon; every task writes a disjoint set of columns.

use rayon::prelude::*;

use super::nf4::{Nf4Weight, BLOCK};

/// Up to this many input rows, the fused decode kernel; above, dequantized panels + gemm.
pub const GEMV_MAX_ROWS: usize = 12;
/// Weight rows dequantized per panel on the panel path.
const PANEL: usize = 64;

/// Plain reference: full dequantization, then `y = x · Wᵀ` accumulated in f64.
pub fn matmul_reference(x: &[f32], m: usize, w: &Nf4Weight) -> Vec<f32> {
    let (n, k) = w.dims2();
    assert_eq!(x.len(), m * k);
    let wd = w.dequantize();
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for c in 0..k {
                acc += x[r * k + c] as f64 * wd[j * k + c] as f64;
            }
            y[r * n + j] = acc as f32;
        }
    }
    y
}

/// Reference for the transposed product `g[m, n] · W[n, k]`.
pub fn matmul_t_reference(g: &[f32], m: usize, w: &Nf4Weight) -> Vec<f32> {
    let (n, k) = w.dims2();
    assert_eq!(g.len(), m * n);
    let wd = w.dequantize();
    let mut out = vec![0f32; m * k];
    for r in 0..m {
        for c in 0..k {
            let mut acc = 0f64;
            for j in 0..n {
                acc += g[r * n + j] as f64 * wd[j * k + c] as f64;
            }
            out[r * k + c] = acc as f32;
        }
    }
    out
}

/// Fast `y[m, n] = x[m, k] · Wᵀ`.
pub fn matmul(x: &[f32], m: usize, w: &Nf4Weight) -> Vec<f32> {
    let (n, k) = w.dims2();
    assert_eq!(x.len(), m * k, "input is not [m, {k}]");
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    if m <= GEMV_MAX_ROWS {
        gemv(x, m, w, &mut y);
    } else {
        panel_matmul(x, m, w, &mut y);
    }
    y
}

/// Fast `g[m, n] · W[n, k] → [m, k]` (the gradient with respect to the linear layer's input).
pub fn matmul_t(g: &[f32], m: usize, w: &Nf4Weight) -> Vec<f32> {
    let (n, k) = w.dims2();
    assert_eq!(g.len(), m * n, "gradient is not [m, {n}]");
    let mut out = vec![0f32; m * k];
    if m == 0 || k == 0 {
        return out;
    }
    // Split the input features into column stripes; each task dequantizes its stripe of every weight row
    // panel by panel and accumulates into its own columns of `out`.
    let stripe = k.div_ceil(rayon::current_num_threads() * 2).max(64);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..k.div_ceil(stripe)).into_par_iter().for_each(|s| {
        let c0 = s * stripe;
        let c1 = (c0 + stripe).min(k);
        let width = c1 - c0;
        let mut panel = vec![0f32; PANEL * width];
        let mut row = vec![0f32; k];
        for j0 in (0..n).step_by(PANEL) {
            let rows = PANEL.min(n - j0);
            for p in 0..rows {
                decode_row(w, j0 + p, &mut row);
                panel[p * width..(p + 1) * width].copy_from_slice(&row[c0..c1]);
            }
            // out[:, c0..c1] += g[:, j0..j0+rows] · panel[rows, width]
            unsafe {
                gemm::gemm(
                    m,
                    width,
                    rows,
                    out_ptr.get().add(c0),
                    1,
                    k as isize,
                    j0 > 0,
                    g.as_ptr().add(j0),
                    1,
                    n as isize,
                    panel.as_ptr(),
                    1,
                    width as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    out
}

/// Decodes weight row `j` (k elements) into `out`, handling blocks that straddle rows.
pub fn decode_row(w: &Nf4Weight, j: usize, out: &mut [f32]) {
    let (_, k) = w.dims2();
    let start = j * k;
    if k % BLOCK == 0 {
        let lut = pair_lut(&w.code);
        let bytes = &w.packed[start / 2..(start + k) / 2];
        for (b, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let s = w.absmax.get(start / BLOCK + b);
            for (i, pair) in chunk.chunks_exact_mut(2).enumerate() {
                let [a, c] = lut[bytes[b * BLOCK / 2 + i] as usize];
                pair[0] = a * s;
                pair[1] = c * s;
            }
        }
    } else {
        for (c, o) in out.iter_mut().enumerate() {
            let i = start + c;
            *o = w.code[w.code_index(i) as usize] * w.absmax.get(i / BLOCK);
        }
    }
}

/// `byte → [code[hi], code[lo]]`.
fn pair_lut(code: &[f32; 16]) -> [[f32; 2]; 256] {
    let mut lut = [[0f32; 2]; 256];
    for (b, e) in lut.iter_mut().enumerate() {
        *e = [code[b >> 4], code[b & 15]];
    }
    lut
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Output columns per rayon task: enough tasks to balance two to a few dozen threads.
fn column_chunk(n: usize) -> usize {
    (n / (rayon::current_num_threads() * 8)).clamp(8, 256)
}

fn panel_matmul(x: &[f32], m: usize, w: &Nf4Weight, y: &mut [f32]) {
    let (n, k) = w.dims2();
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(PANEL)).into_par_iter().for_each_init(
        || vec![0f32; PANEL * k],
        |panel, p| {
            let j0 = p * PANEL;
            let rows = PANEL.min(n - j0);
            for r in 0..rows {
                decode_row(w, j0 + r, &mut panel[r * k..(r + 1) * k]);
            }
            // y[:, j0..j0+rows] = x[m, k] · panel[rows, k]ᵀ; tasks write disjoint columns.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    y_ptr.get().add(j0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
}

fn gemv(x: &[f32], m: usize, w: &Nf4Weight, y: &mut [f32]) {
    let (n, k) = w.dims2();
    let chunk = column_chunk(n);
    let y_ptr = SendPtr(y.as_mut_ptr());
    let aligned = k % BLOCK == 0;
    #[cfg(target_arch = "x86_64")]
    let simd = aligned && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    // The SIMD kernel reads each 64-block of x as its 32 even elements followed by its 32 odd ones.
    let xd: Vec<f32> = if simd { deinterleave_blocks(x) } else { Vec::new() };
    let lut = pair_lut(&w.code);
    (0..n.div_ceil(chunk)).into_par_iter().for_each_init(
        || vec![0f32; k],
        |row_buf, t| {
            let j0 = t * chunk;
            let j1 = (j0 + chunk).min(n);
            let mut scales = vec![0f32; k / BLOCK];
            for j in j0..j1 {
                if simd {
                    #[cfg(target_arch = "x86_64")]
                    {
                        for (b, s) in scales.iter_mut().enumerate() {
                            *s = w.absmax.get(j * k / BLOCK + b);
                        }
                        let codes = &w.packed[j * k / 2..(j + 1) * k / 2];
                        let mut r = 0;
                        while r < m {
                            let g = (m - r).min(4);
                            let rows = |i: usize| &xd[(r + i) * k..(r + i + 1) * k];
                            // SAFETY: AVX2 and FMA were detected above; slices have the lengths the kernel reads.
                            let sums: [f32; 4] = unsafe {
                                match g {
                                    1 => pad(avx2::dot_rows::<1>(codes, &scales, [rows(0)], &w.code)),
                                    2 => pad(avx2::dot_rows::<2>(codes, &scales, [rows(0), rows(1)], &w.code)),
                                    3 => pad(avx2::dot_rows::<3>(codes, &scales, [rows(0), rows(1), rows(2)], &w.code)),
                                    _ => avx2::dot_rows::<4>(
                                        codes,
                                        &scales,
                                        [rows(0), rows(1), rows(2), rows(3)],
                                        &w.code,
                                    ),
                                }
                            };
                            for (i, s) in sums.iter().take(g).enumerate() {
                                unsafe { *y_ptr.get().add((r + i) * n + j) = *s };
                            }
                            r += g;
                        }
                    }
                } else if aligned {
                    // Portable fused path: decode a block through the pair table, dot with every row.
                    let start = j * k;
                    let mut acc = vec![0f32; m];
                    for b in 0..k / BLOCK {
                        let s = w.absmax.get(start / BLOCK + b);
                        let bytes = &w.packed[(start + b * BLOCK) / 2..(start + (b + 1) * BLOCK) / 2];
                        let mut wb = [0f32; BLOCK];
                        for (i, &byte) in bytes.iter().enumerate() {
                            let [hi, lo] = lut[byte as usize];
                            wb[2 * i] = hi * s;
                            wb[2 * i + 1] = lo * s;
                        }
                        for (r, a) in acc.iter_mut().enumerate() {
                            *a += dot(&wb, &x[r * k + b * BLOCK..r * k + (b + 1) * BLOCK]);
                        }
                    }
                    for (r, a) in acc.iter().enumerate() {
                        unsafe { *y_ptr.get().add(r * n + j) = *a };
                    }
                } else {
                    decode_row(w, j, row_buf);
                    for r in 0..m {
                        let v = dot(row_buf, &x[r * k..(r + 1) * k]);
                        unsafe { *y_ptr.get().add(r * n + j) = v };
                    }
                }
            }
        },
    );
}

#[cfg(target_arch = "x86_64")]
fn pad<const R: usize>(v: [f32; R]) -> [f32; 4] {
    let mut out = [0f32; 4];
    out[..R].copy_from_slice(&v);
    out
}

/// Each 64-element block of every row → its 32 even elements, then its 32 odd elements.
fn deinterleave_blocks(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
        for i in 0..BLOCK / 2 {
            dst[i] = src[2 * i];
            dst[BLOCK / 2 + i] = src[2 * i + 1];
        }
    }
    out
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums let the compiler vectorize without reassociation licence.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The code table lookup for eight 4-bit indices held in i32 lanes: two 8-entry permutes, blended on
    /// bit 3 of the index (moved to the sign bit).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lookup(idx: __m256i, lo8: __m256, hi8: __m256) -> __m256 {
        let a = _mm256_permutevar8x32_ps(lo8, idx);
        let b = _mm256_permutevar8x32_ps(hi8, idx);
        let mask = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
        _mm256_blendv_ps(a, b, mask)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Dot products of one NF4 weight row (`codes`: k/2 bytes, `scales`: k/64 decoded absmax) with `R` input
    /// rows given block-de-interleaved (each 64-block: 32 even elements, then 32 odd).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `codes.len() * 2 == scales.len() * 64 == rows[i].len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<const R: usize>(
        codes: &[u8],
        scales: &[f32],
        rows: [&[f32]; R],
        code: &[f32; 16],
    ) -> [f32; R] {
        debug_assert_eq!(codes.len() * 2, scales.len() * 64);
        let lo8 = _mm256_loadu_ps(code.as_ptr());
        let hi8 = _mm256_loadu_ps(code.as_ptr().add(8));
        let nib = _mm256_set1_epi32(15);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (b, &scale) in scales.iter().enumerate() {
            let s = _mm256_set1_ps(scale);
            let bytes = codes.as_ptr().add(b * 32);
            let mut even = [_mm256_setzero_ps(); 4];
            let mut odd = [_mm256_setzero_ps(); 4];
            for c in 0..4 {
                let raw = _mm_loadl_epi64(bytes.add(c * 8) as *const __m128i);
                let v = _mm256_cvtepu8_epi32(raw);
                even[c] = _mm256_mul_ps(lookup(_mm256_srli_epi32::<4>(v), lo8, hi8), s);
                odd[c] = _mm256_mul_ps(lookup(_mm256_and_si256(v, nib), lo8, hi8), s);
            }
            for (r, row) in rows.iter().enumerate() {
                let xb = row.as_ptr().add(b * 64);
                for c in 0..4 {
                    acc[r][0] = _mm256_fmadd_ps(even[c], _mm256_loadu_ps(xb.add(c * 8)), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(odd[c], _mm256_loadu_ps(xb.add(32 + c * 8)), acc[r][1]);
                }
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    #[test]
    fn fast_paths_equal_the_reference_on_many_shapes() {
        let mut rng = Rng::new(11);
        // Aligned (k % 64 == 0) and straddling shapes; decode-sized and prefill-sized m.
        for &(n, k) in &[(96, 96), (48, 96), (256, 96), (96, 256), (130, 128), (64, 192), (7, 9), (33, 64), (200, 512)]
        {
            for dq in [false, true] {
                let w = Nf4Weight::quantize(&random(n * k, &mut rng), &[n, k], dq);
                for &m in &[1, 2, 3, 4, 5, 8, 12, 13, 32, 100] {
                    let x = random(m * k, &mut rng);
                    let fast = matmul(&x, m, &w);
                    let reference = matmul_reference(&x, m, &w);
                    let e = rel_l2(&fast, &reference);
                    assert!(e <= 1e-5, "n={n} k={k} m={m} dq={dq}: rel err {e}");
                    let g = random(m * n, &mut rng);
                    let e = rel_l2(&matmul_t(&g, m, &w), &matmul_t_reference(&g, m, &w));
                    assert!(e <= 1e-5, "transposed n={n} k={k} m={m}: rel err {e}");
                }
            }
        }
    }

    #[test]
    fn decode_row_matches_dequantize() {
        let mut rng = Rng::new(5);
        for &(n, k) in &[(5, 64), (3, 96), (4, 13)] {
            let w = Nf4Weight::quantize(&random(n * k, &mut rng), &[n, k], true);
            let full = w.dequantize();
            let mut row = vec![0f32; k];
            for j in 0..n {
                decode_row(&w, j, &mut row);
                assert_eq!(&row[..], &full[j * k..(j + 1) * k]);
            }
        }
    }
}
