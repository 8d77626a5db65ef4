//! diffusers' `FlowMatchEulerDiscreteScheduler` (schedulers/scheduling_flow_match_euler_discrete.py, 0.42.1).
//!
//! Supported: `shift`, `use_dynamic_shifting` (with `mu`, see [`FlowMatchEulerDiscreteScheduler::set_timesteps_with_mu`]),
//! `time_shift_type`, `shift_terminal`, `invert_sigmas`, `use_karras_sigmas`, `use_exponential_sigmas`.
//! Refused with an error: `use_beta_sigmas` (needs scipy's beta quantiles) and `stochastic_sampling`
//! (draws noise inside `step`, which this API does not take).

use super::{check_step_inputs, config_from_map, de_f64, de_opt_f64, np_linspace, Scheduler};
use crate::error::{Result, SanaError};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

/// How `set_timesteps_with_mu` maps `mu` onto the sigmas when `use_dynamic_shifting` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeShiftType {
    Exponential,
    Linear,
}

/// Every `__init__` argument of diffusers' FlowMatchEulerDiscreteScheduler, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerDiscreteConfig {
    pub num_train_timesteps: usize,
    #[serde(deserialize_with = "de_f64")]
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    #[serde(deserialize_with = "de_opt_f64")]
    pub base_shift: Option<f64>,
    #[serde(deserialize_with = "de_opt_f64")]
    pub max_shift: Option<f64>,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub invert_sigmas: bool,
    #[serde(deserialize_with = "de_opt_f64")]
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub time_shift_type: TimeShiftType,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: TimeShiftType::Exponential,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchEulerDiscreteConfig {
    /// Reads a diffusers `scheduler_config.json` (its `_class_name` is not checked here).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        Self::from_json_map(&super::read_json_object(path)?, path)
    }

    pub(crate) fn from_json_map(
        map: &serde_json::Map<String, serde_json::Value>,
        path: &Path,
    ) -> Result<Self> {
        config_from_map(map, path, "FlowMatchEulerDiscreteScheduler")
    }

    /// The first unsupported or inconsistent option, as (key, message).
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.num_train_timesteps == 0 {
            return Err(("num_train_timesteps", "must be at least 1".into()));
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
        if self.use_beta_sigmas {
            return Err((
                "use_beta_sigmas",
                "beta sigmas (scipy.stats.beta.ppf) are not supported".into(),
            ));
        }
        if self.stochastic_sampling {
            return Err((
                "stochastic_sampling",
                "stochastic sampling is not supported (use schedulers::flow_sde for SDE steps)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Flow-matching Euler sampler: `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v`.
#[derive(Debug)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: FlowMatchEulerDiscreteConfig,
    shift: f64,
    /// `sigmas[-1]` / `sigmas[0]` of the 1000-step training table, as diffusers' `__init__` leaves them.
    sigma_min: f64,
    sigma_max: f64,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: usize,
    timesteps_set: bool,
}

impl FlowMatchEulerDiscreteScheduler {
    /// The default config with the given `shift` (the `euler` sampler uses SANA's `flow_shift`).
    pub fn new(shift: f64) -> Self {
        let config = FlowMatchEulerDiscreteConfig {
            shift,
            ..Default::default()
        };
        Self::build(config)
    }

    pub fn from_config(config: FlowMatchEulerDiscreteConfig) -> Result<Self> {
        config
            .check()
            .map_err(|(key, msg)| SanaError::Scheduler(format!("`{key}`: {msg}")))?;
        Ok(Self::build(config))
    }

    /// As [`Self::from_config`], reporting a bad option as a config error of `path`.
    pub(crate) fn from_config_at(
        config: FlowMatchEulerDiscreteConfig,
        path: &Path,
    ) -> Result<Self> {
        config
            .check()
            .map_err(|(key, msg)| SanaError::config(path, key, msg))?;
        Ok(Self::build(config))
    }

    fn build(config: FlowMatchEulerDiscreteConfig) -> Self {
        // diffusers' __init__ works on float32 tensors: sigmas = t / N for t = N..1, then shifted (unless
        // dynamic); only the two ends survive into set_timesteps.
        let n = config.num_train_timesteps as f32;
        let shift32 = config.shift as f32;
        let shift_m1 = (config.shift - 1.0) as f32;
        let init = |t: f32| {
            let s = t / n;
            if config.use_dynamic_shifting {
                s
            } else {
                (shift32 * s) / (1.0 + shift_m1 * s)
            }
        };
        let sigma_max = init(n) as f64;
        let sigma_min = init(1.0) as f64;
        Self {
            shift: config.shift,
            config,
            sigma_min,
            sigma_max,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: 0,
            timesteps_set: false,
        }
    }

    pub fn config(&self) -> &FlowMatchEulerDiscreteConfig {
        &self.config
    }

    /// The shift used by the next `set_timesteps` (diffusers' `scheduler.shift`).
    pub fn shift(&self) -> f64 {
        self.shift
    }

    /// diffusers' `set_shift`: takes effect at the next `set_timesteps`.
    pub fn set_shift(&mut self, shift: f64) {
        self.shift = shift;
    }

    /// Steps taken since `set_timesteps`.
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// diffusers' `set_timesteps(num_inference_steps, mu=mu)`; `mu` is required iff `use_dynamic_shifting`.
    pub fn set_timesteps_with_mu(
        &mut self,
        num_inference_steps: usize,
        mu: Option<f64>,
    ) -> Result<()> {
        let cfg = &self.config;
        if cfg.use_dynamic_shifting && mu.is_none() {
            return Err(SanaError::Scheduler(
                "`mu` must be passed when `use_dynamic_shifting` is set".into(),
            ));
        }
        if num_inference_steps == 0 {
            return Err(SanaError::Scheduler(
                "num_inference_steps must be at least 1".into(),
            ));
        }
        let n_train = cfg.num_train_timesteps as f64;

        // 1. Default sigmas: numpy float64 from the (float32) training ends.
        let mut sigmas: Vec<f64> = np_linspace(
            self.sigma_max * n_train,
            self.sigma_min * n_train,
            num_inference_steps,
        )
        .into_iter()
        .map(|t| t / n_train)
        .collect();

        // 2. Shift, either resolution-dependent (mu) or static.
        match mu.filter(|_| cfg.use_dynamic_shifting) {
            Some(mu) => {
                let e = mu.exp();
                for s in &mut sigmas {
                    // (1/t - 1) ** 1.0 is exact, so it is left out.
                    let x = 1.0 / *s - 1.0;
                    *s = match cfg.time_shift_type {
                        TimeShiftType::Exponential => e / (e + x),
                        TimeShiftType::Linear => mu / (mu + x),
                    };
                }
            }
            None => {
                let shift = self.shift;
                for s in &mut sigmas {
                    *s = shift * *s / (1.0 + (shift - 1.0) * *s);
                }
            }
        }

        // 3. Stretch so the schedule ends at shift_terminal (Python truthiness: 0.0 means off).
        if let Some(st) = cfg.shift_terminal.filter(|&st| st != 0.0) {
            let last = 1.0 - sigmas[sigmas.len() - 1];
            let scale = last / (1.0 - st);
            for s in &mut sigmas {
                *s = 1.0 - ((1.0 - *s) / scale);
            }
        }

        // 4. Optional re-spacing between the ends.
        let n = num_inference_steps;
        if cfg.use_karras_sigmas {
            let (smin, smax) = (sigmas[sigmas.len() - 1], sigmas[0]);
            let rho = 7.0_f64;
            let min_inv_rho = smin.powf(1.0 / rho);
            let max_inv_rho = smax.powf(1.0 / rho);
            sigmas = np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
                .collect();
        } else if cfg.use_exponential_sigmas {
            let (smin, smax) = (sigmas[sigmas.len() - 1], sigmas[0]);
            sigmas = np_linspace(smax.ln(), smin.ln(), n)
                .into_iter()
                .map(f64::exp)
                .collect();
        }

        // 5./6. float32 tensors; timesteps = sigmas * N in float32; terminal sigma appended.
        let n32 = cfg.num_train_timesteps as f32;
        let mut sig32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let terminal = if cfg.invert_sigmas {
            for s in &mut sig32 {
                *s = 1.0 - *s;
            }
            1.0
        } else {
            0.0
        };
        self.timesteps = sig32.iter().map(|&s| (s * n32) as f64).collect();
        self.sigmas = sig32.iter().map(|&s| s as f64).collect();
        self.sigmas.push(terminal);
        self.step_index = 0;
        self.timesteps_set = true;
        Ok(())
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.set_timesteps_with_mu(num_inference_steps, None)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        // diffusers has no init_noise_sigma here; pipelines use unscaled noise.
        1.0
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        if !self.timesteps_set {
            return Err(SanaError::Scheduler(
                "FlowMatchEulerDiscreteScheduler: set_timesteps must be called before step".into(),
            ));
        }
        let i = self.step_index;
        if i >= self.timesteps.len() {
            return Err(SanaError::Scheduler(format!(
                "FlowMatchEulerDiscreteScheduler: step {} called but there are only {} timesteps",
                i + 1,
                self.timesteps.len()
            )));
        }
        check_step_inputs(model_output, sample)?;
        // diffusers: dt is a 0-dim float32 tensor; sample is upcast, the result cast to model_output's dtype.
        let dt = self.sigmas[i + 1] as f32 - self.sigmas[i] as f32;
        let sample = sample.to_kind(Kind::Float);
        let prev = &sample + model_output * dt as f64;
        self.step_index += 1;
        Ok(prev.to_kind(model_output.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::scheduler_from_config_file;
    use crate::schedulers::test_util::check_scheduler_case;

    fn from_case(config: &Path, case: &serde_json::Value) -> Box<dyn Scheduler> {
        let cfg = FlowMatchEulerDiscreteConfig::from_json_file(config).expect("config");
        let mut s = FlowMatchEulerDiscreteScheduler::from_config(cfg).expect("scheduler");
        let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
        s.set_timesteps_with_mu(steps, case["mu"].as_f64())
            .expect("set_timesteps");
        Box::new(s)
    }

    fn via_factory(config: &Path, case: &serde_json::Value) -> Box<dyn Scheduler> {
        let mut s = scheduler_from_config_file(config).expect("scheduler");
        s.set_timesteps(case["num_inference_steps"].as_u64().unwrap() as usize)
            .expect("set_timesteps");
        s
    }

    #[test]
    fn parity_euler_shift3_20() {
        check_scheduler_case("euler_shift3_20", via_factory);
    }

    #[test]
    fn parity_euler_shift1_10() {
        check_scheduler_case("euler_shift1_10", via_factory);
    }

    #[test]
    fn parity_euler_shift_terminal_12() {
        check_scheduler_case("euler_shift_terminal_12", via_factory);
    }

    #[test]
    fn parity_euler_karras_9() {
        check_scheduler_case("euler_karras_9", via_factory);
    }

    #[test]
    fn parity_euler_exponential_9() {
        check_scheduler_case("euler_exponential_9", via_factory);
    }

    #[test]
    fn parity_euler_invert_8() {
        check_scheduler_case("euler_invert_8", via_factory);
    }

    #[test]
    fn parity_euler_dynamic_exp_10() {
        check_scheduler_case("euler_dynamic_exp_10", from_case);
    }

    #[test]
    fn parity_euler_dynamic_linear_10() {
        check_scheduler_case("euler_dynamic_linear_10", from_case);
    }

    #[test]
    fn new_shift3_table_ends() {
        let mut s = FlowMatchEulerDiscreteScheduler::new(3.0);
        s.set_timesteps(20).unwrap();
        assert_eq!(s.timesteps().len(), 20);
        assert_eq!(s.sigmas().len(), 21);
        assert_eq!(s.sigmas()[0], 1.0);
        assert_eq!(s.timesteps()[0], 1000.0);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        assert!(s.sigmas().windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn step_count_overrun_errors() {
        let mut s = FlowMatchEulerDiscreteScheduler::new(3.0);
        let x = Tensor::zeros([1, 2, 3, 3], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(s.step(&x, &x), Err(SanaError::Scheduler(_))));
        s.set_timesteps(3).unwrap();
        for _ in 0..3 {
            let _ = s.step(&x, &x).unwrap();
        }
        let err = s.step(&x, &x).unwrap_err();
        assert!(err.to_string().contains("only 3 timesteps"), "{err}");
        // set_timesteps resets the step state.
        s.set_timesteps(2).unwrap();
        let _ = s.step(&x, &x).unwrap();
    }

    #[test]
    fn step_keeps_model_output_dtype() {
        let mut s = FlowMatchEulerDiscreteScheduler::new(3.0);
        s.set_timesteps(4).unwrap();
        let x = Tensor::ones([1, 2, 2, 2], (Kind::BFloat16, tch::Device::Cpu));
        let v = Tensor::ones([1, 2, 2, 2], (Kind::BFloat16, tch::Device::Cpu));
        assert_eq!(s.step(&v, &x).unwrap().kind(), Kind::BFloat16);
        let bad = Tensor::ones([1, 2, 2, 3], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(s.step(&bad, &x), Err(SanaError::Input { .. })));
    }

    #[test]
    fn dynamic_shifting_without_mu_errors() {
        let cfg = FlowMatchEulerDiscreteConfig {
            use_dynamic_shifting: true,
            ..Default::default()
        };
        let mut s = FlowMatchEulerDiscreteScheduler::from_config(cfg).unwrap();
        assert!(matches!(s.set_timesteps(10), Err(SanaError::Scheduler(_))));
        s.set_timesteps_with_mu(10, Some(0.5)).unwrap();
    }

    #[test]
    fn missing_fields_take_diffusers_defaults() {
        let map = crate::config_json::parse_json_object(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0",
                "shift": 3.0, "some_future_key": 1}"#,
            Path::new("x.json"),
        )
        .unwrap();
        let cfg = FlowMatchEulerDiscreteConfig::from_json_map(&map, Path::new("x.json")).unwrap();
        assert_eq!(
            cfg,
            FlowMatchEulerDiscreteConfig {
                shift: 3.0,
                ..Default::default()
            }
        );
        assert_eq!(cfg.num_train_timesteps, 1000);
        assert_eq!(cfg.base_shift, Some(0.5));
    }

    #[test]
    fn unsupported_options_are_config_errors() {
        for (key, json) in [
            ("stochastic_sampling", r#""stochastic_sampling": true"#),
            ("use_beta_sigmas", r#""use_beta_sigmas": true"#),
            (
                "use_karras_sigmas",
                r#""use_karras_sigmas": true, "use_exponential_sigmas": true"#,
            ),
        ] {
            let dir = std::env::temp_dir().join(format!("sana-fm-test-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join(format!("{key}.json"));
            std::fs::write(
                &p,
                format!(r#"{{"_class_name": "FlowMatchEulerDiscreteScheduler", {json}}}"#),
            )
            .unwrap();
            let err = scheduler_from_config_file(&p).err().expect("must fail");
            assert!(
                matches!(err, SanaError::Config { key: ref k, .. } if k == key),
                "{err}"
            );
        }
    }
}
