//! Load figures for the reward path, on this machine, over loopback.
//!
//! 1. Throughput: `--clients` concurrent Cosmos-style clients, each looping
//!    enqueue (a `--batch`×`--size`×`--size`×3 uint8 image batch, reward
//!    jpeg_compressibility) + pull until scored, for `--secs` after a warmup.
//! 2. Latency, one request at a time: straight to the reward-service, then
//!    through the reward-gateway (gRPC `Score`, batch flushed at once since one
//!    request fills it, Redis persistence on). The difference of the medians is
//!    the gateway's added latency.
//!
//! The reward-service, its embedded Redis, the gateway and the gateway's Redis
//! all run here (in this process or as redis-server children) unless
//! `--service-url` points at a running service.

use anyhow::Context;
use clap::Parser;
use reward_gateway::client::{image_request, GatewayClient};
use reward_service::body::encode_enqueue;
use reward_service::npy::Dtype;
use reward_service::redis_server::RedisServer;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Load figures for the reward path over loopback: enqueue+pull throughput of
/// the reward-service with concurrent clients, then single-request latency
/// direct and through the reward-gateway (its added latency).
///
/// Starts the service (embedded Redis) and a gateway (Redis persistence) in
/// this process unless --service-url is given. Build with --release.
#[derive(Parser, Debug)]
#[command(name = "reward-bench", version)]
struct Args {
    /// Seconds of the throughput phase (after a 2 s warmup).
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Concurrent clients in the throughput phase.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Images per request.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Image height and width.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Requests timed one at a time in each latency phase.
    #[arg(long, default_value_t = 30)]
    latency_iters: usize,
    /// Pull interval (ms) for the direct client and the gateway alike.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// Compute threads of the in-process reward-service (default: CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// Run the gateway without Redis persistence (to see what durability costs).
    #[arg(long)]
    gateway_in_memory: bool,
    /// Benchmark a running reward-service (http://host:port) instead of starting one.
    #[arg(long)]
    service_url: Option<String>,
}

/// Smooth gradients plus noise: JPEG sizes like generated images', not like pure noise.
fn make_batch(n: usize, size: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n * size * size * 3);
    for i in 0..n {
        for y in 0..size {
            for x in 0..size {
                for c in 0..3 {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    let base = [x * 255 / size, y * 255 / size, (x + y) * 127 / size][c];
                    out.push((base + (s % (4 + 4 * i as u64)) as usize).min(255) as u8);
                }
            }
        }
    }
    out
}

fn body(n: usize, size: usize, data: &[u8]) -> Vec<u8> {
    encode_enqueue(
        &json!({
            "prompts": (0..n).map(|i| format!("prompt {i}")).collect::<Vec<_>>(),
            "reward_fn": {"jpeg_compressibility": 1.0},
            "media_type": "image",
        }),
        Dtype::U8,
        &[n, size, size, 3],
        data,
    )
}

/// One Cosmos-style round trip: enqueue, then pull every `poll` until scored.
async fn round_trip(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    poll: Duration,
) -> anyhow::Result<()> {
    let r = http
        .post(format!("{url}/api/reward/enqueue"))
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(
        r.status() == 200,
        "enqueue: {} {}",
        r.status(),
        r.text().await?
    );
    let uuid = r.json::<Value>().await?["uuid"]
        .as_str()
        .context("no uuid")?
        .to_string();
    loop {
        let r = http
            .post(format!("{url}/api/reward/pull"))
            .form(&[("uuid", uuid.as_str()), ("type", "jpeg_compressibility")])
            .send()
            .await?;
        match r.status().as_u16() {
            200 => return Ok(()),
            400 => tokio::time::sleep(poll).await,
            s => anyhow::bail!("pull: {s} {}", r.text().await?),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&ms, 0.5),
        percentile(&ms, 0.95),
        ms.iter().sum::<f64>() / ms.len() as f64,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    reward_gateway::remote::install_tls_provider();
    let poll = Duration::from_millis(a.poll_ms);
    let mb = (a.batch * a.size * a.size * 3) as f64 / (1 << 20) as f64;

    let mut _service = None;
    let url = match &a.service_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let mut cfg = reward_service::Config::from_toml_str(
                "host = \"127.0.0.1\"\nport = 0\nmax_pending = 256\n[[reward_args]]\nreward_type = \"jpeg_compressibility\"\n",
            )?;
            cfg.workers = a.workers;
            let s = reward_service::RewardService::start(cfg).await?;
            let u = s.url();
            _service = Some(s);
            u
        }
    };
    let pool: Arc<Vec<Vec<u8>>> =
        Arc::new((0..4).map(|s| make_batch(a.batch, a.size, s)).collect());
    let http = reqwest::Client::new();
    println!(
        "reward-bench: {} images of {}x{}x3 per request ({mb:.1} MiB), reward jpeg_compressibility, service {url}, {} CPUs",
        a.batch,
        a.size,
        a.size,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    // 1. Throughput.
    let done = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let (http, url, pool, done, counting, stop) = (
            http.clone(),
            url.clone(),
            pool.clone(),
            done.clone(),
            counting.clone(),
            stop.clone(),
        );
        let (n, size) = (a.batch, a.size);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let b = body(n, size, &pool[i % pool.len()]);
                i += 1;
                let t = Instant::now();
                round_trip(&http, &url, b, poll).await?;
                if counting.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            anyhow::Ok(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    counting.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    stop.store(true, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    let n = done.load(Ordering::SeqCst);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let (p50, p95, _) = summary(lat);
    println!(
        "throughput: {:.2} enqueue+pull requests/s ({:.1} images/s, {:.1} MiB/s) with {} clients over {elapsed:.1} s; per-request latency p50 {p50:.1} ms, p95 {p95:.1} ms",
        n as f64 / elapsed,
        n as f64 * a.batch as f64 / elapsed,
        n as f64 * mb / elapsed,
        a.clients
    );

    // 2. Latency, direct.
    let mut direct = Vec::new();
    for i in 0..a.latency_iters + 2 {
        let b = body(a.batch, a.size, &pool[i % pool.len()]);
        let t = Instant::now();
        round_trip(&http, &url, b, poll).await?;
        if i >= 2 {
            direct.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (d50, d95, dmean) = summary(direct);
    println!("direct, one at a time: p50 {d50:.1} ms, p95 {d95:.1} ms, mean {dmean:.1} ms");

    // 3. Latency through the gateway (with Redis persistence, as deployed).
    let gw_redis = RedisServer::start_unix("redis-server")?;
    let mut gcfg = reward_gateway::Config::from_toml_str(&format!(
        "[gateway]\nmax_batch_items = {}\nmax_batch_wait_ms = 1000\npoll_initial_ms = {}\npoll_max_ms = {}\n\
         enqueue_url = \"{url}/api/reward/enqueue\"\nfetch_url = \"{url}/api/reward/pull\"\n\
         [[train.train_policy.remote_reward.reward_fns]]\nname = \"jpeg_compressibility\"\n",
        a.batch, a.poll_ms, a.poll_ms
    ))?;
    gcfg.gateway.token = Some(String::new());
    let remote = reward_gateway::remote::RemoteConfig::from_env(
        gcfg.gateway.enqueue_url.clone(),
        gcfg.gateway.fetch_url.clone(),
        gcfg.gateway.token.clone(),
    )?;
    let persist =
        reward_gateway::persist::Persist::redis(&gw_redis.url(), "bench:".into(), 600).await?;
    let engine = reward_gateway::Engine::start(
        gcfg,
        reward_gateway::remote::RemoteClient::new(remote)?,
        persist,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw_addr = listener.local_addr()?;
    let max_msg = 1 << 30;
    tokio::spawn(reward_gateway::grpc::serve(
        engine,
        listener,
        max_msg,
        std::future::pending(),
    ));
    let mut client = GatewayClient::connect(format!("http://{gw_addr}"), max_msg).await?;
    let mut via = Vec::new();
    for i in 0..a.latency_iters + 2 {
        let req = image_request(
            format!("bench-{i}"),
            &[("prompt", a.batch as u32)],
            [a.batch as u64, a.size as u64, a.size as u64, 3],
            pool[i % pool.len()].clone(),
        );
        let t = Instant::now();
        let r = client.score(req).await?;
        anyhow::ensure!(r.groups[0].rewards.len() == a.batch);
        if i >= 2 {
            via.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (g50, g95, gmean) = summary(via);
    println!(
        "via reward-gateway, one at a time: p50 {g50:.1} ms, p95 {g95:.1} ms, mean {gmean:.1} ms"
    );
    println!(
        "gateway added latency: {:.1} ms at the median ({:.1} ms mean), for a {mb:.1} MiB request",
        g50 - d50,
        gmean - dmean
    );
    Ok(())
}
