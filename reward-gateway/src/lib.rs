//! `reward-gateway`: takes media batches with prompts from many rollout
//! workers (gRPC, `proto::reward::v1`), coalesces them into reward-service
//! enqueues, pulls every configured reward, combines them as Cosmos-RL does,
//! and answers each request exactly once, with group advantages.
//!
//! - [`config`]: the gateway's TOML (Cosmos-RL's `remote_reward` tables inside).
//! - [`remote`]: the reward service's HTTP protocol as Cosmos-RL's clients speak it.
//! - [`combine`]: keys, clipping, weights, scale, advantages.
//! - [`engine`]: batching, retries, re-enqueue of lost work, answers.
//! - [`persist`]: pending work in Redis, so a restart resumes it.
//! - [`grpc`] and [`client`]: the service and what rollout workers call.

pub mod client;
pub mod combine;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod persist;
pub mod remote;

pub use config::Config;
pub use engine::Engine;

/// Start the engine from a config: Redis persistence when configured, the
/// reward service from `REMOTE_REWARD_*` (or the config's overrides).
pub async fn start_engine(cfg: Config) -> anyhow::Result<Engine> {
    use anyhow::Context;
    let g = &cfg.gateway;
    let remote = remote::RemoteConfig::from_env(
        g.enqueue_url.clone(),
        g.fetch_url.clone(),
        g.token.clone(),
    )?;
    let remote = remote::RemoteClient::new(remote).context("building the HTTP client")?;
    let persist = match g.redis_port {
        Some(port) => {
            let host = g.redis_host.clone().unwrap_or_else(|| "127.0.0.1".into());
            let url = format!("redis://{host}:{port}/");
            persist::Persist::redis(&url, g.redis_prefix.clone(), g.result_ttl_s)
                .await
                .with_context(|| format!("connecting to redis at {url}"))?
        }
        None => {
            tracing::warn!("no redis_port in [gateway]: pending requests are kept in memory only and a restart loses them");
            persist::Persist::None
        }
    };
    Ok(engine::Engine::start(cfg, remote, persist).await?)
}
