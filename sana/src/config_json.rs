//! Reading the JSON configs diffusers and transformers write (`config.json`,
//! `scheduler_config.json`, `model_index.json`): Python's non-standard number
//! tokens, unknown keys warned about, and every error naming the file and key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Result, SanaError};

/// Parses JSON text into `T`, naming the key of a type error.
/// Python's bare `NaN`/`Infinity` tokens become strings, which [`de_f64`] reads.
pub fn parse_json<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    let text = quote_non_finite_tokens(text);
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        SanaError::config(path, key, e.inner().to_string())
    })
}

/// Reads a JSON object as Python's `json` writes it: diffusers configs may hold the bare tokens
/// `-Infinity`, `Infinity` and `NaN` (e.g. SANA's `lambda_min_clipped`), which serde_json rejects.
pub fn read_json_object(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| SanaError::io(path, e))?;
    parse_json_object(&text, path)
}

pub fn parse_json_object(
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
pub(crate) fn quote_non_finite_tokens(text: &str) -> String {
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
pub fn config_from_map<T>(
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
pub fn de_f64<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
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
pub fn de_opt_f64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(serde::Deserialize)]
    struct W(#[serde(deserialize_with = "de_f64")] f64);
    Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinity_is_accepted() {
        #[derive(serde::Deserialize)]
        struct C {
            #[serde(deserialize_with = "de_f64")]
            a: f64,
            b: String,
            #[serde(deserialize_with = "de_f64")]
            c: f64,
        }
        let v: C = parse_json(
            Path::new("x.json"),
            r#"{"a": -Infinity, "b": "NaN -Infinity", "c": NaN}"#,
        )
        .unwrap();
        assert_eq!(v.a, f64::NEG_INFINITY);
        assert_eq!(v.b, "NaN -Infinity");
        assert!(v.c.is_nan());
    }

    #[test]
    fn type_error_names_key() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct C {
            num_layers: i64,
        }
        let err =
            parse_json::<C>(Path::new("m/config.json"), r#"{"num_layers": "two"}"#).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("m/config.json") && msg.contains("num_layers"),
            "{msg}"
        );
    }

    #[test]
    fn non_finite_tokens_are_quoted_outside_strings_only() {
        let s = r#"{"a": -Infinity, "b": "x NaN \" Infinity", "c": [NaN, Infinity]}"#;
        assert_eq!(
            quote_non_finite_tokens(s),
            r#"{"a": "-Infinity", "b": "x NaN \" Infinity", "c": ["NaN", "Infinity"]}"#
        );
    }
}
