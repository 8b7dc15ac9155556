//! Reading weights by their Hugging Face names: memory-mapped safetensors files (one `model.safetensors` or the
//! shards listed in `model.safetensors.index.json`), plus the [`WeightSource`] trait through which the model is
//! built from disk, from the embedded demo generator, or from a synthetic benchmark shape alike.
//!
//! Every failure names the file and the tensor: a malformed model folder is a one-line error, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensorError::{InvalidOffset, MisalignedSlice, TensorInvalidInfo, ValidationOverflow};
use safetensors::SafeTensors;

/// Errors while reading weights; each carries the file (or source) and the tensor it is about.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Tensor { file: String, tensor: String, reason: String },
    #[error("{source_name}: tensor `{tensor}` not found")]
    Missing { source_name: String, tensor: String },
}

impl WeightsError {
    pub fn tensor(file: impl Into<String>, tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        WeightsError::Tensor { file: file.into(), tensor: tensor.into(), reason: reason.into() }
    }
}

/// A tensor's raw bytes as stored on disk (used for the bitsandbytes NF4 layout, whose codes are `U8`).
pub struct RawTensor<'a> {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
    /// The file the tensor came from, for error messages.
    pub file: &'a str,
}

/// Where the model's weights come from. Names are Hugging Face parameter names (`model.layers.0.mlp.up_proj.weight`).
pub trait WeightSource {
    /// A short description for errors (`/models/llama/model.safetensors`, `demo`).
    fn describe(&self) -> String;
    /// Whether a tensor of this name exists.
    fn contains(&self, name: &str) -> bool;
    /// A floating-point tensor of exactly `shape`, converted to `dtype` on `device`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, WeightsError>;
    /// Raw bytes of a stored tensor, when the source has a file layout (pre-quantized checkpoints).
    fn raw(&self, _name: &str) -> Option<RawTensor<'_>> {
        None
    }
    /// The floating-point dtype a tensor is stored in, when known.
    fn stored_dtype(&self, name: &str) -> Option<DType> {
        DType::try_from(self.raw(name)?.dtype).ok().filter(|d| d.is_float())
    }
}

struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range within the file's mmap.
    start: usize,
    end: usize,
}

/// Memory-mapped safetensors files of one checkpoint, indexed by tensor name.
pub struct SafetensorsFiles {
    files: Vec<(String, Mmap)>,
    entries: HashMap<String, Entry>,
    describe: String,
}

impl SafetensorsFiles {
    /// Opens `model.safetensors`, or, without one, the shards of `model.safetensors.index.json` in `dir`:
    /// transformers' order (a folder saved as one file after it held shards keeps the stale index).
    pub fn open_dir(dir: &Path) -> Result<Self, WeightsError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if !single.is_file() && index.is_file() {
            let text = crate::input::read_to_string(&index).map_err(|e| file_err(&index, e.to_string()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| file_err(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| file_err(&index, "missing object `weight_map`"))?;
            // A set: an index of many distinct names is read in n·log n, not n².
            let mut shards = std::collections::BTreeSet::new();
            for (tensor, shard) in map {
                let shard = shard
                    .as_str()
                    .filter(|s| !s.is_empty() && *s != ".")
                    .ok_or_else(|| file_err(&index, format!("weight_map[{tensor}] is not a file name")))?;
                if shard.contains('/') || shard.contains('\\') || shard == ".." {
                    return Err(file_err(&index, format!("weight_map[{tensor}] = `{shard}` leaves the model folder")));
                }
                shards.insert(shard);
            }
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            let files = Self::open_files(&paths)?;
            // Every tensor the index names must be in the shard it names.
            for (tensor, shard) in map {
                let shard = shard.as_str().unwrap_or_default();
                match files.entries.get(tensor) {
                    Some(e) if files.files[e.file].0.ends_with(shard) => {}
                    Some(_) => {
                        return Err(file_err(
                            &index,
                            format!("tensor `{tensor}` is not in `{shard}` as the index says"),
                        ))
                    }
                    None => {
                        return Err(file_err(
                            &index,
                            format!("tensor `{tensor}` listed for `{shard}` is missing from it"),
                        ))
                    }
                }
            }
            Ok(Self { describe: index.display().to_string(), ..files })
        } else if single.is_file() {
            Self::open_files(&[single])
        } else {
            Err(WeightsError::File {
                file: dir.display().to_string(),
                reason: "no model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not supported: convert them to safetensors)".into(),
            })
        }
    }

    /// Opens the given safetensors files as one checkpoint (tensor names must be unique across them).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, WeightsError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = crate::input::open(path).map_err(|e| file_err(path, e.to_string()))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while it is mapped is outside what we
            // promise (the same contract as every mmap-based loader, candle's and safetensors' included).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| file_err(path, e.to_string()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| file_err(path, format!("not a valid safetensors file: {}", describe_error(&mmap, &e))))?;
            let base = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (s, e) = info.data_offsets;
                let entry =
                    Entry { file: i, dtype: info.dtype, shape: info.shape.clone(), start: base + s, end: base + e };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(file_err(path, format!("tensor `{name}` appears in more than one file")));
                }
            }
            files.push((path.display().to_string(), mmap));
        }
        let describe = paths.first().map(|p| p.display().to_string()).unwrap_or_else(|| "<no files>".to_string());
        Ok(Self { files, entries, describe })
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    fn view(&self, name: &str) -> Result<(TensorView<'_>, &str), WeightsError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| WeightsError::Missing { source_name: self.describe.clone(), tensor: name.to_string() })?;
        let (file, mmap) = &self.files[e.file];
        let view = TensorView::new(e.dtype, e.shape.clone(), &mmap[e.start..e.end])
            .map_err(|err| WeightsError::tensor(file.as_str(), name, err.to_string()))?;
        Ok((view, file.as_str()))
    }
}

impl WeightSource for SafetensorsFiles {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, WeightsError> {
        let (view, file) = self.view(name)?;
        if view.shape() != shape {
            return Err(WeightsError::tensor(file, name, format!("shape {:?}, expected {:?}", view.shape(), shape)));
        }
        match view.dtype() {
            StDtype::F32 | StDtype::F16 | StDtype::BF16 => {}
            other => {
                return Err(WeightsError::tensor(
                    file,
                    name,
                    format!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
                ))
            }
        }
        view.load(device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| WeightsError::tensor(file, name, crate::candle_message(&e)))
    }

    fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let e = self.entries.get(name)?;
        let (file, mmap) = &self.files[e.file];
        Some(RawTensor { dtype: e.dtype, shape: e.shape.clone(), data: &mmap[e.start..e.end], file: file.as_str() })
    }
}

/// A source that records which tensors a load read, so that tensors it left unused can be reported (a
/// checkpoint with layers or modules its config does not describe is not the model the config says).
pub struct Tracked<'a> {
    inner: &'a SafetensorsFiles,
    read: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl<'a> Tracked<'a> {
    pub fn new(inner: &'a SafetensorsFiles) -> Self {
        Tracked { inner, read: Default::default() }
    }

    /// Refuses the first tensor (in name order) that no load read, unless `ignored` says the model has no use
    /// for it by design (as transformers and vLLM skip it too).
    pub fn check_all_read(&self, ignored: impl Fn(&str) -> bool) -> Result<(), WeightsError> {
        let read = self.read.borrow();
        let mut unused: Vec<&str> = self.inner.names().filter(|n| !read.contains(*n) && !ignored(n)).collect();
        unused.sort_unstable();
        match unused.first() {
            None => Ok(()),
            Some(name) => {
                let file = self.inner.raw(name).map_or_else(|| self.inner.describe(), |r| r.file.to_string());
                let more = match unused.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                };
                Err(WeightsError::tensor(
                    file,
                    *name,
                    format!(
                        "not a parameter of the model config.json describes{more}: is the config for these weights?"
                    ),
                ))
            }
        }
    }
}

impl WeightSource for Tracked<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, WeightsError> {
        self.read.borrow_mut().insert(name.to_string());
        self.inner.tensor(name, shape, dtype, device)
    }

    fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        self.read.borrow_mut().insert(name.to_string());
        self.inner.raw(name)
    }
}

fn file_err(path: &Path, reason: impl Into<String>) -> WeightsError {
    WeightsError::File { file: path.display().to_string(), reason: reason.into() }
}

/// The safetensors crate's `e` for the file `file`, with the tensor named where its checks of the tensor table
/// leave the name out (sizes against shapes) or say too little (offsets): [`header_fault`].
pub fn describe_error(file: &[u8], e: &safetensors::SafeTensorError) -> String {
    let named = match e {
        InvalidOffset(_) | TensorInvalidInfo | ValidationOverflow | MisalignedSlice => {
            header_json(file).and_then(header_fault)
        }
        _ => None,
    };
    named.unwrap_or_else(|| e.to_string())
}

/// The JSON header of a safetensors file, from its first bytes (None when they are too short to hold it).
fn header_json(file: &[u8]) -> Option<&[u8]> {
    let n = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    file.get(8..)?.get(..n)
}

/// The first fault the safetensors crate finds in a header's tensor table, with the tensor's name, which its
/// errors for sizes leave out ("invalid shape, data type, or offset for tensor"): its checks in its order
/// (tensors sorted by their offsets, each starting where the one before ends, its size what its shape and
/// dtype take). None when the header is not such a table or holds no fault.
pub fn header_fault(header: &[u8]) -> Option<String> {
    use safetensors::tensor::TensorInfo;
    let map: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut tensors = Vec::with_capacity(map.len());
    for (name, info) in map.into_iter().filter(|(name, _)| name != "__metadata__") {
        tensors.push((name, serde_json::from_value::<TensorInfo>(info).ok()?));
    }
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let mut start = 0;
    for (name, TensorInfo { dtype, shape, data_offsets: (s, e) }) in tensors {
        let bits = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).and_then(|n| n.checked_mul(dtype.bitsize()));
        let reason = match bits {
            _ if s != start || e < s => {
                format!("its data_offsets [{s}, {e}] do not start where the tensors before end ({start})")
            }
            None => format!("its shape {shape:?} of {dtype:?} overflows"),
            Some(bits) if bits % 8 != 0 => format!("its shape {shape:?} of {dtype:?} does not fill whole bytes"),
            Some(bits) if e - s != bits / 8 => {
                format!(
                    "its shape {shape:?} of {dtype:?} takes {} bytes, its data_offsets [{s}, {e}] hold {}",
                    bits / 8,
                    e - s
                )
            }
            Some(_) => {
                start = e;
                continue;
            }
        };
        return Some(format!("tensor `{name}`: {reason}"));
    }
    None
}

/// Weights held in memory by name (the demo model and synthetic benchmark shapes build these).
pub struct InMemoryWeights {
    name: String,
    tensors: HashMap<String, Tensor>,
}

impl InMemoryWeights {
    pub fn new(name: impl Into<String>, tensors: HashMap<String, Tensor>) -> Self {
        Self { name: name.into(), tensors }
    }

    /// The same weights with tensor `name` set to `t` (added or replaced).
    pub fn with(mut self, name: &str, t: Tensor) -> Self {
        self.tensors.insert(name.to_string(), t);
        self
    }
}

impl WeightSource for InMemoryWeights {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, WeightsError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| WeightsError::Missing { source_name: self.name.clone(), tensor: name.to_string() })?;
        if t.dims() != shape {
            return Err(WeightsError::tensor(&self.name, name, format!("shape {:?}, expected {:?}", t.dims(), shape)));
        }
        t.to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(|e| WeightsError::tensor(&self.name, name, e.to_string()))
    }

    fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(Tensor::dtype)
    }
}
