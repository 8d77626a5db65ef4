//! DiffusionNFT's rollout solvers: the five ways its sampler steps a flow-matching model from noise to an
//! image over a sigma schedule, with the log-probability of each step where the solver defines one.
//!
//! Reference: DiffusionNFT's `flow_grpo/diffusers_patch/solver.py`, shipped verbatim by Cosmos-RL 0.4.7 as
//! `cosmos_rl/utils/diffusers/solver.py`: `run_sampling(v_pred_fn, z, sigma_schedule, solver, determistic,
//! eta)`. Every value is computed as there, with the same float32/float64 split (see below);
//! `scripts/parity/solvers.py` runs that file itself for the parity tests.
//!
//! With `s = sigmas[i]`, `t = sigmas[i + 1]` (`t < s`), velocity `v`, sample `x`, `x0 = x - s v`, standard
//! normal `n`, and `eta` 0 when deterministic:
//! ```text
//! flow  (flow_grpo_step)  std = sqrt(s / (1 - s)) eta,  dt = t - s
//!       mean = x (1 + std^2 / (2 s) dt) + v (1 + std^2 (1 - s) / (2 s)) dt,  prev = mean + std sqrt(-dt) n
//!       log_prob = mean_{non-batch}( -(prev - mean)^2 / (2 (std sqrt(-dt))^2)
//!                                    - log(std sqrt(-dt)) - log sqrt(2 pi) )
//! dance (dance_grpo_step) std = eta sqrt(s - t),  score = -(x - x0 (1 - s)) / s^2
//!       mean = x + (t - s) v + (-eta^2 / 2) score (t - s),  prev = mean + std n
//!       log_prob = mean_{non-batch}( -(prev - mean)^2 / (2 std^2) )          (no constant term, see dance_step)
//! ddim  (ddim_update)     std = eta t,  dt_sqrt = sqrt(1 - t^2 (1 - s)^2 / (s^2 (1 - t)^2)),  rho = std dt_sqrt
//!       mean = (1 - t) x0 + sqrt(t^2 - rho^2) (x - (1 - s) x0) / s,  prev = mean + rho n
//!       log_prob = as flow with std dt_sqrt in place of std sqrt(-dt)
//! dpm1  DPM-Solver++ first order on x0 (lambda = log((1 - sigma) / sigma), h = lambda_t - lambda_s):
//!       prev = (t / s) x - (1 - t) (e^-h - 1) x0;  steps 0 and last use ddim with eta 0 instead
//! dpm2  second order multistep: D1 = (x0_i - x0_{i-1}) / r0, r0 = (lambda_s - lambda_{i-1}) / h,
//!       prev = (t / s) x - (1 - t) (e^-h - 1) (x0 + D1 / 2);  step 0 and the last step as dpm1's
//! ```
//!
//! Precision as in the reference: tensor math in float32 (`pred.float()`, `z.float()`); flow's and dance's
//! scalars are float32 (their sigmas come from the float32 schedule, `scheduler.sigmas.float()`), except
//! dance's `std` (Python's `math.sqrt`, float64); ddim's and dpm's scalars are float64
//! (`sigmas.to(torch.float64)` of the float32 values), while their `x0 = x - s v` uses the float32 sigma.
//! A float64 scalar times a float32 tensor is float32: torch casts the 0-dim float64 tensor to float32 when
//! the op runs, as tch does with the `f64` scalar operands below. The scalars' sqrt/log/exp go through
//! torch's own CPU kernels (see `torch_scalar`), so that on the CPU every step is bit-identical to the Python.
//!
//! Deterministic runs (and dpm, which is deterministic only) score their step under a zero-width Gaussian:
//! `log_prob` is NaN (`0 / 0`) for flow, dance and ddim, as DiffusionNFT computes it (it never uses it).

use crate::error::{Result, SanaError};
use tch::{Kind, Tensor};

/// The rollout solver (DiffusionNFT's `solver` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SolverKind {
    Flow,
    Dance,
    Ddim,
    Dpm1,
    Dpm2,
}

impl SolverKind {
    pub const NAMES: [&'static str; 5] = ["flow", "dance", "ddim", "dpm1", "dpm2"];
    const ALL: [SolverKind; 5] = [
        SolverKind::Flow,
        SolverKind::Dance,
        SolverKind::Ddim,
        SolverKind::Dpm1,
        SolverKind::Dpm2,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SolverKind::Flow => "flow",
            SolverKind::Dance => "dance",
            SolverKind::Ddim => "ddim",
            SolverKind::Dpm1 => "dpm1",
            SolverKind::Dpm2 => "dpm2",
        }
    }

    fn dpm_order(self) -> Option<usize> {
        match self {
            SolverKind::Dpm1 => Some(1),
            SolverKind::Dpm2 => Some(2),
            _ => None,
        }
    }
}

/// A rollout solver as a run configures it: solver, deterministic_sampling, noise_level (eta).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolverConfig {
    pub kind: SolverKind,
    pub deterministic: bool,
    pub eta: f64,
}

impl SolverConfig {
    /// `name` is one of NAMES or `euler` (an alias of deterministic `flow`; refused with
    /// `deterministic = false`, which it would ignore).
    /// Errors (SanaError::input with key "solver" / "deterministic_sampling"): unknown name (message lists
    /// the allowed values: flow, dance, ddim, dpm1, dpm2, euler), a dpm* solver with deterministic = false
    /// (DiffusionNFT asserts), a negative or non-finite eta (key "noise_level").
    pub fn parse(name: &str, deterministic: bool, noise_level: f64) -> Result<Self> {
        let (kind, deterministic) = if name == "euler" {
            // An alias of deterministic flow: asking it for noise would be ignored.
            if !deterministic {
                return Err(SanaError::input(
                    "deterministic_sampling",
                    "solver `euler` is deterministic `flow`: set deterministic_sampling = true, \
                     or solver = \"flow\" for stochastic sampling",
                ));
            }
            (SolverKind::Flow, true)
        } else {
            let kind = SolverKind::ALL
                .into_iter()
                .find(|k| k.as_str() == name)
                .ok_or_else(|| {
                    SanaError::input(
                        "solver",
                        format!(
                            "unknown solver `{name}` (allowed: {}, euler)",
                            SolverKind::NAMES.join(", ")
                        ),
                    )
                })?;
            (kind, deterministic)
        };
        if kind.dpm_order().is_some() && !deterministic {
            return Err(SanaError::input(
                "deterministic_sampling",
                format!(
                    "solver `{name}` is deterministic only (DiffusionNFT's run_sampling asserts it): \
                     set deterministic_sampling = true"
                ),
            ));
        }
        if !noise_level.is_finite() || noise_level < 0.0 {
            return Err(SanaError::input(
                "noise_level",
                format!("expected a finite eta >= 0, got {noise_level}"),
            ));
        }
        Ok(SolverConfig {
            kind,
            deterministic,
            eta: noise_level,
        })
    }

    /// The eta the steps use: 0 when deterministic.
    pub fn effective_eta(&self) -> f64 {
        if self.deterministic {
            0.0
        } else {
            self.eta
        }
    }
}

/// One solver step's results (float32 tensors of the sample's shape; `log_prob` is `[B]`).
#[derive(Debug)]
pub struct SolverStep {
    pub prev_sample: Tensor,
    /// The step's data prediction `x - sigma * v` (`pred_original` in DiffusionNFT).
    pub pred_original_sample: Tensor,
    /// Mean over non-batch elements of the step's Gaussian log-density; `None` for dpm (as in DiffusionNFT).
    pub log_prob: Option<Tensor>,
}

/// One sampling run over a sigma schedule (length num_steps + 1, from the run's scheduler, descending to 0).
#[derive(Debug)]
pub struct SolverRun {
    cfg: SolverConfig,
    /// The schedule rounded to float32, as DiffusionNFT receives it (`scheduler.sigmas.float()`).
    sigmas: Vec<f64>,
    /// The step `step` expects next.
    next: usize,
    /// DPMState: the previous step's data prediction and `lower_order_nums`.
    prev_x0: Option<Tensor>,
    lower_order_nums: usize,
    /// Whether steps compute `log_prob` (a sampling loop that drops it skips the work).
    log_prob: bool,
}

impl SolverRun {
    /// Errors when there are fewer than 2 sigmas or they are not finite, within [0, 1] and strictly
    /// descending (the steps divide by sigma and by sigma differences).
    pub fn new(cfg: SolverConfig, sigmas: &[f64]) -> Result<Self> {
        if sigmas.len() < 2 {
            return Err(SanaError::Scheduler(format!(
                "a solver run needs at least 2 sigmas, got {}",
                sigmas.len()
            )));
        }
        let sigmas: Vec<f64> = sigmas.iter().map(|&s| s as f32 as f64).collect();
        let ok = sigmas
            .iter()
            .all(|s| s.is_finite() && (0.0..=1.0).contains(s))
            && sigmas.windows(2).all(|w| w[1] < w[0]);
        if !ok {
            return Err(SanaError::Scheduler(format!(
                "solver sigmas must be finite, within [0, 1] and strictly descending, got {sigmas:?}"
            )));
        }
        Ok(SolverRun {
            cfg,
            sigmas,
            next: 0,
            prev_x0: None,
            lower_order_nums: 0,
            log_prob: true,
        })
    }

    /// Steps return `log_prob: None`: sampling alone does not need the
    /// per-step reduction over the whole latent.
    pub fn without_log_prob(mut self) -> Self {
        self.log_prob = false;
        self
    }

    pub fn num_steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// Whether step i draws noise (false for deterministic runs and dpm*).
    ///
    /// DiffusionNFT draws noise at every flow, dance and ddim step and at dpm's ddim steps, and multiplies
    /// it by 0 when eta is 0: the result is the same without the draw, so none is made (or needed).
    pub fn needs_noise(&self) -> bool {
        self.cfg.effective_eta() > 0.0
    }

    /// Step i: model_output (velocity) and sample → next sample (float32, as run_sampling's z.float()).
    /// `noise`: the standard-normal draw the step uses (shape of sample); None = drawn with randn_like
    /// when the step needs one. Steps must be called in order 0..num_steps (DPM keeps history).
    pub fn step(
        &mut self,
        i: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<SolverStep> {
        if i != self.next || i >= self.num_steps() {
            return Err(SanaError::Scheduler(format!(
                "{} solver: step {i} called, but the next step is {} of {}",
                self.cfg.kind.as_str(),
                self.next,
                self.num_steps()
            )));
        }
        super::check_step_inputs(model_output, sample)?;
        if let Some(n) = noise {
            super::check_same_shape("noise", n, sample)?;
        }
        // run_sampling: `pred.float()`, `z.float()`.
        let v = model_output.to_kind(Kind::Float);
        let x = sample.to_kind(Kind::Float);
        let noise = if self.needs_noise() {
            Some(match noise {
                Some(n) => n.to_kind(Kind::Float),
                None => x.randn_like(),
            })
        } else {
            None
        };
        let eta = self.cfg.effective_eta();
        let out = match self.cfg.kind {
            SolverKind::Flow => self.flow_step(i, &v, &x, eta, noise),
            SolverKind::Dance => self.dance_step(i, &v, &x, eta, noise),
            SolverKind::Ddim => {
                let (s, t) = (self.sigmas[i], self.sigmas[i + 1]);
                // convert_model_output receives the float32 schedule (s is its value).
                let x0 = &x - &v * s;
                let d = ddim_update(&x0, s, t, &x, eta, noise);
                // ddim_step's log_prob: divisor and log(std) float64 scalars (cast to float32 by the ops).
                let log_prob = self.log_prob.then(|| {
                    let sd = d.std_dev_t * d.dt_sqrt;
                    let lp = (-(&d.prev - &d.mean).square()) / (2.0 * (sd * sd))
                        - log64(sd)
                        - log_sqrt_2pi() as f64;
                    mean_over_non_batch(&lp)
                });
                SolverStep {
                    prev_sample: d.prev,
                    pred_original_sample: x0,
                    log_prob,
                }
            }
            SolverKind::Dpm1 | SolverKind::Dpm2 => self.dpm_step(i, &v, &x),
        };
        self.next += 1;
        Ok(out)
    }

    /// flow_grpo_step (Flow-GRPO's SDE; the same math as cosmos-rl's `sde_step_with_logprob`,
    /// [`super::flow_sde::sde_step_with_logprob`], written out here for torch's scalar sqrt/log).
    fn flow_step(
        &self,
        i: usize,
        v: &Tensor,
        x: &Tensor,
        eta: f64,
        noise: Option<Tensor>,
    ) -> SolverStep {
        let (sigma, sigma_prev) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
        let sigma_max = self.sigmas[1] as f32;
        let dt = sigma_prev - sigma;
        let x0 = x - v * sigma as f64;
        // torch.where(sigma == 1, sigma_max, sigma): the sigma == 1 start would divide by zero.
        let denom_sigma = if sigma == 1.0 { sigma_max } else { sigma };
        let std_dev_t = sqrt32(sigma / (1.0 - denom_sigma)) * eta as f32;
        let var = std_dev_t * std_dev_t;
        let mean = x * (1.0 + var / (2.0 * sigma) * dt) as f64
            + v * (1.0 + var * (1.0 - sigma) / (2.0 * sigma)) as f64 * dt as f64;
        let step_std = std_dev_t * sqrt32(-dt);
        let prev = match noise {
            Some(n) => &mean + n * step_std as f64,
            None => mean.shallow_clone(), // eta 0: DiffusionNFT adds 0 * noise
        };
        // The divisor is a 0-dim tensor on the sample's device, as `sigmas[index].to(device)` makes it (a
        // scalar divisor becomes a multiplication by its reciprocal on CUDA).
        let log_prob = self.log_prob.then(|| {
            let two_var = Tensor::scalar_tensor(
                (2.0 * (step_std * step_std)) as f64,
                (Kind::Float, x.device()),
            );
            let lp = (-(&prev - &mean).square()) / &two_var
                - log32(step_std) as f64
                - log_sqrt_2pi() as f64;
            mean_over_non_batch(&lp)
        });
        SolverStep {
            prev_sample: prev,
            pred_original_sample: x0,
            log_prob,
        }
    }

    /// dance_grpo_step (DanceGRPO's SDE). Its log_prob has no constant term: in the Python the line
    /// `-math.log(std_dev_t) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))` stands on its own after
    /// the assignment, so it is evaluated and discarded; this reproduces what the code computes. (With
    /// eta 0, i.e. deterministic, that discarded `math.log(0.0)` raises in Python, so DiffusionNFT cannot run
    /// deterministic dance at all; here it is the Euler step `x + (t - s) v` with a NaN log_prob, the values
    /// the Python computes before it fails.)
    fn dance_step(
        &self,
        i: usize,
        v: &Tensor,
        x: &Tensor,
        eta: f64,
        noise: Option<Tensor>,
    ) -> SolverStep {
        let (sigma, sigma_next) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
        let dsigma = sigma_next - sigma;
        let mean = x + v * dsigma as f64;
        let x0 = x - v * sigma as f64;
        // math.sqrt(delta_t) of a float32 0-dim tensor: a float64 value (libm's, as f64::sqrt).
        let std_dev_t = eta * ((sigma - sigma_next) as f64).sqrt();
        let score = (-(x - &x0 * (1.0 - sigma) as f64)) / (sigma * sigma) as f64;
        // `-0.5 * eta**2` with Python floats (powf is the same libm pow).
        let log_term = score * (-0.5 * eta.powf(2.0));
        let mean = mean + log_term * dsigma as f64;
        let prev = match noise {
            Some(n) => &mean + n * std_dev_t,
            None => mean.shallow_clone(),
        };
        let log_prob = self.log_prob.then(|| {
            mean_over_non_batch(&((-(&prev - &mean).square()) / (2.0 * std_dev_t.powf(2.0))))
        });
        SolverStep {
            prev_sample: prev,
            pred_original_sample: x0,
            log_prob,
        }
    }

    /// dpm_step with DPMState (multistep DPM-Solver++ on the data prediction, order 1 or 2).
    fn dpm_step(&mut self, i: usize, v: &Tensor, x: &Tensor) -> SolverStep {
        let order = self.cfg.kind.dpm_order().expect("a dpm solver");
        // n = len(timesteps) = len(sigmas[:-1]). Unlike diffusers, the last step is always first order (no
        // `len(timesteps) < 15` or final-sigma condition). lower_order_second only ever lowers a third-order
        // step, which DiffusionNFT does not have (order 2 takes the second-order branch first): it is kept
        // to mirror the branch structure, and has no effect.
        let n = self.num_steps();
        let lower_order_final = i == n - 1;
        let lower_order_second = i + 2 == n && n < 15;
        let (s, t) = (self.sigmas[i], self.sigmas[i + 1]);
        // convert_model_output receives the float32 schedule.
        let x0 = x - v * (s as f32 as f64);
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            if i == 0 || lower_order_final {
                // ddim_update with eta 0.0: its randn_like draw is multiplied by 0.
                ddim_update(&x0, s, t, x, 0.0, None).prev
            } else {
                let (alpha_t, alpha_s) = (1.0 - t, 1.0 - s);
                let h = (log64(alpha_t) - log64(t)) - (log64(alpha_s) - log64(s));
                x * (t / s) - &x0 * (alpha_t * (exp64(-h) - 1.0))
            }
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            let m1 = self
                .prev_x0
                .as_ref()
                .expect("a second-order step follows a first-order one");
            let s1 = self.sigmas[i - 1];
            let lambda = |sigma: f64| log64(1.0 - sigma) - log64(sigma);
            let (lambda_t, lambda_s0, lambda_s1) = (lambda(t), lambda(s), lambda(s1));
            let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
            let r0 = h_0 / h;
            let d1 = (&x0 - m1) * (1.0 / r0);
            let c = (1.0 - t) * (exp64(-h) - 1.0);
            x * (t / s) - &x0 * c - d1 * (0.5 * c)
        } else {
            unreachable!("dpm order is 1 or 2")
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.prev_x0 = Some(x0.shallow_clone());
        SolverStep {
            prev_sample: prev,
            pred_original_sample: x0,
            log_prob: None,
        }
    }
}

struct DdimUpdate {
    prev: Tensor,
    mean: Tensor,
    std_dev_t: f64,
    dt_sqrt: f64,
}

/// ddim_update on the data prediction `x0`, with float64 `s = sigmas[i]`, `t = sigmas[i + 1]`. `noise` is
/// only used when `rho = eta t dt_sqrt` is not 0 (the caller passes one exactly then).
fn ddim_update(
    x0: &Tensor,
    s: f64,
    t: f64,
    x: &Tensor,
    eta: f64,
    noise: Option<Tensor>,
) -> DdimUpdate {
    let std_dev_t = eta * t;
    // `t**2` of a 0-dim tensor is t * t.
    let dt_sqrt = sqrt64(1.0 - t * t * ((1.0 - s) * (1.0 - s)) / (s * s * ((1.0 - t) * (1.0 - t))));
    let rho_t = std_dev_t * dt_sqrt;
    let noise_pred = (x - x0 * (1.0 - s)) / s;
    let mean = x0 * (1.0 - t) + noise_pred * sqrt64(t * t - rho_t * rho_t);
    let prev = match noise {
        Some(n) if rho_t != 0.0 => &mean + n * rho_t,
        _ => mean.shallow_clone(),
    };
    DdimUpdate {
        prev,
        mean,
        std_dev_t,
        dt_sqrt,
    }
}

/// torch's `op` on a 0-dim CPU tensor of `kind` holding `x`. DiffusionNFT's scalars are 0-dim tensors, and
/// torch's CPU sqrt/log/exp (SLEEF, chosen by the CPU capability) are not libm's: under AVX512 about one f32
/// square root in five is an ulp off the correctly rounded `f32::sqrt`. The same kernels keep the steps
/// bit-identical to the Python's on the CPU.
fn torch_scalar(x: f64, kind: Kind, op: impl FnOnce(Tensor) -> Tensor) -> f64 {
    op(Tensor::scalar_tensor(x, (kind, tch::Device::Cpu))).double_value(&[])
}

fn sqrt32(x: f32) -> f32 {
    torch_scalar(x as f64, Kind::Float, |t| t.sqrt()) as f32
}

fn log32(x: f32) -> f32 {
    torch_scalar(x as f64, Kind::Float, |t| t.log()) as f32
}

fn sqrt64(x: f64) -> f64 {
    torch_scalar(x, Kind::Double, |t| t.sqrt())
}

fn log64(x: f64) -> f64 {
    torch_scalar(x, Kind::Double, |t| t.log())
}

fn exp64(x: f64) -> f64 {
    torch_scalar(x, Kind::Double, |t| t.exp())
}

/// `torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))`: float32 (as_tensor's default dtype).
fn log_sqrt_2pi() -> f32 {
    log32(sqrt32(2.0 * std::f32::consts::PI))
}

/// `log_prob.mean(dim=tuple(range(1, log_prob.ndim)))`.
fn mean_over_non_batch(t: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..t.dim() as i64).collect();
    if dims.is_empty() {
        return t.shallow_clone();
    }
    t.mean_dim(dims.as_slice(), false, None::<Kind>)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::test_util::{max_abs_diff, Trace};
    use tch::Device;

    // ---- unit tests ----

    /// A smooth deterministic tensor (no global RNG: tests run in parallel and would interleave draws).
    fn wave(freq: f64, amp: f64) -> Tensor {
        (Tensor::arange(120, (Kind::Float, Device::Cpu)) * freq)
            .sin()
            .reshape([2, 3, 4, 5])
            * amp
    }

    const SIGMAS: [f64; 6] = [0.95, 0.8, 0.6, 0.4, 0.2, 0.0];

    fn run(name: &str, deterministic: bool, eta: f64) -> SolverRun {
        SolverRun::new(
            SolverConfig::parse(name, deterministic, eta).unwrap(),
            &SIGMAS,
        )
        .unwrap()
    }

    fn input_key(e: SanaError) -> (String, String) {
        match e {
            SanaError::Input { name, msg } => (name, msg),
            other => panic!("expected an input error, got {other}"),
        }
    }

    #[test]
    fn parse_names_aliases_and_errors() {
        for (i, name) in SolverKind::NAMES.iter().enumerate() {
            let c = SolverConfig::parse(name, true, 0.7).unwrap();
            assert_eq!(c.kind.as_str(), *name);
            assert_eq!(c.kind, SolverKind::ALL[i]);
            assert_eq!(
                serde_json::to_string(&c.kind).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!(c.effective_eta(), 0.0);
        }
        let (key, msg) = input_key(SolverConfig::parse("euler", false, 0.7).unwrap_err());
        assert_eq!(key, "deterministic_sampling");
        assert!(msg.contains("solver = \"flow\""), "{msg}");
        let euler = SolverConfig::parse("euler", true, 0.7).unwrap();
        assert_eq!(
            euler,
            SolverConfig {
                kind: SolverKind::Flow,
                deterministic: true,
                eta: 0.7
            }
        );
        assert_eq!(euler.effective_eta(), 0.0);
        assert_eq!(
            SolverConfig::parse("ddim", false, 0.7)
                .unwrap()
                .effective_eta(),
            0.7
        );

        let (key, msg) = input_key(SolverConfig::parse("heun", true, 0.7).unwrap_err());
        assert_eq!(key, "solver");
        assert!(
            msg.contains("heun") && msg.contains("flow, dance, ddim, dpm1, dpm2, euler"),
            "{msg}"
        );
        for dpm in ["dpm1", "dpm2"] {
            let (key, msg) = input_key(SolverConfig::parse(dpm, false, 0.7).unwrap_err());
            assert_eq!(key, "deterministic_sampling");
            assert!(msg.contains(dpm), "{msg}");
        }
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            let (key, _) = input_key(SolverConfig::parse("flow", false, bad).unwrap_err());
            assert_eq!(key, "noise_level");
        }
    }

    #[test]
    fn deterministic_flow_is_the_euler_step() {
        let (x, v) = (wave(0.37, 1.5), wave(0.71, 1.2));
        for name in ["flow", "euler", "dance"] {
            let mut r = run(name, true, 0.7);
            assert!(!r.needs_noise());
            let mut z = x.shallow_clone();
            for i in 0..r.num_steps() {
                let dt = r.sigmas()[i + 1] as f32 - r.sigmas()[i] as f32;
                let out = r.step(i, &v, &z, None).unwrap();
                let euler = &z + &v * dt as f64;
                assert_eq!(
                    max_abs_diff(&out.prev_sample, &euler),
                    0.0,
                    "{name} step {i}"
                );
                // Scored under a zero-width Gaussian: NaN, as DiffusionNFT computes it.
                let lp = out.log_prob.unwrap();
                assert_eq!(lp.size(), vec![2]);
                assert!(lp.isnan().all().int64_value(&[]) != 0);
                z = out.prev_sample;
            }
        }
    }

    #[test]
    fn eta_zero_ignores_the_noise() {
        let (x, v) = (wave(0.37, 1.5), wave(0.71, 1.2));
        for (name, det, eta) in [
            ("ddim", true, 0.7),
            ("ddim", false, 0.0),
            ("flow", false, 0.0),
            ("dpm2", true, 0.7),
        ] {
            let mut a = run(name, det, eta);
            let mut b = run(name, det, eta);
            assert!(!a.needs_noise());
            for i in 0..a.num_steps() {
                let pa = a.step(i, &v, &x, Some(&wave(1.3, 1.7))).unwrap();
                let pb = b.step(i, &v, &x, None).unwrap();
                assert_eq!(max_abs_diff(&pa.prev_sample, &pb.prev_sample), 0.0);
                assert_eq!(pa.log_prob.is_none(), name == "dpm2");
            }
        }
        // With eta > 0 the noise is used, and the log-probability is finite before the last ddim step.
        let mut a = run("ddim", false, 0.7);
        let mut b = run("ddim", false, 0.7);
        assert!(a.needs_noise());
        let pa = a.step(0, &v, &x, Some(&wave(1.3, 1.7))).unwrap();
        let pb = b.step(0, &v, &x, Some(&wave(0.3, 1.7))).unwrap();
        assert!(max_abs_diff(&pa.prev_sample, &pb.prev_sample) > 0.0);
        assert!(pa.log_prob.unwrap().isfinite().all().int64_value(&[]) != 0);
    }

    #[test]
    fn steps_must_come_in_order() {
        let (x, v) = (wave(0.37, 1.5), wave(0.71, 1.2));
        let mut r = run("dpm2", true, 0.7);
        assert!(matches!(
            r.step(1, &v, &x, None),
            Err(SanaError::Scheduler(_))
        ));
        r.step(0, &v, &x, None).unwrap();
        assert!(matches!(
            r.step(0, &v, &x, None),
            Err(SanaError::Scheduler(_))
        ));
        for i in 1..r.num_steps() {
            r.step(i, &v, &x, None).unwrap();
        }
        let n = r.num_steps();
        assert!(matches!(
            r.step(n, &v, &x, None),
            Err(SanaError::Scheduler(_))
        ));
    }

    #[test]
    fn bad_schedules_and_inputs_are_errors() {
        let cfg = SolverConfig::parse("flow", false, 0.7).unwrap();
        let bad_schedules: [&[f64]; 5] =
            [&[0.5], &[], &[0.5, 0.5, 0.0], &[0.2, 0.5, 0.0], &[1.5, 0.0]];
        for bad in bad_schedules {
            assert!(matches!(
                SolverRun::new(cfg, bad),
                Err(SanaError::Scheduler(_))
            ));
        }
        let r = SolverRun::new(cfg, &SIGMAS).unwrap();
        assert_eq!(r.num_steps(), 5);
        assert_eq!(r.sigmas().len(), 6);
        let mut r = r;
        let (x, v) = (wave(0.37, 1.5), wave(0.71, 1.2));
        let wrong = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(
            r.step(0, &v, &x, Some(&wrong)),
            Err(SanaError::Input { .. })
        ));
        assert!(matches!(
            r.step(0, &wrong, &x, None),
            Err(SanaError::Input { .. })
        ));
        // A failed step does not advance the run.
        r.step(0, &v, &x, None).unwrap();
    }

    // ---- parity with DiffusionNFT's solver.py (scripts/parity/solvers.py) ----

    /// The parity script's model: `tanh(z * A + sigma * B) * 0.8 + z * 0.3`, sigma a float32 value.
    fn v_pred(z: &Tensor, sigma: f64, a: &Tensor, b: &Tensor) -> Tensor {
        ((z * a) + b * (sigma as f32 as f64)).tanh() * 0.8 + z * 0.3
    }

    /// Max |a - b| where NaNs must coincide (a NaN in only one of them is an infinite error).
    fn max_err_nan_aware(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size(), "shape mismatch");
        let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
        let (a, b) = (cpu(a), cpu(b));
        let (na, nb) = (a.isnan(), b.isnan());
        if na.logical_xor(&nb).any().int64_value(&[]) != 0 {
            return f64::INFINITY;
        }
        (a - b).abs().masked_fill(&na, 0.0).max().double_value(&[])
    }

    fn check_solver_case(case: &str) {
        let dir = crate::testing::parity_case(&format!("solver_{case}"));
        let trace = Trace::load(&dir);
        let c = &trace.case;
        let steps = trace.steps();
        let sigmas = trace.vec("sigmas");
        assert_eq!(sigmas.len(), steps + 1);

        // The schedule is SANA's DPM-Solver flow sigmas: the Rust scheduler builds the same float32 table.
        let mut sched =
            crate::schedulers::scheduler_from_config_file(&dir.join("scheduler_config.json"))
                .unwrap();
        sched.set_timesteps(steps).unwrap();
        let sig_err = sched
            .sigmas()
            .iter()
            .zip(&sigmas)
            .map(|(a, b)| (*a as f32 as f64 - b).abs())
            .fold(0.0, f64::max);
        assert_eq!(sig_err, 0.0, "{case}: scheduler sigmas differ");

        let cfg = SolverConfig::parse(
            c["solver"].as_str().unwrap(),
            c["deterministic"].as_bool().unwrap(),
            c["eta"].as_f64().unwrap(),
        )
        .unwrap();
        let mut run = SolverRun::new(cfg, &sigmas).unwrap();
        assert_eq!(run.sigmas(), sigmas.as_slice());
        let (a, b) = (trace.input("A"), trace.input("B"));
        let mut z = trace.input("z0");
        let (mut e_v, mut e_prev, mut e_x0, mut e_lp) = (0.0_f64, 0.0_f64, 0.0_f64, 0.0_f64);
        let (mut n_lp, mut nan_lp) = (0, 0);
        for (i, &sigma) in sigmas[..steps].iter().enumerate() {
            let v = v_pred(&z, sigma, &a, &b);
            e_v = e_v.max(max_abs_diff(&v, trace.get(&format!("v_{i}"))));
            let noise = trace.tensors.get(&format!("noise_{i}"));
            if run.needs_noise() {
                assert!(
                    noise.is_some(),
                    "{case}: step {i} needs noise, Python drew none"
                );
            }
            // Noise Python drew but multiplied by 0 is fed too: the step must ignore it.
            let noise = noise.map(|n| n.to_device(z.device()));
            let out = run
                .step(i, &v, &z, noise.as_ref())
                .unwrap_or_else(|e| panic!("{case}: step {i}: {e}"));
            assert_eq!(out.prev_sample.kind(), Kind::Float);
            e_prev = e_prev.max(max_abs_diff(
                &out.prev_sample,
                trace.get(&format!("prev_sample_{i}")),
            ));
            e_x0 = e_x0.max(max_abs_diff(
                &out.pred_original_sample,
                trace.get(&format!("pred_original_{i}")),
            ));
            match (&out.log_prob, trace.tensors.get(&format!("log_prob_{i}"))) {
                (None, None) => {}
                (Some(lp), Some(lp_ref)) => {
                    // A mean of squares: compare it relative to its size.
                    let finite = lp_ref.nan_to_num(0.0, None, None).abs().max();
                    let scale = finite.double_value(&[]).max(1.0);
                    e_lp = e_lp.max(max_err_nan_aware(lp, lp_ref) / scale);
                    n_lp += 1;
                    nan_lp += lp_ref.isnan().any().int64_value(&[]);
                }
                (ours, theirs) => panic!(
                    "{case}: step {i}: log_prob {} here, {} in Python",
                    ours.is_some(),
                    theirs.is_some()
                ),
            }
            z = out.prev_sample;
        }
        let note = c
            .get("python_error")
            .and_then(|e| e.as_str())
            .map(|e| format!(" (Python raises {e}; traced with math.log(0) = -inf)"))
            .unwrap_or_default();
        eprintln!(
            "solver_{case}: max |diff| v {e_v:.3e}, prev_sample {e_prev:.3e}, pred_original {e_x0:.3e}, \
             log_prob (relative to max(1, |log_prob|)) {e_lp:.3e}; {n_lp} log_probs, {nan_lp} NaN in both{note}"
        );
        // On the CPU the steps are bit-identical to the Python (0 above): the same libtorch kernels in the
        // same order on the same inputs, scalars' sqrt/log/exp included (torch_scalar). 1e-6 on these O(1)
        // values leaves a few fp32 ulps of slack and is far below any formula slip (>= 1e-3). On CUDA
        // (SANA_TEST_DEVICE=cuda) the elementwise kernels round differently along the chain of steps.
        const TOL_CPU: f64 = 1e-6;
        const TOL_CUDA: f64 = 1e-5;
        let tol = if z.device().is_cuda() {
            TOL_CUDA
        } else {
            TOL_CPU
        };
        assert!(e_v <= tol, "{case}: v differs by {e_v:e}");
        assert!(e_prev <= tol, "{case}: prev_sample differs by {e_prev:e}");
        assert!(e_x0 <= tol, "{case}: pred_original differs by {e_x0:e}");
        assert!(e_lp <= tol, "{case}: log_prob differs by {e_lp:e}");
    }

    #[test]
    fn parity_solver_flow_det_10() {
        check_solver_case("flow_det_10");
    }

    #[test]
    fn parity_solver_dance_det_10() {
        check_solver_case("dance_det_10");
    }

    #[test]
    fn parity_solver_ddim_det_10() {
        check_solver_case("ddim_det_10");
    }

    #[test]
    fn parity_solver_dpm1_det_10() {
        check_solver_case("dpm1_det_10");
    }

    #[test]
    fn parity_solver_dpm2_det_10() {
        check_solver_case("dpm2_det_10");
    }

    #[test]
    fn parity_solver_dpm2_det_20() {
        check_solver_case("dpm2_det_20");
    }

    #[test]
    fn parity_solver_flow_eta07_10() {
        check_solver_case("flow_eta07_10");
    }

    #[test]
    fn parity_solver_flow_eta10_10() {
        check_solver_case("flow_eta10_10");
    }

    #[test]
    fn parity_solver_dance_eta07_10() {
        check_solver_case("dance_eta07_10");
    }

    #[test]
    fn parity_solver_ddim_eta07_10() {
        check_solver_case("ddim_eta07_10");
    }

    #[test]
    fn parity_solver_ddim_eta07_20() {
        check_solver_case("ddim_eta07_20");
    }
}
