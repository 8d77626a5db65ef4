//! Local processes of a run: spawned with their output in `<run>/logs/`,
//! watched so a death is reported at once with its last log lines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the other sana-rl binaries are: `$SANA_RL_BIN_DIR`, else beside this one.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("SANA_RL_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()?
            .parent()
            .context("the controller's own path has no parent")?
            .to_path_buf(),
    };
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace (`cargo build --release`) so every binary sits beside the controller, or set SANA_RL_BIN_DIR",
            p.display()
        );
    }
    Ok(p)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Expected to exit (shutdown asked); its exit is not a failure.
    stopping: bool,
}

/// The run's child processes.
#[derive(Clone, Default)]
pub struct Fleet {
    procs: Arc<Mutex<Vec<Proc>>>,
    /// A worker that stopped answering heartbeats (set by the heartbeat task).
    unresponsive: Arc<Mutex<Option<String>>>,
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Fleet {
    /// Starts `cmd` as `name`, stdout and stderr to `<log_dir>/<name>.log`.
    pub fn spawn(&self, name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<u32> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        // Appended: after a restart the log still holds why the last attempt died.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        if f.metadata().map_or(0, |m| m.len()) > 0 {
            use std::io::Write;
            writeln!(f, "\n==== {name} started again ====")?;
        }
        cmd.stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f))
            .stdin(Stdio::null());
        // An error a worker exits with is one line at the end of its log (what
        // the controller shows), not buried under a backtrace that
        // RUST_BACKTRACE=1 would add; panics keep theirs.
        if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
            cmd.env("RUST_LIB_BACKTRACE", "0");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let pid = child.id();
        tracing::info!(name, pid, log = %log.display(), "started");
        self.procs.lock().unwrap().push(Proc {
            name: name.into(),
            child,
            log,
            stopping: false,
        });
        Ok(pid)
    }

    /// The first process that exited unexpectedly, as a message naming it, its
    /// exit status and the end of its log.
    pub fn dead(&self) -> Option<String> {
        if let Some(msg) = self.unresponsive.lock().unwrap().clone() {
            return Some(msg);
        }
        let mut procs = self.procs.lock().unwrap();
        for p in procs.iter_mut() {
            if p.stopping {
                continue;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                p.stopping = true;
                return Some(format!(
                    "{} (pid {}) exited ({status}); the end of {}:\n{}",
                    p.name,
                    p.child.id(),
                    p.log.display(),
                    tail(&p.log, 15)
                ));
            }
        }
        None
    }

    /// Drops `name` from the fleet if it has exited (a start to be retried);
    /// whether it had.
    pub fn forget_exited(&self, name: &str) -> bool {
        let mut procs = self.procs.lock().unwrap();
        let before = procs.len();
        procs.retain_mut(|p| p.name != name || !matches!(p.child.try_wait(), Ok(Some(_))));
        procs.len() < before
    }

    /// Reports `name` as not answering its heartbeats (it may be alive but stuck).
    pub fn mark_unresponsive(&self, name: &str, why: &str) {
        let log = self
            .procs
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.name == name)
            .map(|p| (p.child.id(), p.log.clone()));
        let msg = match log {
            Some((pid, log)) => format!(
                "{name} (pid {pid}) stopped answering heartbeats ({why}); the end of {}:\n{}",
                log.display(),
                tail(&log, 15)
            ),
            None => format!("{name} stopped answering heartbeats ({why})"),
        };
        *self.unresponsive.lock().unwrap() = Some(msg);
    }

    /// `[{name, pid, log}]` of every process started, for operators and tests.
    pub fn describe(&self) -> serde_json::Value {
        let procs = self.procs.lock().unwrap();
        serde_json::Value::Array(
            procs
                .iter()
                .map(|p| serde_json::json!({"name": p.name, "pid": p.child.id(), "log": p.log}))
                .collect(),
        )
    }

    /// Marks a process as expected to exit (after a Shutdown call).
    pub fn expect_exit(&self, name: &str) {
        for p in self
            .procs
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|p| p.name == name)
        {
            p.stopping = true;
        }
    }

    /// Waits up to `grace` for everything to exit, then kills what is left (last started first).
    pub fn stop_all(&self, grace: Duration) {
        let started = Instant::now();
        let mut procs = self.procs.lock().unwrap();
        for p in procs.iter_mut() {
            p.stopping = true;
        }
        for p in procs.iter_mut().rev() {
            // SIGTERM first: the services finish what they hold and exit.
            unsafe_term(p.child.id());
        }
        loop {
            let all = procs
                .iter_mut()
                .all(|p| matches!(p.child.try_wait(), Ok(Some(_))));
            if all || started.elapsed() > grace {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in procs.iter_mut().rev() {
            if !matches!(p.child.try_wait(), Ok(Some(_))) {
                tracing::warn!(name = %p.name, "did not stop in time; killed");
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }

    /// Kills one process at once (tests and fault handling).
    pub fn kill(&self, name: &str) {
        for p in self
            .procs
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|p| p.name == name)
        {
            let _ = p.child.kill();
        }
    }
}

fn unsafe_term(pid: u32) {
    // `kill -TERM`: std has no portable SIGTERM.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits until `addr` accepts TCP connections, failing early if a process of the
/// fleet died (its log tail in the message) or after `timeout`.
pub async fn wait_for_port(
    fleet: &Fleet,
    name: &str,
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(dead) = fleet.dead() {
            bail!("{dead}");
        }
        if started.elapsed() > timeout {
            bail!("{name} did not open {addr} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
