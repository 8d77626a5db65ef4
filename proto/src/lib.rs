//! `proto`: the gRPC services and messages between sana-rl's processes.
//!
//! `reward::v1`: the reward gateway's service (`proto/sana_rl/reward_gateway.proto`).
//! `runtime::v1`: the controller's calls into rollout and policy workers
//! (`proto/sana_rl/runtime.proto`): health, prompt batches and trajectories,
//! training batches, versioned weight chunks, checkpoints, shutdown.

/// The reward gateway's API (`sana_rl.reward.v1`).
pub mod reward {
    pub mod v1 {
        tonic::include_proto!("sana_rl.reward.v1");
    }
}

pub mod worker;

/// Controller ↔ worker services (`sana_rl.runtime.v1`).
pub mod runtime {
    pub mod v1 {
        tonic::include_proto!("sana_rl.runtime.v1");
    }
}
