//! The HTTP surface of the reward-service binary: auth, refusals with a
//! message for every kind of bad request (the service keeps serving after
//! them), size limits, pulls of unknown uuids, replica ids.

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

const JPEG: &str = "[[reward_args]]\nreward_type = \"jpeg_compressibility\"\n[[reward_args]]\nreward_type = \"jpeg_incompressibility\"\nenable = false\n";

fn good_body() -> Vec<u8> {
    body(
        json!({"prompts": ["a", "b"], "reward_fn": {"jpeg_compressibility": 1.0}, "media_type": "image"}),
        &[2, 16, 16, 3],
        &images(2, 16, 16, 9),
    )
}

#[tokio::test]
async fn wrong_or_missing_token_is_401_on_every_endpoint() {
    let svc = ServiceProc::start(&format!("token = \"right\"\n{JPEG}"), Some("right")).await;
    let c = http();
    let url = svc.url();
    for token in [None, Some("wrong"), Some("righ"), Some("right2")] {
        let r = enqueue(&c, &url, token, good_body()).await;
        assert_eq!(r.status(), 401, "enqueue with {token:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let m: serde_json::Value = r.json().await.unwrap();
        assert!(m["message"].as_str().unwrap().contains("token"), "{m}");
        let (status, _) = pull_once(&c, &url, token, "x", "jpeg_compressibility").await;
        assert_eq!(status, 401, "pull with {token:?}");
        let mut ping = c
            .post(format!("{url}/api/reward/ping"))
            .form(&[("info_data", "{}")]);
        if let Some(t) = token {
            ping = ping.bearer_auth(t);
        }
        assert_eq!(
            ping.send().await.unwrap().status(),
            401,
            "ping with {token:?}"
        );
    }
    // Not "Bearer": refused too.
    let r = c
        .post(format!("{url}/api/reward/ping"))
        .header("Authorization", "Basic right")
        .form(&[("info_data", "{}")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = enqueue(&c, &url, Some("right"), good_body()).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn bad_requests_get_4xx_with_a_message_and_the_service_keeps_serving() {
    let svc = ServiceProc::start(&format!("max_body_mb = 1\n{JPEG}"), None).await;
    let c = http();
    let url = svc.url();
    let img = images(2, 16, 16, 1);
    let meta = json!({"prompts": ["a", "b"], "reward_fn": {"jpeg_compressibility": 1.0}, "media_type": "image"});
    let good = body(meta.clone(), &[2, 16, 16, 3], &img);
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 10);
    let mut bad_json = good.clone();
    bad_json[0] = b'[';
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("truncated .npy", truncated, 400, "truncated .npy"),
        ("bad JSON", bad_json, 400, "not valid JSON"),
        (
            "no separator",
            b"{\"prompts\": []}".to_vec(),
            400,
            "no '\\n'",
        ),
        (
            "not a .npy",
            [&serde_json::to_vec(&meta).unwrap()[..], b"\nPK\x03\x04junk"].concat(),
            400,
            "missing the \\x93NUMPY magic",
        ),
        (
            "prompt count mismatch",
            body(
                json!({"prompts": ["a"], "reward_fn": {"jpeg_compressibility": 1.0}, "media_type": "image"}),
                &[2, 16, 16, 3],
                &img,
            ),
            400,
            "1 prompts for a batch of 2",
        ),
        (
            "shape mismatch (image sent as 5-D)",
            body(
                json!({"prompts": ["a", "b"], "reward_fn": {"jpeg_compressibility": 1.0}, "media_type": "image"}),
                &[2, 1, 16, 16, 3],
                &img,
            ),
            400,
            "image batch must be uint8 [B, H, W, C]",
        ),
        (
            "unknown reward",
            body(
                json!({"prompts": ["a", "b"], "reward_fn": {"pickscore": 1.0}, "media_type": "image"}),
                &[2, 16, 16, 3],
                &img,
            ),
            400,
            "reward \"pickscore\" is not enabled on this service (enabled: jpeg_compressibility)",
        ),
        (
            "disabled reward",
            body(
                json!({"prompts": ["a", "b"], "reward_fn": {"jpeg_incompressibility": 1.0}, "media_type": "image"}),
                &[2, 16, 16, 3],
                &img,
            ),
            400,
            "not enabled",
        ),
        (
            "four channels",
            body(
                json!({"prompts": ["a"], "reward_fn": {"jpeg_compressibility": 1.0}, "media_type": "image"}),
                &[1, 16, 8, 4],
                &img[..512],
            ),
            400,
            "1 (grayscale) or 3 (RGB) channels",
        ),
        (
            "latents to a pixel reward",
            reward_service::body::encode_enqueue(
                &json!({"prompts": ["a"], "reward_fn": {"jpeg_compressibility": 1.0}, "media_type": "latent"}),
                reward_service::npy::Dtype::F16,
                &[1, 4, 1, 4, 4],
                &[0u8; 128],
            ),
            400,
            "latent",
        ),
        ("over max_body_mb", vec![b'x'; 2 << 20], 413, "length limit"),
    ];
    for (what, b, status, want) in cases {
        let r = enqueue(&c, &url, None, b).await;
        assert_eq!(r.status().as_u16(), status, "{what}");
        let text = r.text().await.unwrap();
        let msg: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        let msg = msg["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(want),
            "{what}: {msg:?} should mention {want:?}"
        );
        // Still serving: a good request right after is scored.
        let r = enqueue(&c, &url, None, good.clone()).await;
        assert_eq!(r.status(), 200, "after {what}");
        let uuid = r.json::<serde_json::Value>().await.unwrap()["uuid"]
            .as_str()
            .unwrap()
            .to_string();
        let v = pull(
            &c,
            &url,
            None,
            &uuid,
            "jpeg_compressibility",
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(
            v["scores"]["jpeg_compressibility"]
                .as_array()
                .unwrap()
                .len(),
            2,
            "after {what}"
        );
    }
}

#[tokio::test]
async fn pulls_of_unknown_uuids_say_so() {
    let svc = ServiceProc::start(JPEG, None).await;
    let c = http();
    let (status, v) = pull_once(&c, &svc.url(), None, "no-such-uuid", "jpeg_compressibility").await;
    assert_eq!(status, 400);
    assert_eq!(v["message"], "Not found scores for no-such-uuid");
    assert_eq!(v["state"], "unknown");
    // A reward the request did not ask for.
    let r = enqueue(&c, &svc.url(), None, good_body()).await;
    let uuid = r.json::<serde_json::Value>().await.unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    pull(
        &c,
        &svc.url(),
        None,
        &uuid,
        "jpeg_compressibility",
        Duration::from_secs(20),
    )
    .await;
    let (status, _) = pull_once(&c, &svc.url(), None, &uuid, "jpeg_incompressibility").await;
    assert_eq!(status, 400);
    // Missing form fields.
    let r = c
        .post(format!("{}/api/reward/pull", svc.url()))
        .form(&[("uuid", uuid.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
}

#[tokio::test]
async fn replica_id_comes_back_with_the_uuid() {
    let svc = ServiceProc::start(&format!("replica_id = \"replica-7\"\n{JPEG}"), None).await;
    let c = http();
    let v: serde_json::Value = enqueue(&c, &svc.url(), None, good_body())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["replica_id"], "replica-7");
    let uuid = v["uuid"].as_str().unwrap();
    assert_eq!(uuid.len(), 36, "a uuid4: {uuid}");
    let r = c
        .post(format!("{}/api/reward/pull", svc.url()))
        .header("X-Lepton-Replica-Target", "replica-7")
        .form(&[("uuid", uuid), ("type", "jpeg_compressibility")])
        .send()
        .await
        .unwrap();
    assert!(r.status() == 200 || r.status() == 400);
}
