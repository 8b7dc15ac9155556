//! The GPU path's own kernels: CUDA C sources in `kernels/`, compiled at run time by NVRTC, each behind the
//! same interface as its CPU reference and checked against it on the device (`benches/gpu/run.sh`).
//!
//! - [`launch`] (always compiled, unit-tested without a GPU): kernel choice and launch geometry.
//! - [`routes`] (always compiled): the NF4 matmul's routing by rows, and its `LORASERVE_NF4_ROUTES` override.
//! - `nf4` (feature `cuda`): the NF4 weight in device memory and the fused dequantize-matmul op.
//! - `lora` (feature `cuda`): adapters in device memory and the batched-LoRA shrink/expand op.
//! - `attention` (feature `cuda`): the KV cache in device memory, cache writes and paged attention.
//! - `sample` (feature `cuda`): greedy picks (argmax by row, ties to the first index as on the CPU).
//! - `fused` (feature `cuda`): the residual add fused with the RMS norm after it, and SiLU·mul.
//! - `open` (feature `cuda`): the device as the server opens it.
//!
//! Why NVRTC at run time rather than nvcc at build time: candle's CUDA backend already links NVRTC, so users
//! with a CUDA toolkit build with `--features cuda` and nothing else; the PTX is produced for the GPU actually
//! present (its compute capability, read at first use); and the sources are header-free, so the run-time
//! compiler needs no include path on the serving machine.

#[cfg(feature = "cuda")]
pub mod attention;
#[cfg(feature = "cuda")]
pub mod fused;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod lora;
#[cfg(feature = "cuda")]
pub mod nf4;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod routes;
#[cfg(feature = "cuda")]
pub mod sample;

/// Opens CUDA device `ordinal` as candle does (its work on the calling thread's default stream), without
/// cudarc's per-allocation event tracking. cudarc creates two CUDA events for every buffer and destroys them
/// when it is freed, but uses them only to order streams in its multi-stream mode, which candle's per-thread
/// stream never enters: a decode step allocates a few hundred buffers, so that is ~1,000 driver calls a step
/// for nothing.
#[cfg(feature = "cuda")]
pub fn open(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    // A bad LORASERVE_NF4_ROUTES is refused here, before any work, not at the first matmul.
    let routes = routes::in_effect().map_err(candle_core::Error::msg)?;
    if routes::overridden() {
        tracing::info!(%routes, "NF4 routes from {}", routes::ROUTES_VAR);
    }
    let device = candle_core::Device::new_cuda(ordinal)?;
    let cuda = device.as_cuda_device()?;
    if cuda.cuda_stream().context().is_in_multi_stream_mode() {
        candle_core::bail!("CUDA device {ordinal} is in cudarc's multi-stream mode: its event tracking must stay on");
    }
    // SAFETY: everything on this device runs on candle's per-thread default streams, never in cudarc's
    // multi-stream mode (checked above), where alone the events would be used. Work handed between threads
    // (adapter uploads, frees on evicting threads) is ordered by the host: an upload completes before its
    // adapter is published, and a buffer is freed only after the step that read it was read back.
    unsafe { cuda.disable_event_tracking() };
    Ok(device)
}
