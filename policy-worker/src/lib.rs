//! `policy-worker`: Runs NFT/SFT updates of the SANA transformer through libtorch, data-parallel and FSDP-style.
//!
//! Not built yet: this crate reserves its place in the workspace layout; its
//! work is tracked in issue 6.

/// The issue that builds this process role.
pub const TRACKING_ISSUE: u32 = 6;
