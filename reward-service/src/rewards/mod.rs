//! The rewards this service computes: built-in ones that need no model weights,
//! and `command`, which hands batches to a user's scorer process.

pub mod command;
pub mod jpeg;

use crate::body::Enqueue;
use crate::config::RewardArgs;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `scores` of a pull answer: score key → one value per item (a reward may
/// also nest objects, as GenEval's `gen_eval_group` does).
pub type Scores = serde_json::Map<String, serde_json::Value>;

/// Why a batch could not be scored. Stored as the pull answer's `error`.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("unusable input: {0}")]
    Input(String),
    #[error("{0}")]
    Compute(String),
    #[error("scorer: {0}")]
    Scorer(String),
}

/// One reward the service can compute.
pub trait Reward: Send + Sync {
    /// The name clients put in `reward_fn` and `type`.
    fn name(&self) -> &str;
    /// Refuse at enqueue time a request this reward cannot score.
    fn check(&self, req: &Enqueue) -> Result<(), String>;
    /// Score a batch. Blocking: runs on the compute threads, off the async runtime.
    fn score(&self, req: &Enqueue) -> Result<Scores, RewardError>;
    /// Release what the reward holds (scorer processes) at shutdown.
    fn shutdown(&self) {}
}

/// Why the `[[reward_args]]` could not be turned into rewards.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("reward_type {0:?} is enabled but not built in (built in: jpeg_compressibility, jpeg_incompressibility, command); run your own scorer with reward_type = \"command\", or set enable = false")]
    Unknown(String),
    #[error("reward {0:?} is configured twice")]
    Duplicate(String),
    #[error("reward_args for {reward:?}: {msg}")]
    Bad { reward: String, msg: String },
}

/// The enabled rewards by the name clients use.
pub fn build(args: &[RewardArgs]) -> Result<BTreeMap<String, Arc<dyn Reward>>, BuildError> {
    let mut out: BTreeMap<String, Arc<dyn Reward>> = BTreeMap::new();
    for a in args.iter().filter(|a| a.enable) {
        let reward: Arc<dyn Reward> = match a.reward_type.as_str() {
            "jpeg_compressibility" => {
                Arc::new(jpeg::JpegReward::new(jpeg::JpegKind::Compressibility))
            }
            "jpeg_incompressibility" => {
                Arc::new(jpeg::JpegReward::new(jpeg::JpegKind::Incompressibility))
            }
            "command" => Arc::new(command::CommandReward::from_args(a)?),
            other => return Err(BuildError::Unknown(other.to_string())),
        };
        let name = reward.name().to_string();
        if out.insert(name.clone(), reward).is_some() {
            return Err(BuildError::Duplicate(name));
        }
    }
    Ok(out)
}
