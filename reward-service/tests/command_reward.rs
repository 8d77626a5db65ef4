//! The `command` reward with scripts/reward/example_scorer.py: scores come
//! back, the scorer stays alive between batches, a crash or an error answer
//! is reported for that batch only and the next batch is scored.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn config() -> String {
    format!(
        "[[reward_args]]\nreward_type = \"command\"\nname = \"brightness\"\ncommand = [{:?}, {:?}]\ntimeout_s = 30\n",
        python().display().to_string(),
        repo_root().join("scripts/reward/example_scorer.py").display().to_string(),
    )
}

async fn score(c: &reqwest::Client, url: &str, prompts: &[&str], data: &[u8]) -> Value {
    let n = prompts.len();
    let b = body(
        json!({"prompts": prompts, "reward_fn": {"brightness": 1.0}, "media_type": "image"}),
        &[n, 8, 8, 3],
        data,
    );
    let r = enqueue(c, url, None, b).await;
    assert_eq!(r.status(), 200);
    let uuid = r.json::<Value>().await.unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    pull(c, url, None, &uuid, "brightness", Duration::from_secs(60)).await
}

#[tokio::test]
async fn a_kept_alive_scorer_process_scores_batches() {
    let svc = ServiceProc::start(&config(), None).await;
    let c = http();
    let url = svc.url();
    let data = images(2, 8, 8, 4);
    let want: Vec<f64> = data
        .chunks(8 * 8 * 3)
        .map(|c| c.iter().map(|&v| v as f64).sum::<f64>() / c.len() as f64 / 255.0)
        .collect();

    let v = score(&c, &url, &["a", "b"], &data).await;
    assert!(v.get("error").is_none(), "{v}");
    let got: Vec<f64> = serde_json::from_value(v["scores"]["brightness"].clone()).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
    }
    assert_eq!(v["scores"]["calls"], json!([1, 1]));
    assert_eq!(v["type"], "brightness");

    // The same process answers the next batch.
    let v = score(&c, &url, &["a", "b"], &data).await;
    assert_eq!(v["scores"]["calls"], json!([2, 2]));

    // An error answer fails that batch only; the process lives on.
    let v = score(&c, &url, &["error", "b"], &data).await;
    assert_eq!(v["scores"], Value::Null);
    assert!(
        v["error"].as_str().unwrap().contains("asked to fail"),
        "{v}"
    );
    let v = score(&c, &url, &["a", "b"], &data).await;
    assert_eq!(v["scores"]["calls"], json!([4, 4]));

    // A crash fails that batch; a fresh process takes the next one.
    let v = score(&c, &url, &["crash", "b"], &data).await;
    assert!(v["error"].as_str().unwrap().contains("exited"), "{v}");
    let v = score(&c, &url, &["a", "b"], &data).await;
    assert_eq!(v["scores"]["calls"], json!([1, 1]), "{v}");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let svc =
        ServiceProc::start(&format!("max_pending = 1\nworkers = 1\n{}", config()), None).await;
    let c = http();
    let slow = |p: &str| {
        body(
            json!({"prompts": [p], "reward_fn": {"brightness": 1.0}, "media_type": "image", "sleep_s": 2.0}),
            &[1, 8, 8, 3],
            &images(1, 8, 8, 5),
        )
    };
    let first = enqueue(&c, &svc.url(), None, slow("a")).await;
    assert_eq!(first.status(), 200);
    let second = enqueue(&c, &svc.url(), None, slow("b")).await;
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "1");
    let m: Value = second.json().await.unwrap();
    assert!(m["message"].as_str().unwrap().contains("queue full"), "{m}");
    // Once the first is scored there is room again.
    let uuid = first.json::<Value>().await.unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    pull(
        &c,
        &svc.url(),
        None,
        &uuid,
        "brightness",
        Duration::from_secs(30),
    )
    .await;
    let mut again = enqueue(&c, &svc.url(), None, slow("c")).await;
    for _ in 0..50 {
        if again.status() == 200 {
            break;
        }
        // The slot frees just after the scores are stored.
        tokio::time::sleep(Duration::from_millis(20)).await;
        again = enqueue(&c, &svc.url(), None, slow("c")).await;
    }
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn sigterm_finishes_queued_work_before_exiting() {
    let mut svc = ServiceProc::start(&format!("workers = 1\n{}", config()), None).await;
    let c = http();
    let url = svc.url();
    let mut uuids = Vec::new();
    for p in ["a", "b"] {
        let b = body(
            json!({"prompts": [p], "reward_fn": {"brightness": 1.0}, "media_type": "image", "sleep_s": 0.7}),
            &[1, 8, 8, 3],
            &images(1, 8, 8, 6),
        );
        let r = enqueue(&c, &url, None, b).await;
        assert_eq!(r.status(), 200);
        uuids.push(
            r.json::<Value>().await.unwrap()["uuid"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    svc.sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Draining: no new work, but pulls are answered until the queue is empty.
    let b = body(
        json!({"prompts": ["c"], "reward_fn": {"brightness": 1.0}, "media_type": "image"}),
        &[1, 8, 8, 3],
        &images(1, 8, 8, 6),
    );
    let r = enqueue(&c, &url, None, b).await;
    assert_eq!(r.status(), 503, "enqueue while draining");
    // Poll fast: the service exits soon after the last batch is scored.
    let mut got = Vec::new();
    for u in &uuids {
        let start = std::time::Instant::now();
        loop {
            let (status, v) = pull_once(&c, &url, None, u, "brightness").await;
            if status == 200 {
                got.push(v);
                break;
            }
            assert_eq!(v["state"], "pending", "{v}");
            assert!(start.elapsed() < Duration::from_secs(20));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(got.iter().all(|v| v["scores"]["brightness"].is_array()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = svc.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "did not exit after draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
