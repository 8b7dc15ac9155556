//! `server train`: QLoRA fine-tuning that writes PEFT adapters.
//!
//! - [`data`]: JSONL (`text`, `prompt`/`completion`, `messages` with the chat template) → token ids with
//!   target masks.
//! - [`trainer`]: the loop over the one model forward (base frozen, LoRA `Var`s trainable).
//! - [`optim`]: AdamW, gradient clipping, warmup + linear/cosine schedules.
//! - [`checkpoint`]: resumable checkpoints.
//!
//! [`train`] runs a whole job: load data (errors before anything is written), initialise the adapter as PEFT
//! does, resume if asked, train, and write the adapter folder atomically — a server watching the adapters
//! root never sees half an adapter.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod trainer;

use std::path::PathBuf;

use crate::lora::peft::{self, AdapterMeta};
use crate::lora::trainable::{LoraSpec, TrainableLora};
use crate::model::{Model, Tokenizer};
use optim::{lr_at, AdamW, AdamWConfig, Decay};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error("{0}")]
    Config(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The loss, a gradient or a weight went NaN or infinite.
    #[error("{0}")]
    Diverged(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Adapter(#[from] peft::AdapterError),
    #[error("{}", crate::candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// A training job.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub data: PathBuf,
    /// A separate eval file; otherwise `eval_ratio` of the data is held out (0 = no eval).
    pub eval_data: Option<PathBuf>,
    pub eval_ratio: f64,
    pub output: PathBuf,
    pub lora: LoraSpec,
    pub optim: AdamWConfig,
    pub decay: Decay,
    pub warmup_ratio: f64,
    pub epochs: usize,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub max_seq_len: Option<usize>,
    /// Activation checkpointing: keep one decoder layer's activations at a time, and run each layer's forward
    /// again in the backward.
    pub gradient_checkpointing: bool,
    pub seed: u64,
    pub checkpoint_every: Option<u64>,
    pub checkpoint_dir: PathBuf,
    pub resume: bool,
    pub log_file: PathBuf,
    /// Recorded as `base_model_name_or_path`.
    pub base_model: String,
    /// Show a progress bar (else log lines).
    pub progress: bool,
}

/// Refuses a `--rank` whose trainable state (A and B with their gradients and two AdamW moments, f32) is
/// more than the machine's memory: its allocation would abort the process.
fn check_rank_fits(layout: &crate::lora::peft::BaseLayout, spec: &LoraSpec) -> Result<(), TrainError> {
    let Some(memory) = crate::model::kv_cache::host_memory_bytes() else { return Ok(()) };
    let per_layer: u128 = spec.targets.iter().map(|&k| layout.dims(k)).map(|(i, o)| (i + o) as u128).sum();
    let bytes = per_layer * layout.layers as u128 * spec.rank as u128 * 4 * 4;
    if bytes > memory as u128 {
        return Err(TrainError::Config(format!(
            "--rank {}: its LoRA weights, gradients and optimizer state take {bytes} bytes, more than this machine's memory ({memory} bytes)",
            spec.rank
        )));
    }
    Ok(())
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    pub total_steps: u64,
    pub start_step: u64,
    pub steps_done: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval_losses: Vec<f64>,
    pub tokens: usize,
    pub seconds: f64,
    pub trainable_params: usize,
    pub all_params: usize,
}

/// Splits off the eval set (`--eval-ratio` of a seeded shuffle, at least one example and never all of them).
fn split(
    examples: Vec<data::Example>,
    cfg: &TrainConfig,
) -> Result<(Vec<data::Example>, Vec<data::Example>), TrainError> {
    let (ratio, seed) = (cfg.eval_ratio, cfg.seed);
    if ratio <= 0.0 {
        return Ok((examples, Vec::new()));
    }
    if examples.len() < 2 {
        return Err(TrainError::Config(format!(
            "--eval-ratio {ratio}: {} has one example, nothing to hold out for evaluation (drop --eval-ratio)",
            cfg.data.display()
        )));
    }
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    crate::rng::Rng::derive(seed, 0xE7A1).shuffle(&mut idx);
    let n_eval = ((examples.len() as f64 * ratio).round() as usize).clamp(1, examples.len() - 1);
    let eval_set: std::collections::HashSet<usize> = idx[..n_eval].iter().copied().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if eval_set.contains(&i) {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    Ok((train, eval))
}

/// Validates settings that need neither the model nor the data (the CLI calls it before loading either).
pub fn check(cfg: &TrainConfig) -> Result<(), TrainError> {
    let bad = |m: String| Err(TrainError::Config(m));
    // Where the adapter goes is checked now, not after the run (a resumed run's finished output is refused,
    // with its own message, once the checkpoint is read).
    if !(cfg.resume && std::fs::symlink_metadata(&cfg.output).is_ok()) {
        crate::output::check_new(&cfg.output).map_err(|e| TrainError::Config(e.to_string()))?;
    }
    if cfg.lora.rank == 0 || cfg.lora.targets.is_empty() {
        return bad("--rank must be ≥ 1 and --target-modules non-empty".into());
    }
    if !(0.0..1.0).contains(&(cfg.lora.dropout as f64)) {
        return bad(format!("--dropout must be in [0, 1), got {}", cfg.lora.dropout));
    }
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || (cfg.epochs == 0 && cfg.max_steps.is_none()) {
        return bad("--batch-size, --grad-accum and --epochs (or --max-steps) must be ≥ 1".into());
    }
    if cfg.max_steps == Some(0) {
        return bad("--max-steps must be ≥ 1 (0 steps would write an adapter that does nothing)".into());
    }
    if cfg.checkpoint_every == Some(0) {
        return bad("--checkpoint-every must be ≥ 1 (optimizer steps between checkpoints)".into());
    }
    if !(cfg.max_grad_norm >= 0.0 && cfg.max_grad_norm.is_finite()) {
        return bad(format!("--max-grad-norm must be a number ≥ 0 (0 = no clipping), got {}", cfg.max_grad_norm));
    }
    if !(cfg.optim.weight_decay >= 0.0 && cfg.optim.weight_decay.is_finite()) {
        return bad(format!("--weight-decay must be a number ≥ 0, got {}", cfg.optim.weight_decay));
    }
    if !(cfg.optim.lr > 0.0 && cfg.optim.lr.is_finite()) {
        return bad(format!("--lr must be a number > 0, got {}", cfg.optim.lr));
    }
    if !(cfg.lora.alpha > 0.0 && cfg.lora.alpha.is_finite()) {
        return bad(format!(
            "--alpha must be a number > 0 (α = 0 trains an adapter that does nothing), got {}",
            cfg.lora.alpha
        ));
    }
    for (flag, v) in [("--warmup-ratio", cfg.warmup_ratio), ("--eval-ratio", cfg.eval_ratio)] {
        if !(0.0..1.0).contains(&v) {
            return bad(format!("{flag} must be in [0, 1), got {v}"));
        }
    }
    // One optimizer step under a warmup is step 0 of the warmup, at a learning rate of 0 (the run-length
    // check in `train` finds this too, but only once the model and data are loaded).
    if cfg.max_steps == Some(1) && cfg.warmup_ratio > 0.0 {
        return bad(format!(
            "--max-steps 1 with --warmup-ratio {} trains at a learning rate of 0 (the first step of a warmup has \
             none): the adapter would not change. Give --warmup-ratio 0 or more steps",
            cfg.warmup_ratio
        ));
    }
    if cfg.eval_data.is_some() && cfg.eval_ratio > 0.0 {
        return bad("--eval-data and --eval-ratio both choose the evaluation set: give one".into());
    }
    // The adapter folder is written whole at the end: nothing the run writes before may live inside it
    // (paths compared as absolute ones, `.` and `..` folded: `./out` and `out/ck` are one place).
    for (flag, path) in [("--log-file", &cfg.log_file), ("--checkpoint-dir", &cfg.checkpoint_dir)] {
        if crate::output::within(path, &cfg.output) {
            return bad(format!(
                "{flag} {} is inside --output {} (the adapter folder must not exist until the run ends)",
                path.display(),
                cfg.output.display()
            ));
        }
    }
    if crate::output::within(&cfg.log_file, &cfg.checkpoint_dir) {
        return bad(format!(
            "--log-file {} is inside --checkpoint-dir {} (its folder holds checkpoints only)",
            cfg.log_file.display(),
            cfg.checkpoint_dir.display()
        ));
    }
    if cfg.checkpoint_dir.exists() && !cfg.checkpoint_dir.is_dir() {
        return bad(format!("--checkpoint-dir {}: exists and is not a folder", cfg.checkpoint_dir.display()));
    }
    check_log_file(cfg)?;
    if !cfg.resume && checkpoint::latest(&cfg.checkpoint_dir).is_some() {
        return bad(format!(
            "{}: holds checkpoints of an earlier run: pass --resume to continue it, or remove the folder to start over",
            cfg.checkpoint_dir.display()
        ));
    }
    Ok(())
}

/// Runs a whole training job on `model` and writes the adapter to `cfg.output`.
pub fn train(model: &Model, tok: &Tokenizer, cfg: &TrainConfig) -> Result<TrainReport, TrainError> {
    check(cfg)?;
    let eos = example_eos(model, tok)?;
    // Without --max-seq-len, examples are cut at the model's context, as positions past it were never trained;
    // a limit past it would train positions the server never serves.
    let context = model.config().max_position_embeddings;
    if let Some(m) = cfg.max_seq_len.filter(|&m| m > context) {
        return Err(TrainError::Config(format!(
            "--max-seq-len {m} exceeds the model's context of {context} positions"
        )));
    }
    let max_seq_len = Some(cfg.max_seq_len.unwrap_or(context));
    // Each file's examples, truncations reported.
    let enc = data::Encoding { tok, eos, vocab: model.config().vocab_size, max_seq_len };
    let read = |file: &std::path::Path| -> Result<_, TrainError> {
        let (examples, stats) = data::load_jsonl(file, enc)?;
        if stats.truncated > 0 {
            tracing::warn!(file = %file.display(), truncated = stats.truncated, dropped = stats.dropped, max_seq_len = ?max_seq_len, "examples truncated (--max-seq-len, else the model's context)");
        }
        Ok((examples, stats))
    };
    let (examples, stats) = read(&cfg.data)?;
    let (train_set, eval_set) = match &cfg.eval_data {
        Some(p) => (examples, read(p)?.0),
        None => split(examples, cfg)?,
    };
    let sched = trainer::Schedule::new(cfg, train_set.len());
    // (The step after warmup has the full rate: no need to look further.)
    let looked_at = sched.total_steps.min(sched.warmup_steps + 1);
    if (0..looked_at).all(|s| lr_at(cfg.optim.lr, s, sched.warmup_steps, sched.total_steps, cfg.decay) == 0.0) {
        return Err(TrainError::Config(format!(
            "every one of the run's {} optimizer steps would have a learning rate of 0 (the first step of a warmup \
             has none; --warmup-ratio {} makes {} warmup steps): the adapter would not change. Give more steps \
             (--epochs, --max-steps, more data) or --warmup-ratio 0",
            sched.total_steps, cfg.warmup_ratio, sched.warmup_steps
        )));
    }
    tracing::info!(
        lines = stats.lines,
        train_examples = train_set.len(),
        eval_examples = eval_set.len(),
        truncated = stats.truncated,
        dropped = stats.dropped,
        target_tokens = train_set.iter().map(|e| e.loss_tokens()).sum::<usize>(),
        "data loaded"
    );

    let checkpoint_dir_existed = cfg.checkpoint_dir.exists();
    let layout = model.lora_layout();
    check_rank_fits(&layout, &cfg.lora)?;
    let lora = TrainableLora::init(&layout, cfg.lora.clone(), cfg.seed, model.device())?;
    let vars = lora.vars();
    let mut opt = AdamW::new(cfg.optim, &vars)?;
    let fp = trainer::fingerprint(cfg, model, &train_set);
    let mut start = 0;
    if cfg.resume {
        match checkpoint::restore_latest(&cfg.checkpoint_dir, &lora, &mut opt, &fp)? {
            Some(state) => {
                let total = sched.total_steps;
                if state.step >= total {
                    // Checkpoints are saved before the last step only: its state.json was edited.
                    return Err(TrainError::Checkpoint(format!(
                        "{}: the newest checkpoint is at step {}, not below this run's {total} steps",
                        cfg.checkpoint_dir.display(),
                        state.step
                    )));
                }
                start = state.step;
                tracing::info!(step = start, dir = %cfg.checkpoint_dir.display(), "resuming");
            }
            None => {
                // As transformers' Trainer: asked to resume, finding nothing to resume from is an error.
                return Err(TrainError::Config(format!(
                    "--resume: no checkpoint in {} (run without --resume to start from scratch)",
                    cfg.checkpoint_dir.display()
                )));
            }
        }
        if std::fs::symlink_metadata(&cfg.output).is_ok() {
            return Err(TrainError::Config(format!(
                "{}: already exists (the run finished; choose a new output folder)",
                cfg.output.display()
            )));
        }
    }
    let trainable = lora.num_parameters();
    let all = model.num_parameters() + trainable;
    // PEFT's print_trainable_parameters line.
    println!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(all),
        100.0 * trainable as f64 / all as f64
    );

    for file in [&cfg.output, &cfg.log_file] {
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| TrainError::Io(format!("{}: {e}", parent.display())))?;
        }
    }
    let mut log = open_log(&cfg.log_file, start)?;
    let mut report = trainer::run_loop(model, &lora, &mut opt, cfg, &train_set, &eval_set, start, &fp, &mut log)?;
    report.trainable_params = trainable;
    report.all_params = all;

    let weights = lora.to_weights(layout.layers)?;
    let meta = AdapterMeta {
        r: cfg.lora.rank,
        lora_alpha: cfg.lora.alpha,
        use_rslora: cfg.lora.use_rslora,
        // Through the shortest decimal form: 0.05 as f32 widened is 0.05000000074505806.
        lora_dropout: cfg.lora.dropout.to_string().parse().expect("a float's own decimal form"),
        base_model_name_or_path: cfg.base_model.clone(),
        dtype: candle_core::DType::F32,
    };
    // An adapter trained on conversations carries the template that rendered them (as TRL saves its
    // tokenizer), so the server prompts it the same way whatever template the model or the server has later.
    let template = tok.chat.template.as_deref().filter(|_| stats.conversations > 0);
    let side: Vec<(&str, &[u8])> = template.map(|t| ("chat_template.jinja", t.as_bytes())).into_iter().collect();
    peft::write_dir_with(&cfg.output, &weights, &meta, &side)?;
    // The folder goes too if this job made it: this run, or the interrupted one it resumed.
    checkpoint::remove_all(&cfg.checkpoint_dir, !checkpoint_dir_existed || cfg.resume);
    Ok(report)
}

/// The id every example ends with: the tokenizer's `eos_token`, as TRL appends it, when generation stops at it
/// (Llama 3.1 Instruct: `<|eot_id|>`, not the first of its three ids); else the first end-of-sequence id, with
/// a warning when the tokenizer names another (a config without the key gets its class default, which may
/// not be this vocabulary's).
fn example_eos(model: &Model, tok: &Tokenizer) -> Result<u32, TrainError> {
    let ids = &model.config().eos_token_ids;
    let first = *ids.first().ok_or_else(|| TrainError::Config("the model has no eos_token_id".into()))?;
    match tok.special_token("eos_token").and_then(|t| Some((t, tok.token_to_id(t)?))) {
        Some((_, id)) if ids.contains(&id) => Ok(id),
        Some((name, id)) => {
            tracing::warn!(eos = first, tokenizer_eos = name, tokenizer_eos_id = id, "examples end with the config's end-of-sequence id, which is not the tokenizer's eos_token; check eos_token_id in config.json / generation_config.json");
            Ok(first)
        }
        None => Ok(first),
    }
}

/// The log file is written from the first step on: refused when it is one of the run's inputs or a file that
/// is not a training log (a fresh run replaces a log of an earlier one; `--resume` keeps its lines).
fn check_log_file(cfg: &TrainConfig) -> Result<(), TrainError> {
    let log = &cfg.log_file;
    let same = |p: &std::path::Path| match (log.canonicalize(), p.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let inputs = std::iter::once(("--data", &cfg.data)).chain(cfg.eval_data.as_ref().map(|p| ("--eval-data", p)));
    for (flag, input) in inputs {
        if same(input) {
            return Err(TrainError::Config(format!("--log-file {} is the {flag} file", log.display())));
        }
    }
    match std::fs::symlink_metadata(log) {
        // Replaced by a rename when the run starts: a folder, a device, a pipe or a link is not a log.
        Ok(m) if m.file_type().is_symlink() => {
            return Err(TrainError::Config(format!(
                "--log-file {}: is a symbolic link (the run replaces the log file; give the target's path)",
                log.display()
            )))
        }
        Ok(m) if !m.file_type().is_file() => {
            return Err(TrainError::Config(format!("--log-file {}: exists and is not a regular file", log.display())))
        }
        _ => {}
    }
    match std::fs::read(log) {
        Ok(bytes) if !std::str::from_utf8(&bytes).is_ok_and(is_training_log) => Err(TrainError::Config(format!(
            "--log-file {}: exists and is not a training log (choose another file)",
            log.display()
        ))),
        _ => Ok(()),
    }
}

/// Whether `text` is a training log: JSON lines with a `step` each, the last one possibly cut short (a run
/// killed while writing it). Anything else is somebody's file.
fn is_training_log(text: &str) -> bool {
    let cut = !text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    lines.iter().enumerate().filter(|(_, l)| !l.trim().is_empty()).all(|(i, l)| {
        let step = serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").cloned());
        let ours = l.starts_with(trainer::LOG_LINE_START) || trainer::LOG_LINE_START.starts_with(*l);
        step.is_some() || (cut && i + 1 == lines.len() && ours)
    })
}

/// The JSONL training log: a new run starts it afresh; a resumed one keeps the lines of the steps up to its
/// checkpoint (later ones were lost with the interrupted run, and are logged again), as the HF Trainer's state.
/// The kept lines are written to a new file renamed over the old one, so a kill meanwhile loses nothing.
fn open_log(path: &std::path::Path, resumed_at: u64) -> Result<std::fs::File, TrainError> {
    let io = |e: std::io::Error| TrainError::Io(format!("{}: {e}", path.display()));
    let kept: String = if resumed_at == 0 {
        String::new()
    } else {
        match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    let step = serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64());
                    step.is_some_and(|s| s <= resumed_at)
                })
                .flat_map(|l| [l, "\n"])
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        }
    };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, kept.as_bytes()).map_err(io)?;
    #[cfg(unix)]
    {
        // A temporary file is private (0600); the log is an ordinary file.
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))
}

/// `1234567` → `1,234,567` (as PEFT prints counts).
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log cut anywhere in its last line is still a log; anything else is not.
    #[test]
    fn training_logs_are_recognised_even_cut_short() {
        let log = "{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"loss\":2.1}\n";
        assert!(is_training_log(log) && is_training_log(""));
        for cut in 1..24 {
            assert!(is_training_log(&log[..log.len() - cut]), "cut {cut} bytes from the end");
        }
        for other in ["# notes\n", "{\"step\":1}\n# notes", "{\"text\": \"a\"}\n", "{\"step\":1}\n{\"x\""] {
            assert!(!is_training_log(other), "{other}");
        }
    }

    /// Examples end with the tokenizer's eos_token when generation stops at it (Llama 3.1 Instruct's
    /// `<|eot_id|>` is the last of three ids), else with the first id.
    #[test]
    fn examples_end_with_the_tokenizers_eos_when_generation_stops_at_it() {
        let tok = crate::model::demo::tokenizer().unwrap();
        assert_eq!(tok.token_to_id(tok.special_token("eos_token").unwrap()), Some(1));
        let weights = crate::model::demo::weights().unwrap();
        let opts = crate::model::LoadOptions { quant: crate::quant::QuantMode::None, ..Default::default() };
        for (ids, want) in [(vec![5, 7, 1], 1), (vec![5, 7], 5)] {
            let config =
                crate::model::config::ModelConfig { eos_token_ids: ids.clone(), ..crate::model::demo::config() };
            let model = crate::model::build(config, &weights, &opts).unwrap();
            assert_eq!(example_eos(&model, &tok).unwrap(), want, "{ids:?}");
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4194304), "4,194,304");
    }
}
