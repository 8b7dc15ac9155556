//! Hugging Face `config.json` → [`ModelConfig`], the resolved runtime configuration of a Llama-family
//! model (Llama 2/3, Mistral, Qwen2).
//!
//! Two raw forms are accepted, as transformers writes them: 4.x (`rope_theta` and `rope_scaling` at the top
//! level) and 5.x (`rope_parameters`). Everything the forward needs is resolved here once — head_dim, the
//! grouped-query ratio, which projections carry a bias, the rotary inverse frequencies — so the model code
//! never looks at raw JSON. Fields transformers gives a default get the same default here; the fields that
//! define the shape of the network are required and a missing one is named in the error.

use serde_json::{Map, Value};

/// The most decoder layers a config may name: lists a layer long are built before the checkpoint's tensors
/// are read (the largest Llama-family models have 126 layers).
const MAX_LAYERS: usize = 4096;
/// The widest attention head a config may give (`head_dim`, or hidden_size / heads): the rotary tables are
/// built from it before the checkpoint's tensors are read.
const MAX_HEAD_DIM: usize = 4096;

/// Errors from reading a model's `config.json` / `generation_config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {reason}")]
    Io { file: String, reason: String },
    #[error("{file}: invalid JSON: {reason}")]
    Json { file: String, reason: String },
    #[error("{file}: missing required field `{field}`")]
    Missing { file: String, field: String },
    #[error("{file}: field `{field}`: {reason}")]
    Invalid { file: String, field: String, reason: String },
    #[error("{file}: unsupported model_type `{model_type}` (supported: llama, mistral, qwen2)")]
    UnsupportedModelType { file: String, model_type: String },
}

/// The architectures that share the one forward in [`crate::model::llama`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    Llama,
    Mistral,
    Qwen2,
}

impl ModelFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::Llama => "llama",
            ModelFamily::Mistral => "mistral",
            ModelFamily::Qwen2 => "qwen2",
        }
    }
}

/// How rotary position frequencies are derived (`rope_type` in transformers).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (`rope_type: "linear"`).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The resolved configuration the forward runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: ModelFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// q/k/v projections carry a bias (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down carry a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Sliding attention window per layer (`None` = full attention).
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The sampling defaults `generation_config.json` sets (none without one), or why they cannot be read:
    /// an error only for whoever uses them (`--generation-config auto`), not for every load.
    pub generation: Result<super::GenerationDefaults, String>,
    /// `quantization_config` as written by transformers, when the checkpoint is pre-quantized.
    pub quantization: Option<Value>,
    /// The raw `config.json` object, kept so written checkpoints carry every field the source had.
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// Parses `config.json` text; `file` names the file in errors.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::Json { file: file.to_string(), reason: e.to_string() })?;
        let Value::Object(map) = value else {
            return Err(ConfigError::Json { file: file.to_string(), reason: "top level is not an object".to_string() });
        };
        Raw { map: &map, file }.resolve()
    }

    /// Reads `config.json` from disk.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = crate::input::read_to_string(path)
            .map_err(|e| ConfigError::Io { file: file.clone(), reason: e.to_string() })?;
        Self::from_json_str(&text, &file)
    }

    /// Applies `generation_config.json` (its `eos_token_id`, single or list, wins over config.json's; its
    /// sampling defaults are kept); returns whether it set the end-of-sequence ids.
    pub fn apply_generation_config(&mut self, text: &str, file: &str) -> Result<bool, ConfigError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::Json { file: file.to_string(), reason: e.to_string() })?;
        if !value.is_object() {
            return Err(ConfigError::Json { file: file.to_string(), reason: "top level is not an object".to_string() });
        }
        self.generation = super::GenerationDefaults::from_json(&value, file).map_err(|e| e.to_string());
        match value.get("eos_token_id").filter(|v| !v.is_null()) {
            Some(v) => {
                self.eos_token_ids = token_id_list(v, file, "eos_token_id")?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The sampling defaults of `generation_config.json`, checked: values of the wrong type or out of range
    /// are an error naming the file.
    pub fn sampling_defaults(&self) -> Result<super::GenerationDefaults, String> {
        let d = self.generation.clone()?;
        crate::engine::SamplingParams::default()
            .with(d)
            .validate()
            .map_err(|e| format!("generation_config.json: sampling defaults: {e}"))?;
        Ok(d)
    }

    /// Refuses end-of-sequence ids outside the vocabulary (`file` set them): a config for another vocabulary.
    pub fn check_eos_in_vocab(&self, file: &str) -> Result<(), ConfigError> {
        match self.eos_token_ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            None => Ok(()),
            Some(id) => Err(ConfigError::Invalid {
                file: file.to_string(),
                field: "eos_token_id".into(),
                reason: format!("token id {id} is outside the vocabulary of {} (vocab_size)", self.vocab_size),
            }),
        }
    }

    /// Number of query heads that share one key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Output width of k_proj / v_proj.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Output width of q_proj.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// The model's shape as LoRA adapters see it.
    pub fn lora_layout(&self) -> crate::lora::peft::BaseLayout {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        crate::lora::peft::BaseLayout {
            layers: self.num_hidden_layers,
            dims: [
                (h, self.q_dim()),
                (h, self.kv_dim()),
                (h, self.kv_dim()),
                (self.q_dim(), h),
                (h, i),
                (h, i),
                (i, h),
            ],
        }
    }

    /// The rotary inverse frequencies (length head_dim/2), scaling applied. The base frequencies are computed
    /// in f32 as transformers does; llama3's smoothing runs in f64 and is rounded once (transformers rounds
    /// every f32 step: a few frequencies differ by 1–2 ulp, ~3e-5 rad at position 131072).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                1.0 / (self.rope_theta as f32).powf(exponent)
            })
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                        let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        let out = if medium {
                            let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        };
                        out as f32
                    })
                    .collect()
            }
        }
    }
}

/// Raw `config.json` object with typed accessors that name the field in errors.
struct Raw<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
}

impl Raw<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// Whether `field` is not written at all (transformers then uses its class default; an explicit `null` is
    /// `None`).
    fn absent(&self, field: &str) -> bool {
        !self.map.contains_key(field)
    }

    fn missing(&self, field: &str) -> ConfigError {
        ConfigError::Missing { file: self.file.to_string(), field: field.to_string() }
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { file: self.file.to_string(), field: field.to_string(), reason: reason.into() }
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.invalid(field, format!("expected a positive integer, got {v}"))),
            },
        }
    }

    fn usize_req(&self, field: &str) -> Result<usize, ConfigError> {
        self.usize_opt(field)?.ok_or_else(|| self.missing(field))
    }

    fn f64_in(&self, obj: &Map<String, Value>, field: &str, path: &str) -> Result<Option<f64>, ConfigError> {
        match obj.get(field).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.invalid(path, format!("expected a number, got {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.invalid(field, format!("expected true or false, got {v}"))),
        }
    }

    fn resolve(&self) -> Result<ModelConfig, ConfigError> {
        let model_type = match self.get("model_type") {
            None => return Err(self.missing("model_type")),
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(self.invalid("model_type", format!("expected a string, got {v}"))),
        };
        let family = match model_type {
            "llama" => ModelFamily::Llama,
            "mistral" => ModelFamily::Mistral,
            "qwen2" => ModelFamily::Qwen2,
            other => {
                return Err(ConfigError::UnsupportedModelType {
                    file: self.file.to_string(),
                    model_type: other.to_string(),
                })
            }
        };
        if let Some(v) = self.get("architectures") {
            let Some(names) = v.as_array().filter(|a| a.iter().all(Value::is_string)) else {
                return Err(self.invalid("architectures", format!("expected a list of class names, got {v}")));
            };
            // A classifier or reward model of the same family loads the same layers: generating text with it
            // is not what its checkpoint is for.
            if !names.is_empty() && !names.iter().filter_map(Value::as_str).any(|a| a.ends_with("ForCausalLM")) {
                return Err(self.invalid(
                    "architectures",
                    format!("{v} is not a causal language model (expected a *ForCausalLM checkpoint)"),
                ));
            }
        }
        if let Some(act) = self.get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(self.invalid("hidden_act", format!("only \"silu\" is supported, got {act}")));
            }
        }

        let vocab_size = self.usize_req("vocab_size")?;
        let hidden_size = self.usize_req("hidden_size")?;
        let intermediate_size = self.usize_req("intermediate_size")?;
        let num_hidden_layers = self.usize_req("num_hidden_layers")?;
        // The checkpoint's tensors are checked against it later, but per-layer lists are built first.
        if num_hidden_layers > MAX_LAYERS {
            return Err(self.invalid(
                "num_hidden_layers",
                format!("{num_hidden_layers} is past {MAX_LAYERS} (the largest Llama-family models have 126)"),
            ));
        }
        let num_attention_heads = self.usize_req("num_attention_heads")?;
        // Not written: transformers' class default (Mistral 8, Qwen2 32); null or not written for Llama: one
        // key/value head per query head.
        let num_key_value_heads = match (self.usize_opt("num_key_value_heads")?, family) {
            (Some(n), _) => n,
            (None, ModelFamily::Mistral) if self.absent("num_key_value_heads") => 8,
            (None, ModelFamily::Qwen2) if self.absent("num_key_value_heads") => 32,
            (None, _) => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.invalid(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match self.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(self.invalid(
                        "hidden_size",
                        format!("{hidden_size} is not a multiple of num_attention_heads {num_attention_heads} and no head_dim is given"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        // Bounded before the rotary tables (head_dim / 2 entries) are built from it.
        if head_dim > MAX_HEAD_DIM {
            return Err(
                self.invalid("head_dim", format!("{head_dim} is past {MAX_HEAD_DIM} (Llama-family heads have 64–256)"))
            );
        }
        if head_dim % 2 != 0 {
            return Err(self.invalid("head_dim", format!("{head_dim} is odd; rotary embeddings need an even head_dim")));
        }
        let default_ctx = match family {
            ModelFamily::Llama => 2048,
            ModelFamily::Mistral => 4096 * 32,
            ModelFamily::Qwen2 => 32768,
        };
        let max_position_embeddings = self.usize_opt("max_position_embeddings")?.unwrap_or(default_ctx);
        let rms_norm_eps = match self.get("rms_norm_eps") {
            None => 1e-6,
            Some(v) => v
                .as_f64()
                .filter(|x| *x > 0.0 && x.is_finite())
                .ok_or_else(|| self.invalid("rms_norm_eps", format!("expected a positive number, got {v}")))?,
        };

        let (rope_theta, rope_scaling) = self.rope(max_position_embeddings)?;

        let attention_bias = self.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias, mlp_bias) = match family {
            ModelFamily::Llama => (attention_bias, attention_bias, self.bool_or("mlp_bias", false)?),
            ModelFamily::Mistral => (false, false, false),
            // Qwen2's q/k/v projections always carry a bias; o_proj and the MLP never do.
            ModelFamily::Qwen2 => (true, false, false),
        };
        let tie_word_embeddings = self.bool_or("tie_word_embeddings", false)?;
        let sliding_window = self.sliding_windows(family, num_hidden_layers)?;

        // Llama's and Mistral's config classes default to BOS 1 and EOS 2 when the keys are not written.
        let llama_ids = matches!(family, ModelFamily::Llama | ModelFamily::Mistral);
        let bos_token_id = match self.get("bos_token_id") {
            None if llama_ids && self.absent("bos_token_id") => Some(1),
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| self.invalid("bos_token_id", format!("expected a token id, got {v}")))?,
            ),
        };
        let eos_token_ids = match self.get("eos_token_id") {
            None if llama_ids && self.absent("eos_token_id") => vec![2],
            None => Vec::new(),
            Some(v) => token_id_list(v, self.file, "eos_token_id")?,
        };
        let quantization = self.get("quantization_config").cloned();

        let config = ModelConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias,
            tie_word_embeddings,
            sliding_window,
            bos_token_id,
            eos_token_ids,
            generation: Ok(Default::default()),
            quantization,
            raw: self.map.clone(),
        };
        // The rotary frequencies as the forward computes them, in f32: a theta or factor that is positive in
        // f64 but 0 or ∞ in f32 (1e-300, 1e-320) makes them 0 or ∞, and every logit NaN at the first request.
        // The theta alone first, then with the scaling, to name the field at fault.
        let angles_ok = |c: &ModelConfig| {
            let freqs = c.rope_inv_freq();
            let widest = freqs.iter().fold(0f32, |m, &f| m.max(f)) * max_position_embeddings as f32;
            freqs.iter().all(|f| f.is_finite() && *f > 0.0) && widest.is_finite()
        };
        let unscaled = ModelConfig { rope_scaling: RopeScaling::Default, raw: Map::new(), ..config.clone() };
        let fault = if !angles_ok(&unscaled) {
            Some(("rope_theta".to_string(), format!("{rope_theta:e}")))
        } else if !angles_ok(&config) {
            let at = if self.get("rope_scaling").is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
                "rope_scaling"
            } else {
                "rope_parameters"
            };
            Some((format!("{at}.factor"), format!("{:?}", config.rope_scaling)))
        } else {
            None
        };
        if let Some((field, value)) = fault {
            return Err(
                self.invalid(&field, format!("{value} gives rotary angles that are not finite positive f32 numbers"))
            );
        }
        Ok(config)
    }

    /// `rope_parameters` (transformers 5.x) or `rope_theta` + `rope_scaling` (4.x). As transformers 5 reads
    /// them: a `rope_scaling` wins over `rope_parameters`, and a `rope_theta` missing from the parameters is
    /// taken from the top level, else the class default (10000 for all three families).
    fn rope(&self, max_position_embeddings: usize) -> Result<(f64, RopeScaling), ConfigError> {
        let empty = Map::new();
        // An empty `rope_scaling` is absent (transformers: `rope_scaling or rope_parameters`).
        let scaling = self.get("rope_scaling").filter(|v| v.as_object().is_none_or(|o| !o.is_empty()));
        let (params, prefix) = match (scaling, self.get("rope_parameters")) {
            (Some(Value::Object(p)), _) => (p, "rope_scaling"),
            (Some(v), _) => return Err(self.invalid("rope_scaling", format!("expected an object, got {v}"))),
            (None, Some(Value::Object(p))) => (p, "rope_parameters"),
            (None, Some(v)) => return Err(self.invalid("rope_parameters", format!("expected an object, got {v}"))),
            (None, None) => (&empty, "rope_scaling"),
        };
        let theta = match self.f64_in(params, "rope_theta", &format!("{prefix}.rope_theta"))? {
            Some(t) => t,
            None => self.f64_in(self.map, "rope_theta", "rope_theta")?.unwrap_or(10_000.0),
        };
        if theta <= 0.0 {
            return Err(self.invalid("rope_theta", format!("must be positive, got {theta}")));
        }
        // transformers 4.x wrote the kind as `type` (and reads it first), 5.x as `rope_type` (and reads that
        // first): a config with both must not depend on the version.
        let kind = match (params.get("rope_type"), params.get("type")) {
            (Some(a), Some(b)) if a != b => {
                return Err(self.invalid(
                    &format!("{prefix}.rope_type"),
                    format!("{a} disagrees with {prefix}.type {b} (transformers 4 reads `type`, 5 reads `rope_type`)"),
                ))
            }
            (Some(k), _) | (None, Some(k)) => Some(k),
            (None, None) => None,
        };
        let kind = match kind {
            None => "default",
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(self.invalid(&format!("{prefix}.rope_type"), format!("expected a string, got {v}"))),
        };
        let req = |field: &str| -> Result<f64, ConfigError> {
            let path = format!("{prefix}.{field}");
            self.f64_in(params, field, &path)?.ok_or_else(|| self.missing(&path))
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: req("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: req("factor")?,
                low_freq_factor: req("low_freq_factor")?,
                high_freq_factor: req("high_freq_factor")?,
                // As transformers 5 builds the model: a top-level key first (its rotary embedding standardizes
                // the parameters again once every config.json key is an attribute, and then that one wins),
                // else the parameters' value, else the model's context. (transformers 4 read only the
                // parameters' value, and required it.)
                original_max_position_embeddings: match self.f64_in(
                    self.map,
                    "original_max_position_embeddings",
                    "original_max_position_embeddings",
                )? {
                    Some(top) => top,
                    None => self
                        .f64_in(
                            params,
                            "original_max_position_embeddings",
                            &format!("{prefix}.original_max_position_embeddings"),
                        )?
                        .unwrap_or(max_position_embeddings as f64),
                },
            },
            other => {
                return Err(self.invalid(
                    &format!("{prefix}.rope_type"),
                    format!("unsupported rope type `{other}` (supported: default, linear, llama3)"),
                ))
            }
        };
        // Positions are divided by the factors and the old context: none of them may be 0 or negative (a
        // factor of 0 made every logit NaN). A factor below 1 squeezes positions: transformers warns, and so do we.
        let at = |field: &str| format!("{prefix}.{field}");
        let positive = |path: &str, v: f64| {
            if v > 0.0 {
                Ok(())
            } else {
                Err(self.invalid(path, format!("must be greater than 0, got {v}")))
            }
        };
        let factor = match scaling {
            RopeScaling::Default => None,
            RopeScaling::Linear { factor } => Some(factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive(&at("low_freq_factor"), low_freq_factor)?;
                // Named where it was read: the top-level key wins.
                let old_ctx_at = match self.get("original_max_position_embeddings") {
                    Some(_) => "original_max_position_embeddings".to_string(),
                    None => at("original_max_position_embeddings"),
                };
                positive(&old_ctx_at, original_max_position_embeddings)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(self.invalid(&at("high_freq_factor"), "must be greater than low_freq_factor"));
                }
                Some(factor)
            }
        };
        if let Some(factor) = factor {
            positive(&at("factor"), factor)?;
            if factor < 1.0 {
                tracing::warn!(field = %at("factor"), factor, "a RoPE scaling factor below 1 squeezes positions instead of stretching them (transformers warns too)");
            }
        }
        Ok((theta, scaling))
    }

    /// Per-layer sliding window: Mistral's `sliding_window`; Qwen2's when `use_sliding_window` is set
    /// (layers from `max_window_layers` on, or as `layer_types` lists them in 5.x configs). Not written, the
    /// window and `max_window_layers` take transformers' class defaults (4096 and 28); `null` is no window.
    fn sliding_windows(&self, family: ModelFamily, layers: usize) -> Result<Vec<Option<usize>>, ConfigError> {
        let window = match self.usize_opt("sliding_window")? {
            None if self.absent("sliding_window") => Some(4096),
            w => w,
        };
        let per_layer = match family {
            ModelFamily::Llama => vec![None; layers],
            // A Mistral config with `layer_types` is Ministral's (transformers' AutoConfig loads it as one):
            // the window on the layers listed as sliding only.
            ModelFamily::Mistral => match self.layer_types(layers)? {
                Some(sliding) => sliding.into_iter().map(|s| if s { window } else { None }).collect(),
                None => vec![window; layers],
            },
            ModelFamily::Qwen2 => {
                if !self.bool_or("use_sliding_window", false)? || window.is_none() {
                    vec![None; layers]
                } else if let Some(sliding) = self.layer_types(layers)? {
                    sliding.into_iter().map(|s| if s { window } else { None }).collect()
                } else {
                    let first = match self.get("max_window_layers") {
                        None => 28,
                        Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                            self.invalid("max_window_layers", format!("expected a layer count, got {v}"))
                        })?,
                    };
                    (0..layers).map(|l| if l >= first { window } else { None }).collect()
                }
            }
        };
        Ok(per_layer)
    }

    /// `layer_types` (transformers 5), when written: whether each layer's attention is `"sliding_attention"`
    /// (else `"full_attention"`; any other entry is refused).
    fn layer_types(&self, layers: usize) -> Result<Option<Vec<bool>>, ConfigError> {
        let types = match self.get("layer_types") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(types)) => types,
            Some(v) => return Err(self.invalid("layer_types", format!("expected a list, got {v}"))),
        };
        if types.len() != layers {
            return Err(self.invalid("layer_types", format!("has {} entries for {layers} layers", types.len())));
        }
        let kind = |(i, t): (usize, &Value)| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(self.invalid(
                &format!("layer_types[{i}]"),
                format!("expected \"sliding_attention\" or \"full_attention\", got {t}"),
            )),
        };
        types.iter().enumerate().map(kind).collect::<Result<_, _>>().map(Some)
    }
}

fn token_id_list(v: &Value, file: &str, field: &str) -> Result<Vec<u32>, ConfigError> {
    let bad = || ConfigError::Invalid {
        file: file.to_string(),
        field: field.to_string(),
        reason: format!("expected a token id or a list of token ids, got {v}"),
    };
    let one = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad);
    match v {
        Value::Array(items) => items.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

#[cfg(test)]
mod tests;
