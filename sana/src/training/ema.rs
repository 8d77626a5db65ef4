//! EMA of the trainable parameters (`cosmos_rl/utils/ema.py`, `EMAModuleWrapper`).

use tch::Tensor;

#[derive(Debug)]
pub struct Ema {
    pub decay: f64,
    pub update_step_interval: u64,
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// `update_step_interval` 0 means every step, as Cosmos-RL's config documents.
    pub fn new(params: &[Tensor], decay: f64, update_step_interval: u64) -> Self {
        let shadow = tch::no_grad(|| params.iter().map(|p| p.detach().copy()).collect());
        Self {
            decay,
            update_step_interval: update_step_interval.max(1),
            shadow,
        }
    }

    /// decay_k = min((1 + k) / (10 + k), decay)
    pub fn current_decay(&self, step: u64) -> f64 {
        ((1 + step) as f64 / (10 + step) as f64).min(self.decay)
    }

    /// ema += (1 - decay_k) (param - ema), every `update_step_interval` optimizer steps.
    pub fn step(&mut self, params: &[Tensor], step: u64) {
        let one_minus = 1.0 - self.current_decay(step);
        if !(step + 1).is_multiple_of(self.update_step_interval) {
            return;
        }
        tch::no_grad(|| {
            for (e, p) in self.shadow.iter_mut().zip(params) {
                let delta = (p.to_device(e.device()) - &*e) * one_minus;
                let _ = e.g_add_(&delta);
            }
        });
    }
}

/// Cosmos-RL's `get_weight_copy_decay`: how much of the "old" adapter survives each step.
pub fn weight_copy_decay(step: u64, decay_type: u8) -> crate::Result<f64> {
    let (flat, uprate, uphold) = match decay_type {
        0 => (0u64, 0.0, 0.0),
        1 => (0, 0.001, 0.5),
        2 => (75, 0.0075, 0.999),
        other => {
            return Err(crate::SanaError::input(
                "weight_copy_decay_type",
                format!("{other}: expected 0, 1 or 2"),
            ))
        }
    };
    if step < flat {
        return Ok(0.0);
    }
    Ok(((step - flat) as f64 * uprate).min(uphold))
}

/// old ← decay·old + (1 − decay)·src, under no_grad (`copy_weights_with_decay`).
pub fn copy_weights_with_decay(src: &[Tensor], old: &mut [Tensor], decay: f64) {
    tch::no_grad(|| {
        for (s, o) in src.iter().zip(old.iter_mut()) {
            let v = o.detach() * decay + s.detach() * (1.0 - decay);
            o.copy_(&v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn decay_schedules_match_cosmos() {
        assert_eq!(weight_copy_decay(10, 0).unwrap(), 0.0);
        assert_eq!(weight_copy_decay(100, 1).unwrap(), 0.1);
        assert_eq!(weight_copy_decay(1000, 1).unwrap(), 0.5);
        assert_eq!(weight_copy_decay(74, 2).unwrap(), 0.0);
        assert!((weight_copy_decay(175, 2).unwrap() - 0.75).abs() < 1e-12);
        assert_eq!(weight_copy_decay(10_000, 2).unwrap(), 0.999);
        assert!(weight_copy_decay(1, 3).is_err());
    }

    #[test]
    fn ema_follows_warmup_decay() {
        let p = Tensor::zeros([3], (Kind::Double, Device::Cpu));
        let mut ema = Ema::new(std::slice::from_ref(&p), 0.9999, 0);
        let p1 = Tensor::ones([3], (Kind::Double, Device::Cpu));
        ema.step(std::slice::from_ref(&p1), 0);
        // decay_0 = 1/10 → ema = 0 + 0.9 (1 - 0)
        assert!((ema.shadow[0].double_value(&[0]) - 0.9).abs() < 1e-12);
    }

    #[test]
    fn copy_with_decay_blends() {
        let src = vec![Tensor::ones([2], (Kind::Float, Device::Cpu))];
        let mut old = vec![Tensor::zeros([2], (Kind::Float, Device::Cpu))];
        copy_weights_with_decay(&src, &mut old, 0.25);
        assert_eq!(old[0].double_value(&[1]), 0.75);
    }
}
