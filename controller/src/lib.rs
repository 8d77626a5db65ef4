//! `controller`: Schedules rollout and policy workers for a SANA post-training run (SFT or DiffusionNFT) from a Cosmos-RL TOML config.
//!
//! Not built yet: this crate reserves its place in the workspace layout; its
//! work is tracked in issue 6.

/// The issue that builds this process role.
pub const TRACKING_ISSUE: u32 = 6;
