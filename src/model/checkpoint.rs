//! Writing a model as a Hugging Face checkpoint folder: `config.json`, `model.safetensors` and the tokenizer
//! files. Decoder linear weights are written as they are held — NF4 in the bitsandbytes layout (with
//! `quantization_config`, as transformers writes it; `server quantize`) or dense (`server merge`).
//!
//! The folder is assembled under a temporary name beside the destination and renamed into place at the end,
//! so a reader never sees half a checkpoint and a failure leaves nothing behind.

use std::path::Path;

use candle_core::{DType, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::Value;

use super::linear::BaseWeight;
use super::{Model, ModelError};
use crate::quant::bnb::{self, OwnedTensor};

/// Tokenizer and generation files to copy into a written checkpoint: (file name, contents).
pub type SideFiles = Vec<(String, Vec<u8>)>;

/// The tokenizer and generation files of a model folder that a written checkpoint carries over, when present:
/// what transformers' tokenizers save (the chat template in its own file since transformers 5; the
/// SentencePiece model and added tokens of slow tokenizers) and the generation config.
pub const SIDE_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
];

/// The side files of a model folder ([`SIDE_FILES`] that exist, and `additional_chat_templates/*.jinja`).
pub fn side_files_of_dir(dir: &Path) -> Result<SideFiles, ModelError> {
    let mut out = Vec::new();
    for name in SIDE_FILES {
        let p = dir.join(name);
        if p.is_file() {
            let bytes = std::fs::read(&p).map_err(|e| ModelError::Invalid(format!("{}: {e}", p.display())))?;
            out.push((name.to_string(), bytes));
        }
    }
    // transformers 5's named chat templates.
    let extra = dir.join("additional_chat_templates");
    if let Ok(entries) = std::fs::read_dir(&extra) {
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().filter(|n| n.ends_with(".jinja")).map(str::to_string))
            .collect();
        names.sort();
        for name in names {
            let p = extra.join(&name);
            let bytes = crate::input::read(&p).map_err(|e| ModelError::Invalid(format!("{}: {e}", p.display())))?;
            out.push((format!("additional_chat_templates/{name}"), bytes));
        }
    }
    Ok(out)
}

fn dtype_names(dtype: DType) -> (StDtype, &'static str) {
    match dtype {
        DType::BF16 => (StDtype::BF16, "bfloat16"),
        DType::F16 => (StDtype::F16, "float16"),
        _ => (StDtype::F32, "float32"),
    }
}

fn tensor_bytes(t: &Tensor) -> Result<OwnedTensor, ModelError> {
    let (st, _) = dtype_names(t.dtype());
    let t = t.to_device(&candle_core::Device::Cpu)?.contiguous()?;
    let data: Vec<u8> = match t.dtype() {
        DType::BF16 => t.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    Ok(OwnedTensor { dtype: st, shape: t.dims().to_vec(), data })
}

/// Writes `model` to `out` (which must not exist). Dense linear weights may be replaced through `dense_override`
/// (merge passes `W + scale·B·A` there).
pub fn write(
    model: &Model,
    side_files: &SideFiles,
    out: &Path,
    dense_override: &dyn Fn(&super::Linear) -> Result<Option<Tensor>, ModelError>,
) -> Result<(), ModelError> {
    let tmp = crate::output::partial(out).map_err(|e| ModelError::Invalid(e.to_string()))?;

    let (_, compute_name) = dtype_names(model.dtype());
    let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
    let mut any_nf4 = false;
    for (name, t) in model.other_tensors()? {
        tensors.push((name, tensor_bytes(&t)?));
    }
    for lin in model.linears() {
        let prefix = lin.id.module_path();
        let weight_name = format!("{prefix}.weight");
        match (&lin.base, dense_override(lin)?) {
            (_, Some(dense)) => tensors.push((weight_name, tensor_bytes(&dense)?)),
            (BaseWeight::Dense(w), None) => tensors.push((weight_name, tensor_bytes(w)?)),
            (base, None) => {
                let w = base.nf4_host()?.expect("a weight that is not dense is NF4");
                any_nf4 = true;
                tensors.extend(bnb::nf4_tensors(&weight_name, &w, compute_name));
            }
        }
        if let Some(b) = &lin.bias {
            tensors.push((format!("{prefix}.bias"), tensor_bytes(b)?));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data)
                    .map_err(|e| ModelError::Invalid(format!("{n}: {e}")))?,
            ))
        })
        .collect::<Result<_, ModelError>>()?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let st_path = tmp.path().join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &st_path)
        .map_err(|e| ModelError::Invalid(format!("{}: {e}", st_path.display())))?;

    let mut config = model.config().raw.clone();
    // A pre-quantized source's dense layers stay dense (`Linear::load`): its skip list goes with them, so that
    // transformers keeps them dense too.
    let skip =
        config.remove("quantization_config").and_then(|mut q| q.get_mut("llm_int8_skip_modules").map(Value::take));
    if any_nf4 {
        let mut q = bnb::quantization_config(compute_name);
        if let Some(skip) = skip.filter(|s| !s.is_null()) {
            q["llm_int8_skip_modules"] = skip;
        }
        config.insert("quantization_config".into(), q);
    }
    // transformers 5 reads `dtype` (writing only that); 4.x reads `torch_dtype`: both say what was written.
    for key in ["dtype", "torch_dtype"] {
        config.insert(key.into(), Value::String(compute_name.into()));
    }
    let config_text = serde_json::to_string_pretty(&Value::Object(config)).expect("JSON");
    let write_file = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ModelError::Invalid(format!("{}: {e}", parent.display())))?;
        }
        std::fs::write(&p, bytes).map_err(|e| ModelError::Invalid(format!("{}: {e}", p.display())))
    };
    write_file("config.json", config_text.as_bytes())?;
    for (name, bytes) in side_files {
        write_file(name, bytes)?;
    }
    crate::output::publish(tmp, out).map(drop).map_err(|e| ModelError::Invalid(e.to_string()))
}
