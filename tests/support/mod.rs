//! Test harness shared by the integration tests (`mod support;`).
//!
//! Dependency-free (std only). It starts private `redis-server` processes on
//! free loopback ports, so the tests never depend on a system Redis service
//! (the Debian package's own service on 6379, if any, is never used).
//!
//! * [`RedisServer`] — one private server, owned by a test; killed (and its
//!   temp dir removed) on drop. It also offers `stop`/`restart`/`sigstop`/
//!   `sigcont` for fault-injection tests.
//! * [`redis_url`] — `$REDIS_URL` if set and non-empty, else the URL of a
//!   server shared by every test of this test binary, started lazily once.
//!   The shared server lives until the test binary exits: it is never
//!   dropped, so a small `sh` watchdog (one per server, see
//!   [`RedisServer::start`]) kills it within ~0.5 s of the test process
//!   going away, however that happens (normal exit, panic, abort, SIGKILL).
//! * [`unique_prefix`] — alphanumeric key prefixes, unique per call and per
//!   process, so tests sharing one server never see each other's keys.
//!
//! If `redis-server` is not on `PATH` and `REDIS_URL` is unset, every
//! function that needs a server panics with a message saying how to get one;
//! tests are never skipped silently.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Message of the panic raised when no Redis is available to the tests.
pub const NO_REDIS_MESSAGE: &str = "no Redis for the tests: install redis-server \
     (Debian: apt-get install -y redis-server), or set REDIS_URL=redis://127.0.0.1:6379 \
     — or run scripts/test.sh, which installs it";

/// How long to wait for a freshly started server to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How many ports to try before giving up on starting a server.
const START_ATTEMPTS: usize = 5;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A private `redis-server` on `127.0.0.1:<free port>`, owned by the caller.
///
/// Runs with no persistence (`--save "" --appendonly no`) in a fresh temp
/// dir, which also holds its log (`redis.log`) and pid file (`redis.pid`).
/// Dropping it kills the server (SIGKILL, even when SIGSTOPped) and removes
/// the temp dir.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// `None` while stopped.
    child: Option<Child>,
    /// The `sh` process that kills `child` if the test process dies first.
    watchdog: Option<Child>,
    /// Pid of the last started server (kept after `stop`).
    pid: u32,
}

impl RedisServer {
    /// Starts a new server on a free loopback port and waits until it
    /// answers PING. Tries up to 5 ports; panics if none works, or if
    /// `redis-server` is not installed.
    pub fn start() -> RedisServer {
        ensure_redis_server_installed();
        let dir = fresh_temp_dir();
        let mut errors = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = match free_port() {
                Ok(port) => port,
                Err(e) => {
                    errors.push(format!("picking a free port: {e}"));
                    continue;
                }
            };
            match spawn_and_wait(&dir, port) {
                Ok((child, watchdog)) => {
                    let pid = child.id();
                    return RedisServer {
                        port,
                        dir,
                        child: Some(child),
                        watchdog: Some(watchdog),
                        pid,
                    };
                }
                Err(e) => errors.push(format!("port {port}: {e}")),
            }
        }
        let log = read_log(&dir);
        let _ = fs::remove_dir_all(&dir);
        panic!(
            "could not start redis-server after {START_ATTEMPTS} attempts:\n  {}\nlast log:\n{log}",
            errors.join("\n  ")
        );
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The loopback port the server listens on (stays the same across
    /// `restart`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Pid of the server process (the latest one after a `restart`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's temp dir (holds `redis.log` and `redis.pid`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Contents of the server's log so far (for failure messages).
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// True while a server process is running (i.e. not `stop`ped).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// True if the port answers `PING` with `+PONG` within ~1 s (false
    /// while stopped or SIGSTOPped).
    pub fn ping(&self) -> bool {
        ping_port(self.port, Duration::from_secs(1))
    }

    /// Kills the server (SIGKILL, so no graceful shutdown) and waits for it
    /// to exit. The port then refuses connections. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// Stops the server if running, then starts a fresh one (empty data
    /// set) on the same port and waits until it answers PING. Panics if the
    /// port cannot be reused within ~5 s.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn_and_wait(&self.dir, self.port) {
                Ok((child, watchdog)) => {
                    self.pid = child.id();
                    self.child = Some(child);
                    self.watchdog = Some(watchdog);
                    return;
                }
                Err(e) if Instant::now() >= deadline => panic!(
                    "could not restart redis-server on port {}: {e}\nlog:\n{}",
                    self.port,
                    self.log()
                ),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freezes the server with SIGSTOP: connections are still accepted by
    /// the kernel but nothing is answered until `sigcont`.
    pub fn sigstop(&self) {
        self.signal("STOP");
    }

    /// Resumes a server frozen by `sigstop` (SIGCONT).
    pub fn sigcont(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        assert!(self.child.is_some(), "redis-server is stopped");
        // The shell builtin `kill` is always there; /bin/kill (procps) may not be.
        let status = Command::new("sh")
            .args([
                "-c",
                "kill -s \"$1\" \"$2\"",
                "sh",
                sig,
                &self.pid.to_string(),
            ])
            .status()
            .expect("running sh to send a signal");
        assert!(status.success(), "kill -{sig} {} failed", self.pid);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The Redis URL for tests that just need *a* server: `$REDIS_URL` if set
/// and non-empty, else the URL of a server shared by the whole test binary
/// (started on first use; lives until the test binary exits). Tests sharing
/// it must keep to their own keys (see [`unique_prefix`]).
pub fn redis_url() -> String {
    if let Some(url) = env_redis_url() {
        return url;
    }
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    // Never dropped (statics aren't): the server's watchdog kills it once
    // this process is gone.
    SHARED.get_or_init(RedisServer::start).url()
}

/// `$REDIS_URL` if it is set and non-empty.
pub fn env_redis_url() -> Option<String> {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// An alphanumeric-only string (`[A-Za-z0-9]+`) unique per call, within this
/// process and across processes: the tag's alphanumeric chars, then the pid,
/// a per-process counter and the current time in nanoseconds (base 36).
pub fn unique_prefix(tag: &str) -> String {
    let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{tag}p{}c{}t{}",
        base36(u128::from(std::process::id())),
        base36(u128::from(n)),
        base36(nanos)
    )
}

/// True if `127.0.0.1:<port>` answers `PING` with `+PONG` within `timeout`
/// (for connect, write and read each).
pub fn ping_port(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(_) => line.trim_end() == "+PONG",
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------

fn ensure_redis_server_installed() {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("redis-server").is_file())
    });
    if !found {
        panic!("{NO_REDIS_MESSAGE}");
    }
}

fn fresh_temp_dir() -> PathBuf {
    let base = std::env::temp_dir();
    loop {
        let dir = base.join(format!("ticketlock-redis-{}", unique_prefix("")));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("creating temp dir {}: {e}", dir.display()),
        }
    }
}

fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    drop(listener);
    Ok(port)
}

fn read_log(dir: &Path) -> String {
    let mut log = String::new();
    if let Ok(mut f) = File::open(dir.join("redis.log")) {
        let _ = f.read_to_string(&mut log);
    }
    log
}

/// Spawns redis-server on `port` plus its watchdog, and waits until it
/// answers PING and is verifiably *our* process (not another server that
/// already held the port).
fn spawn_and_wait(dir: &Path, port: u16) -> Result<(Child, Child), String> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .map_err(|e| format!("opening log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("cloning log: {e}"))?;
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                panic!("{NO_REDIS_MESSAGE}");
            }
            format!("spawning redis-server: {e}")
        })?;
    let pid = child.id();
    let _ = fs::write(dir.join("redis.pid"), format!("{pid}\n"));

    let mut watchdog = match spawn_watchdog(pid, dir) {
        Ok(w) => w,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("spawning watchdog: {e}"));
        }
    };

    let result = wait_until_ready(&mut child, port);
    if let Err(e) = result {
        let _ = child.kill();
        let _ = child.wait();
        let _ = watchdog.kill();
        let _ = watchdog.wait();
        return Err(e);
    }
    Ok((child, watchdog))
}

/// A `sh` loop that polls this test process every 0.5 s and, once it is
/// gone, SIGKILLs the redis-server and removes its temp dir. Killed by
/// `RedisServer::stop` before the server itself goes, so it never outlives
/// its server to hit a reused pid.
fn spawn_watchdog(redis_pid: u32, dir: &Path) -> io::Result<Child> {
    const SCRIPT: &str = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
        case "$(cat "/proc/$2/comm" 2>/dev/null || echo redis-server)" in
            redis*) kill -s KILL "$2" 2>/dev/null ;;
        esac
        sleep 0.2
        rm -rf "$3"
    "#;
    Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("ticketlock-redis-watchdog")
        .arg(std::process::id().to_string())
        .arg(redis_pid.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn wait_until_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited early ({status})"));
        }
        if ping_port(port, Duration::from_millis(250)) {
            // Someone else may hold the port (our server then fails to bind
            // and exits): make sure the one answering is ours.
            return match server_pid(port) {
                Some(pid) if pid == child.id() => Ok(()),
                Some(pid) => Err(format!("port taken by another redis-server (pid {pid})")),
                None => Err("port taken by something that is not our redis-server".into()),
            };
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "redis-server did not answer PING within {START_TIMEOUT:?}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `process_id` from `INFO server`, read with a minimal RESP exchange.
fn server_pid(port: u16) -> Option<u32> {
    let timeout = Duration::from_secs(1);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header).ok()?;
    let len: usize = header.trim_end().strip_prefix('$')?.parse().ok()?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}
