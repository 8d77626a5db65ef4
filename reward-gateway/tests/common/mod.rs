//! Processes for the gateway's end-to-end tests: a redis-server, the
//! reward-service binary and the reward-gateway binary, all on loopback.
#![allow(dead_code)]

use proto::reward::v1::{ScoreRequest, ScoreResult};
use reward_gateway::client::{image_request, GatewayClient};
use reward_service::redis_server::{free_port, RedisAddr, RedisServer};
use reward_service::rewards::jpeg::encode_like_pil;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_reward-gateway");
pub const MAX_MSG: usize = 256 << 20;

/// The reward-service binary, built alongside (scripts/test.sh builds the
/// whole workspace; `cargo build -p reward-service` does it by hand).
pub fn service_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/reward-service
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("reward-service");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (scripts/test.sh does) or `cargo build -p reward-service`",
        bin.display()
    );
    bin
}

pub fn python() -> PathBuf {
    let venv = std::env::var("VIRTUAL_ENV").expect(
        "VIRTUAL_ENV is not set: run the tests through scripts/test.sh (or source scripts/env.sh)",
    );
    Path::new(&venv).join("bin/python")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn redis() -> (RedisServer, u16) {
    let r = RedisServer::start_tcp("redis-server", 0).unwrap();
    let port = match r.addr() {
        RedisAddr::Tcp { port, .. } => *port,
        a => panic!("{a:?}"),
    };
    (r, port)
}

/// The reward-service with the jpeg rewards and, when `scorer`, the example
/// `brightness` scorer (which sleeps `sleep_s` per batch), on `port`.
pub fn start_service(dir: &Path, port: u16, workers: usize) -> Proc {
    let cfg = format!(
        "host = \"127.0.0.1\"\nport = {port}\nworkers = {workers}\n\
         [[reward_args]]\nreward_type = \"jpeg_compressibility\"\n\
         [[reward_args]]\nreward_type = \"jpeg_incompressibility\"\n\
         [[reward_args]]\nreward_type = \"command\"\nname = \"brightness\"\ncommand = [{:?}, {:?}]\n",
        python().display().to_string(),
        repo_root().join("scripts/reward/example_scorer.py").display().to_string(),
    );
    let path = dir.join(format!("service-{port}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new(service_bin());
    cmd.arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    die_with_test(&mut cmd);
    let child = cmd.spawn().unwrap();
    wait_port(port);
    Proc {
        child,
        name: "reward-service",
    }
}

pub const REWARDS: &str = r#"
[train.train_policy.remote_reward]
scale = 2.0
reward_clip_min = -1.0

[[train.train_policy.remote_reward.reward_fns]]
name = "jpeg_compressibility"
weight = 1.0

[[train.train_policy.remote_reward.reward_fns]]
name = "jpeg_incompressibility"
weight = 0.01
clip_max = 3.0

[[train.train_policy.remote_reward.reward_fns]]
name = "brightness"
weight = 0.5
"#;

pub fn start_gateway(
    dir: &Path,
    port: u16,
    service_port: u16,
    redis_port: u16,
    extra: &str,
) -> Proc {
    let cfg = format!(
        "[gateway]\nlisten = \"127.0.0.1:{port}\"\nredis_host = \"127.0.0.1\"\nredis_port = {redis_port}\n\
         poll_initial_ms = 20\npoll_max_ms = 200\nretry_initial_ms = 50\nretry_max_ms = 400\n\
         request_deadline_s = 240\n{extra}\n{REWARDS}"
    );
    let path = dir.join(format!("gateway-{port}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let url = format!("http://127.0.0.1:{service_port}/api/reward");
    let mut cmd = Command::new(GATEWAY_BIN);
    cmd.arg("--config")
        .arg(&path)
        .env("REMOTE_REWARD_ENQUEUE_URL", format!("{url}/enqueue"))
        .env("REMOTE_REWARD_FETCH_URL", format!("{url}/pull"))
        .env("REMOTE_REWARD_TOKEN", "")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    die_with_test(&mut cmd);
    let child = cmd.spawn().unwrap();
    wait_port(port);
    Proc {
        child,
        name: "reward-gateway",
    }
}

/// Stop the child if the test process is killed (e.g. by a test timeout).
pub fn die_with_test(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and only touches the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn wait_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nothing listening on {port} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn port() -> u16 {
    free_port().unwrap()
}

pub async fn client(port: u16) -> GatewayClient {
    let start = Instant::now();
    loop {
        match GatewayClient::connect(format!("http://127.0.0.1:{port}"), MAX_MSG).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "gateway unreachable: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub const H: usize = 48;
pub const W: usize = 40;

/// Request `k` of worker `w`: two prompts with two images each, distinct pixels.
pub fn request(w: usize, k: usize, sleep_s: f64) -> (ScoreRequest, Vec<u8>) {
    let seed = (w * 1000 + k) as u64;
    let data = pixels(4, seed);
    let mut r = image_request(
        format!("w{w}-r{k}"),
        &[
            (&format!("prompt {w}/{k}/a"), 2),
            (&format!("prompt {w}/{k}/b"), 2),
        ],
        [4, H as u64, W as u64, 3],
        data.clone(),
    );
    r.worker_id = format!("worker-{w}");
    r.step = k as u64;
    if sleep_s > 0.0 {
        r.extras_json = format!("{{\"sleep_s\": {sleep_s}}}");
    }
    (r, data)
}

fn pixels(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(n * H * W * 3);
    for i in 0..n {
        for y in 0..H {
            for x in 0..W {
                for c in 0..3 {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    let noise = (s % (8 + 24 * i as u64 + seed % 16)) as usize;
                    let base = [x * 255 / W, y * 255 / H, (x + y) * 2][c];
                    out.push((base + noise).min(255) as u8);
                }
            }
        }
    }
    out
}

/// The rewards computed directly (PIL-exact JPEG sizes and mean brightness,
/// combined as `REWARDS` says), in f64.
pub fn expected_rewards(data: &[u8]) -> Vec<f64> {
    let per = H * W * 3;
    data.chunks(per)
        .map(|img| {
            let kb = encode_like_pil(img, W, H, 3).unwrap().len() as f64 / 1000.0;
            let brightness = img.iter().map(|&v| v as f64).sum::<f64>() / per as f64 / 255.0;
            let total = -kb / 500.0 + kb.min(3.0) * 0.01 + brightness * 0.5;
            total.max(-1.0) * 2.0
        })
        .collect()
}

pub fn expected_advantages(r: &[f64]) -> Vec<f64> {
    let n = r.len() as f64;
    let mean = r.iter().sum::<f64>() / n;
    let std = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    r.iter().map(|x| (x - mean) / (std + 1e-4)).collect()
}

/// Every group's rewards and advantages equal direct computation.
pub fn check_result(res: &ScoreResult, data: &[u8]) {
    let want = expected_rewards(data);
    let got: Vec<f32> = res.groups.iter().flat_map(|g| g.rewards.clone()).collect();
    assert_eq!(got.len(), want.len(), "{}", res.request_id);
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (*g as f64 - w).abs() < 1e-5,
            "{}: rewards {got:?} vs direct {want:?}",
            res.request_id
        );
    }
    for (gi, grp) in res.groups.iter().enumerate() {
        let adv = expected_advantages(&want[gi * 2..gi * 2 + 2]);
        for (g, w) in grp.advantages.iter().zip(&adv) {
            assert!(
                (*g as f64 - w).abs() < 2e-3 * w.abs().max(1.0),
                "{}: advantages {:?} vs {adv:?}",
                res.request_id,
                grp.advantages
            );
        }
    }
    assert_eq!(
        res.raw_scores["jpeg_compressibility/jpeg_compressibility"]
            .values
            .len(),
        4
    );
}
