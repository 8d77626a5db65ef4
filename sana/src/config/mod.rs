//! Cosmos-RL's TOML run config, as its SANA presets use it, with Cosmos-RL
//! 0.4.7's defaults (`cosmos_rl/policy/config/__init__.py`).
//!
//! Loading never drops a key silently: keys this schema does not know are
//! reported with file, line and the nearest known key ("did you mean"), as
//! warnings, or errors with `strict`. Cosmos-RL itself ignores unknown keys;
//! the NFT presets' `timestep_fraction` (the field is `timesteps_fraction`) is
//! the case this catches. Values are checked after parsing, each error naming
//! the file, the key and the fix. Keys the schema has but the run does not
//! honour are listed too (`support`): the controller reports the ones a
//! config sets as "parsed, not supported".

pub mod runtime;
mod schema;
pub mod support;
mod unknown;

pub use schema::*;
pub use unknown::UnknownKey;

use std::path::{Path, PathBuf};

use crate::{Result, SanaError};

/// A loaded config with what loading noticed.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: RunConfig,
    pub path: PathBuf,
    /// Keys not in the schema (warned, or refused with `strict`).
    pub unknown: Vec<UnknownKey>,
    /// Keys the file sets that the run will not honour, by dotted path
    /// ([`support::not_supported`]).
    pub not_supported: Vec<String>,
}

/// Reads and checks a run config. With `strict`, an unknown key is an error.
pub fn load(path: &Path, strict: bool) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(|e| SanaError::io(path, e))?;
    load_str(&text, path, strict)
}

/// [`load`] from text; `path` names the file in messages.
pub fn load_str(text: &str, path: &Path, strict: bool) -> Result<Loaded> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| toml_error(path, text, "", &e))?;
    let mut ignored = Vec::new();
    let config: RunConfig = {
        let mut note = |p: serde_ignored::Path<'_>| ignored.push(p.to_string());
        let de = serde_ignored::Deserializer::new(de, &mut note);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            toml_error(path, text, &key, e.inner())
        })?
    };
    let unknown = unknown::describe(&ignored, text);
    // Reported by the caller (the controller prints them; workers load the same file).
    // Strict refuses them all at once: a preset's own typo must not hide the user's.
    if strict && !unknown.is_empty() {
        return Err(unknown_keys_error(path, &unknown));
    }
    config
        .validate()
        .map_err(|(key, msg)| SanaError::config(path, key, msg))?;
    // The text parsed above, so it parses as a plain table too.
    let raw: toml::Table = toml::from_str(text).map_err(|e| toml_error(path, text, "", &e))?;
    let not_supported = support::not_supported(&config, &raw);
    Ok(Loaded {
        config,
        path: path.to_path_buf(),
        unknown,
        not_supported,
    })
}

/// `--strict`'s error: one unknown key as one line (its key, line and nearest
/// known key); several as one line each, under a count.
fn unknown_keys_error(path: &Path, unknown: &[UnknownKey]) -> SanaError {
    if let [u] = unknown {
        return SanaError::config(path, &u.key, format!("line {}: {}", u.line, u.message()));
    }
    let lines: Vec<String> = unknown
        .iter()
        .map(|u| format!("\n  {}:{}: {}", path.display(), u.line, u.message()))
        .collect();
    SanaError::config(
        path,
        "",
        format!("{} unknown keys:{}", unknown.len(), lines.concat()),
    )
}

/// A TOML syntax or type error as one line: file, line, key, what was wrong.
fn toml_error(path: &Path, text: &str, key: &str, e: &toml::de::Error) -> SanaError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let key = if key == "." { "" } else { key };
    let mut msg = e.message().trim().to_string();
    if let Some(l) = line {
        msg = format!("line {l}: {msg}");
    }
    SanaError::config(path, key, msg)
}

#[cfg(test)]
mod tests;
