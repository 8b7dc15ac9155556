//! Adapters' LoRA modules in GPU memory and the batched-LoRA op (`kernels/lora.cu`), the device twin of
//! [`crate::lora::batched`]: rows of one batch in segments, each segment with its own adapter and rank,
//! `y[rows] += scale · (x[rows] · Aᵀ) · Bᵀ`; rows outside every segment are left alone.

use std::ops::Range;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CudaDevice, DType, InplaceOp2, Layout, Result, Storage, Tensor};

use super::launch::{self, LORA_MAX_RANK, LORA_SOURCE};
use super::nvrtc::{require_aligned, Module};
use crate::lora::{LinearId, LoraModule, LoraSegment};

static MODULE: Module = Module::new("loraserve_lora", LORA_SOURCE);

/// A device-resident LoRA module as the kernels see it: raw addresses of A `[rank, in]` and Bᵀ `[rank, out]`.
struct DeviceModule {
    a: u64,
    b_t: u64,
    rank: usize,
    in_features: usize,
    out_features: usize,
    scale: f32,
}

/// The address of a contiguous f32 tensor on `device`, checked.
fn f32_address(t: &Tensor, device: &CudaDevice, what: &str) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("batched LoRA: {what} is on {:?}, not the GPU", t.device().location())
    };
    if !s.device().same_device(device) || s.dtype() != DType::F32 || !layout.is_contiguous() {
        candle_core::bail!("batched LoRA: {what} must be a contiguous f32 tensor on the model's GPU");
    }
    let view = s.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
    let stream = device.cuda_stream();
    let (ptr, _sync) = view.device_ptr(&stream);
    Ok(ptr)
}

impl DeviceModule {
    fn of(m: &LoraModule, device: &CudaDevice) -> Result<Self> {
        let (rank, in_features) = m.a.dims2()?;
        let (b_rank, out_features) = m.b_t.dims2()?;
        if b_rank != rank {
            candle_core::bail!("LoRA module: A has rank {rank}, Bᵀ {b_rank}");
        }
        if rank > LORA_MAX_RANK {
            candle_core::bail!("LoRA rank {rank} is above the GPU kernels' maximum {LORA_MAX_RANK}");
        }
        Ok(DeviceModule {
            a: f32_address(&m.a, device, "A")?,
            b_t: f32_address(&m.b_t, device, "Bᵀ")?,
            rank,
            in_features,
            out_features,
            scale: m.scale,
        })
    }
}

/// `y[rows] += scale · x[rows]·Aᵀ·Bᵀ` for each `(rows, module)`; `x` is `[rows, in]`, `y` `[rows, out]`, both
/// contiguous f32 on `device` (x starting 16-byte aligned); every module's A and Bᵀ are contiguous f32 tensors
/// on `device` (an adapter cache's device tier).
pub fn apply_into(
    device: &CudaDevice,
    x: &CudaView<'_, f32>,
    y: &mut CudaSlice<f32>,
    rows: usize,
    segments: &[(Range<usize>, &LoraModule)],
) -> Result<()> {
    let modules: Vec<(Range<usize>, DeviceModule)> =
        segments.iter().map(|(r, m)| Ok((r.clone(), DeviceModule::of(m, device)?))).collect::<Result<_>>()?;
    let Some((_, first)) = modules.first() else { return Ok(()) };
    let (in_f, out_f) = (first.in_features, first.out_features);
    if let Some((_, m)) = modules.iter().find(|(_, m)| (m.in_features, m.out_features) != (in_f, out_f)) {
        candle_core::bail!(
            "batched LoRA: a segment's module is {}→{}, others {in_f}→{out_f}",
            m.in_features,
            m.out_features
        );
    }
    if x.len() < rows * in_f || y.len() < rows * out_f {
        candle_core::bail!(
            "batched LoRA: x has {} elements, y {}, for {rows} rows of {in_f}→{out_f}",
            x.len(),
            y.len()
        );
    }
    let (shrink, expand) = launch::lora(rows, in_f, out_f).map_err(candle_core::Error::msg)?;
    require_aligned(device, "batched LoRA input", x)?;
    let ranges: Vec<(usize, usize)> = modules.iter().map(|(r, _)| (r.start, r.end)).collect();
    let row_seg = launch::lora_row_segments(rows, &ranges).map_err(candle_core::Error::msg)?;

    // The adapter table holds raw device addresses: the kernels run on the same stream as every write to
    // these buffers, and the modules' tensors outlive this call (borrowed), so the stream order keeps them
    // valid (a freed buffer is released in stream order too).
    let stream = device.cuda_stream();
    let a_ptrs: Vec<u64> = modules.iter().map(|(_, m)| m.a).collect();
    let bt_ptrs: Vec<u64> = modules.iter().map(|(_, m)| m.b_t).collect();
    let ranks: Vec<i32> = modules.iter().map(|(_, m)| m.rank as i32).collect();
    let scales: Vec<f32> = modules.iter().map(|(_, m)| m.scale).collect();
    let d_row_seg = stream.clone_htod(&row_seg).w()?;
    let d_a = stream.clone_htod(&a_ptrs).w()?;
    let d_bt = stream.clone_htod(&bt_ptrs).w()?;
    let d_ranks = stream.clone_htod(&ranks).w()?;
    let d_scales = stream.clone_htod(&scales).w()?;
    // SAFETY: lora_expand reads t[r, j] only for j < rank of row r's segment, exactly what lora_shrink wrote
    // (the emulation test and the device check run both with base rows and mixed ranks).
    let mut t = unsafe { stream.alloc::<f32>(rows * LORA_MAX_RANK) }.w()?;
    let (in_i, out_i) = (in_f as i32, out_f as i32);

    let f = MODULE.function(device, shrink.kernel)?;
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(&mut t).arg(&d_row_seg).arg(&d_a).arg(&d_ranks).arg(&in_i);
    let cfg = LaunchConfig { grid_dim: shrink.grid, block_dim: shrink.block, shared_mem_bytes: 0 };
    // SAFETY: arguments match lora_shrink's signature; x holds rows·in floats, t rows·MAX_RANK, the table
    // one entry per segment and row_seg one per row (indices < segments.len()).
    unsafe { b.launch(cfg) }.w()?;

    let f = MODULE.function(device, expand.kernel)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&t).arg(y).arg(&d_row_seg).arg(&d_bt).arg(&d_ranks).arg(&d_scales).arg(&out_i);
    let cfg = LaunchConfig { grid_dim: expand.grid, block_dim: expand.block, shared_mem_bytes: 0 };
    // SAFETY: as above for lora_expand; y holds rows·out floats.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// `y += LoRA deltas` in place for linear `id` over `segments` (the device twin of
/// [`crate::lora::batched::apply`]). `y` is the linear's own fresh output: it must not share storage with a
/// tensor anything else reads.
pub fn add_deltas(y: &Tensor, x: &Tensor, id: LinearId, segments: &[LoraSegment]) -> Result<()> {
    let x = x.contiguous()?;
    y.inplace_op2(&x, &AddDeltas { id, segments })
}

struct AddDeltas<'a> {
    id: LinearId,
    segments: &'a [LoraSegment<'a>],
}

impl InplaceOp2 for AddDeltas<'_> {
    fn name(&self) -> &'static str {
        "batched-lora-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("batched-lora-cuda: CPU tensors use lora::batched::apply")
    }

    fn cuda_fwd(&self, y: &mut CudaStorage, yl: &Layout, x: &CudaStorage, xl: &Layout) -> Result<()> {
        let (rows, out_f) = yl.shape().dims2()?;
        let (x_rows, _) = xl.shape().dims2()?;
        if x_rows != rows || y.dtype() != DType::F32 || x.dtype() != DType::F32 {
            candle_core::bail!("batched-lora-cuda: needs f32 x and y with the same rows ({x_rows} vs {rows})");
        }
        let (Some((x0, x1)), Some((y0, y1))) = (xl.contiguous_offsets(), yl.contiguous_offsets()) else {
            candle_core::bail!("batched-lora-cuda: x and y must be contiguous");
        };
        if y0 != 0 || y1 - y0 != rows * out_f {
            candle_core::bail!("batched-lora-cuda: y must be a whole buffer of its own");
        }
        let segments: Vec<(Range<usize>, &LoraModule)> = self
            .segments
            .iter()
            .filter(|s| s.rows.1 > s.rows.0)
            .filter_map(|s| s.adapter.module(self.id).map(|m| (s.rows.0..s.rows.1, m)))
            .collect();
        let device = y.device().clone();
        let x = x.as_cuda_slice::<f32>()?.slice(x0..x1);
        let y = y.as_cuda_slice_mut::<f32>()?;
        apply_into(&device, &x, y, rows, &segments)
    }
}
