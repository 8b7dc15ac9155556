//! Run-time compilation of the kernel sources: NVRTC → PTX for the device's compute capability, once per
//! module per process, then loaded into candle's device (which caches the module by name).

use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaFunction, CudaView, DevicePtr};
use candle_core::cuda::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda::CudaStorage;
use candle_core::cuda_backend::DeviceId;
use candle_core::{CudaDevice, DType, Layout, Result};

use super::launch::nvrtc_arch;

/// Refuses a view the kernels would read with 16-byte vector loads unless it starts 16-byte aligned (a
/// misaligned load is a sticky CUDA error that poisons the whole context).
pub fn require_aligned(device: &CudaDevice, what: &str, view: &CudaView<'_, f32>) -> Result<()> {
    let stream = device.cuda_stream();
    let ptr = view.device_ptr(&stream).0;
    if ptr % 16 != 0 {
        candle_core::bail!("{what} must start 16-byte aligned on the device (address {ptr:#x})");
    }
    Ok(())
}

/// The contiguous f32 view of a custom op's GPU operand, or an error naming the op and the operand.
pub fn f32_view<'s>(op: &str, what: &str, s: &'s CudaStorage, l: &Layout) -> Result<CudaView<'s, f32>> {
    match (s.dtype(), l.contiguous_offsets()) {
        (DType::F32, Some((a, b))) => Ok(s.as_cuda_slice::<f32>()?.slice(a..b)),
        _ => candle_core::bail!("{op}: {what} must be contiguous f32"),
    }
}

/// One kernel source file and its compiled PTX.
pub struct Module {
    pub name: &'static str,
    pub source: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
    /// Functions already looked up, by device and name: a decode step launches ~700 kernels, and candle's
    /// lookup takes a lock, builds a C string and asks the driver each time.
    functions: Mutex<Vec<((DeviceId, &'static str), CudaFunction)>>,
}

impl Module {
    pub const fn new(name: &'static str, source: &'static str) -> Self {
        Module { name, source, ptx: OnceLock::new(), functions: Mutex::new(Vec::new()) }
    }

    /// The kernel `function` of this module on `device`, compiling the module on first use. Launch it on
    /// `device.cuda_stream()` (the calling thread's stream, where candle puts this thread's work).
    pub fn function(&self, device: &CudaDevice, function: &'static str) -> Result<CudaFunction> {
        let key = (device.id(), function);
        let mut cached = self.functions.lock().expect("function cache lock");
        if let Some((_, f)) = cached.iter().find(|(k, _)| *k == key) {
            return Ok(f.clone());
        }
        let f = self.load(device, function)?;
        cached.push((key, f.clone()));
        Ok(f)
    }

    fn load(&self, device: &CudaDevice, function: &'static str) -> Result<CudaFunction> {
        let ptx = self.ptx.get_or_init(|| {
            let cc = device.cuda_stream().context().compute_capability().map_err(|e| e.to_string())?;
            let opts = compile_options(nvrtc_arch(cc.0, cc.1)?);
            compile_ptx_with_opts(self.source, opts)
                .map(|p| p.to_src())
                .map_err(|e| format!("NVRTC, {}: {e}", self.name))
        });
        let ptx = ptx.as_deref().map_err(|e| candle_core::Error::Cuda(e.clone().into()))?;
        Ok(device.get_or_load_custom_func(function, self.name, ptx)?.into_cuda_function())
    }
}

/// NVRTC's options for our kernels. Contraction into FMA stays on (NVRTC's default, named here so the choice
/// is visible): the kernels' products and sums round once where the emulated tests (built with
/// `-ffp-contract=off`) round twice, so device and emulator agree within rounding; the sites that must be
/// bit-exact (the KV-cache write, RoPE) use `__f*_rn` intrinsics, which are never contracted.
fn compile_options(arch: &'static str) -> CompileOptions {
    CompileOptions { arch: Some(arch), fmad: Some(true), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::super::launch::{ATTENTION_SOURCE, FUSED_SOURCE, LORA_SOURCE, NF4_SOURCE, SAMPLE_SOURCE};
    use super::*;

    /// The sources compile under NVRTC exactly as shipped (no headers) for Hopper. Needs libnvrtc, not a GPU:
    /// `cargo test --features cuda --lib gpu::` with the CUDA build environment.
    #[test]
    fn every_kernel_source_compiles_under_nvrtc() {
        for (name, src) in [
            ("nf4", NF4_SOURCE),
            ("lora", LORA_SOURCE),
            ("attention", ATTENTION_SOURCE),
            ("sample", SAMPLE_SOURCE),
            ("fused", FUSED_SOURCE),
        ] {
            let opts = compile_options("compute_90");
            let ptx = compile_ptx_with_opts(src, opts).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(ptx.to_src().contains(".entry"), "{name}: no kernel entry in the PTX");
        }
    }
}
