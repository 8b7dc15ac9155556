//! The two code tables of QLoRA's NF4 with double quantization, exactly as bitsandbytes builds them:
//! the 16-value NormalFloat table (`get_4bit_type("nf4")`) and the signed 8-bit dynamic map
//! (`create_dynamic_map(signed=True)`) that quantizes the per-block absmax values.

/// bitsandbytes' NF4 table (index → value), the `quant_map` of every NF4 checkpoint. Sorted ascending;
/// index 7 is exactly zero.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Decision bounds between neighbouring NF4 codes, computed in f32 as bitsandbytes does
/// (`(code[:-1] + code[1:]) / 2`).
pub fn nf4_bounds() -> [f32; 15] {
    let mut b = [0f32; 15];
    for (i, bound) in b.iter_mut().enumerate() {
        *bound = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
    }
    b
}

/// The NF4 code of a value already scaled into [-1, 1]: `torch.bucketize(x, bounds)` with `right=False`,
/// i.e. the number of bounds strictly below `x`, so a value exactly on a midpoint takes the lower code.
#[inline]
pub fn nf4_index(x: f32, bounds: &[f32; 15]) -> u8 {
    bounds.iter().filter(|&&b| b < x).count() as u8
}

/// `torch.linspace(start, end, steps, dtype=float32)` as torch's CPU kernel computes it: the first half counts
/// up from `start`, the second half down from `end`, each element one fused multiply-add in f32 (the compiled
/// kernel contracts `start + step * i`). Checked against the dynamic map stored by bitsandbytes 0.50.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: 256 sorted values in
/// [-1, 1] — the code table of the nested (second-level) quantization of absmax values.
pub fn dynamic_map_signed() -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = (1usize << i) + 1;
        let boundaries = torch_linspace_f32(0.1, 1.0, fraction_items);
        // Python's `10 ** (i - 6)` (a float), multiplied into an f32 tensor: the scalar is taken as f32.
        let scale = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i as usize] as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-(scale * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// Index of the nearest entry of a sorted code table (ties go to the lower entry).
pub fn nearest_code(x: f32, sorted: &[f32]) -> u8 {
    let hi = sorted.partition_point(|&c| c < x);
    if hi == 0 {
        return 0;
    }
    if hi >= sorted.len() {
        return (sorted.len() - 1) as u8;
    }
    let lo = hi - 1;
    if x - sorted[lo] <= sorted[hi] - x {
        lo as u8
    } else {
        hi as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_table_is_sorted_with_exact_zero_and_unit_ends() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_CODE[0], -1.0);
        assert_eq!(NF4_CODE[7], 0.0);
        assert_eq!(NF4_CODE[15], 1.0);
    }

    #[test]
    fn nf4_index_takes_lower_code_on_midpoints() {
        let b = nf4_bounds();
        for i in 0..15 {
            assert_eq!(nf4_index(b[i], &b), i as u8, "midpoint {i}");
            assert_eq!(nf4_index(NF4_CODE[i], &b), i as u8);
        }
        assert_eq!(nf4_index(1.0, &b), 15);
        assert_eq!(nf4_index(-1.0, &b), 0);
        assert_eq!(nf4_index(0.0, &b), 7);
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map_signed();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        assert!(m[0] > -1.0 && m[0] < -0.9);
    }

    #[test]
    fn nearest_code_rounds_to_nearest() {
        let t = [-1.0, 0.0, 0.5, 1.0];
        assert_eq!(nearest_code(-2.0, &t), 0);
        assert_eq!(nearest_code(0.2, &t), 1);
        assert_eq!(nearest_code(0.25, &t), 1);
        assert_eq!(nearest_code(0.3, &t), 2);
        assert_eq!(nearest_code(7.0, &t), 3);
    }
}
