//! [`Linear`]: the model's single linear-layer type. Its base weight is dense or NF4; LoRA deltas for the
//! rows of the batch that use an adapter are added on top through [`LoraRows`]. Quantized, adapted and
//! trained variants are all this one type — there is no second copy of the model.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::lora::{LinearId, LoraRows};
use crate::quant::bnb::SkipModules;
use crate::quant::op::Nf4Linear;
use crate::quant::{Nf4Weight, QuantMode};

use super::weights::{WeightSource, WeightsError};
use super::ModelError;

/// The frozen base weight of a linear layer, `[out, in]`.
#[derive(Clone)]
pub enum BaseWeight {
    /// Dense, on the model's device.
    Dense(Tensor),
    /// NF4 codes in host memory (the CPU path).
    Nf4(Arc<Nf4Weight>),
    /// NF4 codes in GPU memory, the only copy a GPU-resident model keeps.
    #[cfg(feature = "cuda")]
    Nf4Cuda(Arc<crate::gpu::nf4::Nf4CudaWeight>),
}

impl BaseWeight {
    /// Bytes resident for this weight.
    pub fn resident_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            BaseWeight::Nf4(w) => w.resident_bytes(),
            #[cfg(feature = "cuda")]
            BaseWeight::Nf4Cuda(w) => w.resident_bytes(),
        }
    }

    /// `(parameters, resident bytes)` when the weight is NF4, wherever it lives.
    pub fn nf4_footprint(&self) -> Option<(usize, usize)> {
        match self {
            BaseWeight::Dense(_) => None,
            BaseWeight::Nf4(w) => Some((w.numel(), w.resident_bytes())),
            #[cfg(feature = "cuda")]
            BaseWeight::Nf4Cuda(w) => Some((w.numel(), w.resident_bytes())),
        }
    }

    /// The NF4 weight in host memory (copied back from the GPU when it lives there); `None` when dense.
    pub fn nf4_host(&self) -> candle_core::Result<Option<Arc<Nf4Weight>>> {
        Ok(match self {
            BaseWeight::Dense(_) => None,
            BaseWeight::Nf4(w) => Some(w.clone()),
            #[cfg(feature = "cuda")]
            BaseWeight::Nf4Cuda(w) => Some(Arc::new(w.download()?)),
        })
    }

    /// The weight as a dense f32 `[out, in]` tensor (for merging and checks; NF4 is dequantized).
    pub fn to_dense_f32(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            BaseWeight::Dense(t) => t.to_dtype(DType::F32)?.to_device(device),
            _ => {
                let w = self.nf4_host()?.expect("not dense");
                Tensor::from_vec(w.dequantize(), w.dims2(), device)
            }
        }
    }

    /// The same weight resident on `device`: NF4 codes move as codes (never dequantized), and the copy on the
    /// old device is dropped once nothing else holds it.
    pub fn to_device(self, device: &Device) -> candle_core::Result<Self> {
        Ok(match (self, device) {
            (BaseWeight::Dense(t), _) => BaseWeight::Dense(t.to_device(device)?),
            (BaseWeight::Nf4(w), Device::Cpu) => BaseWeight::Nf4(w),
            #[cfg(feature = "cuda")]
            (BaseWeight::Nf4(w), Device::Cuda(d)) => {
                BaseWeight::Nf4Cuda(Arc::new(crate::gpu::nf4::Nf4CudaWeight::upload(&w, d)?))
            }
            #[cfg(feature = "cuda")]
            (BaseWeight::Nf4Cuda(w), Device::Cpu) => BaseWeight::Nf4(Arc::new(w.download()?)),
            #[cfg(feature = "cuda")]
            (BaseWeight::Nf4Cuda(w), Device::Cuda(d)) => {
                if Device::Cuda(w.device().clone()).same_device(device) {
                    BaseWeight::Nf4Cuda(w)
                } else {
                    BaseWeight::Nf4Cuda(Arc::new(crate::gpu::nf4::Nf4CudaWeight::upload(&w.download()?, d)?))
                }
            }
            #[allow(unreachable_patterns)]
            (_, other) => candle_core::bail!("NF4 weights have no kernels for device {:?}", other.location()),
        })
    }
}

/// A linear layer `y = x·Wᵀ (+ b) (+ LoRA)`.
#[derive(Clone)]
pub struct Linear {
    pub id: LinearId,
    pub in_features: usize,
    pub out_features: usize,
    pub base: BaseWeight,
    pub bias: Option<Tensor>,
}

/// What the loader needs to build linear layers.
pub struct LinearLoad<'a> {
    pub source: &'a dyn WeightSource,
    pub quant: QuantMode,
    pub dtype: DType,
    pub device: &'a Device,
    /// The checkpoint is NF4 already (`quantization_config`): the layers it keeps dense stay dense, as
    /// transformers keeps them (`llm_int8_skip_modules`, e.g. the sensitive layers of "dynamic" 4-bit
    /// checkpoints), whatever `quant` says. Each layer must be stored as its config says, as transformers
    /// requires: 4-bit unless kept dense; without a `quantization_config`, dense.
    pub prequantized: Option<SkipModules>,
}

/// The file holding tensor `name` (a shard of a sharded checkpoint), else the source.
fn file_of(source: &dyn WeightSource, name: &str) -> String {
    source.raw(name).map_or_else(|| source.describe(), |r| r.file.to_string())
}

/// Refuses the weight of module `prefix` (stored in bitsandbytes' 4-bit layout or not: `nf4`) where the
/// checkpoint's `quantization_config` says otherwise, as transformers refuses to load it: a dense
/// checkpoint whose config kept a stale `quantization_config` (left by `dequantize()` or a merge script)
/// would otherwise load dense where NF4 is asked for, and `server quantize` would write no NF4 layer.
fn check_stored_as_configured(ld: &LinearLoad, prefix: &str, nf4: bool) -> Result<(), ModelError> {
    let name = format!("{prefix}.weight");
    if !ld.source.contains(&name) {
        return Ok(()); // missing: said so where it is read
    }
    let why = match &ld.prequantized {
        None if nf4 => "stored in bitsandbytes' 4-bit layout, but config.json has no `quantization_config` \
                        (transformers does not load it so either): give it the one it was quantized with"
            .to_string(),
        Some(skip) if nf4 && skip.keeps(prefix) => format!(
            "stored in bitsandbytes' 4-bit layout, but config.json's `quantization_config.llm_int8_skip_modules` \
             keeps `{prefix}` dense"
        ),
        Some(skip) if !nf4 && !skip.keeps(prefix) => format!(
            "stored dense, but config.json's `quantization_config` says the checkpoint is 4-bit and its \
             `llm_int8_skip_modules` does not keep `{prefix}` dense: a dense checkpoint that kept a stale \
             `quantization_config` (left by `dequantize()` or a merge) loads once that is removed"
        ),
        _ => return Ok(()),
    };
    Err(WeightsError::tensor(file_of(ld.source, &name), name, why).into())
}

impl Linear {
    /// Loads `{prefix}.weight` (dense, or the bitsandbytes NF4 layout) and optionally `{prefix}.bias`.
    pub fn load(
        ld: &LinearLoad,
        prefix: &str,
        id: LinearId,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        let nf4 = crate::quant::bnb::load_nf4(ld.source, &name, &[out_features, in_features])?;
        check_stored_as_configured(ld, prefix, nf4.is_some())?;
        let base = if let Some(w) = nf4 {
            if ld.quant == QuantMode::None {
                // A pre-quantized checkpoint cannot be "un-quantized" losslessly; dequantize for a dense base.
                BaseWeight::Dense(
                    Tensor::from_vec(w.dequantize(), (out_features, in_features), ld.device)?.to_dtype(ld.dtype)?,
                )
            } else {
                BaseWeight::Nf4(Arc::new(w))
            }
        } else {
            match ld.quant {
                QuantMode::Nf4 if ld.prequantized.is_none() => {
                    // Quantized on the host, whatever the model's device: the codes move, never the f32 values.
                    let w = ld.source.tensor(&name, &[out_features, in_features], DType::F32, &Device::Cpu)?;
                    let values = w.flatten_all()?.to_vec1::<f32>()?;
                    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                        let why = format!("non-finite value {} at element {i}", values[i]);
                        return Err(WeightsError::tensor(file_of(ld.source, &name), name, why).into());
                    }
                    BaseWeight::Nf4(Arc::new(Nf4Weight::quantize(&values, &[out_features, in_features], true)))
                }
                _ => BaseWeight::Dense(ld.source.tensor(&name, &[out_features, in_features], ld.dtype, ld.device)?),
            }
        };
        let bias = if bias {
            Some(ld.source.tensor(&format!("{prefix}.bias"), &[out_features], ld.dtype, ld.device)?)
        } else {
            None
        };
        Ok(Linear { id, in_features, out_features, base, bias })
    }

    /// `x [rows, in] → [rows, out]`. `differentiable` keeps the autograd graph (training) through the NF4 op.
    pub fn forward(&self, x: &Tensor, lora: &LoraRows, differentiable: bool) -> candle_core::Result<Tensor> {
        let y = match &self.base {
            // The serving path on the CPU uses the project's dense kernel; training (autograd) and other
            // devices use candle's matmul, with no gradient for the frozen weight.
            BaseWeight::Dense(w) if !differentiable && w.device().is_cpu() => {
                x.contiguous()?.apply_op2_no_bwd(w, &crate::cpu_linear::DenseLinear)?
            }
            BaseWeight::Dense(w) => super::frozen::frozen_matmul(x, w)?,
            BaseWeight::Nf4(w) => {
                let x = x.contiguous()?;
                if differentiable {
                    x.apply_op1(Nf4Linear(w.clone()))?
                } else {
                    x.apply_op1_no_bwd(&Nf4Linear(w.clone()))?
                }
            }
            #[cfg(feature = "cuda")]
            BaseWeight::Nf4Cuda(w) => {
                if differentiable {
                    candle_core::bail!("{}: training runs on the CPU; this NF4 weight lives on the GPU", self.id)
                }
                x.contiguous()?.apply_op1_no_bwd(&crate::gpu::nf4::Nf4CudaLinear(w.clone()))?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        lora.apply(self.id, x, y)
    }
}
