//! The NF4 linear op as candle custom ops, so the one model forward (and its autograd, for QLoRA training)
//! calls `x.apply_op1(Nf4Linear)` like any other tensor op. Inputs of any float dtype are computed in f32
//! and returned in the input's dtype.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::matmul;
use super::nf4::Nf4Weight;
use crate::tensor_io::{cpu_f32, cpu_storage_from_f32};

/// `x[.., k] → x · Wᵀ [.., n]`; its gradient with respect to `x` is [`Nf4LinearT`].
#[derive(Clone)]
pub struct Nf4Linear(pub Arc<Nf4Weight>);

/// `g[.., n] → g · W [.., k]`: the backward of [`Nf4Linear`].
#[derive(Clone)]
pub struct Nf4LinearT(pub Arc<Nf4Weight>);

fn leading(layout: &Layout, last: usize, op: &str) -> Result<(usize, Vec<usize>)> {
    let dims = layout.shape().dims();
    match dims.last() {
        Some(&d) if d == last => Ok((layout.shape().elem_count() / last.max(1), dims[..dims.len() - 1].to_vec())),
        _ => candle_core::bail!("{op}: input shape {dims:?} does not end in {last}"),
    }
}

impl CustomOp1 for Nf4Linear {
    fn name(&self) -> &'static str {
        "nf4-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims2();
        let (m, mut dims) = leading(layout, k, self.name())?;
        let x = cpu_f32(storage, layout)?;
        let y = matmul::matmul(&x, m, &self.0);
        dims.push(n);
        Ok((cpu_storage_from_f32(y, storage.dtype())?, Shape::from(dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Nf4LinearT(self.0.clone()))?))
    }
}

impl CustomOp1 for Nf4LinearT {
    fn name(&self) -> &'static str {
        "nf4-linear-t"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims2();
        let (m, mut dims) = leading(layout, n, self.name())?;
        let g = cpu_f32(storage, layout)?;
        let out = matmul::matmul_t(&g, m, &self.0);
        dims.push(k);
        Ok((cpu_storage_from_f32(out, storage.dtype())?, Shape::from(dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Nf4Linear(self.0.clone()))?))
    }
}
