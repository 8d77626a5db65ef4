//! The SFT flow-matching loss as Cosmos-RL's SANA model computes it
//! (`DiffuserModel.sample_timestep_indice`, `SanaModel.add_noise`,
//! `training_sft_step`): u from diffusers' `compute_density_for_timestep_sampling`,
//! index = floor(u · 1000) into the ascending timestep table of the pipeline's
//! scheduler set to 1000 steps (flow shift = `train_flow_shift`), the scheduler's
//! sigma for that timestep, x_t = (1 - σ) x0 + σ ε, loss = mean((ε - x0 - v)²).

use tch::{Kind, Tensor};

use crate::schedulers::{DPMSolverMultistepConfig, DPMSolverMultistepScheduler, Scheduler};
use crate::{Result, SanaError};

/// diffusers' `weighting_scheme` for timestep sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightingScheme {
    LogitNormal {
        mean: f64,
        std: f64,
    },
    Mode {
        scale: f64,
    },
    /// "cosmap", "none" and anything else: uniform u (diffusers applies cosmap as a loss weight only).
    Uniform,
}

impl WeightingScheme {
    pub fn parse(name: &str, logit_mean: f64, logit_std: f64, mode_scale: f64) -> Result<Self> {
        match name {
            "logit_normal" => Ok(Self::LogitNormal {
                mean: logit_mean,
                std: logit_std,
            }),
            "mode" => Ok(Self::Mode { scale: mode_scale }),
            "cosmap" | "none" | "uniform" => Ok(Self::Uniform),
            other => Err(SanaError::input(
                "weighting_scheme",
                format!("{other:?}: expected logit_normal, mode, cosmap or none"),
            )),
        }
    }

    /// `compute_density_for_timestep_sampling` on the CPU generator: `[B]` u in [0, 1).
    pub fn sample(&self, batch: i64) -> Tensor {
        let opts = (Kind::Float, tch::Device::Cpu);
        match *self {
            // `torch.normal(mean, std, size)`: the draw scaled in double, as torch does.
            Self::LogitNormal { mean, std } => {
                Tensor::empty([batch], opts).normal_(mean, std).sigmoid()
            }
            Self::Mode { scale } => {
                let u = Tensor::rand([batch], opts);
                let c = (&u * (std::f64::consts::PI / 2.0)).cos().square();
                -&u + 1.0 - (c - 1.0 + &u) * scale
            }
            Self::Uniform => Tensor::rand([batch], opts),
        }
    }
}

/// The training timestep table: the scheduler at 1000 steps, ascending.
#[derive(Debug)]
pub struct SftTimesteps {
    /// Scheduler order (descending), as `scheduler.timesteps`.
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl SftTimesteps {
    pub fn new(scheduler_config: &DPMSolverMultistepConfig, train_flow_shift: f64) -> Result<Self> {
        let mut cfg = scheduler_config.clone();
        cfg.flow_shift = train_flow_shift;
        let steps = cfg.num_train_timesteps;
        let mut s = DPMSolverMultistepScheduler::from_config(cfg)?;
        s.set_timesteps(steps)?;
        Ok(Self {
            timesteps: s.timesteps().to_vec(),
            sigmas: s.sigmas().to_vec(),
        })
    }

    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// `(timestep, sigma)` for a sampled index into the ascending table; the sigma
    /// is found as diffusers' `index_for_timestep` does (second match on duplicates).
    pub fn at(&self, index: usize) -> (f64, f64) {
        let n = self.timesteps.len();
        let t = self.timesteps[n - 1 - index.min(n - 1)];
        let matches: Vec<usize> = (0..n).filter(|&i| self.timesteps[i] == t).collect();
        let pos = if matches.len() > 1 {
            matches[1]
        } else {
            matches[0]
        };
        (t, self.sigmas[pos])
    }

    /// Timesteps `[B]` (for the transformer) and sigmas `[B]` for sampled `u`.
    pub fn sample(&self, u: &Tensor) -> (Tensor, Tensor) {
        let u: Vec<f32> = Vec::try_from(u.to_kind(Kind::Float)).expect("1-d u");
        let (ts, ss): (Vec<f64>, Vec<f64>) = u
            .iter()
            .map(|&u| self.at((u as f64 * self.len() as f64) as usize))
            .unzip();
        (
            Tensor::from_slice(&ts).to_kind(Kind::Float),
            Tensor::from_slice(&ss).to_kind(Kind::Float),
        )
    }
}

/// `x_t` and the flow-matching target for given sigmas `[B]` and noise.
pub fn sft_inputs(x0: &Tensor, sigmas: &Tensor, noise: &Tensor) -> (Tensor, Tensor) {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, x0.dim() - 1));
    let s = sigmas
        .to_device(x0.device())
        .to_kind(x0.kind())
        .view(shape.as_slice());
    let xt = (-&s + 1.0) * x0 + &s * noise;
    (xt, noise - x0)
}

/// Per-sample loss `mean_flat((target - v)²)` (`[B]`); the trainer averages it.
pub fn sft_loss(v: &Tensor, target: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..v.dim() as i64).collect();
    (target - v).square().mean_dim(dims.as_slice(), false, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_ascending_and_matches_scheduler_sigmas() {
        let t = SftTimesteps::new(&DPMSolverMultistepConfig::sana(), 3.0).unwrap();
        assert_eq!(t.len(), 1000);
        let (t0, s0) = t.at(0);
        let (t999, s999) = t.at(999);
        assert!(t0 < t999, "ascending: {t0} < {t999}");
        assert!(s0 < s999 && s999 <= 1.0 && s0 >= 0.0);
    }

    #[test]
    fn densities_are_in_unit_interval() {
        tch::manual_seed(0);
        for w in [
            WeightingScheme::parse("logit_normal", 0.0, 1.0, 1.29).unwrap(),
            WeightingScheme::parse("mode", 0.0, 1.0, 1.29).unwrap(),
            WeightingScheme::parse("cosmap", 0.0, 1.0, 1.29).unwrap(),
        ] {
            let u = w.sample(256);
            assert!(
                u.min().double_value(&[]) >= 0.0 && u.max().double_value(&[]) <= 1.0,
                "{w:?}"
            );
        }
        assert!(WeightingScheme::parse("bogus", 0.0, 1.0, 1.0).is_err());
    }

    #[test]
    fn loss_is_zero_for_the_exact_velocity() {
        let x0 = Tensor::randn([2, 3, 4, 4], (Kind::Float, tch::Device::Cpu));
        let noise = Tensor::randn([2, 3, 4, 4], (Kind::Float, tch::Device::Cpu));
        let (_, target) = sft_inputs(&x0, &Tensor::from_slice(&[0.3f32, 0.9]), &noise);
        assert_eq!(
            sft_loss(&(&noise - &x0), &target)
                .abs()
                .max()
                .double_value(&[]),
            0.0
        );
    }
}

#[cfg(test)]
mod parity {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    /// Timestep table and noising against Cosmos-RL's `SanaModel.add_noise`
    /// (diffusers' DPM scheduler at 1000 steps; scripts/parity/training.py).
    #[test]
    fn parity_sft_timesteps_and_noising() {
        let dir = parity_case("training_sft_noise");
        let t = load_named(&dir.join("trace.safetensors"));
        let table = SftTimesteps::new(&DPMSolverMultistepConfig::sana(), 3.0).unwrap();
        let idx: Vec<i64> = Vec::try_from(&t["idx"]).unwrap();
        let want_t: Vec<f64> = Vec::try_from(&t["timesteps"]).unwrap();
        let (ts, sigmas): (Vec<f64>, Vec<f64>) = idx.iter().map(|&i| table.at(i as usize)).unzip();
        assert_eq!(ts, want_t, "timestep_map[idx]");
        let (xt, _) = sft_inputs(
            &t["x0"],
            &Tensor::from_slice(&sigmas).to_kind(Kind::Float),
            &t["noise"],
        );
        let err = max_abs_diff(&xt, &t["noised"]);
        eprintln!("sft noising max abs err {err:.3e}");
        assert!(err <= 1e-6, "{err:e}");
    }
}
