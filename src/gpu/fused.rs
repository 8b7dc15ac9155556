//! Fused element-wise steps of the decoder layer on the device (`kernels/fused.cu`), each one launch and one
//! allocation where candle's ops take two: the residual add with the RMS norm after it, and the SwiGLU gate.
//! Their CPU twins are the plain ops the model runs elsewhere (`x + d` then `candle_nn::ops::rms_norm`;
//! `silu(g) · u`), with the same formulas.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::launch::{self, FUSED_SOURCE};
use super::nvrtc::{f32_view, Module};

static MODULE: Module = Module::new("loraserve_fused", FUSED_SOURCE);

/// `x_out = x + d` and `h = rms_norm(x_out) · w` over `rows` rows of `hidden` features. Public so the device
/// checks can poison both outputs first.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_into(
    device: &CudaDevice,
    x: &CudaView<'_, f32>,
    d: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    (rows, hidden): (usize, usize),
    eps: f32,
    x_out: &mut CudaViewMut<'_, f32>,
    h: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let l = launch::add_rms_norm(rows, hidden).map_err(candle_core::Error::msg)?;
    let n = rows * hidden;
    if x.len() < n || d.len() < n || w.len() < hidden || x_out.len() < n || h.len() < n {
        candle_core::bail!(
            "add + RMS norm: buffers of {}, {}, {} (weight), {}, {} elements for {rows}×{hidden}",
            x.len(),
            d.len(),
            w.len(),
            x_out.len(),
            h.len()
        );
    }
    let func = MODULE.function(device, l.kernel)?;
    let stream = device.cuda_stream();
    let hidden_i = hidden as i32;
    let cfg = LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&func);
    b.arg(x).arg(d).arg(w).arg(x_out).arg(h).arg(&hidden_i).arg(&eps);
    // SAFETY: the arguments follow add_rms_norm's signature in kernels/fused.cu; every size is checked above,
    // and x_out and h are mutable views, so neither aliases an input.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// `out = silu(g) · u` over `n` elements. Public so the device checks can poison `out` first.
pub fn silu_mul_into(
    device: &CudaDevice,
    g: &CudaView<'_, f32>,
    u: &CudaView<'_, f32>,
    n: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let l = launch::silu_mul(n).map_err(candle_core::Error::msg)?;
    if g.len() < n || u.len() < n || out.len() < n {
        candle_core::bail!("SiLU·mul: buffers of {}, {} and {} elements for {n}", g.len(), u.len(), out.len());
    }
    let func = MODULE.function(device, l.kernel)?;
    let stream = device.cuda_stream();
    let n_i = n as i32;
    let cfg = LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&func);
    b.arg(g).arg(u).arg(out).arg(&n_i);
    // SAFETY: the arguments follow silu_mul's signature in kernels/fused.cu; the sizes are checked above.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// `(x + d, rms_norm(x + d) · w)` for `x`, `d` `[.., hidden]` and `w [hidden]`, f32 on one GPU, in one launch.
/// Both results are views of one new buffer (the second starting 16-byte aligned, as the NF4 and LoRA kernels
/// that read it need).
pub fn add_rms_norm(x: &Tensor, d: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    if x.dims() != d.dims() {
        candle_core::bail!("add + RMS norm: x {:?} and d {:?} differ", x.dims(), d.dims());
    }
    let n = x.elem_count();
    let half = n.next_multiple_of(4);
    let both = x.contiguous()?.apply_op3_no_bwd(&d.contiguous()?, &w.contiguous()?, &AddRmsNorm { eps, half })?;
    Ok((both.narrow(0, 0, n)?.reshape(x.shape())?, both.narrow(0, half, n)?.reshape(x.shape())?))
}

/// The op behind [`add_rms_norm`]: one flat output, `x + d` at 0 and the normed rows at `half`.
struct AddRmsNorm {
    eps: f32,
    half: usize,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm-cuda"
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
        candle_core::bail!("add-rms-norm-cuda: CPU tensors take x + d and candle_nn::ops::rms_norm")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        d: &CudaStorage,
        dl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        const OP: &str = "add-rms-norm-cuda";
        let hidden = *xl.shape().dims().last().unwrap_or(&0);
        if wl.shape().dims() != [hidden] {
            candle_core::bail!("{OP}: weight {:?} for rows of {hidden} features", wl.shape().dims());
        }
        let rows = xl.shape().elem_count() / hidden.max(1);
        let device = x.device().clone();
        // SAFETY: the kernel writes both halves' first rows·hidden elements (checked on the device with NaN fill);
        // the padding between them is never read (the views returned start at 0 and at `half`).
        let mut out = unsafe { device.alloc::<f32>(2 * self.half) }?;
        let (mut x_out, mut h) = out.split_at_mut(self.half);
        add_rms_norm_into(
            &device,
            &f32_view(OP, "x", x, xl)?,
            &f32_view(OP, "d", d, dl)?,
            &f32_view(OP, "the weight", w, wl)?,
            (rows, hidden),
            self.eps,
            &mut x_out,
            &mut h,
        )?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(2 * self.half)))
    }
}

/// `silu(g) · u` for f32 tensors of one shape on one GPU, in one launch.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        candle_core::bail!("SiLU·mul: gate {:?} and up {:?} differ", g.dims(), u.dims());
    }
    g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("silu-mul-cuda: CPU tensors take silu(g) * u")
    }

    fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
        const OP: &str = "silu-mul-cuda";
        let n = gl.shape().elem_count();
        let device = g.device().clone();
        // SAFETY: the kernel writes all n elements (checked on the device with NaN fill).
        let mut out = unsafe { device.alloc::<f32>(n) }?;
        silu_mul_into(&device, &f32_view(OP, "g", g, gl)?, &f32_view(OP, "u", u, ul)?, n, &mut out.slice_mut(..))?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), gl.shape().clone()))
    }
}
