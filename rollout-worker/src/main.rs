use clap::Parser;

/// Samples SANA images/videos with the current "old" policy and sends media to the reward gateway.
///
/// Not implemented yet (tracked in issue 6); this binary only reserves the name.
#[derive(Parser, Debug)]
#[command(name = "rollout-worker", version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!(
        "rollout-worker is not implemented yet (issue {})",
        rollout_worker::TRACKING_ISSUE
    )
}
