//! Schedulers (samplers), one file per diffusers scheduler.
//!
//! Each scheduler reproduces diffusers 0.42.1 to fp32 rounding: the tables are built with the same
//! float64/float32 arithmetic as diffusers (numpy float64, then float32 tensors), and the per-step
//! coefficients are float32 scalars, as diffusers computes them from 0-dim float32 tensors.
//! `scripts/parity/schedulers.py` writes the references the tests compare against.

pub mod flow_sde;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_flow_match_euler_discrete;

pub use flow_sde::{cps_step_with_logprob, sde_step_with_logprob, SdeStep};
pub use scheduling_dpmsolver_multistep::{
    AlgorithmType, BetaSchedule, DPMSolverMultistepConfig, DPMSolverMultistepScheduler,
    FinalSigmasType, PredictionType, SolverType, TimestepSpacing,
};
pub use scheduling_flow_match_euler_discrete::{
    FlowMatchEulerDiscreteConfig, FlowMatchEulerDiscreteScheduler, TimeShiftType,
};

use crate::error::{Result, SanaError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
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
    let map = read_config_json(path)?;
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

/// Reads a JSON object as Python's `json` writes it: diffusers configs may hold the bare tokens
/// `-Infinity`, `Infinity` and `NaN` (e.g. SANA's `lambda_min_clipped`), which serde_json rejects.
pub(crate) fn read_config_json(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| SanaError::io(path, e))?;
    parse_config_json(&text, path)
}

pub(crate) fn parse_config_json(
    text: &str,
    path: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let fixed = quote_non_finite_tokens(text);
    match serde_json::from_str::<serde_json::Value>(&fixed) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(SanaError::config(path, "", "expected a JSON object")),
        Err(e) => Err(SanaError::config(path, "", format!("invalid JSON: {e}"))),
    }
}

/// Turns the bare Python tokens `-Infinity`, `Infinity`, `NaN` (outside strings) into the strings
/// `"-Infinity"`, `"Infinity"`, `"NaN"`, which [`de_f64`] accepts for float fields.
fn quote_non_finite_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(t) = token {
                out.push('"');
                out.push_str(t);
                out.push('"');
                rest = &rest[t.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Builds a config struct from a diffusers config object: missing keys take the struct's defaults (the
/// diffusers `__init__` defaults), unknown keys are ignored with a warning (`_`-keys silently), and a bad
/// value is reported with its key.
pub(crate) fn config_from_map<T>(
    map: &serde_json::Map<String, serde_json::Value>,
    path: &Path,
    class: &str,
) -> Result<T>
where
    T: DeserializeOwned + Serialize + Default,
{
    // The struct's own serialized form lists its keys, so no hand-kept list can drift from the fields.
    let known = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let mut used = serde_json::Map::new();
    for (key, value) in map {
        if key.starts_with('_') {
            continue;
        }
        if !known.contains_key(key) {
            tracing::warn!(path = %path.display(), key = %key, "{class}: ignoring unknown config key");
            continue;
        }
        // One key at a time, so that a type error names its key (serde's message does not).
        let mut single = serde_json::Map::new();
        single.insert(key.clone(), value.clone());
        if let Err(e) = serde_json::from_value::<T>(serde_json::Value::Object(single)) {
            return Err(SanaError::config(path, key.as_str(), e.to_string()));
        }
        used.insert(key.clone(), value.clone());
    }
    serde_json::from_value::<T>(serde_json::Value::Object(used))
        .map_err(|e| SanaError::config(path, "", e.to_string()))
}

/// Deserializes a float that may be the string `"Infinity"`, `"-Infinity"` or `"NaN"` (see
/// [`quote_non_finite_tokens`]).
pub(crate) fn de_f64<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum F {
        Num(f64),
        Str(String),
    }
    match F::deserialize(d)? {
        F::Num(x) => Ok(x),
        F::Str(s) => match s.as_str() {
            "Infinity" | "inf" => Ok(f64::INFINITY),
            "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            "NaN" | "nan" => Ok(f64::NAN),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number, got string {s:?}"
            ))),
        },
    }
}

/// [`de_f64`] for optional floats (`null` → `None`).
pub(crate) fn de_opt_f64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(serde::Deserialize)]
    struct W(#[serde(deserialize_with = "de_f64")] f64);
    Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
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

    pub fn parity_dir() -> PathBuf {
        match std::env::var_os("SANA_PARITY_DIR") {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/parity")),
        }
    }

    /// The case folder, or `None` (after a note) when references were not generated and not required.
    pub fn case_dir(case: &str) -> Option<PathBuf> {
        let dir = parity_dir().join(format!("scheduler_{case}"));
        if dir.join("trace.safetensors").exists() {
            return Some(dir);
        }
        if std::env::var("SANA_PARITY_REQUIRED").as_deref() == Ok("1") {
            panic!(
                "missing parity reference {}: run `python scripts/parity/make_reference.py {}` \
                 (or scripts/parity/schedulers.py) with diffusers 0.42.1",
                dir.display(),
                parity_dir().display()
            );
        }
        eprintln!(
            "skipping scheduler parity case `{case}`: {} not found (run scripts/parity/make_reference.py)",
            dir.display()
        );
        None
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
            self.case["num_inference_steps"].as_u64().expect("num_inference_steps") as usize
        }
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size(), "shape mismatch");
        let d = (a.to_device(Device::Cpu).to_kind(Kind::Double)
            - b.to_device(Device::Cpu).to_kind(Kind::Double))
        .abs()
        .max();
        d.double_value(&[])
    }

    pub fn max_abs_diff_slice(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len(), "length mismatch: {a:?} vs {b:?}");
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    pub const TOL: f64 = 1e-4;
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
    fn non_finite_tokens_are_quoted_outside_strings_only() {
        let s = r#"{"a": -Infinity, "b": "x NaN \" Infinity", "c": [NaN, Infinity]}"#;
        assert_eq!(
            quote_non_finite_tokens(s),
            r#"{"a": "-Infinity", "b": "x NaN \" Infinity", "c": ["NaN", "Infinity"]}"#
        );
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
