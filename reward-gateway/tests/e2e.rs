//! The gateway against the reward-service over loopback with real
//! redis-servers: 64 concurrent requests from 8 workers; the service killed
//! and restarted mid-run; the gateway killed and restarted mid-run. Every
//! request is answered exactly once, with scores equal to direct computation.

mod common;
use common::*;
use reward_gateway::persist::Persist;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const WORKERS: usize = 8;
const PER_WORKER: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_requests_from_eight_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, rport) = redis();
    let sport = port();
    let _svc = start_service(dir.path(), sport, 2);
    let gport = port();
    let _gw = start_gateway(
        dir.path(),
        gport,
        sport,
        rport,
        "max_batch_items = 16\nmax_batch_wait_ms = 30",
    );

    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        workers.push(tokio::spawn(async move {
            let client = client(gport).await;
            let mut calls = Vec::new();
            for k in 0..PER_WORKER {
                // One channel per worker, requests multiplexed on it concurrently.
                let mut c = client_clone(&client);
                calls.push(tokio::spawn(async move {
                    let (req, data) = request(w, k, 0.0);
                    let res = c.score(req).await.unwrap();
                    (res, data)
                }));
            }
            let mut out = Vec::new();
            for c in calls {
                out.push(c.await.unwrap());
            }
            out
        }));
    }
    let mut ids = HashSet::new();
    let mut uuids = HashSet::new();
    for w in workers {
        for (res, data) in tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .unwrap()
            .unwrap()
        {
            check_result(&res, &data);
            assert!(
                ids.insert(res.request_id.clone()),
                "{} answered twice",
                res.request_id
            );
            assert_eq!(res.enqueue_attempts, 1);
            uuids.insert(res.remote_uuid.clone());
        }
    }
    assert_eq!(ids.len(), WORKERS * PER_WORKER);
    // 64 requests of 4 items in batches of up to 16 items: coalesced.
    assert!(
        uuids.len() < ids.len(),
        "no batching: {} enqueues for {} requests",
        uuids.len(),
        ids.len()
    );
    eprintln!(
        "64 requests answered in {:?} with {} enqueues",
        start.elapsed(),
        uuids.len()
    );
}

fn client_clone(
    c: &reward_gateway::client::GatewayClient,
) -> reward_gateway::client::GatewayClient {
    c.clone()
}

/// Submit every request (8 workers in parallel); returns id -> pixels.
async fn submit_all(
    gport: u16,
    sleep_s: f64,
    range: std::ops::Range<usize>,
) -> HashMap<String, Vec<u8>> {
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client(gport).await;
            let mut out = Vec::new();
            for k in range {
                let (req, data) = request(w, k, sleep_s);
                let id = c.submit(req).await.unwrap();
                out.push((id, data));
            }
            out
        }));
    }
    let mut all = HashMap::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Fetch every answer, riding out a gateway that is down or restarting.
async fn fetch_all(
    gport: u16,
    ids: &HashMap<String, Vec<u8>>,
    limit: Duration,
) -> HashMap<String, proto::reward::v1::ScoreResult> {
    let start = Instant::now();
    let mut got = HashMap::new();
    while got.len() < ids.len() {
        assert!(
            start.elapsed() < limit,
            "{} of {} answered after {limit:?}",
            got.len(),
            ids.len()
        );
        let Ok(mut c) = reward_gateway::client::GatewayClient::connect(
            format!("http://127.0.0.1:{gport}"),
            MAX_MSG,
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        for id in ids.keys() {
            if got.contains_key(id) {
                continue;
            }
            match c.fetch(id, Duration::from_millis(200)).await {
                Ok(Some(r)) => {
                    assert_eq!(&r.request_id, id);
                    got.insert(id.clone(), r);
                }
                Ok(None) => {}
                Err(e)
                    if e.code() == tonic::Code::Unavailable || e.code() == tonic::Code::Unknown =>
                {
                    break
                }
                Err(e) => panic!("fetch {id}: {e}"),
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_killed_and_restarted_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, rport) = redis();
    let sport = port();
    // One worker and a slow scorer: batches queue up inside the service.
    let mut svc = start_service(dir.path(), sport, 1);
    let gport = port();
    let _gw = start_gateway(
        dir.path(),
        gport,
        sport,
        rport,
        "max_batch_items = 16\nmax_batch_wait_ms = 30",
    );
    let ids = submit_all(gport, 0.15, 0..PER_WORKER).await;
    assert_eq!(ids.len(), 64);

    // Let some batches finish, then kill the service with the rest in its queue.
    tokio::time::sleep(Duration::from_millis(900)).await;
    svc.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _svc = start_service(dir.path(), sport, 2);

    let got = fetch_all(gport, &ids, Duration::from_secs(180)).await;
    assert_eq!(got.len(), 64);
    let mut reenqueued = 0;
    for (id, res) in &got {
        check_result(res, &ids[id]);
        if res.enqueue_attempts > 1 {
            reenqueued += 1;
        }
    }
    assert!(
        reenqueued > 0,
        "the kill hit no batch in flight: nothing was enqueued again"
    );
    let p = Persist::redis(
        &format!("redis://127.0.0.1:{rport}/"),
        "sana-rl:gateway:".into(),
        60,
    )
    .await
    .unwrap();
    assert_eq!(p.pending_count().await.unwrap(), 0, "requests left pending");
    eprintln!("{reenqueued} of 64 requests were enqueued again after the service restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_killed_and_restarted_resumes_pending_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, rport) = redis();
    let sport = port();
    let _svc = start_service(dir.path(), sport, 1);
    let gport = port();
    // 100 items = 25 requests: full batches leave at once, the rest wait 1 s.
    let cfg = "max_batch_items = 100\nmax_batch_wait_ms = 1000";
    let mut gw = start_gateway(dir.path(), gport, sport, rport, cfg);
    let persist = Persist::redis(
        &format!("redis://127.0.0.1:{rport}/"),
        "sana-rl:gateway:".into(),
        60,
    )
    .await
    .unwrap();

    // First half: enqueued to the service (1 s a batch) before the kill...
    let mut ids = submit_all(gport, 1.0, 0..PER_WORKER / 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ...second half: one full batch enqueued, the rest still in the batcher.
    ids.extend(submit_all(gport, 1.0, PER_WORKER / 2..PER_WORKER).await);
    gw.kill();
    let pending = persist.pending_count().await.unwrap();
    // What the dead gateway left: batches already enqueued (a service uuid
    // recorded), and requests not batched yet. Both must resume.
    let left = persist.recover().await.unwrap();
    let enqueued: usize = left
        .batches
        .iter()
        .filter(|b| b.1.uuid.is_some())
        .map(|b| b.1.members.len())
        .sum();
    let loose = left.loose.len();
    eprintln!("{pending} of 64 requests pending at the kill: {enqueued} in enqueued batches, {loose} not batched");
    assert!(enqueued > 0, "no enqueued batch was pending at the kill");
    assert!(loose > 0, "no unbatched request was pending at the kill");

    let _gw = start_gateway(dir.path(), gport, sport, rport, cfg);
    let got = fetch_all(gport, &ids, Duration::from_secs(180)).await;
    assert_eq!(got.len(), 64);
    for (id, res) in &got {
        check_result(res, &ids[id]);
        // Resumed, not resent: batches enqueued before the kill were pulled
        // by the new gateway, everything else enqueued once by it.
        assert_eq!(res.enqueue_attempts, 1, "{id}");
    }
    assert_eq!(persist.pending_count().await.unwrap(), 0);

    // Submitting an answered request again queues nothing and gives the same answer.
    let mut c = client(gport).await;
    let (again, _) = request(0, 0, 1.0);
    let id = c.submit(again).await.unwrap();
    let r = c
        .fetch(&id, Duration::from_secs(1))
        .await
        .unwrap()
        .expect("answered");
    assert_eq!(r.remote_uuid, got[&id].remote_uuid);
    assert_eq!(persist.pending_count().await.unwrap(), 0);
}
