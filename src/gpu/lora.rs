//! Adapters' LoRA modules in GPU memory and the batched-LoRA op (`kernels/lora.cu`), the device twin of
//! [`crate::lora::batched`]: rows of one batch in segments, each segment with its own adapter and rank,
//! `y[rows] += scale · (x[rows] · Aᵀ) · Bᵀ`; rows outside every segment are left alone.

use std::ops::Range;

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda::WrapErr;
use candle_core::{CudaDevice, Result};

use super::launch::{self, LORA_MAX_RANK, LORA_SOURCE};
use super::nvrtc::{require_aligned, Module};
use crate::lora::LoraModule;
use crate::tensor_io::with_f32;

static MODULE: Module = Module::new("loraserve_lora", LORA_SOURCE);

/// One adapter's A `[rank, in]` and Bᵀ `[rank, out]` for one linear layer, in device memory.
pub struct LoraCudaModule {
    a: CudaSlice<f32>,
    b_t: CudaSlice<f32>,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
}

impl LoraCudaModule {
    /// Copies a (host) LoRA module to `device`.
    pub fn upload(m: &LoraModule, device: &CudaDevice) -> Result<Self> {
        let (rank, in_features) = m.a.dims2()?;
        let (b_rank, out_features) = m.b_t.dims2()?;
        if b_rank != rank {
            candle_core::bail!("LoRA module: A has rank {rank}, Bᵀ {b_rank}");
        }
        if rank > LORA_MAX_RANK {
            candle_core::bail!("LoRA rank {rank} is above the GPU kernels' maximum {LORA_MAX_RANK}");
        }
        let stream = device.cuda_stream();
        let a = with_f32(&m.a.flatten_all()?, |v| stream.clone_htod(v).w())??;
        let b_t = with_f32(&m.b_t.flatten_all()?, |v| stream.clone_htod(v).w())??;
        Ok(LoraCudaModule { a, b_t, rank, in_features, out_features, scale: m.scale })
    }

    pub fn resident_bytes(&self) -> usize {
        4 * (self.a.len() + self.b_t.len())
    }
}

/// `y[rows] += scale · x[rows]·Aᵀ·Bᵀ` for each `(rows, module)`; `x` is `[rows, in]`, `y` `[rows, out]`, both
/// contiguous f32 on `device` (x starting 16-byte aligned).
pub fn apply_into(
    device: &CudaDevice,
    x: &CudaView<'_, f32>,
    y: &mut CudaSlice<f32>,
    rows: usize,
    segments: &[(Range<usize>, &LoraCudaModule)],
) -> Result<()> {
    let Some((_, first)) = segments.first() else { return Ok(()) };
    let (in_f, out_f) = (first.in_features, first.out_features);
    if let Some((_, m)) = segments.iter().find(|(_, m)| (m.in_features, m.out_features) != (in_f, out_f)) {
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
    let ranges: Vec<(usize, usize)> = segments.iter().map(|(r, _)| (r.start, r.end)).collect();
    let row_seg = launch::lora_row_segments(rows, &ranges).map_err(candle_core::Error::msg)?;

    // The adapter table holds raw device pointers: the kernels run on the same stream as every write to
    // these buffers, and the modules outlive this call (borrowed), so the stream order keeps them valid.
    let stream = device.cuda_stream();
    let a_ptrs: Vec<u64> = segments.iter().map(|(_, m)| m.a.device_ptr(&stream).0).collect();
    let bt_ptrs: Vec<u64> = segments.iter().map(|(_, m)| m.b_t.device_ptr(&stream).0).collect();
    let ranks: Vec<i32> = segments.iter().map(|(_, m)| m.rank as i32).collect();
    let scales: Vec<f32> = segments.iter().map(|(_, m)| m.scale).collect();
    let d_row_seg = stream.clone_htod(&row_seg).w()?;
    let d_a = stream.clone_htod(&a_ptrs).w()?;
    let d_bt = stream.clone_htod(&bt_ptrs).w()?;
    let d_ranks = stream.clone_htod(&ranks).w()?;
    let d_scales = stream.clone_htod(&scales).w()?;
    let mut t = stream.alloc_zeros::<f32>(rows * LORA_MAX_RANK).w()?;
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
