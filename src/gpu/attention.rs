//! Paged attention on the device (`kernels/attention.cu`), the twin of
//! [`crate::model::attention::paged_attention`]: the same cache layout (`[blocks, block_size, kv_heads,
//! head_dim]` per layer and arena), the same block tables, the same causal and sliding-window masks. The
//! rotary embedding is applied inside the kernels (keys as they are written to the cache, queries as they
//! are read), with the step's cos/sin tables, as [`crate::model::attention::rope_in_place`] does on the CPU.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CustomOp3, Layout, Result, Shape, Tensor};

use super::launch::{self, ATTENTION_SOURCE};
use super::nvrtc::{f32_view, Module};
use crate::model::attention::{AttnShape, PagedSeq};

static MODULE: Module = Module::new("loraserve_attention", ATTENTION_SOURCE);

/// One layer's key and value arenas in device memory.
pub struct LayerKvCuda {
    pub block_size: usize,
    pub k: CudaSlice<f32>,
    pub v: CudaSlice<f32>,
}

impl LayerKvCuda {
    /// Zero-filled arenas of `elements` f32 each.
    pub fn zeros(device: &CudaDevice, block_size: usize, elements: usize) -> Result<Self> {
        let stream = device.cuda_stream();
        Ok(LayerKvCuda {
            block_size,
            k: stream.alloc_zeros::<f32>(elements).w()?,
            v: stream.alloc_zeros::<f32>(elements).w()?,
        })
    }
}

/// Tensor form of [`paged_attention_into`]: `q [rows, heads*hd]`, `k`/`v [rows, kv_heads*hd]` (f32, not yet
/// rotated, on the cache's device) → the attention output `[rows, heads*hd]`, with this step's keys (rotated)
/// and values written into `cache` first.
pub fn paged_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    tables: &StepTables,
    cache: &mut LayerKvCuda,
    shape: &AttnShape,
) -> Result<Tensor> {
    let op = PagedAttention { tables, cache: RefCell::new(cache), shape: *shape };
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

struct PagedAttention<'a, 'c> {
    tables: &'a StepTables,
    cache: RefCell<&'c mut LayerKvCuda>,
    shape: AttnShape,
}

impl CustomOp3 for PagedAttention<'_, '_> {
    fn name(&self) -> &'static str {
        "paged-attention-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("paged-attention-cuda: CPU tensors use model::attention::paged_attention")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        const OP: &str = "paged-attention-cuda";
        let rows = ql.shape().dims2()?.0;
        if self.tables.rows != rows {
            candle_core::bail!("{OP}: {rows} rows but the step's tables cover {}", self.tables.rows);
        }
        let device = q.device().clone();
        let width = self.shape.heads * self.shape.head_dim;
        // SAFETY: paged_attention_into writes every element of `out` (checked on the device with NaN fill).
        let mut out = unsafe { device.alloc::<f32>(rows * width) }?;
        let mut cache = self.cache.borrow_mut();
        paged_attention_into(
            &device,
            &f32_view(OP, "q", q, ql)?,
            &f32_view(OP, "k", k, kl)?,
            &f32_view(OP, "v", v, vl)?,
            self.tables,
            &mut cache,
            &self.shape,
            &mut out,
        )?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from((rows, width))))
    }
}

/// One step's attention tables (each row's cache slot and position, the sequences' block tables, the rows'
/// RoPE cos/sin) in device memory: built once per forward and used by every layer.
pub struct StepTables {
    rows: usize,
    block_size: usize,
    /// Entries of `cos` and `sin` a row: head_dim / 2.
    rope_half: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    /// One past the largest block id any table names.
    blocks_needed: usize,
    row_slot: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    row_pos: CudaSlice<i32>,
    row_table: CudaSlice<i32>,
}

impl StepTables {
    /// Checks the sequences (in row order, block tables long enough) and uploads their tables, with the rows'
    /// RoPE tables (`model::attention::rope_tables` of the rows' positions: `[rows, half]` each).
    pub fn upload(
        device: &CudaDevice,
        seqs: &[PagedSeq],
        block_size: usize,
        (cos, sin, half): (&[f32], &[f32], usize),
    ) -> Result<Self> {
        let t = launch::attention_tables(seqs, block_size).map_err(candle_core::Error::msg)?;
        if t.tables.iter().any(|&b| b < 0) {
            candle_core::bail!("paged attention: a block id does not fit the kernels' 32-bit tables");
        }
        let rows = t.row_pos.len();
        if cos.len() != rows * half || sin.len() != rows * half {
            candle_core::bail!(
                "paged attention: RoPE tables of {} and {} entries for {rows} rows of {half}",
                cos.len(),
                sin.len()
            );
        }
        let stream = device.cuda_stream();
        Ok(StepTables {
            rows,
            block_size,
            rope_half: half,
            cos: stream.clone_htod(cos).w()?,
            sin: stream.clone_htod(sin).w()?,
            blocks_needed: t.tables.iter().map(|&b| b as usize + 1).max().unwrap_or(0),
            row_slot: stream.clone_htod(&t.row_slot).w()?,
            tables: stream.clone_htod(&t.tables).w()?,
            row_pos: stream.clone_htod(&t.row_pos).w()?,
            row_table: stream.clone_htod(&t.row_table).w()?,
        })
    }
}

/// Writes this step's keys (rotated) and values into the cache, then attends: `q [rows, heads*hd]`, `k`/`v
/// [rows, kv_heads*hd]` (not rotated: the kernels apply RoPE) → `out [rows, heads*hd]`, over the step's
/// `tables`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_into(
    device: &CudaDevice,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    tables: &StepTables,
    cache: &mut LayerKvCuda,
    shape: &AttnShape,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let rows = tables.rows;
    let (write, attend) = launch::paged_attention(rows, shape.heads, shape.kv_heads, shape.head_dim, shape.window)
        .map_err(candle_core::Error::msg)?;
    let width = shape.kv_heads * shape.head_dim;
    if q.len() < rows * shape.heads * shape.head_dim || k.len() < rows * width || v.len() < rows * width {
        candle_core::bail!("paged attention: q/k/v hold fewer than {rows} rows");
    }
    if out.len() < rows * shape.heads * shape.head_dim {
        candle_core::bail!("paged attention: out holds fewer than {rows} rows");
    }
    if !shape.head_dim.is_multiple_of(2) || tables.rope_half != shape.head_dim / 2 {
        candle_core::bail!(
            "paged attention: RoPE tables of {} a row for head_dim {}",
            tables.rope_half,
            shape.head_dim
        );
    }
    if tables.block_size != cache.block_size {
        candle_core::bail!(
            "paged attention: tables of {}-token blocks for a {}-token cache",
            tables.block_size,
            cache.block_size
        );
    }
    // Every block any table names (the attention reads past positions through them) inside the arenas.
    let arena = tables.blocks_needed * cache.block_size * width;
    if cache.k.len() < arena || cache.v.len() < arena {
        candle_core::bail!("paged attention: a block table points past the cache");
    }
    let stream = device.cuda_stream();
    let (d_slot, d_tables, d_pos, d_table) = (&tables.row_slot, &tables.tables, &tables.row_pos, &tables.row_table);
    let (width_i, hd_i) = (width as i32, shape.head_dim as i32);

    let f = MODULE.function(device, write.kernel)?;
    let mut b = stream.launch_builder(&f);
    b.arg(k).arg(v).arg(&mut cache.k).arg(&mut cache.v).arg(d_slot).arg(&tables.cos).arg(&tables.sin);
    b.arg(&width_i).arg(&hd_i);
    let cfg = LaunchConfig { grid_dim: write.grid, block_dim: write.block, shared_mem_bytes: 0 };
    // SAFETY: arguments match kv_write; every slot is inside the arenas (checked above), k/v hold rows rows,
    // cos/sin rows · head_dim / 2 entries (checked at upload and above).
    unsafe { b.launch(cfg) }.w()?;

    let (heads, kv_heads, hd) = (shape.heads as i32, shape.kv_heads as i32, shape.head_dim as i32);
    let (bs, window) = (cache.block_size as i32, shape.window.map_or(0, |w| w as i32));
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let f = MODULE.function(device, attend.kernel)?;
    let mut b = stream.launch_builder(&f);
    b.arg(q)
        .arg(&cache.k)
        .arg(&cache.v)
        .arg(d_tables)
        .arg(d_pos)
        .arg(d_table)
        .arg(&tables.cos)
        .arg(&tables.sin)
        .arg(out)
        .arg(&heads)
        .arg(&kv_heads)
        .arg(&hd)
        .arg(&bs)
        .arg(&window)
        .arg(&scale);
    let cfg = LaunchConfig { grid_dim: attend.grid, block_dim: attend.block, shared_mem_bytes: 0 };
    // SAFETY: arguments match paged_attention; tables cover every position 0..=pos of each row's sequence
    // (attention_tables checks), and the geometry limits were checked by launch::paged_attention.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
