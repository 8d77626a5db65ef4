//! AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, bias
//! correction, eps outside the square root) and `clip_grad_norm_`.
//! Moments are plain tensors so checkpoints can save and restore them.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// Cosmos-RL's defaults (`optm_betas`, `epsilon`, `optm_weight_decay`).
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<Tensor>,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// Completed optimizer steps.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Self {
        let zeros = |p: &Tensor| Tensor::zeros_like(p).detach();
        Self {
            config,
            exp_avg: params.iter().map(zeros).collect(),
            exp_avg_sq: params.iter().map(zeros).collect(),
            params,
            step: 0,
        }
    }

    /// One step at `lr` (the scheduled LR); parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) {
        let (b1, b2) = self.config.betas;
        let t = (self.step + 1) as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        tch::no_grad(|| {
            for ((p, m), v) in self
                .params
                .iter_mut()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = p.g_mul_scalar_(1.0 - lr * self.config.weight_decay);
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = v.g_mul_scalar_(b2);
                // addcmul_(g, g, value = 1 - b2) and addcdiv_(m, denom, value = -lr / bc1), spelled out.
                let _ = v.g_add_(&(&g * &g * (1.0 - b2)));
                let denom = v.sqrt() / bc2_sqrt + self.config.eps;
                let _ = p.g_add_(&(&*m / &denom * -(lr / bc1)));
            }
        });
        self.step += 1;
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_` (2-norm over all gradients, `max_norm / (norm + 1e-6)`
/// clamped to 1). Returns the norm before clipping; `max_norm <= 0` only measures.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        // fp32 norms, fp64 ones for fp64 gradients (torch keeps the grads' dtype).
        let kind = if grads.iter().all(|g| g.kind() == Kind::Double) {
            Kind::Double
        } else {
            Kind::Float
        };
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm().to_kind(kind)).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let total_f = total.double_value(&[]);
        if max_norm > 0.0 {
            let coef = (Tensor::from(max_norm) / (&total + 1e-6)).clamp_max(1.0);
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.g_mul_(&coef.to_kind(g.kind()).to_device(g.device()));
            }
        }
        total_f
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    /// Against `torch.optim.AdamW` + `clip_grad_norm_` (scripts/parity/training.py).
    #[test]
    fn parity_adamw_with_clipping() {
        let dir = parity_case("training_adamw");
        let t = load_named(&dir.join("trace.safetensors"));
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let params: Vec<Tensor> = (0..2)
            .map(|i| t[&format!("p{i}_init")].copy().set_requires_grad(true))
            .collect();
        let mut opt = AdamW::new(
            params.iter().map(|p| p.shallow_clone()).collect(),
            AdamWConfig {
                lr: 0.0,
                betas: (0.9, 0.95),
                eps: 1e-8,
                weight_decay: 0.05,
            },
        );
        for (step, lr) in case["lrs"].as_array().unwrap().iter().enumerate() {
            opt.zero_grad();
            for (i, p) in params.iter().enumerate() {
                // Accumulate the given gradient through autograd, as a backward would.
                (p * &t[&format!("g{i}_{step}")]).sum(None).backward();
            }
            let norm = clip_grad_norm(&params, 1.0);
            let want = t[&format!("norm_{step}")].double_value(&[]);
            assert!((norm - want).abs() <= 1e-5 * want, "norm {norm} vs {want}");
            opt.step(lr.as_f64().unwrap());
            for (i, p) in params.iter().enumerate() {
                let e = max_abs_diff(p, &t[&format!("p{i}_{step}")]);
                assert!(e <= 1e-6, "step {step} param {i}: {e:e}");
            }
        }
        assert_eq!(opt.step, 4);
    }
}
