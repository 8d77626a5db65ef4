//! A `redis-server` child process: the service's embedded Redis (as Cosmos-RL's
//! service starts one), and the Redis that tests and benchmarks run against.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RedisServerError {
    #[error("cannot start {bin:?} (install Debian's redis-server; scripts/env.sh does): {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("redis-server exited during startup ({0}); see its log at {1}")]
    Exited(String, String),
    #[error("redis-server did not answer PING within {0:?}")]
    NotReady(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where a Redis listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl RedisAddr {
    /// A `redis://` / `redis+unix://` URL for the `redis` crate.
    pub fn url(&self) -> String {
        match self {
            RedisAddr::Tcp { host, port } => format!("redis://{host}:{port}/"),
            RedisAddr::Unix(p) => format!("redis+unix://{}", p.display()),
        }
    }
}

/// A running `redis-server`, stopped when dropped.
pub struct RedisServer {
    child: Child,
    addr: RedisAddr,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// On a unix socket in a fresh temp dir: no port to collide with.
    pub fn start_unix(bin: &str) -> Result<Self, RedisServerError> {
        let dir = tempfile::Builder::new()
            .prefix("sana-rl-redis-")
            .tempdir()?;
        let sock = dir.path().join("redis.sock");
        let args = vec![
            "--port".to_string(),
            "0".to_string(),
            "--unixsocket".to_string(),
            sock.display().to_string(),
            "--unixsocketperm".to_string(),
            "700".to_string(),
        ];
        Self::start(bin, dir, args, RedisAddr::Unix(sock))
    }

    /// On `127.0.0.1:port` (tests pick a free port; `port` 0 picks one here).
    pub fn start_tcp(bin: &str, port: u16) -> Result<Self, RedisServerError> {
        let port = if port == 0 { free_port()? } else { port };
        let dir = tempfile::Builder::new()
            .prefix("sana-rl-redis-")
            .tempdir()?;
        let args = vec![
            "--port".to_string(),
            port.to_string(),
            "--bind".to_string(),
            "127.0.0.1".to_string(),
        ];
        Self::start(
            bin,
            dir,
            args,
            RedisAddr::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
        )
    }

    fn start(
        bin: &str,
        dir: tempfile::TempDir,
        mut args: Vec<String>,
        addr: RedisAddr,
    ) -> Result<Self, RedisServerError> {
        let log = dir.path().join("redis.log");
        args.extend(
            [
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                // As Cosmos-RL's embedded Redis: bounded, evicting the least used.
                "--maxmemory",
                "5gb",
                "--maxmemory-policy",
                "allkeys-lfu",
            ]
            .map(String::from),
        );
        args.push("--dir".into());
        args.push(dir.path().display().to_string());
        args.push("--logfile".into());
        args.push(log.display().to_string());
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| RedisServerError::Spawn {
            bin: bin.to_string(),
            source,
        })?;
        let mut server = RedisServer {
            child,
            addr,
            _dir: dir,
        };
        server.wait_ready(&log, Duration::from_secs(10))?;
        Ok(server)
    }

    fn wait_ready(&mut self, log: &Path, limit: Duration) -> Result<(), RedisServerError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(RedisServerError::Exited(
                    status.to_string(),
                    log.display().to_string(),
                ));
            }
            if ping(&self.addr) {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(RedisServerError::NotReady(limit));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> &RedisAddr {
        &self.addr
    }

    pub fn url(&self) -> String {
        self.addr.url()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw RESP PING, so readiness needs no async runtime.
fn ping(addr: &RedisAddr) -> bool {
    use std::io::{Read, Write};
    fn talk<S: Read + Write>(mut s: S) -> bool {
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
    match addr {
        RedisAddr::Tcp { host, port } => std::net::TcpStream::connect((host.as_str(), *port))
            .is_ok_and(|s| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                talk(s)
            }),
        RedisAddr::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok_and(|s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            talk(s)
        }),
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Have the kernel stop the child if this process dies without dropping it
/// (SIGKILL), so an embedded Redis never outlives its service.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
