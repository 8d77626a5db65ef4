//! diffusers' `DPMSolverMultistepScheduler` (schedulers/scheduling_dpmsolver_multistep.py, 0.42.1).
//!
//! Supported: `algorithm_type = "dpmsolver++"` (and its legacy alias `deis`), `solver_order` 1–3,
//! `solver_type` midpoint/heun, `prediction_type` epsilon/sample/v_prediction/flow_prediction,
//! `use_flow_sigmas` + `flow_shift` (SANA), beta schedules linear/scaled_linear/squaredcos_cap_v2 or
//! `trained_betas`, `rescale_betas_zero_snr`, `lambda_min_clipped`, `timestep_spacing`
//! linspace/leading/trailing with `steps_offset`, `lower_order_final`, `euler_at_final`,
//! `final_sigmas_type` zero/sigma_min.
//! Refused with an error: the `dpmsolver`/SDE algorithm types, `thresholding`, learned variance, and the
//! karras/exponential/beta/lu sigma re-spacings.
//!
//! `use_dynamic_shifting` only acts in diffusers when `set_timesteps` gets `mu`, which this API never
//! passes, so (as in diffusers without `mu`) it has no effect.

use super::{check_step_inputs, config_from_map, de_f64, np_linspace, Scheduler, TimeShiftType};
use crate::error::{Result, SanaError};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    Sample,
    VPrediction,
    FlowPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlgorithmType {
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// diffusers rewrites the legacy `deis` to `dpmsolver++`.
    #[serde(rename = "dpmsolver++", alias = "deis")]
    DpmSolverPlusPlus,
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    /// diffusers rewrites the UniPC/DEIS names `logrho`, `bh1`, `bh2` to `midpoint`.
    #[serde(alias = "logrho", alias = "bh1", alias = "bh2")]
    Midpoint,
    Heun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    Learned,
    LearnedRange,
}

/// Every `__init__` argument of diffusers' DPMSolverMultistepScheduler, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DPMSolverMultistepConfig {
    pub num_train_timesteps: usize,
    #[serde(deserialize_with = "de_f64")]
    pub beta_start: f64,
    #[serde(deserialize_with = "de_f64")]
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    #[serde(deserialize_with = "de_f64")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(deserialize_with = "de_f64")]
    pub sample_max_value: f64,
    pub algorithm_type: AlgorithmType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    #[serde(deserialize_with = "de_f64")]
    pub flow_shift: f64,
    pub final_sigmas_type: FinalSigmasType,
    #[serde(deserialize_with = "de_f64")]
    pub lambda_min_clipped: f64,
    pub variance_type: Option<VarianceType>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: TimeShiftType,
}

impl Default for DPMSolverMultistepConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

impl DPMSolverMultistepConfig {
    /// SANA's published `scheduler_config.json` (flow prediction, flow_shift 3, DPM-Solver++ order 2).
    pub fn sana() -> Self {
        Self {
            prediction_type: PredictionType::FlowPrediction,
            use_flow_sigmas: true,
            flow_shift: 3.0,
            ..Default::default()
        }
    }

    /// Reads a diffusers `scheduler_config.json` (its `_class_name` is not checked here).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        Self::from_json_map(&super::read_json_object(path)?, path)
    }

    pub(crate) fn from_json_map(
        map: &serde_json::Map<String, serde_json::Value>,
        path: &Path,
    ) -> Result<Self> {
        config_from_map(map, path, "DPMSolverMultistepScheduler")
    }

    /// The first unsupported or inconsistent option, as (key, message).
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.num_train_timesteps < 2 {
            return Err(("num_train_timesteps", "must be at least 2".into()));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err((
                    "trained_betas",
                    format!(
                        "has {} values but num_train_timesteps is {}",
                        b.len(),
                        self.num_train_timesteps
                    ),
                ));
            }
        }
        if !(1..=3).contains(&self.solver_order) {
            return Err((
                "solver_order",
                format!("must be 1, 2 or 3, got {}", self.solver_order),
            ));
        }
        if self.algorithm_type != AlgorithmType::DpmSolverPlusPlus {
            return Err((
                "algorithm_type",
                format!(
                    "{:?} is not supported (only \"dpmsolver++\")",
                    self.algorithm_type
                ),
            ));
        }
        if self.thresholding {
            return Err((
                "thresholding",
                "dynamic thresholding is not supported".into(),
            ));
        }
        if let Some(v) = self.variance_type {
            return Err((
                "variance_type",
                format!("{v:?} (learned variance) is not supported"),
            ));
        }
        let n_kinds = [
            self.use_beta_sigmas,
            self.use_exponential_sigmas,
            self.use_karras_sigmas,
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if n_kinds > 1 {
            return Err((
                "use_karras_sigmas",
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be set"
                    .into(),
            ));
        }
        for (key, on) in [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
        ] {
            if on {
                return Err((key, "this sigma re-spacing is not supported".into()));
            }
        }
        Ok(())
    }
}

/// DPM-Solver++ multistep sampler (orders 1–3), as SANA's pipelines use it.
#[derive(Debug)]
pub struct DPMSolverMultistepScheduler {
    config: DPMSolverMultistepConfig,
    /// Training tables, float32 as diffusers holds them.
    alphas_cumprod: Vec<f32>,
    lambda_t: Vec<f32>,
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// Converted model outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: usize,
    timesteps_set: bool,
}

impl DPMSolverMultistepScheduler {
    /// SANA's scheduler ([`DPMSolverMultistepConfig::sana`]).
    pub fn sana_default() -> Self {
        Self::from_config(DPMSolverMultistepConfig::sana())
            .expect("SANA's DPM-Solver config uses only supported options")
    }

    pub fn from_config(config: DPMSolverMultistepConfig) -> Result<Self> {
        config
            .check()
            .map_err(|(key, msg)| SanaError::Scheduler(format!("`{key}`: {msg}")))?;
        Self::build(config)
    }

    /// As [`Self::from_config`], reporting a bad option as a config error of `path`.
    pub(crate) fn from_config_at(config: DPMSolverMultistepConfig, path: &Path) -> Result<Self> {
        config
            .check()
            .map_err(|(key, msg)| SanaError::config(path, key, msg))?;
        Self::build(config)
    }

    fn build(config: DPMSolverMultistepConfig) -> Result<Self> {
        // The training tables go through the very torch ops diffusers uses (torch.linspace's kernel and
        // cumprod's float64 accumulation are not plain float32 loops), so they match bit for bit.
        let n = config.num_train_timesteps as i64;
        let opts = (Kind::Float, Device::Cpu);
        let mut betas = match (&config.trained_betas, config.beta_schedule) {
            (Some(b), _) => Tensor::from_slice(b).to_kind(Kind::Float),
            (None, BetaSchedule::Linear) => {
                Tensor::f_linspace(config.beta_start, config.beta_end, n, opts)?
            }
            (None, BetaSchedule::ScaledLinear) => Tensor::f_linspace(
                config.beta_start.powf(0.5),
                config.beta_end.powf(0.5),
                n,
                opts,
            )?
            .f_pow_tensor_scalar(2)?,
            (None, BetaSchedule::SquaredcosCapV2) => {
                Tensor::from_slice(&betas_for_alpha_bar(config.num_train_timesteps))
                    .to_kind(Kind::Float)
            }
        };
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas)?;
        }
        let alphas = 1.0f64 - &betas;
        let alphas_cumprod = alphas.f_cumprod(0, None::<Kind>)?;
        if config.rescale_betas_zero_snr {
            // diffusers: close to 0 without being 0, so the first sigma is finite.
            let _ = alphas_cumprod.get(n - 1).f_fill_(2f64.powi(-24))?;
        }
        let alpha_t = alphas_cumprod.f_sqrt()?;
        let sigma_t = (1.0f64 - &alphas_cumprod).f_sqrt()?;
        let lambda_t = alpha_t.f_log()? - sigma_t.f_log()?;
        let train_sigmas =
            ((1.0f64 - &alphas_cumprod) / &alphas_cumprod).f_pow_tensor_scalar(0.5)?;
        Ok(Self {
            alphas_cumprod: Vec::<f32>::try_from(&alphas_cumprod)?,
            lambda_t: Vec::<f32>::try_from(&lambda_t)?,
            train_sigmas: Vec::<f32>::try_from(&train_sigmas)?,
            model_outputs: empty_history(config.solver_order),
            config,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            lower_order_nums: 0,
            step_index: 0,
            timesteps_set: false,
        })
    }

    pub fn config(&self) -> &DPMSolverMultistepConfig {
        &self.config
    }

    /// Steps taken since `set_timesteps`.
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// diffusers' `timesteps` as the integers they are (int64 in diffusers).
    fn integer_timesteps(&self, num_inference_steps: usize) -> Vec<i64> {
        let cfg = &self.config;
        let n_train = cfg.num_train_timesteps;
        // torch.searchsorted(flip(lambda_t), lambda_min_clipped): the clip value is compared in float32.
        let clip = cfg.lambda_min_clipped as f32;
        let flipped: Vec<f32> = self.lambda_t.iter().rev().copied().collect();
        let clipped_idx = flipped.partition_point(|&x| x < clip);
        let last_timestep = (n_train - clipped_idx) as i64;
        let n = num_inference_steps;
        match cfg.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<i64> = np_linspace(0.0, (last_timestep - 1) as f64, n + 1)
                    .into_iter()
                    .map(|x| x.round_ties_even() as i64)
                    .collect();
                t.reverse();
                t.truncate(n);
                t
            }
            TimestepSpacing::Leading => {
                let step_ratio = last_timestep / (n as i64 + 1);
                let mut t: Vec<i64> = (0..=n as i64).map(|i| i * step_ratio).collect();
                t.reverse();
                t.truncate(n);
                t.iter().map(|x| x + cfg.steps_offset).collect()
            }
            TimestepSpacing::Trailing => {
                let step_ratio = n_train as f64 / n as f64;
                np_arange(last_timestep as f64, 0.0, -step_ratio)
                    .into_iter()
                    .map(|x| x.round_ties_even() as i64 - 1)
                    .collect()
            }
        }
    }

    fn alpha_sigma(&self, sigma: f32) -> (f32, f32) {
        if self.config.use_flow_sigmas {
            (1.0 - sigma, sigma)
        } else {
            let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
            (alpha, sigma * alpha)
        }
    }

    /// (alpha_t, sigma_t, lambda_t) at sigma-table index `i`, in float32 as diffusers' 0-dim tensors.
    fn coefficients(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = self.alpha_sigma(self.sigmas[i] as f32);
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// diffusers' `convert_model_output` for DPM-Solver++: the data (x0) prediction.
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor) -> Tensor {
        let (alpha_t, sigma_t) = self.alpha_sigma(self.sigmas[self.step_index] as f32);
        let (alpha_t, sigma_t) = (alpha_t as f64, sigma_t as f64);
        match self.config.prediction_type {
            PredictionType::Epsilon => (sample - model_output * sigma_t) / alpha_t,
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => sample * alpha_t - model_output * sigma_t,
            // diffusers uses the raw sigma here, which equals sigma_t for flow sigmas.
            PredictionType::FlowPrediction => {
                sample - model_output * (self.sigmas[self.step_index] as f32 as f64)
            }
        }
    }

    fn first_order_update(&self, m0: &Tensor, sample: &Tensor) -> Tensor {
        let i = self.step_index;
        let (alpha_t, sigma_t, lambda_t) = self.coefficients(i + 1);
        let (_, sigma_s, lambda_s) = self.coefficients(i);
        let h = lambda_t - lambda_s;
        sample * (sigma_t / sigma_s) as f64 - m0 * (alpha_t * ((-h).exp() - 1.0)) as f64
    }

    fn second_order_update(&self, m0: &Tensor, m1: &Tensor, sample: &Tensor) -> Tensor {
        let i = self.step_index;
        let (alpha_t, sigma_t, lambda_t) = self.coefficients(i + 1);
        let (_, sigma_s0, lambda_s0) = self.coefficients(i);
        let (_, _, lambda_s1) = self.coefficients(i - 1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = (m0 - m1) * (1.0 / r0) as f64;
        let e = (-h).exp() - 1.0;
        let x = sample * (sigma_t / sigma_s0) as f64 - m0 * (alpha_t * e) as f64;
        match self.config.solver_type {
            SolverType::Midpoint => x - d1 * (0.5 * (alpha_t * e)) as f64,
            SolverType::Heun => x + d1 * (alpha_t * (e / h + 1.0)) as f64,
        }
    }

    fn third_order_update(&self, m0: &Tensor, m1: &Tensor, m2: &Tensor, sample: &Tensor) -> Tensor {
        let i = self.step_index;
        let (alpha_t, sigma_t, lambda_t) = self.coefficients(i + 1);
        let (_, sigma_s0, lambda_s0) = self.coefficients(i);
        let (_, _, lambda_s1) = self.coefficients(i - 1);
        let (_, _, lambda_s2) = self.coefficients(i - 2);
        let (h, h_0, h_1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = (m0 - m1) * (1.0 / r0) as f64;
        let d1_1 = (m1 - m2) * (1.0 / r1) as f64;
        let d1_diff = &d1_0 - &d1_1;
        let d1 = &d1_0 + &d1_diff * (r0 / (r0 + r1)) as f64;
        let d2 = &d1_diff * (1.0 / (r0 + r1)) as f64;
        let e = (-h).exp() - 1.0;
        sample * (sigma_t / sigma_s0) as f64 - m0 * (alpha_t * e) as f64
            + d1 * (alpha_t * (e / h + 1.0)) as f64
            - d2 * (alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5)) as f64
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(SanaError::Scheduler(
                "num_inference_steps must be at least 1".into(),
            ));
        }
        let cfg = &self.config;
        let mut timesteps = self.integer_timesteps(num_inference_steps);
        let sigmas: Vec<f64> = if cfg.use_flow_sigmas {
            // numpy float64, then int64 timesteps by truncation (torch's float -> int64 cast).
            let n_train = cfg.num_train_timesteps as f64;
            let shift = cfg.flow_shift;
            let mut s: Vec<f64> = np_linspace(1.0, 1.0 / n_train, num_inference_steps + 1)
                .into_iter()
                .map(|a| 1.0 - a)
                .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
                .collect();
            s.reverse();
            s.truncate(num_inference_steps);
            timesteps = s.iter().map(|&x| (x * n_train) as i64).collect();
            s
        } else {
            // (A clipped schedule may give fewer timesteps than asked for; diffusers keeps them all.)
            // np.interp at integer positions of the float32 training sigmas, clamped at the ends.
            let last = self.train_sigmas.len() as i64 - 1;
            timesteps
                .iter()
                .map(|&t| self.train_sigmas[t.clamp(0, last) as usize] as f64)
                .collect()
        };
        let sigma_last = match cfg.final_sigmas_type {
            FinalSigmasType::SigmaMin => {
                let a0 = self.alphas_cumprod[0];
                ((1.0 - a0) / a0).sqrt() as f64
            }
            FinalSigmasType::Zero => 0.0,
        };
        self.sigmas = sigmas
            .iter()
            .chain(std::iter::once(&sigma_last))
            .map(|&s| s as f32 as f64)
            .collect();
        self.timesteps = timesteps.iter().map(|&t| t as f64).collect();
        self.model_outputs = empty_history(cfg.solver_order);
        self.lower_order_nums = 0;
        self.step_index = 0;
        self.timesteps_set = true;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        if !self.timesteps_set {
            return Err(SanaError::Scheduler(
                "DPMSolverMultistepScheduler: set_timesteps must be called before step".into(),
            ));
        }
        let n = self.timesteps.len();
        let i = self.step_index;
        if i >= n {
            return Err(SanaError::Scheduler(format!(
                "DPMSolverMultistepScheduler: step {} called but there are only {n} timesteps",
                i + 1
            )));
        }
        check_step_inputs(model_output, sample)?;
        let cfg = &self.config;
        // Lower orders at the end, for numerical stability with few steps.
        let lower_order_final = i == n - 1
            && (cfg.euler_at_final
                || (cfg.lower_order_final && n < 15)
                || cfg.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == n && cfg.lower_order_final && n < 15;
        let order = cfg.solver_order;

        let converted = self.convert_model_output(model_output, sample);
        let out_kind = converted.kind();
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));

        let sample = sample.to_kind(Kind::Float);
        let m = |k: usize| -> &Tensor {
            self.model_outputs[order - 1 - k]
                .as_ref()
                .expect("history is filled for the orders lower_order_nums allows")
        };
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(m(0), &sample)
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(m(0), m(1), &sample)
        } else {
            self.third_order_update(m(0), m(1), m(2), &sample)
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev.to_kind(out_kind))
    }
}

fn empty_history(order: usize) -> Vec<Option<Tensor>> {
    (0..order).map(|_| None).collect()
}

/// numpy's `np.arange(start, stop, step)` for floats, bit for bit: `start + i * ((start + step) - start)`.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let next = start + step;
    let delta = next - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => next,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (the `squaredcos_cap_v2` schedule),
/// in Python float64.
fn betas_for_alpha_bar(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powf(2.0)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, op for op on float32 tensors.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Result<Tensor> {
    let n = betas.size()[0];
    let alphas = 1.0f64 - betas;
    let alphas_cumprod = alphas.f_cumprod(0, None::<Kind>)?;
    let abs = alphas_cumprod.f_sqrt()?;
    let s0 = abs.get(0).copy();
    let st = abs.get(n - 1).copy();
    let abs = &abs - &st;
    let abs = &abs * (&s0 / (&s0 - &st));
    let alphas_bar = abs.f_pow_tensor_scalar(2)?;
    let ratios = alphas_bar.narrow(0, 1, n - 1) / alphas_bar.narrow(0, 0, n - 1);
    let alphas = Tensor::f_cat(&[alphas_bar.narrow(0, 0, 1), ratios], 0)?;
    Ok(1.0f64 - alphas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::scheduler_from_config_file;
    use crate::schedulers::test_util::check_scheduler_case;

    /// SANA's scheduler_config.json as published (note the bare `-Infinity`).
    const SANA_CONFIG_JSON: &str = r#"{"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.32.0.dev0",
        "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "dynamic_thresholding_ratio": 0.995, "euler_at_final": false, "final_sigmas_type": "zero",
        "flow_shift": 3.0, "lambda_min_clipped": -Infinity, "lower_order_final": true,
        "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "sample_max_value": 1.0,
        "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0, "thresholding": false,
        "timestep_spacing": "linspace", "trained_betas": null, "use_beta_sigmas": false,
        "use_exponential_sigmas": false, "use_flow_sigmas": true, "use_karras_sigmas": false,
        "use_lu_lambdas": false, "variance_type": null}"#;

    fn via_factory(config: &Path, case: &serde_json::Value) -> Box<dyn Scheduler> {
        let mut s = scheduler_from_config_file(config).expect("scheduler");
        s.set_timesteps(case["num_inference_steps"].as_u64().unwrap() as usize)
            .expect("set_timesteps");
        s
    }

    macro_rules! parity {
        ($($name:ident => $case:literal),* $(,)?) => {$(
            #[test]
            fn $name() {
                check_scheduler_case($case, via_factory);
            }
        )*};
    }

    parity! {
        parity_dpm_sana_20 => "dpm_sana_20",
        parity_dpm_sana_7 => "dpm_sana_7",
        parity_dpm_order1_10 => "dpm_order1_10",
        parity_dpm_order3_10 => "dpm_order3_10",
        parity_dpm_order3_20 => "dpm_order3_20",
        parity_dpm_heun_20 => "dpm_heun_20",
        parity_dpm_sigma_min_20 => "dpm_sigma_min_20",
        parity_dpm_sigma_min_euler_final_7 => "dpm_sigma_min_euler_final_7",
        parity_dpm_epsilon_linear_20 => "dpm_epsilon_linear_20",
        parity_dpm_vpred_scaled_trailing_12 => "dpm_vpred_scaled_trailing_12",
        parity_dpm_epsilon_leading_9 => "dpm_epsilon_leading_9",
        parity_dpm_cosine_clipped_15 => "dpm_cosine_clipped_15",
        parity_dpm_sample_zero_snr_8 => "dpm_sample_zero_snr_8",
    }

    fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sana-dpm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn sana_config_json_parses_to_sana_default() {
        let p = temp_config("sana.json", SANA_CONFIG_JSON);
        let cfg = DPMSolverMultistepConfig::from_json_file(&p).unwrap();
        assert_eq!(cfg, DPMSolverMultistepConfig::sana());
        assert_eq!(cfg.lambda_min_clipped, f64::NEG_INFINITY);
        let mut s = scheduler_from_config_file(&p).unwrap();
        s.set_timesteps(20).unwrap();
        let mut d = DPMSolverMultistepScheduler::sana_default();
        d.set_timesteps(20).unwrap();
        assert_eq!(s.timesteps(), d.timesteps());
        assert_eq!(s.sigmas(), d.sigmas());
    }

    #[test]
    fn sana_default_tables() {
        let mut s = DPMSolverMultistepScheduler::sana_default();
        s.set_timesteps(20).unwrap();
        assert_eq!(s.timesteps().len(), 20);
        assert_eq!(s.sigmas().len(), 21);
        // diffusers 0.42.1: timesteps start 999, 982, 963, 944 and sigmas end 0.2497916, 0.1362397, 0.
        assert_eq!(&s.timesteps()[..4], &[999.0, 982.0, 963.0, 944.0]);
        assert_eq!(s.sigmas()[20], 0.0);
        assert!((s.sigmas()[19] - 0.136_239_66).abs() < 1e-7);
        assert_eq!(s.init_noise_sigma(), 1.0);
    }

    #[test]
    fn missing_fields_take_diffusers_defaults() {
        let p = temp_config(
            "minimal.json",
            r#"{"_class_name": "DPMSolverMultistepScheduler", "clip_sample": false}"#,
        );
        let cfg = DPMSolverMultistepConfig::from_json_file(&p).unwrap();
        assert_eq!(cfg, DPMSolverMultistepConfig::default());
        assert_eq!(cfg.prediction_type, PredictionType::Epsilon);
        assert_eq!(cfg.solver_order, 2);
        assert!(!cfg.use_flow_sigmas);
    }

    #[test]
    fn legacy_aliases_map_like_diffusers() {
        let p = temp_config(
            "alias.json",
            r#"{"algorithm_type": "deis", "solver_type": "bh2"}"#,
        );
        let cfg = DPMSolverMultistepConfig::from_json_file(&p).unwrap();
        assert_eq!(cfg.algorithm_type, AlgorithmType::DpmSolverPlusPlus);
        assert_eq!(cfg.solver_type, SolverType::Midpoint);
    }

    #[test]
    fn unsupported_options_are_errors_naming_the_key() {
        for (key, json) in [
            ("algorithm_type", r#""algorithm_type": "sde-dpmsolver++""#),
            (
                "algorithm_type",
                r#""algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min""#,
            ),
            ("thresholding", r#""thresholding": true"#),
            ("use_karras_sigmas", r#""use_karras_sigmas": true"#),
            ("use_lu_lambdas", r#""use_lu_lambdas": true"#),
            ("variance_type", r#""variance_type": "learned_range""#),
            ("solver_order", r#""solver_order": 4"#),
            ("beta_schedule", r#""beta_schedule": "sigmoid""#),
            ("timestep_spacing", r#""timestep_spacing": "uniform""#),
        ] {
            let p = temp_config(
                &format!("{key}.json"),
                &format!(r#"{{"_class_name": "DPMSolverMultistepScheduler", {json}}}"#),
            );
            let err = scheduler_from_config_file(&p).err().expect("must fail");
            assert!(
                matches!(err, SanaError::Config { key: ref k, .. } if k == key),
                "{key}: {err}"
            );
        }
        let cfg = DPMSolverMultistepConfig {
            thresholding: true,
            ..DPMSolverMultistepConfig::sana()
        };
        assert!(matches!(
            DPMSolverMultistepScheduler::from_config(cfg),
            Err(SanaError::Scheduler(_))
        ));
    }

    #[test]
    fn step_count_overrun_errors() {
        let mut s = DPMSolverMultistepScheduler::sana_default();
        let x = Tensor::ones([1, 2, 2, 2], (Kind::Float, Device::Cpu));
        assert!(matches!(s.step(&x, &x), Err(SanaError::Scheduler(_))));
        s.set_timesteps(4).unwrap();
        for _ in 0..4 {
            let y = s.step(&x, &x).unwrap();
            assert!(y.isfinite().all().int64_value(&[]) != 0);
        }
        let err = s.step(&x, &x).unwrap_err();
        assert!(err.to_string().contains("only 4 timesteps"), "{err}");
        // set_timesteps resets the history and the step index.
        s.set_timesteps(4).unwrap();
        assert_eq!(s.step_index(), 0);
        let _ = s.step(&x, &x).unwrap();
        assert_eq!(s.step_index(), 1);
    }

    #[test]
    fn numpy_arange_rule() {
        // np.arange(1000, 0, -1000/12): 12 values, the third is 1000 + 2 * (916.66.. - 1000).
        let a = np_arange(1000.0, 0.0, -1000.0 / 12.0);
        assert_eq!(a.len(), 12);
        assert_eq!(a[1], 1000.0 - 1000.0 / 12.0);
        assert_eq!(a[2], 1000.0 + 2.0 * ((1000.0 - 1000.0 / 12.0) - 1000.0));
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
    }
}
