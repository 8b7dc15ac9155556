//! The NF4 weight in GPU memory and its fused dequantize-matmul (`kernels/nf4.cu`), the device twin of
//! [`crate::quant::op::Nf4Linear`]: same layout as the CPU weight (bitsandbytes'), same result within f32
//! summation order.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::cuda_backend::DeviceId;
use candle_core::{CpuStorage, CudaDevice, CustomOp1, DType, Layout, Result, Shape};

use super::launch::{self, NF4_SOURCE};
use super::nvrtc::{require_aligned, Module};
use crate::quant::nf4::{Absmax, DoubleQuant, Nf4Weight};

static MODULE: Module = Module::new("loraserve_nf4", NF4_SOURCE);

/// An NF4 weight `[n, k]` resident in device memory.
pub struct Nf4CudaWeight {
    pub n: usize,
    pub k: usize,
    packed: CudaSlice<u8>,
    double_quant: bool,
    /// Plain per-block scales (a 1-element placeholder when double-quantized).
    absmax_f32: CudaSlice<f32>,
    /// Double quantization: per-block codes, per-256-block scales, the 256-entry map, the offset
    /// (1-element placeholders when plain).
    absmax_codes: CudaSlice<u8>,
    nested_absmax: CudaSlice<f32>,
    nested_code: CudaSlice<f32>,
    offset: f32,
    code: CudaSlice<f32>,
    device: CudaDevice,
}

impl Nf4CudaWeight {
    /// Copies `w` (a 2-D NF4 weight) to `device`.
    pub fn upload(w: &Nf4Weight, device: &CudaDevice) -> Result<Self> {
        w.check_layout().map_err(candle_core::Error::wrap)?;
        let (n, k) = w.dims2();
        launch::nf4_matmul(1, n, k).map_err(candle_core::Error::msg)?;
        let stream = device.cuda_stream();
        let htod_u8 = |v: &[u8]| stream.clone_htod(v).w();
        let htod_f32 = |v: &[f32]| stream.clone_htod(v).w();
        let (double_quant, absmax_f32, absmax_codes, nested_absmax, nested_code, offset) = match &w.absmax {
            Absmax::F32(v) => (false, htod_f32(v)?, htod_u8(&[0])?, htod_f32(&[0.0])?, htod_f32(&[0.0])?, 0.0),
            Absmax::Double(d) => (
                true,
                htod_f32(&[0.0])?,
                htod_u8(&d.codes)?,
                htod_f32(&d.nested_absmax)?,
                htod_f32(&d.nested_code[..])?,
                d.offset,
            ),
        };
        Ok(Nf4CudaWeight {
            n,
            k,
            packed: htod_u8(&w.packed)?,
            double_quant,
            absmax_f32,
            absmax_codes,
            nested_absmax,
            nested_code,
            offset,
            code: htod_f32(&w.code[..])?,
            device: device.clone(),
        })
    }

    /// Device bytes held: codes, scales and tables.
    pub fn resident_bytes(&self) -> usize {
        self.packed.len()
            + 4 * (self.absmax_f32.len() + self.nested_absmax.len() + self.nested_code.len() + self.code.len())
            + self.absmax_codes.len()
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    pub fn numel(&self) -> usize {
        self.n * self.k
    }

    /// Copies the weight back to host memory, bit for bit (for checkpoints and dense views; the device copy
    /// is the only one a GPU-resident model keeps).
    pub fn download(&self) -> Result<Nf4Weight> {
        let stream = self.device.cuda_stream();
        let code: Vec<f32> = stream.clone_dtoh(&self.code).w()?;
        let absmax = if self.double_quant {
            let nested: Vec<f32> = stream.clone_dtoh(&self.nested_code).w()?;
            Absmax::Double(DoubleQuant {
                codes: stream.clone_dtoh(&self.absmax_codes).w()?,
                nested_absmax: stream.clone_dtoh(&self.nested_absmax).w()?,
                nested_code: Box::new(nested.try_into().map_err(|_| candle_core::Error::msg("nested code size"))?),
                offset: self.offset,
            })
        } else {
            Absmax::F32(stream.clone_dtoh(&self.absmax_f32).w()?)
        };
        Ok(Nf4Weight {
            shape: vec![self.n, self.k],
            packed: stream.clone_dtoh(&self.packed).w()?,
            absmax,
            code: code.try_into().map_err(|_| candle_core::Error::msg("NF4 code table size"))?,
        })
    }
}

/// `y[m, n] = x[m, k] · Wᵀ` on the device; `x` holds `m·k` contiguous f32 starting 16-byte aligned, `y` at
/// least `m·n`. Public so the device checks can fill `y` with NaN first and see every element written.
pub fn matmul_into(w: &Nf4CudaWeight, x: &CudaView<'_, f32>, m: usize, y: &mut CudaSlice<f32>) -> Result<()> {
    let l = launch::nf4_matmul(m, w.n, w.k).map_err(candle_core::Error::msg)?;
    launch_checked(w, x, m, y, l)
}

/// [`matmul_into`] through launch `l`, one of [`launch::nf4_candidates`] for this shape (the device checks
/// time other tile heights and splits of K than the ones the launcher picks).
pub fn launch_into(
    w: &Nf4CudaWeight,
    x: &CudaView<'_, f32>,
    m: usize,
    y: &mut CudaSlice<f32>,
    l: launch::Launch,
) -> Result<()> {
    // Only launches made for this shape: another grid could leave rows or columns of y unwritten.
    let (n, k) = (w.n, w.k);
    if !launch::nf4_is_candidate(m, n, k, &l) {
        candle_core::bail!("nf4 matmul: {l:?} is no launch for {m} × {n} × {k}");
    }
    launch_checked(w, x, m, y, l)
}

/// The split-K launches' scratch on one device: a partial output tile per block, and a counter per output
/// tile that the launch leaves at zero. Kept per thread, because each thread launches on its own stream
/// (where a launch starts only after the one before it ends, so one scratch serves them all in turn).
struct SplitScratch {
    device: DeviceId,
    partial: CudaSlice<f32>,
    tile_done: CudaSlice<u32>,
}

thread_local! {
    static SCRATCH: RefCell<Vec<SplitScratch>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's split-K scratch on `device`, `partial` holding at least `floats` floats
/// (grown, never shrunk: the old buffer is freed in stream order, after the launches that use it).
fn with_scratch<R>(device: &CudaDevice, floats: usize, f: impl FnOnce(&SplitScratch) -> Result<R>) -> Result<R> {
    SCRATCH.with(|cell| {
        let mut all = cell.borrow_mut();
        let i = match all.iter().position(|s| s.device == device.id()) {
            Some(i) => i,
            None => {
                let stream = device.cuda_stream();
                let tile_done = stream.alloc_zeros::<u32>(launch::NF4_SPLIT_TILES_MAX).w()?;
                let partial = stream.alloc_zeros::<f32>(1).w()?;
                all.push(SplitScratch { device: device.id(), partial, tile_done });
                all.len() - 1
            }
        };
        if all[i].partial.len() < floats {
            // SAFETY: a split block writes its whole partial tile before any block reads it (kernels/nf4.cu).
            all[i].partial = unsafe { device.alloc::<f32>(floats) }?;
        }
        f(&all[i])
    })
}

/// Launches `l`, made for this shape, after checking the buffers.
fn launch_checked(
    w: &Nf4CudaWeight,
    x: &CudaView<'_, f32>,
    m: usize,
    y: &mut CudaSlice<f32>,
    l: launch::Launch,
) -> Result<()> {
    if x.len() < m * w.k || y.len() < m * w.n {
        candle_core::bail!("nf4 matmul: x has {} elements for {m}×{}, y {} for {m}×{}", x.len(), w.k, y.len(), w.n);
    }
    require_aligned(&w.device, "nf4 matmul input", x)?;
    let func = MODULE.function(&w.device, l.kernel)?;
    let stream = w.device.cuda_stream();
    let (dq, mi, ni, ki) = (w.double_quant as i32, m as i32, w.n as i32, w.k as i32);
    let cfg = LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: 0 };
    with_scratch(&w.device, launch::nf4_workspace(&l), |scratch| {
        let mut b = stream.launch_builder(&func);
        b.arg(x)
            .arg(&w.packed)
            .arg(&dq)
            .arg(&w.absmax_f32)
            .arg(&w.absmax_codes)
            .arg(&w.nested_absmax)
            .arg(&w.nested_code)
            .arg(&w.offset)
            .arg(&w.code)
            .arg(y)
            .arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(&scratch.partial)
            .arg(&scratch.tile_done);
        // SAFETY: argument order and types match the kernels' signatures in kernels/nf4.cu; the sizes of x and
        // y are checked above, the weight buffers are the ones `upload` sized from the same Nf4Weight, and the
        // scratch holds `nf4_workspace(l)` floats and `NF4_SPLIT_TILES_MAX` zeroed counters (nf4_mma refuses
        // launches with more tiles), on this thread's stream.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })
}

/// `x[.., k] → x · Wᵀ [.., n]` for f32 tensors on the weight's device.
#[derive(Clone)]
pub struct Nf4CudaLinear(pub Arc<Nf4CudaWeight>);

impl CustomOp1 for Nf4CudaLinear {
    fn name(&self) -> &'static str {
        "nf4-linear-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("nf4-linear-cuda: the weight lives on the GPU; CPU inputs use quant::op::Nf4Linear")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let w = &self.0;
        let dims = layout.shape().dims();
        if dims.last() != Some(&w.k) || storage.dtype() != DType::F32 {
            candle_core::bail!(
                "nf4-linear-cuda: needs f32 input ending in {}, got {:?} {dims:?}",
                w.k,
                storage.dtype()
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("nf4-linear-cuda: input must be contiguous");
        };
        if !storage.device().same_device(&w.device) {
            candle_core::bail!("nf4-linear-cuda: the input is on another GPU than the weight");
        }
        let m = (end - start) / w.k;
        let x = storage.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: every element of y is written by the kernel (checked on the device with a NaN-filled y).
        let mut y = unsafe { w.device.alloc::<f32>(m * w.n) }?;
        matmul_into(w, &x, m, &mut y)?;
        let mut out = dims.to_vec();
        *out.last_mut().expect("checked above") = w.n;
        Ok((CudaStorage::wrap_cuda_slice(y, w.device.clone()), Shape::from(out)))
    }
}
