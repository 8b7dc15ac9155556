//! The `server` command line: a clap `Command` enum with flattened option groups. Every flag of `serve`, the
//! model options of `serve`, `generate` and `train` and the client's connection flags can also be set through
//! a `LORASERVE_*` environment variable (e.g. `LORASERVE_MODEL=demo`); per-call flags (`--prompt`, `--rank`)
//! and the one-off conversions (`quantize`, `merge`) cannot.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::{self, LoadOptions, ModelSpec};
use crate::quant::QuantMode;

mod generate;

use generate::{run_client, run_generate};
pub use generate::{ClientArgs, ClientCall, GenerateArgs, SamplingArgs};

#[derive(Parser, Debug)]
#[command(name = "server", version, about = "loraserve: one NF4 base model, many LoRA adapters")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve gRPC: one base model, adapters from the adapters folder, Prometheus metrics.
    Serve(Box<ServeArgs>),
    /// Talk to a running server (generate, tokenize, detokenize, info, list, load, unload).
    Client(ClientArgs),
    /// Generate text for one prompt and print it.
    Generate(GenerateArgs),
    /// Fine-tune a LoRA adapter (QLoRA: frozen NF4 base) and write it in PEFT format.
    Train(Box<TrainArgs>),
    /// Write an NF4 checkpoint in the bitsandbytes layout (loadable by transformers + bitsandbytes).
    Quantize(QuantizeArgs),
    /// Write the merged checkpoint W + scale·B·A of a base model and one adapter (PEFT's merge_and_unload).
    Merge(MergeArgs),
    /// Render chat templates for the `serve` process that started this one (its child; not run by hand).
    #[command(hide = true)]
    RenderWorker,
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
    /// A Hugging Face model folder (safetensors, or a bitsandbytes NF4 checkpoint), `demo` for the embedded
    /// demo model, or `synthetic:<shape>` (random weights of a real shape, for benchmarks).
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
    /// A Jinja chat template file to render conversations with instead of the model's (like vLLM's
    /// --chat-template, but an adapter whose folder brings a template of its own keeps it); `train` writes
    /// the template it renders conversations with into the adapter it makes.
    #[arg(long, env = "LORASERVE_CHAT_TEMPLATE", value_name = "FILE")]
    pub chat_template: Option<std::path::PathBuf>,
}

/// `--generation-config`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationConfigArg {
    Auto,
    #[value(alias = "vllm")]
    None,
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions { dtype: self.dtype.into(), quant: self.quant, device: parse_device(&self.device)? })
    }

    /// The text of `--chat-template`, read before the model is (a wrong path fails fast).
    pub fn chat_template(&self) -> Result<Option<String>> {
        let Some(path) = &self.chat_template else { return Ok(None) };
        let text = std::fs::read_to_string(path).with_context(|| format!("--chat-template {}", path.display()))?;
        if text.trim().is_empty() {
            bail!("--chat-template {}: the file is empty", path.display());
        }
        Ok(Some(text))
    }

    /// Loads the model (with `--chat-template` in place of its own), logging what was loaded and its
    /// resident size.
    pub fn load(&self) -> Result<model::LoadedModel> {
        let opts = self.load_options()?;
        let chat_template = self.chat_template()?;
        let started = std::time::Instant::now();
        let mut loaded = model::load(&self.model, &opts).with_context(|| format!("loading model `{}`", self.model))?;
        if let Some(t) = chat_template {
            loaded.tokenizer.chat.set_template(t);
        }
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
            #[cfg(feature = "cuda")]
            return crate::gpu::open(ordinal).with_context(|| format!("opening CUDA device {ordinal}"));
            #[cfg(not(feature = "cuda"))]
            {
                let _ = ordinal; // the syntax is checked all the same
                bail!("--device {s}: this binary was built without CUDA support (rebuild with `--features cuda`)")
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A Hugging Face model folder, or `demo` (not read from `LORASERVE_MODEL`: a leftover variable must not
    /// pick the input of a one-off conversion).
    #[arg(long)]
    pub model: ModelSpec,
    /// The folder to write (must not exist).
    #[arg(long)]
    pub output: std::path::PathBuf,
    /// dtype of the tensors kept dense (embeddings, norms, head) and the recorded compute dtype [default: the
    /// model's own, from its config.json; f32 for `demo`].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// A Hugging Face model folder, or `demo` (not read from `LORASERVE_MODEL`, as for `quantize`).
    #[arg(long)]
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
    /// dtype of the written checkpoint [default: the base's own, from its config.json, as PEFT's
    /// `merge_and_unload` keeps it; f32 for `demo`].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapters root: adapter id `a/b` is the folder `<adapters>/a/b/`.
    #[arg(long, env = "LORASERVE_ADAPTERS", default_value = "adapters")]
    pub adapters: std::path::PathBuf,
    /// `auto`: a request that leaves temperature, top_p, top_k, min_p or repetition_penalty unset gets the
    /// model's generation_config.json value (vLLM's default); `none` (or vLLM's `vllm`): the neutral values
    /// (greedy).
    #[arg(long, env = "LORASERVE_GENERATION_CONFIG", value_enum, default_value = "auto")]
    pub generation_config: GenerationConfigArg,
    #[arg(long, env = "LORASERVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Prometheus `/metrics`.
    #[arg(long, env = "LORASERVE_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,
    /// Most sequences in one engine step.
    #[arg(long, env = "LORASERVE_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Most tokens in one engine step (long prompts are prefilled in chunks of this).
    #[arg(long, env = "LORASERVE_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Bytes of the KV cache (fixed at start; a full cache makes new requests wait).
    #[arg(long, env = "LORASERVE_KV_CACHE_BYTES", default_value_t = 1 << 30)]
    pub kv_cache_bytes: usize,
    /// Compute every prompt whole: no prefix cache (by default, the KV blocks of prompts are kept and shared
    /// with later requests of the same adapter version that start with the same tokens, as vLLM does).
    #[arg(long, env = "LORASERVE_NO_PREFIX_CACHING", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_prefix_caching: bool,
    /// Byte budget of the device adapter tier (where the base lives).
    #[arg(long, env = "LORASERVE_ADAPTER_CACHE_BYTES", default_value_t = 1 << 30)]
    pub adapter_cache_bytes: usize,
    /// Byte budget of the host (RAM) adapter tier.
    #[arg(long, env = "LORASERVE_HOST_ADAPTER_CACHE_BYTES", default_value_t = 4 << 30)]
    pub host_adapter_cache_bytes: usize,
    /// Adapter ids to load at start (comma-separated).
    #[arg(long, env = "LORASERVE_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,
    /// A file of API keys, one per line; requests must send `authorization: Bearer <key>`.
    #[arg(long, env = "LORASERVE_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, env = "LORASERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, env = "LORASERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Largest accepted request message.
    #[arg(long, env = "LORASERVE_MAX_REQUEST_BYTES", default_value_t = 1 << 20)]
    pub max_request_bytes: usize,
    /// Requests waiting to run (preempted ones included) beyond which new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "LORASERVE_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "LORASERVE_MAX_NEW_TOKENS_CAP", default_value_t = 4096)]
    pub max_new_tokens_cap: u32,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "LORASERVE_DRAIN_TIMEOUT", default_value_t = 30.0)]
    pub drain_timeout: f64,
}

impl ServeArgs {
    pub fn config(&self) -> Result<crate::server::ServeConfig> {
        // PEM files checked here, so a wrong file is named (rustls reports only that the identity is bad).
        let pem = |p: &std::path::Path, flag: &str, label: &str| -> Result<Vec<u8>> {
            let bytes = std::fs::read(p).with_context(|| format!("{flag} {}", p.display()))?;
            if !String::from_utf8_lossy(&bytes).contains(label) {
                bail!("{flag} {}: no PEM block with `{label}` in it", p.display());
            }
            Ok(bytes)
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => {
                Some((pem(c, "--tls-cert", "-----BEGIN CERTIFICATE-----")?, pem(k, "--tls-key", "PRIVATE KEY-----")?))
            }
            _ => None,
        };
        let api_keys = match &self.api_key_file {
            Some(p) => {
                Some(crate::server::auth::ApiKeys::from_file(p).map_err(|e| anyhow::anyhow!("--api-key-file {e}"))?)
            }
            None => None,
        };
        for (flag, v) in [
            ("--max-batch-size", self.max_batch_size),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--max-queue", self.max_queue),
            ("--max-new-tokens-cap", self.max_new_tokens_cap as usize),
            ("--kv-cache-bytes", self.kv_cache_bytes),
            ("--max-request-bytes", self.max_request_bytes),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1 (0 would refuse every request)");
            }
        }
        let Ok(drain_timeout) = std::time::Duration::try_from_secs_f64(self.drain_timeout) else {
            bail!(
                "--drain-timeout {:?}: expected a number of seconds ≥ 0 (and not absurdly large)",
                self.drain_timeout
            );
        };
        Ok(crate::server::ServeConfig {
            model: self.model.model.clone(),
            load: self.model.load_options()?,
            chat_template: self.model.chat_template()?,
            generation_config: self.generation_config == GenerationConfigArg::Auto,
            adapters: self.adapters.clone(),
            cache: crate::lora::cache::CacheConfig {
                device_bytes: self.adapter_cache_bytes,
                host_bytes: self.host_adapter_cache_bytes,
                ..Default::default()
            },
            engine: crate::engine::EngineConfig {
                max_batch_rows: self.max_batch_size,
                max_batch_tokens: self.max_batch_tokens,
                block_size: 16,
                kv_cache_bytes: self.kv_cache_bytes,
                queue_capacity: self.max_queue,
                prefix_caching: !self.no_prefix_caching,
            },
            limits: crate::server::service::Limits {
                max_new_tokens_cap: self.max_new_tokens_cap,
                ..Default::default()
            },
            preload: self.preload.iter().filter(|p| !p.is_empty()).cloned().collect(),
            api_keys,
            tls,
            max_request_bytes: self.max_request_bytes,
            drain_timeout,
            template_worker: Some(own_executable()?),
        })
    }
}

/// This binary, for the chat-template workers: on Linux `/proc/self/exe`, which runs this very file even after
/// a deploy replaced it on disk.
fn own_executable() -> Result<std::path::PathBuf> {
    if cfg!(target_os = "linux") {
        return Ok(std::path::PathBuf::from("/proc/self/exe"));
    }
    std::env::current_exe().context("finding this executable (its chat-template workers run it)")
}

fn run_serve(args: ServeArgs) -> Result<()> {
    let config = args.config()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let served = rt.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding --listen {}", args.listen))?;
        let metrics = tokio::net::TcpListener::bind(&args.metrics_listen).await.with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
        let server = crate::server::start(config, grpc, metrics).await?;
        tracing::info!(grpc = %server.grpc_addr, metrics = %server.metrics_addr, "listening; loading the model");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
        };
        tokio::pin!(stop);
        // Shut down on a signal, or return when the server stops on its own (e.g. the model failed to load).
        let shutdown_requested = tokio::select! {
            _ = &mut stop => true,
            _ = async { while !server.is_finished() { tokio::time::sleep(std::time::Duration::from_millis(200)).await } } => false,
        };
        if !shutdown_requested {
            server.wait().await?;
            tracing::info!("stopped");
            return Ok(());
        }
        server.shutdown();
        // A second Ctrl-C while draining stops at once, as uvicorn does. A repeated SIGTERM (an orchestrator
        // deleting the pod again) keeps draining: its hard stop is SIGKILL.
        tokio::select! {
            r = server.wait() => r?,
            _ = tokio::signal::ctrl_c() => force_exit(),
        }
        tracing::info!("stopped");
        Ok(())
    });
    // Dropping the runtime would wait for every blocking task, and an adapter read stuck on a hung mount (or
    // a FIFO) never ends: the requests are done, so give such reads a moment and exit without them.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// Exits now, failing whatever is still running (exit status 130: interrupted).
fn force_exit() -> ! {
    tracing::warn!("second SIGINT while draining: stopping without finishing the requests still running");
    std::process::exit(130)
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data, JSONL: {"text"}, {"prompt", "completion"} or {"messages"} per line.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// The adapter folder to write (PEFT layout; must not exist).
    #[arg(long)]
    pub output: std::path::PathBuf,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Scale by α/√r instead of α/r.
    #[arg(long)]
    pub use_rslora: bool,
    /// Projections to adapt (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or `all-linear`.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj", value_delimiter = ',')]
    pub target_modules: Vec<String>,
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f32,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.001)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Decay after warmup: linear or cosine. Linear is the guide's (its TrainingArguments keep transformers'
    /// default `lr_scheduler_type`).
    #[arg(long, default_value = "linear")]
    pub lr_scheduler: String,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 4)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Truncate longer examples (counted and reported).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Activation checkpointing, as transformers' `gradient_checkpointing`: the backward runs each decoder
    /// layer's forward again instead of keeping every layer's activations, for much less memory and one more
    /// forward pass per step. The gradients are the same.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Held-out fraction for an eval loss each epoch (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub eval_ratio: f64,
    /// A separate eval file (instead of --eval-ratio).
    #[arg(long)]
    pub eval_data: Option<std::path::PathBuf>,
    /// Save a resumable checkpoint (LoRA weights and optimizer state, for `--resume`) every N optimizer steps;
    /// the checkpoints are removed once the finished adapter is written.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Where checkpoints go (default: `<output>.checkpoints`).
    #[arg(long)]
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Continue from the newest checkpoint, with the same base model (as loaded: --quant, --dtype), data and
    /// settings as the run that saved it (anything else is refused). A run whose loss or weights go NaN or
    /// infinite stops with an error naming the step and writes no adapter.
    #[arg(long)]
    pub resume: bool,
    /// JSONL log of every step (default: `<output>.log.jsonl`).
    #[arg(long)]
    pub log_file: Option<std::path::PathBuf>,
}

/// `--target-modules` → the projections (`all-linear` = all seven).
pub fn parse_targets(names: &[String]) -> Result<Vec<crate::lora::ModuleKind>> {
    use crate::lora::ModuleKind;
    // `q_proj, v_proj` (quoted, with spaces) means what it says.
    let names: Vec<&str> = names.iter().map(|n| n.trim()).collect();
    if names == ["all-linear"] {
        return Ok(ModuleKind::ALL.to_vec());
    }
    if names.len() > 1 && names.contains(&"all-linear") {
        bail!("--target-modules: all-linear already names every projection; give it alone, or list projections");
    }
    let mut out = Vec::new();
    for n in names {
        if n.is_empty() {
            bail!("--target-modules: an empty name in the list (`q_proj,,v_proj`?)");
        }
        let k = ModuleKind::from_name(n).with_context(|| {
            format!("--target-modules: unknown module `{n}` (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear)")
        })?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Standard output was closed by its reader (`server client list | head -1`): the output is done, not failed.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed by its reader")]
pub struct StdoutClosed;

/// Writes to standard output and flushes; a reader that went away is [`StdoutClosed`] (`main` exits 0 on it,
/// as Unix tools do), any other failure an I/O error.
pub fn to_stdout(text: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => Ok(r.context("writing to standard output")?),
    }
}

/// `out` → `out<suffix>` beside it.
fn sibling(p: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(suffix);
    std::path::PathBuf::from(s)
}

fn run_train(args: TrainArgs) -> Result<()> {
    let decay = match args.lr_scheduler.as_str() {
        "cosine" => crate::train::optim::Decay::Cosine,
        "linear" => crate::train::optim::Decay::Linear,
        other => bail!("--lr-scheduler `{other}`: expected cosine or linear"),
    };
    // `out/` is the folder `out`: its log and checkpoints go beside it, not inside.
    let output: std::path::PathBuf = args.output.components().collect();
    let cfg = crate::train::TrainConfig {
        data: args.data.clone(),
        eval_data: args.eval_data.clone(),
        eval_ratio: args.eval_ratio,
        output: output.clone(),
        lora: crate::lora::trainable::LoraSpec {
            rank: args.rank,
            alpha: args.alpha,
            use_rslora: args.use_rslora,
            dropout: args.dropout,
            targets: parse_targets(&args.target_modules)?,
        },
        optim: crate::train::optim::AdamWConfig { lr: args.lr, weight_decay: args.weight_decay, ..Default::default() },
        decay,
        warmup_ratio: args.warmup_ratio,
        epochs: args.epochs,
        max_steps: args.max_steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_grad_norm: args.max_grad_norm,
        max_seq_len: args.max_seq_len,
        gradient_checkpointing: args.gradient_checkpointing,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        checkpoint_dir: args.checkpoint_dir.clone().unwrap_or_else(|| sibling(&output, ".checkpoints")),
        resume: args.resume,
        log_file: args.log_file.clone().unwrap_or_else(|| sibling(&output, ".log.jsonl")),
        base_model: args.model.model.to_string(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    // Fail on settings before spending time loading the model.
    crate::train::check(&cfg)?;
    let loaded = args.model.load()?;
    let report = crate::train::train(&loaded.model, &loaded.tokenizer, &cfg)?;
    let evals = report.eval_losses.iter().map(|e| format!("{e:.4}")).collect::<Vec<_>>().join(", ");
    println!(
        "trained {} steps in {:.1}s ({:.0} tokens/s): loss {:.4} → {:.4}{}; adapter written to {}",
        report.steps_done - report.start_step,
        report.seconds,
        report.tokens as f64 / report.seconds.max(1e-9),
        report.first_loss,
        report.last_loss,
        if evals.is_empty() { String::new() } else { format!("; eval loss per epoch: {evals}") },
        cfg.output.display()
    );
    Ok(())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => run_train(*args),
        Command::Serve(args) => run_serve(*args),
        Command::Client(args) => run_client(args),
        Command::Generate(args) => run_generate(args),
        Command::Quantize(args) => run_quantize(args),
        Command::Merge(args) => run_merge(args),
        Command::RenderWorker => crate::server::render::worker_main(),
    }
}

fn run_merge(args: MergeArgs) -> Result<()> {
    crate::output::check_new(&args.output)?;
    if let ModelSpec::Dir(dir) = &args.model {
        let config = model::read_config(dir)?;
        if config.quantization.is_some() && !args.dequantize {
            bail!(
                "{}: the base is NF4-quantized (its config.json has a `quantization_config`); merging into it would need dequantized weights (pass --dequantize to write a dense merged checkpoint)",
                dir.display()
            );
        }
    }
    let dtype = output_dtype(args.dtype, &args.model)?;
    // Before the model is built: a synthetic one is refused here, not after minutes and gigabytes.
    let mut side = side_files(&args.model)?;
    let margs = ModelArgs {
        model: args.model.clone(),
        quant: QuantMode::None,
        dtype,
        device: "cpu".into(),
        chat_template: None,
    };
    let loaded = margs.load()?;
    let adapter = crate::lora::peft::load_dir(&args.adapter, &loaded.model.lora_layout(), &Device::Cpu)?;
    let dtype: DType = dtype.into();
    let merged = |lin: &model::Linear| -> std::result::Result<Option<candle_core::Tensor>, model::ModelError> {
        let Some(m) = adapter.weights.module(lin.id) else { return Ok(None) };
        let w = lin.base.to_dense_f32(&Device::Cpu)?;
        // W + scale · B·A, with B stored transposed as [r, out].
        let delta = m.b_t.t()?.matmul(&m.a)?.affine(m.scale as f64, 0.0)?;
        Ok(Some((w + delta)?.to_dtype(dtype)?))
    };
    // The merged model renders conversations as the adapter was served: with the template its folder brings.
    let adapter_chat = model::chat::ChatFiles::from_dir(&args.adapter)?;
    if let Some(template) = &adapter_chat.template {
        side.retain(|(name, _)| name != "chat_template.jinja" && !name.starts_with("additional_chat_templates/"));
        side.push(("chat_template.jinja".into(), template.as_bytes().to_vec()));
        if let Some(tool_use) = &adapter_chat.tool_use {
            side.push(("additional_chat_templates/tool_use.jinja".into(), tool_use.as_bytes().to_vec()));
        }
    } else if adapter_chat.has_template() {
        bail!(
            "{}: the adapter's chat templates are named {:?}, none \"default\": its conversations are refused, and the merged model would silently get the base's (save the one to use as chat_template.jinja)",
            args.adapter.display(),
            adapter_chat.names
        );
    }
    model::checkpoint::write(&loaded.model, &side, &args.output, &merged)
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
        ModelSpec::Synthetic(_) => bail!("synthetic models are for benchmarks and cannot be written out"),
    })
}

/// The dtype a written checkpoint gets: `--dtype`, else the source's own (`dtype`, or 4.x `torch_dtype`, in
/// its config.json), else f32.
fn output_dtype(arg: Option<DTypeArg>, model: &ModelSpec) -> Result<DTypeArg> {
    if let Some(d) = arg {
        return Ok(d);
    }
    let ModelSpec::Dir(dir) = model else { return Ok(DTypeArg::F32) };
    let config = model::read_config(dir)?;
    // transformers 5 writes `dtype`, 4.x `torch_dtype`; neither (or null) is float32, as it loads then.
    let Some((key, v)) =
        ["dtype", "torch_dtype"].iter().find_map(|k| config.raw.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
    else {
        return Ok(DTypeArg::F32);
    };
    match v.as_str() {
        Some("float32") => Ok(DTypeArg::F32),
        Some("bfloat16") => Ok(DTypeArg::Bf16),
        Some("float16") => Ok(DTypeArg::F16),
        _ => bail!(
            "{}: `{key}` is {v}, not one of \"float32\", \"bfloat16\", \"float16\" (or give --dtype)",
            dir.join("config.json").display()
        ),
    }
}

fn run_quantize(args: QuantizeArgs) -> Result<()> {
    crate::output::check_new(&args.output)?;
    let dtype = output_dtype(args.dtype, &args.model)?;
    // Before the model is built: a synthetic one is refused here, not after minutes and gigabytes.
    let side = side_files(&args.model)?;
    let margs = ModelArgs {
        model: args.model.clone(),
        quant: QuantMode::Nf4,
        dtype,
        device: "cpu".into(),
        chat_template: None,
    };
    let loaded = margs.load()?;
    model::checkpoint::write(&loaded.model, &side, &args.output, &|_| Ok(None))
        .with_context(|| format!("writing {}", args.output.display()))?;
    tracing::info!(output = %args.output.display(), resident_bytes = loaded.model.resident_bytes(), "NF4 checkpoint written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn serve_config(args: &[&str]) -> crate::server::ServeConfig {
        let cli = Cli::try_parse_from(["server", "serve"].iter().chain(args)).unwrap();
        let Command::Serve(serve) = cli.command else { panic!("not serve") };
        serve.config().unwrap()
    }

    #[test]
    fn the_prefix_cache_is_on_unless_turned_off() {
        assert!(serve_config(&[]).engine.prefix_caching);
        assert!(!serve_config(&["--no-prefix-caching"]).engine.prefix_caching);
    }

    /// `client --deadline` and `client health --timeout` take a positive number of seconds, nothing else.
    #[test]
    fn client_seconds_are_positive() {
        let parse = |args: &[&str]| Cli::try_parse_from(["server", "client"].iter().chain(args));
        let Command::Client(c) = parse(&["--deadline", "0.25", "list"]).unwrap().command else { panic!() };
        assert_eq!(c.deadline, Some(std::time::Duration::from_millis(250)));
        for bad in ["0", "-1", "NaN", "inf", "1e30", "soon"] {
            let e = parse(&[&format!("--deadline={bad}"), "list"]).unwrap_err().to_string();
            assert!(e.contains("'--deadline <SECONDS>'"), "{bad}: {e}");
            let e = parse(&["health", &format!("--timeout={bad}")]).unwrap_err().to_string();
            assert!(e.contains("'--timeout <SECONDS>'"), "{bad}: {e}");
        }
    }

    #[test]
    fn target_modules_are_trimmed_and_all_linear_stands_alone() {
        use crate::lora::ModuleKind;
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let qv = parse_targets(&names(&["q_proj", " v_proj"])).unwrap();
        assert_eq!(qv, [ModuleKind::from_name("q_proj").unwrap(), ModuleKind::from_name("v_proj").unwrap()]);
        assert_eq!(parse_targets(&names(&[" all-linear"])).unwrap(), ModuleKind::ALL.to_vec());
        let e = parse_targets(&names(&["all-linear", "q_proj"])).unwrap_err().to_string();
        assert!(e.contains("give it alone"), "{e}");
        let e = parse_targets(&names(&["qproj"])).unwrap_err().to_string();
        assert!(e.contains("unknown module `qproj`"), "{e}");
    }
}
