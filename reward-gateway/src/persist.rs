//! Pending work in Redis, so a restarted gateway picks up where it stopped.
//!
//! Keys (under the configured prefix):
//! - `req:{id}`: a request as submitted (protobuf), until it is answered.
//! - `pending`: the set of request ids not answered yet.
//! - `batch:{bid}`: a batch's members and, once enqueued, its service uuid
//!   (JSON); `batches`: the set of batch ids in flight.
//! - `res:{id}`: the answer (protobuf result or error), kept `result_ttl_s`.
//!
//! Answering a batch writes every answer and clears its pending state in one
//! MULTI, so a crash leaves each request either pending or answered, never both.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct PersistError(#[from] redis::RedisError);

/// A batch's durable state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchRecord {
    pub members: Vec<String>,
    pub validation: bool,
    pub uuid: Option<String>,
    pub replica_id: Option<String>,
    pub attempts: u32,
}

/// Redis, or nothing (in-memory gateway).
#[derive(Clone)]
pub enum Persist {
    None,
    Redis {
        conn: ConnectionManager,
        prefix: String,
        ttl_s: u64,
    },
}

/// A stored request: its id and protobuf bytes.
pub type StoredRequest = (String, Vec<u8>);

/// What a restarted gateway finds.
#[derive(Default)]
pub struct Recovered {
    /// Batches in flight (id, record, members' requests).
    pub batches: Vec<(String, BatchRecord, Vec<StoredRequest>)>,
    /// Requests not in any batch yet.
    pub loose: Vec<StoredRequest>,
}

impl Persist {
    pub async fn redis(url: &str, prefix: String, ttl_s: u64) -> Result<Self, PersistError> {
        let client = redis::Client::open(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let conn = ConnectionManager::new_with_config(client, cfg).await?;
        Ok(Persist::Redis {
            conn,
            prefix,
            ttl_s: ttl_s.max(1),
        })
    }

    pub fn is_durable(&self) -> bool {
        matches!(self, Persist::Redis { .. })
    }

    pub async fn save_request(&self, id: &str, bytes: &[u8]) -> Result<(), PersistError> {
        let Persist::Redis { conn, prefix, .. } = self else {
            return Ok(());
        };
        let mut c = conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .set(format!("{prefix}req:{id}"), bytes)
            .sadd(format!("{prefix}pending"), id)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    pub async fn save_batch(&self, bid: &str, rec: &BatchRecord) -> Result<(), PersistError> {
        let Persist::Redis { conn, prefix, .. } = self else {
            return Ok(());
        };
        let mut c = conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .set(
                format!("{prefix}batch:{bid}"),
                serde_json::to_string(rec).expect("serializable"),
            )
            .sadd(format!("{prefix}batches"), bid)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Store every member's answer and forget the batch, atomically.
    pub async fn finish(
        &self,
        bid: &str,
        answers: &[(String, Vec<u8>)],
    ) -> Result<(), PersistError> {
        let Persist::Redis {
            conn,
            prefix,
            ttl_s,
        } = self
        else {
            return Ok(());
        };
        let mut c = conn.clone();
        let mut p = redis::pipe();
        p.atomic();
        for (id, bytes) in answers {
            p.set_ex(format!("{prefix}res:{id}"), bytes.as_slice(), *ttl_s)
                .srem(format!("{prefix}pending"), id)
                .del(format!("{prefix}req:{id}"));
        }
        p.del(format!("{prefix}batch:{bid}"))
            .srem(format!("{prefix}batches"), bid);
        let _: () = p.query_async(&mut c).await?;
        Ok(())
    }

    pub async fn get_answer(&self, id: &str) -> Result<Option<Vec<u8>>, PersistError> {
        let Persist::Redis { conn, prefix, .. } = self else {
            return Ok(None);
        };
        let mut c = conn.clone();
        Ok(c.get(format!("{prefix}res:{id}")).await?)
    }

    pub async fn has_request(&self, id: &str) -> Result<bool, PersistError> {
        let Persist::Redis { conn, prefix, .. } = self else {
            return Ok(false);
        };
        let mut c = conn.clone();
        Ok(c.sismember(format!("{prefix}pending"), id).await?)
    }

    /// Everything a previous run left pending.
    pub async fn recover(&self) -> Result<Recovered, PersistError> {
        let Persist::Redis { conn, prefix, .. } = self else {
            return Ok(Recovered::default());
        };
        let mut c = conn.clone();
        let mut out = Recovered::default();
        let bids: Vec<String> = c.smembers(format!("{prefix}batches")).await?;
        let mut in_batches = std::collections::HashSet::new();
        for bid in bids {
            let raw: Option<String> = c.get(format!("{prefix}batch:{bid}")).await?;
            let Some(rec) = raw.and_then(|r| serde_json::from_str::<BatchRecord>(&r).ok()) else {
                let _: () = c.srem(format!("{prefix}batches"), &bid).await?;
                continue;
            };
            let mut reqs = Vec::new();
            for id in &rec.members {
                in_batches.insert(id.clone());
                let raw: Option<Vec<u8>> = c.get(format!("{prefix}req:{id}")).await?;
                if let Some(r) = raw {
                    reqs.push((id.clone(), r));
                }
            }
            out.batches.push((bid, rec, reqs));
        }
        let ids: Vec<String> = c.smembers(format!("{prefix}pending")).await?;
        for id in ids.into_iter().filter(|i| !in_batches.contains(i)) {
            let raw: Option<Vec<u8>> = c.get(format!("{prefix}req:{id}")).await?;
            match raw {
                Some(r) => out.loose.push((id, r)),
                None => {
                    let _: () = c.srem(format!("{prefix}pending"), &id).await?;
                }
            }
        }
        Ok(out)
    }

    /// How many requests are pending (for tests and logs).
    pub async fn pending_count(&self) -> Result<usize, PersistError> {
        let Persist::Redis { conn, prefix, .. } = self else {
            return Ok(0);
        };
        let mut c = conn.clone();
        Ok(c.scard(format!("{prefix}pending")).await?)
    }
}
