use anyhow::Context;
use clap::Parser;
use reward_gateway::Config;
use std::path::PathBuf;

/// The reward gateway: a gRPC service (sana_rl.reward.v1.RewardGateway) that
/// takes generated media with prompts from rollout workers, batches them into
/// calls to a Cosmos-RL-protocol reward service, and answers every request once
/// with combined rewards and group advantages.
///
/// The reward service is found through REMOTE_REWARD_ENQUEUE_URL,
/// REMOTE_REWARD_FETCH_URL and REMOTE_REWARD_TOKEN (and the
/// REMOTE_REWARD_ENQUEUE_TIMEOUT_* variables), as Cosmos-RL's trainer finds it.
/// With [gateway] redis_port set, pending requests survive a restart.
#[derive(Parser, Debug)]
#[command(name = "reward-gateway", version)]
struct Args {
    /// TOML with [gateway] settings and [train.train_policy.remote_reward]
    /// (scale, clips, [[...reward_fns]]), optionally [validation.remote_reward];
    /// a Cosmos-RL trainer config works as it is.
    #[arg(long)]
    config: PathBuf,
    /// Override [gateway] listen (host:port).
    #[arg(long)]
    listen: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cfg = Config::load(&args.config)?;
    if let Some(l) = args.listen {
        cfg.gateway.listen = l;
    }
    let listen = cfg.gateway.listen.clone();
    let max_msg = cfg.gateway.max_message_mb.saturating_mul(1 << 20);
    let engine = reward_gateway::start_engine(cfg).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "reward-gateway listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = shutdown_signal().await {
            tracing::error!("{e:#}");
        }
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Graceful stop waits for open calls; a `Score` can take as long as the
    // reward does, so give them a while and then go (pending work is in Redis).
    tokio::select! {
        r = reward_gateway::grpc::serve(engine, listener, max_msg, stopped(stop_rx.clone())) => r?,
        _ = async {
            stopped(stop_rx).await;
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        } => tracing::warn!("calls still open 10 s after the stop signal; exiting"),
    }
    tracing::info!("reward-gateway stopped (pending requests stay in redis, if configured)");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
