//! `reward-service`: Serves Cosmos-RL's remote-reward protocol (the embedded default reward service).
//!
//! Not built yet: this crate reserves its place in the workspace layout; its
//! work is tracked in issue 5.

/// The issue that builds this process role.
pub const TRACKING_ISSUE: u32 = 5;
