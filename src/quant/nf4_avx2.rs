//! AVX2 decoding of NF4 blocks for the CPU matmul (x86-64 with AVX2 + FMA, detected at run time).
//!
//! A 64-element block is 32 packed bytes. Its 64 code indices (high and low nibbles) are turned into f32 with
//! byte shuffles: the 16-entry code table is split into four byte planes, `vpshufb` looks up each plane for 32
//! indices at once, and two rounds of byte/word unpacking reassemble the f32 bit patterns. That costs ~0.4
//! instructions per weight (two 8-entry permutes and a blend per 8 values cost twice that).
//!
//! The unpacking leaves the values in a fixed order that is not the element order ([`BLOCK_ORDER`]); since a
//! dot product does not care about order, the *input* rows are permuted once per call instead
//! ([`permute_blocks`]) and every weight row is consumed in decode order.

use std::arch::x86_64::*;

use crate::cpu_linear::tiled::hsum;

/// `BLOCK_ORDER[p]` = element (within its 64-block) of the value the decoder emits at position `p`.
pub const BLOCK_ORDER: [usize; 64] = block_order();

const fn block_order() -> [usize; 64] {
    let mut order = [0usize; 64];
    let mut r = 0;
    while r < 8 {
        // Registers 0-3 hold high nibbles (even elements), 4-7 low nibbles (odd elements).
        let nibble = r / 4;
        let q = r % 4;
        let mut p = 0;
        while p < 8 {
            let byte = if p < 4 { 4 * q + p } else { 16 + 4 * q + (p - 4) };
            order[r * 8 + p] = 2 * byte + nibble;
            p += 1;
        }
        r += 1;
    }
    order
}

/// Rows of `x` (length a multiple of 64) with each 64-block rearranged into decode order.
pub fn permute_blocks(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks_exact(64).zip(out.chunks_exact_mut(64)) {
        for (d, &e) in dst.iter_mut().zip(BLOCK_ORDER.iter()) {
            *d = src[e];
        }
    }
    out
}

/// The code table as four byte planes, each repeated in both 128-bit lanes.
#[derive(Clone, Copy)]
pub struct Tables {
    planes: [__m256i; 4],
    low_nibble: __m256i,
}

impl Tables {
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn new(code: &[f32; 16]) -> Self {
        let mut planes = [_mm256_setzero_si256(); 4];
        for (b, plane) in planes.iter_mut().enumerate() {
            let mut bytes = [0u8; 32];
            for i in 0..16 {
                let v = ((code[i].to_bits() >> (8 * b)) & 0xff) as u8;
                bytes[i] = v;
                bytes[16 + i] = v;
            }
            *plane = _mm256_loadu_si256(bytes.as_ptr() as *const __m256i);
        }
        Tables { planes, low_nibble: _mm256_set1_epi8(0x0f) }
    }
}

/// 32 code indices (one per byte) → four vectors of 8 f32 (positions 0-3/16-19, 4-7/20-23, ...).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lookup32(idx: __m256i, t: &Tables) -> [__m256; 4] {
    let b0 = _mm256_shuffle_epi8(t.planes[0], idx);
    let b1 = _mm256_shuffle_epi8(t.planes[1], idx);
    let b2 = _mm256_shuffle_epi8(t.planes[2], idx);
    let b3 = _mm256_shuffle_epi8(t.planes[3], idx);
    let lo01 = _mm256_unpacklo_epi8(b0, b1);
    let hi01 = _mm256_unpackhi_epi8(b0, b1);
    let lo23 = _mm256_unpacklo_epi8(b2, b3);
    let hi23 = _mm256_unpackhi_epi8(b2, b3);
    [
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
    ]
}

/// The 64 code values of the block at `bytes` (32 bytes), unscaled, in decode order.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_block(bytes: *const u8, t: &Tables) -> [__m256; 8] {
    let v = _mm256_loadu_si256(bytes as *const __m256i);
    let lo = _mm256_and_si256(v, t.low_nibble);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), t.low_nibble);
    let h = lookup32(hi, t);
    let l = lookup32(lo, t);
    [h[0], h[1], h[2], h[3], l[0], l[1], l[2], l[3]]
}

/// Dot products of one NF4 weight row (`codes`: k/2 bytes, `scales`: k/64 decoded absmax) with `R` input
/// rows in decode order (see [`permute_blocks`]). Each block is decoded once for all rows; its partial sums
/// are scaled once per block.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `codes.len() * 2 == scales.len() * 64 == rows[i].len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows<const R: usize>(codes: &[u8], scales: &[f32], rows: [&[f32]; R], t: &Tables) -> [f32; R] {
    debug_assert_eq!(codes.len() * 2, scales.len() * 64);
    let mut total = [_mm256_setzero_ps(); R];
    for (b, &scale) in scales.iter().enumerate() {
        let w = decode_block(codes.as_ptr().add(b * 32), t);
        let s = _mm256_set1_ps(scale);
        for r in 0..R {
            let xb = rows[r].as_ptr().add(b * 64);
            let mut a0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
            let mut a1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xb.add(8)));
            a0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb.add(16)), a0);
            a1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), a1);
            a0 = _mm256_fmadd_ps(w[4], _mm256_loadu_ps(xb.add(32)), a0);
            a1 = _mm256_fmadd_ps(w[5], _mm256_loadu_ps(xb.add(40)), a1);
            a0 = _mm256_fmadd_ps(w[6], _mm256_loadu_ps(xb.add(48)), a0);
            a1 = _mm256_fmadd_ps(w[7], _mm256_loadu_ps(xb.add(56)), a1);
            total[r] = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), s, total[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(total[r]);
    }
    out
}

/// One weight row decoded and scaled into `out` (k floats) in decode order.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `codes.len() * 2 == scales.len() * 64 == out.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn decode_row(codes: &[u8], scales: &[f32], out: &mut [f32], t: &Tables) {
    debug_assert_eq!(codes.len() * 2, out.len());
    for (b, &scale) in scales.iter().enumerate() {
        let w = decode_block(codes.as_ptr().add(b * 32), t);
        let s = _mm256_set1_ps(scale);
        let o = out.as_mut_ptr().add(b * 64);
        for (i, v) in w.iter().enumerate() {
            _mm256_storeu_ps(o.add(8 * i), _mm256_mul_ps(*v, s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Nf4Weight;
    use crate::rng::Rng;

    #[test]
    fn block_order_is_a_permutation() {
        let mut seen = [false; 64];
        for &e in BLOCK_ORDER.iter() {
            assert!(!seen[e]);
            seen[e] = true;
        }
        assert_eq!(&BLOCK_ORDER[..4], &[0, 2, 4, 6]);
        assert_eq!(&BLOCK_ORDER[4..8], &[32, 34, 36, 38]);
        assert_eq!(BLOCK_ORDER[32], 1);
    }

    #[test]
    fn decode_row_is_dequantize_in_block_order() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let mut rng = Rng::new(4);
        let v: Vec<f32> = (0..3 * 128).map(|_| rng.normal() as f32).collect();
        let w = Nf4Weight::quantize(&v, &[3, 128], true);
        let full = w.dequantize();
        let scales: Vec<f32> = (0..2).map(|b| w.absmax.get(2 + b)).collect();
        let mut out = vec![0f32; 128];
        unsafe {
            let t = Tables::new(&w.code);
            decode_row(&w.packed[64..128], &scales, &mut out, &t);
        }
        let expect = permute_blocks(&full[128..256]);
        assert_eq!(out, expect);
    }
}
