//! Scores in Redis, where every replica of the service can answer a pull.
//!
//! Keys (all with a TTL):
//! - `{uuid}_{type}`: the pull answer JSON, the key Cosmos-RL's service uses.
//! - `sana-rl:reward:pending:{uuid}`: the rewards still owed for a uuid and the
//!   service instance computing them.
//! - `sana-rl:reward:instance:{id}`: a heartbeat each running instance renews.
//!
//! A pull that finds no scores tells "still computing" (the pending key's
//! instance is alive) from "this uuid is lost" (no pending key, or its instance
//! stopped beating: it was killed with the work in memory), so a client can
//! enqueue again instead of polling forever.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::time::Duration;

const PENDING: &str = "sana-rl:reward:pending:";
const INSTANCE: &str = "sana-rl:reward:instance:";
/// A heartbeat older than this means the instance is gone.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(5);
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct StoreError(#[from] redis::RedisError);

/// What a pull without scores means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// Queued or being scored by a live instance: retry later.
    Pending,
    /// Never enqueued, expired, or lost with a dead instance: enqueue again.
    Unknown,
    /// The uuid is pending, but its request did not ask for this reward.
    NotRequested,
}

#[derive(Serialize, Deserialize)]
struct PendingEntry {
    instance: String,
    rewards: Vec<String>,
}

#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    ttl_s: u64,
    instance: String,
}

impl Store {
    pub async fn connect(url: &str, ttl_s: u64, instance: String) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, cfg).await?;
        Ok(Store {
            conn,
            ttl_s: ttl_s.max(1),
            instance,
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: () = c
            .set_ex(
                format!("{INSTANCE}{}", self.instance),
                1,
                HEARTBEAT_TTL.as_secs(),
            )
            .await?;
        Ok(())
    }

    /// Forget this instance's heartbeat (clean shutdown: anything still pending is lost).
    pub async fn retire(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: () = c.del(format!("{INSTANCE}{}", self.instance)).await?;
        Ok(())
    }

    pub async fn mark_pending(&self, uuid: &str, rewards: &[String]) -> Result<(), StoreError> {
        let entry = PendingEntry {
            instance: self.instance.clone(),
            rewards: rewards.to_vec(),
        };
        let mut c = self.conn.clone();
        let _: () = c
            .set_ex(
                format!("{PENDING}{uuid}"),
                serde_json::to_string(&entry).expect("serializable"),
                self.ttl_s,
            )
            .await?;
        Ok(())
    }

    pub async fn put_result(
        &self,
        uuid: &str,
        reward: &str,
        json: &[u8],
    ) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: () = c
            .set_ex(format!("{uuid}_{reward}"), json, self.ttl_s)
            .await?;
        Ok(())
    }

    pub async fn clear_pending(&self, uuid: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: () = c.del(format!("{PENDING}{uuid}")).await?;
        Ok(())
    }

    pub async fn get_result(
        &self,
        uuid: &str,
        reward: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut c = self.conn.clone();
        Ok(c.get(format!("{uuid}_{reward}")).await?)
    }

    pub async fn missing(&self, uuid: &str, reward: &str) -> Result<Missing, StoreError> {
        let mut c = self.conn.clone();
        let pending: Option<String> = c.get(format!("{PENDING}{uuid}")).await?;
        let Some(entry) = pending.and_then(|p| serde_json::from_str::<PendingEntry>(&p).ok())
        else {
            return Ok(Missing::Unknown);
        };
        if !entry.rewards.iter().any(|r| r == reward) {
            return Ok(Missing::NotRequested);
        }
        let alive: bool = c.exists(format!("{INSTANCE}{}", entry.instance)).await?;
        Ok(if alive {
            Missing::Pending
        } else {
            Missing::Unknown
        })
    }
}
