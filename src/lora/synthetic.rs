//! Random adapters for benchmarks and tests: a given rank on given projections of every layer, weights from
//! the project's PRNG (A like PEFT's Kaiming-uniform init, B small normal so the delta is not zero).

use candle_core::{Device, Tensor};

use super::peft::BaseLayout;
use super::{LinearId, LoraModule, LoraWeights, ModuleKind};
use crate::rng::Rng;

/// An adapter of rank `rank` on `kinds` in every layer of `layout`, scale α/r = 2.
pub fn random_adapter(
    layout: &BaseLayout,
    rank: usize,
    kinds: &[ModuleKind],
    seed: u64,
    device: &Device,
) -> candle_core::Result<LoraWeights> {
    let mut w = LoraWeights::new(layout.layers);
    for layer in 0..layout.layers {
        for &kind in kinds {
            let id = LinearId::new(layer, kind);
            let (in_f, out_f) = layout.dims(kind);
            let mut rng = Rng::derive(seed, id.index() as u64);
            let bound = 1.0 / (in_f as f64).sqrt();
            let a: Vec<f32> = (0..rank * in_f).map(|_| rng.uniform_range(-bound, bound) as f32).collect();
            let b_t: Vec<f32> = (0..rank * out_f).map(|_| (rng.normal() * 0.01) as f32).collect();
            w.insert(
                id,
                LoraModule {
                    a: Tensor::from_vec(a, (rank, in_f), device)?,
                    b_t: Tensor::from_vec(b_t, (rank, out_f), device)?,
                    scale: 2.0,
                },
            );
        }
    }
    Ok(w)
}

/// q, k, v and o projections.
pub const ATTENTION: [ModuleKind; 4] = [ModuleKind::QProj, ModuleKind::KProj, ModuleKind::VProj, ModuleKind::OProj];
