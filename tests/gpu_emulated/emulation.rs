//! The emulation itself: its tensor-core MMA and TF32 rounding against plain arithmetic, and each check of the
//! harness failing on a broken launch or kernel.

use crate::emu::Call;
use crate::nf4::{nf4_call, nf4_call_y};
use crate::{normal, rel_l2, run, TOLERANCE};
use loraserve::gpu::launch;
use loraserve::quant::matmul::matmul_reference;
use loraserve::quant::nf4::Nf4Weight;
use loraserve::rng::Rng;

// ---------------------------------------------------------------------------------------------------------
// The emulated tensor-core primitives on their own
// ---------------------------------------------------------------------------------------------------------

/// The emulated `mma_tf32` apart from any kernel: one 16×8×8 tile of integers (|A|, |B| ≤ 100: TF32 values,
/// every product and sum exact in f32), each lane's fragments loaded by the driver's `selftest_mma` at the
/// positions the PTX ISA gives, three chained MMAs onto a C (so the calls' alternating slots are exercised).
/// Every element of D must be C + 3·A·B at its own position, exactly: the entries of A·B are all distinct
/// (asserted), so an A, B or D element the emulation places elsewhere fails.
#[test]
fn emulated_mma_matches_a_plain_matrix_product() {
    let mut rng = Rng::new(77);
    let mut ints = |n: usize, half: i32| -> Vec<f32> {
        (0..n).map(|_| ((rng.next_u64() % (2 * half as u64 + 1)) as i32 - half) as f32).collect()
    };
    let (a, b, c) = (ints(16 * 8, 100), ints(8 * 8, 100), ints(16 * 8, 1000));
    let ab: Vec<f32> = (0..16 * 8).map(|e| (0..8).map(|k| a[e / 8 * 8 + k] * b[k * 8 + e % 8]).sum()).collect();
    let mut sorted = ab.clone();
    sorted.sort_by(f32::total_cmp);
    sorted.dedup();
    assert_eq!(sorted.len(), ab.len(), "the entries of A·B must be distinct for the position check");
    let want: Vec<f32> = c.iter().zip(&ab).map(|(c, ab)| c + 3.0 * ab).collect();

    let mut call = Call::new(launch::Launch { kernel: "selftest_mma", grid: (1, 1, 1), block: (32, 1, 1) });
    let (ba, bb, bc) = (call.f32(&a), call.f32(&b), call.f32(&c));
    let d = call.f32(&[f32::NAN; 16 * 8]);
    call.arg(ba).arg(bb).arg(bc).arg(d).arg(3);
    let got = run(&mut call, 7).f32(d);
    for (e, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "D[{}][{}]: {g} from the emulated MMA, {w} from the product",
            e / 8,
            e % 8
        );
    }
}

/// f32 → TF32 as `cvt.rna.tf32.f32` defines it, by arithmetic: the multiple of TF32's spacing at `v` (2^(e − 10),
/// subnormals at 2^−136) nearest to `v`, halves away from zero; past the largest TF32 value, infinity.
fn tf32_nearest_away(v: f32) -> f32 {
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    let biased = ((v.to_bits() >> 23) & 0xff) as i32;
    let spacing = 2f64.powi(biased.max(1) - 127 - 10);
    ((v as f64 / spacing).round() * spacing) as f32
}

/// The emulated `tf32_round` and nf4.cu's hi/lo split (`selftest_tf32_split`): TF32 values unchanged, others to
/// the nearest TF32 value with ties away from zero (1 + 2⁻¹¹ is a tie, which ties-to-even would round down),
/// a carry into the exponent, subnormals, overflow to infinity, infinities and NaN kept; on random values of
/// many magnitudes, hi as `tf32_nearest_away`, hi and lo both TF32 values, hi + lo within 2⁻²² of v.
#[test]
fn emulated_tf32_rounding_and_split() {
    let tie = 1.0 + 2f32.powi(-11);
    let edge: Vec<(f32, f32)> = vec![
        (1.0, 1.0),
        (-3.25, -3.25),
        (0.0, 0.0),
        (1.0 + 2f32.powi(-10), 1.0 + 2f32.powi(-10)),
        (tie, 1.0 + 2f32.powi(-10)),
        (-tie, -(1.0 + 2f32.powi(-10))),
        (f32::from_bits(tie.to_bits() - 1), 1.0),
        (f32::from_bits(tie.to_bits() + 1), 1.0 + 2f32.powi(-10)),
        (f32::from_bits(0x3fff_ffff), 2.0),
        (f32::from_bits(0x0000_1000), f32::from_bits(0x0000_2000)),
        (f32::from_bits(0x0000_0fff), 0.0),
        (f32::from_bits(0x8000_3000), -f32::from_bits(0x0000_4000)),
        (f32::MAX, f32::INFINITY),
        (f32::from_bits(0x7f7f_efff), f32::from_bits(0x7f7f_e000)),
        (f32::INFINITY, f32::INFINITY),
        (f32::NEG_INFINITY, f32::NEG_INFINITY),
    ];
    let mut rng = Rng::new(78);
    let mut v: Vec<f32> = edge.iter().map(|e| e.0).collect();
    v.push(f32::NAN);
    let random_from = v.len();
    v.extend((0..400).map(|i| rng.normal() as f32 * 2f32.powi(i % 61 - 30)));
    v.extend((0..40).map(|_| f32::from_bits((rng.next_u64() % 0x80_0000) as u32)));

    let n = v.len();
    let mut call = Call::new(launch::Launch {
        kernel: "selftest_tf32_split",
        grid: (n.div_ceil(128) as u32, 1, 1),
        block: (128, 1, 1),
    });
    let bv = call.f32(&v);
    let out = call.f32(&vec![f32::NAN; 2 * n]);
    call.arg(bv).arg(out).arg(n as i32);
    let got = run(&mut call, 8).f32(out);
    let (hi, lo): (Vec<f32>, Vec<f32>) = got.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
    for (i, &(x, want)) in edge.iter().enumerate() {
        assert_eq!(hi[i].to_bits(), want.to_bits(), "tf32_round({x:e} = {:#010x}) = {:e}", x.to_bits(), hi[i]);
        assert_eq!(tf32_nearest_away(x).to_bits(), want.to_bits(), "the arithmetic reference at {x:e}");
    }
    assert!(hi[edge.len()].is_nan(), "NaN stays NaN");
    let mut worst = 0f64;
    for ((&x, &h), &l) in v.iter().zip(&hi).zip(&lo).skip(random_from) {
        assert_eq!(h.to_bits(), tf32_nearest_away(x).to_bits(), "tf32_round({x:e} = {:#010x})", x.to_bits());
        assert!(h.to_bits() & 0x1fff == 0 && l.to_bits() & 0x1fff == 0, "hi, lo of {x:e} not TF32 values");
        if x.is_normal() {
            let rel = ((h as f64 + l as f64) - x as f64).abs() / (x as f64).abs();
            assert!(rel <= 2f64.powi(-22), "hi + lo of {x:e}: relative error {rel:e}");
            worst = worst.max(rel);
        }
    }
    eprintln!("tf32 split: max relative error of hi + lo {worst:.2e} (bound 2^-22 = {:.2e})", 2f64.powi(-22));
}

// ---------------------------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------------------------

/// Each check the harness relies on fails when it should: an output element no block writes (grid one block
/// short), a misaligned vector load, an output buffer too short for the launch, a split-K block summing
/// partials not yet written, and an argument of the wrong type.
#[test]
fn harness_catches_broken_launches() {
    let (m, n, k) = (3usize, 37usize, 128usize);
    let w = Nf4Weight::quantize(&normal(n * k, 1), &[n, k], true);
    let x = normal(m * k, 2);
    let want = matmul_reference(&x, m, &w);
    let l = launch::nf4_matmul(m, n, k).unwrap();

    let (mut call, y) = nf4_call(l, &w, &x, m, 0);
    assert!(rel_l2(&run(&mut call, 1).f32(y), &want) <= TOLERANCE, "the unbroken launch passes");

    let short = launch::Launch { grid: (l.grid.0 - 1, 1, 1), ..l };
    let (mut call, y) = nf4_call(short, &w, &x, m, 0);
    assert_eq!(rel_l2(&run(&mut call, 1).f32(y), &want), f64::INFINITY, "unwritten outputs stay NaN and fail");

    let (call, _) = nf4_call(l, &w, &x, m, 4);
    let e = call.run().err().expect("a misaligned x must fail");
    assert!(e.contains("misaligned float4 load"), "{e}");

    let (call, _, _) = nf4_call_y(l, &w, &x, m, 0, 8, 0);
    let e = call.run().err().expect("writing past the end of y must fail");
    assert!(e.contains("out-of-bounds"), "{e}");

    // Split-K with every tile's counter already at splits − 1: the first block of each tile to finish counts
    // last and sums partials the others have not written, which the emulated __ldcg refuses.
    let (m, k) = (16usize, 512usize);
    let w = Nf4Weight::quantize(&normal(n * k, 3), &[n, k], true);
    let x = normal(m * k, 4);
    let l = launch::nf4_mma(m, n, k, 16, 4).unwrap();
    let (call, _, _) = nf4_call_y(l, &w, &x, m, 0, m * n, 3);
    let e = call.run().err().expect("summing before the other splits wrote must fail");
    assert!(e.contains("__ldcg of an unwritten word"), "{e}");

    let (write, _) = launch::paged_attention(1, 1, 1, 16, None).unwrap();
    let mut c = Call::new(write);
    let (a, b) = (c.f32(&[0.0; 16]), c.f32(&[0.0; 16]));
    let (kc, vc, slot) = (c.f32(&[0.0; 64]), c.f32(&[0.0; 64]), c.i32(&[0]));
    c.arg(a).arg(b).arg(kc).arg(vc).arg(slot).arg(a).arg(b).arg(16.0f32).arg(16);
    let e = c.run().err().expect("an f32 where the kernel takes an int must fail");
    assert!(e.contains("argument 7"), "{e}");
}

/// The emulation's own checks, on the driver's deliberately broken `selftest_*` kernels: a shared-memory read
/// that misses its __syncthreads (caught as a NaN under most interleavings, and as a result that differs
/// between interleavings), __syncthreads from different lines, a full-mask shuffle in a warp with an exited
/// lane, a deadlock between a block barrier and a warp shuffle, and MMAs with an exited lane, from different
/// lines, or on an operand not rounded to TF32.
#[test]
fn emulation_catches_races_divergence_and_deadlocks() {
    let launch =
        |kernel: &'static str, threads: u32| launch::Launch { kernel, grid: (2, 1, 1), block: (threads, 1, 1) };
    let race = |sync: i32, seed: u64| {
        let mut c = Call::new(launch("selftest_shared_race", 256));
        let out = c.f32(&[f32::NAN; 256]);
        c.arg(out).arg(sync).seed(seed);
        c.run().unwrap_or_else(|e| panic!("{e}")).f32(out)
    };
    let fixed = race(1, 1);
    assert!(fixed.iter().enumerate().all(|(i, &v)| v == ((i + 1) % 256) as f32), "the synchronized version is right");
    let racy = race(0, 1);
    assert!(racy.iter().any(|v| v.is_nan()), "a read before the write it needs sees the NaN poison");
    let mut c = Call::new(launch("selftest_shared_race", 256));
    let out = c.f32(&[0.0; 256]);
    c.arg(out).arg(0);
    let e = c.run_interleavings(&[1, 2]).err().expect("a racy kernel's result depends on the interleaving");
    assert!(e.contains("(a race)"), "{e}");

    for (kernel, threads, needle) in [
        ("selftest_divergent_sync", 64, "divergent __syncthreads"),
        ("selftest_shuffle_after_exit", 32, "exited"),
        ("selftest_deadlock", 32, "deadlock"),
    ] {
        let mut c = Call::new(launch(kernel, threads));
        let out = c.f32(&vec![0.0; threads as usize]);
        c.arg(out);
        let e = c.run().err().unwrap_or_else(|| panic!("{kernel} must fail"));
        assert!(e.contains(needle), "{kernel}: {e}");
    }
    for (mode, needle) in [(0, "exited"), (1, "divergent mma_tf32"), (2, "not a TF32 value")] {
        let mut c = Call::new(launch("selftest_mma_misuse", 64));
        let out = c.f32(&[0.0; 64]);
        c.arg(out).arg(mode);
        let e = c.run().err().unwrap_or_else(|| panic!("selftest_mma_misuse mode {mode} must fail"));
        assert!(e.contains(needle), "selftest_mma_misuse mode {mode}: {e}");
    }
}
