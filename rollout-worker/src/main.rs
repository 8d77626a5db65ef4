use clap::Parser;
use std::path::PathBuf;

/// Samples SANA images with the rollout LoRA adapter ("old") for the controller,
/// which starts it, scores them through the reward gateway and returns the
/// trajectories (sana_rl.runtime.v1.RolloutWorker on `--listen`).
#[derive(Parser, Debug)]
#[command(name = "rollout-worker", version)]
struct Args {
    /// The run's Cosmos-RL TOML config.
    #[arg(long)]
    config: PathBuf,
    /// host:port to serve on (port 0: any free port; the log says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[arg(long, default_value_t = 0)]
    rank: u32,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The reward gateway, http://host:port.
    #[arg(long)]
    gateway: String,
    /// Prefix of this run's reward request ids.
    #[arg(long, default_value = "run")]
    run_id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Spans go to OTEL_EXPORTER_OTLP_ENDPOINT when the controller sets it.
    let tel = telemetry::init("rollout-worker", "info", None);
    let loaded = sana::config::load(&args.config, false)?;
    let setup = rollout_worker::WorkerSetup {
        config: loaded.config,
        base_dir: std::env::current_dir()?,
        rank: args.rank,
        device: sana::config::runtime::parse_device(&args.device)?,
        gateway: args.gateway,
        run_id: args.run_id,
        trace_root: tel.root.clone(),
    };
    rollout_worker::serve(setup, &args.listen).await
}
