//! The trainable form of an adapter (`server train`): A and B as candle `Var`s on the target modules,
//! initialised as PEFT does (A Kaiming-uniform with a = √5, i.e. U(±1/√in); B zeros, so step 0 is the
//! base model), with dropout on the LoRA input path while training. It plugs into the same forward as
//! serving through [`LoraRows::Train`](super::LoraRows): `y = base(x) + scale · dropout(x)·Aᵀ·Bᵀ` for
//! every row, through differentiable tensor ops.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};

use super::peft::BaseLayout;
use super::{LinearId, LoraModule, LoraWeights, ModuleKind};
use crate::rng::Rng;

/// One target module's trainable pair.
pub struct TrainModule {
    pub id: LinearId,
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]` (PEFT's orientation)
    pub b: Var,
    pub scale: f32,
}

/// LoRA settings of a training run.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub dropout: f32,
    pub targets: Vec<ModuleKind>,
}

impl LoraSpec {
    pub fn scale(&self) -> f32 {
        let r = self.rank as f64;
        (if self.use_rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }
}

pub struct TrainableLora {
    modules: Vec<Option<TrainModule>>,
    spec: LoraSpec,
    /// Dropout masks come from here (saved in checkpoints so a resumed run draws the same masks).
    rng: Mutex<Rng>,
    training: std::sync::atomic::AtomicBool,
}

impl TrainableLora {
    /// Fresh parameters for every layer of `layout`, drawn from `seed`.
    pub fn init(layout: &BaseLayout, spec: LoraSpec, seed: u64, device: &Device) -> candle_core::Result<Self> {
        let kinds = ModuleKind::ALL.len();
        let mut modules: Vec<Option<TrainModule>> = (0..layout.layers * kinds).map(|_| None).collect();
        for layer in 0..layout.layers {
            for &kind in &spec.targets {
                let id = LinearId::new(layer, kind);
                let (in_f, out_f) = layout.dims(kind);
                let mut rng = Rng::derive(seed, id.index() as u64);
                let bound = 1.0 / (in_f as f64).sqrt();
                let a: Vec<f32> = (0..spec.rank * in_f).map(|_| rng.uniform_range(-bound, bound) as f32).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, in_f), device)?)?;
                let b = Var::from_tensor(&Tensor::zeros((out_f, spec.rank), DType::F32, device)?)?;
                modules[id.index()] = Some(TrainModule { id, a, b, scale: spec.scale() });
            }
        }
        Ok(TrainableLora { modules, spec, rng: Mutex::new(Rng::new(seed ^ 0xD80F)), training: true.into() })
    }

    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// Dropout on (training) or off (evaluation).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn modules(&self) -> impl Iterator<Item = &TrainModule> {
        self.modules.iter().flatten()
    }

    /// Every trainable tensor, in a fixed order (A then B per module, modules in layer order).
    pub fn vars(&self) -> Vec<&Var> {
        self.modules().flat_map(|m| [&m.a, &m.b]).collect()
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    pub fn rng_state(&self) -> Rng {
        self.rng.lock().expect("rng lock").clone()
    }

    pub fn set_rng_state(&self, rng: Rng) {
        *self.rng.lock().expect("rng lock") = rng;
    }

    /// `scale · dropout(x)·Aᵀ·Bᵀ` for linear `id`, or `None` when it is not a target.
    pub fn delta(&self, id: LinearId, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(m) = self.modules.get(id.index()).and_then(|m| m.as_ref()) else {
            return Ok(None);
        };
        let dtype = x.dtype();
        let mut x = x.to_dtype(DType::F32)?;
        let p = self.spec.dropout;
        if p > 0.0 && self.training.load(std::sync::atomic::Ordering::Relaxed) {
            let n = x.elem_count();
            let keep = 1.0 / (1.0 - p);
            let mask: Vec<f32> = {
                let mut rng = self.rng.lock().expect("rng lock");
                (0..n).map(|_| if rng.uniform() < p as f64 { 0.0 } else { keep }).collect()
            };
            let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
            x = (x * mask)?;
        }
        let d = x.matmul(&m.a.as_tensor().t()?)?.matmul(&m.b.as_tensor().t()?)?;
        Ok(Some((d * m.scale as f64)?.to_dtype(dtype)?))
    }

    /// The current parameters as servable weights (f32, B transposed), on the CPU.
    pub fn to_weights(&self, layers: usize) -> candle_core::Result<LoraWeights> {
        let mut w = LoraWeights::new(layers);
        for m in self.modules() {
            let a = m.a.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
            let b_t = m.b.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F32)?.t()?.contiguous()?;
            w.insert(m.id, LoraModule { a, b_t, scale: m.scale });
        }
        Ok(w)
    }
}
