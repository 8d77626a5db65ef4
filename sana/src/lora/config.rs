//! `peft.LoraConfig` (PEFT 0.21.2): the keys, defaults and target matching of
//! `peft/tuners/lora/config.py` and `peft/tuners/tuners_utils.py`
//! (`check_target_module_exists`, `get_pattern_key`, `all-linear`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use regex::Regex;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config_json::{parse_json_object, quote_non_finite_tokens};
use crate::{Result, SanaError};

/// The PEFT release whose config layout, defaults and matching rules we follow.
pub const PEFT_VERSION: &str = "0.21.2";

/// `init_lora_weights`: how a new adapter starts (B = 0 makes it a no-op at first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform (a = √5, as `nn.Linear`), B = 0.
    #[default]
    Kaiming,
    /// `"gaussian"`: A ~ N(0, (1/r)²) (PEFT's `std = 1 / r`), B = 0.
    Gaussian,
    /// `false`: A and B keep `nn.Linear`'s random init (not a no-op; PEFT's debugging option).
    Random,
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Kaiming => s.serialize_bool(true),
            InitLoraWeights::Random => s.serialize_bool(false),
            InitLoraWeights::Gaussian => s.serialize_str("gaussian"),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(InitLoraWeights::Kaiming),
            Raw::Bool(false) => Ok(InitLoraWeights::Random),
            // PEFT compares `init_lora_weights.lower() == "gaussian"`.
            Raw::Str(s) if s.eq_ignore_ascii_case("gaussian") => Ok(InitLoraWeights::Gaussian),
            Raw::Str(s) => Err(de::Error::custom(format!(
                "unsupported init_lora_weights {s:?}: sana-rl implements true, false and \"gaussian\" \
                 (PEFT's data-driven inits such as pissa, olora, eva, loftq, corda are not implemented)"
            ))),
        }
    }
}

/// `target_modules` / `exclude_modules`: a list of names (exact, or matched as a
/// `.`-separated suffix) or one string, a Python regex that must match the whole
/// module name — except `"all-linear"` (any case), every Linear of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

impl TargetModules {
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Regex(s) if s.eq_ignore_ascii_case("all-linear"))
    }
}

/// `layers_to_transform`: one layer index or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndexes {
    One(i64),
    Many(Vec<i64>),
}

/// `layers_pattern`: one name or a list (e.g. `"transformer_blocks"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn items(&self) -> Vec<&str> {
        match self {
            StringOrList::One(s) => vec![s.as_str()],
            StringOrList::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `rank_pattern` / `alpha_pattern`: regex key → value, in the file's order, because
/// PEFT takes the first key that matches (`get_pattern_key`). `null` reads as empty.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternMap<V>(pub Vec<(String, V)>);

impl<V> Default for PatternMap<V> {
    fn default() -> Self {
        PatternMap(Vec::new())
    }
}

impl<V> PatternMap<V> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V: Serialize> Serialize for PatternMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for PatternMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V_<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V_<V> {
            type Value = PatternMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map from module-name regex to value")
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(PatternMap::default())
            }
            fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(PatternMap::default())
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    // A repeated key updates the value in place, as a Python dict does.
                    match out.iter_mut().find(|(key, _)| *key == k) {
                        Some(slot) => slot.1 = v,
                        None => out.push((k, v)),
                    }
                }
                Ok(PatternMap(out))
            }
        }
        d.deserialize_any(V_(std::marker::PhantomData))
    }
}

/// PEFT's `LoraConfig` (the keys sana-rl implements, with PEFT's defaults). Read it
/// from PEFT's `adapter_config.json`, diffusers' LoRA metadata, or Cosmos-RL's
/// `[policy.lora]` table; keys it does not model are kept in `other` and checked
/// by [`LoraConfig::validate`], so an adapter that needs a PEFT feature we lack
/// (DoRA, `lora_bias`, `modules_to_save`, …) is refused instead of run wrongly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    pub init_lora_weights: InitLoraWeights,
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<TargetModules>,
    /// PEFT's `rank_pattern`; Cosmos-RL's `r_pattern` is read as the same thing.
    #[serde(alias = "r_pattern")]
    pub rank_pattern: PatternMap<i64>,
    pub alpha_pattern: PatternMap<f64>,
    pub layers_to_transform: Option<LayerIndexes>,
    pub layers_pattern: Option<StringOrList>,
    /// Every other key (PEFT writes ~40, Cosmos-RL adds `lora_names`, …).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            use_rslora: false,
            init_lora_weights: InitLoraWeights::Kaiming,
            target_modules: None,
            exclude_modules: None,
            rank_pattern: PatternMap::default(),
            alpha_pattern: PatternMap::default(),
            layers_to_transform: None,
            layers_pattern: None,
            other: BTreeMap::new(),
        }
    }
}

/// PEFT keys whose non-default value asks for behaviour sana-rl does not implement.
/// `(key, what it enables)`; the default is null / false / empty / `"none"`.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("use_dora", "DoRA"),
    ("lora_bias", "a trainable bias on lora_B"),
    ("bias", "training the base layers' biases"),
    ("fan_in_fan_out", "Conv1D-layout weights"),
    ("modules_to_save", "fully trained extra modules"),
    ("target_parameters", "LoRA on raw parameters"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("layer_replication", "layer replication"),
    ("use_qalora", "QA-LoRA"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("arrow_config", "Arrow routing"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("kasa_config", "KaSA"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("megatron_config", "Megatron parallel layers"),
];

fn is_default_value(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::String(s) => s == "none",
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        serde_json::Value::Number(_) | serde_json::Value::Bool(true) => false,
    }
}

/// PEFT's `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
pub fn lora_scaling(r: i64, lora_alpha: f64, use_rslora: bool) -> f64 {
    if use_rslora {
        lora_alpha / (r as f64).sqrt()
    } else {
        lora_alpha / r as f64
    }
}

impl LoraConfig {
    /// A config with PEFT's defaults that targets `target_modules`.
    pub fn new(r: i64, lora_alpha: f64, target_modules: TargetModules) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: Some(target_modules),
            ..Default::default()
        }
    }

    /// Reads a JSON object (diffusers' LoRA metadata with its `transformer.` prefix
    /// removed); `source` names the file in errors. The map is sorted by key, as
    /// PEFT and diffusers write it (`sort_keys=True`), so pattern order is theirs.
    pub fn from_json_map(
        map: &serde_json::Map<String, serde_json::Value>,
        source: &Path,
    ) -> Result<Self> {
        let config: LoraConfig = serde_json::from_value(map.clone().into())
            .map_err(|e| Self::locate_error(map, source, e))?;
        config
            .validate()
            .map_err(|(key, msg)| SanaError::config(source, key, msg))?;
        Ok(config)
    }

    /// Reads JSON text (`adapter_config.json`), keeping `rank_pattern`/`alpha_pattern`
    /// in the order written (PEFT takes the first matching pattern).
    pub fn from_json_str(text: &str, source: &Path) -> Result<Self> {
        let map = parse_json_object(text, source)?;
        let config: LoraConfig = serde_json::from_str(&quote_non_finite_tokens(text))
            .map_err(|e| Self::locate_error(&map, source, e))?;
        config
            .validate()
            .map_err(|(key, msg)| SanaError::config(source, key, msg))?;
        Ok(config)
    }

    /// `#[serde(flatten)]` hides the key path of an error: find the key by reading
    /// the keys one at a time.
    fn locate_error(
        map: &serde_json::Map<String, serde_json::Value>,
        source: &Path,
        e: serde_json::Error,
    ) -> SanaError {
        for (k, v) in map {
            let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
            if let Err(e) = serde_json::from_value::<LoraConfig>(one) {
                return SanaError::config(source, k, e.to_string());
            }
        }
        SanaError::config(source, "", e.to_string())
    }

    /// Reads PEFT's `adapter_config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SanaError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Checks what PEFT would reject, and PEFT features sana-rl does not implement:
    /// `Err((key, message))`.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if self.r <= 0 {
            return err("r", format!("must be a positive integer, got {}", self.r));
        }
        if !self.lora_alpha.is_finite() {
            return err(
                "lora_alpha",
                format!("must be finite, got {}", self.lora_alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return err(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            );
        }
        let Some(targets) = &self.target_modules else {
            return err(
                "target_modules",
                "is required: SANA has no default LoRA targets in PEFT (e.g. [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"] or \"all-linear\")".into(),
            );
        };
        if let TargetModules::Names(v) = targets {
            if v.is_empty() {
                return err("target_modules", "is an empty list".into());
            }
        }
        for (k, r) in &self.rank_pattern.0 {
            if *r <= 0 {
                return err(
                    "rank_pattern",
                    format!("rank {r} for {k:?} must be positive"),
                );
            }
        }
        for (k, a) in &self.alpha_pattern.0 {
            if !a.is_finite() {
                return err(
                    "alpha_pattern",
                    format!("alpha {a} for {k:?} must be finite"),
                );
            }
        }
        // PEFT's __post_init__ checks.
        if matches!(targets, TargetModules::Regex(_)) && self.layers_to_transform.is_some() {
            return err(
                "layers_to_transform",
                "cannot be used when target_modules is a string (PEFT rejects it too)".into(),
            );
        }
        if matches!(targets, TargetModules::Regex(_)) && self.layers_pattern.is_some() {
            return err(
                "layers_pattern",
                "cannot be used when target_modules is a string (PEFT rejects it too)".into(),
            );
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return err(
                "layers_pattern",
                "needs layers_to_transform (PEFT rejects it too)".into(),
            );
        }
        if let Some(v) = self.other.get("peft_type") {
            if v.as_str() != Some("LORA") {
                return err("peft_type", format!("is {v}, expected \"LORA\""));
            }
        }
        for (key, what) in UNSUPPORTED {
            if let Some(v) = self.other.get(*key) {
                if !is_default_value(v) {
                    return err(
                        key,
                        format!("is {v}: {what} is not implemented in sana-rl (plain LoRA only)"),
                    );
                }
            }
        }
        TargetMatcher::new(self, &[])?;
        Ok(())
    }

    /// The (rank, alpha) PEFT gives the module `key` (`rank_pattern` / `alpha_pattern`,
    /// else `r` / `lora_alpha`); `Err((key, message))` for a pattern that does not compile.
    pub fn rank_and_alpha(&self, key: &str) -> std::result::Result<(i64, f64), (String, String)> {
        let m = TargetMatcher::new(self, &[])?;
        Ok((m.rank(key), m.alpha(key)))
    }
}

/// Python's `re` patterns as PEFT uses them, compiled with Rust's `regex` (same
/// syntax for what target patterns use; look-around and back-references are refused).
fn compile(key: &str, pattern: &str, what: &str) -> std::result::Result<Regex, (String, String)> {
    Regex::new(pattern).map_err(|e| {
        (
            key.to_string(),
            format!("{what} is not a regex sana-rl can run: {e}"),
        )
    })
}

enum Targets {
    /// Exact names, or `.`-suffixes.
    Names(Vec<String>),
    /// `re.fullmatch`.
    Regex(Regex),
    /// `all-linear`, resolved to every Linear's name.
    AllLinear(Vec<String>),
}

/// Outcome of PEFT's `check_target_module_exists` for one module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetMatch {
    Target,
    No,
    Excluded,
}

/// A config's target and pattern rules, compiled once per adapter.
pub(crate) struct TargetMatcher {
    targets: Targets,
    exclude: Option<Targets>,
    layers: Option<(Vec<i64>, Vec<Regex>)>,
    rank: Vec<(Regex, i64)>,
    alpha: Vec<(Regex, f64)>,
    default_r: i64,
    default_alpha: f64,
}

impl TargetMatcher {
    /// `linear_names`: every Linear of the model, for `all-linear`.
    pub(crate) fn new(
        cfg: &LoraConfig,
        linear_names: &[String],
    ) -> std::result::Result<Self, (String, String)> {
        let build =
            |key: &str, t: &TargetModules| -> std::result::Result<Targets, (String, String)> {
                Ok(match t {
                    TargetModules::Names(v) => Targets::Names(v.clone()),
                    t if t.is_all_linear() && key == "target_modules" => {
                        Targets::AllLinear(linear_names.to_vec())
                    }
                    TargetModules::Regex(p) => {
                        Targets::Regex(compile(key, &format!("^(?:{p})$"), &format!("{p:?}"))?)
                    }
                })
            };
        let targets = build(
            "target_modules",
            cfg.target_modules
                .as_ref()
                .ok_or_else(|| ("target_modules".to_string(), "is required".to_string()))?,
        )?;
        let exclude = cfg
            .exclude_modules
            .as_ref()
            .map(|t| build("exclude_modules", t))
            .transpose()?;
        let layers = match &cfg.layers_to_transform {
            None => None,
            Some(idx) => {
                let idx = match idx {
                    LayerIndexes::One(i) => vec![*i],
                    LayerIndexes::Many(v) => v.clone(),
                };
                // PEFT's layer-index regexes; the lazy `.*?` picks the first numbered segment.
                let pats = match &cfg.layers_pattern {
                    Some(p) if !p.items().is_empty() => p
                        .items()
                        .iter()
                        .map(|p| {
                            compile(
                                "layers_pattern",
                                &format!(r"^(?:^|.*?\.){p}\.(?P<idx>\d+)\."),
                                &format!("{p:?}"),
                            )
                        })
                        .collect::<std::result::Result<Vec<_>, _>>()?,
                    _ => vec![Regex::new(r"^.*?\.[^.]*\.(?P<idx>\d+)\.").expect("static regex")],
                };
                Some((idx, pats))
            }
        };
        let pattern =
            |key: &str, k: &str| compile(key, &format!(r"^(.*\.)?({k})$"), &format!("{k:?}"));
        let rank = cfg
            .rank_pattern
            .0
            .iter()
            .map(|(k, v)| Ok((pattern("rank_pattern", k)?, *v)))
            .collect::<std::result::Result<Vec<_>, (String, String)>>()?;
        let alpha = cfg
            .alpha_pattern
            .0
            .iter()
            .map(|(k, v)| Ok((pattern("alpha_pattern", k)?, *v)))
            .collect::<std::result::Result<Vec<_>, (String, String)>>()?;
        Ok(Self {
            targets,
            exclude,
            layers,
            rank,
            alpha,
            default_r: cfg.r,
            default_alpha: cfg.lora_alpha,
        })
    }

    /// PEFT's `check_target_module_exists(config, key)`.
    pub(crate) fn check(&self, key: &str) -> TargetMatch {
        let listed = |names: &[String]| names.iter().any(|n| n == key);
        let suffix = |names: &[String]| names.iter().any(|n| key.ends_with(&format!(".{n}")));
        if let Some(ex) = &self.exclude {
            let hit = match ex {
                Targets::Regex(re) => re.is_match(key),
                Targets::Names(v) | Targets::AllLinear(v) => listed(v) || suffix(v),
            };
            if hit {
                return TargetMatch::Excluded;
            }
        }
        let found = match &self.targets {
            Targets::Regex(re) => re.is_match(key),
            // An exact entry matches regardless of `layers_to_transform` (PEFT checks the
            // layer index only for suffix matches); `all-linear` lists exact names.
            Targets::Names(v) | Targets::AllLinear(v) if listed(v) => true,
            Targets::Names(v) | Targets::AllLinear(v) => {
                suffix(v)
                    && match &self.layers {
                        None => true,
                        Some((idx, pats)) => pats
                            .iter()
                            .find_map(|re| re.captures(key))
                            .and_then(|c| c.name("idx")?.as_str().parse::<i64>().ok())
                            .is_some_and(|i| idx.contains(&i)),
                    }
            }
        };
        if found {
            TargetMatch::Target
        } else {
            TargetMatch::No
        }
    }

    /// PEFT's `rank_pattern.get(get_pattern_key(rank_pattern, key), r)`.
    pub(crate) fn rank(&self, key: &str) -> i64 {
        self.rank
            .iter()
            .find(|(re, _)| re.is_match(key))
            .map_or(self.default_r, |(_, r)| *r)
    }

    pub(crate) fn alpha(&self, key: &str) -> f64 {
        self.alpha
            .iter()
            .find(|(re, _)| re.is_match(key))
            .map_or(self.default_alpha, |(_, a)| *a)
    }

    /// Pattern keys that match none of `targeted` (PEFT warns about them).
    pub(crate) fn unused_patterns(&self, cfg: &LoraConfig, targeted: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for ((re, _), (k, _)) in self.rank.iter().zip(&cfg.rank_pattern.0) {
            if !targeted.iter().any(|t| re.is_match(t)) {
                out.push(format!("rank_pattern {k:?}"));
            }
        }
        for ((re, _), (k, _)) in self.alpha.iter().zip(&cfg.alpha_pattern.0) {
            if !targeted.iter().any(|t| re.is_match(t)) {
                out.push(format!("alpha_pattern {k:?}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> Result<LoraConfig> {
        LoraConfig::from_json_str(json, Path::new("adapter_config.json"))
    }

    #[test]
    fn defaults_are_peft_defaults() {
        let c = cfg(r#"{"target_modules": ["to_q"]}"#).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
        assert!(!c.use_rslora);
        assert_eq!(c.init_lora_weights, InitLoraWeights::Kaiming);
    }

    #[test]
    fn cosmos_keys_read() {
        let toml_like = r#"{"lora_names": ["default", "old"], "r": 4, "lora_alpha": 4,
            "init_lora_weights": "gaussian", "target_modules": ["attn1.to_q", "attn1.to_out.0"],
            "r_pattern": {"to_q": 2}, "alpha_pattern": {"to_q": 3.5}}"#;
        let c = cfg(toml_like).unwrap();
        assert_eq!(c.init_lora_weights, InitLoraWeights::Gaussian);
        assert_eq!(c.rank_pattern.0, vec![("to_q".to_string(), 2)]);
        assert_eq!(
            c.rank_and_alpha("transformer_blocks.0.attn1.to_q").unwrap(),
            (2, 3.5)
        );
        assert_eq!(
            c.rank_and_alpha("transformer_blocks.0.attn1.to_out.0")
                .unwrap(),
            (4, 4.0)
        );
        assert!(c.other.contains_key("lora_names"));
    }

    #[test]
    fn bad_values_name_the_key() {
        for (json, key) in [
            (r#"{"r": 0, "target_modules": ["to_q"]}"#, "r"),
            (r#"{"r": "four", "target_modules": ["to_q"]}"#, "r"),
            (
                r#"{"target_modules": ["to_q"], "use_dora": true}"#,
                "use_dora",
            ),
            (
                r#"{"target_modules": ["to_q"], "init_lora_weights": "pissa"}"#,
                "init_lora_weights",
            ),
            (r#"{"target_modules": ["to_q"], "bias": "all"}"#, "bias"),
            (r#"{"r": 4}"#, "target_modules"),
            (r#"{"target_modules": "(unclosed"}"#, "target_modules"),
            (
                r#"{"target_modules": ["to_q"], "rank_pattern": {"to_q": 0}}"#,
                "rank_pattern",
            ),
            (
                r#"{"target_modules": ".*", "layers_to_transform": 0}"#,
                "layers_to_transform",
            ),
            (
                r#"{"target_modules": ["to_q"], "peft_type": "LOHA"}"#,
                "peft_type",
            ),
        ] {
            let msg = cfg(json).unwrap_err().to_string();
            assert!(
                msg.contains("adapter_config.json") && msg.contains(&format!("`{key}`")),
                "{json}: {msg}"
            );
        }
    }

    #[test]
    fn peft_matching_rules() {
        let c = cfg(r#"{"target_modules": ["to_q", "attn2.to_k", "proj_out"]}"#).unwrap();
        let m = TargetMatcher::new(&c, &[]).unwrap();
        assert_eq!(
            m.check("transformer_blocks.0.attn1.to_q"),
            TargetMatch::Target
        );
        assert_eq!(
            m.check("transformer_blocks.0.attn2.to_k"),
            TargetMatch::Target
        );
        assert_eq!(m.check("transformer_blocks.0.attn1.to_k"), TargetMatch::No);
        assert_eq!(m.check("proj_out"), TargetMatch::Target);
        // A suffix is a whole `.`-separated tail, not a substring.
        assert_eq!(m.check("transformer_blocks.0.attn1.xto_q"), TargetMatch::No);

        let c = cfg(r#"{"target_modules": ".*attn2\\.(to_q|to_v)"}"#).unwrap();
        let m = TargetMatcher::new(&c, &[]).unwrap();
        assert_eq!(
            m.check("transformer_blocks.1.attn2.to_v"),
            TargetMatch::Target
        );
        assert_eq!(
            m.check("transformer_blocks.1.attn2.to_v.x"),
            TargetMatch::No
        );

        let c = cfg(
            r#"{"target_modules": ["to_q", "transformer_blocks.1.attn2.to_q"],
                "layers_to_transform": [0], "layers_pattern": "transformer_blocks",
                "exclude_modules": ["attn2.to_q"]}"#,
        )
        .unwrap();
        let m = TargetMatcher::new(&c, &[]).unwrap();
        assert_eq!(
            m.check("transformer_blocks.0.attn1.to_q"),
            TargetMatch::Target
        );
        assert_eq!(m.check("transformer_blocks.1.attn1.to_q"), TargetMatch::No);
        assert_eq!(
            m.check("transformer_blocks.0.attn2.to_q"),
            TargetMatch::Excluded
        );

        // Without layers_pattern PEFT's default index regex needs `a.b.<idx>.`, which
        // diffusers' `transformer_blocks.<idx>.` names do not have: nothing matches.
        let c = cfg(r#"{"target_modules": ["to_q"], "layers_to_transform": 0}"#).unwrap();
        let m = TargetMatcher::new(&c, &[]).unwrap();
        assert_eq!(m.check("transformer_blocks.0.attn1.to_q"), TargetMatch::No);

        let c = cfg(r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                "rank_pattern": {"^transformer_blocks.1.attn1.to_q": 6, "to_q": 2}}"#)
        .unwrap();
        let names = vec!["transformer_blocks.1.attn1.to_q".to_string()];
        let m = TargetMatcher::new(&c, &names).unwrap();
        assert_eq!(
            m.check("transformer_blocks.1.attn1.to_q"),
            TargetMatch::Target
        );
        assert_eq!(m.check("transformer_blocks.0.attn1.to_q"), TargetMatch::No);
        assert_eq!(m.rank("transformer_blocks.1.attn1.to_q"), 6);
        assert_eq!(m.rank("transformer_blocks.0.attn1.to_q"), 2);
        assert_eq!(m.rank("transformer_blocks.0.attn1.to_k"), 4);
    }

    #[test]
    fn pattern_order_is_kept() {
        let c = cfg(r#"{"target_modules": ["to_q"], "rank_pattern": {"z": 1, "a": 2, "m": 3}}"#)
            .unwrap();
        let keys: Vec<&str> = c.rank_pattern.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn scaling() {
        assert_eq!(lora_scaling(4, 8.0, false), 2.0);
        assert_eq!(lora_scaling(4, 8.0, true), 4.0);
    }
}
