//! Schedulers (samplers), one file per diffusers scheduler.
//!
//! Each scheduler reproduces diffusers 0.42.1 to fp32 rounding: the tables are built with the same
//! float64/float32 arithmetic as diffusers (numpy float64, then float32 tensors), and the per-step
//! coefficients are float32 scalars, as diffusers computes them from 0-dim float32 tensors.
//! `scripts/parity/schedulers.py` writes the references the tests compare against.

pub mod flow_sde;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_flow_match_euler_discrete;
pub mod solver;

pub use flow_sde::{cps_step_with_logprob, sde_step_with_logprob, SdeStep};
pub use scheduling_dpmsolver_multistep::{
    AlgorithmType, BetaSchedule, DPMSolverMultistepConfig, DPMSolverMultistepScheduler,
    FinalSigmasType, PredictionType, SolverType, TimestepSpacing, VarianceType,
};
pub use scheduling_flow_match_euler_discrete::{
    FlowMatchEulerDiscreteConfig, FlowMatchEulerDiscreteScheduler, TimeShiftType,
};

pub(crate) use crate::config_json::{config_from_map, de_f64, de_opt_f64, read_json_object};
use crate::error::{Result, SanaError};
use std::path::Path;

/// A diffusers scheduler driven the way a plain text-to-image pipeline drives it.
pub trait Scheduler: Send {
    /// diffusers' set_timesteps(num_inference_steps) (no custom sigmas needed); resets step state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps the pipeline feeds the transformer, exactly as diffusers' `scheduler.timesteps` values (as f64).
    fn timesteps(&self) -> &[f64];
    /// diffusers' `scheduler.sigmas` (length = timesteps + 1).
    fn sigmas(&self) -> &[f64];
    fn init_noise_sigma(&self) -> f64;
    /// One diffusers `step(model_output, timestep, sample).prev_sample`; advances the internal step index
    /// (begin index 0, as in a plain text-to-image pipeline). Errors if called more times than there are timesteps.
    fn step(&mut self, model_output: &tch::Tensor, sample: &tch::Tensor) -> Result<tch::Tensor>;
}

/// Reads a diffusers `scheduler_config.json` and builds the scheduler named by `_class_name`
/// (FlowMatchEulerDiscreteScheduler or DPMSolverMultistepScheduler); unknown class → config error naming the key.
pub fn scheduler_from_config_file(path: &Path) -> Result<Box<dyn Scheduler>> {
    let map = read_json_object(path)?;
    let class = match map.get("_class_name") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(SanaError::config(
                path,
                "_class_name",
                format!("expected a string, got {other}"),
            ))
        }
        None => return Err(SanaError::config(path, "_class_name", "missing")),
    };
    match class.as_str() {
        "FlowMatchEulerDiscreteScheduler" => {
            let config = FlowMatchEulerDiscreteConfig::from_json_map(&map, path)?;
            Ok(Box::new(FlowMatchEulerDiscreteScheduler::from_config_at(
                config, path,
            )?))
        }
        "DPMSolverMultistepScheduler" => {
            let config = DPMSolverMultistepConfig::from_json_map(&map, path)?;
            Ok(Box::new(DPMSolverMultistepScheduler::from_config_at(
                config, path,
            )?))
        }
        other => Err(SanaError::config(
            path,
            "_class_name",
            format!(
                "unsupported scheduler class `{other}` (supported: FlowMatchEulerDiscreteScheduler, \
                 DPMSolverMultistepScheduler)"
            ),
        )),
    }
}

/// `t` (named `name` in the error) has the sample's shape.
pub(crate) fn check_same_shape(name: &str, t: &tch::Tensor, sample: &tch::Tensor) -> Result<()> {
    if t.size() != sample.size() {
        return Err(SanaError::input(
            name,
            format!(
                "shape {:?} differs from the sample's {:?}",
                t.size(),
                sample.size()
            ),
        ));
    }
    Ok(())
}

/// The checks every `step` makes: same shape, floating point, same device.
pub(crate) fn check_step_inputs(model_output: &tch::Tensor, sample: &tch::Tensor) -> Result<()> {
    check_same_shape("model_output", model_output, sample)?;
    for (name, t) in [("model_output", model_output), ("sample", sample)] {
        if !t.is_floating_point() {
            return Err(SanaError::input(
                name,
                format!("expected a floating point tensor, got {:?}", t.kind()),
            ));
        }
    }
    if model_output.device() != sample.device() {
        return Err(SanaError::input(
            "model_output",
            format!(
                "on {:?} but the sample is on {:?}",
                model_output.device(),
                sample.device()
            ),
        ));
    }
    Ok(())
}

/// numpy's `np.linspace(start, stop, num)` in float64, bit for bit: `i * step + start`, last = stop.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = if step == 0.0 {
        (0..num).map(|i| (i as f64 / div) * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    y[num - 1] = stop;
    y
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Loading of the reference traces written by `scripts/parity/schedulers.py`.

    use std::collections::HashMap;
    use std::path::PathBuf;
    use tch::{Device, Kind, Tensor};

    /// The case folder (a failure when the references were not generated).
    pub fn case_dir(case: &str) -> PathBuf {
        crate::testing::parity_case(&format!("scheduler_{case}"))
    }

    /// Where the parity tests run the scheduler: `SANA_TEST_DEVICE=cuda` checks the GPU path.
    pub fn device() -> Device {
        match std::env::var("SANA_TEST_DEVICE").as_deref() {
            Ok("cuda") => Device::Cuda(0),
            _ => Device::Cpu,
        }
    }

    pub struct Trace {
        pub tensors: HashMap<String, Tensor>,
        pub case: serde_json::Value,
    }

    impl Trace {
        pub fn load(dir: &std::path::Path) -> Trace {
            let tensors = Tensor::read_safetensors(dir.join("trace.safetensors"))
                .expect("read trace.safetensors")
                .into_iter()
                .collect();
            let case = serde_json::from_str(
                &std::fs::read_to_string(dir.join("case.json")).expect("read case.json"),
            )
            .expect("parse case.json");
            Trace { tensors, case }
        }
        pub fn get(&self, name: &str) -> &Tensor {
            self.tensors
                .get(name)
                .unwrap_or_else(|| panic!("trace has no tensor `{name}`"))
        }
        /// A trace input, moved to the test device.
        pub fn input(&self, name: &str) -> Tensor {
            self.get(name).to_device(device())
        }
        pub fn vec(&self, name: &str) -> Vec<f64> {
            Vec::<f64>::try_from(&self.get(name).to_kind(Kind::Double)).expect("1-d tensor")
        }
        pub fn steps(&self) -> usize {
            self.case["num_inference_steps"]
                .as_u64()
                .expect("num_inference_steps") as usize
        }
    }

    pub use crate::testing::max_abs_diff;

    pub fn max_abs_diff_slice(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len(), "length mismatch: {a:?} vs {b:?}");
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    pub const TOL: f64 = 1e-4;

    /// Runs a reference case twice: step by step on diffusers' own inputs (each prev_sample checked), then
    /// free-running on its own outputs (the chain's error checked). `make` builds the scheduler from the
    /// case's `scheduler_config.json` and calls set_timesteps.
    pub fn check_scheduler_case(
        case: &str,
        make: impl Fn(&std::path::Path, &serde_json::Value) -> Box<dyn super::Scheduler>,
    ) {
        let dir = case_dir(case);
        let trace = Trace::load(&dir);
        let config = dir.join("scheduler_config.json");
        let steps = trace.steps();

        let mut s = make(&config, &trace.case);
        let ts_err = max_abs_diff_slice(s.timesteps(), &trace.vec("timesteps"));
        let sig_err = max_abs_diff_slice(s.sigmas(), &trace.vec("sigmas"));
        assert_eq!(s.timesteps().len(), steps);

        let mut step_err = 0.0_f64;
        for i in 0..steps {
            let prev = s
                .step(
                    &trace.input(&format!("model_output_{i}")),
                    &trace.input(&format!("sample_{i}")),
                )
                .unwrap_or_else(|e| panic!("{case}: step {i}: {e}"));
            let reference = trace.get(&format!("prev_sample_{i}"));
            assert_eq!(prev.kind(), reference.kind());
            let e = max_abs_diff(&prev, reference);
            assert!(e.is_finite(), "{case}: step {i}: non-finite error");
            step_err = step_err.max(e);
        }
        let x = trace.input("sample_0");
        assert!(
            s.step(&x, &x).is_err(),
            "{case}: step past the end must fail"
        );

        let mut s = make(&config, &trace.case);
        let mut x = trace.input("sample_0");
        let mut chain_err = 0.0_f64;
        for i in 0..steps {
            x = s
                .step(&trace.input(&format!("model_output_{i}")), &x)
                .unwrap();
            chain_err = chain_err.max(max_abs_diff(&x, trace.get(&format!("prev_sample_{i}"))));
        }

        eprintln!(
            "scheduler_{case}: max |diff| timesteps {ts_err:.3e}, sigmas {sig_err:.3e}, \
             prev_sample (per step) {step_err:.3e}, free-running chain {chain_err:.3e}"
        );
        assert!(ts_err <= TOL, "{case}: timesteps differ by {ts_err:e}");
        assert!(sig_err <= TOL, "{case}: sigmas differ by {sig_err:e}");
        assert!(
            step_err <= TOL,
            "{case}: prev_sample differs by {step_err:e}"
        );
        assert!(
            chain_err <= TOL,
            "{case}: free-running chain differs by {chain_err:e}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sana-sched-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn unknown_class_name_error_names_the_key() {
        let p = write_temp(
            "unknown_class.json",
            r#"{"_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000}"#,
        );
        let err = scheduler_from_config_file(&p).err().expect("must fail");
        match &err {
            SanaError::Config { key, path, .. } => {
                assert_eq!(key, "_class_name");
                assert_eq!(path, &p);
            }
            other => panic!("wrong error: {other}"),
        }
        assert!(err.to_string().contains("EulerAncestralDiscreteScheduler"));
    }

    #[test]
    fn missing_class_name_is_a_config_error() {
        let p = write_temp("no_class.json", r#"{"shift": 3.0}"#);
        let err = scheduler_from_config_file(&p).err().expect("must fail");
        assert!(matches!(err, SanaError::Config { ref key, .. } if key == "_class_name"));
    }

    #[test]
    fn bad_value_error_names_the_key() {
        let p = write_temp(
            "bad_value.json",
            r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_type": "bogus"}"#,
        );
        let err = scheduler_from_config_file(&p).err().expect("must fail");
        assert!(
            matches!(err, SanaError::Config { ref key, .. } if key == "solver_type"),
            "{err}"
        );
        let p = write_temp(
            "bad_type.json",
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": "three"}"#,
        );
        let err = scheduler_from_config_file(&p).err().expect("must fail");
        assert!(
            matches!(err, SanaError::Config { ref key, .. } if key == "shift"),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_is_a_config_error() {
        let p = write_temp("malformed.json", r#"{"_class_name": "#);
        let err = scheduler_from_config_file(&p).err().expect("must fail");
        assert!(matches!(err, SanaError::Config { ref key, .. } if key.is_empty()));
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = scheduler_from_config_file(Path::new("/nonexistent/scheduler_config.json"))
            .err()
            .expect("must fail");
        assert!(matches!(err, SanaError::Io { .. }));
    }

    #[test]
    fn np_linspace_matches_numpy_rule() {
        assert_eq!(np_linspace(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(np_linspace(2.0, 2.0, 3), vec![2.0, 2.0, 2.0]);
        assert_eq!(np_linspace(1.0, 0.0, 1), vec![1.0]);
        // numpy: np.linspace(0, 999, 8)[3] == 428.1428571428571 (3 * (999/7) + 0)
        assert_eq!(np_linspace(0.0, 999.0, 8)[3], 3.0 * (999.0 / 7.0));
    }
}
