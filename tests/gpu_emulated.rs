//! The GPU kernels of `src/gpu/kernels/` checked on the CPU by emulation, in plain `cargo test`: each `.cu`
//! source is compiled unchanged by g++ under `tests/gpu_emu/cuda_emu.h` (blocks one after another, the threads
//! of a block as fibers taking turns at __syncthreads, warp shuffles and tensor-core MMAs, the MMA's fragment
//! layouts taken from the PTX ISA; see that header), launched with the
//! kernel choice and geometry of `loraserve::gpu::launch` and the argument order of the host code in
//! `src/gpu/{nf4,lora,attention,sample,fused}.rs`, and compared with the CPU references the device checks
//! (`benches/gpu_kernels.rs`) use: `quant::matmul::matmul_reference`, `lora::batched::apply_reference`,
//! `model::attention::paged_attention`, `engine::sampler::argmax`, and for the fused
//! element-wise kernels candle's CPU ops (`x + d` then `candle_nn::ops::rms_norm`, `silu(g) · u`). Shapes are the device checks' cases scaled down.
//!
//! Every output buffer is NaN-filled before its launch (an element no thread writes fails); every launch runs
//! under two thread interleavings that must agree bit for bit (a race fails); errors are relative L2 against
//! references checked to be non-trivial. The emulated MMA and TF32 rounding are also checked on their own, on
//! one tile against a plain matrix product; the last two tests show each check of the harness failing on a
//! broken launch or kernel. Needs g++ (the tests fail, never skip, without it).

mod gpu_emu;

use std::ops::Range;

use candle_core::{Device, Tensor};
use gpu_emu::{Buf, Call};
use loraserve::gpu::launch::{self, LORA_MAX_RANK};
use loraserve::lora::batched::{apply_reference, LoraSegment};
use loraserve::lora::{LinearId, LoraModule, LoraWeights, ModuleKind};
use loraserve::model::attention::{paged_attention, rope_in_place, rope_tables, AttnShape, PagedSeq};
use loraserve::model::kv_cache::LayerKv;
use loraserve::quant::matmul::matmul_reference;
use loraserve::quant::nf4::{Absmax, Nf4Weight};
use loraserve::rng::Rng;

/// Relative L2 error allowed against the CPU references (f32, a different summation order), as on the device.
const TOLERANCE: f64 = 1e-5;

/// Relative L2 error of `got` against `want`; infinite if `got` holds a NaN or an infinity (an unwritten
/// element of a NaN-filled output).
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "output length");
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// The reference is worth comparing against: finite, and most of its elements clearly non-zero.
fn assert_nontrivial(want: &[f32], what: &str) {
    assert!(!want.is_empty() && want.iter().all(|v| v.is_finite()), "{what}: reference empty or not finite");
    let nonzero = want.iter().filter(|v| v.abs() > 1e-6).count();
    assert!(nonzero * 10 >= want.len() * 9, "{what}: only {nonzero} of {} reference elements non-zero", want.len());
}

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Runs `call` under two interleavings of its threads (identical results required, see
/// `Call::run_interleavings`), seeded from `seed`.
fn run(call: &mut Call, seed: u64) -> gpu_emu::Outputs {
    call.run_interleavings(&[seed, seed ^ 0x5bd1_e995]).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------------------
// NF4 fused dequantize + matmul
// ---------------------------------------------------------------------------------------------------------

/// The launch of `y = x · Wᵀ` exactly as `gpu::nf4::matmul_into` builds it (1-element placeholders for the
/// absmax form not in use, as `Nf4CudaWeight::upload`), with `y` NaN-filled. Returns the call and `y`.
fn nf4_call(l: launch::Launch, w: &Nf4Weight, x: &[f32], m: usize, x_misalign: usize) -> (Call, Buf) {
    let (call, y, _) = nf4_call_y(l, w, x, m, x_misalign, m * w.dims2().0, 0);
    (call, y)
}

/// [`nf4_call`] with a `y` of `y_len` elements (to check that a write past its end is caught) and the split-K
/// tile counters starting at `counters` (0 as on the device; else to break the hand-over); also returns them. The split-K scratch is sized as the launch asks (`launch::nf4_workspace`, a
/// partial tile a block; a counter a tile, zeroed), at least one element each as on the device, so a block
/// that strays past its own tile faults; the partials start as all-ones words, which the emulated `__ldcg`
/// refuses to read (a block summing partials not yet written).
fn nf4_call_y(
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

// ---------------------------------------------------------------------------------------------------------
// Batched LoRA
// ---------------------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------------------
// Paged attention
// ---------------------------------------------------------------------------------------------------------

/// kv_write then paged_attention, launched as `gpu::attention::paged_attention_into` does (q and k not yet
/// rotated: the kernels apply RoPE), against the CPU `rope_in_place` then `paged_attention` over the same
/// cache: the caches after the write must match exactly (rotated keys included), the output within the
/// tolerance. Sequences are `(past, len)`, in blocks of `bs` drawn from a shuffled pool (scattered tables),
/// over a cache that starts full of random values (stale slots). Returns the output's error.
fn attention_error(
    (heads, kv_heads, hd): (usize, usize, usize),
    window: Option<usize>,
    bs: usize,
    shape_of: &[(usize, usize)],
) -> f64 {
    let label = format!("attention {heads}/{kv_heads} heads, head_dim {hd}, blocks of {bs}, window {window:?}");
    let seed = 9000 + 100 * heads as u64 + 10 * kv_heads as u64 + hd as u64 + window.map_or(0, |w| 1000 * w as u64);
    let num_blocks: usize = shape_of.iter().map(|&(p, l)| (p + l).div_ceil(bs)).sum::<usize>() + 3;
    let width = kv_heads * hd;
    let mut order: Vec<u32> = (0..num_blocks as u32).collect();
    Rng::new(seed).shuffle(&mut order);
    let mut next = 0;
    let tables: Vec<Vec<u32>> = shape_of
        .iter()
        .map(|&(past, len)| {
            let n = (past + len).div_ceil(bs);
            next += n;
            order[next - n..next].to_vec()
        })
        .collect();
    let mut row = 0;
    let seqs: Vec<PagedSeq> = shape_of
        .iter()
        .zip(&tables)
        .map(|(&(past, len), blocks)| {
            let s = PagedSeq { row, len, past, blocks };
            row += len;
            s
        })
        .collect();
    let rows = row;
    let shape = AttnShape { heads, kv_heads, head_dim: hd, window };
    let (q, k, v) =
        (normal(rows * heads * hd, seed + 1), normal(rows * width, seed + 2), normal(rows * width, seed + 3));
    let (k0, v0) = (normal(num_blocks * bs * width, seed + 4), normal(num_blocks * bs * width, seed + 5));
    let t = launch::attention_tables(&seqs, bs).unwrap();
    let positions: Vec<usize> = t.row_pos.iter().map(|&p| p as usize).collect();
    let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
    let (cos, sin) = rope_tables(&positions, &inv_freq);
    let (mut q_rot, mut k_rot) = (q.clone(), k.clone());
    rope_in_place(&mut q_rot, heads, hd, &cos, &sin);
    rope_in_place(&mut k_rot, kv_heads, hd, &cos, &sin);
    let mut cpu_cache = LayerKv { block_size: bs, k: k0.clone(), v: v0.clone() };
    let want = paged_attention(&q_rot, &k_rot, &v, &seqs, &mut cpu_cache, &shape);
    assert_nontrivial(&want, &label);

    let (write, attend) = launch::paged_attention(rows, heads, kv_heads, hd, window).unwrap();

    let mut c = Call::new(write);
    let (bk, bv) = (c.f32(&k), c.f32(&v));
    let (kc, vc) = (c.f32(&k0), c.f32(&v0));
    let slot = c.i32(&t.row_slot);
    let (bcos, bsin) = (c.f32(&cos), c.f32(&sin));
    c.arg(bk).arg(bv).arg(kc).arg(vc).arg(slot).arg(bcos).arg(bsin).arg(width as i32).arg(hd as i32);
    let written = run(&mut c, seed);
    let (k_cache, v_cache) = (written.f32(kc), written.f32(vc));
    let same = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&k_cache, &cpu_cache.k) && same(&v_cache, &cpu_cache.v), "{label}: caches differ after kv_write");
    assert!(k_cache != k0 && v_cache != v0, "{label}: kv_write wrote nothing");

    // The launcher's kernel, then every other compiled kernel whose bounds hold these heads: the same numbers,
    // bit for bit.
    let attend_with = |l: launch::Launch| {
        let mut c = Call::new(l);
        let bq = c.f32(&q);
        let (kc, vc) = (c.f32(&k_cache), c.f32(&v_cache));
        let (tb, pos, tab) = (c.i32(&t.tables), c.i32(&t.row_pos), c.i32(&t.row_table));
        let (bcos, bsin) = (c.f32(&cos), c.f32(&sin));
        let out = c.f32(&vec![f32::NAN; rows * heads * hd]);
        let scale = 1.0 / (hd as f32).sqrt();
        c.arg(bq).arg(kc).arg(vc).arg(tb).arg(pos).arg(tab).arg(bcos).arg(bsin).arg(out);
        c.arg(heads as i32).arg(kv_heads as i32).arg(hd as i32).arg(bs as i32).arg(window.map_or(0, |w| w as i32));
        c.arg(scale);
        run(&mut c, seed + 1).f32(out)
    };
    let got = attend_with(attend);
    for &(g, d, kernel) in &launch::ATTENTION_KERNELS {
        if g >= heads / kv_heads && d >= hd && kernel != attend.kernel {
            let other = launch::Launch { kernel, ..attend };
            assert!(same(&got, &attend_with(other)), "{label}: {} and {kernel} differ", attend.kernel);
        }
    }
    let err = rel_l2(&got, &want);
    eprintln!("{label}: {} rel L2 {err:.2e}", attend.kernel);
    assert!(err <= TOLERANCE, "{label}: relative L2 error {err:.3e} > {TOLERANCE:e}");
    err
}

/// Decode rows at positions 0, 11 (a block's last slot) and 37, a 9-token prefill and a 4-token chunk after
/// 6 cached tokens, in one batch (blocks of 4).
const MIXED_STEP: [(usize, usize); 5] = [(0, 1), (11, 1), (37, 1), (0, 9), (6, 4)];

/// GQA groups 2 and 4 and none, head_dim 16 (the fixture models), 32 and 64, with and without a sliding
/// window shorter than most contexts.
#[test]
fn paged_attention_gqa_groups_and_windows() {
    let mut worst = 0f64;
    for heads in [(6, 3, 16), (4, 1, 32), (8, 8, 64)] {
        for window in [None, Some(5)] {
            worst = worst.max(attention_error(heads, window, 4, &MIXED_STEP));
        }
    }
    eprintln!("paged attention (head_dim 16/32/64): max rel L2 {worst:.2e}");
}

/// A head_dim that is not a multiple of the 32 lanes (80: lanes past it hold zeros) and the 8B models' 128,
/// groups of 2, 8 (the kernel's maximum) and none (Llama 2's heads), a group of 7 (Qwen2's, in the kernel for 8) over head_dim 96, the
/// widest head_dim (256); then the device checks' own Llama-3-8B geometry (32 query / 8 kv heads, head_dim
/// 128, blocks of 16) at shorter contexts: decode rows and a 20-token prefill, window 64.
#[test]
fn paged_attention_wide_heads() {
    let mut worst = 0f64;
    for heads in [(6, 3, 80), (8, 1, 128), (2, 2, 128), (14, 2, 96), (4, 2, 256)] {
        for window in [None, Some(5)] {
            worst = worst.max(attention_error(heads, window, 4, &MIXED_STEP));
        }
    }
    for window in [None, Some(64)] {
        worst = worst.max(attention_error((32, 8, 128), window, 16, &[(0, 1), (37, 1), (130, 1), (0, 20)]));
    }
    eprintln!("paged attention (head_dim 80–256): max rel L2 {worst:.2e}");
}

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
