//! The batched-LoRA op on the GPU (`kernels/lora.cu`), the device twin of [`crate::lora::batched`]: rows of
//! one batch in segments, each segment with its own adapter and rank, `y[rows] += scale · (x[rows] · Aᵀ) · Bᵀ`;
//! rows outside every segment are left alone. Adapters are the adapter cache's device tier (A and Bᵀ as f32
//! tensors in GPU memory); the kernels read them through a table of device addresses.
//!
//! - [`StepPlan`]: what a forward uses. One upload per forward of every linear's table (addresses, ranks,
//!   scales for each segment) and the per-row segment index; each linear then launches shrink + expand.
//! - [`apply_into`]: the same for one linear and raw buffers (the device checks call it).
//! - [`ModuleAddr`]: an adapter module as the kernels see it, cached per adapter ([`LoraWeights`]).

use std::marker::PhantomData;
use std::ops::Range;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CudaDevice, DType, InplaceOp2, Layout, Result, Storage, Tensor};

use super::launch::{self, LORA_MAX_RANK, LORA_SOURCE};
use super::nvrtc::{require_aligned, Module};
use crate::lora::{LinearId, LoraModule, LoraSegment, LoraWeights};

static MODULE: Module = Module::new("loraserve_lora", LORA_SOURCE);

/// A device-resident LoRA module as the kernels see it: addresses of A `[rank, in]` and Bᵀ `[rank, out]`.
/// Valid while the tensors it was taken from live (the adapter's [`LoraWeights`] holds both).
#[derive(Clone, Copy, Debug)]
pub struct ModuleAddr {
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

impl ModuleAddr {
    fn of(m: &LoraModule, device: &CudaDevice) -> Result<Self> {
        let (rank, in_features) = m.a.dims2()?;
        let (b_rank, out_features) = m.b_t.dims2()?;
        if b_rank != rank {
            candle_core::bail!("LoRA module: A has rank {rank}, Bᵀ {b_rank}");
        }
        if rank > LORA_MAX_RANK {
            candle_core::bail!("LoRA rank {rank} is above the GPU kernels' maximum {LORA_MAX_RANK}");
        }
        let a = f32_address(&m.a, device, "A")?;
        // lora_shrink reads A rows with 16-byte loads (in_features % 4 == 0 is the launcher's check).
        if a % 16 != 0 {
            candle_core::bail!("batched LoRA: A must start 16-byte aligned on the device (address {a:#x})");
        }
        Ok(ModuleAddr { a, b_t: f32_address(&m.b_t, device, "Bᵀ")?, rank, in_features, out_features, scale: m.scale })
    }
}

/// Every linear's [`ModuleAddr`] of an adapter, computed once per adapter.
fn table_of<'w>(w: &'w LoraWeights, device: &CudaDevice) -> Result<&'w [Option<ModuleAddr>]> {
    let table = w.device_table().get_or_init(|| {
        w.modules()
            .iter()
            .map(|m| m.as_ref().map(|m| ModuleAddr::of(m, device)).transpose())
            .collect::<Result<Vec<_>>>()
            .map_err(|e| e.to_string())
    });
    table.as_deref().map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Device buffers of the kernels' tables: per row the segment index, per segment A/Bᵀ addresses, rank, scale.
struct Tables {
    row_seg: CudaSlice<i32>,
    a: CudaSlice<u64>,
    b_t: CudaSlice<u64>,
    ranks: CudaSlice<i32>,
    scales: CudaSlice<f32>,
}

impl Tables {
    fn upload(device: &CudaDevice, row_seg: &[i32], mods: &[Option<ModuleAddr>]) -> Result<Self> {
        let stream = device.cuda_stream();
        // A segment whose adapter does not target a linear gets rank 0 there: its rows are skipped.
        let field = |f: fn(&ModuleAddr) -> u64| mods.iter().map(|m| m.as_ref().map_or(0, f)).collect::<Vec<u64>>();
        Ok(Tables {
            row_seg: stream.clone_htod(row_seg).w()?,
            a: stream.clone_htod(&field(|m| m.a)).w()?,
            b_t: stream.clone_htod(&field(|m| m.b_t)).w()?,
            ranks: stream.clone_htod(&mods.iter().map(|m| m.map_or(0, |m| m.rank as i32)).collect::<Vec<_>>()).w()?,
            scales: stream.clone_htod(&mods.iter().map(|m| m.map_or(0.0, |m| m.scale)).collect::<Vec<_>>()).w()?,
        })
    }
}

/// Launches shrink then expand for `rows` rows of one linear, its segments' entries being `seg_entries` of
/// the tables (one per segment, in segment order).
#[allow(clippy::too_many_arguments)]
fn launch_pair(
    device: &CudaDevice,
    x: &CudaView<'_, f32>,
    y: &mut CudaSlice<f32>,
    rows: usize,
    (in_f, out_f): (usize, usize),
    tables: &Tables,
    seg_entries: Range<usize>,
) -> Result<()> {
    if x.len() < rows * in_f || y.len() < rows * out_f {
        candle_core::bail!(
            "batched LoRA: x has {} elements, y {}, for {rows} rows of {in_f}→{out_f}",
            x.len(),
            y.len()
        );
    }
    let (shrink, expand) = launch::lora(rows, in_f, out_f).map_err(candle_core::Error::msg)?;
    require_aligned(device, "batched LoRA input", x)?;
    let stream = device.cuda_stream();
    let (a, b_t) = (tables.a.slice(seg_entries.clone()), tables.b_t.slice(seg_entries.clone()));
    let (ranks, scales) = (tables.ranks.slice(seg_entries.clone()), tables.scales.slice(seg_entries));
    // SAFETY: lora_expand reads t[r, split, j] only for j < rank of row r's segment, exactly what lora_shrink
    // wrote for every split (the emulation test and the device check run both with base rows and mixed ranks).
    let splits = launch::lora_splits(in_f);
    let mut t = unsafe { stream.alloc::<f32>(rows * splits * LORA_MAX_RANK) }.w()?;
    let (in_i, out_i, splits_i) = (in_f as i32, out_f as i32, splits as i32);

    let f = MODULE.function(device, shrink.kernel)?;
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(&mut t).arg(&tables.row_seg).arg(&a).arg(&ranks).arg(&in_i);
    let cfg = LaunchConfig { grid_dim: shrink.grid, block_dim: shrink.block, shared_mem_bytes: 0 };
    // SAFETY: arguments match lora_shrink's signature; x holds rows·in floats, t rows·splits·MAX_RANK, the tables
    // one entry per segment and row_seg one per row (indices < segments). The addresses point into tensors
    // the caller keeps alive (borrowed adapters), and every kernel runs on this one stream, in order.
    unsafe { b.launch(cfg) }.w()?;

    let f = MODULE.function(device, expand.kernel)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&t).arg(y).arg(&tables.row_seg).arg(&b_t).arg(&ranks).arg(&scales).arg(&splits_i).arg(&out_i);
    let cfg = LaunchConfig { grid_dim: expand.grid, block_dim: expand.block, shared_mem_bytes: 0 };
    // SAFETY: as above for lora_expand; y holds rows·out floats.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// `y[rows] += scale · x[rows]·Aᵀ·Bᵀ` for each `(rows, module)`; `x` is `[rows, in]`, `y` `[rows, out]`, both
/// contiguous f32 on `device` (x starting 16-byte aligned); every module's A and Bᵀ are contiguous f32 tensors
/// on `device`. Uploads its tables on every call: the device checks' entry point, not the forward's.
pub fn apply_into(
    device: &CudaDevice,
    x: &CudaView<'_, f32>,
    y: &mut CudaSlice<f32>,
    rows: usize,
    segments: &[(Range<usize>, &LoraModule)],
) -> Result<()> {
    match Prepared::new(device, rows, segments)? {
        Some(p) => p.apply(x, y),
        None => Ok(()),
    }
}

/// [`apply_into`]'s tables, uploaded once, for launches that then upload nothing, as a forward's
/// [`StepPlan`] does: the device checks time the kernels this way. Borrows the modules whose addresses the
/// tables hold.
pub struct Prepared<'m> {
    device: CudaDevice,
    rows: usize,
    dims: (usize, usize),
    segments: usize,
    tables: Tables,
    _modules: std::marker::PhantomData<&'m LoraModule>,
}

impl<'m> Prepared<'m> {
    /// The tables for `segments` over `rows` rows (as [`apply_into`] takes them); `None` when there are no
    /// segments (nothing to add).
    pub fn new(device: &CudaDevice, rows: usize, segments: &[(Range<usize>, &'m LoraModule)]) -> Result<Option<Self>> {
        let mods: Vec<Option<ModuleAddr>> =
            segments.iter().map(|(_, m)| ModuleAddr::of(m, device).map(Some)).collect::<Result<_>>()?;
        let Some(Some(first)) = mods.first() else { return Ok(None) };
        let dims = (first.in_features, first.out_features);
        if let Some(m) = mods.iter().flatten().find(|m| (m.in_features, m.out_features) != dims) {
            candle_core::bail!(
                "batched LoRA: a segment's module is {}→{}, others {}→{}",
                m.in_features,
                m.out_features,
                dims.0,
                dims.1
            );
        }
        let ranges: Vec<(usize, usize)> = segments.iter().map(|(r, _)| (r.start, r.end)).collect();
        let row_seg = launch::lora_row_segments(rows, &ranges).map_err(candle_core::Error::msg)?;
        let tables = Tables::upload(device, &row_seg, &mods)?;
        let device = device.clone();
        Ok(Some(Prepared { device, rows, dims, segments: mods.len(), tables, _modules: std::marker::PhantomData }))
    }

    /// Shrink then expand: `y += LoRA deltas` for the prepared rows.
    pub fn apply(&self, x: &CudaView<'_, f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        launch_pair(&self.device, x, y, self.rows, self.dims, &self.tables, 0..self.segments)
    }
}

/// One forward's batched-LoRA tables in device memory: built from the step's segments once, then every
/// linear layer adds its deltas with two launches and no upload. The tables hold the adapters' device
/// addresses, so the plan borrows the adapters (`'a`): it cannot outlive them.
pub struct StepPlan<'a> {
    device: CudaDevice,
    rows: usize,
    segments: usize,
    /// Per linear ([`LinearId::index`]): `(in, out)` when some segment's adapter targets it.
    dims: Vec<Option<(usize, usize)>>,
    /// Entries `[linear * segments + s]`; none when no segment has rows (nothing to upload or add).
    tables: Option<Tables>,
    adapters: PhantomData<&'a LoraWeights>,
}

impl<'a> StepPlan<'a> {
    /// The plan of a `rows`-row batch whose `segments` (ordered, non-overlapping) use adapters resident on
    /// `device`, for a model of `linears` linear layers.
    pub fn new(device: &CudaDevice, rows: usize, segments: &[LoraSegment<'a>], linears: usize) -> Result<Self> {
        let segments: Vec<&LoraSegment> = segments.iter().filter(|s| s.rows.1 > s.rows.0).collect();
        let ranges: Vec<(usize, usize)> = segments.iter().map(|s| s.rows).collect();
        let row_seg = launch::lora_row_segments(rows, &ranges).map_err(candle_core::Error::msg)?;
        let per_adapter: Vec<&[Option<ModuleAddr>]> =
            segments.iter().map(|s| table_of(s.adapter, device)).collect::<Result<_>>()?;
        let mut mods = Vec::with_capacity(linears * segments.len());
        let mut dims = vec![None; linears];
        for (linear, d) in dims.iter_mut().enumerate() {
            for table in &per_adapter {
                let m = table.get(linear).copied().flatten();
                if let Some(m) = m {
                    let md = (m.in_features, m.out_features);
                    match *d {
                        None => *d = Some(md),
                        Some(other) if other != md => candle_core::bail!(
                            "batched LoRA: linear {linear} has modules of {}→{} and {}→{}",
                            other.0,
                            other.1,
                            md.0,
                            md.1
                        ),
                        Some(_) => {}
                    }
                }
                mods.push(m);
            }
        }
        let tables = if segments.is_empty() { None } else { Some(Tables::upload(device, &row_seg, &mods)?) };
        Ok(StepPlan { device: device.clone(), rows, segments: segments.len(), dims, tables, adapters: PhantomData })
    }

    /// `y += LoRA deltas` in place for linear `id` (the device twin of [`crate::lora::batched::apply`]). `y` is
    /// the linear's own fresh output: it must not share storage with a tensor anything else reads.
    pub fn add_deltas(&self, id: LinearId, y: &Tensor, x: &Tensor) -> Result<()> {
        if self.dims.get(id.index()).copied().flatten().is_none() {
            return Ok(());
        }
        y.inplace_op2(&x.contiguous()?, &AddDeltas { plan: self, id })
    }
}

struct AddDeltas<'a> {
    plan: &'a StepPlan<'a>,
    id: LinearId,
}

impl InplaceOp2 for AddDeltas<'_> {
    fn name(&self) -> &'static str {
        "batched-lora-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("batched-lora-cuda: CPU tensors use lora::batched::apply")
    }

    fn cuda_fwd(&self, y: &mut CudaStorage, yl: &Layout, x: &CudaStorage, xl: &Layout) -> Result<()> {
        let plan = self.plan;
        let (rows, out_f) = yl.shape().dims2()?;
        let (x_rows, in_f) = xl.shape().dims2()?;
        let dims = plan.dims[self.id.index()].expect("checked by add_deltas");
        if x_rows != rows || rows != plan.rows || (in_f, out_f) != dims {
            candle_core::bail!(
                "batched-lora-cuda: {}: x {x_rows}×{in_f}, y {rows}×{out_f} for a {}-row plan of {}→{}",
                self.id,
                plan.rows,
                dims.0,
                dims.1
            );
        }
        if y.dtype() != DType::F32 || x.dtype() != DType::F32 {
            candle_core::bail!("batched-lora-cuda: needs f32 x and y");
        }
        let (Some((x0, x1)), Some((y0, y1))) = (xl.contiguous_offsets(), yl.contiguous_offsets()) else {
            candle_core::bail!("batched-lora-cuda: x and y must be contiguous");
        };
        if y0 != 0 || y1 - y0 != rows * out_f {
            candle_core::bail!("batched-lora-cuda: y must be a whole buffer of its own");
        }
        let x = x.as_cuda_slice::<f32>()?.slice(x0..x1);
        let y = y.as_cuda_slice_mut::<f32>()?;
        let tables = plan.tables.as_ref().expect("a linear with modules has segments");
        let first = self.id.index() * plan.segments;
        launch_pair(&plan.device, &x, y, rows, dims, tables, first..first + plan.segments)
    }
}
