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

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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
                if m <= GEMV_MAX_ROWS {
                    gemv_rows(&x, m, n, k, Rows::F32(w), &mut y);
                } else {
                    // The weight already is f32: one gemm over all of it, gemm's own threading.
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            k,
                            y.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            x.as_ptr(),
                            1,
                            k as isize,
                            w.as_ptr(),
                            k as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::Rayon(rayon::current_num_threads()),
                        );
                    }
                }
            }
            CpuStorage::BF16(w) => {
                let w = &w[w0..w1];
                // bf16 → f32 is a 16-bit shift of the bit pattern (vectorizes, unlike a per-value call).
                let decode = |j: usize, out: &mut [f32]| {
                    for (o, v) in out.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                        *o = f32::from_bits((v.to_bits() as u32) << 16);
                    }
                };
                run_decoded(&x, m, n, k, &decode, &mut y);
            }
            CpuStorage::F16(w) => {
                let w = &w[w0..w1];
                let decode = |j: usize, out: &mut [f32]| {
                    for (o, v) in out.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                        *o = v.to_f32();
                    }
                };
                run_decoded(&x, m, n, k, &decode, &mut y);
            }
            other => candle_core::bail!("dense-linear: unsupported weight dtype {:?}", other.dtype()),
        }
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(n);
        Ok((cpu_storage_from_f32(y, xs.dtype())?, Shape::from(out_dims)))
    }
}

fn run_decoded(x: &[f32], m: usize, n: usize, k: usize, decode: &(dyn Fn(usize, &mut [f32]) + Sync), y: &mut [f32]) {
    if m <= GEMV_MAX_ROWS {
        gemv_rows(x, m, n, k, Rows::Decode(decode), y);
    } else {
        panel_matmul(x, m, n, k, decode, y);
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
