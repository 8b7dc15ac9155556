//! The Llama-family model: Hugging Face config and weights in, one forward out.
//!
//! - [`config`]: raw `config.json` (transformers 4.x and 5.x forms) → [`ModelConfig`]; [`generation`]: the
//!   sampling defaults of `generation_config.json`.
//! - [`weights`]: memory-mapped safetensors (single file or shards) behind [`WeightSource`].
//! - [`tokenizer`]: `tokenizer.json` + chat template, and the streaming detokenizer; [`chat`]: rendering
//!   conversations with the chat template (server `messages`, train `{"messages"}` lines); [`token_bytes`]: the
//!   bytes each token spells (structured output).
//! - [`linear`]: [`Linear`], the single linear type (dense or NF4 base + LoRA rows); [`frozen`]: `x·Wᵀ` with
//!   no gradient for the frozen weight (dense base linears and the head).
//! - [`attention`], [`kv_cache`]: RoPE, dense and paged attention, the block KV cache; [`kv_blocks`]: its
//!   blocks' reference counts and the prefix cache.
//! - [`llama`]: [`Model`] and its forward over a flattened batch.
//! - [`checkpoint`]: writing a model back out as a Hugging Face folder (quantize, merge).
//! - [`demo`]: the embedded `--model demo`; [`synthetic`]: named benchmark shapes with random weights.
//!
//! [`load`] turns a [`ModelSpec`] into a [`LoadedModel`].

pub mod attention;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod frozen;
pub mod generation;
pub mod kv_blocks;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod synthetic;
pub mod token_bytes;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use chat::{ChatError, ChatTemplate};
pub use config::{ConfigError, ModelConfig};
pub use generation::GenerationDefaults;
pub use linear::{BaseWeight, Linear};
pub use llama::{AttentionMode, Batch, Model, SeqInput};
pub use tokenizer::{TextStream, Tokenizer, TokenizerError};
pub use weights::{WeightSource, WeightsError};

use crate::quant::{QuantError, QuantMode};

/// Everything that can go wrong loading a model; each variant's message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("{}", crate::candle_message(.0))]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Which model to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// The embedded demo model.
    Demo,
    /// A Hugging Face model folder.
    Dir(PathBuf),
    /// `synthetic:<shape>`: a named benchmark shape with random weights and the demo tokenizer.
    Synthetic(String),
}

impl std::str::FromStr for ModelSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("model must be `demo` or a folder".into());
        }
        if let Some(shape) = s.strip_prefix("synthetic:") {
            if synthetic::shape_config(shape).is_none() {
                return Err(format!("unknown synthetic shape `{shape}` (known: {})", synthetic::SHAPES.join(", ")));
            }
            return Ok(ModelSpec::Synthetic(shape.to_string()));
        }
        Ok(if s == "demo" { ModelSpec::Demo } else { ModelSpec::Dir(PathBuf::from(s)) })
    }
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSpec::Demo => f.write_str("demo"),
            ModelSpec::Dir(p) => write!(f, "{}", p.display()),
            ModelSpec::Synthetic(shape) => write!(f, "synthetic:{shape}"),
        }
    }
}

/// How to hold the model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub quant: QuantMode,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, quant: QuantMode::Nf4, device: Device::Cpu }
    }
}

/// A model ready to run, with its tokenizer.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub spec: ModelSpec,
}

/// Loads a model folder or the demo model.
pub fn load(spec: &ModelSpec, opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    match spec {
        ModelSpec::Demo => {
            let config = demo::config();
            let weights = demo::weights()?;
            let model = build(config, &weights, opts)?;
            Ok(LoadedModel { model, tokenizer: demo::tokenizer()?, spec: spec.clone() })
        }
        ModelSpec::Synthetic(shape) => Ok(LoadedModel {
            model: synthetic::build(shape, opts, 7)?,
            tokenizer: demo::tokenizer()?,
            spec: spec.clone(),
        }),
        ModelSpec::Dir(dir) => {
            if !dir.is_dir() {
                return Err(ModelError::Invalid(format!("{}: not a model folder", dir.display())));
            }
            let config = read_config(dir)?;
            let files = weights::SafetensorsFiles::open_dir(dir)?;
            let tokenizer = Tokenizer::from_dir(dir)?;
            let tracked = weights::Tracked::new(&files);
            let model = build(config, &tracked, opts)?;
            // Skipped by design, as transformers and vLLM skip them: biases the config gives no module (GPTQ
            // exports, Qwen2's o_proj) and old checkpoints' stored rotary frequencies.
            tracked.check_all_read(|name| name.ends_with(".bias") || name.ends_with("rotary_emb.inv_freq"))?;
            Ok(LoadedModel { model, tokenizer, spec: spec.clone() })
        }
    }
}

/// `config.json` plus `generation_config.json` (when present) of a model folder.
pub fn read_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let file = dir.join("config.json");
    let mut config = ModelConfig::from_file(&file)?;
    if let Some(q) = &config.quantization {
        crate::quant::bnb::check_quantization_config(q, &file.display().to_string())?;
    }
    let gen = dir.join("generation_config.json");
    let mut eos_from = file;
    if gen.is_file() {
        let text = std::fs::read_to_string(&gen)
            .map_err(|e| ConfigError::Io { file: gen.display().to_string(), reason: e.to_string() })?;
        if config.apply_generation_config(&text, &gen.display().to_string())? {
            eos_from = gen;
        }
    }
    // The ids generation stops at, wherever they came from, must be tokens the model can produce.
    config.check_eos_in_vocab(&eos_from.display().to_string())?;
    Ok(config)
}

/// Refuses, at load rather than mid-request, a device this build has no forward for: the CPU always works;
/// a CUDA GPU needs the `cuda` feature, compute capability 8.0 or newer (TF32 tensor cores) and f32 compute
/// (the GPU kernels' dtype: NF4 matmul, batched LoRA and paged attention accumulate and store f32).
pub(crate) fn check_device(opts: &LoadOptions) -> Result<(), ModelError> {
    match &opts.device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) if opts.dtype == DType::F32 => {
            let (major, minor) = d
                .cuda_stream()
                .context()
                .compute_capability()
                .map_err(|e| ModelError::Invalid(format!("reading the GPU's compute capability: {e}")))?;
            crate::gpu::launch::nvrtc_arch(major, minor).map(|_| ()).map_err(ModelError::Invalid)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(ModelError::Invalid(format!(
            "dtype {:?} on a CUDA device: the GPU kernels compute in f32; use --dtype f32",
            opts.dtype
        ))),
        #[allow(unreachable_patterns)]
        other => Err(ModelError::Invalid(format!(
            "device {:?}: this build has no forward for it (NVIDIA GPUs need a build with --features cuda)",
            other.location()
        ))),
    }
}

/// Builds the model from a weight source.
pub fn build(config: ModelConfig, source: &dyn WeightSource, opts: &LoadOptions) -> Result<Model, ModelError> {
    check_device(opts)?;
    let ld = linear::LinearLoad {
        source,
        quant: opts.quant,
        dtype: opts.dtype,
        device: &opts.device,
        prequantized: config.quantization.as_ref().map(crate::quant::bnb::SkipModules::of),
    };
    Model::load(config, &ld)
}
