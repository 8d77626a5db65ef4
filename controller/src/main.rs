use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

/// Runs a SANA post-training job (DiffusionNFT) from a Cosmos-RL TOML config:
/// starts the reward service (embedded, unless REMOTE_REWARD_ENQUEUE_URL and
/// REMOTE_REWARD_FETCH_URL point at one), the reward gateway, a policy worker
/// and a rollout worker, then steps: sample prompts with the "old" adapter,
/// score them, train, push the new "old" adapter. Writes
/// <train.output_dir>/<timestamp>/ with metrics.jsonl, mm_data/, logs/,
/// checkpoints/ and safetensors/ (the adapter as PEFT and diffusers files).
///
/// Ctrl-C finishes the current step and writes a final checkpoint; a dead
/// worker stops the run with its name and log. `train.resume = true` continues
/// from the newest checkpoint.
#[derive(Parser, Debug)]
#[command(name = "controller", version)]
struct Args {
    /// A Cosmos-RL run config (configs/sana/*.toml, configs/demo/*.toml).
    #[arg(long)]
    config: PathBuf,
    /// Print the resolved plan (workers, devices, batch arithmetic, data,
    /// rewards) and exit.
    #[arg(long)]
    dry_run: bool,
    /// Unknown config keys are errors, not warnings.
    #[arg(long)]
    strict: bool,
    /// Stop after this many steps (the LR schedule keeps the planned length).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Use this run directory instead of <train.output_dir>/<timestamp>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Send tracing spans of every process of the run to this OpenTelemetry
    /// collector (OTLP/gRPC, e.g. http://localhost:4317), as one trace.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Seconds the policy ranks wait in a collective for a missing rank before
    /// they report it (default 600).
    #[arg(long)]
    collective_timeout_secs: Option<u64>,
    /// After a worker dies or a step fails, relaunch all workers and resume
    /// from the last checkpoint, up to this many times (default 0: stop and
    /// say how to resume).
    #[arg(long, default_value_t = 0)]
    max_restarts: u32,
    /// How workers start: `auto` runs them as srun steps inside a Slurm
    /// allocation (SLURM_JOB_ID set, see deploy/slurm/) and as local
    /// processes otherwise.
    #[arg(long, value_enum, default_value_t = controller::placement::Launcher::Auto)]
    launcher: controller::placement::Launcher,
    /// A policy rank started elsewhere (a Kubernetes pod, see --render k8s),
    /// as HOST:PORT; once per rank, in rank order. The controller then starts
    /// no policy workers and waits for these to answer.
    #[arg(long, value_name = "HOST:PORT")]
    attach_policy: Vec<String>,
    /// A rollout worker started elsewhere (HOST:PORT; repeat per worker). The
    /// controller then starts no rollout workers, reward service or gateway:
    /// the workers have their own --gateway.
    #[arg(long, value_name = "HOST:PORT")]
    attach_rollout: Vec<String>,
    /// Print the run as Kubernetes objects (multi-document YAML for
    /// `kubectl apply -f -`; see deploy/k8s/README.md) and exit.
    #[arg(long, value_enum, value_name = "TARGET")]
    render: Option<Render>,
    /// The container image of the rendered pods (with --render; default
    /// ghcr.io/sana-rl/sana-rl:<version>).
    #[arg(long, requires = "render")]
    image: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Render {
    /// Kubernetes manifests.
    K8s,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The OTLP exporter needs the runtime; the guard flushes spans at exit.
    let _rt = rt.enter();
    let tel = telemetry::init("controller", "warn", args.otlp_endpoint.as_deref());
    let res = real_main(args, &rt, &tel);
    drop(tel);
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(
    args: Args,
    rt: &tokio::runtime::Runtime,
    tel: &telemetry::Telemetry,
) -> anyhow::Result<()> {
    let loaded = sana::config::load(&args.config, args.strict)?;
    for u in &loaded.unknown {
        eprintln!(
            "warning: {}:{}: {}",
            args.config.display(),
            u.line,
            u.message()
        );
    }
    let base = std::env::current_dir()?;
    let mut plan = controller::plan::Plan::new(
        &loaded.config,
        &args.config,
        &base,
        controller::plan::detect_devices(),
    )
    .with_context(|| format!("{}", args.config.display()))?;
    // Named once: in the plan (--dry-run) or at the start of the run.
    plan.not_supported = loaded.not_supported.clone();
    if args.dry_run {
        print!("{}", plan.render(&loaded.config));
        return Ok(());
    }
    if let Some(Render::K8s) = args.render {
        let text = std::fs::read_to_string(&args.config)?;
        let r =
            controller::render_k8s::render(&loaded.config, &plan, &text, args.image.as_deref())?;
        for w in &r.warnings {
            eprintln!("warning: {w}");
        }
        print!("{}", r.yaml());
        return Ok(());
    }
    let opts = controller::RunOptions {
        config_path: std::fs::canonicalize(&args.config)?,
        base_dir: base,
        max_steps: args.max_steps,
        run_dir: args.run_dir,
        otlp_endpoint: args.otlp_endpoint,
        trace_root: tel.root.clone(),
        collective_timeout: args
            .collective_timeout_secs
            .map(std::time::Duration::from_secs),
        max_restarts: args.max_restarts,
        launcher: args.launcher,
        attach_policies: args.attach_policy,
        attach_rollouts: args.attach_rollout,
    };
    rt.block_on(controller::run(opts, loaded.config, plan))
}
