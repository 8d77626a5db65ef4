//! Cosmos-RL's warm-up / stable / decay learning-rate factor
//! (`cosmos_rl/policy/trainer/optm/__init__.py`, `warmup_stable_decay`).

use crate::{Result, SanaError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayType {
    None,
    Linear,
    Sqrt,
    Cosine,
}

impl DecayType {
    pub fn parse(s: Option<&str>) -> Result<Self> {
        match s {
            None | Some("none") => Ok(Self::None),
            Some("linear") => Ok(Self::Linear),
            Some("sqrt") => Ok(Self::Sqrt),
            Some("cosine") => Ok(Self::Cosine),
            Some(other) => Err(SanaError::input(
                "optm_decay_type",
                format!("{other:?}: expected one of none, linear, sqrt, cosine"),
            )),
        }
    }
}

/// The multiplicative LR factor for each 0-based optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub warmup_steps: u64,
    pub stable_steps: u64,
    pub decay_steps: u64,
    pub decay_type: DecayType,
    pub min_lr_factor: f64,
    pub warmup_start_factor: f64,
}

impl LrSchedule {
    /// `optm_warmup_steps` ≤ 1.0 given as a float is a fraction of `training_steps`, as in Cosmos-RL.
    pub fn new(
        training_steps: u64,
        warmup: f64,
        warmup_is_fraction: bool,
        decay_ratio: Option<f64>,
        decay_type: DecayType,
        min_lr_factor: f64,
        warmup_start_factor: f64,
    ) -> Self {
        let mut warmup_steps = if warmup_is_fraction && warmup <= 1.0 {
            (warmup * training_steps as f64) as u64
        } else {
            warmup as u64
        };
        if warmup_steps > training_steps {
            tracing::warn!(
                warmup_steps,
                training_steps,
                "warm-up longer than training; clamped"
            );
            warmup_steps = training_steps;
        }
        let decay_steps = match decay_ratio {
            Some(r) => {
                let d = (training_steps as f64 * r).round() as u64;
                d.min(training_steps - warmup_steps)
            }
            None => training_steps - warmup_steps,
        };
        // Cosmos-RL adds a virtual last step so the LR never reaches 0.
        let stable_steps = training_steps + 1 - warmup_steps - decay_steps;
        Self {
            warmup_steps,
            stable_steps,
            decay_steps,
            decay_type,
            min_lr_factor,
            warmup_start_factor,
        }
    }

    pub fn factor(&self, step: u64) -> f64 {
        let ws = self.warmup_steps + self.stable_steps;
        if step < self.warmup_steps {
            if self.warmup_steps == 1 {
                return 1.0;
            }
            let progress = step as f64 / (self.warmup_steps - 1) as f64;
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * progress;
        }
        if step < ws {
            return 1.0;
        }
        let progress = (step + 1 - ws) as f64 / self.decay_steps.max(1) as f64;
        let adj = match self.decay_type {
            DecayType::Linear => 1.0 - progress,
            DecayType::Sqrt => 1.0 - progress.sqrt(),
            DecayType::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            DecayType::None => 1.0,
        };
        self.min_lr_factor + (1.0 - self.min_lr_factor) * adj
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule::new(10, 3.0, false, None, DecayType::Cosine, 0.1, 0.0);
        assert_eq!((s.warmup_steps, s.decay_steps, s.stable_steps), (3, 7, 1));
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(1), 0.5);
        assert_eq!(s.factor(2), 1.0);
        assert_eq!(s.factor(3), 1.0);
        // Decay never reaches min_lr_factor thanks to the virtual last step.
        assert!(s.factor(9) > 0.1 && s.factor(9) < s.factor(5));
        let c = LrSchedule::new(100, 0.1, true, None, DecayType::None, 0.0, 0.0);
        assert_eq!(c.warmup_steps, 10);
        assert_eq!(c.factor(50), 1.0);
    }
}
