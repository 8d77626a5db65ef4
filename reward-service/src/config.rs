//! `reward-service --config FILE`: a TOML shaped like Cosmos-RL's `rewards.toml`.
//!
//! Keys Cosmos-RL's service knows but this one has no use for (`venv_python`,
//! `model_path`, `decode_args`, ...) are accepted with a warning, so an existing
//! `rewards.toml` loads; an *enabled* reward this service does not have is an
//! error at startup rather than a surprise at the first request.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The whole service configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Address to listen on.
    #[serde(default = "default_host")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Bearer token every request must carry; `REWARD_SERVICE_TOKEN` overrides
    /// it; neither leaves the service open.
    #[serde(default)]
    pub token: Option<String>,
    /// Redis to keep scores in, shared by replicas (`redis_port` alone means
    /// localhost). Absent: the service starts its own `redis-server` (on a unix
    /// socket) and stops it on exit.
    #[serde(default)]
    pub redis_host: Option<String>,
    #[serde(default)]
    pub redis_port: Option<u16>,
    /// How long scores stay pullable.
    #[serde(default = "default_ttl")]
    pub score_ttl_s: u64,
    /// Requests accepted but not yet scored; past this, enqueue answers 503
    /// with `Retry-After` (Cosmos-RL's `COSMOS_RL_REWARD_MAX_PENDING_TASKS`).
    #[serde(default = "default_pending")]
    pub max_pending: usize,
    /// Batches scored at once (threads off the async runtime); default: CPUs.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Largest enqueue body accepted (MiB); larger answers 413.
    #[serde(default = "default_body_mb")]
    pub max_body_mb: usize,
    /// Sent back with every uuid so clients pin pulls to this replica;
    /// `LEPTON_REPLICA_ID` sets it as it does for Cosmos-RL's service.
    #[serde(default)]
    pub replica_id: Option<String>,
    /// On SIGTERM/SIGINT: how long to keep finishing queued work.
    #[serde(default = "default_shutdown")]
    pub shutdown_timeout_s: u64,
    /// With the embedded Redis, scores die with the process: after draining,
    /// wait up to this long for clients to pull the scores not pulled yet.
    #[serde(default = "default_linger")]
    pub shutdown_linger_s: u64,
    /// The `redis-server` binary for the embedded Redis.
    #[serde(default = "default_redis_bin")]
    pub redis_server_bin: String,
    #[serde(default)]
    pub reward_args: Vec<RewardArgs>,
    /// Everything else in the file: Cosmos-RL keys we do not use.
    #[serde(flatten)]
    pub ignored: BTreeMap<String, toml::Value>,
}

/// One `[[reward_args]]` table.
#[derive(Debug, Clone, Deserialize)]
pub struct RewardArgs {
    pub reward_type: String,
    #[serde(default = "yes")]
    pub enable: bool,
    /// The reward's own keys (a `command` reward's `name`, `command`, ...).
    #[serde(flatten)]
    pub rest: toml::Table,
}

fn default_host() -> String {
    "localhost".into()
}
fn default_port() -> u16 {
    8080
}
fn default_ttl() -> u64 {
    24 * 3600
}
fn default_pending() -> usize {
    60
}
fn default_body_mb() -> usize {
    2048
}
fn default_shutdown() -> u64 {
    300
}
fn default_linger() -> u64 {
    30
}
fn default_redis_bin() -> String {
    "redis-server".into()
}
fn yes() -> bool {
    true
}

/// Keys of Cosmos-RL's reward args that only its Python rewards read.
const COSMOS_ONLY_REWARD_KEYS: &[&str] = &[
    "venv_python",
    "model_path",
    "download_path",
    "setup_script",
    "dtype",
    "work_dir",
    "tmp_dir",
    "device",
    "endpoint_url",
    "endpoint_api_key",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Default for Config {
    fn default() -> Self {
        Config::from_toml_str("").expect("the empty config is valid")
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            source: Box::new(e),
        })?;
        if c.max_pending == 0 {
            return Err(ConfigError::Invalid(
                "max_pending must be at least 1".into(),
            ));
        }
        if c.workers == Some(0) {
            return Err(ConfigError::Invalid("workers must be at least 1".into()));
        }
        if c.redis_host.is_some() && c.redis_port.is_none() {
            return Err(ConfigError::Invalid(
                "redis_host is set without redis_port".into(),
            ));
        }
        Ok(c)
    }

    /// The token in force: `REWARD_SERVICE_TOKEN` if set and non-empty, else the file's.
    pub fn effective_token(&self) -> Option<String> {
        std::env::var("REWARD_SERVICE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| self.token.clone().filter(|t| !t.is_empty()))
    }

    pub fn effective_replica_id(&self) -> Option<String> {
        self.replica_id
            .clone()
            .or_else(|| std::env::var("LEPTON_REPLICA_ID").ok())
            .filter(|r| !r.is_empty())
    }

    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    /// Things in the file this service ignores, to log at startup.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .ignored
            .keys()
            .map(|k| format!("ignoring `{k}` (a Cosmos-RL key this service does not use)"))
            .collect();
        for a in &self.reward_args {
            if a.reward_type == "command" {
                continue;
            }
            for k in a.rest.keys() {
                let why = if COSMOS_ONLY_REWARD_KEYS.contains(&k.as_str()) {
                    "only Cosmos-RL's Python rewards read it"
                } else {
                    "unknown key"
                };
                out.push(format!(
                    "reward_args {:?}: ignoring `{k}` ({why})",
                    a.reward_type
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_cosmos_style_rewards_toml() {
        let c = Config::from_toml_str(
            r#"
host = "0.0.0.0"
port = 8080
token = "t"

[[reward_args]]
reward_type = "jpeg_compressibility"

[[reward_args]]
reward_type = "dance_grpo"
venv_python = "/root/dance_grpo/bin/python"
model_path = "/workspace/VideoReward"
enable = false

[decode_args]
model_path = "x"
"#,
        )
        .unwrap();
        assert_eq!(c.host, "0.0.0.0");
        assert_eq!(c.redis_port, None);
        assert_eq!(c.reward_args.len(), 2);
        assert!(!c.reward_args[1].enable);
        let w = c.warnings().join("\n");
        assert!(w.contains("decode_args"), "{w}");
        assert!(w.contains("venv_python"), "{w}");
        let rewards = crate::rewards::build(&c.reward_args).unwrap();
        assert_eq!(
            rewards.keys().collect::<Vec<_>>(),
            vec!["jpeg_compressibility"]
        );
    }

    #[test]
    fn an_enabled_unknown_reward_is_an_error() {
        let c = Config::from_toml_str("[[reward_args]]\nreward_type = \"dance_grpo\"\n").unwrap();
        let err = crate::rewards::build(&c.reward_args)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("dance_grpo") && err.contains("command"),
            "{err}"
        );
    }

    #[test]
    fn command_rewards_need_a_name_and_command() {
        let c = Config::from_toml_str(
            "[[reward_args]]\nreward_type = \"command\"\ncommand = [\"python3\"]\n",
        )
        .unwrap();
        let err = crate::rewards::build(&c.reward_args)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("name"), "{err}");
    }
}
