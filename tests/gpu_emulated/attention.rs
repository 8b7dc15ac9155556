//! Paged attention and the KV-cache write on the emulated device: GQA groups, sliding windows, head widths.

use crate::emu::Call;
use crate::{assert_nontrivial, normal, rel_l2, run, TOLERANCE};
use loraserve::gpu::launch;
use loraserve::model::attention::{paged_attention, rope_in_place, rope_tables, AttnShape, PagedSeq};
use loraserve::model::kv_cache::LayerKv;
use loraserve::rng::Rng;

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
