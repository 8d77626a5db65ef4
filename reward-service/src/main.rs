use anyhow::Context;
use clap::Parser;
use reward_service::{Config, RewardService};
use std::path::PathBuf;

/// Serves Cosmos-RL's remote-reward protocol: `POST /api/reward/ping`,
/// `/api/reward/enqueue` (`<JSON>\n<.npy>` bodies) and `/api/reward/pull`.
///
/// Built-in rewards: jpeg_compressibility, jpeg_incompressibility, and
/// `command` (your own scorer process, see the README's "Rewards" section).
/// Scores live in Redis: the one at `redis_host`/`redis_port`, or an embedded
/// `redis-server` started for this process. SIGTERM or Ctrl-C stops taking new
/// work, finishes what is queued, then exits.
#[derive(Parser, Debug)]
#[command(name = "reward-service", version)]
struct Args {
    /// A TOML like Cosmos-RL's rewards.toml: host, port, token, redis_host,
    /// redis_port, [[reward_args]] (reward_type, enable, ...). Without it: the
    /// two JPEG rewards on localhost:8080 with an embedded Redis.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the config's host.
    #[arg(long)]
    host: Option<String>,
    /// Override the config's port (0 picks a free one; the log says which).
    #[arg(long)]
    port: Option<u16>,
}

const DEFAULT_CONFIG: &str = r#"
[[reward_args]]
reward_type = "jpeg_compressibility"
[[reward_args]]
reward_type = "jpeg_incompressibility"
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::from_toml_str(DEFAULT_CONFIG)?,
    };
    if let Some(h) = args.host {
        config.host = h;
    }
    if let Some(p) = args.port {
        config.port = p;
    }
    let service = RewardService::start(config)
        .await
        .context("starting reward-service")?;
    shutdown_signal().await?;
    service.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
    Ok(())
}
