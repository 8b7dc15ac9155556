//! Batched LoRA (shrink, expand) on the emulated device: segments of different ranks among base-model rows.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::emu::{Buf, Call};
use crate::{assert_nontrivial, normal, rel_l2, run, TOLERANCE};
use loraserve::gpu::launch::{self, LORA_MAX_RANK};
use loraserve::lora::batched::{apply_reference, LoraSegment};
use loraserve::lora::{LinearId, LoraModule, LoraWeights, ModuleKind};

/// One batched-LoRA op (shrink, then expand on the shrink's output) against `apply_reference`, launched as
/// `gpu::lora::apply_into` does; segments are `(rows, rank)`. Checks the deltas (not y0 + delta), the shrink's
/// scratch `t` against `x · Aᵀ`, and base-model rows bit for bit; returns (delta error, t error).
fn lora_errors(label: &str, rows: usize, in_f: usize, out_f: usize, segs: &[(Range<usize>, usize)]) -> (f64, f64) {
    let seed = 5000 + rows as u64 * 7 + in_f as u64 + out_f as u64 * 3;
    let id = LinearId::new(0, ModuleKind::QProj);
    let adapters: Vec<LoraWeights> = segs
        .iter()
        .enumerate()
        .map(|(j, &(_, rank))| {
            let mut w = LoraWeights::new(1);
            let a = Tensor::from_vec(normal(rank * in_f, seed + 10 * j as u64), (rank, in_f), &Device::Cpu).unwrap();
            let b_t =
                Tensor::from_vec(normal(rank * out_f, seed + 10 * j as u64 + 5), (rank, out_f), &Device::Cpu).unwrap();
            // A distinct scale per adapter: the kernels must index the scale by segment.
            w.insert(id, LoraModule { a: (a * 0.1).unwrap(), b_t: (b_t * 0.1).unwrap(), scale: 0.5 + j as f32 });
            w
        })
        .collect();
    let x = normal(rows * in_f, seed + 1);
    let y0 = normal(rows * out_f, seed + 2);
    let xt = Tensor::from_vec(x.clone(), (rows, in_f), &Device::Cpu).unwrap();
    let yt = Tensor::from_vec(y0.clone(), (rows, out_f), &Device::Cpu).unwrap();
    let cpu_segs: Vec<LoraSegment> =
        segs.iter().zip(&adapters).map(|((r, _), w)| LoraSegment::new(r.clone(), w)).collect();
    let want = apply_reference(&yt, &xt, id, &cpu_segs).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let modules: Vec<&LoraModule> = adapters.iter().map(|w| w.module(id).expect("inserted")).collect();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let (shrink, expand) = launch::lora(rows, in_f, out_f).unwrap();
    let ranges: Vec<(usize, usize)> = segs.iter().map(|(r, _)| (r.start, r.end)).collect();
    let row_seg = launch::lora_row_segments(rows, &ranges).unwrap();
    let ranks: Vec<i32> = modules.iter().map(|m| m.rank() as i32).collect();
    let scales: Vec<f32> = modules.iter().map(|m| m.scale).collect();

    // Shrink: t, partial sums per chunk of inputs (NaN-filled: the host leaves it uninitialised).
    let splits = launch::lora_splits(in_f);
    assert_eq!(shrink.grid.1 as usize, splits);
    let mut c = Call::new(shrink);
    let bx = c.f32(&x);
    let t = c.f32(&vec![f32::NAN; rows * splits * LORA_MAX_RANK]);
    let seg = c.i32(&row_seg);
    let a_bufs: Vec<Buf> = modules.iter().map(|m| c.f32(&flat(&m.a))).collect();
    let a_ptrs = c.table(&a_bufs);
    let rk = c.i32(&ranks);
    c.arg(bx).arg(t).arg(seg).arg(a_ptrs).arg(rk).arg(in_f as i32);
    let t_got = run(&mut c, seed).f32(t);

    // The scratch rows of adapter rows, their partials summed in split order (as the expand does), against
    // x · Aᵀ (f64), slots j < rank only.
    let (mut t_got_used, mut t_want) = (vec![], vec![]);
    for (s, ((r, rank), m)) in segs.iter().zip(&modules).enumerate() {
        let a = flat(&m.a);
        for row in r.clone() {
            assert_eq!(row_seg[row], s as i32);
            for j in 0..*rank {
                let dot: f64 = (0..in_f).map(|i| x[row * in_f + i] as f64 * a[j * in_f + i] as f64).sum();
                t_want.push(dot as f32);
                t_got_used.push((0..splits).map(|p| t_got[(row * splits + p) * LORA_MAX_RANK + j]).sum());
            }
        }
    }
    assert_nontrivial(&t_want, label);
    let t_err = rel_l2(&t_got_used, &t_want);

    // Expand, on the shrink's t exactly as it came back (unused slots still NaN: reading one poisons y).
    let mut c = Call::new(expand);
    let bt = c.f32(&t_got);
    let y = c.f32(&y0);
    let seg = c.i32(&row_seg);
    let bt_bufs: Vec<Buf> = modules.iter().map(|m| c.f32(&flat(&m.b_t))).collect();
    let bt_ptrs = c.table(&bt_bufs);
    let rk = c.i32(&ranks);
    let sc = c.f32(&scales);
    c.arg(bt).arg(y).arg(seg).arg(bt_ptrs).arg(rk).arg(sc).arg(splits as i32).arg(out_f as i32);
    let got = run(&mut c, seed + 1).f32(y);

    let covered: Vec<bool> = (0..rows).map(|r| segs.iter().any(|(s, _)| s.contains(&r))).collect();
    for r in (0..rows).filter(|&r| !covered[r]) {
        let (g, w) = (&got[r * out_f..(r + 1) * out_f], &y0[r * out_f..(r + 1) * out_f]);
        assert!(g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()), "{label}: base-model row {r} changed");
    }
    let delta = |v: &[f32]| -> Vec<f32> {
        let idx = (0..rows).filter(|&r| covered[r]).flat_map(|r| r * out_f..(r + 1) * out_f);
        idx.map(|i| v[i] - y0[i]).collect()
    };
    let want_delta = delta(&want);
    assert_nontrivial(&want_delta, label);
    let err = rel_l2(&delta(&got), &want_delta);
    eprintln!("lora {label}: delta rel L2 {err:.2e}, t rel L2 {t_err:.2e}");
    assert!(t_err <= TOLERANCE, "{label}: shrink output t, relative L2 error {t_err:.3e}");
    assert!(err <= TOLERANCE, "{label}: deltas, relative L2 error {err:.3e}");
    (err, t_err)
}

/// The device checks' mixes, scaled down: one row per adapter (decode), one adapter over every row, and a
/// prefill mix of ranks 1..128 (the kernels' maximum) with base-model rows before, between and after the
/// segments; 300 outputs make the expand's second column block partial, 100 inputs a float4 count that is not
/// a multiple of the 32 lanes, 1100 inputs three chunks of the shrink's split, the last one partial.
#[test]
fn lora_segments_of_different_ranks_and_base_rows() {
    let per_row: Vec<(Range<usize>, usize)> = (0..6).map(|i| (i..i + 1, 16)).collect();
    let mix = vec![(1..4, 8), (4..9, 16), (11..12, 1), (12..17, 64), (19..22, 128), (22..23, 3)];
    let mut worst = (0f64, 0f64);
    for (label, rows, in_f, out_f, segs) in [
        ("one row per adapter", 6, 1100, 96, per_row),
        ("one adapter", 5, 128, 300, vec![(0..5, 16)]),
        ("prefill mix", 24, 100, 300, mix.clone()),
        ("prefill mix, split inputs", 24, 1100, 300, mix),
    ] {
        let (e, t) = lora_errors(label, rows, in_f, out_f, &segs);
        worst = (worst.0.max(e), worst.1.max(t));
    }
    eprintln!("lora: max delta rel L2 {:.2e}, max t rel L2 {:.2e}", worst.0, worst.1);
}
