//! Shared by the integration tests: the reward-service binary as a child
//! process on a loopback port, and small HTTP helpers.
#![allow(dead_code)]

use reward_service::body::encode_enqueue;
use reward_service::npy::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_reward-service");

/// A `reward-service` process, killed when dropped.
pub struct ServiceProc {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl ServiceProc {
    /// Start the binary with `config` (TOML; host/port are set here) and wait
    /// until it answers a ping.
    pub async fn start(config: &str, token: Option<&str>) -> ServiceProc {
        let port = reward_service::redis_server::free_port().unwrap();
        Self::start_on(config, token, port).await
    }

    pub async fn start_on(config: &str, token: Option<&str>, port: u16) -> ServiceProc {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rewards.toml");
        std::fs::write(
            &path,
            format!("host = \"127.0.0.1\"\nport = {port}\n{config}"),
        )
        .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&path)
            .env_remove("REWARD_SERVICE_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        die_with_test(&mut cmd);
        let child = cmd.spawn().unwrap();
        let mut p = ServiceProc { child, port, dir };
        p.wait_ready(token).await;
        p
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&mut self, token: Option<&str>) {
        let start = Instant::now();
        let client = http();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("reward-service exited during startup: {status}");
            }
            let mut req = client
                .post(format!("{}/api/reward/ping", self.url()))
                .form(&[("info_data", "{}")]);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Ok(r) = req.send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "reward-service not ready in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        self.kill();
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

/// An HTTP client. Built with the rest of the workspace, reqwest carries the
/// gateway's rustls (without a built-in crypto provider), so install ring's.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// An enqueue body for a uint8 array.
pub fn body(meta: Value, shape: &[usize], data: &[u8]) -> Vec<u8> {
    encode_enqueue(&meta, Dtype::U8, shape, data)
}

/// Smooth gradients plus per-item noise: realistic JPEG sizes that differ by item.
pub fn images(n: usize, h: usize, w: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(n * h * w * 3);
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let noise = ((state >> 33) % (16 * (i as u64 + 1) + 1)) as f64;
                    let base = match c {
                        0 => x as f64 * 255.0 / w as f64,
                        1 => y as f64 * 255.0 / h as f64,
                        _ => (x + y) as f64 * 127.0 / (w + h) as f64,
                    };
                    out.push((base + noise).clamp(0.0, 255.0) as u8);
                }
            }
        }
    }
    out
}

pub async fn enqueue(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut req = client
        .post(format!("{url}/api/reward/enqueue"))
        .header("Content-Type", "application/octet-stream")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

pub async fn pull_once(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    uuid: &str,
    kind: &str,
) -> (u16, Value) {
    let mut req = client
        .post(format!("{url}/api/reward/pull"))
        .form(&[("uuid", uuid), ("type", kind)]);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Poll until scores are ready (or panic after `limit`).
pub async fn pull(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    uuid: &str,
    kind: &str,
    limit: Duration,
) -> Value {
    let start = Instant::now();
    loop {
        let (status, v) = pull_once(client, url, token, uuid, kind).await;
        if status == 200 {
            return v;
        }
        assert_eq!(status, 400, "{v}");
        assert!(
            start.elapsed() < limit,
            "no scores for {uuid} in {limit:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The venv's python (scripts/env.sh exports VIRTUAL_ENV).
pub fn python() -> PathBuf {
    let venv = std::env::var("VIRTUAL_ENV").expect(
        "VIRTUAL_ENV is not set: run the tests through scripts/test.sh (or source scripts/env.sh)",
    );
    Path::new(&venv).join("bin/python")
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
