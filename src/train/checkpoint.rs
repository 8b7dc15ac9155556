//! Trainer checkpoints: everything a resumed run needs to continue bit for bit — the LoRA parameters, the
//! AdamW moments and step count, the dropout generator's state, and a fingerprint of the settings, base model
//! and data that must not change across a resume. A restored checkpoint must be whole and finite. One folder
//! per checkpoint (`step-<N>/`), written under a temporary name and renamed into place; older ones are removed
//! once a newer one is complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::TrainError;
use crate::lora::trainable::TrainableLora;
use crate::rng::Rng;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct State {
    /// Optimizer steps completed.
    pub step: u64,
    pub dropout_rng: Rng,
    /// Settings and data the run depends on; a resume with different ones is refused.
    pub fingerprint: String,
}

/// Whether a folder name is one this module writes: `step-<8+ digits>` (a checkpoint) or
/// `.step-<digits>.partial-…` (one being written, or moved aside). Nothing else in the folder is touched.
fn is_ours(name: &str, complete: bool) -> bool {
    let digits = |s: &str| s.len() >= 8 && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(n) = name.strip_prefix("step-") {
        return digits(n);
    }
    !complete && name.strip_prefix(".step-").and_then(|n| n.split_once(".partial-")).is_some_and(|(n, _)| digits(n))
}

fn err(p: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint(format!("{}: {e}", p.display()))
}

/// [`err`] for a candle error, without the backtrace candle may carry.
fn candle_err(p: &Path) -> impl Fn(candle_core::Error) -> TrainError + '_ {
    move |e| err(p, crate::candle_message(&e))
}

/// Writes checkpoint `state` into `dir/step-<N>` and removes older ones.
pub fn save(dir: &Path, state: &State, lora: &TrainableLora, opt: &AdamW) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let name = format!("step-{:08}", state.step);
    let tmp = tempfile::Builder::new().prefix(&format!(".{name}.partial-")).tempdir_in(dir).map_err(|e| err(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, v) in lora.vars().iter().enumerate() {
        tensors.insert(format!("param.{i}"), v.as_tensor().clone());
        tensors.insert(format!("adam_m.{i}"), opt.m[i].clone());
        tensors.insert(format!("adam_v.{i}"), opt.v[i].clone());
    }
    let st = tmp.path().join("tensors.safetensors");
    candle_core::safetensors::save(&tensors, &st).map_err(candle_err(&st))?;
    let js = tmp.path().join("state.json");
    std::fs::write(&js, serde_json::to_string_pretty(state).expect("JSON")).map_err(|e| err(&js, e))?;
    // On disk before it takes its name, and its name on disk before older checkpoints go: a power loss
    // leaves a complete checkpoint, never only a new one with empty files.
    let sync = |e: crate::output::OutputError| err(Path::new(&e.path), e.reason);
    crate::output::sync_tree(tmp.path()).map_err(sync)?;
    let final_path = dir.join(&name);
    // A copy of the same step (a resumed run passing it again) is moved aside, not deleted, until the new one
    // is in place: a kill in between leaves it as a partial folder beside a complete older checkpoint at worst.
    let aside = dir.join(format!(".{name}.partial-replaced"));
    if final_path.exists() {
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&final_path, &aside).map_err(|e| err(&final_path, e))?;
    }
    let kept = tmp.keep();
    if let Err(e) = std::fs::rename(&kept, &final_path) {
        let _ = std::fs::remove_dir_all(&kept);
        return Err(err(&final_path, e));
    }
    crate::output::sync_dir(dir).map_err(sync)?;
    // Older checkpoints, and the partial folders of runs killed while saving.
    for entry in std::fs::read_dir(dir).map_err(|e| err(dir, e))?.flatten() {
        let (path, file_name) = (entry.path(), entry.file_name());
        let n = file_name.to_string_lossy();
        if path != final_path && is_ours(&n, false) {
            let _ = std::fs::remove_dir_all(path);
        }
    }
    Ok(final_path)
}

/// Removes the checkpoints in `dir` (complete and partial), then `dir` itself if the run created it and
/// nothing else is in it: a folder the user named may hold other files, which stay.
pub fn remove_all(dir: &Path, created: bool) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if is_ours(&n, false) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    if created {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The newest complete checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list(dir).ok()?.pop()
}

/// Complete checkpoints in `dir`, oldest first.
fn list(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| is_ours(n, true)) && p.join("state.json").is_file()
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Restores the newest checkpoint in `dir` into `lora` and `opt`; returns its state, or `None` if there is none.
pub fn restore_latest(
    dir: &Path,
    lora: &TrainableLora,
    opt: &mut AdamW,
    fingerprint: &str,
) -> Result<Option<State>, TrainError> {
    let Some(path) = list(dir)?.pop() else { return Ok(None) };
    let js = path.join("state.json");
    let text = crate::input::read_to_string(&js).map_err(|e| err(&js, e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| err(&js, e))?;
    if state.fingerprint != fingerprint {
        return Err(TrainError::Checkpoint(format!(
            "{}: saved by a run with other settings or data; resume with the same arguments and data file (or remove the checkpoint folder)",
            path.display()
        )));
    }
    let st = path.join("tensors.safetensors");
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).map_err(candle_err(&st))?;
    let get = |k: String| tensors.get(&k).cloned().ok_or_else(|| err(&st, format!("missing tensor {k}")));
    // Every tensor whole, of its parameter's shape, and finite: a NaN would silently poison the rest of the run.
    let get = |k: String, dims: &[usize]| {
        let t = get(k.clone())?;
        if t.dims() != dims {
            return Err(err(&st, format!("{k} has shape {:?}, expected {dims:?}", t.dims())));
        }
        if let Some(x) = super::trainer::non_finite(&t).map_err(candle_err(&st))? {
            return Err(err(&st, format!("{k} holds {x} (the run that saved it had diverged)")));
        }
        Ok(t)
    };
    for (i, v) in lora.vars().iter().enumerate() {
        let p = get(format!("param.{i}"), v.dims())?;
        v.set(&p.to_device(v.device()).map_err(candle_err(&st))?).map_err(candle_err(&st))?;
        opt.m[i] = get(format!("adam_m.{i}"), v.dims())?.to_device(v.device()).map_err(candle_err(&st))?;
        opt.v[i] = get(format!("adam_v.{i}"), v.dims())?.to_device(v.device()).map_err(candle_err(&st))?;
    }
    opt.step = state.step;
    lora.set_rng_state(state.dropout_rng.clone());
    Ok(Some(state))
}
