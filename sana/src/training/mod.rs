//! The math the policy workers run (../shared nft-algorithm.md is the spec;
//! Cosmos-RL 0.4.7 the reference): losses, optimizer, LR schedule, EMA and the
//! decayed "old" policy copy, and data parallelism over c10d collectives.
//! No RPC, no process state.

pub mod checkpoint;
pub mod ema;
pub mod fsdp;
pub mod lr_schedule;
pub mod nft;
pub mod nft_trainer;
pub mod optim;
pub mod parallel;
pub mod sft;
pub mod sft_trainer;
pub mod trainable;
