//! `proto`: the gRPC services and messages between sana-rl's processes.
//!
//! Now: the reward gateway's service (`reward::v1`, from
//! `proto/sana_rl/reward_gateway.proto`). The controller/worker services
//! (registration, heartbeats, prompt batches, trajectories, weight updates) are
//! issue 6's.

/// The reward gateway's API (`sana_rl.reward.v1`).
pub mod reward {
    pub mod v1 {
        tonic::include_proto!("sana_rl.reward.v1");
    }
}
