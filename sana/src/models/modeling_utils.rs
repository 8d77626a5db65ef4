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

/// diffusers' `save_pretrained(max_shard_size=…)` default: "10GB".
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 10_000_000_000;

/// How [`save_pretrained_with`] writes the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaveOptions {
    /// Cast to this dtype (None: as the parameters are).
    pub kind: Option<tch::Kind>,
    /// Bytes per file before sharding, as diffusers' `max_shard_size`.
    pub max_shard_size: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            kind: None,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
        }
    }
}

/// Parses a size as diffusers and huggingface_hub take it: `"10GB"`, `"500MB"`,
/// `"5GiB"`, or a plain number of bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as \"10GB\" or \"500MB\""))?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use KB, MB, GB, GiB, …)"
            ))
        }
    };
    Ok((n * mult as f64) as u64)
}

/// Writes `config.json` and `diffusion_pytorch_model.safetensors` like diffusers'
/// `save_pretrained` (single file; tensors saved contiguous, in their own dtype).
pub fn save_pretrained<C: ModelConfig>(vs: &nn::VarStore, config: &C, dir: &Path) -> Result<()> {
    save_pretrained_with(vs, config, dir, &SaveOptions::default())
}

/// [`save_pretrained`] with a dtype and diffusers' sharding: past `max_shard_size`
/// the weights go to `diffusion_pytorch_model-0000i-of-0000n.safetensors` plus
/// `diffusion_pytorch_model.safetensors.index.json`, split as huggingface_hub's
/// `split_torch_state_dict_into_shards` splits them. Weight files of an earlier
/// save in `dir` that this one does not write are removed, as diffusers does.
pub fn save_pretrained_with<C: ModelConfig>(
    vs: &nn::VarStore,
    config: &C,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<()> {
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
        .map(|(k, v)| {
            let v = v.detach();
            let v = match opts.kind {
                Some(kind) => v.to_kind(kind),
                None => v,
            };
            (k, v.contiguous())
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));

    // huggingface_hub's greedy split: a tensor larger than the limit gets a shard of its own.
    let mut shards: Vec<Vec<(String, Tensor)>> = Vec::new();
    let (mut current, mut current_size) = (Vec::new(), 0u64);
    let mut total_size = 0u64;
    for (k, t) in named {
        let size = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        total_size += size;
        if size > opts.max_shard_size {
            shards.push(vec![(k, t)]);
            continue;
        }
        if current_size + size > opts.max_shard_size && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push((k, t));
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 {
            WEIGHTS_NAME.to_string()
        } else {
            format!("diffusion_pytorch_model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let written: BTreeSet<String> = (0..n).map(file_name).collect();
    // Remove weights of an earlier save (another shard count) so loading finds only this one.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with("diffusion_pytorch_model")
                && (name.ends_with(".safetensors") || name == WEIGHTS_INDEX_NAME);
            if ours && !written.contains(&name) {
                std::fs::remove_file(e.path()).map_err(|err| SanaError::io(e.path(), err))?;
            }
        }
    }
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = file_name(i);
        let path = dir.join(&name);
        Tensor::write_safetensors(shard, &path).map_err(|e| SanaError::Weights {
            path: path.clone(),
            msg: format!("cannot write safetensors: {e}"),
        })?;
        for (k, _) in shard {
            weight_map.insert(k.clone(), name.clone());
        }
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        let path = dir.join(WEIGHTS_INDEX_NAME);
        let text = serde_json::to_string_pretty(&index).expect("json") + "\n";
        std::fs::write(&path, text).map_err(|e| SanaError::io(&path, e))?;
    }
    tracing::info!(dir = %dir.display(), shards = n, total_size, "model saved");
    Ok(())
}
