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
        tracing::info!(
            model = %self.model,
            family = m.config().family.as_str(),
            params = m.num_parameters(),
            quant = ?opts.quant,
            dtype = ?opts.dtype,
            resident_bytes = m.resident_bytes(),
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
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print `{"prompt_token_ids": [...], "token_ids": [...], "text": "..."}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => run_generate(args),
    }
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
    let out = engine::generate(
        &loaded.model,
        &GenerateJob {
            prompt_ids: &prompt_ids,
            max_new_tokens: args.max_new_tokens,
            sampling,
            stop_at_eos: true,
            adapter: None,
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
