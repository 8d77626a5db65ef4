//! The `command` reward: a user's scorer process (any language), started once
//! and kept alive across batches, spoken to with one JSON line per batch.
//!
//! ```text
//! service → scorer (stdin), one line per batch:
//!   {"id": 7, "reward": "pickscore", "npy_path": "/tmp/…/7.npy", "media_type": "image",
//!    "dtype": "uint8", "shape": [8, 512, 512, 3], "prompts": ["…", …],
//!    "video_infos": null, "extras": {…}}
//! scorer → service (stdout), one line per batch:
//!   {"id": 7, "scores": {"pickscore": [0.21, …]}}     one value per item for every list
//!   {"id": 7, "error": "why it could not score"}
//! ```
//!
//! The array is a `.npy` file (`numpy.load(path)` reads it), removed once the
//! scorer answers. Stdout lines that do not start with `{` are logged and
//! skipped (libraries print), stderr passes through. A scorer must exit when
//! its stdin closes; one that dies, hangs past `timeout_s` or answers garbage
//! is killed and started again for the next batch.

use super::{BuildError, Reward, RewardError, Scores};
use crate::body::{Enqueue, MediaType};
use crate::config::RewardArgs;
use crate::npy;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The keys a `command` reward takes in its `[[reward_args]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandArgs {
    /// The name clients use in `reward_fn` and `type`.
    pub name: String,
    /// Program and arguments, e.g. `["python3", "scorers/pickscore.py"]`.
    pub command: Vec<String>,
    /// Media types the scorer accepts (default: image and video).
    #[serde(default = "default_media")]
    pub media_types: Vec<MediaType>,
    /// Seconds a batch may take before the scorer is killed and restarted.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Scorer processes run side by side (each takes one batch at a time).
    #[serde(default = "one")]
    pub processes: usize,
    /// Extra environment for the scorer.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the scorer.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Where the per-batch `.npy` files go (default: the system temp dir).
    #[serde(default)]
    pub tmp_dir: Option<PathBuf>,
}

fn default_media() -> Vec<MediaType> {
    vec![MediaType::Image, MediaType::Video]
}
fn default_timeout() -> f64 {
    600.0
}
fn one() -> usize {
    1
}

/// A running scorer: its stdin and a channel of its stdout lines.
struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Running {
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct CommandReward {
    args: CommandArgs,
    /// Idle process slots; `None` is a slot whose scorer must be (re)started.
    idle: Mutex<Vec<Option<Running>>>,
    freed: Condvar,
    next_id: AtomicU64,
}

impl CommandReward {
    pub fn from_args(a: &RewardArgs) -> Result<Self, BuildError> {
        let bad = |msg: String| BuildError::Bad {
            reward: a
                .rest
                .get("name")
                .map_or("command".into(), |v| v.to_string()),
            msg,
        };
        let args: CommandArgs = toml::Value::Table(a.rest.clone())
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
        if args.command.is_empty() {
            return Err(bad("`command` is empty".into()));
        }
        if args.processes == 0 {
            return Err(bad("`processes` must be at least 1".into()));
        }
        if args.timeout_s.is_nan() || args.timeout_s <= 0.0 {
            return Err(bad("`timeout_s` must be positive".into()));
        }
        let slots = (0..args.processes).map(|_| None).collect();
        Ok(CommandReward {
            args,
            idle: Mutex::new(slots),
            freed: Condvar::new(),
            next_id: AtomicU64::new(1),
        })
    }

    fn spawn(&self) -> Result<Running, RewardError> {
        let mut cmd = Command::new(&self.args.command[0]);
        cmd.args(&self.args.command[1..])
            .envs(&self.args.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(dir) = &self.args.workdir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| {
            RewardError::Scorer(format!("cannot start {:?}: {e}", self.args.command))
        })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let name = self.args.name.clone();
        std::thread::Builder::new()
            .name(format!("scorer-{name}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.trim_start().starts_with('{') {
                        if tx.send(line).is_err() {
                            break;
                        }
                    } else {
                        tracing::info!(reward = %name, "scorer: {line}");
                    }
                }
            })
            .map_err(|e| RewardError::Scorer(format!("cannot start a reader thread: {e}")))?;
        tracing::info!(reward = %self.args.name, pid = child.id(), "started scorer {:?}", self.args.command);
        Ok(Running {
            child,
            stdin,
            lines: rx,
        })
    }

    fn checkout(&self) -> Option<Running> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(slot) = idle.pop() {
                return slot;
            }
            idle = self.freed.wait(idle).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn checkin(&self, slot: Option<Running>) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot);
        self.freed.notify_one();
    }

    /// One request/answer exchange; on any failure the process is not reusable.
    fn exchange(&self, proc: &mut Running, id: u64, line: &str) -> Result<Scores, RewardError> {
        writeln!(proc.stdin, "{line}")
            .and_then(|_| proc.stdin.flush())
            .map_err(|e| RewardError::Scorer(format!("writing to the scorer failed: {e}")))?;
        let timeout = Duration::from_secs_f64(self.args.timeout_s);
        let answer = match proc.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                return Err(RewardError::Scorer(format!(
                    "no answer within timeout_s = {}",
                    self.args.timeout_s
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = proc.child.try_wait().ok().flatten();
                return Err(RewardError::Scorer(format!(
                    "scorer exited ({}) before answering",
                    status.map_or("stdout closed".into(), |s| s.to_string())
                )));
            }
        };
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| RewardError::Scorer(format!("answer is not JSON ({e}): {answer:.200}")))?;
        // Answers come back in order on a process that only ever holds one batch (a
        // process that timed out is killed), so a different id is a protocol error.
        match v.get("id").and_then(Value::as_u64) {
            Some(got) if got == id => parse_answer(v),
            _ => Err(RewardError::Scorer(format!(
                "answer does not carry \"id\": {id}: {answer:.200}"
            ))),
        }
    }
}

fn parse_answer(v: Value) -> Result<Scores, RewardError> {
    if let Some(e) = v.get("error") {
        let msg = e.as_str().map_or_else(|| e.to_string(), str::to_string);
        return Err(RewardError::Compute(msg));
    }
    match v.get("scores") {
        Some(Value::Object(m)) => Ok(m.clone()),
        _ => Err(RewardError::Scorer(
            "answer has neither \"scores\" (an object) nor \"error\"".into(),
        )),
    }
}

/// Every list of scores must have one entry per item (nested objects are checked alike).
fn check_lengths(scores: &Scores, batch: usize, path: &str) -> Result<(), RewardError> {
    for (k, v) in scores {
        match v {
            Value::Array(a) if a.len() != batch => {
                return Err(RewardError::Scorer(format!(
                    "scores{path}.{k} has {} values for a batch of {batch}",
                    a.len()
                )))
            }
            Value::Object(m) => check_lengths(m, batch, &format!("{path}.{k}"))?,
            _ => {}
        }
    }
    Ok(())
}

impl Reward for CommandReward {
    fn name(&self) -> &str {
        &self.args.name
    }

    fn check(&self, req: &Enqueue) -> Result<(), String> {
        if !self.args.media_types.contains(&req.media_type) {
            return Err(format!(
                "{} does not take media_type {:?} (it takes {:?})",
                self.args.name,
                req.media_type.as_str(),
                self.args
                    .media_types
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
            ));
        }
        Ok(())
    }

    fn score(&self, req: &Enqueue) -> Result<Scores, RewardError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dir = self.args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
        let mut file = tempfile::Builder::new()
            .prefix(&format!("sana-rl-{}-{id}-", self.args.name))
            .suffix(".npy")
            .tempfile_in(&dir)
            .map_err(|e| RewardError::Scorer(format!("temp file in {}: {e}", dir.display())))?;
        let mut header = Vec::new();
        npy::write_header(&mut header, req.array.dtype, &req.array.shape);
        file.write_all(&header)
            .and_then(|_| file.write_all(&req.array.data))
            .and_then(|_| file.flush())
            .map_err(|e| RewardError::Scorer(format!("writing the batch file: {e}")))?;
        let line = json!({
            "id": id,
            "reward": self.args.name,
            "npy_path": file.path(),
            "media_type": req.media_type.as_str(),
            "dtype": req.array.dtype.descr(),
            "shape": req.array.shape,
            "prompts": req.prompts,
            "video_infos": req.video_infos,
            "extras": req.extras,
        })
        .to_string();

        let slot = self.checkout();
        let mut proc = match slot {
            Some(p) => p,
            None => match self.spawn() {
                Ok(p) => p,
                Err(e) => {
                    self.checkin(None);
                    return Err(e);
                }
            },
        };
        match self.exchange(&mut proc, id, &line) {
            Ok(scores) => {
                self.checkin(Some(proc));
                check_lengths(&scores, req.batch(), "")?;
                Ok(scores)
            }
            // The scorer answered "error" for this batch: it is still healthy.
            Err(e @ RewardError::Compute(_)) => {
                self.checkin(Some(proc));
                Err(e)
            }
            Err(e) => {
                tracing::warn!(reward = %self.args.name, "killing scorer: {e}");
                proc.kill();
                self.checkin(None);
                Err(e)
            }
        }
    }

    fn shutdown(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for slot in idle.iter_mut() {
            if let Some(mut p) = slot.take() {
                // Closing stdin asks the scorer to exit; give it a moment, then insist.
                drop(p.stdin);
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while std::time::Instant::now() < deadline {
                    if let Ok(Some(_)) = p.child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}
