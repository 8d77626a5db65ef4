//! `diffusers/models/modeling_utils.py`: reading and writing diffusers model
//! directories (`config.json` + safetensors, optionally sharded) by parameter name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};
use tch::{nn, Tensor};

pub use crate::config_json::parse_json;
use crate::{Result, SanaError};

/// The diffusers version whose file layout and numerics we match.
pub const DIFFUSERS_VERSION: &str = "0.42.1";
pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
pub const WEIGHTS_INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";

/// How a checkpoint directory names its safetensors: diffusers writes
/// `diffusion_pytorch_model.safetensors`, transformers writes `model.safetensors`
/// (each with a `.index.json` when sharded).
#[derive(Debug, Clone, Copy)]
pub struct WeightsLayout {
    pub single: &'static str,
    pub index: &'static str,
}

pub const DIFFUSERS_WEIGHTS: WeightsLayout = WeightsLayout {
    single: WEIGHTS_NAME,
    index: WEIGHTS_INDEX_NAME,
};

pub const TRANSFORMERS_WEIGHTS: WeightsLayout = WeightsLayout {
    single: "model.safetensors",
    index: "model.safetensors.index.json",
};

/// A model's `config.json` schema.
pub trait ModelConfig: Serialize + DeserializeOwned {
    const CLASS_NAME: &'static str;
    const KNOWN_KEYS: &'static [&'static str];
    /// `Err((key, message))` for a value the model cannot be built with.
    fn validate(&self) -> std::result::Result<(), (String, String)>;
}

/// Checks a config built in code (not read from a file; [`read_config`] checks those
/// and names the file) before a model is constructed from it.
pub fn check_config<C: ModelConfig>(config: &C) -> Result<()> {
    config
        .validate()
        .map_err(|(key, msg)| SanaError::config("<config>", key, msg))
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| SanaError::io(path, e))
}

/// Reads `<dir>/config.json`: warns on keys we do not know, checks `_class_name`
/// and validates values, every error naming the file and the key.
pub fn read_config<C: ModelConfig>(dir: &Path) -> Result<C> {
    let path = dir.join("config.json");
    let text = read_to_string(&path)?;
    let value: serde_json::Value = parse_json(&path, &text)?;
    let Some(map) = value.as_object() else {
        return Err(SanaError::config(&path, "", "expected a JSON object"));
    };
    if let Some(class) = map.get("_class_name").and_then(|v| v.as_str()) {
        if class != C::CLASS_NAME {
            return Err(SanaError::config(
                &path,
                "_class_name",
                format!("is {class:?}, expected {:?}", C::CLASS_NAME),
            ));
        }
    }
    for key in map.keys() {
        if !key.starts_with('_') && !C::KNOWN_KEYS.contains(&key.as_str()) {
            tracing::warn!(file = %path.display(), key, "unknown config key ignored");
        }
    }
    let config: C = parse_json(&path, &text)?;
    config
        .validate()
        .map_err(|(key, msg)| SanaError::config(&path, key, msg))?;
    Ok(config)
}

/// The safetensors files of a model directory, with which file holds each key
/// when sharded.
fn weight_files(dir: &Path, layout: WeightsLayout) -> Result<Vec<PathBuf>> {
    let single = dir.join(layout.single);
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join(layout.index);
    if index.exists() {
        let text = read_to_string(&index)?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index = parse_json(&index, &text)?;
        let files: BTreeSet<&String> = idx.weight_map.values().collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(SanaError::Weights {
        path: dir.to_path_buf(),
        msg: format!("no {} or {} in this directory", layout.single, layout.index),
    })
}

/// Reads all tensors of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|e| SanaError::Weights {
        path: path.to_path_buf(),
        msg: format!("cannot read safetensors: {e}"),
    })
}

/// Copies the diffusers checkpoint in `dir` into `vs` by name. Every variable
/// must be present with its exact shape, and every tensor in the files must be used.
pub fn load_weights(vs: &mut nn::VarStore, dir: &Path) -> Result<()> {
    load_weights_with_layout(vs, dir, DIFFUSERS_WEIGHTS)
}

/// [`load_weights`] for another file naming (e.g. [`TRANSFORMERS_WEIGHTS`]).
pub fn load_weights_with_layout(
    vs: &mut nn::VarStore,
    dir: &Path,
    layout: WeightsLayout,
) -> Result<()> {
    load_weights_renamed(vs, dir, layout, |key| Some(key.to_string()))
}

/// [`load_weights_with_layout`] where `rename` maps each checkpoint key to the
/// variable name it fills, or `None` to skip a tensor the model does not use
/// (e.g. `model.`-prefixed keys and `lm_head` of a transformers `*ForCausalLM`).
pub fn load_weights_renamed(
    vs: &mut nn::VarStore,
    dir: &Path,
    layout: WeightsLayout,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<()> {
    let mut vars: HashMap<String, Tensor> = vs.variables();
    let mut seen = BTreeSet::new();
    for file in weight_files(dir, layout)? {
        for (key, tensor) in read_safetensors(&file)? {
            let Some(name) = rename(&key) else { continue };
            let Some(var) = vars.get_mut(&name) else {
                return Err(SanaError::Weights {
                    path: file,
                    msg: format!(
                        "unexpected key `{key}` (shape {:?}): the model built from config.json has no such parameter",
                        tensor.size()
                    ),
                });
            };
            if var.size() != tensor.size() {
                return Err(SanaError::Weights {
                    path: file,
                    msg: format!(
                        "key `{key}` has shape {:?}, but config.json builds {:?}",
                        tensor.size(),
                        var.size()
                    ),
                });
            }
            tch::no_grad(|| var.copy_(&tensor));
            seen.insert(name);
        }
    }
    let mut missing: Vec<&String> = vars.keys().filter(|k| !seen.contains(*k)).collect();
    missing.sort();
    if let Some(first) = missing.first() {
        let more = if missing.len() > 1 {
            format!(" (and {} more)", missing.len() - 1)
        } else {
            String::new()
        };
        return Err(SanaError::Weights {
            path: dir.to_path_buf(),
            msg: format!("missing key `{first}`{more} in the checkpoint"),
        });
    }
    Ok(())
}

/// Writes `config.json` and `diffusion_pytorch_model.safetensors` like diffusers'
/// `save_pretrained` (single file; tensors saved contiguous, in their own dtype).
pub fn save_pretrained<C: ModelConfig>(vs: &nn::VarStore, config: &C, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| SanaError::io(dir, e))?;
    let mut json = serde_json::to_value(config).expect("config serialises");
    if let Some(map) = json.as_object_mut() {
        map.insert("_class_name".into(), C::CLASS_NAME.into());
        map.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
    }
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&json).expect("json serialises");
    std::fs::write(&cfg_path, text + "\n").map_err(|e| SanaError::io(&cfg_path, e))?;

    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let path = dir.join(WEIGHTS_NAME);
    Tensor::write_safetensors(&named, &path).map_err(|e| SanaError::Weights {
        path: path.clone(),
        msg: format!("cannot write safetensors: {e}"),
    })
}
