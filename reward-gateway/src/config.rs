//! The gateway's TOML: a `[gateway]` table for itself, and the reward configs
//! at the paths Cosmos-RL's trainer config uses them
//! (`[train.train_policy.remote_reward]`, `[validation.remote_reward]`), so the
//! gateway can read the trainer's own config file. Other keys are ignored.

use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Config {
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub validation: ValidationSection,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct TrainSection {
    #[serde(default)]
    pub train_policy: TrainPolicySection,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct TrainPolicySection {
    #[serde(default)]
    pub remote_reward: RemoteRewardConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ValidationSection {
    /// Absent: validation requests use the training config.
    #[serde(default)]
    pub remote_reward: Option<RemoteRewardConfig>,
}

/// Cosmos-RL's `remote_reward` table: how pulls turn into one reward per item.
#[derive(Debug, Clone, Deserialize)]
pub struct RemoteRewardConfig {
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub reward_clip_min: Option<f64>,
    #[serde(default)]
    pub reward_clip_max: Option<f64>,
    #[serde(default)]
    pub reward_fns: Vec<RewardFn>,
}

impl Default for RemoteRewardConfig {
    fn default() -> Self {
        RemoteRewardConfig {
            scale: 1.0,
            reward_clip_min: None,
            reward_clip_max: None,
            reward_fns: Vec::new(),
        }
    }
}

/// One `[[reward_fns]]` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct RewardFn {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
    /// Which key of the pull's `scores` to use; `"a+b"` sums keys. Default: `name`.
    #[serde(default)]
    pub score_key: Option<String>,
    #[serde(default)]
    pub clip_min: Option<f64>,
    #[serde(default)]
    pub clip_max: Option<f64>,
}

impl RewardFn {
    pub fn score_key(&self) -> &str {
        self.score_key.as_deref().unwrap_or(&self.name)
    }
}

fn one() -> f64 {
    1.0
}

/// The gateway's own settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Redis where pending requests are kept so a restarted gateway resumes
    /// them. Absent: kept in memory only (a restart loses them).
    #[serde(default)]
    pub redis_host: Option<String>,
    #[serde(default)]
    pub redis_port: Option<u16>,
    /// Key prefix in that Redis, so several gateways can share one.
    #[serde(default = "default_prefix")]
    pub redis_prefix: String,
    /// Flush a batch once it holds this many items...
    #[serde(default = "default_batch_items")]
    pub max_batch_items: usize,
    /// ...or once its first request has waited this long.
    #[serde(default = "default_batch_wait")]
    pub max_batch_wait_ms: u64,
    /// First and largest delay between pulls of a batch not scored yet.
    #[serde(default = "default_poll_initial")]
    pub poll_initial_ms: u64,
    #[serde(default = "default_poll_max")]
    pub poll_max_ms: u64,
    /// First and largest delay between retries of failed calls (connect errors,
    /// 5xx, 503), with jitter.
    #[serde(default = "default_retry_initial")]
    pub retry_initial_ms: u64,
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
    /// A service that does not say whether a uuid is still pending (Cosmos-RL's
    /// Python one) gets the batch again after it has been "not found" this long.
    #[serde(default = "default_lost_after")]
    pub lost_after_s: u64,
    /// A request not answered in this long fails with DEADLINE_EXCEEDED.
    #[serde(default = "default_deadline")]
    pub request_deadline_s: u64,
    /// How long answers stay fetchable.
    #[serde(default = "default_result_ttl")]
    pub result_ttl_s: u64,
    /// Largest gRPC message (MiB): a batch of media.
    #[serde(default = "default_message_mb")]
    pub max_message_mb: usize,
    /// Send latents (`media_type = "latent"`) to the service; off, they are refused.
    #[serde(default)]
    pub allow_latents: bool,
    /// Override `REMOTE_REWARD_ENQUEUE_URL` / `_FETCH_URL` / `_TOKEN`.
    #[serde(default)]
    pub enqueue_url: Option<String>,
    #[serde(default)]
    pub fetch_url: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults are valid")
    }
}

fn default_listen() -> String {
    "127.0.0.1:50071".into()
}
fn default_prefix() -> String {
    "sana-rl:gateway:".into()
}
fn default_batch_items() -> usize {
    64
}
fn default_batch_wait() -> u64 {
    20
}
fn default_poll_initial() -> u64 {
    20
}
fn default_poll_max() -> u64 {
    1000
}
fn default_retry_initial() -> u64 {
    100
}
fn default_retry_max() -> u64 {
    5000
}
fn default_lost_after() -> u64 {
    600
}
fn default_deadline() -> u64 {
    3600
}
fn default_result_ttl() -> u64 {
    3600
}
fn default_message_mb() -> usize {
    1024
}

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
            e => e,
        })
    }

    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            source: Box::new(e),
        })?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let train = &self.train.train_policy.remote_reward;
        if train.reward_fns.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[train.train_policy.remote_reward.reward_fns]]: name at least one reward"
                    .into(),
            ));
        }
        for cfg in std::iter::once(train).chain(self.validation.remote_reward.as_ref()) {
            for f in &cfg.reward_fns {
                if f.score_key().split('+').all(|k| k.trim().is_empty()) {
                    return Err(ConfigError::Invalid(format!(
                        "reward_fn {:?}: empty score_key",
                        f.name
                    )));
                }
            }
        }
        let g = &self.gateway;
        if g.max_batch_items == 0 {
            return Err(ConfigError::Invalid(
                "max_batch_items must be at least 1".into(),
            ));
        }
        if g.redis_host.is_some() && g.redis_port.is_none() {
            return Err(ConfigError::Invalid(
                "redis_host is set without redis_port".into(),
            ));
        }
        Ok(())
    }

    /// The reward config for training or validation requests.
    pub fn remote_reward(&self, validation: bool) -> &RemoteRewardConfig {
        match (&self.validation.remote_reward, validation) {
            (Some(v), true) => v,
            _ => &self.train.train_policy.remote_reward,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cosmos_rl_paths_and_ignores_the_rest() {
        let c = Config::from_toml_str(
            r#"
[policy]
model_name_or_path = "x"

[train.train_policy]
algo = "nft"

[train.train_policy.remote_reward]
scale = 2.0
reward_clip_max = 1.0

[[train.train_policy.remote_reward.reward_fns]]
name = "dance_grpo"
score_key = "vq_reward+mq_reward"
weight = 0.5
clip_min = -1.0

[gateway]
max_batch_items = 8
"#,
        )
        .unwrap();
        let r = c.remote_reward(false);
        assert_eq!(r.scale, 2.0);
        assert_eq!(r.reward_clip_max, Some(1.0));
        assert_eq!(r.reward_fns[0].score_key(), "vq_reward+mq_reward");
        assert_eq!(c.gateway.max_batch_items, 8);
        // No [validation.remote_reward]: validation uses the training config.
        assert_eq!(c.remote_reward(true).scale, 2.0);
    }

    #[test]
    fn needs_a_reward_fn() {
        assert!(Config::from_toml_str("").is_err());
    }
}
