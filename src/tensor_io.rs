//! Moving data between candle tensors and the plain slices the project's CPU kernels work on (NF4 matmul,
//! batched LoRA, paged attention). Kernels compute in f32; tensors may be f32, bf16 or f16.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

/// A contiguous CPU storage region as f32 (borrowed when it already is f32).
pub fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kernel input must be contiguous, got strides {:?}", layout.stride())
    };
    Ok(match storage {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        other => candle_core::bail!("kernel input must be f32, bf16 or f16, got {:?}", other.dtype()),
    })
}

/// f32 results as CPU storage of `dtype`.
pub fn cpu_storage_from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        other => candle_core::bail!("kernel output dtype must be f32, bf16 or f16, got {other:?}"),
    })
}

/// Runs `f` over the tensor's elements as a contiguous f32 slice (no copy for a contiguous f32 CPU tensor).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu_f32(cpu, layout)?;
            Ok(f(&data))
        }
        _ => {
            drop(storage);
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(f(&v))
        }
    }
}

/// A tensor of `shape` and `dtype` on the CPU from f32 values.
pub fn tensor_from_f32(v: Vec<f32>, shape: &[usize], dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let t = Tensor::from_vec(v, shape, device)?;
    if dtype == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(dtype)
    }
}
