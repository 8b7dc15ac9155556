//! PEFT adapters: `adapter_config.json` + `adapter_model.safetensors` → [`LoraWeights`], validated against the
//! base model.
//!
//! Target matching follows PEFT exactly (`check_target_module_exists`, `get_pattern_key`): a list of names
//! matches a module whose name equals or ends with `.name`; a string is a regex that must match the whole
//! module name; `"all-linear"` means every linear layer but the LM head; `exclude_modules`,
//! `layers_to_transform` / `layers_pattern` narrow that; `rank_pattern` / `alpha_pattern` keys are regexes
//! matched as `(.*\.)?(key)$`, first key in file order wins. Patterns use Python `re` syntax, so they are
//! compiled with `fancy-regex`.
//!
//! Anything loraserve would have to silently ignore is refused instead, with an error naming the key or the
//! tensor: DoRA and the other variants with a forward of their own (QALoRA, BD-LoRA, MonteCLoRA, Arrow, KaSA),
//! `modules_to_save`, LoRA biases, initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ,
//! LoRA-GA), embedding and head LoRA, tensors for modules the base lacks or the config does not target,
//! targeted modules without tensors, shapes that disagree with the base or the configured rank, NaN/Inf.
//! VeLoRA is served: only its backward differs (its forward is `lora_A` then `lora_B`, PEFT's
//! `VeloraLinearVariant.forward` in eval mode), so its projections (`lora_velora_embed`) are checked, not used.
//!
//! `config` reads `adapter_config.json`; [`write`] writes adapters in the same format (`server train`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{LinearId, LoraModule, LoraWeights, ModuleKind};

mod config;
mod write;
use config::cfg_err;
pub use config::{AdapterConfig, ModuleSelector};
pub use write::{config_json, write_dir, write_dir_with, AdapterMeta};

/// Errors loading an adapter. Every message names the file and the key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    /// The file could not be read (an I/O error, or it changed while being read): maybe passing, so never
    /// remembered as the adapter's verdict, and UNAVAILABLE to clients (retry).
    #[error("{file}: {reason}")]
    Read { file: String, reason: String },
    #[error("{file}: `{key}`: {reason}")]
    Config { file: String, key: String, reason: String },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Tensor { file: String, tensor: String, reason: String },
}

impl AdapterError {
    /// A failed read of `file`: what the operator must fix (permissions, not UTF-8, a folder) is `File`,
    /// anything else (EIO, EMFILE, a stale NFS handle, a file renamed away or changed mid-read) `Read`.
    fn from_io(file: &str, e: std::io::Error) -> Self {
        use std::io::ErrorKind::{InvalidData, InvalidInput, IsADirectory, PermissionDenied};
        let (file, reason) = (file.to_string(), e.to_string());
        match e.kind() {
            PermissionDenied | InvalidData | InvalidInput | IsADirectory => AdapterError::File { file, reason },
            _ => AdapterError::Read { file, reason },
        }
    }
}

/// The shape of the base model as adapters see it: how many decoder layers, and each projection's
/// `(in_features, out_features)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseLayout {
    pub layers: usize,
    /// Indexed by `ModuleKind as usize`.
    pub dims: [(usize, usize); 7],
}

impl BaseLayout {
    pub fn dims(&self, kind: ModuleKind) -> (usize, usize) {
        self.dims[kind as usize]
    }

    /// Every linear layer of the base, in order.
    pub fn linears(&self) -> impl Iterator<Item = LinearId> + '_ {
        (0..self.layers).flat_map(|l| ModuleKind::ALL.into_iter().map(move |k| LinearId::new(l, k)))
    }
}

/// A loaded adapter: its config and weights.
#[derive(Clone, Debug)]
pub struct LoadedAdapter {
    pub config: AdapterConfig,
    pub weights: LoraWeights,
}

/// Loads the adapter in `dir` for a base of shape `layout`; weights end up as f32 on `device`.
pub fn load_dir(dir: &Path, layout: &BaseLayout, device: &Device) -> Result<LoadedAdapter, AdapterError> {
    load_dir_with(dir, layout, device, false)
}

/// [`load_dir`] with the tensors converted on all cores (rayon's pool): for a server whose base runs on a
/// GPU, where the CPU is otherwise idle and a cold load waits on this conversion. A CPU server keeps the
/// sequential load, which leaves the other cores to the running batch.
pub fn load_dir_parallel(dir: &Path, layout: &BaseLayout, device: &Device) -> Result<LoadedAdapter, AdapterError> {
    load_dir_with(dir, layout, device, true)
}

fn load_dir_with(
    dir: &Path,
    layout: &BaseLayout,
    device: &Device,
    parallel: bool,
) -> Result<LoadedAdapter, AdapterError> {
    if dir.is_file() {
        let reason = "is a file: an adapter is the folder holding adapter_config.json and adapter_model.safetensors";
        return Err(AdapterError::File { file: dir.display().to_string(), reason: reason.into() });
    }
    let cfg_path = dir.join("adapter_config.json");
    let cfg_file = cfg_path.display().to_string();
    let text = crate::input::read_to_string(&cfg_path).map_err(|e| AdapterError::from_io(&cfg_file, e))?;
    let config = AdapterConfig::parse(&text, &cfg_file)?;
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.is_file() {
        let bin = dir.join("adapter_model.bin");
        return Err(AdapterError::File {
            file: if bin.is_file() { bin.display().to_string() } else { st_path.display().to_string() },
            reason: if bin.is_file() {
                "PyTorch pickle adapters are not supported: save the adapter with safetensors (adapter_model.safetensors)".into()
            } else {
                "missing (adapter weights must be in adapter_model.safetensors)".into()
            },
        });
    }
    check_length(&st_path, &st_path.display().to_string())?;
    let bytes = super::file::read_whole(&st_path, parallel)
        .map_err(|e| AdapterError::from_io(&st_path.display().to_string(), e))?;
    let weights = load_weights(&config, &bytes, &st_path.display().to_string(), &cfg_file, layout, device, parallel)?;
    Ok(LoadedAdapter { config, weights })
}

/// Checks, from its header alone, that a safetensors file is as long as the header says, before the whole file
/// is read into memory: one extended past its tensors (a sparse 3 GB `truncate -s`) cost its size in memory,
/// and seconds, before the format check refused it.
fn check_length(path: &Path, file: &str) -> Result<(), AdapterError> {
    use std::io::Read;
    let bad = |reason: String| AdapterError::File {
        file: file.to_string(),
        reason: format!("not a valid safetensors file: {reason}"),
    };
    let mut f = std::fs::File::open(path).map_err(|e| AdapterError::from_io(file, e))?;
    let len = f.metadata().map_err(|e| AdapterError::from_io(file, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad(format!("{len} bytes, shorter than the header's length")))?;
    let n = u64::from_le_bytes(n);
    // The safetensors crate's own limit on the header.
    if n > 100_000_000 || n.saturating_add(8) > len {
        return Err(bad(format!("a header of {n} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| AdapterError::from_io(file, e))?;
    // The header as the safetensors crate reads it (tensors in offset order): where the last one ends.
    let header: safetensors::tensor::Metadata = serde_json::from_slice(&header).map_err(|e| {
        // serde keeps only the crate's text, which for sizes does not name the tensor.
        bad(format!("its header: {}", crate::model::weights::header_fault(&header).unwrap_or_else(|| e.to_string())))
    })?;
    let described = (header.data_len() as u64).saturating_add(8 + n);
    if described != len {
        return Err(bad(format!("the file is {len} bytes, but its header describes {described}")));
    }
    Ok(())
}

/// Builds the weights from `adapter_model.safetensors` bytes, checking them against config and base; the
/// tensors converted on rayon's pool when `parallel`.
fn load_weights(
    config: &AdapterConfig,
    bytes: &[u8],
    file: &str,
    cfg_file: &str,
    layout: &BaseLayout,
    device: &Device,
    parallel: bool,
) -> Result<LoraWeights, AdapterError> {
    let tensor_err = |tensor: &str, reason: String| AdapterError::Tensor {
        file: file.to_string(),
        tensor: tensor.to_string(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| AdapterError::File {
        file: file.to_string(),
        reason: format!("not a valid safetensors file: {}", crate::model::weights::describe_error(bytes, &e)),
    })?;
    let matcher = config.matcher(cfg_file)?;
    let modules: Vec<String> = layout.linears().map(|id| id.module_path()).collect();
    matcher.check_keys(config, modules.iter().map(String::as_str), cfg_file)?;
    // module key → (A tensor name, B tensor name)
    let mut pairs: BTreeMap<LinearId, (Option<String>, Option<String>)> = BTreeMap::new();
    let mut embeds: Vec<(LinearId, &String)> = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    // Embedding and head LoRA first: their files also hold `…base_layer.weight` copies, which sort earlier and
    // would be refused as "not a LoRA weight" without saying what the adapter is.
    if let Some(name) = names.iter().find(|n| n.contains("lora_embedding_") || n.contains(".embed_tokens.lora_")) {
        return Err(tensor_err(name, "embedding LoRA (embed_tokens) is not supported".into()));
    }
    if let Some(name) = names.iter().find(|n| n.contains(".lm_head.lora_")) {
        return Err(tensor_err(name, "LoRA on lm_head is not supported".into()));
    }
    for name in &names {
        let (module, which) = parse_tensor_name(name).map_err(|reason| tensor_err(name, reason))?;
        let id = module_id(module, layout)
            .ok_or_else(|| tensor_err(name, format!("module `{module}` is not a linear layer of the base model")))?;
        if !matcher.targets(config, module) {
            return Err(tensor_err(name, format!("module `{module}` is not targeted by adapter_config.json")));
        }
        if which == 'V' {
            check_velora_embed(config, &st, name, layout.dims(id.kind).0).map_err(|reason| tensor_err(name, reason))?;
            embeds.push((id, name));
            continue;
        }
        let slot = pairs.entry(id).or_default();
        let slot = if which == 'A' { &mut slot.0 } else { &mut slot.1 };
        if let Some(first) = slot {
            return Err(tensor_err(name, format!("names the same weight of `{id}` as `{first}`")));
        }
        *slot = Some(name.clone());
    }
    if let Some((_, name)) = embeds.iter().find(|(id, _)| !pairs.contains_key(id)) {
        return Err(tensor_err(name, "a VeLoRA projection for a module without LoRA weights".into()));
    }
    // Shapes first (headers only): an adapter for another base usually has both wrong shapes and a different
    // layer count, and the shapes say what is wrong.
    for (id, (a_name, b_name)) in &pairs {
        let (r, scale) = config.rank_and_scale(&matcher, &id.module_path());
        if !scale.is_finite() {
            // α itself is finite (checked when parsed), but α/r or α/√r does not fit the f32 the kernels use.
            let reason = format!(
                "the scale of {} ({scale}) is not a finite f32 (lora_alpha, or its alpha_pattern entry, is too large)",
                id.module_path()
            );
            return Err(cfg_err(cfg_file, "lora_alpha", reason));
        }
        let (in_f, out_f) = layout.dims(id.kind);
        for (name, want) in [(a_name, [r, in_f]), (b_name, [out_f, r])] {
            let Some(name) = name else { continue };
            let got = st.tensor(name).map_err(|e| tensor_err(name, e.to_string()))?.shape().to_vec();
            if got != want {
                return Err(tensor_err(
                    name,
                    format!(
                        "shape {got:?}, expected {want:?} (rank and base dimensions: is the adapter for this base?)"
                    ),
                ));
            }
        }
    }
    // An adapter that adapts nothing would be served as the base model under its name: PEFT refuses it too
    // (`target_modules` naming no module, or one that is no linear layer such as `self_attn`).
    if !layout.linears().any(|id| matcher.targets(config, &id.module_path())) {
        let reason = "matches no linear layer of this base (its q/k/v/o/gate/up/down_proj, after layers_to_transform \
                      and exclude_modules): the adapter would change nothing (PEFT refuses it too)";
        return Err(cfg_err(cfg_file, "target_modules", reason));
    }
    for id in layout.linears() {
        if matcher.targets(config, &id.module_path()) && !pairs.contains_key(&id) {
            return Err(AdapterError::Tensor {
                file: file.to_string(),
                tensor: format!("base_model.model.{id}.lora_A.weight"),
                reason: format!("adapter_config.json targets `{id}` but the file has no LoRA weights for it"),
            });
        }
    }
    let module = |(id, (a_name, b_name)): (LinearId, (Option<String>, Option<String>))| {
        let key = id.module_path();
        let a_name = a_name.ok_or_else(|| {
            tensor_err(&format!("base_model.model.{key}.lora_A.weight"), "missing (lora_B is present)".into())
        })?;
        let b_name = b_name.ok_or_else(|| {
            tensor_err(&format!("base_model.model.{key}.lora_B.weight"), "missing (lora_A is present)".into())
        })?;
        let (r, scale) = config.rank_and_scale(&matcher, &key);
        let (in_f, out_f) = layout.dims(id.kind);
        let a = read_f32(&st, &a_name, [r, in_f], false).map_err(|reason| tensor_err(&a_name, reason))?;
        // B stored transposed ([r, out]) for the expand step, transposed as it is widened.
        let b_t = read_f32(&st, &b_name, [out_f, r], true).map_err(|reason| tensor_err(&b_name, reason))?;
        let to_tensor = |v: Vec<f32>, shape: (usize, usize)| {
            Tensor::from_vec(v, shape, device).map_err(|e| tensor_err(&key, crate::candle_message(&e)))
        };
        Ok((id, LoraModule { a: to_tensor(a, (r, in_f))?, b_t: to_tensor(b_t, (r, out_f))?, scale }))
    };
    // In module order either way, so the first bad tensor reported is the same.
    let modules: Vec<Result<(LinearId, LoraModule), AdapterError>> = if parallel {
        use rayon::prelude::*;
        pairs.into_par_iter().map(module).collect()
    } else {
        pairs.into_iter().map(module).collect()
    };
    let mut weights = LoraWeights::new(layout.layers);
    for m in modules {
        let (id, module) = m?;
        weights.insert(id, module);
    }
    Ok(weights)
}

/// VeLoRA's projection of a module with `in_features` inputs: used by its backward only, so checked and left:
/// allowed with `velora_config` alone, one value per group, `ceil(in_features / num_groups)` long.
fn check_velora_embed(
    config: &AdapterConfig,
    st: &safetensors::SafeTensors,
    name: &str,
    in_f: usize,
) -> Result<(), String> {
    let groups = config.velora_groups.ok_or("a VeLoRA projection, but adapter_config.json has no velora_config")?;
    let view = st.tensor(name).map_err(|e| e.to_string())?;
    let got = view.shape().to_vec();
    let want = [in_f.div_ceil(groups)];
    if got != want {
        return Err(format!("shape {got:?}, expected {want:?} (velora_config.num_groups {groups}, {in_f} inputs)"));
    }
    // Unread, but PEFT loads it into a float parameter: an integer or boolean projection is not VeLoRA's.
    use safetensors::Dtype::{BF16, F16, F32};
    match view.dtype() {
        F32 | F16 | BF16 => Ok(()),
        other => Err(format!("unsupported dtype {other:?} (expected F32, F16 or BF16)")),
    }
}

/// `base_model.model.<module>.lora_{A,B}.weight` → (module, 'A' | 'B'), `….lora_velora_embed` → (module,
/// 'V'); anything else is refused.
fn parse_tensor_name(name: &str) -> Result<(&str, char), String> {
    if name.contains("lora_magnitude_vector") {
        return Err("DoRA magnitude vectors are not supported".into());
    }
    let rest = name
        .strip_prefix("base_model.model.")
        .ok_or_else(|| "expected a name of the form base_model.model.<module>.lora_A.weight".to_string())?;
    if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        Ok((m, 'A'))
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        Ok((m, 'B'))
    } else if let Some(m) = rest.strip_suffix(".lora_velora_embed") {
        Ok((m, 'V'))
    } else if rest.ends_with(".lora_B.bias") {
        Err("LoRA biases are not supported".into())
    } else {
        Err("not a LoRA weight (expected .lora_A.weight or .lora_B.weight)".into())
    }
}

/// `model.layers.<l>.<parent>.<kind>` → its [`LinearId`] if the base has it.
fn module_id(module: &str, layout: &BaseLayout) -> Option<LinearId> {
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    // Digits as Python writes an index: `00` or `+0` is no layer (Rust's parse would take both as 0, and the
    // tensor would replace layer 0's).
    let canonical = layer == "0" || (!layer.starts_with('0') && layer.bytes().all(|b| b.is_ascii_digit()));
    let layer: usize = layer.parse().ok().filter(|_| canonical)?;
    let (parent, kind) = rest.split_once('.')?;
    let kind = ModuleKind::from_name(kind)?;
    (layer < layout.layers && parent == kind.parent()).then_some(LinearId::new(layer, kind))
}

/// A `[rows, cols]` tensor as f32 straight from its little-endian bytes, transposed to `[cols, rows]` when
/// `transpose`: one pass that widens, checks finiteness and places each element. `load_weights` has checked
/// the shape against the config and the base already.
fn read_f32(st: &safetensors::SafeTensors, name: &str, shape: [usize; 2], transpose: bool) -> Result<Vec<f32>, String> {
    let view = st.tensor(name).map_err(|e| e.to_string())?;
    debug_assert_eq!(view.shape(), shape, "{name}: shapes are checked before any tensor is read");
    let mut v = vec![0f32; shape[0] * shape[1]];
    // Every value is checked once widened: an exponent of all ones is Inf or NaN.
    let f32_bits = |b: &[u8]| f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let bf16_bits = |b: &[u8]| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    let f16_bits = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let special = match view.dtype() {
        safetensors::Dtype::F32 => widen(view.data(), 4, shape, transpose, &mut v, f32_bits),
        safetensors::Dtype::BF16 => widen(view.data(), 2, shape, transpose, &mut v, bf16_bits),
        safetensors::Dtype::F16 => widen(view.data(), 2, shape, transpose, &mut v, f16_bits),
        other => return Err(format!("unsupported dtype {other:?} (expected F32, F16 or BF16)")),
    };
    if special {
        let i = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
        let (r, c) = if transpose { (i % shape[0], i / shape[0]) } else { (i / shape[1], i % shape[1]) };
        return Err(format!("non-finite value {} at element {}", v[i], r * shape[1] + c));
    }
    Ok(v)
}

/// Widens `data` (`size`-byte elements, `[rows, cols]`) into `out`, transposed when asked; whether any value
/// is Inf or NaN. Monomorphized per dtype, so each loop vectorizes.
fn widen(
    data: &[u8],
    size: usize,
    [rows, cols]: [usize; 2],
    transpose: bool,
    out: &mut [f32],
    from: impl Fn(&[u8]) -> f32,
) -> bool {
    let mut any = false;
    let mut put = |o: &mut f32, b: &[u8]| {
        let x = from(b);
        any |= (x.to_bits() & 0x7f80_0000) == 0x7f80_0000;
        *o = x;
    };
    if transpose {
        // Row `r` of the source is column `r` of the output. In blocks of source rows: widen a block
        // contiguously (vectorizes), then write each of its columns as one contiguous run of the output.
        const BLOCK: usize = 64;
        let mut block = vec![0f32; BLOCK * cols];
        for (bi, src) in data.chunks(BLOCK * cols * size).enumerate() {
            let n = src.len() / (cols * size);
            for (o, b) in block.iter_mut().zip(src.chunks_exact(size)) {
                put(o, b);
            }
            for c in 0..cols {
                let dst = &mut out[c * rows + bi * BLOCK..][..n];
                for (k, d) in dst.iter_mut().enumerate() {
                    *d = block[k * cols + c];
                }
            }
        }
    } else {
        for (o, b) in out.iter_mut().zip(data.chunks_exact(size)) {
            put(o, b);
        }
    }
    any
}
