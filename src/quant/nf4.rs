//! The NF4 weight format: blocks of 64 along the flattened weight, one absmax per block, two 4-bit codes a
//! byte with the FIRST element in the HIGH nibble, and optionally the absmax values themselves quantized
//! (double quantization: mean subtracted, blocks of 256, bitsandbytes' signed 8-bit dynamic map).
//!
//! [`Nf4Weight::quantize`] reproduces bitsandbytes' `quantize_4bit` bit for bit (full blocks scaled by the
//! f32 reciprocal of their absmax, the tail block by true division, midpoints to the lower code, odd sizes
//! padded with 0.0); [`Nf4Weight::dequantize`] is the plain reference every fast kernel is tested against.

use rayon::prelude::*;

use super::codebook::{dynamic_map_signed, nearest_code, nf4_bounds, nf4_index, NF4_CODE};
use super::QuantError;

/// NF4 block size (elements per absmax). bitsandbytes supports others; QLoRA and loraserve use 64.
pub const BLOCK: usize = 64;
/// Block size of the nested (double) quantization of absmax values.
pub const NESTED_BLOCK: usize = 256;

/// The second-level quantization of the per-block absmax values.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per 64-element block (index into `nested_code`).
    pub codes: Vec<u8>,
    /// One f32 scale per 256 codes.
    pub nested_absmax: Vec<f32>,
    /// The 8-bit code table (bitsandbytes' signed dynamic map; read from checkpoints as stored).
    pub nested_code: Box<[f32; 256]>,
    /// The mean subtracted before quantizing (`nested_offset`).
    pub offset: f32,
}

/// Per-block scales: plain f32, or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    Double(DoubleQuant),
}

impl Absmax {
    /// Number of 64-element blocks covered.
    pub fn len(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len(),
            Absmax::Double(d) => d.codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The scale of block `b`, decoded exactly as bitsandbytes' `dequantize_4bit` computes it
    /// (`nested_code[c] * nested_absmax[b / 256] + offset`, f32 operations).
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::F32(v) => v[b],
            Absmax::Double(d) => d.nested_code[d.codes[b] as usize] * d.nested_absmax[b / NESTED_BLOCK] + d.offset,
        }
    }

    /// All scales, decoded.
    pub fn decode_all(&self) -> Vec<f32> {
        (0..self.len()).map(|b| self.get(b)).collect()
    }

    /// Bytes this representation keeps resident.
    pub fn resident_bytes(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len() * 4,
            Absmax::Double(d) => d.codes.len() + d.nested_absmax.len() * 4 + 256 * 4 + 4,
        }
    }
}

/// One NF4-quantized weight: the base model's resident form of a linear layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    /// Logical shape; linear weights are `[out_features, in_features]`.
    pub shape: Vec<usize>,
    /// `ceil(numel / 2)` bytes; element `2i` in the high nibble of byte `i`.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    /// The 16-entry code table (`quant_map`), NF4's.
    pub code: [f32; 16],
}

impl Nf4Weight {
    /// Quantizes `values` (row-major, `shape`) like bitsandbytes' `quantize_4bit(blocksize=64, nf4)`, with
    /// `compress_statistics = double_quant`.
    pub fn quantize(values: &[f32], shape: &[usize], double_quant: bool) -> Self {
        let n = values.len();
        assert_eq!(n, shape.iter().product::<usize>(), "values do not match shape");
        let nblocks = n.div_ceil(BLOCK);
        let bounds = nf4_bounds();
        // Quantize block pairs in parallel: a block of 64 codes fills exactly 32 bytes.
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0f32; nblocks];
        packed.par_chunks_mut(BLOCK / 2).zip(absmax.par_iter_mut()).enumerate().for_each(|(b, (out, am_out))| {
            let block = &values[b * BLOCK..((b + 1) * BLOCK).min(n)];
            let am = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            *am_out = am;
            let am = am.max(1e-38);
            let full = block.len() == BLOCK;
            let inv = 1.0f32 / am;
            let scaled = |x: f32| -> u8 {
                let s = if full { x * inv } else { x / am };
                nf4_index(s.clamp(-1.0, 1.0), &bounds)
            };
            for (i, byte) in out.iter_mut().enumerate() {
                let hi = block.get(2 * i).map_or(7, |&x| scaled(x));
                // An odd element count is padded with 0.0, whose code is 7.
                let lo = block.get(2 * i + 1).map_or(7, |&x| scaled(x));
                *byte = (hi << 4) | lo;
            }
        });
        let absmax = if double_quant { Absmax::Double(double_quantize(&absmax)) } else { Absmax::F32(absmax) };
        Nf4Weight { shape: shape.to_vec(), packed, absmax, code: NF4_CODE }
    }

    /// Assembles a weight from stored parts, checking that their sizes agree with `shape`.
    pub fn from_parts(shape: Vec<usize>, packed: Vec<u8>, absmax: Absmax, code: [f32; 16]) -> Result<Self, QuantError> {
        let w = Nf4Weight { shape, packed, absmax, code };
        w.check_layout()?;
        Ok(w)
    }

    /// The parts' sizes agree with the shape (every constructor checks it; the GPU upload checks again, as
    /// the kernels read exactly these sizes and the fields are public).
    pub fn check_layout(&self) -> Result<(), QuantError> {
        let Nf4Weight { shape, packed, absmax, .. } = self;
        let n: usize = shape.iter().product();
        if packed.len() != n.div_ceil(2) {
            return Err(QuantError::Layout(format!(
                "packed weight has {} bytes, shape {:?} needs {}",
                packed.len(),
                shape,
                n.div_ceil(2)
            )));
        }
        if absmax.len() != n.div_ceil(BLOCK) {
            return Err(QuantError::Layout(format!(
                "absmax has {} entries, shape {:?} has {} blocks of {BLOCK}",
                absmax.len(),
                shape,
                n.div_ceil(BLOCK)
            )));
        }
        if let Absmax::Double(d) = &absmax {
            if d.nested_absmax.len() != d.codes.len().div_ceil(NESTED_BLOCK) {
                return Err(QuantError::Layout(format!(
                    "nested_absmax has {} entries, {} absmax codes need {}",
                    d.nested_absmax.len(),
                    d.codes.len(),
                    d.codes.len().div_ceil(NESTED_BLOCK)
                )));
            }
        }
        Ok(())
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `(rows, cols)` of a 2-D weight.
    pub fn dims2(&self) -> (usize, usize) {
        assert_eq!(self.shape.len(), 2, "NF4 linear weights are 2-D");
        (self.shape[0], self.shape[1])
    }

    /// The 4-bit code of flat element `i`.
    #[inline]
    pub fn code_index(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Reference dequantization to f32: `code[nibble] * absmax[block]`, one f32 multiply per element, as
    /// bitsandbytes' `dequantize_4bit`.
    pub fn dequantize(&self) -> Vec<f32> {
        let scales = self.absmax.decode_all();
        (0..self.numel()).map(|i| self.code[self.code_index(i) as usize] * scales[i / BLOCK]).collect()
    }

    /// Bytes kept resident: packed codes, scales and tables.
    pub fn resident_bytes(&self) -> usize {
        self.packed.len() + self.absmax.resident_bytes() + 16 * 4
    }
}

/// Double quantization of absmax values, as `quantize_4bit(compress_statistics=True)`: subtract the mean,
/// then 8-bit blockwise quantization (blocks of 256) with the signed dynamic map, nearest code.
pub fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let code = dynamic_map_signed();
    let offset = if absmax.is_empty() {
        0.0
    } else {
        (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32
    };
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = Vec::with_capacity(centered.len());
    let mut nested_absmax = Vec::with_capacity(centered.len().div_ceil(NESTED_BLOCK));
    for block in centered.chunks(NESTED_BLOCK) {
        let am = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        nested_absmax.push(am);
        let am = am.max(1e-38);
        codes.extend(block.iter().map(|&x| nearest_code((x / am).clamp(-1.0, 1.0), &code)));
    }
    DoubleQuant { codes, nested_absmax, nested_code: Box::new(code), offset }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::codebook::NF4_CODE;

    fn lcg_normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Half the largest gap between neighbouring NF4 codes: the worst rounding error of a value scaled
    /// into [-1, 1].
    fn half_max_gap() -> f32 {
        NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0
    }

    #[test]
    fn round_trip_error_is_within_half_the_largest_gap_per_block() {
        for &(rows, cols) in &[(64, 64), (7, 9), (3, 100), (96, 256), (1, 1), (5, 13)] {
            let x = lcg_normal(rows * cols, 7 + rows as u64);
            let w = Nf4Weight::quantize(&x, &[rows, cols], false);
            let y = w.dequantize();
            for (b, block) in x.chunks(BLOCK).enumerate() {
                let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let bound = half_max_gap() * am * (1.0 + 1e-6);
                for (i, v) in block.iter().enumerate() {
                    let err = (v - y[b * BLOCK + i]).abs();
                    assert!(err <= bound, "{rows}x{cols} block {b} elem {i}: err {err} > {bound}");
                }
            }
        }
    }

    #[test]
    fn packing_puts_the_first_element_in_the_high_nibble() {
        // Element 0 → code 15 (1.0), element 1 → code 0 (-1.0), element 2 → 7 (0.0): a swapped nibble or an
        // off-by-one element order gives other bytes.
        let mut x = vec![0f32; 64];
        x[0] = 1.0;
        x[1] = -1.0;
        x[3] = 1.0;
        let w = Nf4Weight::quantize(&x, &[64], false);
        assert_eq!(w.packed[0], 0xF0);
        assert_eq!(w.packed[1], 0x7F);
        assert_eq!(w.packed[2], 0x77);
        assert_eq!(w.code_index(0), 15);
        assert_eq!(w.code_index(1), 0);
        assert_eq!(w.code_index(3), 15);
    }

    #[test]
    fn tail_block_has_its_own_absmax_and_odd_sizes_pad_with_code_7() {
        // 64 + 3 elements: the tail block's absmax is 0.5, not the first block's 4.0.
        let mut x = vec![0.1f32; 67];
        x[10] = 4.0;
        x[64] = 0.5;
        x[65] = -0.25;
        x[66] = 0.5;
        let w = Nf4Weight::quantize(&x, &[67], false);
        assert_eq!(w.absmax, Absmax::F32(vec![4.0, 0.5]));
        assert_eq!(w.packed.len(), 34);
        assert_eq!(w.code_index(64), 15);
        assert_eq!(w.code_index(66), 15);
        assert_eq!(w.packed[33] & 0x0f, 7, "padding nibble");
        let y = w.dequantize();
        assert_eq!(y[64], 0.5);
        assert_eq!(y.len(), 67);
    }

    #[test]
    fn zero_block_dequantizes_to_zero() {
        let w = Nf4Weight::quantize(&[0f32; 128], &[2, 64], true);
        assert!(w.packed.iter().all(|&b| b == 0x77));
        assert!(w.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn double_quant_recovers_absmax_within_one_code_step() {
        let x = lcg_normal(64 * 700, 3);
        let plain = Nf4Weight::quantize(&x, &[700, 64], false);
        let dq = Nf4Weight::quantize(&x, &[700, 64], true);
        assert_eq!(plain.packed, dq.packed, "double quantization changes only the scales");
        let Absmax::F32(raw) = &plain.absmax else { unreachable!() };
        let Absmax::Double(d) = &dq.absmax else { unreachable!() };
        assert_eq!(d.nested_absmax.len(), 3);
        let code = &d.nested_code;
        for (b, &a) in raw.iter().enumerate() {
            let c = d.codes[b] as usize;
            // The step of the 8-bit code around the chosen entry, in absmax units.
            let lo = if c > 0 { code[c] - code[c - 1] } else { 0.0 };
            let hi = if c < 255 { code[c + 1] - code[c] } else { 0.0 };
            let step = lo.max(hi) * d.nested_absmax[b / NESTED_BLOCK];
            let err = (dq.absmax.get(b) - a).abs();
            assert!(err <= step / 2.0 + 1e-6, "block {b}: err {err} step {step}");
        }
    }

    #[test]
    fn resident_size_is_half_a_byte_plus_double_quantized_scales() {
        // A 7B model's largest weights are 4096 × 11008; this one is 4096 × 1024 (same per-parameter cost).
        let (n, k) = (1024, 4096);
        let w = Nf4Weight::quantize(&lcg_normal(n * k, 9), &[n, k], true);
        let bits = w.resident_bytes() as f64 * 8.0 / (n * k) as f64;
        // 4 bits of code + 8/64 bits of absmax code + 32/(64·256) bits of nested scale = 4.127 bits, plus
        // the fixed tables (1 KiB nested code, 64 B NF4 code) spread over the weight.
        assert!(bits > 4.126 && bits < 4.13, "{bits} bits per parameter");
        let plain = Nf4Weight::quantize(&lcg_normal(n * k, 9), &[n, k], false);
        let plain_bits = plain.resident_bytes() as f64 * 8.0 / (n * k) as f64;
        assert!((plain_bits - 4.5).abs() < 0.001, "{plain_bits}");
    }

    #[test]
    fn from_parts_checks_sizes() {
        let w = Nf4Weight::quantize(&lcg_normal(130, 1), &[10, 13], true);
        assert!(Nf4Weight::from_parts(vec![10, 13], w.packed.clone(), w.absmax.clone(), NF4_CODE).is_ok());
        let e = Nf4Weight::from_parts(vec![10, 14], w.packed.clone(), w.absmax.clone(), NF4_CODE).unwrap_err();
        assert!(e.to_string().contains("packed"), "{e}");
        let e = Nf4Weight::from_parts(vec![10, 13], w.packed, Absmax::F32(vec![1.0]), NF4_CODE).unwrap_err();
        assert!(e.to_string().contains("absmax"), "{e}");
    }
}
