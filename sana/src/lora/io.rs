//! Adapter files, as PEFT and diffusers write and read them.
//!
//! - PEFT `save_pretrained`: a folder with `adapter_config.json` (the `LoraConfig`,
//!   `json.dumps(indent=2, sort_keys=True)`) and `adapter_model.safetensors`, keys
//!   `base_model.model.<module>.lora_A.weight` (adapter name dropped).
//! - diffusers `SanaPipeline.save_lora_weights`: `pytorch_lora_weights.safetensors`,
//!   keys `transformer.<module>.lora_A.weight`, the `LoraConfig` as JSON in the
//!   safetensors metadata under `lora_adapter_metadata`, each key prefixed
//!   `transformer.`. Without that metadata diffusers takes `lora_alpha = r` per module
//!   (`get_peft_kwargs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::SafeTensors;
use serde_json::{Map, Value};
use tch::Tensor;

use super::config::{InitLoraWeights, LayerIndexes, StringOrList};
use super::{LoraAdapters, LoraConfig, PatternMap, TargetModules, PEFT_VERSION};
use crate::{Result, SanaError};

pub const PEFT_CONFIG_NAME: &str = "adapter_config.json";
pub const PEFT_WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// diffusers' `LORA_WEIGHT_NAME_SAFE`.
pub const DIFFUSERS_LORA_WEIGHTS_NAME: &str = "pytorch_lora_weights.safetensors";
/// diffusers' `LORA_ADAPTER_METADATA_KEY`.
pub const LORA_ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";
const PEFT_PREFIX: &str = "base_model.model.";
/// `SanaLoraLoaderMixin.transformer_name`.
const DIFFUSERS_PREFIX: &str = "transformer.";

/// A safetensors file's `__metadata__` header.
pub type Metadata = HashMap<String, String>;

/// Named tensors with the metadata header of their file.
pub type TensorsWithMetadata = (Vec<(String, Tensor)>, Option<Metadata>);

/// Which layout an adapter was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// `adapter_config.json` + `adapter_model.safetensors`.
    Peft,
    /// `pytorch_lora_weights.safetensors` with the config in its metadata.
    Diffusers,
    /// A diffusers file without metadata (`lora_alpha = r` per module).
    DiffusersWithoutMetadata,
}

/// A JSON number as Python writes it: integral values without a fraction.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// PEFT's `MIN_TARGET_MODULES_FOR_OPTIMIZATION`.
const MIN_TARGET_MODULES_FOR_OPTIMIZATION: usize = 20;

/// `.`-suffixes of a module name, shortest first.
fn suffixes(s: &str) -> Vec<String> {
    let parts: Vec<&str> = s.split('.').collect();
    (0..parts.len())
        .rev()
        .map(|i| parts[i..].join("."))
        .collect()
}

/// PEFT's `_find_minimal_target_modules`: the fewest `.`-suffixes that select
/// `targets` and none of `others`.
fn minimal_target_modules(targets: &[String], others: &[String]) -> Vec<String> {
    let other_suffixes: std::collections::HashSet<String> =
        others.iter().flat_map(|o| suffixes(o)).collect();
    let mut items: Vec<(Vec<String>, &String)> = targets.iter().map(|t| (suffixes(t), t)).collect();
    items.sort();
    let mut required: Vec<String> = Vec::new();
    for (sfx, item) in items {
        for s in sfx {
            if required.contains(&s) || other_suffixes.contains(&s) {
                continue;
            }
            if !required.iter().any(|r| item.ends_with(&format!(".{r}"))) {
                required.push(s);
                break;
            }
        }
    }
    if required.is_empty() {
        targets.to_vec()
    } else {
        required
    }
}

/// `target_modules` as PEFT saves it: `all-linear` resolved to module names, and a
/// list of 20 or more names condensed to PEFT's minimal suffixes (both done by
/// `inject_adapter` on the live config). `all_modules`: every module name of the model.
fn names_value(t: &TargetModules, resolved: &[String], all_modules: &[String]) -> Value {
    let list = match t {
        TargetModules::Regex(s) if !t.is_all_linear() => return Value::from(s.clone()),
        TargetModules::Regex(_) => resolved.to_vec(),
        TargetModules::Names(v) => v.clone(),
    };
    let mut list = if list.len() >= MIN_TARGET_MODULES_FOR_OPTIMIZATION {
        let others: Vec<String> = all_modules
            .iter()
            .filter(|n| !list.contains(n) && !list.iter().any(|s| n.ends_with(&format!(".{s}"))))
            .cloned()
            .collect();
        let min = minimal_target_modules(&list, &others);
        if min.len() < list.len() {
            min
        } else {
            list
        }
    } else {
        list
    };
    // A set in PEFT; written as a list.
    list.sort();
    list.dedup();
    Value::from(list)
}

/// The `LoraConfig.to_dict()` PEFT 0.21.2 produces for `config` (every key, its
/// defaults for the features sana-rl does not use). `resolved`: the targeted
/// module names (what `all-linear` becomes). `saved`: as `save_pretrained` writes
/// it (`inference_mode: true`, `auto_mapping` naming the diffusers class) rather
/// than a live training config (diffusers' metadata).
pub fn peft_config_json(
    config: &LoraConfig,
    resolved: &[String],
    all_modules: &[String],
    saved: bool,
) -> Map<String, Value> {
    let mut m = Map::new();
    let null = Value::Null;
    for key in [
        "alora_invocation_tokens",
        "arrow_config",
        "base_model_name_or_path",
        "corda_config",
        "eva_config",
        "kasa_config",
        "layer_replication",
        "lora_ga_config",
        "megatron_config",
        "modules_to_save",
        "monteclora_config",
        "revision",
        "target_parameters",
        "task_type",
        "trainable_token_indices",
        "use_bdlora",
        "velora_config",
    ] {
        m.insert(key.into(), null.clone());
    }
    for key in [
        "ensure_weight_tying",
        "fan_in_fan_out",
        "lora_bias",
        "use_dora",
        "use_qalora",
    ] {
        m.insert(key.into(), Value::Bool(false));
    }
    m.insert("bias".into(), "none".into());
    m.insert("loftq_config".into(), Value::Object(Map::new()));
    m.insert("megatron_core".into(), "megatron.core".into());
    m.insert("peft_type".into(), "LORA".into());
    m.insert("peft_version".into(), PEFT_VERSION.into());
    m.insert("qalora_group_size".into(), 16.into());
    // Informational keys of an imported config survive a round trip.
    for key in ["base_model_name_or_path", "revision", "task_type"] {
        if let Some(v) = config.other.get(key).filter(|v| !v.is_null()) {
            m.insert(key.into(), v.clone());
        }
    }
    m.insert("inference_mode".into(), Value::Bool(saved));
    m.insert(
        "auto_mapping".into(),
        if saved {
            serde_json::json!({
                "base_model_class": "SanaTransformer2DModel",
                "parent_library": "diffusers.models.transformers.sana_transformer"
            })
        } else {
            Value::Null
        },
    );
    m.insert("r".into(), config.r.into());
    m.insert("lora_alpha".into(), number(config.lora_alpha));
    m.insert("lora_dropout".into(), Value::from(config.lora_dropout));
    m.insert("use_rslora".into(), config.use_rslora.into());
    m.insert(
        "init_lora_weights".into(),
        match config.init_lora_weights {
            InitLoraWeights::Kaiming => true.into(),
            InitLoraWeights::Random => false.into(),
            InitLoraWeights::Gaussian => "gaussian".into(),
        },
    );
    m.insert(
        "target_modules".into(),
        config
            .target_modules
            .as_ref()
            .map_or(Value::Null, |t| names_value(t, resolved, all_modules)),
    );
    m.insert(
        "exclude_modules".into(),
        config
            .exclude_modules
            .as_ref()
            .map_or(Value::Null, |t| match t {
                TargetModules::Names(v) => {
                    let mut v = v.clone();
                    v.sort();
                    v.dedup();
                    Value::from(v)
                }
                TargetModules::Regex(s) => Value::from(s.clone()),
            }),
    );
    let pattern = |p: &PatternMap<f64>| {
        Value::Object(p.0.iter().map(|(k, v)| (k.clone(), number(*v))).collect())
    };
    m.insert(
        "rank_pattern".into(),
        Value::Object(
            config
                .rank_pattern
                .0
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(*v)))
                .collect(),
        ),
    );
    m.insert("alpha_pattern".into(), pattern(&config.alpha_pattern));
    m.insert(
        "layers_to_transform".into(),
        match &config.layers_to_transform {
            None => Value::Null,
            Some(LayerIndexes::One(i)) => (*i).into(),
            Some(LayerIndexes::Many(v)) => v.clone().into(),
        },
    );
    m.insert(
        "layers_pattern".into(),
        match &config.layers_pattern {
            None => Value::Null,
            Some(StringOrList::One(s)) => s.clone().into(),
            Some(StringOrList::Many(v)) => v.clone().into(),
        },
    );
    m
}

/// Python's `json.dumps(obj, indent=2, sort_keys=True)` (serde_json's map is sorted).
fn dumps(m: &Map<String, Value>) -> String {
    serde_json::to_string_pretty(m).expect("JSON serialises")
}

/// Writes `path` through a temporary file and a rename, so a reader never sees half a file.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| SanaError::io(path, e))
}

/// A safetensors file with a metadata header, written atomically with sorted
/// keys (see [`crate::safetensors_io`]).
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let host = crate::safetensors_io::to_host(tensors)?;
    write_atomic(path, |tmp| {
        crate::safetensors_io::write(tmp, &host, metadata)
    })
}

/// Tensors (sorted by name) and metadata header of a safetensors file.
pub fn read_safetensors_with_metadata(path: &Path) -> Result<TensorsWithMetadata> {
    let bytes = std::fs::read(path).map_err(|e| SanaError::io(path, e))?;
    let bad = |e: safetensors::SafeTensorError| SanaError::Weights {
        path: path.to_path_buf(),
        msg: format!("cannot read safetensors: {e:?}"),
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(bad)?;
    let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
    let mut out = st
        .tensors()
        .into_iter()
        .map(|(n, v)| Ok((n, Tensor::try_from(v)?)))
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, meta.metadata().clone()))
}

/// diffusers' `get_peft_kwargs` for a state dict without metadata: `r` the most common
/// rank, `lora_alpha = r`, other modules' ranks (and equal alphas) as `^<module>`
/// patterns, so every module has scaling 1.
fn infer_config(tensors: &[(String, Tensor)]) -> LoraConfig {
    let mut ranks: Vec<(String, i64)> = Vec::new();
    for (k, t) in tensors {
        if let Some(m) = k.strip_suffix(".lora_B.weight") {
            if t.dim() > 1 {
                ranks.push((m.to_string(), t.size()[1]));
            }
        }
    }
    // Counter.most_common: highest count, ties to the first seen.
    let mut counts: Vec<(i64, usize)> = Vec::new();
    for (_, r) in &ranks {
        match counts.iter_mut().find(|(x, _)| x == r) {
            Some(c) => c.1 += 1,
            None => counts.push((*r, 1)),
        }
    }
    let r = counts
        .iter()
        .fold(None::<(i64, usize)>, |best, &(x, n)| match best {
            Some((_, bn)) if bn >= n => best,
            _ => Some((x, n)),
        })
        .map_or(1, |(x, _)| x);
    let pattern: Vec<(String, i64)> = ranks
        .iter()
        .filter(|(_, x)| *x != r)
        .map(|(m, x)| (format!("^{m}"), *x))
        .collect();
    let mut modules: Vec<String> = tensors
        .iter()
        .filter_map(|(k, _)| k.split(".lora").next().map(str::to_string))
        .collect();
    modules.sort();
    modules.dedup();
    LoraConfig {
        r,
        lora_alpha: r as f64,
        rank_pattern: PatternMap(pattern.clone()),
        alpha_pattern: PatternMap(pattern.into_iter().map(|(k, v)| (k, v as f64)).collect()),
        target_modules: Some(TargetModules::Names(modules)),
        ..Default::default()
    }
}

/// Strips `prefix` from every key; a key without it is an error naming the file.
fn strip_all(
    tensors: Vec<(String, Tensor)>,
    prefix: &str,
    file: &Path,
) -> Result<Vec<(String, Tensor)>> {
    tensors
        .into_iter()
        .map(|(k, t)| match k.strip_prefix(prefix) {
            Some(s) => Ok((s.to_string(), t)),
            None => Err(SanaError::Weights {
                path: file.to_path_buf(),
                msg: format!("key `{k}` lacks the `{prefix}` prefix of this format"),
            }),
        })
        .collect()
}

/// What [`LoraAdapters::load_adapter`] found at a path.
struct Found {
    format: AdapterFormat,
    config: LoraConfig,
    /// The file the config came from (for errors).
    config_file: PathBuf,
    weights_file: PathBuf,
    tensors: Vec<(String, Tensor)>,
}

fn read_peft(dir: &Path) -> Result<Found> {
    let config_file = dir.join(PEFT_CONFIG_NAME);
    let config = LoraConfig::from_json_file(&config_file)?;
    let weights_file = dir.join(PEFT_WEIGHTS_NAME);
    if !weights_file.is_file() {
        let msg = if dir.join("adapter_model.bin").is_file() {
            "only adapter_model.bin (pickle) is there; sana-rl reads safetensors: re-save with safe_serialization=True"
        } else {
            "missing beside adapter_config.json"
        };
        return Err(SanaError::Weights {
            path: weights_file,
            msg: msg.into(),
        });
    }
    let (tensors, _) = read_safetensors_with_metadata(&weights_file)?;
    let tensors = strip_all(tensors, PEFT_PREFIX, &weights_file)?;
    Ok(Found {
        format: AdapterFormat::Peft,
        config,
        config_file,
        weights_file,
        tensors,
    })
}

fn read_diffusers(file: &Path) -> Result<Found> {
    let (tensors, metadata) = read_safetensors_with_metadata(file)?;
    let (mine, others): (Vec<_>, Vec<_>) = tensors
        .into_iter()
        .partition(|(k, _)| k.starts_with(DIFFUSERS_PREFIX));
    if mine.is_empty() {
        return Err(SanaError::Weights {
            path: file.to_path_buf(),
            msg: format!(
                "no `{DIFFUSERS_PREFIX}`-prefixed LoRA keys (diffusers' SANA layout){}; \
                 for a PEFT adapter give its folder with adapter_config.json",
                others
                    .first()
                    .map_or(String::new(), |(k, _)| format!(", e.g. `{k}`"))
            ),
        });
    }
    if let Some((k, _)) = others.first() {
        // diffusers' SanaLoraLoaderMixin loads the transformer only.
        tracing::warn!(file = %file.display(), example = %k, count = others.len(), "ignoring LoRA keys for other components");
    }
    let tensors = strip_all(mine, DIFFUSERS_PREFIX, file)?;
    let meta_config = match metadata
        .as_ref()
        .and_then(|m| m.get(LORA_ADAPTER_METADATA_KEY))
    {
        None => None,
        Some(text) => {
            let all = crate::config_json::parse_json_object(text, file).map_err(|e| match e {
                SanaError::Config { path, msg, .. } => {
                    SanaError::config(path, LORA_ADAPTER_METADATA_KEY, msg)
                }
                e => e,
            })?;
            let own: Map<String, Value> = all
                .into_iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(DIFFUSERS_PREFIX)?.to_string(), v)))
                .collect();
            (!own.is_empty()).then_some(own)
        }
    };
    let (format, config) = match meta_config {
        Some(map) => (
            AdapterFormat::Diffusers,
            LoraConfig::from_json_map(&map, file)?,
        ),
        None => (
            AdapterFormat::DiffusersWithoutMetadata,
            infer_config(&tensors),
        ),
    };
    Ok(Found {
        format,
        config,
        config_file: file.to_path_buf(),
        weights_file: file.to_path_buf(),
        tensors,
    })
}

/// Finds the adapter at `path`: a PEFT folder, a folder with diffusers'
/// `pytorch_lora_weights.safetensors` (or a single `.safetensors`), or a file.
fn find(path: &Path) -> Result<Found> {
    let not_found = |msg: &str| {
        SanaError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, msg.to_string()),
        )
    };
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        let is_peft_weights = path.file_name().is_some_and(|n| n == PEFT_WEIGHTS_NAME);
        if is_peft_weights && dir.join(PEFT_CONFIG_NAME).is_file() {
            return read_peft(dir);
        }
        if path.file_name().is_some_and(|n| n == PEFT_CONFIG_NAME) {
            return read_peft(dir);
        }
        return read_diffusers(path);
    }
    if !path.is_dir() {
        return Err(not_found(
            "no LoRA adapter here (expected a PEFT folder or a .safetensors file)",
        ));
    }
    if path.join(PEFT_CONFIG_NAME).is_file() {
        return read_peft(path);
    }
    let diffusers = path.join(DIFFUSERS_LORA_WEIGHTS_NAME);
    if diffusers.is_file() {
        return read_diffusers(&diffusers);
    }
    // diffusers' `_best_guess_weight_name`: the one safetensors file in the folder.
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| SanaError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    match files.as_slice() {
        [one] => read_diffusers(one),
        [] => Err(not_found(
            "no adapter_config.json, pytorch_lora_weights.safetensors or other .safetensors in this folder",
        )),
        _ => Err(not_found(
            "several .safetensors files and no adapter_config.json: give the LoRA file itself",
        )),
    }
}

impl LoraAdapters {
    /// The adapter's PEFT `adapter_config.json` object.
    pub fn peft_config_json(&self, name: &str, saved: bool) -> Result<Map<String, Value>> {
        let modules: Vec<String> = self.modules(name)?.into_iter().map(|m| m.module).collect();
        Ok(peft_config_json(
            self.config(name)?,
            &modules,
            &self.module_names(),
            saved,
        ))
    }

    /// PEFT's `save_pretrained`: `dir/adapter_config.json` + `dir/adapter_model.safetensors`.
    pub fn save_peft(&self, name: &str, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| SanaError::io(dir, e))?;
        let tensors: Vec<(String, Tensor)> = self
            .state_dict(name)?
            .into_iter()
            .map(|(k, t)| (format!("{PEFT_PREFIX}{k}"), t))
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors_with_metadata(&dir.join(PEFT_WEIGHTS_NAME), &tensors, &meta)?;
        let text = dumps(&self.peft_config_json(name, true)?);
        let path = dir.join(PEFT_CONFIG_NAME);
        write_atomic(&path, |tmp| {
            std::fs::write(tmp, &text).map_err(|e| SanaError::io(tmp, e))
        })
    }

    /// diffusers' `SanaPipeline.save_lora_weights(dir, transformer_lora_layers=…,
    /// transformer_lora_adapter_metadata=config.to_dict())`:
    /// `dir/pytorch_lora_weights.safetensors`.
    pub fn save_diffusers(&self, name: &str, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| SanaError::io(dir, e))?;
        let tensors: Vec<(String, Tensor)> = self
            .state_dict(name)?
            .into_iter()
            .map(|(k, t)| (format!("{DIFFUSERS_PREFIX}{k}"), t))
            .collect();
        let prefixed: Map<String, Value> = self
            .peft_config_json(name, false)?
            .into_iter()
            .map(|(k, v)| (format!("{DIFFUSERS_PREFIX}{k}"), v))
            .collect();
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (LORA_ADAPTER_METADATA_KEY.to_string(), dumps(&prefixed)),
        ]);
        write_safetensors_with_metadata(&dir.join(DIFFUSERS_LORA_WEIGHTS_NAME), &tensors, &meta)
    }

    /// Both layouts into one folder: PEFT's two files and, beside them, diffusers'.
    pub fn export(&self, name: &str, dir: &Path) -> Result<()> {
        self.save_peft(name, dir)?;
        self.save_diffusers(name, dir)
    }

    /// Loads an adapter trained anywhere as `name` (frozen; make it trainable with
    /// `set_trainable`): a PEFT folder (`adapter_config.json` +
    /// `adapter_model.safetensors`), or diffusers' `pytorch_lora_weights.safetensors`
    /// (a folder holding it, or the file; `lora_alpha` from its metadata when present,
    /// else `lora_alpha = r` per module as diffusers does). Errors name the file and
    /// key of anything that does not fit the model.
    pub fn load_adapter(&mut self, name: &str, path: &Path) -> Result<AdapterFormat> {
        let found = find(path)?;
        self.insert(name, &found.config, None, false)
            .map_err(|e| match e {
                SanaError::Lora(msg) => SanaError::Weights {
                    path: found.config_file.clone(),
                    msg,
                },
                e => e,
            })?;
        if let Err(e) = self.load_state_dict(name, &found.tensors, &found.weights_file) {
            self.delete_adapter(name).expect("just added");
            return Err(e);
        }
        tracing::info!(adapter = name, path = %path.display(), format = ?found.format, "LoRA adapter loaded");
        Ok(found.format)
    }
}

/// Reads an adapter file's config without a model (for inspection and tests).
pub fn read_adapter_config(path: &Path) -> Result<(AdapterFormat, LoraConfig)> {
    let f = find(path)?;
    Ok((f.format, f.config))
}
