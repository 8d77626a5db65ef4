//! `rollout-worker`: Samples SANA images/videos with the current "old" policy and sends media to the reward gateway.
//!
//! Not built yet: this crate reserves its place in the workspace layout; its
//! work is tracked in issue 6.

/// The issue that builds this process role.
pub const TRACKING_ISSUE: u32 = 6;
