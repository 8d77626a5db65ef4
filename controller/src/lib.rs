//! `controller`: runs a SANA post-training job from a Cosmos-RL TOML config.
//! It reads like torchtitan's train loop: config → plan (devices, batch
//! arithmetic) → launch (reward service, gateway, workers) → step loop
//! (prompts → rollouts + rewards → policy step → new "old" adapter → logs,
//! validation, checkpoints) → final checkpoint and export.

pub mod download;
pub mod launch;
pub mod logs;
pub mod placement;
pub mod plan;
pub mod render_k8s;
pub mod tensorboard;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proto::runtime::v1::policy_worker_client::PolicyWorkerClient;
use proto::runtime::v1::rollout_worker_client::RolloutWorkerClient;
use proto::runtime::v1::*;
use sana::config::{BoolOrString, RunConfig, RunKind};
use sana::data::prompts::{Cursor, PromptDataset};
use tonic::transport::Channel;
use tracing::Instrument;

use launch::{bin, free_port, wait_for_port, Fleet};
use logs::RunLog;
use placement::{Launcher, Placement};
use plan::{load_prompts, Plan, RewardSetup};
use sana::data::prompts::epoch_order;

/// What the command line asked for, besides the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config_path: PathBuf,
    /// Relative paths in the config resolve against this (the working directory).
    pub base_dir: PathBuf,
    /// Stop after this many steps (tests, smoke runs); the LR schedule keeps the planned length.
    pub max_steps: Option<u64>,
    /// Run directory instead of `<train.output_dir>/<timestamp>`.
    pub run_dir: Option<PathBuf>,
    /// OTLP collector for every process's spans.
    pub otlp_endpoint: Option<String>,
    /// The controller's root span: workers' spans go under it (`TRACEPARENT`).
    pub trace_root: tracing::Span,
    /// Bounds the policy ranks' collectives (None: the workers' default, 600 s).
    pub collective_timeout: Option<Duration>,
    /// Relaunch the workers this many times after a failure, resuming from the
    /// last checkpoint.
    pub max_restarts: u32,
    /// Local processes, or srun steps inside a Slurm allocation.
    pub launcher: Launcher,
    /// Policy ranks started elsewhere (Kubernetes pods), by address, rank order;
    /// empty: the controller starts them.
    pub attach_policies: Vec<String>,
    /// Rollout workers started elsewhere, by address.
    pub attach_rollouts: Vec<String>,
}

/// The controller's own resumable state, saved inside the policy checkpoint.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ControllerState {
    pub step: u64,
    pub cursor: Cursor,
}

/// `<output_dir>/<timestamp>` as Cosmos-RL names runs, or with `train.resume`
/// the newest earlier run of that output_dir that holds checkpoints.
pub fn run_dir(c: &RunConfig, base: &Path) -> PathBuf {
    // `./outputs/x` → `<base>/outputs/x` (no `/./` in the paths we print).
    let rel: PathBuf = Path::new(&c.train.output_dir)
        .components()
        .filter(|p| !matches!(p, std::path::Component::CurDir))
        .collect();
    let out = base.join(rel);
    match &c.train.resume {
        BoolOrString::Str(p) => {
            let p = base.join(p);
            // A checkpoint path (…/checkpoints/step_N) or a run directory.
            for a in p.ancestors() {
                if a.file_name().is_some_and(|n| n == "checkpoints") {
                    return a.parent().unwrap_or(&p).to_path_buf();
                }
            }
            return p;
        }
        BoolOrString::Bool(true) => {
            let mut runs: Vec<PathBuf> = std::fs::read_dir(&out)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            runs.retain(|r| r.join("checkpoints").is_dir());
            runs.sort();
            if let Some(last) = runs.pop() {
                return last;
            }
        }
        BoolOrString::Bool(false) => {}
    }
    let stamp = if c.train.timestamp.is_empty() {
        chrono_stamp()
    } else {
        c.train.timestamp.clone()
    };
    out.join(stamp)
}

/// `%Y%m%d%H%M%S` in UTC, without a date crate.
fn chrono_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Tracing context for a child process: the collector and our root span.
fn trace_env(cmd: &mut Command, opts: &RunOptions) {
    if let Some(e) = &opts.otlp_endpoint {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", e);
        if let Some(tp) = telemetry::traceparent(&opts.trace_root) {
            cmd.env(telemetry::TRACEPARENT, tp);
        }
    }
}

/// The processes and clients of a running job.
struct Job {
    fleet: Fleet,
    /// `(name, client)` per policy rank; they train in lockstep (data parallel),
    /// rank 0 answers for all (weights, checkpoints).
    policies: Vec<(String, PolicyWorkerClient<Channel>)>,
    /// DiffusionNFT only (SFT has no rollouts): `(name, client)` per rollout worker.
    rollouts: Vec<(String, RolloutWorkerClient<Channel>)>,
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await?,
    )
}

/// Calls Health until it answers (the worker is loading its model meanwhile).
async fn wait_healthy<F, Fut>(
    fleet: &Fleet,
    name: &str,
    timeout: Duration,
    mut call: F,
) -> anyhow::Result<HealthReply>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<HealthReply>, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        if let Some(dead) = fleet.dead() {
            bail!("{dead}");
        }
        match tokio::time::timeout(Duration::from_secs(5), call()).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            _ if started.elapsed() > timeout => bail!("{name} did not answer within {timeout:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Starts the policy ranks (one c10d group when several) and, for
/// DiffusionNFT, the reward service (embedded unless REMOTE_REWARD_* point
/// elsewhere), the gateway and the rollout workers.
async fn launch(
    fleet: Fleet,
    opts: &RunOptions,
    plan: &Plan,
    placement: &Placement,
    run_dir: &Path,
    run_id: &str,
) -> anyhow::Result<Job> {
    let logs = run_dir.join("logs");
    let load = Duration::from_secs(1800);

    let world = plan.policy_workers.max(1);
    // Rank 0 hosts the rendezvous store on its node.
    let (_, master) = placement.server_addr(placement.node_of(0, world), free_port()?);
    let mut policy_addrs = Vec::new();
    if !opts.attach_policies.is_empty() {
        if opts.attach_policies.len() != world {
            bail!(
                "{} --attach-policy addresses for a run of {world} policy ranks \
                 ([policy.parallelism]): give one per rank, in rank order",
                opts.attach_policies.len()
            );
        }
        // Started elsewhere (Kubernetes): rank i is the i-th address.
        for (rank, addr) in opts.attach_policies.iter().enumerate() {
            policy_addrs.push((format!("policy-worker-{rank}"), addr.clone()));
        }
    } else {
        for rank in 0..world {
            let name = format!("policy-worker-{rank}");
            let node = placement.node_of(rank, world);
            let (listen, p_addr) = placement.server_addr(node, free_port()?);
            let device = &plan.devices[rank % plan.devices.len()];
            let mut cmd = placement.command(node, &name, &bin("policy-worker")?);
            cmd.arg("--config")
                .arg(&opts.config_path)
                .args(["--listen", &listen, "--device", device])
                .args([
                    "--rank",
                    &rank.to_string(),
                    "--world-size",
                    &world.to_string(),
                ])
                .args(["--master", &master])
                .args(["--total-steps", &plan.total_steps.to_string()])
                .arg("--output-dir")
                .arg(run_dir)
                .current_dir(&opts.base_dir);
            if let Some(a) = placement.node_addr(node) {
                cmd.args(["--local-addr", &a]);
            }
            if let Some(t) = opts.collective_timeout {
                cmd.args(["--collective-timeout-secs", &t.as_secs().max(1).to_string()]);
            }
            if device == "cpu" && world > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
                // CPU ranks on one machine share its cores instead of each taking all.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let per_node = world.div_ceil(placement.nodes());
                cmd.env("OMP_NUM_THREADS", (cores / per_node).max(1).to_string());
            }
            trace_env(&mut cmd, opts);
            fleet.spawn(&name, cmd, &logs)?;
            policy_addrs.push((name, p_addr));
        }
    }

    let mut rollouts = Vec::new();
    if plan.kind == RunKind::Nft {
        let mut addrs = Vec::new();
        // Attached rollout workers already know their gateway.
        let gw_addr = if opts.attach_rollouts.is_empty() {
            start_rewards(&fleet, opts, plan, placement, &logs).await?
        } else {
            String::new()
        };
        for (rank, addr) in opts.attach_rollouts.iter().enumerate() {
            addrs.push((format!("rollout-worker-{rank}"), addr.clone()));
        }
        let spawned = if opts.attach_rollouts.is_empty() {
            plan.rollout_workers
        } else {
            0
        };
        for rank in 0..spawned {
            let name = format!("rollout-worker-{rank}");
            let node = placement.node_of(rank, plan.rollout_workers);
            let (listen, r_addr) = placement.server_addr(node, free_port()?);
            let dev = &plan.devices[rank % plan.devices.len()];
            let mut cmd = placement.command(node, &name, &bin("rollout-worker")?);
            cmd.arg("--config")
                .arg(&opts.config_path)
                .args([
                    "--listen",
                    &listen,
                    "--rank",
                    &rank.to_string(),
                    "--device",
                    dev,
                ])
                .args([
                    "--gateway",
                    &format!("http://{gw_addr}"),
                    "--run-id",
                    run_id,
                ])
                .current_dir(&opts.base_dir);
            trace_env(&mut cmd, opts);
            fleet.spawn(&name, cmd, &logs)?;
            addrs.push((name, r_addr));
        }
        for (name, r_addr) in addrs {
            wait_for_port(&fleet, &name, &r_addr, load).await?;
            let rollout = RolloutWorkerClient::new(channel(&r_addr).await?)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            let h = wait_healthy(&fleet, &name, load, || {
                let mut r = rollout.clone();
                async move { r.health(HealthRequest {}).await }
            })
            .await?;
            tracing::info!(name, pid = h.pid, device = %h.device, "rollout worker ready");
            rollouts.push((name, rollout));
        }
    }

    let mut policies = Vec::new();
    for (name, p_addr) in policy_addrs {
        wait_for_port(&fleet, &name, &p_addr, load).await?;
        let policy = PolicyWorkerClient::new(channel(&p_addr).await?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let h = wait_healthy(&fleet, &name, load, || {
            let mut p = policy.clone();
            async move { p.health(HealthRequest {}).await }
        })
        .await?;
        tracing::info!(name, pid = h.pid, device = %h.device, "policy worker ready");
        policies.push((name, policy));
    }
    std::fs::write(
        run_dir.join("workers.json"),
        serde_json::to_string_pretty(&fleet.describe())?,
    )?;
    Ok(Job {
        fleet,
        policies,
        rollouts,
    })
}

/// The reward service (embedded unless REMOTE_REWARD_* point elsewhere) and the
/// gateway in front of it; returns the gateway's address.
async fn start_rewards(
    fleet: &Fleet,
    opts: &RunOptions,
    plan: &Plan,
    placement: &Placement,
    logs: &Path,
) -> anyhow::Result<String> {
    let (enqueue, fetch) = match &plan.rewards {
        RewardSetup::External { enqueue, fetch } => (enqueue.clone(), fetch.clone()),
        RewardSetup::Embedded => {
            let addr = spawn_listening(fleet, "reward-service", logs, |port| {
                let mut cmd = Command::new(bin("reward-service")?);
                cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()]);
                Ok((cmd, format!("127.0.0.1:{port}")))
            })
            .await?;
            (
                format!("http://{addr}/api/reward/enqueue"),
                format!("http://{addr}/api/reward/pull"),
            )
        }
    };
    // On the controller's node; rollout workers on other nodes reach it there.
    spawn_listening(fleet, "reward-gateway", logs, |port| {
        let (listen, gw_addr) = placement.local_server_addr(port);
        let mut cmd = Command::new(bin("reward-gateway")?);
        cmd.arg("--config")
            .arg(&opts.config_path)
            .args(["--listen", &listen])
            .env("REMOTE_REWARD_ENQUEUE_URL", &enqueue)
            .env("REMOTE_REWARD_FETCH_URL", &fetch);
        Ok((cmd, gw_addr))
    })
    .await
}

/// Starts a server on a free port (`make(port)` gives its command and the
/// address to reach it at) and waits until it listens. A port free when probed
/// can be taken by another process before ours binds it, so a start that dies
/// is retried on another port, three times in all.
async fn spawn_listening(
    fleet: &Fleet,
    name: &str,
    logs: &Path,
    make: impl Fn(u16) -> anyhow::Result<(Command, String)>,
) -> anyhow::Result<String> {
    let mut attempt = 1;
    loop {
        let (cmd, addr) = make(free_port()?)?;
        fleet.spawn(name, cmd, logs)?;
        match wait_for_port(fleet, name, &addr, Duration::from_secs(60)).await {
            Ok(()) => return Ok(addr),
            Err(e) if attempt < 3 && fleet.forget_exited(name) => {
                tracing::warn!(name, attempt, "did not start, trying another port: {e:#}");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Heartbeats: every `every`, each worker's Health; `misses` failures in a row
/// (no answer within `every`) report it as unresponsive, which stops the run.
fn start_heartbeats(job: &Job, every: Duration, misses: u32) {
    let fleet = job.fleet.clone();
    let policies = job.policies.clone();
    let rollouts = job.rollouts.clone();
    tokio::spawn(async move {
        let mut missed = vec![0u32; policies.len() + rollouts.len()];
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let mut answers = Vec::with_capacity(missed.len());
            for (name, p) in &policies {
                let mut p = p.clone();
                let a = tokio::time::timeout(every, p.health(HealthRequest {})).await;
                answers.push((name.clone(), a.map(|r| r.map(|_| ()))));
            }
            for (name, r) in &rollouts {
                let mut r = r.clone();
                let a = tokio::time::timeout(every, r.health(HealthRequest {})).await;
                answers.push((name.clone(), a.map(|r| r.map(|_| ()))));
            }
            for (i, (name, answer)) in answers.into_iter().enumerate() {
                let why = match answer {
                    Ok(Ok(())) => {
                        missed[i] = 0;
                        continue;
                    }
                    Err(_) => format!("no answer in {every:?}, {misses} times"),
                    Ok(Err(s)) => s.message().to_string(),
                };
                missed[i] += 1;
                if missed[i] >= misses {
                    fleet.mark_unresponsive(&name, &why);
                    return;
                }
            }
        }
    });
}

/// Awaits `fut`, failing at once (naming the process) if a worker dies meanwhile.
async fn guarded<T>(
    fleet: &Fleet,
    what: &str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            r = &mut fut => {
                return match r {
                    Ok(r) => Ok(r.into_inner()),
                    Err(s) => {
                        // A dead worker explains a broken call better than the call does.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        if let Some(dead) = fleet.dead() {
                            bail!("{what}: a worker died: {dead}");
                        }
                        bail!("{what}: {} ({:?})", s.message(), s.code())
                    }
                };
            }
            _ = tick.tick() => {
                if let Some(dead) = fleet.dead() {
                    bail!("{what}: a worker died: {dead}");
                }
            }
        }
    }
}

/// Sends the same call to every policy rank (they step together, exchanging
/// gradients) and returns rank 0's answer. A rank that dies fails every call
/// at once, naming it.
async fn all_policies<T, F, Fut>(job: &Job, what: &str, call: F) -> anyhow::Result<T>
where
    F: Fn(PolicyWorkerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut answers = each_policy(job, what, call).await?.into_iter();
    answers.next().context("no policy worker")
}

/// Every policy rank's answer to the same call, in rank order. The first
/// failure ends the wait: the other ranks may be blocked in a collective with
/// the failed one, and the run is stopping anyway.
async fn each_policy<T, F, Fut>(job: &Job, what: &str, call: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(PolicyWorkerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let calls = job.policies.iter().map(|(name, p)| {
        let fut = call(p.clone());
        let what = if job.policies.len() > 1 {
            format!("{what} ({name})")
        } else {
            what.to_string()
        };
        async move { guarded(&job.fleet, &what, fut).await }
    });
    futures::future::try_join_all(calls).await
}

/// The policy rank that answers for all (weights, checkpoints: every rank holds the same).
fn policy0(job: &Job) -> PolicyWorkerClient<Channel> {
    job.policies[0].1.clone()
}

/// Asks the policy worker for a checkpoint holding `state` (and an export).
async fn checkpoint(
    job: &mut Job,
    state: &ControllerState,
    export: bool,
    wait: bool,
) -> anyhow::Result<CheckpointReply> {
    let step = state.step;
    // All ranks: sharded (FSDP) ranks gather the weights together; rank 0 writes.
    let request = CheckpointRequest {
        step,
        controller_state_json: serde_json::to_string(state)?,
        export,
        wait,
    };
    all_policies(job, &format!("step {step}: checkpoint"), |mut p| {
        let request = request.clone();
        async move { p.checkpoint(request).await }
    })
    .await
}

/// Pushes the policy's "old" adapter to the rollout worker.
async fn sync_weights(job: &mut Job) -> anyhow::Result<u64> {
    push_weights(job, "old").await
}

/// Pushes weights `which` ("old", or "ema" for validation) into the rollout
/// worker's sampling adapter; returns their version.
async fn push_weights(job: &mut Job, which: &str) -> anyhow::Result<u64> {
    let mut stream = guarded(
        &job.fleet,
        "fetching the rollout adapter",
        policy0(job).get_weights(WeightsRequest {
            which: which.into(),
        }),
    )
    .await?;
    let mut chunks = Vec::new();
    while let Some(c) = stream.message().await? {
        chunks.push(c);
    }
    let version = chunks
        .last()
        .map(|c| c.version)
        .context("the policy sent no weights")?;
    // Every rollout worker gets the same version before the next rollout.
    let loads = job.rollouts.iter().map(|(name, r)| {
        let mut r = r.clone();
        let chunks = chunks.clone();
        let fleet = job.fleet.clone();
        async move {
            let what = format!("loading the rollout adapter into {name}");
            guarded(&fleet, &what, r.load_weights(futures::stream::iter(chunks))).await
        }
    });
    futures::future::try_join_all(loads).await?;
    Ok(version)
}

fn prompt_batch(
    step: u64,
    seed: u64,
    version: u64,
    items: &[(usize, sana::data::prompts::PromptItem)],
    g: usize,
    validation: bool,
    images: u32,
) -> PromptBatch {
    PromptBatch {
        step,
        prompts: items
            .iter()
            .map(|(i, p)| Prompt {
                index: *i as u64,
                text: p.text.clone(),
                metadata_json: if p.metadata.is_empty() {
                    String::new()
                } else {
                    serde_json::Value::Object(p.metadata.clone()).to_string()
                },
            })
            .collect(),
        n_generation: g as u32,
        seed,
        weight_version: version,
        validation,
        return_images: images,
    }
}

/// Spreads a prompt batch over the rollout workers (whole prompts, so each
/// group of generations stays on one worker and its advantages are the same),
/// and joins their trajectories back in prompt order. Sample noise depends only
/// on (seed, step, prompt, generation), not on the split. A worker much slower
/// than the others is named in the log.
async fn rollout_all(job: &Job, batch: PromptBatch, what: &str) -> anyhow::Result<Trajectories> {
    let k = job.rollouts.len().min(batch.prompts.len()).max(1);
    if job.rollouts.is_empty() {
        bail!("{what}: no rollout worker");
    }
    let per = batch.prompts.len().div_ceil(k);
    let calls = batch
        .prompts
        .chunks(per)
        .zip(&job.rollouts)
        .map(|(chunk, (name, r))| {
            let mut r = r.clone();
            let fleet = job.fleet.clone();
            let part = PromptBatch {
                prompts: chunk.to_vec(),
                ..batch.clone()
            };
            let what = format!("{what} on {name}");
            async move { guarded(&fleet, &what, r.generate(part)).await }
        });
    let parts = futures::future::try_join_all(calls).await?;
    if parts.len() > 1 {
        let secs: Vec<f64> = parts.iter().map(|p| p.sample_seconds).collect();
        let (lo, hi) = secs
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        if hi > 1.5 * lo {
            let slowest = secs.iter().position(|&x| x == hi).unwrap_or(0);
            tracing::warn!(
                worker = %job.rollouts[slowest].0,
                seconds = hi,
                fastest = lo,
                "{what}: a straggling rollout worker"
            );
        }
    }
    Ok(merge_trajectories(parts, batch.return_images as i64))
}

/// Concatenates trajectories along the sample dimension (C-order bytes, so
/// concatenating the data of equal-shaped rows is concatenating the tensors).
fn merge_trajectories(mut parts: Vec<Trajectories>, max_images: i64) -> Trajectories {
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    let n: usize = parts.iter().map(|p| p.scores.len()).sum();
    let mut out = Trajectories {
        step: parts[0].step,
        weight_version: parts[0].weight_version,
        sample_seconds: parts.iter().map(|p| p.sample_seconds).fold(0.0, f64::max),
        reward_seconds: parts.iter().map(|p| p.reward_seconds).fold(0.0, f64::max),
        ..Default::default()
    };
    for p in &parts {
        let w = p.scores.len() as f64 / n.max(1) as f64;
        for (key, v) in &p.raw_score_means {
            *out.raw_score_means.entry(key.clone()).or_default() += v * w;
        }
    }
    let cat = |list: Vec<&TensorData>| {
        let mut t = list[0].clone();
        for x in &list[1..] {
            t.shape[0] += x.shape[0];
            t.data.extend_from_slice(&x.data);
        }
        t
    };
    for (i, first) in parts[0].tensors.iter().enumerate() {
        let same: Vec<&TensorData> = parts.iter().filter_map(|p| p.tensors.get(i)).collect();
        debug_assert!(same.iter().all(|t| t.name == first.name));
        out.tensors.push(cat(same));
    }
    let images: Vec<&TensorData> = parts.iter().filter_map(|p| p.images.as_ref()).collect();
    if !images.is_empty() {
        let mut all = cat(images);
        let rows = all.shape[0].min(max_images);
        let row_bytes = all.data.len() / all.shape[0].max(1) as usize;
        all.data.truncate(rows as usize * row_bytes);
        all.shape[0] = rows;
        out.images = Some(all);
    }
    for p in parts {
        out.scores.extend(p.scores);
    }
    out
}

fn train_batch(step: u64, t: &Trajectories) -> TrainBatch {
    let adv: Vec<f32> = t.scores.iter().map(|s| s.advantage).collect();
    let mut tensors = t.tensors.clone();
    tensors.push(TensorData {
        name: "advantages".into(),
        dtype: "float32".into(),
        shape: vec![adv.len() as i64],
        data: adv.iter().flat_map(|a| a.to_le_bytes()).collect(),
    });
    TrainBatch { step, tensors }
}

/// Runs a DiffusionNFT or SFT job to its end (or Ctrl-C, or a worker's death).
pub async fn run(opts: RunOptions, cfg: RunConfig, mut plan: Plan) -> anyhow::Result<()> {
    if let Err(e) = &plan.model_dir {
        bail!("{e}");
    }
    let run_dir = opts
        .run_dir
        .clone()
        .unwrap_or_else(|| run_dir(&cfg, &opts.base_dir));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    std::fs::copy(&opts.config_path, run_dir.join("config.toml")).ok();
    let (prompts, val_prompts) = if plan.kind == RunKind::Nft {
        plan::ensure_prompts(&cfg, &opts.base_dir, false).await?;
        if cfg.validation.enable {
            plan::ensure_prompts(&cfg, &opts.base_dir, true).await?;
        }
        if plan.dataset.is_none() {
            // Downloaded just now: plan again, with the set's size.
            let not_supported = std::mem::take(&mut plan.not_supported);
            plan = Plan::new(
                &cfg,
                &plan.config_path,
                &opts.base_dir,
                plan.devices.clone(),
            )?;
            plan.not_supported = not_supported;
        }
        let p = load_prompts(&cfg, &opts.base_dir, false)?;
        let v = if cfg.validation.enable {
            Some(load_prompts(&cfg, &opts.base_dir, true)?)
        } else {
            None
        };
        (Some(p), v)
    } else {
        (None, None)
    };
    let run_id = format!("{}-{}", chrono_stamp(), std::process::id());
    eprintln!("run directory {}", run_dir.display());
    if let Some(line) = plan.not_supported_line() {
        tracing::warn!("{line}");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!(
                "\nCtrl-C: finishing this step, then a final checkpoint (Ctrl-C again to abort)"
            );
            stop2.store(true, Ordering::SeqCst);
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("aborting");
                std::process::exit(130);
            }
        }
    });

    let placement = Placement::detect(opts.launcher)?;
    eprintln!("workers: {}", placement.describe());
    if placement.nodes() > 1 && plan.devices.iter().any(|d| d != "cpu") {
        // The plan counted this node's GPUs; the allocation has as many on each node.
        let all = plan.devices.len() * placement.nodes();
        let dp = cfg.policy.parallelism.dp_world(all as i64).max(1) as usize;
        plan.policy_workers = dp.min(all);
    }
    let mut cfg = cfg;
    let mut restarts = 0;
    loop {
        let result = run_once(
            &opts,
            &cfg,
            &plan,
            &placement,
            &run_dir,
            &run_id,
            &prompts,
            &val_prompts,
            &stop,
        )
        .await;
        match result {
            Err(e) if restarts < opts.max_restarts && !stop.load(Ordering::SeqCst) => {
                restarts += 1;
                eprintln!(
                    "error: {e:#}\nrestart {restarts} of {}: relaunching the workers and resuming from the last checkpoint",
                    opts.max_restarts
                );
                tracing::warn!(restarts, error = %e, "relaunching the workers");
                cfg.train.resume = BoolOrString::Bool(true);
            }
            other => return other,
        }
    }
}

/// One launch of the workers and the step loop until it ends or fails; the
/// workers are stopped either way.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    opts: &RunOptions,
    cfg: &RunConfig,
    plan: &Plan,
    placement: &Placement,
    run_dir: &Path,
    run_id: &str,
    prompts: &Option<PromptDataset>,
    val_prompts: &Option<PromptDataset>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    // A launch that fails half way stops what it started before the error goes up
    // (a restart must not find the old workers holding devices and ports).
    let fleet = Fleet::default();
    let mut job = match launch(fleet.clone(), opts, plan, placement, run_dir, run_id).await {
        Ok(job) => job,
        Err(e) => {
            fleet.stop_all(Duration::from_secs(20));
            return Err(e);
        }
    };
    // A worker that is alive but stuck (a hung device, SIGSTOP) is caught here.
    // SANA_RL_HEARTBEAT_SECS: the period (default 5 s); six misses in a row stop the run.
    let beat = std::env::var("SANA_RL_HEARTBEAT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0f64);
    start_heartbeats(&job, Duration::from_secs_f64(beat), 6);
    let result = match prompts {
        Some(p) => {
            let vp = val_prompts.as_ref();
            step_loop(opts, cfg, plan, &mut job, run_dir, p, vp, stop).await
        }
        None => sft_loop(opts, cfg, plan, &mut job, run_dir, stop).await,
    }
        .with_context(|| {
            format!(
                "the run stopped; its checkpoints are under {}: set train.resume = true to continue from the last one",
                run_dir.join("checkpoints").display()
            )
        });
    // Shut down in order: workers (they finish their checkpoint writes), then the reward side.
    for (name, _) in &job.policies {
        job.fleet.expect_exit(name);
    }
    for (name, _) in &job.rollouts {
        job.fleet.expect_exit(name);
    }
    let ok = result.is_ok();
    let reason = if ok { "run finished" } else { "run failed" };
    let byes = job.policies.iter().map(|(_, p)| {
        let mut p = p.clone();
        async move {
            let bye = p.shutdown(ShutdownRequest {
                reason: reason.into(),
            });
            // A failed run's ranks may be stuck waiting for a dead peer: don't wait long.
            let patience = Duration::from_secs(if ok { 60 } else { 5 });
            let _ = tokio::time::timeout(patience, bye).await;
        }
    });
    futures::future::join_all(byes).await;
    for (_, r) in job.rollouts.iter_mut() {
        let bye = r.shutdown(ShutdownRequest {
            reason: reason.into(),
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), bye).await;
    }
    job.fleet.stop_all(Duration::from_secs(20));
    result
}

#[allow(clippy::too_many_arguments)]
async fn step_loop(
    opts: &RunOptions,
    cfg: &RunConfig,
    plan: &Plan,
    job: &mut Job,
    run_dir: &Path,
    prompts: &PromptDataset,
    val_prompts: Option<&PromptDataset>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let seed = cfg.seed();
    let mut state = resume_state(cfg, job, run_dir).await?;
    let last = opts
        .max_steps
        .map_or(plan.total_steps, |m| (state.step + m).min(plan.total_steps));
    let mut log = RunLog::open(
        run_dir,
        state.step,
        last,
        cfg.logging.multi_modal_log_interval,
    )?;
    let mut version = sync_weights(job).await?;
    let ckpt = &cfg.train.ckpt;
    let g = plan.n_generation;

    // Cosmos-RL's val_before_train: once at step 0, not again on a resume.
    if let (Some(vp), true) = (
        val_prompts,
        state.step == 0 && validation_due(&cfg.validation, 0, last),
    ) {
        let span = tracing::info_span!(parent: &opts.trace_root, "validation", step = 0);
        version = validate(job, cfg, plan, vp, 0, &mut log)
            .instrument(span)
            .await?;
    }
    while state.step < last {
        let step = state.step + 1;
        let span = tracing::info_span!(parent: &opts.trace_root, "step", step, kind = "nft");
        let started = Instant::now();
        let items = state.cursor.take(
            prompts,
            cfg.train.train_policy.dataloader_seed ^ seed,
            plan.prompts_per_step,
        );
        // Cosmos-RL logs 15 rollouts; videos are heavier, so fewer of them.
        let images = match (log.wants_images(step), cfg.policy.diffusers.is_video) {
            (false, _) => 0,
            (true, false) => 15,
            (true, true) => 4,
        };
        let batch = prompt_batch(step, seed, version, &items, g, false, images);
        let traj = rollout_all(job, batch, &format!("step {step}: rollout"))
            .instrument(span.clone())
            .await?;
        let train_started = Instant::now();
        let request = train_batch(step, &traj);
        let result = all_policies(job, &format!("step {step}: policy update"), |mut p| {
            let request = request.clone();
            async move { p.train_nft(request).await }
        })
        .instrument(span.clone())
        .await?;
        let train_secs = train_started.elapsed().as_secs_f64();
        version = sync_weights(job).instrument(span.clone()).await?;
        state.step = step;
        log.step(
            step,
            &items,
            &traj,
            &result,
            train_secs,
            started.elapsed().as_secs_f64(),
        )?;

        if let (Some(vp), true) = (val_prompts, validation_due(&cfg.validation, step, last)) {
            version = validate(job, cfg, plan, vp, step, &mut log)
                .instrument(span.clone())
                .await?;
        }
        let stopping = stop.load(Ordering::SeqCst);
        let periodic = ckpt.enable_checkpoint && step % ckpt.save_freq.max(1) == 0;
        if periodic && step != last && !stopping {
            let export = ckpt.export_safetensors;
            checkpoint(job, &state, export, false)
                .instrument(span.clone())
                .await?;
        }
        if stopping {
            break;
        }
    }
    // The final checkpoint and export (also after Ctrl-C).
    let reply = checkpoint(job, &state, true, true).await?;
    log.finish(&reply)?;
    if stop.load(Ordering::SeqCst) {
        eprintln!(
            "stopped at step {} on Ctrl-C; continue with train.resume = true",
            state.step
        );
    }
    Ok(())
}

/// Whether NFT validation runs after `step` of a run ending at `last`; step 0
/// is before the first step (Cosmos-RL's `val_before_train`), asked only when
/// the run starts from scratch.
fn validation_due(v: &sana::config::ValidationSection, step: u64, last: u64) -> bool {
    v.enable
        && if step == 0 {
            v.val_before_train
        } else {
            step.is_multiple_of(v.freq.max(1)) || step == last
        }
}

/// Samples the first `validation.batch_size` validation prompts with the EMA
/// weights (as Cosmos-RL validates), scores and logs them at `step`, then
/// gives the rollout workers the "old" adapter back; returns its version.
async fn validate(
    job: &mut Job,
    cfg: &RunConfig,
    plan: &Plan,
    vp: &PromptDataset,
    step: u64,
    log: &mut RunLog,
) -> anyhow::Result<u64> {
    let n = cfg
        .validation
        .batch_size
        .unwrap_or(plan.prompts_per_step)
        .min(vp.len())
        .max(1);
    let items: Vec<_> = (0..n).map(|i| (i, vp.items[i].clone())).collect();
    let ema_version = push_weights(job, "ema").await?;
    let vg = cfg.validation.n_generation.max(1);
    let batch = prompt_batch(step, cfg.seed() ^ 0x5eed, ema_version, &items, vg, true, 0);
    let vt = rollout_all(job, batch, &format!("step {step}: validation")).await?;
    let version = sync_weights(job).await?;
    log.validation(step, &vt)?;
    Ok(version)
}

/// Asks the policy worker to restore its newest checkpoint (with `train.resume`);
/// returns the controller state saved with it.
async fn resume_state(
    cfg: &RunConfig,
    job: &mut Job,
    run_dir: &Path,
) -> anyhow::Result<ControllerState> {
    if matches!(cfg.train.resume, BoolOrString::Bool(false)) {
        return Ok(ControllerState::default());
    }
    let replies = each_policy(job, "resuming", |mut p| async move {
        p.resume(ResumeRequest {}).await
    })
    .await?;
    // Every rank must stand at the same step, or their updates would differ
    // (e.g. an output directory not shared between nodes).
    for (reply, (name, _)) in replies.iter().zip(&job.policies).skip(1) {
        if (reply.found, reply.step) != (replies[0].found, replies[0].step) {
            bail!(
                "{name} resumed {} but policy-worker-0 resumed {}: every rank must see \
                 the same checkpoints directory ({})",
                if reply.found {
                    format!("step {}", reply.step)
                } else {
                    "nothing".into()
                },
                if replies[0].found {
                    format!("step {}", replies[0].step)
                } else {
                    "nothing".into()
                },
                run_dir.join("checkpoints").display()
            );
        }
    }
    let r = replies.into_iter().next().context("no policy worker")?;
    for s in &r.skipped {
        eprintln!("warning: checkpoint not usable, passed over: {s}");
    }
    if r.found {
        eprintln!("resumed from {} (step {})", r.path, r.step);
        return serde_json::from_str(&r.controller_state_json)
            .with_context(|| format!("{}: controller state", r.path));
    }
    if let BoolOrString::Str(p) = &cfg.train.resume {
        bail!("train.resume = {p:?}: no checkpoint there");
    }
    eprintln!(
        "train.resume: no checkpoint yet under {}; starting fresh",
        run_dir.display()
    );
    Ok(ControllerState::default())
}

/// SFT: hands the policy worker batches of sample indices (a seeded shuffle per
/// epoch, whole batches only), logs the loss, checkpoints, exports.
async fn sft_loop(
    opts: &RunOptions,
    cfg: &RunConfig,
    plan: &Plan,
    job: &mut Job,
    run_dir: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let n = plan
        .dataset
        .as_ref()
        .map(|d| d.2)
        .context("the SFT folder is not readable")?;
    let batch = cfg.train.train_batch_per_replica.max(1);
    let per_epoch = n / batch;
    let seed = cfg.seed() ^ cfg.train.train_policy.dataloader_seed;
    let mut state = resume_state(cfg, job, run_dir).await?;
    let last = opts
        .max_steps
        .map_or(plan.total_steps, |m| (state.step + m).min(plan.total_steps));
    let mut log = RunLog::open(run_dir, state.step, last, None)?;
    let ckpt = &cfg.train.ckpt;
    while state.step < last {
        let step = state.step + 1;
        let span = tracing::info_span!(parent: &opts.trace_root, "step", step, kind = "sft");
        let started = Instant::now();
        if state.cursor.index + batch > per_epoch * batch {
            state.cursor.epoch += 1;
            state.cursor.index = 0;
        }
        let order = if cfg.train.train_policy.dataloader_shuffle {
            epoch_order(n, seed, state.cursor.epoch)
        } else {
            (0..n).collect()
        };
        let indices: Vec<u64> = order[state.cursor.index..state.cursor.index + batch]
            .iter()
            .map(|&i| i as u64)
            .collect();
        state.cursor.index += batch;
        let r = all_policies(job, &format!("step {step}: SFT update"), |mut p| {
            let request = SftBatch {
                step,
                indices: indices.clone(),
            };
            async move { p.train_sft(request).await }
        })
        .instrument(span.clone())
        .await?;
        state.step = step;
        log.sft_step(step, &r, batch, started.elapsed().as_secs_f64())?;
        let stopping = stop.load(Ordering::SeqCst);
        let periodic = ckpt.enable_checkpoint && step % ckpt.save_freq.max(1) == 0;
        if periodic && step != last && !stopping {
            let export = ckpt.export_safetensors;
            checkpoint(job, &state, export, false)
                .instrument(span.clone())
                .await?;
        }
        if stopping {
            break;
        }
    }
    let reply = checkpoint(job, &state, true, true).await?;
    log.finish(&reply)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_runs_every_freq_steps_the_last_and_before_the_first_when_asked() {
        let mut v = sana::config::ValidationSection {
            enable: true,
            freq: 2,
            ..Default::default()
        };
        let due = |v: &sana::config::ValidationSection| -> Vec<u64> {
            (0..=5).filter(|&s| validation_due(v, s, 5)).collect()
        };
        assert_eq!(due(&v), [2, 4, 5]);
        v.val_before_train = true;
        assert_eq!(due(&v), [0, 2, 4, 5]);
        v.enable = false;
        assert!(
            due(&v).is_empty(),
            "val_before_train needs validation.enable"
        );
    }
}
