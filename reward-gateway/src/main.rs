use clap::Parser;

/// Batches enqueue/fetch calls from rollout workers to the asynchronous reward service.
///
/// Not implemented yet (tracked in issue 5); this binary only reserves the name.
#[derive(Parser, Debug)]
#[command(name = "reward-gateway", version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!(
        "reward-gateway is not implemented yet (issue {})",
        reward_gateway::TRACKING_ISSUE
    )
}
