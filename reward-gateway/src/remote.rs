//! The reward service as Cosmos-RL's clients call it: `REMOTE_REWARD_*`
//! environment, enqueue timeout sized from the payload, `X-Lepton-Replica-Target`
//! on pulls, and a classification of every answer into what to do next.

use bytes::Bytes;
use serde_json::{Map, Value};
use std::time::Duration;

/// Endpoints, token and enqueue timeouts, from `REMOTE_REWARD_*`.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub enqueue_url: String,
    pub fetch_url: String,
    pub token: String,
    /// `REMOTE_REWARD_ENQUEUE_TIMEOUT_S`: a fixed read timeout, else sized from the payload.
    pub enqueue_timeout_fixed_s: Option<f64>,
    pub enqueue_timeout_base_s: f64,
    pub enqueue_timeout_per_mb_s: f64,
    pub enqueue_timeout_min_s: f64,
    pub enqueue_timeout_max_s: f64,
    pub connect_timeout_s: f64,
    /// Pull read timeout (Cosmos-RL's client uses 10 s).
    pub pull_timeout_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteConfigError {
    #[error("{0} is not set (the reward service's {1} URL)")]
    Missing(&'static str, &'static str),
}

fn env_f64(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or_else(|_| {
            tracing::warn!("invalid {name}={v:?}; using {default}");
            default
        }),
        _ => default,
    }
}

impl RemoteConfig {
    /// From the environment, with optional overrides (the gateway's config).
    pub fn from_env(
        enqueue_url: Option<String>,
        fetch_url: Option<String>,
        token: Option<String>,
    ) -> Result<Self, RemoteConfigError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let enqueue_url = enqueue_url
            .or_else(|| var("REMOTE_REWARD_ENQUEUE_URL"))
            .ok_or(RemoteConfigError::Missing(
                "REMOTE_REWARD_ENQUEUE_URL",
                "enqueue",
            ))?;
        let fetch_url = fetch_url.or_else(|| var("REMOTE_REWARD_FETCH_URL")).ok_or(
            RemoteConfigError::Missing("REMOTE_REWARD_FETCH_URL", "pull"),
        )?;
        let fixed = var("REMOTE_REWARD_ENQUEUE_TIMEOUT_S").and_then(|v| {
            v.trim().parse().ok().or_else(|| {
                tracing::warn!(
                    "invalid REMOTE_REWARD_ENQUEUE_TIMEOUT_S={v:?}; sizing from the payload"
                );
                None
            })
        });
        Ok(RemoteConfig {
            enqueue_url,
            fetch_url,
            token: token
                .or_else(|| var("REMOTE_REWARD_TOKEN"))
                .unwrap_or_default(),
            enqueue_timeout_fixed_s: fixed,
            enqueue_timeout_base_s: env_f64("REMOTE_REWARD_ENQUEUE_TIMEOUT_BASE_S", 30.0),
            enqueue_timeout_per_mb_s: env_f64("REMOTE_REWARD_ENQUEUE_TIMEOUT_PER_MB_S", 3.0),
            enqueue_timeout_min_s: env_f64("REMOTE_REWARD_ENQUEUE_TIMEOUT_MIN_S", 60.0),
            enqueue_timeout_max_s: env_f64("REMOTE_REWARD_ENQUEUE_TIMEOUT_MAX_S", 600.0),
            connect_timeout_s: env_f64("REMOTE_REWARD_ENQUEUE_CONNECT_TIMEOUT_S", 100.0),
            pull_timeout_s: 10.0,
        })
    }

    /// The enqueue read timeout for a payload of `bytes`: fixed, or
    /// `base + per_mb * MiB` clamped to `[min, max]`.
    pub fn enqueue_timeout(&self, bytes: usize) -> Duration {
        let s = self.enqueue_timeout_fixed_s.unwrap_or_else(|| {
            let mb = bytes as f64 / (1024.0 * 1024.0);
            (self.enqueue_timeout_base_s + self.enqueue_timeout_per_mb_s * mb)
                .min(self.enqueue_timeout_max_s)
                .max(self.enqueue_timeout_min_s)
        });
        Duration::from_secs_f64(s.max(0.001))
    }
}

/// What an enqueue came to.
#[derive(Debug)]
pub enum EnqueueOutcome {
    Accepted {
        uuid: String,
        replica_id: Option<String>,
    },
    /// Worth trying again (connect error, timeout, 5xx, 503, 408/425/429).
    Retry(String),
    /// The service refused the batch; sending it again would not help.
    Refused(String),
}

/// What a pull came to.
#[derive(Debug)]
pub enum PullOutcome {
    /// The answer's `scores`.
    Scores(Map<String, Value>),
    /// 400 "Not found": keep polling. `lost` when the service says it no
    /// longer has the uuid (state "unknown"): enqueue again.
    NotReady {
        lost: bool,
        said_state: bool,
    },
    /// The reward failed for this batch (`error` in the answer).
    Failed(String),
    Retry(String),
    Refused(String),
}

/// https endpoints (hosted reward services) use rustls with ring; reqwest
/// panics building a client without a provider, so call this before any
/// `reqwest::Client` in the process. Installing twice is harmless.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Clone)]
pub struct RemoteClient {
    cfg: RemoteConfig,
    http: reqwest::Client,
}

fn retryable_status(s: u16) -> bool {
    s >= 500 || s == 408 || s == 425 || s == 429
}

async fn text(r: reqwest::Response) -> String {
    let t = r.text().await.unwrap_or_default();
    t.chars().take(500).collect()
}

impl RemoteClient {
    pub fn new(cfg: RemoteConfig) -> Result<Self, reqwest::Error> {
        install_tls_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(cfg.connect_timeout_s))
            .build()?;
        Ok(RemoteClient { cfg, http })
    }

    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        r.header("Authorization", format!("Bearer {}", self.cfg.token))
    }

    pub async fn enqueue(&self, payload: Bytes) -> EnqueueOutcome {
        let timeout = self.cfg.enqueue_timeout(payload.len());
        let r = self
            .auth(self.http.post(&self.cfg.enqueue_url))
            .header("Content-Type", "application/octet-stream")
            .timeout(timeout)
            .body(payload)
            .send()
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => return EnqueueOutcome::Retry(format!("enqueue: {e}")),
        };
        let status = r.status().as_u16();
        if status == 200 {
            let v: Value = match r.json().await {
                Ok(v) => v,
                Err(e) => return EnqueueOutcome::Retry(format!("enqueue answer: {e}")),
            };
            return match v.get("uuid").and_then(Value::as_str) {
                Some(u) => EnqueueOutcome::Accepted {
                    uuid: u.to_string(),
                    replica_id: v
                        .get("replica_id")
                        .and_then(Value::as_str)
                        .map(String::from),
                },
                None => EnqueueOutcome::Refused(format!("enqueue answer has no uuid: {v}")),
            };
        }
        let msg = format!("enqueue: HTTP {status}: {}", text(r).await);
        if retryable_status(status) {
            EnqueueOutcome::Retry(msg)
        } else {
            EnqueueOutcome::Refused(msg)
        }
    }

    pub async fn pull(&self, uuid: &str, reward: &str, replica_id: Option<&str>) -> PullOutcome {
        let mut req = self
            .auth(self.http.post(&self.cfg.fetch_url))
            .timeout(Duration::from_secs_f64(self.cfg.pull_timeout_s))
            .form(&[("uuid", uuid), ("type", reward)]);
        if let Some(r) = replica_id {
            if std::env::var("COSMOS_DISABLE_REMOTE_REWARD_USE_REPLICA").as_deref() != Ok("1") {
                req = req.header("X-Lepton-Replica-Target", r);
            }
        }
        let r = match req.send().await {
            Ok(r) => r,
            Err(e) => return PullOutcome::Retry(format!("pull: {e}")),
        };
        let status = r.status().as_u16();
        if status == 200 {
            let v: Value = match r.json().await {
                Ok(v) => v,
                Err(e) => return PullOutcome::Retry(format!("pull answer: {e}")),
            };
            if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
                return PullOutcome::Failed(format!(
                    "reward {reward:?} failed on the service: {}",
                    e.as_str().map_or_else(|| e.to_string(), String::from)
                ));
            }
            return match v.get("scores") {
                Some(Value::Object(m)) => PullOutcome::Scores(m.clone()),
                _ => PullOutcome::Failed(format!(
                    "reward {reward:?}: answer without a scores object: {v:.300}"
                )),
            };
        }
        if status == 400 {
            let t = r.text().await.unwrap_or_default();
            if let Ok(v) = serde_json::from_str::<Value>(&t) {
                let msg = v.get("message").and_then(Value::as_str).unwrap_or("");
                if msg.starts_with("Not found scores") {
                    let state = v.get("state").and_then(Value::as_str);
                    return PullOutcome::NotReady {
                        lost: state == Some("unknown"),
                        said_state: state.is_some(),
                    };
                }
            }
            return PullOutcome::Refused(format!("pull: HTTP 400: {t:.500}"));
        }
        let msg = format!("pull: HTTP {status}: {}", text(r).await);
        if retryable_status(status) {
            PullOutcome::Retry(msg)
        } else {
            PullOutcome::Refused(msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RemoteConfig {
        RemoteConfig {
            enqueue_url: String::new(),
            fetch_url: String::new(),
            token: String::new(),
            enqueue_timeout_fixed_s: None,
            enqueue_timeout_base_s: 30.0,
            enqueue_timeout_per_mb_s: 3.0,
            enqueue_timeout_min_s: 60.0,
            enqueue_timeout_max_s: 600.0,
            connect_timeout_s: 100.0,
            pull_timeout_s: 10.0,
        }
    }

    #[test]
    fn enqueue_timeout_is_sized_from_the_payload() {
        let mut c = cfg();
        assert_eq!(c.enqueue_timeout(1 << 20), Duration::from_secs(60));
        assert_eq!(c.enqueue_timeout(20 << 20), Duration::from_secs(90));
        assert_eq!(c.enqueue_timeout(1000 << 20), Duration::from_secs(600));
        c.enqueue_timeout_fixed_s = Some(7.5);
        assert_eq!(c.enqueue_timeout(1000 << 20), Duration::from_secs_f64(7.5));
    }

    #[tokio::test]
    async fn a_tls_client_builds_and_reports_connect_errors_as_retryable() {
        // reqwest refuses to build an https client without a crypto provider;
        // nothing listens on port 1, which must read as worth retrying.
        let mut c = cfg();
        c.enqueue_url = "https://127.0.0.1:1/api/reward/enqueue".into();
        c.connect_timeout_s = 2.0;
        let client = RemoteClient::new(c).unwrap();
        match client.enqueue(Bytes::from_static(b"{}\n")).await {
            EnqueueOutcome::Retry(msg) => assert!(msg.contains("enqueue"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}
