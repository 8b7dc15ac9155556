//! Writing PEFT adapters: the `adapter_config.json` PEFT writes for a plain LoRA adapter ([`config_json`])
//! and the whole adapter folder, assembled under a temporary name and renamed into place ([`write_dir`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::AdapterError;
use crate::lora::{LoraWeights, ModuleKind};

/// Turns f32 values into a dtype's little-endian bytes.
type Encoder = fn(&[f32]) -> Vec<u8>;

/// What an adapter written by loraserve records about itself in `adapter_config.json`.
#[derive(Clone, Debug)]
pub struct AdapterMeta {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub lora_dropout: f64,
    pub base_model_name_or_path: String,
    /// Tensor dtype on disk (F32, BF16 or F16).
    pub dtype: DType,
}

/// The `adapter_config.json` PEFT writes for a plain LoRA adapter with these settings and targets.
pub fn config_json(meta: &AdapterMeta, targets: &[ModuleKind]) -> Value {
    let mut names: Vec<&str> = targets.iter().map(|k| k.name()).collect();
    names.sort();
    names.dedup();
    serde_json::json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": meta.base_model_name_or_path,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": meta.lora_alpha,
        "lora_bias": false,
        "lora_dropout": meta.lora_dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": meta.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": names,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": meta.use_rslora
    })
}

/// Writes `weights` as a PEFT adapter folder at `dir` (which must not exist): `adapter_config.json` and
/// `adapter_model.safetensors` (f32, PEFT's tensor names). The folder is assembled under a temporary name
/// beside `dir` and renamed into place, so a server watching the adapters root never sees half an adapter.
pub fn write_dir(dir: &Path, weights: &LoraWeights, meta: &AdapterMeta) -> Result<(), AdapterError> {
    write_dir_with(dir, weights, meta, &[])
}

/// [`write_dir`] with more files in the folder (`(name, bytes)`, e.g. the `chat_template.jinja` the adapter
/// was trained with), written before it is renamed into place.
pub fn write_dir_with(
    dir: &Path,
    weights: &LoraWeights,
    meta: &AdapterMeta,
    side: &[(&str, &[u8])],
) -> Result<(), AdapterError> {
    let file_err = |p: &Path, e: &dyn std::fmt::Display| AdapterError::File {
        file: p.display().to_string(),
        reason: e.to_string(),
    };
    let out_err = |e: crate::output::OutputError| AdapterError::File { file: e.path, reason: e.reason };
    let tmp = crate::output::partial(dir).map_err(out_err)?;

    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut kinds = Vec::new();
    for (id, m) in weights.targets() {
        kinds.push(id.kind);
        let (r, in_f) = m.a.dims2().map_err(|e| file_err(dir, &crate::candle_message(&e)))?;
        let (_, out_f) = m.b_t.dims2().map_err(|e| file_err(dir, &crate::candle_message(&e)))?;
        let f32s = |t: &Tensor| -> Result<Vec<f32>, AdapterError> {
            t.to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| file_err(dir, &crate::candle_message(&e)))
        };
        let a = f32s(&m.a)?;
        let b_t = f32s(&m.b_t)?;
        let mut b = vec![0f32; out_f * r];
        for j in 0..r {
            for o in 0..out_f {
                b[o * r + j] = b_t[j * out_f + o];
            }
        }
        let (st_dtype, bytes): (safetensors::Dtype, Encoder) = match meta.dtype {
            DType::BF16 => {
                (safetensors::Dtype::BF16, |v| v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect())
            }
            DType::F16 => {
                (safetensors::Dtype::F16, |v| v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect())
            }
            _ => (safetensors::Dtype::F32, |v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        tensors.push((format!("base_model.model.{id}.lora_A.weight"), st_dtype, vec![r, in_f], bytes(&a)));
        tensors.push((format!("base_model.model.{id}.lora_B.weight"), st_dtype, vec![out_f, r], bytes(&b)));
    }
    let views = tensors
        .iter()
        .map(|(n, dtype, shape, data)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| file_err(dir, &e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut md = std::collections::HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    let st_path = tmp.path().join("adapter_model.safetensors");
    safetensors::serialize_to_file(views, Some(md), &st_path).map_err(|e| file_err(&st_path, &e))?;
    let cfg_path = tmp.path().join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config_json(meta, &kinds)).expect("JSON");
    std::fs::write(&cfg_path, text).map_err(|e| file_err(&cfg_path, &e))?;
    for (name, bytes) in side {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).map_err(|e| file_err(&p, &e))?;
    }
    crate::output::publish(tmp, dir).map(drop).map_err(out_err)
}
