use clap::Parser;

/// Serves Cosmos-RL's remote-reward protocol (the embedded default reward service).
///
/// Not implemented yet (tracked in issue 5); this binary only reserves the name.
#[derive(Parser, Debug)]
#[command(name = "reward-service", version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!("reward-service is not implemented yet (issue {})", reward_service::TRACKING_ISSUE)
}
