//! Attention for the Llama family: rotary embeddings and causal (optionally sliding-window) grouped-query
//! attention, in two interchangeable forms behind the same inputs:
//!
//! - [`dense_attention`]: candle tensor ops over each sequence's own tokens (no cache). Differentiable —
//!   the training path — and the reference the paged kernel is tested against.
//! - [`paged_attention`]: the serving kernel. New keys/values are written into the sequences' blocks of the
//!   [`PagedKvCache`](super::kv_cache::PagedKvCache), then every query attends over its sequence's whole
//!   context read from those blocks. Work is split over (token, kv-head) so the query heads sharing a key
//!   read it once.

use candle_core::{DType, Device, Result, Tensor, D};
use rayon::prelude::*;

use super::kv_cache::LayerKv;

/// Cos/sin tables `[positions.len(), head_dim / 2]` (f32, angles computed in f32 as transformers does).
pub fn rope_tables(positions: &[usize], inv_freq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Rotary embedding in place on `x [rows, heads, head_dim]` (the non-interleaved "rotate half" layout of
/// Hugging Face checkpoints).
pub fn rope_in_place(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for (row, chunk) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let c = &cos[row * half..(row + 1) * half];
        let s = &sin[row * half..(row + 1) * half];
        for h in chunk.chunks_exact_mut(head_dim) {
            let (x1, x2) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/// Rotary embedding with tensor ops (differentiable): `x [rows, heads, head_dim]`, tables `[rows, head_dim/2]`.
pub fn rope_tensor(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?.to_dtype(x.dtype())?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Attention geometry shared by both implementations.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys older than `window` positions are masked (Mistral / Qwen2 sliding window).
    pub window: Option<usize>,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// First key position visible from query position `p`.
    #[inline]
    fn first_key(&self, p: usize) -> usize {
        match self.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// Causal attention of one sequence over its own `len` tokens with tensor ops:
/// `q [len, heads, hd]`, `k`/`v [len, kv_heads, hd]` → `[len, heads * hd]`.
pub fn dense_attention(q: &Tensor, k: &Tensor, v: &Tensor, shape: &AttnShape) -> Result<Tensor> {
    let (len, heads, hd) = q.dims3()?;
    let dtype = q.dtype();
    let q = q.transpose(0, 1)?.contiguous()?.to_dtype(DType::F32)?; // [h, len, hd]
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let t = t.transpose(0, 1)?.to_dtype(DType::F32)?; // [kvh, len, hd]
        let g = shape.group();
        if g == 1 {
            return t.contiguous();
        }
        t.unsqueeze(1)?.expand((shape.kv_heads, g, len, hd))?.reshape((heads, len, hd))
    };
    let k = repeat(k)?;
    let v = repeat(v)?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * shape.scale() as f64)?;
    let mask = causal_mask(len, shape, q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let out = probs.matmul(&v)?; // [h, len, hd]
    out.transpose(0, 1)?.reshape((len, heads * hd))?.to_dtype(dtype)
}

fn causal_mask(len: usize, shape: &AttnShape, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; len * len];
    for i in 0..len {
        let first = shape.first_key(i);
        for (j, slot) in m[i * len..(i + 1) * len].iter_mut().enumerate() {
            if j > i || j < first {
                *slot = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(m, (len, len), device)
}

/// One sequence's part of a paged-attention call.
pub struct PagedSeq<'a> {
    /// First row of this sequence's new tokens in the batch.
    pub row: usize,
    /// New tokens in this step.
    pub len: usize,
    /// Tokens already cached before this step.
    pub past: usize,
    /// Block table covering at least `past + len` positions.
    pub blocks: &'a [u32],
}

/// Writes the new keys/values into the cache, then computes attention for every new token over its
/// sequence's context. `q [rows, heads*hd]`, `k`/`v [rows, kv_heads*hd]` (roped) → `[rows, heads*hd]`.
pub fn paged_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seqs: &[PagedSeq],
    cache: &mut LayerKv,
    shape: &AttnShape,
) -> Vec<f32> {
    let (hd, kvh, heads) = (shape.head_dim, shape.kv_heads, shape.heads);
    let bs = cache.block_size;
    let token_width = kvh * hd;
    for s in seqs {
        for i in 0..s.len {
            let pos = s.past + i;
            let slot = s.blocks[pos / bs] as usize * bs + pos % bs;
            let src = (s.row + i) * token_width;
            cache.k[slot * token_width..(slot + 1) * token_width].copy_from_slice(&k[src..src + token_width]);
            cache.v[slot * token_width..(slot + 1) * token_width].copy_from_slice(&v[src..src + token_width]);
        }
    }
    let cache = &*cache;
    let rows: usize = seqs.iter().map(|s| s.len).sum();
    debug_assert!(
        seqs.iter()
            .scan(0, |row, s| {
                let ok = s.row == *row;
                *row += s.len;
                Some(ok)
            })
            .all(|ok| ok),
        "sequences must cover the batch rows in order"
    );
    let mut out = vec![0f32; rows * heads * hd];
    // Work items: (sequence, token, kv head). Each writes `group` heads of one row.
    let mut items = Vec::with_capacity(rows * kvh);
    for s in seqs {
        for i in 0..s.len {
            for g in 0..kvh {
                items.push((s, i, g));
            }
        }
    }
    let group = shape.group();
    let out_chunks: Vec<&mut [f32]> = out.chunks_mut(group * hd).collect();
    // Chunk g of row r sits at index r * kvh + g, matching the item order above.
    items.into_par_iter().zip(out_chunks).for_each_init(Vec::new, |scores, ((s, i, g), dst)| {
        let row = s.row + i;
        let q_heads = &q[(row * heads + g * group) * hd..(row * heads + (g + 1) * group) * hd];
        let job = GroupJob { q_heads, seq: s, pos: s.past + i, kv_head: g, cache, shape };
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the features were detected at run time.
                unsafe { attend_group_avx2(&job, scores, dst) };
                return;
            }
        }
        attend_group(&job, scores, dst);
    });
    out
}

/// One query token's heads that share kv head `kv_head`.
struct GroupJob<'a> {
    q_heads: &'a [f32],
    seq: &'a PagedSeq<'a>,
    pos: usize,
    kv_head: usize,
    cache: &'a LayerKv,
    shape: &'a AttnShape,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group_avx2(job: &GroupJob, scores: &mut Vec<f32>, dst: &mut [f32]) {
    attend_group(job, scores, dst)
}

/// Scores over the context, softmax, weighted sum of values — for every head of the group, reading each
/// key and value once.
#[inline(always)]
fn attend_group(job: &GroupJob, scores: &mut Vec<f32>, dst: &mut [f32]) {
    let shape = job.shape;
    let hd = shape.head_dim;
    let group = shape.group();
    let bs = job.cache.block_size;
    let token_width = shape.kv_heads * hd;
    let first = shape.first_key(job.pos);
    let ctx = job.pos + 1 - first;
    let scale = shape.scale();
    scores.clear();
    scores.resize(group * ctx, 0f32);
    let blocks = job.seq.blocks;
    let offset = |t: usize| (blocks[t / bs] as usize * bs + t % bs) * token_width + job.kv_head * hd;
    for (ti, t) in (first..=job.pos).enumerate() {
        let o = offset(t);
        let key = &job.cache.k[o..o + hd];
        for h in 0..group {
            scores[h * ctx + ti] = crate::cpu_linear::dot_portable(&job.q_heads[h * hd..(h + 1) * hd], key) * scale;
        }
    }
    for h in 0..group {
        let sc = &mut scores[h * ctx..(h + 1) * ctx];
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in sc.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in sc.iter_mut() {
            *x *= inv;
        }
    }
    dst.fill(0.0);
    for (ti, t) in (first..=job.pos).enumerate() {
        let o = offset(t);
        let val = &job.cache.v[o..o + hd];
        for h in 0..group {
            let w = scores[h * ctx + ti];
            for (d, &x) in dst[h * hd..(h + 1) * hd].iter_mut().zip(val) {
                *d += w * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::{KvGeometry, PagedKvCache};
    use crate::rng::Rng;

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The dense path's tensor RoPE equals the paged path's slices (the GPU kernels' formula).
    #[test]
    fn tensor_rope_equals_slice_rope() {
        let mut rng = Rng::new(9);
        let (heads, hd) = (3, 8);
        let positions = [0usize, 1, 2, 7, 100, 4095];
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
        let (cos, sin) = rope_tables(&positions, &inv_freq);
        let x = random(positions.len() * heads * hd, &mut rng);
        let mut want = x.clone();
        rope_in_place(&mut want, heads, hd, &cos, &sin);
        let dev = Device::Cpu;
        let rows = positions.len();
        let cos_t = Tensor::from_vec(cos, (rows, hd / 2), &dev).unwrap();
        let sin_t = Tensor::from_vec(sin, (rows, hd / 2), &dev).unwrap();
        let xt = Tensor::from_vec(x.clone(), (rows, heads, hd), &dev).unwrap();
        let got = rope_tensor(&xt, &cos_t, &sin_t).unwrap();
        assert_eq!(got.dims(), &[rows, heads, hd]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max < 1e-5, "max |Δ| {max}");
        assert_ne!(got, x, "the rotation did something");
    }

    #[test]
    fn paged_kernel_equals_dense_ops_incrementally() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        for window in [None, Some(5)] {
            let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: 8, window };
            let len = 11;
            let (q, k, v) = (random(len * 48, &mut rng), random(len * 16, &mut rng), random(len * 16, &mut rng));
            let qt = Tensor::from_vec(q.clone(), (len, 6, 8), &dev).unwrap();
            let kt = Tensor::from_vec(k.clone(), (len, 2, 8), &dev).unwrap();
            let vt = Tensor::from_vec(v.clone(), (len, 2, 8), &dev).unwrap();
            let dense =
                dense_attention(&qt, &kt, &vt, &shape).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();

            // Prefill 7 tokens, then decode the remaining 4 one at a time, with scattered blocks.
            let geo = KvGeometry { layers: 1, kv_heads: 2, head_dim: 8, block_size: 4 };
            let mut cache = PagedKvCache::new(geo, 8);
            let blocks = [5u32, 2, 7];
            let mut got = Vec::new();
            let mut past = 0;
            for step in [7usize, 1, 1, 1, 1] {
                let seq = PagedSeq { row: 0, len: step, past, blocks: &blocks };
                let out = paged_attention(
                    &q[past * 48..(past + step) * 48],
                    &k[past * 16..(past + step) * 16],
                    &v[past * 16..(past + step) * 16],
                    &[seq],
                    cache.host_layer_mut(0).unwrap(),
                    &shape,
                );
                got.extend(out);
                past += step;
            }
            let err: f32 = got.iter().zip(&dense).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "window {window:?}: max err {err}");
        }
    }

    #[test]
    fn rope_forms_agree() {
        let mut rng = Rng::new(9);
        let (rows, heads, hd) = (5, 3, 8);
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let positions = [0, 3, 4, 10, 100];
        let (cos, sin) = rope_tables(&positions, &inv);
        let x = random(rows * heads * hd, &mut rng);
        let mut a = x.clone();
        rope_in_place(&mut a, heads, hd, &cos, &sin);
        let dev = Device::Cpu;
        let b = rope_tensor(
            &Tensor::from_vec(x, (rows, heads, hd), &dev).unwrap(),
            &Tensor::from_vec(cos, (rows, hd / 2), &dev).unwrap(),
            &Tensor::from_vec(sin, (rows, hd / 2), &dev).unwrap(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let err: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(err < 1e-6, "{err}");
    }
}
