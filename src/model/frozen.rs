//! `x · Wᵀ` against a weight that training never updates (a dense base linear, the LM head): candle's own
//! matmul forward, with a backward that returns the gradient for `x` only.
//!
//! candle's `Matmul` backward computes the gradient of both operands whether or not one needs it, and keeps
//! the one it computed for a tensor outside the graph (the frozen weight) in the gradient store it returns:
//! with a dense base, a weight-sized gradient (in the compute dtype) for every linear layer and the head — the
//! whole model again — and a third matmul per linear. As a custom op with no gradient for its second operand,
//! the frozen weight costs the backward nothing; the forward and the input's gradient are the very calls
//! `Tensor::matmul` makes.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x [m, k] · Wᵀ` for `W [n, k]`; the backward computes `∂x` alone.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((m, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    if k != k2 {
        candle_core::bail!("frozen-matmul: input [{m}, {k}] against a weight of {n} rows of {k2}")
    }
    // As `Tensor::matmul`: an empty product is zeros, without a call to the backend.
    if m * n == 0 || k == 0 {
        return Tensor::zeros((m, n), x.dtype(), x.device());
    }
    x.apply_op2(&w.t()?, FrozenMatmul)
}

/// The op over `(x [m, k], Wᵀ [k, n])`.
struct FrozenMatmul;

/// `(batch, m, n, k)` of `x · wt` for the 2-D layouts [`frozen_matmul`] checked, as `Tensor::matmul` derives it.
fn bmnk(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize, usize)> {
    let ((m, k), (_, n)) = (xl.shape().dims2()?, wl.shape().dims2()?);
    Ok((1, m, n, k))
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, m, n, k) = bmnk(xl, wl)?;
        Ok((xs.matmul(ws, (b, m, n, k), xl, wl)?, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, m, n, k) = bmnk(xl, wl)?;
        Ok((xs.matmul(ws, (b, m, n, k), xl, wl)?, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, wt: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // `Tensor::matmul`'s backward for its left operand, and nothing for the frozen right one.
        Ok((Some(grad.matmul(&wt.t()?)?), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::frozen_matmul;

    /// The forward and the input's gradient are bit for bit `Tensor::matmul`'s, and the weight gets no gradient
    /// (candle's matmul leaves a weight-sized one in the store).
    #[test]
    fn the_input_gradient_is_matmuls_and_the_weight_gets_none() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 7), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 7), &dev).unwrap();
        let g = Tensor::randn(0f32, 1., (5, 3), &dev).unwrap();

        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = frozen_matmul(x.as_tensor(), &w).unwrap();
        assert_eq!(plain.to_vec2::<f32>().unwrap(), frozen.to_vec2::<f32>().unwrap());

        let grads_plain = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let grads_frozen = (frozen * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = |s: &candle_core::backprop::GradStore| s.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gx(&grads_plain), gx(&grads_frozen));
        // The store keeps a gradient per tensor it reached: candle's matmul adds one for the transposed weight.
        let weight_sized = |s: &candle_core::backprop::GradStore| {
            s.get_ids().filter(|id| s.get_id(**id).is_some_and(|t| t.dims() == [7, 3])).count()
        };
        assert_eq!(weight_sized(&grads_plain), 1);
        assert_eq!(weight_sized(&grads_frozen), 0);
    }
}
