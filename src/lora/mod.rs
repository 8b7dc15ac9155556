//! LoRA adapters: the in-memory form of an adapter ([`LoraWeights`]: per linear layer A `[r, in]`, Bᵀ
//! `[r, out]` and the α/r or α/√r scale), how a forward learns which rows use which adapter
//! ([`LoraRows`]), and the batched-LoRA op that applies many adapters in one pass ([`batched`]).
//!
//! Submodules: [`batched`] (the op, reference and fast path), [`peft`] (PEFT config + safetensors parsing
//! and validation), [`store`] (the adapters root: ids, paths, versions), [`cache`] (lazy single-flight
//! loads, byte-budgeted LRU tiers, leases, hot swap), [`packed`] (an adapter in one buffer, for one-copy
//! transfers to the GPU), [`synthetic`] (random adapters for benchmarks),
//! [`trainable`] (the trainable `Var` form used by `server train`), [`watch`] (the filesystem watch on the
//! adapters root).

pub mod batched;
pub mod cache;
mod file;
pub mod packed;
pub mod peft;
pub mod store;
pub mod synthetic;
pub mod trainable;
pub mod watch;

use std::fmt;

use candle_core::Tensor;

pub use batched::LoraSegment;

/// The seven projections of a Llama-family decoder layer, in PEFT's module-name spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleKind {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 7] = [
        ModuleKind::QProj,
        ModuleKind::KProj,
        ModuleKind::VProj,
        ModuleKind::OProj,
        ModuleKind::GateProj,
        ModuleKind::UpProj,
        ModuleKind::DownProj,
    ];

    /// The leaf name (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::QProj => "q_proj",
            ModuleKind::KProj => "k_proj",
            ModuleKind::VProj => "v_proj",
            ModuleKind::OProj => "o_proj",
            ModuleKind::GateProj => "gate_proj",
            ModuleKind::UpProj => "up_proj",
            ModuleKind::DownProj => "down_proj",
        }
    }

    /// The parent block (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            ModuleKind::QProj | ModuleKind::KProj | ModuleKind::VProj | ModuleKind::OProj => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        ModuleKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One linear layer of the model: decoder layer index and projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearId {
    pub layer: usize,
    pub kind: ModuleKind,
}

impl LinearId {
    pub fn new(layer: usize, kind: ModuleKind) -> Self {
        LinearId { layer, kind }
    }

    /// Dense index (`layer * 7 + kind`) into per-linear tables.
    pub fn index(self) -> usize {
        self.layer * ModuleKind::ALL.len() + self.kind as usize
    }

    /// The Hugging Face module path (`model.layers.3.self_attn.q_proj`).
    pub fn module_path(self) -> String {
        format!("model.layers.{}.{}.{}", self.layer, self.kind.parent(), self.kind.name())
    }
}

impl fmt::Display for LinearId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.module_path())
    }
}

/// One linear layer's LoRA pair, ready for the batched op: `delta(x) = scale · (x·Aᵀ)·Bᵀ`.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// `[r, in]`, f32.
    pub a: Tensor,
    /// `[r, out]` (B transposed, so the expand step streams contiguous rows), f32.
    pub b_t: Tensor,
    /// α/r, or α/√r with rsLoRA, after rank/alpha patterns.
    pub scale: f32,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    pub fn bytes(&self) -> usize {
        (self.a.elem_count() + self.b_t.elem_count()) * self.a.dtype().size_in_bytes()
    }
}

/// An adapter's weights for every linear layer it targets, indexed by [`LinearId::index`].
#[derive(Clone, Debug, Default)]
pub struct LoraWeights {
    modules: Vec<Option<LoraModule>>,
    /// The chat template the adapter's folder brings, if any: it travels with the weights through the cache
    /// tiers, so a lease on one version names both.
    pub template: Option<std::sync::Arc<crate::model::chat::AdapterTemplate>>,
    /// The GPU kernels' view of the modules (device addresses, ranks, scales), made on first use by a GPU
    /// forward and kept as long as these tensors live.
    #[cfg(feature = "cuda")]
    device_table: std::sync::OnceLock<std::result::Result<Vec<Option<crate::gpu::lora::ModuleAddr>>, String>>,
}

impl LoraWeights {
    /// An adapter for a model with `layers` decoder layers, targeting nothing yet.
    pub fn new(layers: usize) -> Self {
        Self::from_modules(vec![None; layers * ModuleKind::ALL.len()])
    }

    fn from_modules(modules: Vec<Option<LoraModule>>) -> Self {
        LoraWeights {
            modules,
            template: None,
            #[cfg(feature = "cuda")]
            device_table: Default::default(),
        }
    }

    pub fn insert(&mut self, id: LinearId, module: LoraModule) {
        self.modules[id.index()] = Some(module);
        #[cfg(feature = "cuda")]
        {
            // Addresses taken before this insert would name the old tensors.
            self.device_table = Default::default();
        }
    }

    #[inline]
    pub fn module(&self, id: LinearId) -> Option<&LoraModule> {
        self.modules.get(id.index()).and_then(|m| m.as_ref())
    }

    /// The targeted layers, in order.
    pub fn targets(&self) -> impl Iterator<Item = (LinearId, &LoraModule)> {
        let kinds = ModuleKind::ALL.len();
        self.modules
            .iter()
            .enumerate()
            .filter_map(move |(i, m)| m.as_ref().map(|m| (LinearId::new(i / kinds, ModuleKind::ALL[i % kinds]), m)))
    }

    /// A copy with every tensor on `device`.
    pub fn to_device(&self, device: &candle_core::Device) -> candle_core::Result<Self> {
        let modules = self
            .modules
            .iter()
            .map(|m| {
                m.as_ref()
                    .map(|m| {
                        Ok(LoraModule { a: m.a.to_device(device)?, b_t: m.b_t.to_device(device)?, scale: m.scale })
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        let mut copy = Self::from_modules(modules);
        copy.template = self.template.clone();
        Ok(copy)
    }

    /// Every linear's module slot, in [`LinearId::index`] order.
    pub fn modules(&self) -> &[Option<LoraModule>] {
        &self.modules
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn device_table(
        &self,
    ) -> &std::sync::OnceLock<std::result::Result<Vec<Option<crate::gpu::lora::ModuleAddr>>, String>> {
        &self.device_table
    }

    /// Bytes of all A and B tensors.
    pub fn bytes(&self) -> usize {
        self.modules.iter().flatten().map(|m| m.bytes()).sum()
    }
}

/// Device tensors are freed on the thread that drops the last reference (an evicting request handler, the
/// file watcher): make the adapter's CUDA context current there first, or the free fails and poisons the
/// context's next call on every thread.
#[cfg(feature = "cuda")]
impl Drop for LoraWeights {
    fn drop(&mut self) {
        if let Some(candle_core::Device::Cuda(d)) = self.modules.iter().flatten().map(|m| m.a.device()).next() {
            let _ = d.cuda_stream().context().bind_to_thread();
        }
    }
}

/// How the LoRA deltas of one forward are chosen.
#[derive(Clone, Copy, Default)]
pub enum LoraRows<'a> {
    /// Base model only.
    #[default]
    None,
    /// Serving: row segments, each with its adapter (rows in no segment use the base alone).
    Segments(&'a [LoraSegment<'a>]),
    /// Serving, checked: the same segments through the plain reference op (tests compare the two).
    SegmentsReference(&'a [LoraSegment<'a>]),
    /// Training: one trainable adapter on every row, through differentiable tensor ops.
    Train(&'a trainable::TrainableLora),
    /// Serving on a GPU: the segments' tables uploaded once for the whole forward.
    #[cfg(feature = "cuda")]
    Device(&'a crate::gpu::lora::StepPlan<'a>),
}

impl LoraRows<'_> {
    /// Adds this forward's LoRA deltas for linear `id` to `y = base(x)`.
    pub fn apply(&self, id: LinearId, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        match self {
            LoraRows::None => Ok(y),
            LoraRows::Segments(segs) => {
                #[cfg(feature = "cuda")]
                if y.device().is_cuda() {
                    // A one-linear plan (a model forward builds one plan for all its linears: `Device`); the
                    // linear's fresh output takes the deltas in place.
                    let device = y.device().as_cuda_device()?;
                    let plan = crate::gpu::lora::StepPlan::new(device, y.dim(0)?, segs, id.index() + 1)?;
                    plan.add_deltas(id, &y, x)?;
                    return Ok(y);
                }
                batched::apply(&y, x, id, segs)
            }
            LoraRows::SegmentsReference(segs) => batched::apply_reference(&y, x, id, segs),
            LoraRows::Train(t) => match t.delta(id, x)? {
                Some(d) => y + d,
                None => Ok(y),
            },
            #[cfg(feature = "cuda")]
            LoraRows::Device(plan) => {
                plan.add_deltas(id, &y, x)?;
                Ok(y)
            }
        }
    }
}
