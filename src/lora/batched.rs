//! The batched-LoRA op: for one linear layer and a batch whose rows belong to different adapters,
//! `y[rows] += scale · (x[rows] · Aᵀ) · Bᵀ` per segment of rows — shrink, then expand — each adapter at
//! its own rank (no padding to the largest). Rows outside every segment (base-model requests) are untouched.
//!
//! [`apply_reference`] is the plain candle-ops oracle; [`apply`] is the CPU fast path (segments in parallel,
//! each split into row chunks, `gemm` micro-kernels for shrink and expand, reading each adapter's A and Bᵀ
//! once per chunk).

use std::ops::Range;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{LinearId, LoraWeights};
use crate::cpu_linear::{axpy, dot, gemm_rows, Rhs};
use crate::tensor_io::{tensor_from_f32, with_f32};

/// Rows `rows` of the batch use `adapter`.
#[derive(Clone, Copy)]
pub struct LoraSegment<'a> {
    pub rows: (usize, usize),
    pub adapter: &'a LoraWeights,
}

impl<'a> LoraSegment<'a> {
    pub fn new(rows: Range<usize>, adapter: &'a LoraWeights) -> Self {
        LoraSegment { rows: (rows.start, rows.end), adapter }
    }

    fn range(&self) -> Range<usize> {
        self.rows.0..self.rows.1
    }
}

/// Checks segments are in order and do not overlap (the batch builder guarantees it; a violation is a bug).
fn check_segments(segments: &[LoraSegment], rows: usize) -> Result<()> {
    let mut end = 0;
    for s in segments {
        if s.rows.0 < end || s.rows.1 < s.rows.0 || s.rows.1 > rows {
            candle_core::bail!("LoRA segments overlap or exceed the batch: {:?} of {rows} rows", s.rows)
        }
        end = s.rows.1;
    }
    Ok(())
}

/// Reference: candle ops, one segment at a time, `y + scale · x·Aᵀ·Bᵀ`.
pub fn apply_reference(y: &Tensor, x: &Tensor, id: LinearId, segments: &[LoraSegment]) -> Result<Tensor> {
    let (rows, _) = y.dims2()?;
    check_segments(segments, rows)?;
    let mut parts = Vec::new();
    let mut cursor = 0;
    for s in segments {
        let (r0, r1) = s.rows;
        if r0 > cursor {
            parts.push(y.narrow(0, cursor, r0 - cursor)?);
        }
        let ys = y.narrow(0, r0, r1 - r0)?;
        match s.adapter.module(id) {
            Some(m) if r1 > r0 => {
                let xs = x.narrow(0, r0, r1 - r0)?.to_dtype(candle_core::DType::F32)?;
                let delta = xs.matmul(&m.a.t()?)?.matmul(&m.b_t)?.affine(m.scale as f64, 0.0)?;
                parts.push((ys.to_dtype(candle_core::DType::F32)? + delta)?.to_dtype(y.dtype())?);
            }
            _ => parts.push(ys),
        }
        cursor = r1;
    }
    if cursor < rows {
        parts.push(y.narrow(0, cursor, rows - cursor)?);
    }
    Tensor::cat(&parts, 0)
}

/// Rows per parallel task within one segment.
const ROW_CHUNK: usize = 32;
/// Up to this many rows a work item uses dot/axpy kernels rather than two gemm calls.
const SMALL_ROWS: usize = 2;

struct Work<'a> {
    rows: Range<usize>,
    a: &'a [f32],
    b_t: &'a [f32],
    rank: usize,
    scale: f32,
}

/// Fast CPU path of the batched-LoRA op.
pub fn apply(y: &Tensor, x: &Tensor, id: LinearId, segments: &[LoraSegment]) -> Result<Tensor> {
    let (rows, out_f) = y.dims2()?;
    let (_, in_f) = x.dims2()?;
    check_segments(segments, rows)?;
    let active: Vec<(Range<usize>, &super::LoraModule)> = segments
        .iter()
        .filter(|s| s.rows.1 > s.rows.0)
        .filter_map(|s| s.adapter.module(id).map(|m| (s.range(), m)))
        .collect();
    if active.is_empty() {
        return Ok(y.clone());
    }
    if !y.device().is_cpu() {
        return apply_reference(y, x, id, segments);
    }
    // Hold every adapter's f32 slices for the duration of the kernel.
    let guards: Vec<_> =
        active.iter().map(|(_, m)| (m.a.storage_and_layout(), m.b_t.storage_and_layout(), m.rank(), m.scale)).collect();
    let mut work = Vec::new();
    for ((range, _), (a, b_t, rank, scale)) in active.iter().zip(&guards) {
        let a = cpu_slice(&a.0, a.1)?;
        let b_t = cpu_slice(&b_t.0, b_t.1)?;
        if a.len() != rank * in_f || b_t.len() != rank * out_f {
            candle_core::bail!("LoRA module {id} does not fit the layer ({in_f} → {out_f})")
        }
        let mut r = range.start;
        while r < range.end {
            let end = (r + ROW_CHUNK).min(range.end);
            work.push(Work { rows: r..end, a, b_t, rank: *rank, scale: *scale });
            r = end;
        }
    }
    let mut y_data = with_f32(y, |v| v.to_vec())?;
    with_f32(x, |xs| {
        // Split y into the disjoint row ranges the work items own.
        let mut slices: Vec<(&Work, &mut [f32])> = Vec::with_capacity(work.len());
        let mut rest: &mut [f32] = &mut y_data;
        let mut offset = 0;
        for w in &work {
            let (_, tail) = rest.split_at_mut((w.rows.start - offset) * out_f);
            let (mine, tail) = tail.split_at_mut(w.rows.len() * out_f);
            slices.push((w, mine));
            rest = tail;
            offset = w.rows.end;
        }
        slices.into_par_iter().for_each(|(w, ys)| {
            let n = w.rows.len();
            let xs = &xs[w.rows.start * in_f..w.rows.end * in_f];
            if n <= SMALL_ROWS {
                // Decode steps: each row's shrink is r dot products with A's rows, its expand r scaled rows
                // of Bᵀ added in; both stream the adapter once, vectorized.
                for (x, y) in xs.chunks_exact(in_f).zip(ys.chunks_exact_mut(out_f)) {
                    for j in 0..w.rank {
                        let t = dot(x, &w.a[j * in_f..(j + 1) * in_f]);
                        axpy(w.scale * t, &w.b_t[j * out_f..(j + 1) * out_f], y);
                    }
                }
                return;
            }
            let mut t = vec![0f32; n * w.rank];
            // SAFETY: all pointers cover the matrices with the given strides (checked lengths above).
            unsafe {
                // shrink: t[n, r] = x[n, in] · Aᵀ   (A is [r, in])
                gemm_rows(
                    (n, w.rank, in_f),
                    t.as_mut_ptr(),
                    w.rank,
                    false,
                    xs.as_ptr(),
                    in_f,
                    Rhs::TransposedRows(w.a.as_ptr(), in_f),
                    1.0,
                    gemm::Parallelism::None,
                );
                // expand: y[n, out] += scale · t[n, r] · Bᵀ   (Bᵀ is [r, out])
                gemm_rows(
                    (n, out_f, w.rank),
                    ys.as_mut_ptr(),
                    out_f,
                    true,
                    t.as_ptr(),
                    w.rank,
                    Rhs::Rows(w.b_t.as_ptr(), out_f),
                    w.scale,
                    gemm::Parallelism::None,
                );
            }
        });
    })?;
    drop(guards);
    tensor_from_f32(y_data, &[rows, out_f], y.dtype(), y.device())
}

fn cpu_slice<'a>(storage: &'a candle_core::Storage, layout: &candle_core::Layout) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => match layout.contiguous_offsets() {
            Some((s, e)) => Ok(&v[s..e]),
            None => candle_core::bail!("LoRA weights must be contiguous"),
        },
        _ => candle_core::bail!("LoRA weights on the CPU path must be f32 CPU tensors"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::peft::BaseLayout;
    use crate::lora::synthetic::random_adapter;
    use crate::lora::ModuleKind;
    use candle_core::{DType, Device};

    #[test]
    fn fast_path_equals_reference_across_ranks_and_segment_sizes() {
        let dev = Device::Cpu;
        let layout = BaseLayout { layers: 1, dims: [(40, 24); 7] };
        let kinds = [ModuleKind::QProj];
        let a4 = random_adapter(&layout, 4, &kinds, 1, &dev).unwrap();
        let a16 = random_adapter(&layout, 16, &kinds, 2, &dev).unwrap();
        let a1 = random_adapter(&layout, 1, &kinds, 3, &dev).unwrap();
        let none = LoraWeights::new(1); // targets nothing: its rows keep the base output
        let id = LinearId::new(0, ModuleKind::QProj);
        let rows = 120;
        let x = Tensor::randn(0f32, 1.0, (rows, 40), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (rows, 24), &dev).unwrap();
        // Single rows (decode), gaps (base rows), a 70-row prefill segment split into chunks.
        let segs = [
            LoraSegment::new(0..1, &a4),
            LoraSegment::new(1..2, &a16),
            LoraSegment::new(3..5, &a1),
            LoraSegment::new(5..6, &none),
            LoraSegment::new(10..80, &a16),
            LoraSegment::new(80..83, &a4),
            LoraSegment::new(90..91, &a1),
        ];
        for dtype in [DType::F32, DType::BF16] {
            let (x, y) = (x.to_dtype(dtype).unwrap(), y.to_dtype(dtype).unwrap());
            let fast = apply(&y, &x, id, &segs).unwrap().to_dtype(DType::F32).unwrap();
            let reference = apply_reference(&y, &x, id, &segs).unwrap().to_dtype(DType::F32).unwrap();
            let diff = (&fast - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            assert!(diff < tol, "{dtype:?}: max diff {diff}");
            // Rows outside every segment are untouched.
            let yb = y.to_dtype(DType::F32).unwrap();
            for r in [2usize, 6, 85, 119] {
                let a = fast.get(r).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(a, yb.get(r).unwrap().to_vec1::<f32>().unwrap(), "row {r}");
            }
            // Rows inside a segment did change.
            assert_ne!(fast.get(0).unwrap().to_vec1::<f32>().unwrap(), yb.get(0).unwrap().to_vec1::<f32>().unwrap());
        }
    }

    #[test]
    fn overlapping_segments_are_rejected() {
        let dev = Device::Cpu;
        let layout = BaseLayout { layers: 1, dims: [(8, 8); 7] };
        let a = random_adapter(&layout, 2, &[ModuleKind::QProj], 1, &dev).unwrap();
        let x = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        let id = LinearId::new(0, ModuleKind::QProj);
        let segs = [LoraSegment::new(0..3, &a), LoraSegment::new(2..4, &a)];
        assert!(apply(&x, &x, id, &segs).is_err());
        assert!(apply(&x, &x, id, &[LoraSegment::new(0..5, &a)]).is_err());
    }
}
