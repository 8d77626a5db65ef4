//! Typed errors of the `sana` library. Binaries wrap them with `anyhow` context.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SanaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON/TOML file is malformed or has a bad value. `key` names the offending key
    /// (empty when the file as a whole does not parse).
    #[error("{path}: {}{msg}", if key.is_empty() { String::new() } else { format!("key `{key}`: ") })]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },
    /// A checkpoint does not fit the model built from its config.
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    /// A tensor given to a model or scheduler has the wrong shape/kind.
    #[error("bad input `{name}`: {msg}")]
    Input { name: String, msg: String },
    /// A scheduler was used out of order or configured with unsupported options.
    #[error("scheduler: {0}")]
    Scheduler(String),
    /// A LoRA adapter was used wrongly (unknown name, merged, targets nothing).
    #[error("LoRA: {0}")]
    Lora(String),
    /// A training checkpoint is incomplete, corrupt or does not fit the run.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A collective across data-parallel ranks failed (a peer died or timed out).
    #[error("data parallel: {0}")]
    Collective(String),
    /// A video file could not be decoded or encoded (FFmpeg's message).
    #[error("{path}: {msg}")]
    Media { path: PathBuf, msg: String },
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

pub type Result<T, E = SanaError> = std::result::Result<T, E>;

impl SanaError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SanaError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        SanaError::Config {
            path: path.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
    pub fn input(name: impl Into<String>, msg: impl Into<String>) -> Self {
        SanaError::Input {
            name: name.into(),
            msg: msg.into(),
        }
    }
}
