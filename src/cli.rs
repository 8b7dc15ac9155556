//! The `server` command line: a clap `Command` enum with flattened option groups. Every flag can also be
//! set through a `LORASERVE_*` environment variable (e.g. `LORASERVE_MODEL=demo`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::{self, GenerateJob, SamplingParams};
use crate::model::{self, LoadOptions, ModelSpec};
use crate::quant::QuantMode;

#[derive(Parser, Debug)]
#[command(name = "server", version, about = "loraserve: one NF4 base model, many LoRA adapters")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text for one prompt and print it.
    Generate(GenerateArgs),
    /// Write an NF4 checkpoint in the bitsandbytes layout (loadable by transformers + bitsandbytes).
    Quantize(QuantizeArgs),
    /// Write the merged checkpoint W + scale·B·A of a base model and one adapter (PEFT's merge_and_unload).
    Merge(MergeArgs),
}

/// Compute dtype of activations and dense weights.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

/// Which model to run and how to hold it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder, or `demo` for the embedded demo model.
    #[arg(long, env = "LORASERVE_MODEL", default_value = "demo")]
    pub model: ModelSpec,
    /// Base weights: `nf4` (QLoRA's 4-bit NormalFloat, double-quantized) or `none` (dense).
    #[arg(long, env = "LORASERVE_QUANT", default_value = "nf4")]
    pub quant: QuantMode,
    /// Compute dtype.
    #[arg(long, env = "LORASERVE_DTYPE", value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "LORASERVE_DEVICE", default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions { dtype: self.dtype.into(), quant: self.quant, device: parse_device(&self.device)? })
    }

    /// Loads the model, logging what was loaded and its resident size.
    pub fn load(&self) -> Result<model::LoadedModel> {
        let opts = self.load_options()?;
        let started = std::time::Instant::now();
        let loaded = model::load(&self.model, &opts).with_context(|| format!("loading model `{}`", self.model))?;
        let m = &loaded.model;
        let (nf4_params, nf4_bytes) = m.nf4_footprint();
        tracing::info!(
            model = %self.model,
            family = m.config().family.as_str(),
            params = m.num_parameters(),
            quant = ?opts.quant,
            dtype = ?opts.dtype,
            resident_bytes = m.resident_bytes(),
            nf4_bits_per_param = if nf4_params > 0 { format!("{:.3}", nf4_bytes as f64 * 8.0 / nf4_params as f64) } else { "-".into() },
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(loaded)
    }
}

/// `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .with_context(|| format!("--device `{s}`: expected cpu, cuda or cuda:N"))?,
                None => bail!("--device `{s}`: expected cpu, cuda or cuda:N"),
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this binary was built without CUDA support (rebuild with `--features cuda`)");
            }
            Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
        }
    }
}

/// Sampling flags shared by `generate` (the server takes them per request).
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed };
        p.validate().map_err(anyhow::Error::msg)?;
        Ok(p)
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (encoded with the tokenizer's special tokens, e.g. BOS).
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// A LoRA adapter: a folder in PEFT layout, or an adapter id under `--adapters`.
    #[arg(long)]
    pub adapter: Option<String>,
    /// The adapters root that adapter ids are resolved in.
    #[arg(long, env = "LORASERVE_ADAPTERS", default_value = "adapters")]
    pub adapters: std::path::PathBuf,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print `{"prompt_token_ids": [...], "token_ids": [...], "text": "..."}`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A Hugging Face model folder, or `demo`.
    #[arg(long, env = "LORASERVE_MODEL")]
    pub model: ModelSpec,
    /// The folder to write (must not exist).
    #[arg(long)]
    pub output: std::path::PathBuf,
    /// dtype of the tensors kept dense (embeddings, norms, head) and the recorded compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// A Hugging Face model folder, or `demo`.
    #[arg(long, env = "LORASERVE_MODEL")]
    pub model: ModelSpec,
    /// The adapter folder (PEFT layout).
    #[arg(long)]
    pub adapter: std::path::PathBuf,
    /// The folder to write (must not exist).
    #[arg(long)]
    pub output: std::path::PathBuf,
    /// Allow an NF4 base: its weights are dequantized, then merged and written dense.
    #[arg(long)]
    pub dequantize: bool,
    /// dtype of the written checkpoint.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Quantize(args) => run_quantize(args),
        Command::Merge(args) => run_merge(args),
    }
}

fn run_merge(args: MergeArgs) -> Result<()> {
    if let ModelSpec::Dir(dir) = &args.model {
        let config = model::read_config(dir)?;
        if config.quantization.is_some() && !args.dequantize {
            bail!(
                "{}: the base is NF4-quantized; merging into it would need dequantized weights (pass --dequantize to write a dense merged checkpoint)",
                dir.display()
            );
        }
    }
    let margs =
        ModelArgs { model: args.model.clone(), quant: QuantMode::None, dtype: args.dtype, device: "cpu".into() };
    let loaded = margs.load()?;
    let adapter = crate::lora::peft::load_dir(&args.adapter, &loaded.model.lora_layout(), &Device::Cpu)?;
    let dtype: DType = args.dtype.into();
    let merged = |lin: &model::Linear| -> std::result::Result<Option<candle_core::Tensor>, model::ModelError> {
        let Some(m) = adapter.weights.module(lin.id) else { return Ok(None) };
        let w = lin.base.to_dense_f32(&Device::Cpu)?;
        // W + scale · B·A, with B stored transposed as [r, out].
        let delta = m.b_t.t()?.matmul(&m.a)?.affine(m.scale as f64, 0.0)?;
        Ok(Some((w + delta)?.to_dtype(dtype)?))
    };
    model::checkpoint::write(&loaded.model, &side_files(&args.model)?, &args.output, &merged)
        .with_context(|| format!("writing {}", args.output.display()))?;
    tracing::info!(output = %args.output.display(), modules = adapter.weights.targets().count(), "merged checkpoint written");
    Ok(())
}

/// The tokenizer/generation files that travel with a written checkpoint.
pub fn side_files(spec: &ModelSpec) -> Result<model::checkpoint::SideFiles> {
    Ok(match spec {
        ModelSpec::Demo => vec![
            ("tokenizer.json".into(), model::demo::TOKENIZER_JSON.as_bytes().to_vec()),
            ("tokenizer_config.json".into(), model::demo::TOKENIZER_CONFIG_JSON.as_bytes().to_vec()),
        ],
        ModelSpec::Dir(dir) => model::checkpoint::side_files_of_dir(dir)?,
    })
}

fn run_quantize(args: QuantizeArgs) -> Result<()> {
    let margs = ModelArgs { model: args.model.clone(), quant: QuantMode::Nf4, dtype: args.dtype, device: "cpu".into() };
    let loaded = margs.load()?;
    model::checkpoint::write(&loaded.model, &side_files(&args.model)?, &args.output, &|_| Ok(None))
        .with_context(|| format!("writing {}", args.output.display()))?;
    tracing::info!(output = %args.output.display(), resident_bytes = loaded.model.resident_bytes(), "NF4 checkpoint written");
    Ok(())
}

/// `--adapter`: a folder holding `adapter_config.json`, else an adapter id under the adapters root.
fn resolve_adapter(arg: &str, root: &std::path::Path) -> Result<std::path::PathBuf> {
    let as_dir = std::path::Path::new(arg);
    if as_dir.join("adapter_config.json").is_file() {
        return Ok(as_dir.to_path_buf());
    }
    let store = crate::lora::store::AdapterStore::open(root)?;
    Ok(store.resolve(arg)?)
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    if args.prompt.is_empty() {
        bail!("--prompt is empty");
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let sampling = args.sampling.params()?;
    let loaded = args.model.load()?;
    let prompt_ids = loaded.tokenizer.encode(&args.prompt)?;
    let ctx = loaded.model.config().max_position_embeddings;
    if prompt_ids.len() + args.max_new_tokens > ctx {
        bail!(
            "prompt ({} tokens) + --max-new-tokens ({}) exceeds the model's context of {ctx} positions",
            prompt_ids.len(),
            args.max_new_tokens
        );
    }
    let adapter = match &args.adapter {
        None => None,
        Some(a) => {
            let dir = resolve_adapter(a, &args.adapters)?;
            Some(crate::lora::peft::load_dir(&dir, &loaded.model.lora_layout(), loaded.model.device())?)
        }
    };
    let out = engine::generate(
        &loaded.model,
        &GenerateJob {
            prompt_ids: &prompt_ids,
            max_new_tokens: args.max_new_tokens,
            sampling,
            stop_at_eos: true,
            adapter: adapter.as_ref().map(|a| &a.weights),
        },
    )?;
    let text = loaded.tokenizer.decode(&out.token_ids)?;
    if args.json {
        let v = serde_json::json!({
            "prompt_token_ids": prompt_ids,
            "token_ids": out.token_ids,
            "text": text,
        });
        println!("{v}");
    } else {
        println!("{text}");
    }
    Ok(())
}
