//! Greedy picks on the device (`kernels/sample.cu`), the twin of [`crate::engine::sampler::argmax`]: per row
//! of logits the index of the largest value that is a number above −∞, the first one on ties, or none (every
//! logit NaN or −∞, which the engine reports as a failed request). A GPU server's greedy tokens are
//! then the CPU's even where two logits are exactly equal (candle's own CUDA argmax breaks ties by thread,
//! not by index), and only 4 bytes a row cross to the host.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::WrapErr;
use candle_core::{CudaDevice, DType, Result, Storage, Tensor};

use super::launch::{self, SAMPLE_SOURCE};
use super::nvrtc::Module;

static MODULE: Module = Module::new("loraserve_sample", SAMPLE_SOURCE);

/// `out[r]` = the argmax of row `r` of `logits` (`rows · vocab` contiguous f32), or
/// [`launch::ARGMAX_NONE`]. Public so the device checks can poison `out` first.
pub fn argmax_into(
    device: &CudaDevice,
    logits: &CudaView<'_, f32>,
    rows: usize,
    vocab: usize,
    out: &mut CudaSlice<u32>,
) -> Result<()> {
    let l = launch::argmax_rows(rows, vocab).map_err(candle_core::Error::msg)?;
    if logits.len() < rows * vocab || out.len() < rows {
        candle_core::bail!("argmax: {} logits for {rows}×{vocab}, {} outputs", logits.len(), out.len());
    }
    let func = MODULE.function(device, l.kernel)?;
    let stream = device.cuda_stream();
    let vocab_i = vocab as i32;
    let cfg = LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&func);
    b.arg(logits).arg(&vocab_i).arg(out);
    // SAFETY: the arguments follow argmax_rows's signature in kernels/sample.cu; both sizes are checked above.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The argmax of every row of `logits [rows, vocab]` (f32, on a GPU), on the host.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<Option<u32>>> {
    let (rows, vocab) = logits.dims2()?;
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("argmax-cuda: the logits are on {:?}, not a GPU", logits.device().location())
    };
    if s.dtype() != DType::F32 {
        candle_core::bail!("argmax-cuda: the logits are {:?}, not f32", s.dtype());
    }
    let start = layout.start_offset();
    let view = s.as_cuda_slice::<f32>()?.slice(start..start + rows * vocab);
    let device = s.device();
    // SAFETY: the kernel writes every one of the `rows` outputs (checked on the device with a poisoned buffer).
    let mut out = unsafe { device.alloc::<u32>(rows) }?;
    argmax_into(device, &view, rows, vocab, &mut out)?;
    Ok(device.cuda_stream().clone_dtoh(&out).w()?.into_iter().map(launch::argmax_pick).collect())
}
