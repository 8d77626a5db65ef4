//! The HTTP service: `/api/reward/ping`, `/enqueue`, `/pull` as Cosmos-RL's
//! `cosmos_rl_reward` serves them, plus auth, backpressure and a drain on shutdown.

use crate::body::{self, Enqueue};
use crate::config::Config;
use crate::redis_server::{RedisAddr, RedisServer, RedisServerError};
use crate::rewards::{self, BuildError, Reward, Scores};
use crate::store::{Missing, Store, StoreError, HEARTBEAT_EVERY};
use axum::body::Body;
use axum::extract::rejection::FormRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub const PING_PATH: &str = "/api/reward/ping";
pub const ENQUEUE_PATH: &str = "/api/reward/enqueue";
pub const PULL_PATH: &str = "/api/reward/pull";

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Rewards(#[from] BuildError),
    #[error("embedded redis: {0}")]
    Redis(#[from] RedisServerError),
    #[error("connecting to redis at {url}: {source}")]
    Store { url: String, source: StoreError },
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("no reward is enabled: add a [[reward_args]] table (e.g. reward_type = \"jpeg_compressibility\")")]
    NoRewards,
}

struct AppState {
    rewards: BTreeMap<String, Arc<dyn Reward>>,
    store: Store,
    /// One permit per request accepted but not yet scored.
    queue: Arc<Semaphore>,
    max_pending: usize,
    /// One permit per batch being scored.
    compute: Arc<Semaphore>,
    max_body: usize,
    token: Option<String>,
    replica_id: Option<String>,
    draining: AtomicBool,
    /// Scores stored but not pulled yet (`{uuid}_{type}` → when stored). With the
    /// embedded Redis they die with the process, so shutdown waits for them.
    unpulled: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    score_ttl: Duration,
}

impl AppState {
    fn stored(&self, key: String) {
        let mut m = self.unpulled.lock().unwrap_or_else(|p| p.into_inner());
        // Forget scores nobody pulled within their TTL (Redis has dropped them too).
        if m.len() > 4096 {
            let ttl = self.score_ttl;
            m.retain(|_, at| at.elapsed() < ttl);
        }
        m.insert(key, Instant::now());
    }

    fn pulled(&self, key: &str) {
        self.unpulled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn unpulled(&self) -> usize {
        self.unpulled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// A running service. Dropping it without [`RewardService::shutdown`] stops
/// everything at once, as a crash would.
pub struct RewardService {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop_http: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    heartbeat: JoinHandle<()>,
    shutdown_timeout: Duration,
    linger: Duration,
    embedded_redis: Option<RedisServer>,
}

impl RewardService {
    /// Start serving. Call from the thread that lives as long as the service
    /// (the embedded Redis is tied to the thread that starts it).
    pub async fn start(config: Config) -> Result<Self, ServiceError> {
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        let rewards = rewards::build(&config.reward_args)?;
        if rewards.is_empty() {
            return Err(ServiceError::NoRewards);
        }
        let (embedded_redis, url) = match config.redis_port {
            Some(port) => {
                let host = config
                    .redis_host
                    .clone()
                    .unwrap_or_else(|| "localhost".into());
                (None, RedisAddr::Tcp { host, port }.url())
            }
            None => {
                let r = RedisServer::start_unix(&config.redis_server_bin)?;
                tracing::info!(pid = r.pid(), url = %r.url(), "started the embedded redis-server");
                let url = r.url();
                (Some(r), url)
            }
        };
        let instance = uuid::Uuid::new_v4().to_string();
        let store = Store::connect(&url, config.score_ttl_s, instance)
            .await
            .map_err(|source| ServiceError::Store {
                url: url.clone(),
                source,
            })?;
        store
            .heartbeat()
            .await
            .map_err(|source| ServiceError::Store { url, source })?;

        let state = Arc::new(AppState {
            rewards,
            store: store.clone(),
            queue: Arc::new(Semaphore::new(config.max_pending)),
            max_pending: config.max_pending,
            compute: Arc::new(Semaphore::new(config.workers())),
            max_body: config.max_body_mb.saturating_mul(1 << 20),
            token: config.effective_token(),
            replica_id: config.effective_replica_id(),
            draining: AtomicBool::new(false),
            unpulled: Default::default(),
            score_ttl: Duration::from_secs(config.score_ttl_s),
        });
        let app = router(state.clone());
        let bind = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .map_err(|source| ServiceError::Bind {
                addr: bind.clone(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServiceError::Bind { addr: bind, source })?;
        let (stop_http, mut stopped) = watch::channel(false);
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tick.tick().await;
                if let Err(e) = store.heartbeat().await {
                    tracing::warn!("heartbeat: {e}");
                }
            }
        });
        tracing::info!(
            %addr,
            rewards = ?state.rewards.keys().collect::<Vec<_>>(),
            auth = state.token.is_some(),
            replica_id = ?state.replica_id,
            "reward-service listening"
        );
        Ok(RewardService {
            addr,
            state,
            stop_http,
            http,
            heartbeat,
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_s),
            linger: Duration::from_secs(config.shutdown_linger_s),
            embedded_redis,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop taking work (enqueue answers 503), finish what is queued while still
    /// answering pulls, then stop. With the embedded Redis, scores vanish with
    /// the process, so it also waits (up to `shutdown_linger_s`) until every
    /// stored score has been pulled once.
    pub async fn shutdown(mut self) {
        self.state.draining.store(true, Ordering::SeqCst);
        let queued = self.state.max_pending - self.state.queue.available_permits();
        tracing::info!(queued, "draining: finishing queued work before exit");
        let all = self.state.max_pending as u32;
        match tokio::time::timeout(self.shutdown_timeout, self.state.queue.acquire_many(all)).await
        {
            Ok(_) => tracing::info!("queue drained"),
            Err(_) => tracing::warn!(
                "queued work not finished after {:?}; stopping anyway",
                self.shutdown_timeout
            ),
        }
        if self.embedded_redis.is_some() {
            let start = Instant::now();
            while self.state.unpulled() > 0 && start.elapsed() < self.linger {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = self.state.unpulled();
            if left > 0 {
                tracing::warn!(left, "scores never pulled are lost with the embedded redis");
            }
        }
        let _ = self.stop_http.send(true);
        match tokio::time::timeout(Duration::from_secs(10), &mut self.http).await {
            Ok(Ok(Err(e))) => tracing::warn!("http server: {e}"),
            Err(_) => tracing::warn!("open connections did not close in 10 s"),
            _ => {}
        }
        self.heartbeat.abort();
        if let Err(e) = self.state.store.retire().await {
            tracing::warn!("retiring the heartbeat: {e}");
        }
        let rewards: Vec<_> = self.state.rewards.values().cloned().collect();
        let _ =
            tokio::task::spawn_blocking(move || rewards.iter().for_each(|r| r.shutdown())).await;
        drop(self.embedded_redis.take());
        tracing::info!("reward-service stopped");
    }
}

impl Drop for RewardService {
    fn drop(&mut self) {
        self.http.abort();
        self.heartbeat.abort();
    }
}

fn router(state: Arc<AppState>) -> Router {
    // Form bodies (ping, pull) keep axum's default 2 MB limit; enqueue has its own.
    Router::new()
        .route(PING_PATH, post(ping))
        .route(ENQUEUE_PATH, post(enqueue))
        .route(PULL_PATH, post(pull))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

fn message(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "message": msg.into() }))).into_response()
}

fn unavailable(msg: impl Into<String>, retry_after_s: u32) -> Response {
    let mut r = message(StatusCode::SERVICE_UNAVAILABLE, msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    r
}

/// With a token configured, every endpoint needs `Authorization: Bearer <token>`.
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
        if !ok {
            tracing::info!(path = %req.uri().path(), "refused: missing or wrong bearer token");
            let mut r = message(
                StatusCode::UNAUTHORIZED,
                if given.is_none() {
                    "missing `Authorization: Bearer <token>` header"
                } else {
                    "wrong bearer token"
                },
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Comparing tokens in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct PingForm {
    info_data: Option<String>,
}

async fn ping(form: Result<Form<PingForm>, FormRejection>) -> Response {
    let info = match form {
        Ok(Form(PingForm {
            info_data: Some(info),
        })) => info,
        Ok(_) => {
            return message(
                StatusCode::UNPROCESSABLE_ENTITY,
                "form field `info_data` (a JSON string) is required",
            )
        }
        Err(e) => return message(e.status(), e.body_text()),
    };
    tracing::debug!(%info, "ping");
    Json(json!({"message": "Ping request received"})).into_response()
}

/// Read the body up to `limit` bytes. Past it, the rest is read and dropped
/// so the client (which sends everything before reading) sees the 413 rather
/// than a reset connection.
async fn read_body(body: Body, limit: usize, hint: Option<usize>) -> Result<Bytes, Response> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::with_capacity(hint.unwrap_or(0).min(limit));
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| message(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        total += chunk.len();
        if total <= limit {
            buf.extend_from_slice(&chunk);
        } else if !buf.is_empty() {
            buf = bytes::BytesMut::new();
        }
    }
    if total > limit {
        return Err(message(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body of {total} bytes exceeds the length limit of {limit} bytes (max_body_mb)"
            ),
        ));
    }
    Ok(buf.freeze())
}

async fn enqueue(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let span = tracing::info_span!("enqueue", uuid = tracing::field::Empty);
    async move {
        let hint = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = match read_body(body, state.max_body, hint).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        if state.draining.load(Ordering::SeqCst) {
            return unavailable(
                "reward-service is shutting down; retry on another replica",
                5,
            );
        }
        let Ok(permit) = state.queue.clone().try_acquire_owned() else {
            tracing::info!(max_pending = state.max_pending, "queue full");
            return unavailable(
                format!(
                    "queue full ({} requests pending); retry later",
                    state.max_pending
                ),
                1,
            );
        };
        let size = body.len();
        let req = match body::parse_enqueue(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(size, "refused: {e}");
                return message(StatusCode::BAD_REQUEST, e.to_string());
            }
        };
        for name in &req.rewards {
            let Some(reward) = state.rewards.get(name) else {
                let msg = format!(
                    "reward {name:?} is not enabled on this service (enabled: {})",
                    state.rewards.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                tracing::info!("refused: {msg}");
                return message(StatusCode::BAD_REQUEST, msg);
            };
            if let Err(msg) = reward.check(&req) {
                tracing::info!("refused: {msg}");
                return message(StatusCode::BAD_REQUEST, msg);
            }
        }
        let uuid = uuid::Uuid::new_v4().to_string();
        tracing::Span::current().record("uuid", uuid.as_str());
        if let Err(e) = state.store.mark_pending(&uuid, &req.rewards).await {
            tracing::warn!("{e}");
            return unavailable(format!("score store unavailable: {e}"), 1);
        }
        tracing::info!(
            size,
            shape = ?req.array.shape,
            media = req.media_type.as_str(),
            rewards = ?req.rewards,
            "accepted"
        );
        tokio::spawn(score_batch(state.clone(), uuid.clone(), req, permit).in_current_span());
        let mut out = serde_json::Map::new();
        out.insert("uuid".into(), uuid.into());
        if let Some(r) = &state.replica_id {
            out.insert("replica_id".into(), r.clone().into());
        }
        Json(out).into_response()
    }
    .instrument(span)
    .await
}

#[derive(Serialize)]
struct InputInfo {
    shape: Vec<usize>,
    dtype: &'static str,
    min: String,
    max: String,
}

/// The stored pull answer, in the field order of Cosmos-RL's service.
#[derive(Serialize)]
struct PullAnswer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    scores: Option<&'a Scores>,
    input_info: &'a InputInfo,
    duration: String,
    decoded_duration: &'static str,
    #[serde(rename = "type")]
    kind: &'a str,
}

fn input_info(req: &Enqueue) -> InputInfo {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in req.array.values_f64() {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    InputInfo {
        shape: req.array.shape.clone(),
        dtype: req.array.dtype.torch_name(),
        min: format!("{lo:.3}"),
        max: format!("{hi:.3}"),
    }
}

/// Score every requested reward (blocking), returning each pull answer.
fn compute(rewards: &BTreeMap<String, Arc<dyn Reward>>, req: &Enqueue) -> Vec<(String, Vec<u8>)> {
    let info = input_info(req);
    req.rewards
        .iter()
        .map(|name| {
            let start = Instant::now();
            let result = rewards[name].score(req);
            let duration = format!("{:.2}", start.elapsed().as_secs_f64());
            let (scores, error) = match &result {
                Ok(s) => (Some(s), None),
                Err(e) => {
                    tracing::warn!(reward = %name, "scoring failed: {e}");
                    (None, Some(e.to_string()))
                }
            };
            let answer = PullAnswer {
                error,
                scores,
                input_info: &info,
                duration,
                decoded_duration: "0.00",
                kind: name,
            };
            (
                name.clone(),
                serde_json::to_vec(&answer).expect("serializable"),
            )
        })
        .collect()
}

async fn score_batch(
    state: Arc<AppState>,
    uuid: String,
    req: Enqueue,
    _queue_slot: tokio::sync::OwnedSemaphorePermit,
) {
    let Ok(_worker) = state.compute.clone().acquire_owned().await else {
        return;
    };
    let st = state.clone();
    let start = Instant::now();
    let answers = match tokio::task::spawn_blocking(move || compute(&st.rewards, &req)).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("scoring panicked: {e}");
            return;
        }
    };
    for (reward, json) in answers {
        let mut wait = Duration::from_millis(100);
        // Scores that cannot be stored are lost work; Redis blips are worth riding out.
        for attempt in 1.. {
            match state.store.put_result(&uuid, &reward, &json).await {
                Ok(()) => {
                    state.stored(format!("{uuid}_{reward}"));
                    break;
                }
                Err(e) if attempt < 8 => {
                    tracing::warn!(%reward, "storing scores (attempt {attempt}): {e}");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => {
                    tracing::error!(%reward, "giving up storing scores: {e}");
                    break;
                }
            }
        }
    }
    if let Err(e) = state.store.clear_pending(&uuid).await {
        tracing::warn!("clearing the pending mark: {e}");
    }
    tracing::info!(
        secs = format!("{:.3}", start.elapsed().as_secs_f64()),
        "scored"
    );
}

#[derive(Deserialize)]
struct PullForm {
    uuid: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn pull(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Result<Form<PullForm>, FormRejection>,
) -> Response {
    let (uuid, kind) = match form {
        Ok(Form(PullForm {
            uuid: Some(u),
            kind: Some(k),
        })) => (u, k),
        Ok(_) => {
            return message(
                StatusCode::UNPROCESSABLE_ENTITY,
                "form fields `uuid` and `type` (a reward name) are required",
            )
        }
        Err(e) => return message(e.status(), e.body_text()),
    };
    let span = tracing::info_span!("pull", %uuid, %kind);
    async move {
        if let Some(target) = headers.get("x-lepton-replica-target") {
            tracing::debug!(?target, "pinned pull");
        }
        let found = match state.store.get_result(&uuid, &kind).await {
            Ok(f) => f,
            Err(e) => return unavailable(format!("score store unavailable: {e}"), 1),
        };
        let found = match found {
            Some(f) => Some(f),
            None => {
                let missing = match state.store.missing(&uuid, &kind).await {
                    Ok(m) => m,
                    Err(e) => return unavailable(format!("score store unavailable: {e}"), 1),
                };
                // The scores may have landed between the two reads.
                let again = match missing {
                    Missing::Unknown => state.store.get_result(&uuid, &kind).await.ok().flatten(),
                    _ => None,
                };
                if again.is_none() {
                    tracing::debug!(?missing, "not found");
                    // The status and message are what Cosmos-RL's clients expect; `state` is ours.
                    return (
                        StatusCode::BAD_REQUEST,
                        Json(json!({
                            "message": format!("Not found scores for {uuid}"),
                            "state": missing,
                        })),
                    )
                        .into_response();
                }
                again
            }
        };
        let body = found.expect("checked above");
        state.pulled(&format!("{uuid}_{kind}"));
        tracing::debug!("pulled");
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
    .instrument(span)
    .await
}
