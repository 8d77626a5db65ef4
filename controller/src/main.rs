use clap::Parser;

/// Schedules rollout and policy workers for a SANA post-training run (SFT or DiffusionNFT) from a Cosmos-RL TOML config.
///
/// Not implemented yet (tracked in issue 6); this binary only reserves the name.
#[derive(Parser, Debug)]
#[command(name = "controller", version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!(
        "controller is not implemented yet (issue {})",
        controller::TRACKING_ISSUE
    )
}
