use clap::Parser;
use std::path::PathBuf;

/// Runs DiffusionNFT updates of the SANA transformer (LoRA "default" trained,
/// "old" for rollouts) for the controller, which starts it: `--listen` is where
/// the controller connects. Started by hand it serves the same gRPC API
/// (sana_rl.runtime.v1.PolicyWorker).
#[derive(Parser, Debug)]
#[command(name = "policy-worker", version)]
struct Args {
    /// The run's Cosmos-RL TOML config.
    #[arg(long)]
    config: PathBuf,
    /// host:port to serve on (port 0: any free port; the log says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// This worker's data-parallel rank (torchrun's RANK when unset).
    #[arg(long, env = "RANK", default_value_t = 0)]
    rank: u32,
    /// Policy ranks training together (torchrun's WORLD_SIZE when unset).
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
    world_size: u32,
    /// host:port of rank 0's rendezvous store (with --world-size > 1); rank 0 binds it.
    #[arg(long)]
    master: Option<String>,
    /// This host's address for the collectives (the controller passes the node's
    /// address under Slurm; on Kubernetes the pod IP).
    #[arg(long, env = "SANA_RL_LOCAL_ADDR")]
    local_addr: Option<String>,
    /// Seconds a collective may wait for the other ranks before this worker
    /// reports the group broken.
    #[arg(long, default_value_t = 600)]
    collective_timeout_secs: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Steps of the run (the LR schedule's length).
    #[arg(long)]
    total_steps: u64,
    /// Output directory of the run (checkpoints/, safetensors/).
    #[arg(long)]
    output_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Spans go to OTEL_EXPORTER_OTLP_ENDPOINT when the controller sets it.
    let tel = telemetry::init("policy-worker", "info", None);
    let loaded = sana::config::load(&args.config, false)?;
    let setup = policy_worker::WorkerSetup {
        config: loaded.config,
        base_dir: std::env::current_dir()?,
        rank: args.rank,
        world_size: args.world_size,
        master: args.master,
        local_addr: args.local_addr,
        collective_timeout: std::time::Duration::from_secs(args.collective_timeout_secs),
        device: sana::config::runtime::parse_device(&args.device)?,
        total_steps: args.total_steps,
        output_dir: args.output_dir,
        trace_root: tel.root.clone(),
    };
    policy_worker::serve(setup, &args.listen).await
}
