//! NF4 fused dequantize + matmul on the emulated device: the GEMV, tensor-core and generic kernels, split-K.

use crate::emu::{Buf, Call};
use crate::{assert_nontrivial, normal, rel_l2, run, TOLERANCE};
use loraserve::gpu::launch;
use loraserve::quant::matmul::matmul_reference;
use loraserve::quant::nf4::{Absmax, Nf4Weight};

/// The launch of `y = x · Wᵀ` exactly as `gpu::nf4::matmul_into` builds it (1-element placeholders for the
/// absmax form not in use, as `Nf4CudaWeight::upload`), with `y` NaN-filled. Returns the call and `y`.
pub(crate) fn nf4_call(l: launch::Launch, w: &Nf4Weight, x: &[f32], m: usize, x_misalign: usize) -> (Call, Buf) {
    let (call, y, _) = nf4_call_y(l, w, x, m, x_misalign, m * w.dims2().0, 0);
    (call, y)
}

/// [`nf4_call`] with a `y` of `y_len` elements (to check that a write past its end is caught) and the split-K
/// tile counters starting at `counters` (0 as on the device; else to break the hand-over); also returns them. The split-K scratch is sized as the launch asks (`launch::nf4_workspace`, a
/// partial tile a block; a counter a tile, zeroed), at least one element each as on the device, so a block
/// that strays past its own tile faults; the partials start as all-ones words, which the emulated `__ldcg`
/// refuses to read (a block summing partials not yet written).
pub(crate) fn nf4_call_y(
    l: launch::Launch,
    w: &Nf4Weight,
    x: &[f32],
    m: usize,
    x_misalign: usize,
    y_len: usize,
    counters: u32,
) -> (Call, Buf, Buf) {
    let (n, k) = w.dims2();
    let mut c = Call::new(l);
    let bx = c.f32_misaligned(x, x_misalign);
    let packed = c.u8(&w.packed);
    let (dq, absmax_f32, codes, nested_absmax, nested_code, offset) = match &w.absmax {
        Absmax::F32(v) => (0, c.f32(v), c.u8(&[0]), c.f32(&[0.0]), c.f32(&[0.0]), 0.0),
        Absmax::Double(d) => {
            (1, c.f32(&[0.0]), c.u8(&d.codes), c.f32(&d.nested_absmax), c.f32(&d.nested_code[..]), d.offset)
        }
    };
    let code = c.f32(&w.code);
    let y = c.f32(&vec![f32::NAN; y_len]);
    c.arg(bx).arg(packed).arg(dq).arg(absmax_f32).arg(codes).arg(nested_absmax).arg(nested_code).arg(offset);
    let partial = c.f32(&vec![f32::from_bits(u32::MAX); launch::nf4_workspace(&l).max(1)]);
    let tile_done = c.u32(&vec![counters; (l.grid.0 * l.grid.1) as usize]);
    c.arg(code).arg(y).arg(m as i32).arg(n as i32).arg(k as i32).arg(partial).arg(tile_done);
    (c, y, tile_done)
}

/// One NF4 matmul on the emulated device against `matmul_reference` (dequantize, f64 accumulation); returns
/// the kernel the launcher chose and the relative error.
fn nf4_error(m: usize, n: usize, k: usize, double_quant: bool, seed: u64) -> (&'static str, f64) {
    nf4_error_with(m, n, k, double_quant, seed, launch::nf4_matmul(m, n, k).unwrap())
}

/// [`nf4_error`] through launch `l`.
fn nf4_error_with(
    m: usize,
    n: usize,
    k: usize,
    double_quant: bool,
    seed: u64,
    l: launch::Launch,
) -> (&'static str, f64) {
    let w = Nf4Weight::quantize(&normal(n * k, seed), &[n, k], double_quant);
    assert_eq!(matches!(w.absmax, Absmax::Double(_)), double_quant);
    let x = normal(m * k, seed + 1);
    let want = matmul_reference(&x, m, &w);
    let label = format!("nf4 {m}×{n}×{k} double_quant={double_quant}");
    assert_nontrivial(&want, &label);
    let (mut call, y) = nf4_call(l, &w, &x, m, 0);
    let err = rel_l2(&run(&mut call, seed).f32(y), &want);
    eprintln!("{label}: {} rel L2 {err:.2e}", l.kernel);
    assert!(err <= TOLERANCE, "{label} ({}): relative L2 error {err:.3e} > {TOLERANCE:e}", l.kernel);
    (l.kernel, err)
}

/// Decode widths: every GEMV kernel, partly filled ones too (3, 5 rows), over columns that end mid-block
/// (37: 9 blocks of 4 columns + 1, 4 of 8 + 5) and a K of 1088 (a second 1024-wide pass of the block's 4 warps
/// on which only 8 lanes of one warp work);
/// 629 NF4 blocks, so the double-quantized scales span three nested blocks.
#[test]
fn nf4_gemv_every_width_both_absmax_forms() {
    let expected = [(1, "nf4_gemv_r1"), (2, "nf4_gemv_r2"), (3, "nf4_gemv_r4"), (5, "nf4_gemv_r8"), (8, "nf4_gemv_r8")];
    let mut worst = 0f64;
    for (i, &(m, kernel)) in expected.iter().enumerate() {
        for dq in [false, true] {
            let (got, err) = nf4_error(m, 37, 1088, dq, 100 + 10 * i as u64 + dq as u64);
            assert_eq!(got, kernel, "m={m}");
            worst = worst.max(err);
        }
    }
    eprintln!("nf4 GEMV: max rel L2 {worst:.2e}");
}

/// Past 8 rows: the tensor-core kernels (3xTF32 MMAs). 16-row tiles from the smallest batch they take (9 rows:
/// one tile partly filled) to a full one (16); 32-row tiles from 17 rows to partial tiles over several block
/// rows (100), and 16-row tiles over two block rows (20, 32). Columns that end mid-tile (130 = 4 tiles + 2, 70) and whole tiles (64); K of one and a half
/// 128-wide steps (192: the last step's upper half is padding) and of two whole ones (256).
#[test]
fn nf4_mma_partial_tiles_both_absmax_forms() {
    let shapes = [
        (9usize, 130usize, 192usize, "nf4_matmul_mma16"),
        (13, 70, 256, "nf4_matmul_mma16"),
        (16, 64, 192, "nf4_matmul_mma16"),
        (17, 130, 256, "nf4_matmul_mma32"),
        (32, 64, 192, "nf4_matmul_mma32"),
        (33, 130, 192, "nf4_matmul_mma32"),
        (64, 70, 192, "nf4_matmul_mma32"),
        (100, 130, 256, "nf4_matmul_mma32"),
    ];
    let mut worst = 0f64;
    for (i, &(m, n, k, kernel)) in shapes.iter().enumerate() {
        for dq in [false, true] {
            let (got, err) = nf4_error(m, n, k, dq, 200 + 10 * i as u64 + dq as u64);
            assert_eq!(got, kernel, "{m}×{n}×{k}");
            worst = worst.max(err);
        }
    }
    // 17–32 rows in two 16-row tiles, as the device bench times them against one 32-row tile.
    for (i, &(m, n, k)) in [(20usize, 70usize, 192usize), (32, 130, 256)].iter().enumerate() {
        for dq in [false, true] {
            let l = launch::nf4_mma(m, n, k, 16, 1).unwrap();
            let (got, err) = nf4_error_with(m, n, k, dq, 300 + 10 * i as u64 + dq as u64, l);
            assert_eq!((got, l.grid.1), ("nf4_matmul_mma16", 2), "{m}×{n}×{k}");
            worst = worst.max(err);
        }
    }
    eprintln!("nf4 MMA: max rel L2 {worst:.2e}");
}

/// Split-K (the blocks of a tile each take a range of K's 128-wide steps, the one that counts last adds the
/// partials): splits of one step each (512 = 4 steps in 4), uneven ones (640 = 5 steps in 2; 1088 = 8.5
/// steps in 8, one split of two steps and a last half step), a split ending in the half step (192 in 2),
/// both tile heights, partial row and column tiles, a decode batch of 3 rows (a GEMV's, mostly padding).
/// Every launch runs with the blocks in two random orders (so the block that sums a tile differs between
/// them for most tiles) and must agree bit for bit, leave every counter back at zero for the next launch,
/// and match the CPU reference within the tolerance.
#[test]
fn nf4_split_k_sums_every_split_once_whichever_block_ends_last() {
    let cases = [
        (13usize, 70usize, 512usize, 16usize, 4usize),
        (32, 130, 640, 16, 2),
        (20, 130, 1088, 32, 8),
        (32, 64, 192, 32, 2),
        (40, 37, 256, 16, 2),
        (3, 64, 384, 16, 3),
    ];
    let mut worst = 0f64;
    for (i, &(m, n, k, bm, splits)) in cases.iter().enumerate() {
        for dq in [false, true] {
            let seed = 400 + 10 * i as u64 + dq as u64;
            let w = Nf4Weight::quantize(&normal(n * k, seed), &[n, k], dq);
            let x = normal(m * k, seed + 1);
            let want = matmul_reference(&x, m, &w);
            let label = format!("nf4 {m}×{n}×{k} in {bm}-row tiles, K split {splits} ways, double_quant={dq}");
            assert_nontrivial(&want, &label);
            let l = launch::nf4_mma(m, n, k, bm, splits).unwrap();
            assert_eq!(l.grid.2 as usize, splits);
            let (mut call, y, tile_done) = nf4_call_y(l, &w, &x, m, 0, m * n, 0);
            let out = run(&mut call, seed);
            assert!(out.u32(tile_done).iter().all(|&c| c == 0), "{label}: tile counters not reset");
            let err = rel_l2(&out.f32(y), &want);
            eprintln!("{label}: rel L2 {err:.2e}");
            assert!(err <= TOLERANCE, "{label}: relative L2 error {err:.3e} > {TOLERANCE:e}");
            worst = worst.max(err);
        }
    }
    eprintln!("nf4 split-K: max rel L2 {worst:.2e}");
}

/// K not a multiple of 64 (the fixture models' 96- and 160-wide layers, and an odd K over an odd number of
/// columns, so blocks and bytes straddle rows and the last byte holds a padding nibble): the generic kernel,
/// at decode and prefill row counts.
#[test]
fn nf4_generic_odd_shapes_both_absmax_forms() {
    let mut worst = 0f64;
    let shapes = [(1usize, 37usize, 96usize), (3, 64, 160), (33, 13, 75), (2, 29, 160), (5, 31, 96)];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        for dq in [false, true] {
            let (got, err) = nf4_error(m, n, k, dq, 300 + 10 * i as u64 + dq as u64);
            assert_eq!(got, "nf4_matmul_generic", "{m}×{n}×{k}");
            worst = worst.max(err);
        }
    }
    eprintln!("nf4 generic: max rel L2 {worst:.2e}");
}
