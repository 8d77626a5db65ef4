//! Shared by the side-by-side benchmarks: settings from the environment, timing,
//! and running the Python (diffusers) peer.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// BENCH_THREADS (default: all cores), applied to libtorch here and passed to the peer.
pub fn threads() -> usize {
    let n = env_usize(
        "BENCH_THREADS",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    tch::set_num_threads(n as i32);
    n
}

/// Mean seconds per call after `warmup` untimed calls.
pub fn time_per_iter(warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    t0.elapsed().as_secs_f64() / iters as f64
}

/// BENCH_PYTHON, else the venv's python (scripts/env.sh exports VIRTUAL_ENV), else python3.
pub fn python() -> PathBuf {
    std::env::var("BENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::var_os("VIRTUAL_ENV")
                .map(|v| PathBuf::from(v).join("bin/python"))
                .unwrap_or_else(|| "python3".into())
        })
}

pub fn script(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// Runs a Python script and parses the last line of its stdout as JSON.
pub fn run_python_json(script_rel: &str, args: &[String]) -> anyhow::Result<serde_json::Value> {
    let py = python();
    let path = script(script_rel);
    let out = Command::new(&py).arg(&path).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{} {} failed: {}",
            py.display(),
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = out
        .stdout
        .split(|&c| c == b'\n')
        .rev()
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    Ok(serde_json::from_slice(last)?)
}
