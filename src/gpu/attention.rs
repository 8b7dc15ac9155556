//! Paged attention on the device (`kernels/attention.cu`), the twin of
//! [`crate::model::attention::paged_attention`]: the same cache layout (`[blocks, block_size, kv_heads,
//! head_dim]` per layer and arena), the same block tables, the same causal and sliding-window masks.

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::WrapErr;
use candle_core::{CudaDevice, Result};

use super::launch::{self, ATTENTION_SOURCE};
use super::nvrtc::Module;
use crate::model::attention::{AttnShape, PagedSeq};

static MODULE: Module = Module::new("loraserve_attention", ATTENTION_SOURCE);

/// One layer's key and value arenas in device memory.
pub struct LayerKvCuda {
    pub block_size: usize,
    pub k: CudaSlice<f32>,
    pub v: CudaSlice<f32>,
}

/// Writes this step's keys and values into the cache, then attends: `q [rows, heads*hd]`, `k`/`v
/// [rows, kv_heads*hd]` (roped) → `out [rows, heads*hd]`. Sequences cover the rows in order.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_into(
    device: &CudaDevice,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    seqs: &[PagedSeq],
    cache: &mut LayerKvCuda,
    shape: &AttnShape,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let rows: usize = seqs.iter().map(|s| s.len).sum();
    let (write, attend) = launch::paged_attention(rows, shape.heads, shape.kv_heads, shape.head_dim, shape.window)
        .map_err(candle_core::Error::msg)?;
    let tables = launch::attention_tables(seqs, cache.block_size).map_err(candle_core::Error::msg)?;
    let width = shape.kv_heads * shape.head_dim;
    if q.len() < rows * shape.heads * shape.head_dim || k.len() < rows * width || v.len() < rows * width {
        candle_core::bail!("paged attention: q/k/v hold fewer than {rows} rows");
    }
    if out.len() < rows * shape.heads * shape.head_dim {
        candle_core::bail!("paged attention: out holds fewer than {rows} rows");
    }
    // Every block any table names (the attention reads past positions through them) inside the arenas.
    let blocks_needed = tables.tables.iter().map(|&b| b as usize + 1).max().unwrap_or(0);
    let arena = blocks_needed * cache.block_size * width;
    if tables.tables.iter().any(|&b| b < 0) || cache.k.len() < arena || cache.v.len() < arena {
        candle_core::bail!("paged attention: a block table points past the cache");
    }
    let stream = device.cuda_stream();
    let d_slot = stream.clone_htod(&tables.row_slot).w()?;
    let d_tables = stream.clone_htod(&tables.tables).w()?;
    let d_pos = stream.clone_htod(&tables.row_pos).w()?;
    let d_table = stream.clone_htod(&tables.row_table).w()?;
    let width_i = width as i32;

    let f = MODULE.function(device, write.kernel)?;
    let mut b = stream.launch_builder(&f);
    b.arg(k).arg(v).arg(&mut cache.k).arg(&mut cache.v).arg(&d_slot).arg(&width_i);
    let cfg = LaunchConfig { grid_dim: write.grid, block_dim: write.block, shared_mem_bytes: 0 };
    // SAFETY: arguments match kv_write; every slot is inside the arenas (checked above), k/v hold rows rows.
    unsafe { b.launch(cfg) }.w()?;

    let (heads, kv_heads, hd) = (shape.heads as i32, shape.kv_heads as i32, shape.head_dim as i32);
    let (bs, window) = (cache.block_size as i32, shape.window.map_or(0, |w| w as i32));
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let f = MODULE.function(device, attend.kernel)?;
    let mut b = stream.launch_builder(&f);
    b.arg(q)
        .arg(&cache.k)
        .arg(&cache.v)
        .arg(&d_tables)
        .arg(&d_pos)
        .arg(&d_table)
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
