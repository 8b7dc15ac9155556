//! The GPU path's own kernels: CUDA C sources in `kernels/`, compiled at run time by NVRTC, each behind the
//! same interface as its CPU reference and checked against it on the device (`benches/gpu/run.sh`).
//!
//! - [`launch`] (always compiled, unit-tested without a GPU): kernel choice and launch geometry.
//! - [`nf4`] (feature `cuda`): the NF4 weight in device memory and the fused dequantize-matmul op.
//! - [`lora`] (feature `cuda`): adapters in device memory and the batched-LoRA shrink/expand op.
//! - [`attention`] (feature `cuda`): the KV cache in device memory, cache writes and paged attention.
//! - [`sample`] (feature `cuda`): greedy picks (argmax by row, ties to the first index as on the CPU).
//!
//! Why NVRTC at run time rather than nvcc at build time: candle's CUDA backend already links NVRTC, so users
//! with a CUDA toolkit build with `--features cuda` and nothing else; the PTX is produced for the GPU actually
//! present (its compute capability, read at first use); and the sources are header-free, so the run-time
//! compiler needs no include path on the serving machine.

#[cfg(feature = "cuda")]
pub mod attention;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod lora;
#[cfg(feature = "cuda")]
pub mod nf4;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod sample;
