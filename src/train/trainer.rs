//! The training loop: the one model forward with the base frozen (NF4 by default) and the LoRA A/B as
//! trainable `Var`s, next-token cross-entropy on the target tokens, gradient accumulation normalised by the
//! step's target tokens (optionally with activation checkpointing: each layer run again in the backward),
//! global-norm clipping, AdamW, warmup then linear/cosine decay, seeded shuffling,
//! periodic checkpoints that a `--resume` continues bit for bit, an eval loss each epoch, a progress bar and a
//! JSONL log.
//!
//! Batches are flattened — each micro-batch's sequences are stacked as rows of one forward, as in serving —
//! so no padding token is ever computed.

use std::io::Write;
use std::time::Instant;

use candle_core::{Tensor, Var, D};
use sha2::{Digest, Sha256};

use super::checkpoint::{self, State};
use super::data::Example;
use super::optim::{clip_grad_norm, lr_at, AdamW};
use super::{TrainConfig, TrainError, TrainReport};
use crate::lora::trainable::TrainableLora;
use crate::lora::LoraRows;
use crate::model::{AttentionMode, Batch, Model, SeqInput};
use crate::rng::Rng;

/// A micro-batch flattened as the forward takes it: each example's tokens back to back, and the rows whose
/// next token is a target, with that token.
struct Flat {
    tokens: Vec<u32>,
    lens: Vec<usize>,
    rows: Vec<usize>,
    labels: Vec<u32>,
}

impl Flat {
    fn new(examples: &[&Example]) -> Self {
        let mut flat = Flat { tokens: Vec::new(), lens: Vec::new(), rows: Vec::new(), labels: Vec::new() };
        for ex in examples {
            let base = flat.tokens.len();
            flat.tokens.extend_from_slice(&ex.ids);
            flat.lens.push(ex.ids.len());
            for t in 0..ex.ids.len() - 1 {
                if ex.targets[t + 1] {
                    flat.rows.push(base + t);
                    flat.labels.push(ex.ids[t + 1]);
                }
            }
        }
        flat
    }

    fn seqs(&self) -> Vec<SeqInput<'static>> {
        self.lens.iter().map(|&len| SeqInput { len, past: 0, blocks: &[] }).collect()
    }

    /// Summed negative log-likelihood of the labels, from the final hidden states of every row.
    fn nll(&self, model: &Model, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let logits = model.logits(hidden, &self.rows)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let labels = Tensor::from_vec(self.labels.clone(), (self.labels.len(), 1), logits.device())?;
        logp.gather(&labels, 1)?.sum_all()?.neg()
    }
}

/// Summed negative log-likelihood of the target tokens of `examples` and their count, in one forward.
pub fn batch_nll(
    model: &Model,
    lora: &TrainableLora,
    examples: &[&Example],
    differentiable: bool,
) -> candle_core::Result<(Tensor, usize)> {
    let flat = Flat::new(examples);
    let seqs = flat.seqs();
    let batch = Batch { tokens: &flat.tokens, seqs: &seqs, logit_rows: &flat.rows };
    let hidden = model.forward_hidden(&batch, AttentionMode::Dense { differentiable }, &LoraRows::Train(lora))?;
    Ok((flat.nll(model, &hidden)?, flat.labels.len()))
}

/// One micro-batch's summed loss, and the gradient of that loss over `step_targets` (the step's target tokens)
/// for each of `lora.vars()`, `None` where none reached it.
///
/// With `checkpointing`, the forward keeps only each decoder layer's input and drops the layer's graph; the
/// backward runs each layer again from its input, last layer first, with the dropout masks it drew the first
/// time, and passes the gradient of its input on to the layer before (activation checkpointing, as
/// transformers' `gradient_checkpointing`). The activations held are one layer's instead of every layer's, for
/// one more forward; the gradients are those of the plain backward.
///
/// A layer input's gradient is detached before it is passed on. candle detaches the gradient of each node it
/// passes through, but a leaf that is itself an operand (a layer input made a `Var`, which the LoRA A matmuls
/// take directly when there is no dropout) gets its gradient built from tensors that still carry the forward's
/// graph: weighting the layer before's outputs, it would add its own derivative with respect to the A weights
/// it passed through (doubling their gradients), and it would hold the layer's activations. The adapter
/// weights reach their ops through a transpose, so their gradients come detached already.
pub fn micro_batch_grads(
    model: &Model,
    lora: &TrainableLora,
    examples: &[&Example],
    step_targets: usize,
    checkpointing: bool,
) -> candle_core::Result<(f64, Vec<Option<Tensor>>)> {
    let vars = lora.vars();
    if !checkpointing {
        let (nll, _) = batch_nll(model, lora, examples, true)?;
        let loss = nll.to_scalar::<f32>()? as f64;
        let store = (nll / step_targets as f64)?.backward()?;
        return Ok((loss, vars.iter().map(|v| store.get(v.as_tensor()).cloned()).collect()));
    }
    let flat = Flat::new(examples);
    let seqs = flat.seqs();
    let batch = Batch { tokens: &flat.tokens, seqs: &seqs, logit_rows: &flat.rows };
    let rows = LoraRows::Train(lora);
    let (layers, mut x, mut h) = model.dense_layers(&batch, true)?;
    let mut saved = Vec::with_capacity(layers.len());
    for l in 0..layers.len() {
        saved.push((x.clone(), h.clone(), lora.rng_state()));
        let (next_x, next_h) = layers.run(l, &x, &h, &rows)?;
        (x, h) = (next_x.detach(), next_h.detach());
    }
    let rng_after = lora.rng_state();
    let hidden = Var::from_tensor(&h)?;
    drop((x, h));
    let nll = flat.nll(model, hidden.as_tensor())?;
    let loss = nll.to_scalar::<f32>()? as f64;
    let store = (nll / step_targets as f64)?.backward()?;
    let unreached = || candle_core::Error::Msg("a layer's input does not reach the loss".into());
    // The gradients of the stream leaving the layer being run again, and of its normed copy.
    let mut grad_h = store.get(hidden.as_tensor()).map(Tensor::detach).ok_or_else(unreached)?;
    let mut grad_x: Option<Tensor> = None;
    drop(store);
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    for l in (0..layers.len()).rev() {
        let (x_in, h_in, rng) = saved.pop().expect("an input saved for every layer");
        lora.set_rng_state(rng);
        // Layer 0's input is the frozen embedding's: no gradient goes further back. (A `Var` is a copy: the
        // saved tensor goes as it is made.)
        let as_var = |t: Tensor| Ok::<_, candle_core::Error>(Var::from_tensor(&t)?.as_tensor().clone());
        let (x_in, h_in) = if l == 0 { (x_in, h_in) } else { (as_var(x_in)?, as_var(h_in)?) };
        let (x_out, h_out) = layers.run(l, &x_in, &h_in, &rows)?;
        // The gradient of Σ out ⊙ g with respect to `out` is exactly g.
        let mut surrogate = (h_out * &grad_h)?.sum_all()?;
        if let Some(g) = &grad_x {
            surrogate = (surrogate + (x_out * g)?.sum_all()?)?;
        }
        let store = surrogate.backward()?;
        for (acc, v) in grads.iter_mut().zip(&vars) {
            if let Some(g) = store.get(v.as_tensor()) {
                accumulate(acc, g.clone())?;
            }
        }
        if l > 0 {
            grad_x = Some(store.get(&x_in).map(Tensor::detach).ok_or_else(unreached)?);
            grad_h = store.get(&h_in).map(Tensor::detach).ok_or_else(unreached)?;
        }
    }
    lora.set_rng_state(rng_after);
    Ok((loss, grads))
}

/// Adds `g` to the gradient summed in `acc` so far.
fn accumulate(acc: &mut Option<Tensor>, g: Tensor) -> candle_core::Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => (a + g)?,
        None => g,
    });
    Ok(())
}

/// Mean loss over `examples` (dropout off, no gradients).
pub fn eval_loss(
    model: &Model,
    lora: &TrainableLora,
    examples: &[Example],
    batch_size: usize,
) -> candle_core::Result<f64> {
    lora.set_training(false);
    let mut total = 0f64;
    let mut n = 0usize;
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (nll, k) = batch_nll(model, lora, &refs, false)?;
        total += nll.to_scalar::<f32>()? as f64;
        n += k;
    }
    lora.set_training(true);
    Ok(total / n.max(1) as f64)
}

/// The settings, base model and data a checkpoint depends on: the base as loaded (its folder, config, compute
/// dtype, and how many of its parameters are NF4, which tells `--quant nf4` from `none` whatever the device)
/// as well as every setting of the run that changes what the steps compute.
/// (`--gradient-checkpointing` is not one: it changes how the gradients are computed, not their bits.)
pub fn fingerprint(cfg: &TrainConfig, model: &Model, data: &[Example]) -> String {
    let mut h = Sha256::new();
    let base =
        std::fs::canonicalize(&cfg.base_model).map_or_else(|_| cfg.base_model.clone(), |p| p.display().to_string());
    h.update(format!(
        "{:?}|{:?}|{:?}|{}|{:?}|{}|{}|{}|{:?}|{}|{}",
        cfg.lora,
        cfg.optim,
        cfg.decay,
        cfg.warmup_ratio,
        cfg.max_steps,
        cfg.epochs,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.max_seq_len,
        cfg.seed,
        cfg.max_grad_norm,
    ));
    h.update(format!("|{base}|{:?}|{:?}|{}", model.config(), model.dtype(), model.nf4_footprint().0));
    for ex in data {
        for id in &ex.ids {
            h.update(id.to_le_bytes());
        }
        h.update(ex.targets.iter().map(|&t| t as u8).collect::<Vec<_>>());
    }
    h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Plan of the run: which examples each optimizer step uses.
pub struct Schedule {
    pub grad_accum: usize,
    pub micro_per_epoch: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub warmup_steps: u64,
}

/// The run's optimizer steps: `max_steps`, else every epoch's. Saturating: an --epochs so large that the
/// product wrapped trained a few steps and called it done; saturated, it trains until stopped, as asked.
fn total_steps(steps_per_epoch: u64, epochs: usize, max_steps: Option<u64>) -> u64 {
    max_steps.unwrap_or(steps_per_epoch.saturating_mul(epochs as u64))
}

impl Schedule {
    pub fn new(cfg: &TrainConfig, n: usize) -> Self {
        let micro_per_epoch = n.div_ceil(cfg.batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum) as u64;
        let total_steps = total_steps(steps_per_epoch, cfg.epochs, cfg.max_steps);
        Schedule {
            grad_accum: cfg.grad_accum,
            micro_per_epoch,
            steps_per_epoch,
            total_steps,
            warmup_steps: (cfg.warmup_ratio * total_steps as f64).ceil() as u64,
        }
    }

    /// (epoch, micro-batch range within the epoch) of optimizer step `step`.
    pub fn locate(&self, step: u64) -> (u64, std::ops::Range<usize>) {
        let epoch = step / self.steps_per_epoch;
        let first = (step % self.steps_per_epoch) as usize * self.grad_accum;
        (epoch, first..(first + self.grad_accum).min(self.micro_per_epoch))
    }
}

/// The example order of `epoch`: a permutation drawn from (seed, epoch), so a resumed run sees the same.
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(seed ^ 0x05A0_FF1E, epoch).shuffle(&mut order);
    order
}

/// How every line of the training log starts (`step` is the first key of each, and serde_json keeps key order
/// here): a last line cut short by a kill is recognised by being a prefix of this, or starting with it.
pub const LOG_LINE_START: &str = "{\"step\":";

/// Appends one line to the training log in one write, so that a kill leaves whole lines (or, at worst, one cut
/// short at the end).
fn log_line(log: &mut std::fs::File, v: serde_json::Value, cfg: &TrainConfig) -> Result<(), TrainError> {
    let line = format!("{v}\n");
    debug_assert!(line.starts_with(LOG_LINE_START), "{line}");
    log.write_all(line.as_bytes()).map_err(|e| TrainError::Io(format!("{}: {e}", cfg.log_file.display())))
}

/// The first value of `t` that is NaN or infinite, if any.
pub(super) fn non_finite(t: &Tensor) -> candle_core::Result<Option<f32>> {
    let values = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    Ok(values.into_iter().find(|x| !x.is_finite()))
}

/// The error of a run that diverged at `step` (`what` says how); nothing is written.
fn diverged(step: u64, what: &str, max_grad_norm: f64) -> TrainError {
    let advice = if max_grad_norm > 0.0 { "lower --lr" } else { "lower --lr, or clip gradients with --max-grad-norm" };
    TrainError::Diverged(format!("step {step}: {what}: training diverged ({advice}); no adapter written"))
}

/// [`diverged`] at `step` if an update left a LoRA parameter NaN or infinite.
fn check_weights(vars: &[&candle_core::Var], step: u64, cfg: &TrainConfig) -> Result<(), TrainError> {
    for (i, v) in vars.iter().enumerate() {
        if let Some(x) = non_finite(v.as_tensor())? {
            let what = format!("LoRA parameter {i} holds {x} after the update");
            return Err(diverged(step, &what, cfg.max_grad_norm));
        }
    }
    Ok(())
}

/// Runs the loop from the current state of `lora`/`opt` (fresh or restored at `start_step`).
#[allow(clippy::too_many_arguments)]
pub fn run_loop(
    model: &Model,
    lora: &TrainableLora,
    opt: &mut AdamW,
    cfg: &TrainConfig,
    train: &[Example],
    eval: &[Example],
    start_step: u64,
    fingerprint: &str,
    log: &mut std::fs::File,
) -> Result<TrainReport, TrainError> {
    let sched = Schedule::new(cfg, train.len());
    let vars = lora.vars();
    let mut report = TrainReport { total_steps: sched.total_steps, start_step, ..Default::default() };
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::new(sched.total_steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("template"),
        );
        b.set_position(start_step);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut tokens_seen = 0usize;
    let mut order_epoch = u64::MAX;
    let mut order = Vec::new();
    for step in start_step..sched.total_steps {
        let (epoch, micro) = sched.locate(step);
        if epoch != order_epoch {
            order = epoch_order(cfg.seed, epoch, train.len());
            order_epoch = epoch;
        }
        let micro_batches: Vec<Vec<&Example>> = micro
            .map(|m| {
                order[m * cfg.batch_size..((m + 1) * cfg.batch_size).min(train.len())]
                    .iter()
                    .map(|&i| &train[i])
                    .collect()
            })
            .collect();
        let step_targets: usize = micro_batches.iter().flatten().map(|e| e.loss_tokens()).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut step_loss = 0f64;
        for mb in &micro_batches {
            tokens_seen += mb.iter().map(|e| e.ids.len()).sum::<usize>();
            let (loss, g) = micro_batch_grads(model, lora, mb, step_targets, cfg.gradient_checkpointing)?;
            step_loss += loss;
            for (acc, gv) in grads.iter_mut().zip(g) {
                if let Some(gv) = gv {
                    accumulate(acc, gv)?;
                }
            }
        }
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        let lr = lr_at(cfg.optim.lr, step, sched.warmup_steps, sched.total_steps, cfg.decay);
        let loss = step_loss / step_targets.max(1) as f64;
        // A NaN or infinite loss or gradient would turn every weight NaN at this update: stop before it.
        if !(loss.is_finite() && grad_norm.is_finite()) {
            let what = format!("the loss is {loss} and the gradient norm {grad_norm}");
            return Err(diverged(step + 1, &what, cfg.max_grad_norm));
        }
        opt.update(&vars, &grads, lr)?;
        if step == start_step {
            report.first_loss = loss;
        }
        report.last_loss = loss;
        report.steps_done = step + 1;
        let elapsed = started.elapsed().as_secs_f64();
        let tok_s = tokens_seen as f64 / elapsed.max(1e-9);
        let eta = elapsed / (step + 1 - start_step) as f64 * (sched.total_steps - step - 1) as f64;
        log_line(
            log,
            serde_json::json!({"step": step + 1, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, "eta_s": eta}),
            cfg,
        )?;
        bar.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {tok_s:.0} tok/s"));
        bar.inc(1);
        if !cfg.progress && ((step + 1) % 10 == 0 || step + 1 == sched.total_steps) {
            tracing::info!(
                step = step + 1,
                total = sched.total_steps,
                loss,
                lr,
                tokens_per_s = tok_s,
                eta_s = eta,
                "training"
            );
        }
        let epoch_end = (step + 1) % sched.steps_per_epoch == 0 || step + 1 == sched.total_steps;
        if epoch_end && !eval.is_empty() {
            let e = eval_loss(model, lora, eval, cfg.batch_size)?;
            report.eval_losses.push(e);
            log_line(log, serde_json::json!({"step": step + 1, "epoch": epoch, "eval_loss": e}), cfg)?;
            tracing::info!(epoch, eval_loss = e, "evaluation");
        }
        if let Some(every) = cfg.checkpoint_every {
            if (step + 1) % every == 0 && step + 1 < sched.total_steps {
                // Never a checkpoint of weights this update overflowed: it would replace the last good one.
                check_weights(&vars, step + 1, cfg)?;
                let state =
                    State { step: step + 1, dropout_rng: lora.rng_state(), fingerprint: fingerprint.to_string() };
                let path = checkpoint::save(&cfg.checkpoint_dir, &state, lora, opt)?;
                tracing::info!(step = step + 1, path = %path.display(), "checkpoint saved");
            }
        }
    }
    bar.finish_and_clear();
    // The last update can still overflow a weight (a learning rate far too large meets finite gradients).
    check_weights(&vars, sched.total_steps, cfg)?;
    report.seconds = started.elapsed().as_secs_f64();
    report.tokens = tokens_seen;
    Ok(report)
}

#[cfg(test)]
mod tests {
    /// 4 steps an epoch times 2^62 + 1 epochs wrapped to 4 steps (and 2^62 epochs to none).
    #[test]
    fn a_huge_epoch_count_saturates_instead_of_wrapping() {
        assert_eq!(super::total_steps(4, (1 << 62) + 1, None), u64::MAX);
        assert_eq!(super::total_steps(4, 1 << 62, None), u64::MAX);
        assert_eq!(super::total_steps(4, 3, None), 12);
        assert_eq!(super::total_steps(4, usize::MAX, Some(7)), 7);
    }
}
