//! The GPU kernels of `src/gpu/kernels/` checked on the CPU by emulation, in plain `cargo test`: each `.cu`
//! source is compiled unchanged by g++ under `emu/cuda_emu.h` (blocks one after another, the threads of a
//! block as fibers taking turns at __syncthreads, warp shuffles and tensor-core MMAs, the MMA's fragment
//! layouts taken from the PTX ISA; see that header), launched with the kernel choice and geometry of
//! `loraserve::gpu::launch` and the argument order of the host code in `src/gpu/{nf4,lora,attention,sample,
//! fused}.rs`, and compared with the CPU references the device checks (`benches/gpu_kernels.rs`) use.
//! One module per kernel family: `nf4` (`quant::matmul::matmul_reference`), `lora`
//! (`lora::batched::apply_reference`), `attention` (`model::attention::paged_attention`), `elementwise`
//! (`engine::sampler::argmax`, and candle's CPU ops for the fused kernels: `x + d` then
//! `candle_nn::ops::rms_norm`, `silu(g) · u`). Shapes are the device checks' cases scaled down.
//!
//! Every output buffer is NaN-filled before its launch (an element no thread writes fails); every launch runs
//! under two thread interleavings that must agree bit for bit (a race fails); errors are relative L2 against
//! references checked to be non-trivial (the helpers below). `emulation` checks the emulated MMA and TF32
//! rounding on their own, on one tile against a plain matrix product, and shows each check of the harness
//! failing on a broken launch or kernel. Needs g++ (the tests fail, never skip, without it).

mod emu;

mod attention;
mod elementwise;
mod emulation;
mod lora;
mod nf4;

use emu::Call;
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
fn run(call: &mut Call, seed: u64) -> emu::Outputs {
    call.run_interleavings(&[seed, seed ^ 0x5bd1_e995]).unwrap_or_else(|e| panic!("{e}"))
}
