//! The tiny NFT demo as a Slurm batch job on a one-node cluster that the test
//! configures from Debian's slurm-wlm and munge (scripts/slurm_cluster.sh):
//! `sbatch deploy/slurm/sana-rl.sbatch`, 2 rollout workers and 2 policy ranks
//! started by the controller as srun steps, to completion, reward rising.

use e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Stops the test's cluster however the test ends.
struct Cluster {
    dir: PathBuf,
    conf: String,
}

impl Cluster {
    /// None (after a note) where Slurm is not installed, unless the test run
    /// requires it (SANA_SLURM_REQUIRED=1, as scripts/test.sh sets).
    fn start(dir: &Path) -> Option<Self> {
        let script = repo_root().join("scripts/slurm_cluster.sh");
        if Command::new("slurmctld").arg("-V").output().is_err() {
            assert!(
                std::env::var_os("SANA_SLURM_REQUIRED").is_none(),
                "slurm-wlm is not installed (scripts/env.sh installs it)"
            );
            eprintln!("note: slurm-wlm is not installed; skipping");
            return None;
        }
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "slurm_cluster.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(Self {
            dir: dir.to_path_buf(),
            conf,
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/slurm_cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn mean(v: &[serde_json::Value], key: &str) -> f64 {
    v.iter().map(|m| m[key].as_f64().unwrap()).sum::<f64>() / v.len() as f64
}

#[test]
fn the_demo_runs_as_an_sbatch_job_with_srun_workers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = Cluster::start(&dir.path().join("slurm")) else {
        return;
    };
    let out = dir.path().join("runs");
    let cfg = demo_config(
        dir.path(),
        &out,
        &[
            (
                "\n[policy.lora]\n",
                "\n[policy.parallelism]\ndp_shard_size = 2\n\n[policy.lora]\n",
            ),
            ("mini_batch = 16", "mini_batch = 8"),
            (
                "\n[train]\n",
                "\n[rollout.parallelism]\nn_init_replicas = 2\n\n[train]\n",
            ),
        ],
    );
    let job_out = dir.path().join("job.out");
    let bin_dir = bin("controller").parent().unwrap().to_path_buf();
    // A node that never takes the job must fail the test, not hang it.
    let res = Command::new("timeout")
        .args(["900", "sbatch", "--wait", "--time=15"])
        .arg(format!("--output={}", job_out.display()))
        .arg(format!("--chdir={}", repo_root().display()))
        .arg(repo_root().join("deploy/slurm/sana-rl.sbatch"))
        .arg(&cfg)
        .env("SLURM_CONF", &cluster.conf)
        .env("SANA_RL_BIN_DIR", &bin_dir)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&job_out).unwrap_or_default();
    assert!(
        res.status.success(),
        "sbatch: {}\n{}\njob output:\n{log}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(log.contains("srun steps on"), "{log}");
    let run = only_run_dir(&out);
    let workers = std::fs::read_to_string(run.join("workers.json")).unwrap();
    for name in [
        "policy-worker-0",
        "policy-worker-1",
        "rollout-worker-0",
        "rollout-worker-1",
    ] {
        assert!(workers.contains(name), "{name} missing: {workers}");
    }
    let m = metrics(&run);
    assert_eq!(m.len(), 20, "{log}");
    let (first, last) = (mean(&m[..5], "reward_mean"), mean(&m[15..], "reward_mean"));
    eprintln!("reward: first 5 steps {first:.5}, last 5 {last:.5}");
    assert!(last > first, "reward did not rise: {first} → {last}");
}
