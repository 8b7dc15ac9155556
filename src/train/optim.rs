//! AdamW (PyTorch's, as the Hugging Face Trainer uses it: decoupled weight decay, bias-corrected moments),
//! global-norm gradient clipping, and the learning-rate schedules (linear warmup, then linear or cosine
//! decay — `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup`).

use candle_core::{Result, Tensor, Var};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.001 }
    }
}

/// Optimizer state: first and second moments per parameter, and the step count.
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[&Var]) -> Result<Self> {
        let zeros = |p: &&Var| p.as_tensor().zeros_like();
        Ok(AdamW {
            config,
            step: 0,
            m: params.iter().map(zeros).collect::<Result<_>>()?,
            v: params.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn update(&mut self, params: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let mut theta = p.as_tensor().clone();
            if c.weight_decay > 0.0 {
                theta = (&theta * (1.0 - lr * c.weight_decay))?;
            }
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            p.set(&(theta - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    Linear,
    Cosine,
}

/// Learning rate at optimizer step `step` (0-based), Hugging Face's formulas.
pub fn lr_at(base: f64, step: u64, warmup: u64, total: u64, decay: Decay) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    base * match decay {
        Decay::Linear => (1.0 - progress).max(0.0),
        Decay::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert_eq!(lr_at(1.0, 0, 10, 100, Decay::Linear), 0.0);
        assert_eq!(lr_at(1.0, 5, 10, 100, Decay::Linear), 0.5);
        assert_eq!(lr_at(1.0, 10, 10, 100, Decay::Linear), 1.0);
        assert!((lr_at(1.0, 55, 10, 100, Decay::Linear) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, 55, 10, 100, Decay::Cosine) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(1.0, 100, 10, 100, Decay::Cosine), 0.0);
    }

    #[test]
    fn adamw_matches_the_pytorch_update() {
        // One parameter, two steps, worked by hand from torch.optim.AdamW's documentation.
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f32], &dev).unwrap()).unwrap();
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let mut opt = AdamW::new(cfg, &[&p]).unwrap();
        let g = Tensor::new(&[0.5f32], &dev).unwrap();
        opt.update(&[&p], std::slice::from_ref(&g), 0.1).unwrap();
        // theta = 1·(1 − 0.1·0.5) = 0.95; m̂ = 0.5, v̂ = 0.25 → step 0.1·0.5/(0.5+1e-8) ≈ 0.1
        let after = p.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((after - 0.85).abs() < 1e-6, "{after}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3.0f32], &dev).unwrap(), Tensor::new(&[4.0f32], &dev).unwrap()];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
    }
}
