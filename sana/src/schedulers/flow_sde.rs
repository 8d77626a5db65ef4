//! Stochastic flow-matching steps with the Gaussian log-probability of the taken step, for Flow-GRPO
//! style RL rollouts and their training-time recomputation.
//!
//! Reference: cosmos-rl 0.4.7, `cosmos_rl/policy/model/diffusers/sana_model.py`,
//! `SanaModel.sde_step_with_logprob` (branches `sde_type="sde"` and `"cps"`), which is line for line
//! Flow-GRPO's `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py::sde_step_with_logprob`. Every value is
//! computed as there: float32, with the per-sample scalars (sigma, dt, std_dev_t) as float32 numbers.
//!
//! With `sigma = sigmas[i]`, `dt = sigmas[i + 1] - sigma` (negative) and velocity `v`:
//! ```text
//! std_dev_t        = sqrt(sigma / (1 - (sigma == 1 ? sigmas[1] : sigma))) * noise_level
//! prev_sample_mean = x * (1 + std_dev_t^2 / (2 sigma) * dt) + v * (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) * dt
//! prev_sample      = prev_sample_mean + std_dev_t * sqrt(-dt) * noise
//! log_prob         = mean over non-batch dims of  -(prev - mean)^2 / (2 (std_dev_t sqrt(-dt))^2)
//!                                                  - log(std_dev_t sqrt(-dt)) - log(sqrt(2 pi))
//! ```
//! `deterministic` is not in cosmos-rl's SANA function; it follows Flow-GRPO's earlier version of the
//! function and cosmos-rl's `cosmos_predict2_5_model.py::sde_step_with_logprob` (`determistic=True`):
//! `prev_sample` becomes the plain Euler (ODE) step `x + dt * v` and is scored under the same Gaussian.

use crate::error::{Result, SanaError};
use tch::{Kind, Tensor};

/// One SDE step: the sample taken, its log-probability, and the Gaussian it was drawn from.
#[derive(Debug)]
pub struct SdeStep {
    /// The next sample (float32), drawn, given, or the ODE step when `deterministic`.
    pub prev_sample: Tensor,
    /// Per-batch mean over all non-batch elements of the element-wise Gaussian log-density, `[B]`.
    pub log_prob: Tensor,
    /// Mean of the step's Gaussian (float32, shape of `sample`).
    pub prev_sample_mean: Tensor,
    /// cosmos-rl's `std_dev_t` (the SDE's sigma_t; the step's standard deviation is `std_dev_t * sqrt_neg_dt`
    /// for `sde`, `std_dev_t` itself for `cps`).
    pub std_dev_t: f64,
    /// `sqrt(-dt)` (cosmos-rl returns it with `return_sqrt_dt=True`).
    pub sqrt_neg_dt: f64,
}

struct Prepared {
    model_output: Tensor,
    sample: Tensor,
    prev_sample: Option<Tensor>,
    noise: Option<Tensor>,
    sigma: f32,
    sigma_prev: f32,
}

fn prepare(
    sigmas: &[f64],
    step_index: usize,
    model_output: &Tensor,
    sample: &Tensor,
    prev_sample: Option<&Tensor>,
    noise: Option<&Tensor>,
) -> Result<Prepared> {
    if step_index + 1 >= sigmas.len() || sigmas.len() < 2 {
        return Err(SanaError::Scheduler(format!(
            "sde step {step_index} needs sigmas[{}], but there are {} sigmas",
            step_index + 1,
            sigmas.len()
        )));
    }
    super::check_step_inputs(model_output, sample)?;
    for (name, t) in [("prev_sample", prev_sample), ("noise", noise)] {
        if let Some(t) = t {
            super::check_same_shape(name, t, sample)?;
        }
    }
    if prev_sample.is_some() && noise.is_some() {
        return Err(SanaError::input(
            "noise",
            "pass either prev_sample (to score it) or noise (to draw one), not both",
        ));
    }
    // "bf16 can overflow here when compute prev_sample_mean, we must convert all variable to fp32"
    Ok(Prepared {
        model_output: model_output.to_kind(Kind::Float),
        sample: sample.to_kind(Kind::Float),
        prev_sample: prev_sample.map(|t| t.to_kind(Kind::Float)),
        noise: noise.map(|t| t.to_kind(Kind::Float)),
        sigma: sigmas[step_index] as f32,
        sigma_prev: sigmas[step_index + 1] as f32,
    })
}

/// `log_prob.mean(dim=tuple(range(1, log_prob.ndim)))`.
fn mean_over_non_batch(t: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..t.dim() as i64).collect();
    if dims.is_empty() {
        return t.shallow_clone();
    }
    t.mean_dim(dims.as_slice(), false, None::<Kind>)
}

/// cosmos-rl's `sde_step_with_logprob` with `sde_type="sde"` (Flow-GRPO's SDE), at `step_index` of the
/// scheduler's `sigmas` (diffusers' float32 table, e.g. `Scheduler::sigmas()`; values are rounded to f32).
///
/// `prev_sample` given: it is scored (training-time recomputation) and returned as is. Otherwise the
/// step draws `prev_sample_mean + std_dev_t * sqrt(-dt) * noise` with the given `noise` (standard normal,
/// shape of `sample`) or, when `None`, fresh noise from tch's RNG. `deterministic` takes the ODE step
/// instead (see the module doc); it cannot be combined with `prev_sample`.
///
/// When `std_dev_t` is 0 (`noise_level` 0) the log-probability is not finite, as in cosmos-rl.
#[allow(clippy::too_many_arguments)]
pub fn sde_step_with_logprob(
    sigmas: &[f64],
    step_index: usize,
    model_output: &Tensor,
    sample: &Tensor,
    noise_level: f64,
    prev_sample: Option<&Tensor>,
    noise: Option<&Tensor>,
    deterministic: bool,
) -> Result<SdeStep> {
    if deterministic && prev_sample.is_some() {
        return Err(SanaError::input(
            "prev_sample",
            "a deterministic step computes prev_sample itself; do not pass one",
        ));
    }
    let p = prepare(sigmas, step_index, model_output, sample, prev_sample, noise)?;
    let (sigma, sigma_prev) = (p.sigma, p.sigma_prev);
    let sigma_max = sigmas[1] as f32;
    let dt = sigma_prev - sigma;

    // torch.where(sigma == 1, sigma_max, sigma): the sigma == 1 start would divide by zero.
    let denom_sigma = if sigma == 1.0 { sigma_max } else { sigma };
    let std_dev_t = (sigma / (1.0 - denom_sigma)).sqrt() * noise_level as f32;
    let var = std_dev_t * std_dev_t;
    let coef_sample = 1.0 + var / (2.0 * sigma) * dt;
    let coef_model = 1.0 + var * (1.0 - sigma) / (2.0 * sigma);
    let prev_sample_mean =
        &p.sample * coef_sample as f64 + &p.model_output * coef_model as f64 * dt as f64;

    let sqrt_neg_dt = (-dt).sqrt();
    let step_std = std_dev_t * sqrt_neg_dt;
    let prev_sample = if deterministic {
        &p.sample + &p.model_output * dt as f64
    } else {
        match p.prev_sample {
            Some(prev) => prev,
            None => {
                let noise = p.noise.unwrap_or_else(|| p.model_output.randn_like());
                &prev_sample_mean + noise * step_std as f64
            }
        }
    };

    // The divisor is a device tensor, not a scalar: CUDA turns division by a scalar into multiplication by
    // its reciprocal, cosmos-rl divides by a [B, 1, ...] tensor.
    let two_var = Tensor::from(2.0 * (step_std * step_std)).to_device(prev_sample.device());
    let log_sqrt_2pi = (2.0 * std::f32::consts::PI).sqrt().ln();
    let diff = prev_sample.detach() - &prev_sample_mean;
    let log_prob = (-diff.square()) / &two_var - step_std.ln() as f64 - log_sqrt_2pi as f64;
    Ok(SdeStep {
        log_prob: mean_over_non_batch(&log_prob),
        prev_sample,
        prev_sample_mean,
        std_dev_t: std_dev_t as f64,
        sqrt_neg_dt: sqrt_neg_dt as f64,
    })
}

/// cosmos-rl's `sde_step_with_logprob` with `sde_type="cps"` (coefficient-preserving sampling):
/// `std_dev_t = sigma_prev * sin(noise_level * pi / 2)`, mean
/// `x0 * (1 - sigma_prev) + x1 * sqrt(sigma_prev^2 - std_dev_t^2)` with `x0 = x - sigma v`,
/// `x1 = x + (1 - sigma) v`, and the log-probability without constants: `-mean((prev - mean)^2)`.
/// `prev_sample`/`noise` as in [`sde_step_with_logprob`].
pub fn cps_step_with_logprob(
    sigmas: &[f64],
    step_index: usize,
    model_output: &Tensor,
    sample: &Tensor,
    noise_level: f64,
    prev_sample: Option<&Tensor>,
    noise: Option<&Tensor>,
) -> Result<SdeStep> {
    let p = prepare(sigmas, step_index, model_output, sample, prev_sample, noise)?;
    let (sigma, sigma_prev) = (p.sigma, p.sigma_prev);
    let std_dev_t = sigma_prev * (noise_level * std::f64::consts::PI / 2.0).sin() as f32;
    let pred_original_sample = &p.sample - &p.model_output * sigma as f64;
    let noise_estimate = &p.sample + &p.model_output * (1.0 - sigma) as f64;
    let prev_sample_mean = pred_original_sample * (1.0 - sigma_prev) as f64
        + noise_estimate * (sigma_prev * sigma_prev - std_dev_t * std_dev_t).sqrt() as f64;
    let prev_sample = match p.prev_sample {
        Some(prev) => prev,
        None => {
            let noise = p.noise.unwrap_or_else(|| p.model_output.randn_like());
            &prev_sample_mean + noise * std_dev_t as f64
        }
    };
    let diff = prev_sample.detach() - &prev_sample_mean;
    let log_prob = -diff.square();
    Ok(SdeStep {
        log_prob: mean_over_non_batch(&log_prob),
        prev_sample,
        prev_sample_mean,
        std_dev_t: std_dev_t as f64,
        sqrt_neg_dt: (sigma - sigma_prev).sqrt() as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::test_util::{case_dir, max_abs_diff, Trace, TOL};
    use crate::schedulers::{
        scheduler_from_config_file, FlowMatchEulerDiscreteScheduler, Scheduler,
    };
    use tch::Device;

    fn check_sde_case(case: &str) {
        let dir = case_dir(case);
        let trace = Trace::load(&dir);
        let steps = trace.steps();
        let mut sched = scheduler_from_config_file(&dir.join("scheduler_config.json")).unwrap();
        sched.set_timesteps(steps).unwrap();
        let sigmas = sched.sigmas().to_vec();
        let ref_sigmas = trace.vec("sigmas");
        let sig_err = crate::schedulers::test_util::max_abs_diff_slice(&sigmas, &ref_sigmas);
        assert!(sig_err <= TOL, "{case}: sigmas differ by {sig_err:e}");

        let c = &trace.case;
        let sde_type = c["sde_type"].as_str().unwrap();
        let noise_level = c["noise_level"].as_f64().unwrap();
        let deterministic = c["deterministic"].as_bool().unwrap();
        let given_prev = c["given_prev"].as_bool().unwrap();
        let (mut e_prev, mut e_mean, mut e_lp, mut e_std) = (0.0_f64, 0.0_f64, 0.0_f64, 0.0_f64);
        for i in 0..steps {
            let mo = trace.input(&format!("model_output_{i}"));
            let x = trace.input(&format!("sample_{i}"));
            let given = given_prev.then(|| trace.input(&format!("prev_sample_in_{i}")));
            let noise = (!given_prev).then(|| trace.input(&format!("noise_{i}")));
            let out = match sde_type {
                "sde" => sde_step_with_logprob(
                    &sigmas,
                    i,
                    &mo,
                    &x,
                    noise_level,
                    given.as_ref(),
                    noise.as_ref().filter(|_| !deterministic),
                    deterministic,
                ),
                "cps" => cps_step_with_logprob(
                    &sigmas,
                    i,
                    &mo,
                    &x,
                    noise_level,
                    given.as_ref(),
                    noise.as_ref(),
                ),
                other => panic!("unknown sde_type {other}"),
            }
            .unwrap_or_else(|e| panic!("{case}: step {i}: {e}"));
            assert_eq!(out.log_prob.size(), vec![x.size()[0]]);
            e_prev = e_prev.max(max_abs_diff(
                &out.prev_sample,
                trace.get(&format!("prev_sample_{i}")),
            ));
            e_mean = e_mean.max(max_abs_diff(
                &out.prev_sample_mean,
                trace.get(&format!("prev_sample_mean_{i}")),
            ));
            // log_prob is a mean of squares that grows large for a prev_sample far from the mean, and its
            // reduction order differs by device: compare it relative to its size.
            let lp_ref = trace.get(&format!("log_prob_{i}"));
            let scale = lp_ref.abs().max().double_value(&[]).max(1.0);
            e_lp = e_lp.max(max_abs_diff(&out.log_prob, lp_ref) / scale);
            let std_ref = trace.vec(&format!("std_dev_t_{i}"));
            for s in std_ref {
                e_std = e_std.max((out.std_dev_t - s).abs());
            }
        }
        eprintln!(
            "scheduler_{case}: max |diff| sigmas {sig_err:.3e}, prev_sample {e_prev:.3e}, \
             prev_sample_mean {e_mean:.3e}, log_prob (relative to max(1, |log_prob|)) {e_lp:.3e}, \
             std_dev_t {e_std:.3e}"
        );
        assert!(e_prev <= TOL, "{case}: prev_sample differs by {e_prev:e}");
        assert!(
            e_mean <= TOL,
            "{case}: prev_sample_mean differs by {e_mean:e}"
        );
        assert!(e_lp <= TOL, "{case}: log_prob differs by {e_lp:e}");
        assert!(e_std <= TOL, "{case}: std_dev_t differs by {e_std:e}");
    }

    #[test]
    fn parity_sde_euler_shift3_10() {
        check_sde_case("sde_euler_shift3_10");
    }

    #[test]
    fn parity_sde_dpm_sana_10() {
        check_sde_case("sde_dpm_sana_10");
    }

    #[test]
    fn parity_sde_given_prev_10() {
        check_sde_case("sde_given_prev_10");
    }

    #[test]
    fn parity_sde_deterministic_10() {
        check_sde_case("sde_deterministic_10");
    }

    #[test]
    fn parity_cps_euler_shift3_10() {
        check_sde_case("cps_euler_shift3_10");
    }

    /// A smooth deterministic tensor (no global RNG: tests run in parallel and would interleave draws).
    fn wave(freq: f64, amp: f64) -> Tensor {
        (Tensor::arange(120, (Kind::Float, Device::Cpu)) * freq)
            .sin()
            .reshape([2, 3, 4, 5])
            * amp
    }

    fn setup() -> (Vec<f64>, Tensor, Tensor) {
        let mut s = FlowMatchEulerDiscreteScheduler::new(3.0);
        s.set_timesteps(6).unwrap();
        (s.sigmas().to_vec(), wave(0.37, 1.5), wave(0.71, 1.2))
    }

    #[test]
    fn deterministic_step_is_the_euler_step() {
        let (sigmas, x, v) = setup();
        let mut euler = FlowMatchEulerDiscreteScheduler::new(3.0);
        euler.set_timesteps(6).unwrap();
        for i in 0..6 {
            let ode = sde_step_with_logprob(&sigmas, i, &v, &x, 0.7, None, None, true).unwrap();
            let e = euler.step(&v, &x).unwrap();
            assert_eq!(max_abs_diff(&ode.prev_sample, &e), 0.0);
            assert!(ode.log_prob.isfinite().all().int64_value(&[]) != 0);
        }
    }

    #[test]
    fn given_prev_sample_scores_itself_and_noise_reproduces() {
        let (sigmas, x, v) = setup();
        let noise = wave(1.3, 1.7);
        let a = sde_step_with_logprob(&sigmas, 2, &v, &x, 0.7, None, Some(&noise), false).unwrap();
        let b = sde_step_with_logprob(&sigmas, 2, &v, &x, 0.7, Some(&a.prev_sample), None, false)
            .unwrap();
        assert_eq!(max_abs_diff(&a.prev_sample, &b.prev_sample), 0.0);
        assert_eq!(max_abs_diff(&a.log_prob, &b.log_prob), 0.0);
        // The log-density of a standard-normal draw: -z^2/2 - log(std) - log(sqrt(2 pi)).
        let z2 = noise
            .square()
            .mean_dim([1i64, 2, 3].as_slice(), false, None::<Kind>);
        let step_std = a.std_dev_t * a.sqrt_neg_dt;
        let expected = z2 * -0.5 - step_std.ln() - (2.0 * std::f64::consts::PI).sqrt().ln();
        assert!(max_abs_diff(&a.log_prob, &expected) < 1e-4);
        // Drawn noise (None) works and differs from the given one.
        let c = sde_step_with_logprob(&sigmas, 2, &v, &x, 0.7, None, None, false).unwrap();
        assert!(max_abs_diff(&c.prev_sample, &a.prev_sample) > 0.0);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let (sigmas, x, v) = setup();
        let n = sigmas.len();
        assert!(matches!(
            sde_step_with_logprob(&sigmas, n - 1, &v, &x, 0.7, None, None, false),
            Err(SanaError::Scheduler(_))
        ));
        assert!(matches!(
            sde_step_with_logprob(&sigmas, 0, &v, &x, 0.7, Some(&x), None, true),
            Err(SanaError::Input { .. })
        ));
        assert!(matches!(
            sde_step_with_logprob(&sigmas, 0, &v, &x, 0.7, Some(&x), Some(&x), false),
            Err(SanaError::Input { .. })
        ));
        let wrong = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(
            cps_step_with_logprob(&sigmas, 0, &v, &x, 0.7, None, Some(&wrong)),
            Err(SanaError::Input { .. })
        ));
    }
}
