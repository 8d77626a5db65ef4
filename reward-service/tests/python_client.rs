//! A Python client written as Cosmos-RL's are (requests + numpy) gets correct
//! jpeg scores from the reward-service binary, with token auth on.

mod common;
use common::*;

#[tokio::test]
async fn python_client_gets_pil_exact_jpeg_scores() {
    let svc = ServiceProc::start(
        "token = \"s3cret\"\n[[reward_args]]\nreward_type = \"jpeg_compressibility\"\n[[reward_args]]\nreward_type = \"jpeg_incompressibility\"\n",
        Some("s3cret"),
    )
    .await;
    let script = repo_root().join("scripts/reward/client_test.py");
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .args(["--url", &svc.url(), "--token", "s3cret"])
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), out)
        .await
        .expect("client_test.py finished within 120 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client_test.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all scores match"), "{stdout}");
}
