//! The bitsandbytes 4-bit checkpoint layout, both ways: reading pre-quantized checkpoints written by
//! transformers + bitsandbytes, and writing that same layout (`server quantize`), so checkpoints move
//! freely between loraserve and the Python stack.
//!
//! Per quantized weight `W`: `W` (u8 `[ceil(n/2), 1]`, first element in the high nibble), `W.absmax`
//! (u8 codes with double quantization, else f32), `W.quant_map` (f32 `[16]`), with double quantization
//! `W.nested_absmax` (f32) and `W.nested_quant_map` (f32 `[256]`), and `W.quant_state.bitsandbytes__nf4`:
//! UTF-8 JSON bytes of the non-tensor state (`quant_type`, `blocksize`, `dtype`, `shape`, `nested_*`).

use safetensors::tensor::Dtype as StDtype;
use serde_json::{json, Value};

use super::nf4::{Absmax, DoubleQuant, Nf4Weight, BLOCK, NESTED_BLOCK};
use super::QuantError;
use crate::model::weights::{RawTensor, WeightSource};

const QS_NF4: &str = "quant_state.bitsandbytes__nf4";
const QS_FP4: &str = "quant_state.bitsandbytes__fp4";

fn err(file: &str, tensor: &str, reason: impl Into<String>) -> QuantError {
    QuantError::Checkpoint { file: file.to_string(), tensor: tensor.to_string(), reason: reason.into() }
}

/// A JSON value as an error shows it: its JSON text, or "nothing" when it is missing or null.
fn shown(v: Option<&Value>) -> String {
    v.map_or_else(|| "nothing".to_string(), Value::to_string)
}

/// Checks a `quantization_config` (as transformers writes it in `config.json`, the file `file`) describes NF4
/// weights.
pub fn check_quantization_config(q: &Value, file: &str) -> Result<(), QuantError> {
    let field = |k: &str| q.get(k).filter(|v| !v.is_null());
    let bad = |k: &str, why: String| QuantError::Layout(format!("{file}: quantization_config.{k}: {why}"));
    match field("quant_method").and_then(|v| v.as_str()) {
        Some("bitsandbytes") => {}
        _ => {
            let got = shown(field("quant_method"));
            return Err(bad("quant_method", format!("only \"bitsandbytes\" is supported, got {got}")));
        }
    }
    if field("load_in_8bit").and_then(|v| v.as_bool()) == Some(true) {
        return Err(bad("load_in_8bit", "8-bit checkpoints are not supported (NF4 only)".into()));
    }
    match field("bnb_4bit_quant_type").and_then(|v| v.as_str()) {
        Some("nf4") | None => {}
        Some(other) => return Err(bad("bnb_4bit_quant_type", format!("only \"nf4\" is supported, got \"{other}\""))),
    }
    match field("llm_int8_skip_modules") {
        None => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(other) => {
            return Err(bad("llm_int8_skip_modules", format!("expected a list of module names, got {other}")))
        }
    }
    Ok(())
}

/// The modules a pre-quantized checkpoint keeps dense: its `quantization_config`'s `llm_int8_skip_modules`
/// (checked by [`check_quantization_config`]; none when null, transformers then keeping only the output
/// head, which loraserve never quantizes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkipModules(Vec<String>);

impl SkipModules {
    /// The list in the `quantization_config` `q`.
    pub fn of(q: &Value) -> Self {
        let list = q.get("llm_int8_skip_modules").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        SkipModules(list.iter().filter_map(|m| Some(m.as_str()?.to_string())).collect())
    }

    /// Whether transformers keeps `module` (`model.layers.0.mlp.down_proj`) dense: the list names it, its
    /// last part (`down_proj`), or a module holding it (`mlp`, `model.layers.0`).
    pub fn keeps(&self, module: &str) -> bool {
        let last = module.rsplit('.').next().unwrap_or(module);
        self.0.iter().any(|k| k == module || k == last || module.contains(&format!("{k}.")))
    }
}

fn raw<'a>(src: &'a dyn WeightSource, name: &str, file_hint: &str) -> Result<RawTensor<'a>, QuantError> {
    src.raw(name).ok_or_else(|| err(file_hint, name, "missing (required by the bitsandbytes NF4 layout)"))
}

/// An f32 tensor of the quantization state (scales, code tables): every value finite, as a NaN or ∞ there
/// makes every output of the layer NaN at the first request.
fn f32s(t: &RawTensor, name: &str) -> Result<Vec<f32>, QuantError> {
    if t.dtype != StDtype::F32 {
        return Err(err(t.file, name, format!("dtype {:?}, expected F32", t.dtype)));
    }
    let v: Vec<f32> = t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(err(t.file, name, format!("non-finite value {} at element {i}", v[i]))),
        None => Ok(v),
    }
}

fn u8s(t: &RawTensor, name: &str) -> Result<Vec<u8>, QuantError> {
    if t.dtype != StDtype::U8 {
        return Err(err(t.file, name, format!("dtype {:?}, expected U8", t.dtype)));
    }
    Ok(t.data.to_vec())
}

/// Reads the NF4 weight `name` (e.g. `model.layers.0.mlp.up_proj.weight`) when the source stores it in the
/// bitsandbytes layout; `Ok(None)` when it is a plain dense tensor.
pub fn load_nf4(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Option<Nf4Weight>, QuantError> {
    let Some(weight) = src.raw(name) else {
        return Ok(None);
    };
    let file = weight.file.to_string();
    let qs_name = format!("{name}.{QS_NF4}");
    if src.contains(&format!("{name}.{QS_FP4}")) {
        return Err(err(&file, name, "quant_type fp4 is not supported (NF4 only)"));
    }
    if !src.contains(&qs_name) {
        if weight.dtype == StDtype::U8 {
            return Err(err(&file, name, format!("u8 weight without `{qs_name}` (missing quant_state)")));
        }
        return Ok(None);
    }
    let qs = raw(src, &qs_name, &file)?;
    if qs.dtype != StDtype::U8 {
        return Err(err(&file, &qs_name, format!("dtype {:?}, expected U8 (the state's JSON text)", qs.dtype)));
    }
    let state: Value =
        serde_json::from_slice(qs.data).map_err(|e| err(&file, &qs_name, format!("invalid JSON: {e}")))?;
    let get = |k: &str| state.get(k).filter(|v| !v.is_null());
    if get("quant_type").and_then(|v| v.as_str()) != Some("nf4") {
        return Err(err(&file, &qs_name, format!("quant_type {}, expected \"nf4\"", shown(get("quant_type")))));
    }
    if get("blocksize").and_then(|v| v.as_u64()) != Some(64) {
        return Err(err(&file, &qs_name, format!("blocksize {}, only 64 is supported", shown(get("blocksize")))));
    }
    let stored_shape: Option<Vec<usize>> = get("shape")
        .and_then(|v| v.as_array())
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
    if stored_shape.as_deref() != Some(shape) {
        return Err(err(&file, &qs_name, format!("shape {}, expected {shape:?}", shown(get("shape")))));
    }
    let packed = u8s(&weight, name)?;
    let code_name = format!("{name}.quant_map");
    let code_vec = f32s(&raw(src, &code_name, &file)?, &code_name)?;
    let code: [f32; 16] = code_vec
        .try_into()
        .map_err(|v: Vec<f32>| err(&file, &code_name, format!("{} entries, expected 16", v.len())))?;
    let absmax_name = format!("{name}.absmax");
    let absmax_raw = raw(src, &absmax_name, &file)?;
    let nested = src.contains(&format!("{name}.nested_absmax"));
    if !nested && absmax_raw.dtype == StDtype::U8 {
        // u8 absmax codes are double quantization's: their f32 scales are missing, not the codes wrong.
        let what = "missing (the u8 absmax is double-quantized: its scales are needed)";
        return Err(err(&file, &format!("{name}.nested_absmax"), what));
    }
    let absmax = if nested {
        if get("nested_blocksize").and_then(|v| v.as_u64()) != Some(NESTED_BLOCK as u64) {
            let got = shown(get("nested_blocksize"));
            return Err(err(&file, &qs_name, format!("nested_blocksize {got}, expected 256")));
        }
        let offset = get("nested_offset")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| err(&file, &qs_name, "missing nested_offset"))? as f32;
        if !offset.is_finite() {
            return Err(err(&file, &qs_name, format!("nested_offset {offset} is not a finite f32")));
        }
        let nested_name = format!("{name}.nested_absmax");
        let nested_absmax = f32s(&raw(src, &nested_name, &file)?, &nested_name)?;
        let map_name = format!("{name}.nested_quant_map");
        let map = f32s(&raw(src, &map_name, &file)?, &map_name)?;
        let nested_code: [f32; 256] = map
            .try_into()
            .map_err(|v: Vec<f32>| err(&file, &map_name, format!("{} entries, expected 256", v.len())))?;
        Absmax::Double(DoubleQuant {
            codes: u8s(&absmax_raw, &absmax_name)?,
            nested_absmax,
            nested_code: Box::new(nested_code),
            offset,
        })
    } else {
        Absmax::F32(f32s(&absmax_raw, &absmax_name)?)
    };
    Nf4Weight::from_parts(shape.to_vec(), packed, absmax, code).map(Some).map_err(|e| err(&file, name, e.to_string()))
}

/// An owned tensor to write: dtype, shape, little-endian bytes.
pub struct OwnedTensor {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors that store `w` under `name` in the bitsandbytes layout; `dtype_name` is the original weight
/// dtype as torch spells it (`float32`, `bfloat16`, `float16`).
pub fn nf4_tensors(name: &str, w: &Nf4Weight, dtype_name: &str) -> Vec<(String, OwnedTensor)> {
    let n = w.numel();
    let mut out = vec![
        (name.to_string(), OwnedTensor { dtype: StDtype::U8, shape: vec![n.div_ceil(2), 1], data: w.packed.clone() }),
        (format!("{name}.quant_map"), OwnedTensor { dtype: StDtype::F32, shape: vec![16], data: f32_bytes(&w.code) }),
    ];
    let mut state = json!({
        "quant_type": "nf4",
        "blocksize": BLOCK,
        "dtype": dtype_name,
        "shape": w.shape,
    });
    match &w.absmax {
        Absmax::F32(a) => out.push((
            format!("{name}.absmax"),
            OwnedTensor { dtype: StDtype::F32, shape: vec![a.len()], data: f32_bytes(a) },
        )),
        Absmax::Double(d) => {
            out.push((
                format!("{name}.absmax"),
                OwnedTensor { dtype: StDtype::U8, shape: vec![d.codes.len()], data: d.codes.clone() },
            ));
            out.push((
                format!("{name}.nested_absmax"),
                OwnedTensor {
                    dtype: StDtype::F32,
                    shape: vec![d.nested_absmax.len()],
                    data: f32_bytes(&d.nested_absmax),
                },
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                OwnedTensor { dtype: StDtype::F32, shape: vec![256], data: f32_bytes(&d.nested_code[..]) },
            ));
            let m = state.as_object_mut().expect("object");
            m.insert("nested_blocksize".into(), json!(NESTED_BLOCK));
            m.insert("nested_dtype".into(), json!("float32"));
            m.insert("nested_offset".into(), json!(d.offset as f64));
        }
    }
    // Python's json.dumps spacing, as bitsandbytes' pack_dict_to_tensor writes it.
    let text = python_json(&state);
    out.push((
        format!("{name}.{QS_NF4}"),
        OwnedTensor { dtype: StDtype::U8, shape: vec![text.len()], data: text.into_bytes() },
    ));
    out
}

/// `json.dumps` formatting (`", "` and `": "` separators) for a flat object of scalars and int lists.
fn python_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> =
                m.iter().map(|(k, v)| format!("{}: {}", Value::String(k.clone()), python_json(v))).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(python_json).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// The `quantization_config` transformers writes for a `BitsAndBytesConfig(load_in_4bit, nf4, double quant)`.
pub fn quantization_config(compute_dtype: &str) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_matches_bitsandbytes_spacing() {
        let v = json!({"quant_type": "nf4", "blocksize": 64, "shape": [48, 96], "nested_offset": 0.17736618220806122});
        let s = python_json(&v);
        assert!(s.contains("\"shape\": [48, 96]"), "{s}");
        assert!(s.contains("\"nested_offset\": 0.17736618220806122"), "{s}");
    }

    /// transformers' matching: the module's full name, its last part, or a module holding it.
    #[test]
    fn skip_modules_match_as_transformers_matches_them() {
        let skip = SkipModules::of(&json!({"llm_int8_skip_modules": ["down_proj", "model.layers.1", "lm_head"]}));
        assert!(skip.keeps("model.layers.0.mlp.down_proj"));
        assert!(skip.keeps("model.layers.1.self_attn.q_proj"));
        assert!(!skip.keeps("model.layers.11.self_attn.q_proj"), "layers.1 is not layers.11");
        assert!(!skip.keeps("model.layers.0.mlp.up_proj"));
        assert_eq!(SkipModules::of(&json!({"llm_int8_skip_modules": null})), SkipModules::default());
        let q = json!({"quant_method": "bitsandbytes", "llm_int8_skip_modules": "lm_head"});
        let e = check_quantization_config(&q, "c.json").unwrap_err().to_string();
        assert_eq!(
            e,
            "c.json: quantization_config.llm_int8_skip_modules: expected a list of module names, got \"lm_head\""
        );
    }

    #[test]
    fn refuses_non_nf4_configs() {
        let mut q = quantization_config("float32");
        assert!(check_quantization_config(&q, "m/config.json").is_ok());
        q["bnb_4bit_quant_type"] = json!("fp4");
        let e = check_quantization_config(&q, "m/config.json").unwrap_err().to_string();
        assert!(e.contains("bnb_4bit_quant_type"), "{e}");
        let e = check_quantization_config(&json!({"quant_method": "gptq"}), "m/config.json").unwrap_err().to_string();
        assert_eq!(
            e,
            "m/config.json: quantization_config.quant_method: only \"bitsandbytes\" is supported, got \"gptq\""
        );
    }
}
