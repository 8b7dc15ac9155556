//! The greedy-pick kernel and the fused element-wise kernels (add + RMSNorm, SiLU · up) on the emulated device.

use candle_core::{Device, Tensor};

use crate::emu::Call;
use crate::{assert_nontrivial, normal, rel_l2, run, TOLERANCE};
use loraserve::gpu::launch;

// ---------------------------------------------------------------------------------------------------------
// Greedy picks
// ---------------------------------------------------------------------------------------------------------

/// `argmax_rows` picks what `engine::sampler::argmax` picks on the host, row by row: random rows, and rows
/// built so that a plain block reduction would go wrong — the maximum tied between a low index in a later
/// thread and a high index in thread 0, between warps, within one thread's stride; NaN at index 0, around
/// and instead of the maximum; −∞ with one number among NaN; all NaN, all −∞, and both mixed (nothing to
/// pick: `ARGMAX_NONE`); +∞ twice; a vocabulary narrower than a warp.
#[test]
fn argmax_picks_the_first_maximum_and_passes_over_nan() {
    let nan = f32::NAN;
    for vocab in [1100usize, 5, 32000] {
        let mut rows: Vec<Vec<f32>> = (0..3).map(|r| normal(vocab, 900 + r as u64)).collect();
        let tie = |at: &[usize], seed: u64| {
            let mut row = normal(vocab, seed);
            for &i in at.iter().filter(|&&i| i < vocab) {
                row[i] = 50.0;
            }
            row
        };
        rows.push(tie(&[256, 3], 1)); // thread 0's second element against thread 3's first
        rows.push(tie(&[600, 5], 2)); // warp 2 against warp 0
        rows.push(tie(&[263, 7], 3)); // one thread's stride: 7 then 263
        rows.push(tie(&[vocab - 1, 4], 4));
        rows.push(tie(&[0, vocab - 1], 8)); // the first index itself
        let mut row = tie(&[2], 5);
        row[0] = nan;
        row[1] = nan;
        row[vocab - 1] = nan;
        rows.push(row);
        rows.push(vec![nan; vocab]);
        rows.push(vec![f32::NEG_INFINITY; vocab]);
        rows.push((0..vocab).map(|i| if i % 3 == 1 { f32::NEG_INFINITY } else { nan }).collect());
        let mut row = vec![nan; vocab];
        row[vocab - 1] = -3.0;
        row[0] = f32::NEG_INFINITY;
        rows.push(row);
        let mut row = normal(vocab, 6);
        row[vocab / 2] = f32::INFINITY;
        row[vocab - 1] = f32::INFINITY;
        rows.push(row);
        let want: Vec<Option<u32>> = rows.iter().map(|r| loraserve::engine::sampler::argmax(r)).collect();
        assert!(want.iter().any(|&i| i > Some(0)) && want.contains(&Some(0)), "cases pick 0 and later indices");
        assert_eq!(want.iter().filter(|i| i.is_none()).count(), 3, "rows with nothing to pick");
        let l = launch::argmax_rows(rows.len(), vocab).unwrap();
        let mut call = Call::new(l);
        let logits = call.f32(&rows.concat());
        // Poisoned with a value the kernel never writes (it is no index and not ARGMAX_NONE).
        let out = call.u32(&vec![u32::MAX - 1; rows.len()]);
        call.arg(logits).arg(vocab as i32).arg(out);
        let got: Vec<Option<u32>> = run(&mut call, 77).u32(out).into_iter().map(launch::argmax_pick).collect();
        assert_eq!(got, want, "vocab {vocab}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Fused element-wise kernels
// ---------------------------------------------------------------------------------------------------------

/// `add_rms_norm` against the two CPU ops it replaces, `x + d` (the same f32 additions: bit for bit) then
/// candle's `rms_norm`: rows narrower than the block's 256 threads (the fixture models' 64 features), an odd
/// width, and a 7B's 4096, with sums far from unit scale so the norm matters.
#[test]
fn add_rms_norm_matches_the_add_then_the_cpu_norm() {
    let eps = 1e-5f32;
    for (rows, hidden) in [(3usize, 64usize), (2, 1000), (4, 4096)] {
        let label = format!("add_rms_norm {rows}×{hidden}");
        let seed = 7000 + hidden as u64;
        let x: Vec<f32> = normal(rows * hidden, seed).iter().map(|v| v * 3.0).collect();
        let d = normal(rows * hidden, seed + 1);
        let w: Vec<f32> = normal(hidden, seed + 2).iter().map(|v| 1.0 + 0.2 * v).collect();
        let cpu = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
        let sum = (cpu(&x, &[rows, hidden]) + cpu(&d, &[rows, hidden])).unwrap();
        let want_h = candle_nn::ops::rms_norm(&sum, &cpu(&w, &[hidden]), eps).unwrap();
        let (want_x, want_h) =
            (sum.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want_h.flatten_all().unwrap().to_vec1().unwrap());
        assert_nontrivial(&want_h, &label);

        let mut c = Call::new(launch::add_rms_norm(rows, hidden).unwrap());
        let (bx, bd, bw) = (c.f32(&x), c.f32(&d), c.f32(&w));
        let (x_out, h) = (c.f32(&vec![f32::NAN; rows * hidden]), c.f32(&vec![f32::NAN; rows * hidden]));
        c.arg(bx).arg(bd).arg(bw).arg(x_out).arg(h).arg(hidden as i32).arg(eps);
        let out = run(&mut c, seed);
        let got_x = out.f32(x_out);
        assert!(got_x.iter().zip(&want_x).all(|(a, b)| a.to_bits() == b.to_bits()), "{label}: x + d differs");
        let err = rel_l2(&out.f32(h), &want_h);
        eprintln!("{label}: rel L2 {err:.2e}");
        assert!(err <= TOLERANCE, "{label}: relative L2 error {err:.3e} > {TOLERANCE:e}");
    }
}

/// `silu_mul` against candle's CPU `silu(g) * u`, with gates out to ±100 (where exp overflows and SiLU is
/// −0 or g), over the launcher's grid and over a grid of 2 blocks that must stride over 4099 elements.
#[test]
fn silu_mul_matches_the_cpu_silu_times_up() {
    for (n, blocks) in [(1usize, None), (1000, None), (4099, None), (4099, Some(2u32))] {
        let label = format!("silu_mul n={n}, grid {blocks:?}");
        let mut g = normal(n, 8000 + n as u64);
        for (i, v) in g.iter_mut().enumerate().step_by(7) {
            *v = if i % 2 == 0 { 100.0 } else { -100.0 };
        }
        let u = normal(n, 8001 + n as u64);
        let gt = Tensor::from_slice(&g, n, &Device::Cpu).unwrap();
        let want = (candle_nn::ops::silu(&gt).unwrap() * Tensor::from_slice(&u, n, &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut l = launch::silu_mul(n).unwrap();
        if let Some(b) = blocks {
            l.grid = (b, 1, 1);
        }
        let mut c = Call::new(l);
        let (bg, bu, out) = (c.f32(&g), c.f32(&u), c.f32(&vec![f32::NAN; n]));
        c.arg(bg).arg(bu).arg(out).arg(n as i32);
        let got = run(&mut c, 8002).f32(out);
        let err = rel_l2(&got, &want);
        assert!(err <= TOLERANCE, "{label}: relative L2 error {err:.3e} > {TOLERANCE:e}");
    }
}
