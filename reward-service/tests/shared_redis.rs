//! Two service replicas on one external redis-server: either answers pulls for
//! the other's uuids, and work lost with a killed replica reads as "unknown"
//! (so a client enqueues again) instead of "pending" forever.

mod common;
use common::*;
use reward_service::redis_server::RedisServer;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn replicas_share_scores_and_report_lost_work() {
    let redis = RedisServer::start_tcp("redis-server", 0).unwrap();
    let port = match redis.addr() {
        reward_service::redis_server::RedisAddr::Tcp { port, .. } => *port,
        other => panic!("{other:?}"),
    };
    let cfg = format!(
        "redis_host = \"127.0.0.1\"\nredis_port = {port}\n[[reward_args]]\nreward_type = \"jpeg_incompressibility\"\n[[reward_args]]\nreward_type = \"command\"\nname = \"brightness\"\ncommand = [{:?}, {:?}]\n",
        python().display().to_string(),
        repo_root().join("scripts/reward/example_scorer.py").display().to_string(),
    );
    let mut a = ServiceProc::start(&cfg, None).await;
    let b = ServiceProc::start(&cfg, None).await;
    let c = http();

    let r = enqueue(
        &c,
        &a.url(),
        None,
        body(
            json!({"prompts": ["x", "y"], "reward_fn": {"jpeg_incompressibility": 1}, "media_type": "image"}),
            &[2, 32, 32, 3],
            &images(2, 32, 32, 3),
        ),
    )
    .await;
    let uuid = r.json::<Value>().await.unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let from_b = pull(
        &c,
        &b.url(),
        None,
        &uuid,
        "jpeg_incompressibility",
        Duration::from_secs(20),
    )
    .await;
    let from_a = pull(
        &c,
        &a.url(),
        None,
        &uuid,
        "jpeg_incompressibility",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(from_a, from_b);

    // Slow work on A, then A dies: B says pending while A's heartbeat lasts, then unknown.
    let r = enqueue(
        &c,
        &a.url(),
        None,
        body(
            json!({"prompts": ["x"], "reward_fn": {"brightness": 1}, "media_type": "image", "sleep_s": 30}),
            &[1, 8, 8, 3],
            &images(1, 8, 8, 3),
        ),
    )
    .await;
    let uuid = r.json::<Value>().await.unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, v) = pull_once(&c, &b.url(), None, &uuid, "brightness").await;
    assert_eq!((status, v["state"].as_str()), (400, Some("pending")), "{v}");
    a.kill();
    let start = Instant::now();
    loop {
        let (status, v) = pull_once(&c, &b.url(), None, &uuid, "brightness").await;
        assert_eq!(status, 400);
        if v["state"] == "unknown" {
            break;
        }
        assert_eq!(v["state"], "pending");
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still pending after the replica died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
