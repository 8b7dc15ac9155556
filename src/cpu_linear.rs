//! CPU skeletons for `y[m, n] = x[m, k] · Wᵀ` over any weight format that can decode a row to f32, and the
//! dense (f32 / bf16 / f16 weight) linear op built on them.
//!
//! Two regimes, as in every serving engine: decode batches (a few rows) are memory-bound, so each weight
//! row is read once and dotted with every input row while it sits in L1; prefill batches (many rows) are
//! compute-bound, so weight rows are decoded into a thread-local f32 panel and multiplied with the `gemm`
//! crate's micro-kernels. candle's own CPU matmul pays ~60 µs of fixed cost per call on small shapes and
//! widens a whole bf16 weight to f32 on every call, which is why the serving path uses this op instead.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;

use crate::tensor_io::{cpu_f32, cpu_storage_from_f32};

/// Up to this many input rows, the row-at-a-time path; above, panels + gemm.
pub const GEMV_MAX_ROWS: usize = 12;
/// Weight rows decoded per panel on the panel path.
pub const PANEL: usize = 64;

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Output columns per rayon task for a weight with rows of `k` elements: enough tasks to balance the
/// threads, but each worth at least ~64K weight elements so small layers do not pay for waking threads.
pub fn column_chunk(n: usize, k: usize) -> usize {
    let balanced = n / (rayon::current_num_threads() * 8);
    let min_work = (1usize << 16).div_ceil(k.max(1));
    balanced.max(min_work).clamp(8, n.max(8))
}

/// Dot product, vectorized (AVX2+FMA when the CPU has it).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// The portable dot product (inlined into callers compiled for AVX2 it vectorizes for AVX2).
#[inline(always)]
pub(crate) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Independent partial sums let the compiler vectorize without reassociation licence.
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let chunks = n / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 16..n {
        s += a[i] * b[i];
    }
    s
}

/// Where the row-at-a-time path gets weight row `j` from.
pub enum Rows<'a> {
    /// A contiguous f32 `[n, k]` weight.
    F32(&'a [f32]),
    /// A decoder writing row `j` as f32 into the buffer.
    Decode(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

/// `y += alpha · x`, vectorized (AVX2+FMA when the CPU has it).
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            return unsafe { axpy_avx2(alpha, x, y) };
        }
    }
    axpy_portable(alpha, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy_portable(alpha, x, y)
}

#[inline(always)]
fn axpy_portable(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

/// Row-at-a-time `y = x·Wᵀ` for small `m`: each weight row is read (or decoded) once and dotted with every
/// input row.
pub fn gemv_rows(x: &[f32], m: usize, n: usize, k: usize, rows: Rows, y: &mut [f32]) {
    let chunk = column_chunk(n, k);
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each_init(
        || vec![0f32; k],
        |buf, t| {
            let j0 = t * chunk;
            for j in j0..(j0 + chunk).min(n) {
                let w: &[f32] = match &rows {
                    Rows::F32(w) => &w[j * k..(j + 1) * k],
                    Rows::Decode(decode) => {
                        decode(j, buf);
                        buf
                    }
                };
                for r in 0..m {
                    let v = dot(w, &x[r * k..(r + 1) * k]);
                    // SAFETY: each task owns columns j0..j0+chunk of every row.
                    unsafe { *y_ptr.get().add(r * n + j) = v };
                }
            }
        },
    );
}

/// How [`gemm_rows`] reads its right-hand side `[k, n]`.
#[derive(Clone, Copy)]
pub enum Rhs {
    /// Stored as `n` rows of `k` (a weight `W`, used as `Wᵀ`), rows `stride` apart.
    TransposedRows(*const f32, usize),
    /// Stored as `k` rows of `n`, rows `stride` apart.
    Rows(*const f32, usize),
}

/// `dst[m, n] = (accumulate ? dst : 0) + scale · lhs[m, k] · rhs` on row-major operands (row strides
/// `dst_rs`, `lhs_rs`) with the `gemm` crate's micro-kernels.
///
/// # Safety
/// Every pointer must cover its matrix at the given strides, and `dst` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: Rhs,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    let (rhs, rhs_cs, rhs_rs) = match rhs {
        Rhs::TransposedRows(p, stride) => (p, stride as isize, 1),
        Rhs::Rows(p, stride) => (p, 1, stride as isize),
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// Panel `y = x·Wᵀ` for large `m`: 64 weight rows at a time decoded into a thread-local panel, then gemm.
pub fn panel_matmul(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    decode_row: &(dyn Fn(usize, &mut [f32]) + Sync),
    y: &mut [f32],
) {
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(PANEL)).into_par_iter().for_each_init(
        || vec![0f32; PANEL * k],
        |panel, p| {
            let j0 = p * PANEL;
            let rows = PANEL.min(n - j0);
            for r in 0..rows {
                decode_row(j0 + r, &mut panel[r * k..(r + 1) * k]);
            }
            // SAFETY: y[:, j0..j0+rows] belongs to this task; strides describe x [m,k], panelᵀ [k,rows].
            unsafe {
                gemm_rows(
                    (m, rows, k),
                    y_ptr.get().add(j0),
                    n,
                    false,
                    x.as_ptr(),
                    k,
                    Rhs::TransposedRows(panel.as_ptr(), k),
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        },
    );
}

/// A weight as the tiled kernel reads it: `fill(row, c0, out)` writes elements `c0..c0 + out.len()` of weight
/// row `row` as f32 (decoding NF4, widening bf16, or copying f32) in the order the input rows are given in.
pub struct PanelSource<'a> {
    pub k: usize,
    pub fill: &'a (dyn Fn(usize, usize, &mut [f32]) + Sync),
}

/// Whether the tiled AVX2 kernel can run here for rows of `k` elements.
pub fn tiled_available(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        k.is_multiple_of(8) && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        false
    }
}

/// `y[m, n] = x[m, k] · Wᵀ` as a blocked GEMM for batches of rows: 4 weight rows × 1024 columns are filled
/// into an L1 panel once and swept by 3×4 register tiles of input rows × weight rows (x86-64 AVX2+FMA; the
/// caller checks [`tiled_available`]). Measured 60–85 GFLOP/s on 2 Zen 3 cores from 12 to 256 rows.
pub fn tiled_matmul(x: &[f32], m: usize, n: usize, w: &PanelSource, y: &mut [f32]) {
    assert!(tiled_available(w.k), "tiled kernel unavailable");
    #[cfg(target_arch = "x86_64")]
    {
        let chunk = column_chunk(n, w.k).next_multiple_of(tiled::TILE_J);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|t| {
            let j0 = t * chunk;
            // SAFETY: each task writes only columns j0..j0+chunk of y; AVX2+FMA checked above.
            let mut out = |r: usize, j: usize, v: f32| unsafe { *y_ptr.get().add(r * n + j) = v };
            unsafe { tiled::matmul_rows(x, m, w, j0..(j0 + chunk).min(n), &mut out) };
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, m, n, y);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod tiled {
    use std::arch::x86_64::*;

    use super::PanelSource;

    /// Horizontal sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Register tile: `R` input rows × `J` weight rows, `R·J` vector accumulators; adds
    /// `Σ_k x[r][k] · panel[j][k]` over `len` elements (`len % 8 == 0`) to `sums[r][j]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn micro<const R: usize, const J: usize>(
        x: [&[f32]; R],
        panel: [&[f32]; J],
        len: usize,
        sums: &mut [[f32; 4]],
    ) {
        let mut acc = [[_mm256_setzero_ps(); J]; R];
        let mut kk = 0;
        while kk < len {
            let mut xv = [_mm256_setzero_ps(); R];
            for r in 0..R {
                xv[r] = _mm256_loadu_ps(x[r].as_ptr().add(kk));
            }
            for j in 0..J {
                let wv = _mm256_loadu_ps(panel[j].as_ptr().add(kk));
                for r in 0..R {
                    acc[r][j] = _mm256_fmadd_ps(xv[r], wv, acc[r][j]);
                }
            }
            kk += 8;
        }
        for r in 0..R {
            for j in 0..J {
                sums[r][j] += hsum(acc[r][j]);
            }
        }
    }

    /// Weight rows per tile.
    pub const TILE_J: usize = 4;
    /// Columns per panel (4 rows × 1024 × 4 B = 16 KiB: stays in L1).
    const TILE_K: usize = 1024;

    /// `out(r, j, x[r] · W[j])` for weight rows `cols` and every input row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w.k % 8 == 0`, `x.len() == m * w.k`, `cols` within the weight.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matmul_rows(
        x: &[f32],
        m: usize,
        w: &PanelSource,
        cols: std::ops::Range<usize>,
        out: &mut dyn FnMut(usize, usize, f32),
    ) {
        let k = w.k;
        let mut panel = vec![0f32; TILE_J * TILE_K];
        let mut sums = vec![[0f32; 4]; m];
        let mut jt = cols.start;
        while jt < cols.end {
            let nj = (cols.end - jt).min(TILE_J);
            sums.iter_mut().for_each(|s| *s = [0.0; 4]);
            let mut c0 = 0;
            while c0 < k {
                let len = (k - c0).min(TILE_K);
                for j in 0..nj {
                    (w.fill)(jt + j, c0, &mut panel[j * TILE_K..j * TILE_K + len]);
                }
                let p = |j: usize| &panel[j.min(nj - 1) * TILE_K..];
                let mut r = 0;
                while r < m {
                    let nr = (m - r).min(3);
                    let xr = |i: usize| &x[(r + i.min(nr - 1)) * k + c0..];
                    let s = &mut sums[r..r + nr];
                    match (nr, nj) {
                        (3, 4) => micro::<3, 4>([xr(0), xr(1), xr(2)], [p(0), p(1), p(2), p(3)], len, s),
                        (3, 3) => micro::<3, 3>([xr(0), xr(1), xr(2)], [p(0), p(1), p(2)], len, s),
                        (3, 2) => micro::<3, 2>([xr(0), xr(1), xr(2)], [p(0), p(1)], len, s),
                        (3, _) => micro::<3, 1>([xr(0), xr(1), xr(2)], [p(0)], len, s),
                        (2, 4) => micro::<2, 4>([xr(0), xr(1)], [p(0), p(1), p(2), p(3)], len, s),
                        (2, 3) => micro::<2, 3>([xr(0), xr(1)], [p(0), p(1), p(2)], len, s),
                        (2, 2) => micro::<2, 2>([xr(0), xr(1)], [p(0), p(1)], len, s),
                        (2, _) => micro::<2, 1>([xr(0), xr(1)], [p(0)], len, s),
                        (_, 4) => micro::<1, 4>([xr(0)], [p(0), p(1), p(2), p(3)], len, s),
                        (_, 3) => micro::<1, 3>([xr(0)], [p(0), p(1), p(2)], len, s),
                        (_, 2) => micro::<1, 2>([xr(0)], [p(0), p(1)], len, s),
                        (_, _) => micro::<1, 1>([xr(0)], [p(0)], len, s),
                    }
                    r += nr;
                }
                c0 += len;
            }
            for (r, s) in sums.iter().enumerate() {
                for (j, v) in s.iter().take(nj).enumerate() {
                    out(r, jt + j, *v);
                }
            }
            jt += nj;
        }
    }
}

/// The dense linear op for the serving path: `x[.., k]`, `w[n, k]` (f32/bf16/f16) → `x·Wᵀ` in x's dtype.
pub struct DenseLinear;

impl CustomOp2 for DenseLinear {
    fn name(&self) -> &'static str {
        "dense-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = wl.shape().dims2()?;
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("dense-linear: input {dims:?} does not end in {k}")
        }
        let m = xl.shape().elem_count() / k.max(1);
        let x = cpu_f32(xs, xl)?;
        let Some((w0, w1)) = wl.contiguous_offsets() else {
            candle_core::bail!("dense-linear: weight must be contiguous")
        };
        let mut y = vec![0f32; m * n];
        match ws {
            CpuStorage::F32(w) => {
                let w = &w[w0..w1];
                if m <= GEMV_MAX_ROWS && !(m > 4 && tiled_available(k)) {
                    gemv_rows(&x, m, n, k, Rows::F32(w), &mut y);
                } else if tiled_available(k) {
                    let fill = |j: usize, c0: usize, out: &mut [f32]| {
                        out.copy_from_slice(&w[j * k + c0..j * k + c0 + out.len()])
                    };
                    tiled_matmul(&x, m, n, &PanelSource { k, fill: &fill }, &mut y);
                } else {
                    // The weight already is f32: one gemm over all of it, gemm's own threading.
                    unsafe {
                        gemm_rows(
                            (m, n, k),
                            y.as_mut_ptr(),
                            n,
                            false,
                            x.as_ptr(),
                            k,
                            Rhs::TransposedRows(w.as_ptr(), k),
                            1.0,
                            gemm::Parallelism::Rayon(rayon::current_num_threads()),
                        );
                    }
                }
            }
            CpuStorage::BF16(w) => {
                let w = &w[w0..w1];
                // bf16 → f32 is a 16-bit shift of the bit pattern (vectorizes, unlike a per-value call).
                let widen = |j: usize, c0: usize, out: &mut [f32]| {
                    for (o, v) in out.iter_mut().zip(&w[j * k + c0..]) {
                        *o = f32::from_bits((v.to_bits() as u32) << 16);
                    }
                };
                run_widened(&x, m, n, k, &widen, &mut y);
            }
            CpuStorage::F16(w) => {
                let w = &w[w0..w1];
                let widen = |j: usize, c0: usize, out: &mut [f32]| {
                    for (o, v) in out.iter_mut().zip(&w[j * k + c0..]) {
                        *o = v.to_f32();
                    }
                };
                run_widened(&x, m, n, k, &widen, &mut y);
            }
            other => candle_core::bail!("dense-linear: unsupported weight dtype {:?}", other.dtype()),
        }
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(n);
        Ok((cpu_storage_from_f32(y, xs.dtype())?, Shape::from(out_dims)))
    }
}

/// Dense 16-bit weights: `widen(row, c0, out)` converts a slice of a weight row to f32.
fn run_widened(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    widen: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
    y: &mut [f32],
) {
    if m > 4 && tiled_available(k) {
        tiled_matmul(x, m, n, &PanelSource { k, fill: widen }, y);
    } else if m <= GEMV_MAX_ROWS {
        gemv_rows(x, m, n, k, Rows::Decode(&|j, buf| widen(j, 0, buf)), y);
    } else {
        panel_matmul(x, m, n, k, &|j, buf| widen(j, 0, buf), y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn dense_op_equals_candle_matmul_for_all_dtypes_and_sizes() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &(m, k, n) in &[(1, 64, 10), (3, 100, 130), (12, 96, 48), (13, 96, 200), (70, 33, 65)] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let fast = x.apply_op2_no_bwd(&w, &DenseLinear).unwrap().to_dtype(DType::F32).unwrap();
                let xf = x.to_dtype(DType::F32).unwrap();
                let wf = w.to_dtype(DType::F32).unwrap();
                let reference = xf.matmul(&wf.t().unwrap()).unwrap();
                let diff = (fast - &reference).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                let norm = reference.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                // bf16/f16 outputs are rounded to the dtype: allow its precision.
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                assert!((diff / norm).sqrt() < tol, "{dtype:?} m={m} k={k} n={n}: {}", (diff / norm).sqrt());
            }
        }
    }
}
