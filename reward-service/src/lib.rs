//! `reward-service`: Cosmos-RL's remote-reward protocol, served from Rust (the
//! embedded default reward service of sana-rl).
//!
//! - [`npy`] and [`body`]: the enqueue body (`<JSON>\n<.npy>`), parsed and checked.
//! - [`rewards`]: `jpeg_compressibility`, `jpeg_incompressibility`, and
//!   `command` (a user's scorer process on a JSON line protocol).
//! - [`store`]: scores in Redis with a TTL, shared by replicas.
//! - [`server`]: the HTTP endpoints, auth, backpressure and graceful shutdown.
//! - [`redis_server`]: the embedded `redis-server` child.
//!
//! The protocol is `shared/reference/reward-protocol.md`.

pub mod body;
pub mod config;
pub mod npy;
pub mod redis_server;
pub mod rewards;
pub mod server;
pub mod store;

pub use config::Config;
pub use server::{RewardService, ServiceError, ENQUEUE_PATH, PING_PATH, PULL_PATH};
