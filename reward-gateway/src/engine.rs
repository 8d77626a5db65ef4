//! The gateway's core: requests in, batches to the reward service, one answer
//! per request out.
//!
//! A request is held (in memory, and in Redis when configured) from `submit`
//! until it is answered. The batcher groups compatible requests (same media
//! layout, reward config and extras) until `max_batch_items` or
//! `max_batch_wait_ms`; each batch then runs as one task: enqueue (retrying
//! with backoff), pull every reward_fn, and, if the service says it lost the
//! uuid, enqueue again. Its answers are written in one step and published.

use crate::combine::{self, CombineError};
use crate::config::{Config, RemoteRewardConfig};
use crate::persist::{BatchRecord, Persist, PersistError};
use crate::remote::{EnqueueOutcome, PullOutcome, RemoteClient};
use bytes::Bytes;
use prost::Message;
use proto::reward::v1::{
    Dtype as PbDtype, FloatList, GroupResult, MediaType, ScoreRequest, ScoreResult,
};
use rand::Rng;
use reward_service::npy::{self, Dtype};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// Why a request was not scored; mapped to a gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request itself is malformed.
    Invalid,
    /// The service refused the batch or a reward failed on it.
    Refused,
    /// Not answered within `request_deadline_s`.
    Deadline,
}

pub type Answer = Result<ScoreResult, Failure>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("no request {0:?} (never submitted, or its answer expired)")]
    NotFound(String),
    #[error(transparent)]
    Persist(#[from] PersistError),
}

struct Entry {
    /// Dropped once answered (the media is the bulk of it).
    req: Option<Arc<ScoreRequest>>,
    submitted: Instant,
    answer: watch::Sender<Option<Answer>>,
}

struct Inner {
    cfg: Config,
    remote: RemoteClient,
    persist: Persist,
    entries: Mutex<HashMap<String, Entry>>,
    to_batcher: mpsc::UnboundedSender<String>,
}

/// Cheap to clone; every clone is the same gateway.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// What every request in one batch must share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BatchKey {
    validation: bool,
    media_type: i32,
    dtype: i32,
    item_shape: Vec<u64>,
    extras_json: String,
    has_fps: bool,
}

impl BatchKey {
    fn of(r: &ScoreRequest) -> Self {
        let m = r.media.as_ref().expect("validated");
        BatchKey {
            validation: r.validation,
            media_type: m.media_type,
            dtype: m.dtype,
            item_shape: m.shape[1..].to_vec(),
            extras_json: r.extras_json.clone(),
            has_fps: !m.video_fps.is_empty(),
        }
    }
}

fn npy_dtype(d: i32) -> Option<Dtype> {
    match PbDtype::try_from(d).ok()? {
        PbDtype::Uint8 => Some(Dtype::U8),
        PbDtype::Float16 => Some(Dtype::F16),
        PbDtype::Bfloat16 => Some(Dtype::Bf16AsU16),
        PbDtype::Float32 => Some(Dtype::F32),
        PbDtype::Unspecified => None,
    }
}

/// Check a request before accepting it; returns its item count.
pub fn validate(r: &ScoreRequest, allow_latents: bool) -> Result<usize, String> {
    let m = r.media.as_ref().ok_or("no media")?;
    let media = MediaType::try_from(m.media_type).map_err(|_| "unknown media_type")?;
    let dtype = npy_dtype(m.dtype).ok_or("dtype is unspecified or unknown")?;
    let (ndim, ok_dtype) = match media {
        MediaType::Image => (4, dtype == Dtype::U8),
        MediaType::Video => (5, dtype == Dtype::U8),
        MediaType::Latent => {
            if !allow_latents {
                return Err(
                    "latents are not sent unless the gateway's config sets allow_latents = true"
                        .into(),
                );
            }
            (5, matches!(dtype, Dtype::F16 | Dtype::Bf16AsU16))
        }
        MediaType::Unspecified => return Err("media_type is unspecified".into()),
    };
    if m.shape.len() != ndim || !ok_dtype {
        return Err(format!(
            "{media:?} media must be {} with {ndim} dims (image [B,H,W,C], video/latent [B,C,T,H,W]); got {dtype} {:?}",
            if media == MediaType::Latent { "float16/bfloat16" } else { "uint8" },
            m.shape
        ));
    }
    if m.shape.contains(&0) {
        return Err(format!("shape {:?} has an empty axis", m.shape));
    }
    let n = m
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))
        .and_then(|n| n.checked_mul(dtype.itemsize()))
        .ok_or("shape overflows")?;
    if m.data.len() != n {
        return Err(format!(
            "shape {:?} of {dtype} needs {n} bytes, got {}",
            m.shape,
            m.data.len()
        ));
    }
    let b = m.shape[0] as usize;
    if r.groups.is_empty() || r.groups.iter().any(|g| g.num_items == 0) {
        return Err("every request needs at least one prompt group of at least one item".into());
    }
    let items: usize = r.groups.iter().map(|g| g.num_items as usize).sum();
    if items != b {
        return Err(format!("prompt groups hold {items} items, the media {b}"));
    }
    if !m.video_fps.is_empty() && m.video_fps.len() != b {
        return Err(format!("{} video_fps for {b} items", m.video_fps.len()));
    }
    if !r.extras_json.is_empty() {
        let v: Value =
            serde_json::from_str(&r.extras_json).map_err(|e| format!("extras_json: {e}"))?;
        let o = v.as_object().ok_or("extras_json must be a JSON object")?;
        for k in ["prompts", "reward_fn", "media_type", "video_infos"] {
            if o.contains_key(k) {
                return Err(format!("extras_json may not set {k:?}"));
            }
        }
    }
    Ok(b)
}

/// The enqueue body for a batch, as Cosmos-RL's client builds it.
fn build_payload(members: &[Arc<ScoreRequest>], cfg: &RemoteRewardConfig) -> Bytes {
    let first = members[0].media.as_ref().expect("validated");
    let media = MediaType::try_from(first.media_type).expect("validated");
    let mut prompts = Vec::new();
    let mut fps = Vec::new();
    let mut total = 0u64;
    for r in members {
        for g in &r.groups {
            prompts.extend(std::iter::repeat_n(g.prompt.as_str(), g.num_items as usize));
        }
        let m = r.media.as_ref().expect("validated");
        total += m.shape[0];
        fps.extend(m.video_fps.iter().copied());
    }
    // The service computes every reward named with weight > 0 and leaves the
    // weighting to us, so a negative (penalty) weight is asked for with 1.0;
    // weight 0 contributes nothing and is not asked for.
    let reward_fn: Map<String, Value> = cfg
        .reward_fns
        .iter()
        .filter(|f| f.weight != 0.0)
        .map(|f| {
            (
                f.name.clone(),
                json!(if f.weight > 0.0 { f.weight } else { 1.0 }),
            )
        })
        .collect();
    let mut meta = Map::new();
    meta.insert("prompts".into(), json!(prompts));
    meta.insert("reward_fn".into(), Value::Object(reward_fn));
    meta.insert(
        "media_type".into(),
        json!(match media {
            MediaType::Image => "image",
            MediaType::Latent => "latent",
            _ => "video",
        }),
    );
    if media != MediaType::Image && !fps.is_empty() {
        meta.insert(
            "video_infos".into(),
            Value::Array(fps.iter().map(|f| json!({ "video_fps": f })).collect()),
        );
    }
    if !members[0].extras_json.is_empty() {
        if let Ok(Value::Object(extras)) = serde_json::from_str(&members[0].extras_json) {
            meta.extend(extras);
        }
    }
    let mut shape: Vec<usize> = first.shape.iter().map(|&d| d as usize).collect();
    shape[0] = total as usize;
    let data_len: usize = members
        .iter()
        .map(|r| r.media.as_ref().map_or(0, |m| m.data.len()))
        .sum();
    let mut out = serde_json::to_vec(&Value::Object(meta)).expect("serializable");
    out.push(b'\n');
    npy::write_header(&mut out, npy_dtype(first.dtype).expect("validated"), &shape);
    out.reserve(data_len);
    for r in members {
        out.extend_from_slice(&r.media.as_ref().expect("validated").data);
    }
    Bytes::from(out)
}

/// Encode an answer for Redis: `R` + protobuf result, or `E` + kind + message.
fn encode_answer(a: &Answer) -> Vec<u8> {
    match a {
        Ok(r) => {
            let mut out = vec![b'R'];
            r.encode(&mut out).expect("Vec grows");
            out
        }
        Err(f) => {
            let k = match f.kind {
                FailureKind::Invalid => b'I',
                FailureKind::Refused => b'R',
                FailureKind::Deadline => b'D',
            };
            let mut out = vec![b'E', k];
            out.extend_from_slice(f.message.as_bytes());
            out
        }
    }
}

fn decode_answer(b: &[u8]) -> Option<Answer> {
    match b.split_first()? {
        (b'R', rest) => ScoreResult::decode(rest).ok().map(Ok),
        (b'E', rest) => {
            let (k, msg) = rest.split_first()?;
            let kind = match k {
                b'I' => FailureKind::Invalid,
                b'D' => FailureKind::Deadline,
                _ => FailureKind::Refused,
            };
            Some(Err(Failure {
                kind,
                message: String::from_utf8_lossy(msg).into_owned(),
            }))
        }
        _ => None,
    }
}

fn jitter(d: Duration) -> Duration {
    // Full jitter in [d/2, d]: spreads retries of many batches after an outage.
    let f: f64 = rand::rng().random_range(0.5..=1.0);
    d.mul_f64(f)
}

impl Engine {
    /// Start the engine: recover what a previous run left in Redis, then batch.
    pub async fn start(
        cfg: Config,
        remote: RemoteClient,
        persist: Persist,
    ) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Engine {
            inner: Arc::new(Inner {
                cfg,
                remote,
                persist,
                entries: Mutex::new(HashMap::new()),
                to_batcher: tx,
            }),
        };
        engine.recover().await?;
        tokio::spawn(engine.clone().batcher(rx));
        tokio::spawn(engine.clone().sweeper());
        Ok(engine)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn recover(&self) -> Result<(), EngineError> {
        let rec = self.inner.persist.recover().await?;
        let (mut resumed, mut loose) = (0usize, 0usize);
        for (bid, batch, reqs) in rec.batches {
            let mut members = Vec::new();
            for (id, raw) in reqs {
                match ScoreRequest::decode(raw.as_slice()) {
                    Ok(r) => members.push((id, Arc::new(r))),
                    Err(e) => tracing::warn!(%id, "dropping an undecodable stored request: {e}"),
                }
            }
            if members.len() != batch.members.len() {
                // Part of the batch is gone: send the rest again as new batches.
                tracing::warn!(%bid, "batch incomplete in redis; re-batching its requests");
                for (id, r) in members {
                    self.insert(&id, r);
                    let _ = self.inner.to_batcher.send(id);
                    loose += 1;
                }
                continue;
            }
            for (id, r) in &members {
                self.insert(id, r.clone());
            }
            resumed += members.len();
            tokio::spawn(self.clone().run_batch(
                bid,
                batch,
                members.into_iter().map(|m| m.1).collect(),
            ));
        }
        for (id, raw) in rec.loose {
            match ScoreRequest::decode(raw.as_slice()) {
                Ok(r) => {
                    self.insert(&id, Arc::new(r));
                    let _ = self.inner.to_batcher.send(id);
                    loose += 1;
                }
                Err(e) => tracing::warn!(%id, "dropping an undecodable stored request: {e}"),
            }
        }
        if resumed + loose > 0 {
            tracing::info!(
                resumed,
                requeued = loose,
                "recovered pending requests from redis"
            );
        }
        Ok(())
    }

    fn insert(&self, id: &str, req: Arc<ScoreRequest>) {
        let (tx, _) = watch::channel(None);
        self.entries().insert(
            id.to_string(),
            Entry {
                req: Some(req),
                submitted: Instant::now(),
                answer: tx,
            },
        );
    }

    /// Accept a request (idempotent on its id); returns the id.
    pub async fn submit(&self, mut req: ScoreRequest) -> Result<String, EngineError> {
        validate(&req, self.inner.cfg.gateway.allow_latents).map_err(EngineError::Invalid)?;
        if req.request_id.is_empty() {
            req.request_id = uuid::Uuid::new_v4().to_string();
        }
        let id = req.request_id.clone();
        if self.entries().contains_key(&id)
            || self.inner.persist.get_answer(&id).await?.is_some()
            || self.inner.persist.has_request(&id).await?
        {
            tracing::debug!(%id, "already held; not queued again");
            return Ok(id);
        }
        // Durable before acknowledged: a restart after this resumes it.
        self.inner
            .persist
            .save_request(&id, &req.encode_to_vec())
            .await?;
        let req = Arc::new(req);
        {
            let mut entries = self.entries();
            if entries.contains_key(&id) {
                return Ok(id);
            }
            let (tx, _) = watch::channel(None);
            entries.insert(
                id.clone(),
                Entry {
                    req: Some(req.clone()),
                    submitted: Instant::now(),
                    answer: tx,
                },
            );
        }
        tracing::debug!(%id, worker = %req.worker_id, "submitted");
        let _ = self.inner.to_batcher.send(id.clone());
        Ok(id)
    }

    /// The answer, waiting up to `wait` for it; `None` if still pending.
    pub async fn fetch(&self, id: &str, wait: Duration) -> Result<Option<Answer>, EngineError> {
        let rx = self.entries().get(id).map(|e| e.answer.subscribe());
        let Some(mut rx) = rx else {
            return match self.inner.persist.get_answer(id).await? {
                Some(raw) => Ok(decode_answer(&raw)),
                None => Err(EngineError::NotFound(id.to_string())),
            };
        };
        let got = match tokio::time::timeout(wait, rx.wait_for(|a| a.is_some())).await {
            Ok(Ok(a)) => a.clone(),
            _ => None,
        };
        Ok(got.or_else(|| rx.borrow().clone()))
    }

    /// Requests submitted but not answered.
    pub fn pending(&self) -> usize {
        self.entries().values().filter(|e| e.req.is_some()).count()
    }

    /// Drop answered entries from memory after their TTL (Redis keeps its own copy).
    async fn sweeper(self) {
        let ttl = Duration::from_secs(self.inner.cfg.gateway.result_ttl_s);
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            self.entries()
                .retain(|_, e| e.req.is_some() || e.submitted.elapsed() < ttl);
        }
    }

    async fn batcher(self, mut rx: mpsc::UnboundedReceiver<String>) {
        struct Open {
            ids: Vec<String>,
            items: usize,
            since: Instant,
        }
        let max_items = self.inner.cfg.gateway.max_batch_items;
        let max_wait = Duration::from_millis(self.inner.cfg.gateway.max_batch_wait_ms);
        let mut open: HashMap<BatchKey, Open> = HashMap::new();
        loop {
            let next = open.values().map(|o| o.since + max_wait).min();
            let id = tokio::select! {
                id = rx.recv() => match id { Some(id) => Some(id), None => return },
                _ = async { match next { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => None,
            };
            if let Some(id) = id {
                let Some(req) = self.entries().get(&id).and_then(|e| e.req.clone()) else {
                    continue;
                };
                let key = BatchKey::of(&req);
                let n = req.media.as_ref().map_or(0, |m| m.shape[0] as usize);
                if let Some(o) = open.get(&key) {
                    if o.items + n > max_items {
                        let o = open.remove(&key).expect("present");
                        self.flush(key.validation, o.ids);
                    }
                }
                let o = open.entry(key.clone()).or_insert_with(|| Open {
                    ids: Vec::new(),
                    items: 0,
                    since: Instant::now(),
                });
                o.ids.push(id);
                o.items += n;
                if o.items >= max_items {
                    let o = open.remove(&key).expect("present");
                    self.flush(key.validation, o.ids);
                }
            }
            let now = Instant::now();
            let due: Vec<BatchKey> = open
                .iter()
                .filter(|(_, o)| now >= o.since + max_wait)
                .map(|(k, _)| k.clone())
                .collect();
            for k in due {
                let o = open.remove(&k).expect("present");
                self.flush(k.validation, o.ids);
            }
        }
    }

    fn flush(&self, validation: bool, ids: Vec<String>) {
        let members: Vec<Arc<ScoreRequest>> = {
            let entries = self.entries();
            ids.iter()
                .filter_map(|id| entries.get(id).and_then(|e| e.req.clone()))
                .collect()
        };
        if members.is_empty() {
            return;
        }
        let bid = uuid::Uuid::new_v4().to_string();
        let rec = BatchRecord {
            members: members.iter().map(|r| r.request_id.clone()).collect(),
            validation,
            uuid: None,
            replica_id: None,
            attempts: 0,
        };
        let engine = self.clone();
        tokio::spawn(async move {
            // Recorded before any enqueue, so a restart knows which requests it holds.
            let mut delay = Duration::from_millis(engine.inner.cfg.gateway.retry_initial_ms);
            while let Err(e) = engine.inner.persist.save_batch(&bid, &rec).await {
                tracing::warn!(%bid, "saving the batch: {e}; retrying");
                tokio::time::sleep(jitter(delay)).await;
                delay =
                    (delay * 2).min(Duration::from_millis(engine.inner.cfg.gateway.retry_max_ms));
            }
            engine.run_batch(bid, rec, members).await;
        });
    }

    async fn run_batch(self, bid: String, mut rec: BatchRecord, members: Vec<Arc<ScoreRequest>>) {
        let items: usize = members
            .iter()
            .map(|r| r.media.as_ref().map_or(0, |m| m.shape[0] as usize))
            .sum();
        let span = tracing::info_span!("batch", %bid, requests = members.len(), items);
        async move {
            let answers = self.score_batch(&mut rec, &bid, &members, items).await;
            self.answer(&bid, answers).await;
        }
        .instrument(span)
        .await
    }

    /// Enqueue and pull until every reward_fn has scores (or the batch fails).
    async fn score_batch(
        &self,
        rec: &mut BatchRecord,
        bid: &str,
        members: &[Arc<ScoreRequest>],
        items: usize,
    ) -> Vec<(String, Answer)> {
        let g = &self.inner.cfg.gateway;
        let cfg = self.inner.cfg.remote_reward(rec.validation).clone();
        let fail_all = |kind, message: String| -> Vec<(String, Answer)> {
            tracing::warn!("batch failed: {message}");
            members
                .iter()
                .map(|r| {
                    (
                        r.request_id.clone(),
                        Err(Failure {
                            kind,
                            message: message.clone(),
                        }),
                    )
                })
                .collect()
        };
        let oldest = {
            let entries = self.entries();
            members
                .iter()
                .filter_map(|r| entries.get(&r.request_id).map(|e| e.submitted))
                .min()
                .unwrap_or_else(Instant::now)
        };
        let deadline = oldest + Duration::from_secs(g.request_deadline_s);
        let payload = build_payload(members, &cfg);
        let retry_initial = Duration::from_millis(g.retry_initial_ms);
        let retry_max = Duration::from_millis(g.retry_max_ms);
        let poll_initial = Duration::from_millis(g.poll_initial_ms);
        let poll_max = Duration::from_millis(g.poll_max_ms);
        let wanted: Vec<usize> = (0..cfg.reward_fns.len())
            .filter(|&i| cfg.reward_fns[i].weight != 0.0)
            .collect();

        'enqueue: loop {
            if rec.uuid.is_none() {
                let mut delay = retry_initial;
                loop {
                    if Instant::now() > deadline {
                        return fail_all(
                            FailureKind::Deadline,
                            format!(
                                "not enqueued within request_deadline_s = {}",
                                g.request_deadline_s
                            ),
                        );
                    }
                    match self.inner.remote.enqueue(payload.clone()).await {
                        EnqueueOutcome::Accepted { uuid, replica_id } => {
                            rec.attempts += 1;
                            tracing::info!(%uuid, ?replica_id, attempt = rec.attempts, "enqueued");
                            rec.uuid = Some(uuid);
                            rec.replica_id = replica_id;
                            if let Err(e) = self.inner.persist.save_batch(bid, rec).await {
                                // Not fatal: a restart would enqueue it once more.
                                tracing::warn!("recording the uuid: {e}");
                            }
                            break;
                        }
                        EnqueueOutcome::Retry(msg) => {
                            tracing::warn!("{msg}; retrying in ~{delay:?}");
                            tokio::time::sleep(jitter(delay)).await;
                            delay = (delay * 2).min(retry_max);
                        }
                        EnqueueOutcome::Refused(msg) => return fail_all(FailureKind::Refused, msg),
                    }
                }
            }
            let uuid = rec.uuid.clone().expect("set above");
            let mut got: Vec<Option<Map<String, Value>>> = vec![None; cfg.reward_fns.len()];
            let since = Instant::now();
            let mut delay = poll_initial;
            loop {
                let mut retry = false;
                for &i in &wanted {
                    if got[i].is_some() {
                        continue;
                    }
                    let name = &cfg.reward_fns[i].name;
                    match self
                        .inner
                        .remote
                        .pull(&uuid, name, rec.replica_id.as_deref())
                        .await
                    {
                        PullOutcome::Scores(s) => got[i] = Some(s),
                        PullOutcome::NotReady { lost: true, .. } => {
                            tracing::warn!(%uuid, "the service lost this batch; enqueueing it again");
                            rec.uuid = None;
                            continue 'enqueue;
                        }
                        PullOutcome::NotReady {
                            said_state: false, ..
                        } if since.elapsed() > Duration::from_secs(g.lost_after_s) => {
                            tracing::warn!(%uuid, "not found for lost_after_s = {}; enqueueing again", g.lost_after_s);
                            rec.uuid = None;
                            continue 'enqueue;
                        }
                        PullOutcome::NotReady { .. } => {}
                        PullOutcome::Failed(msg) | PullOutcome::Refused(msg) => {
                            return fail_all(FailureKind::Refused, msg)
                        }
                        PullOutcome::Retry(msg) => {
                            tracing::warn!("{msg}");
                            retry = true;
                        }
                    }
                }
                if wanted.iter().all(|&i| got[i].is_some()) {
                    break;
                }
                if Instant::now() > deadline {
                    return fail_all(
                        FailureKind::Deadline,
                        format!(
                            "no scores within request_deadline_s = {}",
                            g.request_deadline_s
                        ),
                    );
                }
                if retry {
                    delay = delay.max(retry_initial);
                }
                tokio::time::sleep(jitter(delay)).await;
                delay = (delay * 2).min(if retry { retry_max } else { poll_max });
            }

            // Every reward_fn's selected scores, in config order (zeros for weight 0).
            let mut per_fn = Vec::with_capacity(cfg.reward_fns.len());
            for (i, f) in cfg.reward_fns.iter().enumerate() {
                match &got[i] {
                    Some(scores) => match combine::select_scores(f, scores, items) {
                        Ok(s) => per_fn.push(s),
                        Err(
                            e @ (CombineError::MissingKeys { .. } | CombineError::BadScores { .. }),
                        ) => return fail_all(FailureKind::Refused, e.to_string()),
                    },
                    None => per_fn.push(vec![0.0; items]),
                }
            }
            let totals = combine::combine(&cfg, &per_fn, items);
            let mut out = Vec::with_capacity(members.len());
            let mut offset = 0usize;
            for r in members {
                let n = r.media.as_ref().map_or(0, |m| m.shape[0] as usize);
                let mut groups = Vec::with_capacity(r.groups.len());
                let mut o = offset;
                for grp in &r.groups {
                    let k = grp.num_items as usize;
                    let rewards = totals[o..o + k].to_vec();
                    groups.push(GroupResult {
                        prompt: grp.prompt.clone(),
                        advantages: combine::advantages(&rewards),
                        rewards,
                    });
                    o += k;
                }
                let raw_scores = cfg
                    .reward_fns
                    .iter()
                    .zip(&per_fn)
                    .filter(|(f, _)| f.weight != 0.0)
                    .map(|(f, s)| {
                        (
                            format!("{}/{}", f.name, f.score_key()),
                            FloatList {
                                values: s[offset..offset + n].to_vec(),
                            },
                        )
                    })
                    .collect();
                out.push((
                    r.request_id.clone(),
                    Ok(ScoreResult {
                        request_id: r.request_id.clone(),
                        step: r.step,
                        groups,
                        raw_scores,
                        remote_uuid: uuid.clone(),
                        enqueue_attempts: rec.attempts,
                    }),
                ));
                offset += n;
            }
            return out;
        }
    }

    /// Persist, then publish, each member's answer (exactly once per request).
    async fn answer(&self, bid: &str, answers: Vec<(String, Answer)>) {
        let encoded: Vec<(String, Vec<u8>)> = answers
            .iter()
            .map(|(id, a)| (id.clone(), encode_answer(a)))
            .collect();
        let mut delay = Duration::from_millis(self.inner.cfg.gateway.retry_initial_ms);
        while let Err(e) = self.inner.persist.finish(bid, &encoded).await {
            // Publishing before this lands could answer twice across a restart.
            tracing::warn!("storing answers: {e}; retrying");
            tokio::time::sleep(jitter(delay)).await;
            delay = (delay * 2).min(Duration::from_millis(self.inner.cfg.gateway.retry_max_ms));
        }
        let mut entries = self.entries();
        for (id, a) in answers {
            if let Some(e) = entries.get_mut(&id) {
                e.req = None;
                e.answer.send_replace(Some(a));
            }
        }
        tracing::info!("answered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::reward::v1::{Media, PromptGroup};

    fn req(b: u64) -> ScoreRequest {
        ScoreRequest {
            request_id: "r".into(),
            worker_id: "w".into(),
            groups: vec![PromptGroup {
                prompt: "p".into(),
                num_items: b as u32,
            }],
            media: Some(Media {
                media_type: MediaType::Image as i32,
                dtype: PbDtype::Uint8 as i32,
                shape: vec![b, 2, 2, 3],
                data: vec![0u8; (b * 12) as usize],
                video_fps: vec![],
            }),
            validation: false,
            step: 3,
            extras_json: String::new(),
        }
    }

    #[test]
    fn validation_catches_inconsistent_requests() {
        assert_eq!(validate(&req(2), false), Ok(2));
        let mut r = req(2);
        r.groups[0].num_items = 3;
        assert!(validate(&r, false).unwrap_err().contains("3 items"));
        let mut r = req(2);
        r.media.as_mut().unwrap().data.pop();
        assert!(validate(&r, false).unwrap_err().contains("needs 24 bytes"));
        let mut r = req(1);
        let m = r.media.as_mut().unwrap();
        m.media_type = MediaType::Latent as i32;
        m.dtype = PbDtype::Float16 as i32;
        m.shape = vec![1, 4, 1, 2, 2];
        m.data = vec![0; 32];
        assert!(validate(&r, false).unwrap_err().contains("allow_latents"));
        assert_eq!(validate(&r, true), Ok(1));
        let mut r = req(1);
        r.extras_json = "{\"prompts\": 1}".into();
        assert!(validate(&r, false).is_err());
    }

    #[test]
    fn payload_is_what_a_cosmos_client_sends() {
        let cfg = crate::config::Config::from_toml_str(
            "[[train.train_policy.remote_reward.reward_fns]]\nname = \"jpeg_compressibility\"\nweight = 2.0\n",
        )
        .unwrap();
        let mut a = req(2);
        a.groups = vec![
            PromptGroup {
                prompt: "x".into(),
                num_items: 1,
            },
            PromptGroup {
                prompt: "y".into(),
                num_items: 1,
            },
        ];
        let b = req(1);
        let p = build_payload(&[Arc::new(a), Arc::new(b)], cfg.remote_reward(false));
        let parsed = reward_service::body::parse_enqueue(p).unwrap();
        assert_eq!(parsed.prompts, vec!["x", "y", "p"]);
        assert_eq!(parsed.array.shape, vec![3, 2, 2, 3]);
        assert_eq!(parsed.rewards, vec!["jpeg_compressibility"]);
        assert_eq!(parsed.media_type, reward_service::body::MediaType::Image);
    }

    #[test]
    fn answers_round_trip() {
        let ok: Answer = Ok(ScoreResult {
            request_id: "a".into(),
            step: 1,
            ..Default::default()
        });
        assert_eq!(decode_answer(&encode_answer(&ok)), Some(ok));
        let err: Answer = Err(Failure {
            kind: FailureKind::Deadline,
            message: "late".into(),
        });
        assert_eq!(decode_answer(&encode_answer(&err)), Some(err));
    }
}
