use clap::Parser;

/// Runs NFT/SFT updates of the SANA transformer through libtorch, data-parallel and FSDP-style.
///
/// Not implemented yet (tracked in issue 6); this binary only reserves the name.
#[derive(Parser, Debug)]
#[command(name = "policy-worker", version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!(
        "policy-worker is not implemented yet (issue {})",
        policy_worker::TRACKING_ISSUE
    )
}
