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
//! * [`RedisServer::start_with`] / [`RedisServer::start_tls`] — a private
//!   server with extra `redis-server` arguments (`--requirepass`, ACLs, ...)
//!   or serving TLS only, with a throwaway CA and server certificate made by
//!   [`generate_tls_certs`] (needs the `openssl` CLI). `restart` keeps the
//!   same arguments and certificates.
//!
//! * [`RedisServer::start_tls_mutual`] / [`generate_client_cert`] — a TLS
//!   server that requires a client certificate signed by its CA.
//! * [`RedisCluster`] — a private Redis Cluster of N masters (one
//!   `RedisServer` each, `--cluster-enabled yes`), created with
//!   `redis-cli --cluster create`; [`cluster_url`] is one shared by the test
//!   binary. [`SentinelServer`] — a private Redis Sentinel monitoring a
//!   master. Both are on 127.0.0.1, stopped by pid like every server here.
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
use std::sync::{mpsc, OnceLock};
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
/// What redis-server logs once it listens on every configured port.
const READY_LINE: &str = "Ready to accept connections";
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

/// Message of the panic raised when a TLS test needs the `openssl` CLI.
pub const NO_OPENSSL_MESSAGE: &str = "the TLS tests need the openssl CLI to make throwaway \
     certificates: install it (Debian: apt-get install -y openssl) — or run scripts/test.sh, \
     which installs it";

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
    /// How it was launched; `restart` launches the same way.
    launch: Launch,
}

/// How a server is launched (kept for `restart`).
#[derive(Debug, Clone, Default)]
struct Launch {
    /// Extra `redis-server` arguments, after the harness's own.
    extra_args: Vec<String>,
    /// TLS only (`--port 0 --tls-port <port>`) with these files.
    tls: Option<TlsFiles>,
    /// The `--requirepass` value, if any (used by `ping`).
    password: Option<String>,
    /// The client certificate `ping` presents ([`RedisServer::start_tls_mutual`]).
    client_cert: Option<ClientCert>,
}

impl Launch {
    /// The original `start()`: plain port, no extra args; readiness is a
    /// PING answered by our own pid, exactly as before.
    fn is_plain_default(&self) -> bool {
        self.tls.is_none() && self.extra_args.is_empty()
    }
}

/// A throwaway CA and a server certificate for `127.0.0.1` (and
/// `localhost`) signed by it, as PEM files (see [`generate_tls_certs`]).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (self-signed): trust this to verify the server.
    pub ca_cert: PathBuf,
    /// The CA's private key.
    pub ca_key: PathBuf,
    /// The server certificate (SAN `IP:127.0.0.1`, `DNS:localhost`).
    pub cert: PathBuf,
    /// The server certificate's private key.
    pub key: PathBuf,
}

impl RedisServer {
    /// Starts a new server on a free loopback port and waits until it
    /// answers PING. Tries up to 5 ports; panics if none works, or if
    /// `redis-server` is not installed.
    pub fn start() -> RedisServer {
        ensure_redis_server_installed();
        Self::start_in(fresh_temp_dir(), Launch::default())
    }

    /// Like [`start`](Self::start), with `extra_args` appended to the
    /// `redis-server` command line (e.g. `["--requirepass", "s3cret"]`).
    /// `restart` reuses them. Readiness is the server's own "Ready to accept
    /// connections" log line (a plain PING may need a password), which only
    /// our process writes, and only once it listens. Panics if an argument
    /// the harness sets itself (`--port`, `--bind`, `--dir`, ...) is given.
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        ensure_redis_server_installed();
        Self::start_in(fresh_temp_dir(), launch_with(extra_args, None))
    }

    /// A server that speaks TLS only (`--port 0 --tls-port <port>`), with a
    /// throwaway CA and server certificate for 127.0.0.1 generated into its
    /// temp dir ([`tls_files`](Self::tls_files)); clients need not present a
    /// certificate. Checked with a real TLS `PING` (via `openssl s_client`,
    /// verifying the certificate) before it is returned.
    pub fn start_tls() -> RedisServer {
        Self::start_tls_with(&[])
    }

    /// [`start_tls`](Self::start_tls) plus extra `redis-server` arguments.
    pub fn start_tls_with(extra_args: &[&str]) -> RedisServer {
        ensure_redis_server_installed();
        ensure_openssl_installed();
        let dir = fresh_temp_dir();
        let tls = generate_tls_certs(&dir);
        let server = Self::start_in(dir, launch_with(extra_args, Some(tls)));
        assert!(
            server.ping(),
            "TLS redis-server on port {} does not answer PING over TLS\nlog:\n{}",
            server.port,
            server.log()
        );
        server
    }

    /// A TLS server that requires clients to present a certificate signed
    /// by its CA (`--tls-auth-clients yes`); [`client_cert`](Self::client_cert)
    /// is one, generated into its temp dir with [`generate_client_cert`].
    /// Checked with a real TLS `PING` presenting that certificate.
    pub fn start_tls_mutual() -> RedisServer {
        ensure_redis_server_installed();
        ensure_openssl_installed();
        let dir = fresh_temp_dir();
        let tls = generate_tls_certs(&dir);
        let client = generate_client_cert(&dir, &tls);
        // Later arguments win: this overrides the harness's `--tls-auth-clients no`.
        let mut launch = launch_with(&["--tls-auth-clients", "yes"], Some(tls));
        launch.client_cert = Some(client);
        let server = Self::start_in(dir, launch);
        assert!(
            server.ping(),
            "mutual-TLS redis-server on port {} does not answer PING\nlog:\n{}",
            server.port,
            server.log()
        );
        server
    }

    /// The client certificate of a [`start_tls_mutual`](Self::start_tls_mutual) server.
    pub fn client_cert(&self) -> Option<&ClientCert> {
        self.launch.client_cert.as_ref()
    }

    fn start_in(dir: PathBuf, launch: Launch) -> RedisServer {
        let mut errors = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = match free_port() {
                Ok(port) => port,
                Err(e) => {
                    errors.push(format!("picking a free port: {e}"));
                    continue;
                }
            };
            match spawn_and_wait(&dir, port, &launch) {
                Ok((child, watchdog)) => {
                    let pid = child.id();
                    return RedisServer {
                        port,
                        dir,
                        child: Some(child),
                        watchdog: Some(watchdog),
                        pid,
                        launch,
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

    /// `redis://127.0.0.1:<port>`, or `rediss://127.0.0.1:<port>` for a TLS
    /// server (no credentials either way).
    pub fn url(&self) -> String {
        let scheme = if self.launch.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
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
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// True if the port answers `PING` with `+PONG` within ~1 s (false
    /// while stopped or SIGSTOPped). Authenticates first when the server
    /// was started with `--requirepass`; speaks TLS (verifying the server
    /// certificate against its CA) for a TLS server, allowing ~5 s then.
    pub fn ping(&self) -> bool {
        let password = self.launch.password.as_deref();
        match &self.launch.tls {
            Some(tls) if self.launch.client_cert.is_some() => tls_ping_as(
                self.port,
                &tls.ca_cert,
                self.launch.client_cert.as_ref(),
                password,
                Duration::from_secs(5),
            ),
            Some(tls) => tls_ping(self.port, &tls.ca_cert, password, Duration::from_secs(5)),
            None if password.is_some() => {
                auth_ping_port(self.port, password, Duration::from_secs(1))
            }
            None => ping_port(self.port, Duration::from_secs(1)),
        }
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
    /// set, no loaded scripts) on the same port, with the same arguments and
    /// certificates, and waits until it is ready. Panics if the port cannot
    /// be reused within ~5 s.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn_and_wait(&self.dir, self.port, &self.launch) {
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
    #[cfg(feature = "docker")]
    if !redis_server_installed() {
        return docker::shared_url();
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

/// Generates a throwaway CA and a server certificate for `127.0.0.1` /
/// `localhost` signed by it into `dir` (`ca.crt`, `ca.key`, `server.crt`,
/// `server.key`; P-256 keys, valid for 2 days) with the `openssl` CLI.
/// Panics with openssl's output if that fails, or if openssl is missing.
pub fn generate_tls_certs(dir: &Path) -> TlsFiles {
    ensure_openssl_installed();
    const CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = ticketlock test

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";
    let files = TlsFiles {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    let config = dir.join("openssl.cnf");
    let csr = dir.join("server.csr");
    fs::write(&config, CONFIG).unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
    let key_options = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    // The CA: self-signed.
    run_openssl(
        Command::new("openssl")
            .args(["req", "-x509", "-config"])
            .arg(&config)
            .args(["-extensions", "v3_ca", "-days", "2"])
            .args(key_options)
            .args(["-subj", "/CN=ticketlock test CA", "-keyout"])
            .arg(&files.ca_key)
            .arg("-out")
            .arg(&files.ca_cert),
    );
    // The server's key and signing request...
    run_openssl(
        Command::new("openssl")
            .args(["req", "-new", "-config"])
            .arg(&config)
            .args(key_options)
            .args(["-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&files.key)
            .arg("-out")
            .arg(&csr),
    );
    // ...signed by the CA.
    let serial = format!("0x{:x}", 1 + COUNTER.fetch_add(1, Ordering::Relaxed));
    run_openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&files.ca_cert)
            .arg("-CAkey")
            .arg(&files.ca_key)
            .args(["-set_serial", &serial, "-days", "2", "-extfile"])
            .arg(&config)
            .args(["-extensions", "v3_server", "-out"])
            .arg(&files.cert),
    );
    files
}

/// True if the TLS port `127.0.0.1:<port>` answers `PING` with `+PONG`
/// within `timeout`, after authenticating with `password` if given. Uses
/// `openssl s_client`, verifying the server certificate against `ca_cert`
/// and the IP 127.0.0.1, so it also proves the certificates are right.
pub fn tls_ping(port: u16, ca_cert: &Path, password: Option<&str>, timeout: Duration) -> bool {
    tls_ping_as(port, ca_cert, None, password, timeout)
}

/// [`tls_ping`], presenting `client` (if given) as the client certificate.
pub fn tls_ping_as(
    port: u16,
    ca_cert: &Path,
    client: Option<&ClientCert>,
    password: Option<&str>,
    timeout: Duration,
) -> bool {
    let mut command = Command::new("openssl");
    command
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-CAfile")
        .arg(ca_cert);
    if let Some(client) = client {
        command
            .arg("-cert")
            .arg(&client.cert)
            .arg("-key")
            .arg(&client.key);
    }
    let Ok(mut child) = command
        .args(["-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let (tx, rx) = mpsc::channel();
    // The reader ends when s_client is killed below (its stdout closes).
    thread::spawn(move || {
        let ok = stdout.is_some_and(|out| read_pong(BufReader::new(out)));
        let _ = tx.send(ok);
    });
    let sent = stdin.is_some_and(|mut input| {
        let ok = input.write_all(&ping_request(password)).is_ok();
        // `-quiet` implies `-ign_eof`: s_client stays up after stdin closes.
        drop(input);
        ok
    });
    let answered = sent && rx.recv_timeout(timeout).unwrap_or(false);
    let _ = child.kill();
    let _ = child.wait();
    answered
}

/// Like [`ping_port`], but sends `AUTH <password>` first when one is given.
pub fn auth_ping_port(port: u16, password: Option<&str>, timeout: Duration) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream.write_all(&ping_request(password)).is_err() {
        return false;
    }
    read_pong(BufReader::new(stream))
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

fn launch_with(extra_args: &[&str], tls: Option<TlsFiles>) -> Launch {
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
        extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
        tls,
        password,
        client_cert: None,
    }
}

/// A RESP request: `AUTH <password>` (if any), then `PING`.
fn ping_request(password: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(password) = password {
        out.extend_from_slice(format!("*2\r\n$4\r\nAUTH\r\n${}\r\n", password.len()).as_bytes());
        out.extend_from_slice(password.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
    out
}

/// Reads simple replies until `+PONG` (true), an error reply or EOF (false).
fn read_pong(mut reader: impl BufRead) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => match line.trim_end() {
                "+PONG" => return true,
                "+OK" => continue,
                _ => return false,
            },
        }
    }
}

fn ensure_openssl_installed() {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("openssl").is_file()));
    if !found {
        panic!("{NO_OPENSSL_MESSAGE}");
    }
}

fn run_openssl(command: &mut Command) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running openssl: {e}\n{NO_OPENSSL_MESSAGE}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn redis_server_installed() -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("redis-server").is_file())
    })
}

fn ensure_redis_server_installed() {
    if !redis_server_installed() {
        panic!("{NO_REDIS_MESSAGE}");
    }
}

/// The last resort of [`redis_url`] on machines with Docker but without
/// `redis-server`: a Redis container (`cargo test --features docker`).
#[cfg(feature = "docker")]
mod docker {
    use std::sync::OnceLock;

    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::SyncRunner;
    use testcontainers::{Container, GenericImage};

    pub(super) fn shared_url() -> String {
        static SHARED: OnceLock<Container<GenericImage>> = OnceLock::new();
        let container = SHARED.get_or_init(|| {
            GenericImage::new("redis", "7.2")
                .with_exposed_port(6379.tcp())
                .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
                .start()
                .unwrap_or_else(|e| panic!("{}\n(docker: {e})", super::NO_REDIS_MESSAGE))
        });
        let port = container
            .get_host_port_ipv4(6379)
            .expect("the container's Redis port");
        format!("redis://127.0.0.1:{port}")
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
/// already held the port) — or, for servers with extra arguments or TLS,
/// until our own log says it is ready (it says so only once it listens).
fn spawn_and_wait(dir: &Path, port: u16, launch: &Launch) -> Result<(Child, Child), String> {
    // Where this run's part of the (appended) log starts.
    let log_start = fs::metadata(dir.join("redis.log")).map_or(0, |m| m.len());
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .map_err(|e| format!("opening log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("cloning log: {e}"))?;
    let mut command = Command::new("redis-server");
    match &launch.tls {
        None => command.args(["--port", &port.to_string()]),
        Some(tls) => command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&tls.cert)
            .arg("--tls-key-file")
            .arg(&tls.key)
            .arg("--tls-ca-cert-file")
            .arg(&tls.ca_cert)
            .args(["--tls-auth-clients", "no"]),
    };
    let mut child = command
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .args(&launch.extra_args)
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

    let result = if launch.is_plain_default() {
        wait_until_ready(&mut child, port)
    } else {
        wait_until_logged_ready(&mut child, dir, log_start)
    };
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

/// Waits for [`READY_LINE`] in the part of our log written since
/// `log_start`. Only this child writes that part, and redis-server logs the
/// line only after binding every port it was given (it exits when one is
/// taken), so the line also proves the port is ours.
fn wait_until_logged_ready(child: &mut Child, dir: &Path, log_start: u64) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let start = usize::try_from(log_start).unwrap_or(usize::MAX);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited early ({status})"));
        }
        let log = fs::read(dir.join("redis.log")).unwrap_or_default();
        let ours = log.get(start..).unwrap_or_default();
        if String::from_utf8_lossy(ours).contains(READY_LINE) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "redis-server did not log {READY_LINE:?} within {START_TIMEOUT:?}"
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

// ---------------------------------------------------------------------------
// Client certificates, Redis Cluster and Redis Sentinel (added for
// tests/tls.rs, tests/cluster.rs and tests/sentinel.rs).

/// A client certificate and its key, as PEM files (see [`generate_client_cert`]).
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The certificate, signed by the CA it was made with.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Certificate and key in one file.
    pub combined: PathBuf,
}

/// Makes a client certificate (`CN=ticketlock test client`, extended key
/// usage `clientAuth`) signed by `ca`'s CA into `dir` (`client.crt`,
/// `client.key`, and both in `client.pem`). Panics with openssl's output if
/// that fails.
pub fn generate_client_cert(dir: &Path, ca: &TlsFiles) -> ClientCert {
    ensure_openssl_installed();
    const CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = ticketlock test client

[v3_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";
    let files = ClientCert {
        cert: dir.join("client.crt"),
        key: dir.join("client.key"),
        combined: dir.join("client.pem"),
    };
    let config = dir.join("openssl-client.cnf");
    let csr = dir.join("client.csr");
    fs::write(&config, CONFIG).unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
    run_openssl(
        Command::new("openssl")
            .args(["req", "-new", "-config"])
            .arg(&config)
            .args([
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .args(["-subj", "/CN=ticketlock test client", "-keyout"])
            .arg(&files.key)
            .arg("-out")
            .arg(&csr),
    );
    let serial = format!("0x{:x}", 1 + COUNTER.fetch_add(1, Ordering::Relaxed));
    run_openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca.ca_cert)
            .arg("-CAkey")
            .arg(&ca.ca_key)
            .args(["-set_serial", &serial, "-days", "2", "-extfile"])
            .arg(&config)
            .args(["-extensions", "v3_client", "-out"])
            .arg(&files.cert),
    );
    let mut combined = fs::read(&files.cert).expect("reading the client certificate");
    combined.extend(fs::read(&files.key).expect("reading the client key"));
    fs::write(&files.combined, combined).expect("writing client.pem");
    files
}

/// Message of the panic raised when a cluster or sentinel test needs redis-cli.
pub const NO_REDIS_CLI_MESSAGE: &str = "the cluster and sentinel tests need redis-cli \
     (Debian: it comes with redis-server: apt-get install -y redis-server) — or run \
     scripts/test.sh, which installs it";

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args>` (plain text, no TLS, no
/// password) and returns its stdout, trimmed; panics if redis-cli cannot run.
/// Its stdout is not a terminal, so replies come raw: one line per element.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running redis-cli: {e}\n{NO_REDIS_CLI_MESSAGE}"));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Waits up to `limit` for `check` to hold, polling every 50 ms; panics
/// with `what` (and the last observation) if it never does.
pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(()) => return,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not so after {limit:?}; last seen:\n{last}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A private Redis Cluster on 127.0.0.1: N masters, no replicas, all 16384
/// slots assigned and `cluster_state:ok` on every node. Each node is a
/// [`RedisServer`] (killed by pid on drop) with its cluster bus on a second
/// free port (`--cluster-port`, so the default port + 10000 never matters)
/// and its `nodes.conf` in its own temp dir.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// For a TLS cluster: the certificates every node shares, in their own
    /// temp dir (removed on drop).
    tls: Option<(PathBuf, TlsFiles)>,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        if let Some((dir, _)) = &self.tls {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl RedisCluster {
    /// Starts `masters` (at least 3) nodes and creates the cluster with
    /// `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`.
    pub fn start(masters: usize) -> RedisCluster {
        Self::start_inner(masters, None)
    }

    /// Like [`start`](Self::start), but every node speaks TLS only
    /// (clients and the cluster bus, `--tls-cluster yes`), all with one
    /// server certificate for 127.0.0.1 from one throwaway CA
    /// ([`tls_files`](Self::tls_files)). The bus always verifies the
    /// connecting node, so the nodes also share a client certificate of that
    /// CA (`--tls-client-cert-file`).
    pub fn start_tls(masters: usize) -> RedisCluster {
        ensure_openssl_installed();
        let dir = fresh_temp_dir();
        let files = generate_tls_certs(&dir);
        generate_client_cert(&dir, &files);
        Self::start_inner(masters, Some((dir, files)))
    }

    /// The shared certificates of a [`start_tls`](Self::start_tls) cluster.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref().map(|(_, files)| files)
    }

    fn start_inner(masters: usize, tls: Option<(PathBuf, TlsFiles)>) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        ensure_redis_server_installed();
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(masters),
            tls,
        };
        for _ in 0..masters {
            let bus = free_port().expect("a free port for the cluster bus");
            let bus = bus.to_string();
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus,
                "--cluster-node-timeout",
                "5000",
            ];
            let node = match &cluster.tls {
                None => RedisServer::start_with(&args),
                Some((dir, files)) => {
                    let client_cert = dir.join("client.crt").display().to_string();
                    let client_key = dir.join("client.key").display().to_string();
                    args.extend(["--tls-cluster", "yes", "--tls-client-cert-file"]);
                    args.push(&client_cert);
                    args.push("--tls-client-key-file");
                    args.push(&client_key);
                    RedisServer::start_in(fresh_temp_dir(), launch_with(&args, Some(files.clone())))
                }
            };
            cluster.nodes.push(node);
        }
        // redis-cli waits for the nodes to join for as long as it takes (for
        // ever, if they cannot talk), so it gets a deadline; its output goes
        // to a file in the first node's dir, for the failure message.
        let addrs = cluster.endpoints();
        let log_path = cluster.nodes[0].dir().join("cluster-create.log");
        let log = File::create(&log_path).expect("creating cluster-create.log");
        let mut create = Command::new("redis-cli")
            .args(cluster.cli_tls_args())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("running redis-cli: {e}\n{NO_REDIS_CLI_MESSAGE}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            match create.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = create.kill();
                    let _ = create.wait();
                    break None;
                }
            }
        };
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create failed ({status:?}; None: still waiting after 60 s):\n{}\nnode logs:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default(),
            cluster
                .nodes
                .iter()
                .map(|n| format!("--- {}:\n{}", n.port(), n.log()))
                .collect::<String>()
        );
        // Every node sees the cluster ok and every slot assigned to one of us.
        for port in cluster.ports() {
            wait_for(
                &format!("cluster node {port} ready"),
                Duration::from_secs(30),
                || {
                    let info = cluster.cli(port, &["CLUSTER", "INFO"]);
                    let ok = info.contains("cluster_state:ok")
                        && info.contains("cluster_slots_assigned:16384")
                        && info.contains(&format!("cluster_known_nodes:{masters}"));
                    if ok {
                        Ok(())
                    } else {
                        Err(info)
                    }
                },
            );
        }
        // And they agree on who owns what.
        wait_for(
            "the nodes agree on the slots",
            Duration::from_secs(30),
            || {
                let maps: Vec<Vec<(u16, u16, u16)>> = cluster
                    .ports()
                    .iter()
                    .map(|&p| cluster.slot_ranges_seen_by(p))
                    .collect();
                if maps.iter().all(|m| m == &maps[0] && m.len() == masters) {
                    Ok(())
                } else {
                    Err(format!("{maps:?}"))
                }
            },
        );
        cluster
    }

    /// [`redis_cli`] for node `port`, over TLS for a TLS cluster.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let mut all: Vec<String> = self.cli_tls_args();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        redis_cli(port, &all)
    }

    /// `--tls --cacert <ca>` for a TLS cluster, else nothing.
    fn cli_tls_args(&self) -> Vec<String> {
        match &self.tls {
            Some((_, files)) => vec![
                "--tls".into(),
                "--cacert".into(),
                files.ca_cert.display().to_string(),
            ],
            None => Vec::new(),
        }
    }

    /// The nodes' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// `127.0.0.1:<port>` of every node.
    pub fn endpoints(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,...` (`rediss+cluster`
    /// for a TLS cluster).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://{}", self.endpoints().join(","))
    }

    /// The nodes themselves (for logs, pids, faults).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// `CLUSTER KEYSLOT <key>`.
    pub fn keyslot(&self, key: &str) -> u16 {
        let out = self.cli(self.nodes[0].port(), &["CLUSTER", "KEYSLOT", key]);
        out.parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key:?} answered {out:?}"))
    }

    /// The port of the node serving `slot`.
    pub fn port_for_slot(&self, slot: u16) -> u16 {
        self.slot_ranges_seen_by(self.nodes[0].port())
            .into_iter()
            .find(|&(from, to, _)| (from..=to).contains(&slot))
            .map(|(_, _, port)| port)
            .unwrap_or_else(|| panic!("no node serves slot {slot}"))
    }

    /// The port of the node holding `key`.
    pub fn port_for_key(&self, key: &str) -> u16 {
        self.port_for_slot(self.keyslot(key))
    }

    /// `(first slot, last slot, master port)` per range, sorted, as node
    /// `port` sees them (from `CLUSTER NODES`: one line per node,
    /// `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots>...`).
    fn slot_ranges_seen_by(&self, port: u16) -> Vec<(u16, u16, u16)> {
        let out = self.cli(port, &["CLUSTER", "NODES"]);
        let mut ranges = Vec::new();
        for line in out.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let Some(node_port) = fields[1]
                .split('@')
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            for slots in &fields[8..] {
                // Migrating/importing markers look like `[5461->-<id>]`.
                if slots.starts_with('[') {
                    continue;
                }
                let (from, to) = slots.split_once('-').unwrap_or((slots, slots));
                if let (Ok(from), Ok(to)) = (from.parse(), to.parse()) {
                    ranges.push((from, to, node_port));
                }
            }
        }
        ranges.sort_unstable();
        ranges
    }
}

/// A Redis Cluster shared by every test of this test binary (3 masters,
/// started on first use, killed by its watchdogs when the binary exits).
/// Tests sharing it must keep to their own keys ([`unique_prefix`]).
pub fn cluster_url() -> String {
    shared_cluster().url()
}

/// The cluster behind [`cluster_url`].
pub fn shared_cluster() -> &'static RedisCluster {
    static SHARED: OnceLock<RedisCluster> = OnceLock::new();
    // Never dropped (statics aren't): the nodes' watchdogs kill them once
    // this process is gone.
    SHARED.get_or_init(|| RedisCluster::start(3))
}

/// A private Redis Sentinel (`redis-server <conf> --sentinel`) on a free
/// loopback port, monitoring `service` at `127.0.0.1:<master_port>` with a
/// quorum of 1, `down-after-milliseconds 1000` and `failover-timeout 5000`
/// (plus `extra_conf` lines). Killed (SIGKILL, by pid) on drop, with its temp
/// dir; a watchdog kills it if the test process dies first.
pub struct SentinelServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
    service: String,
}

impl SentinelServer {
    /// Starts the sentinel and waits until it answers PING (and is ours).
    pub fn start(service: &str, master_port: u16, extra_conf: &[&str]) -> SentinelServer {
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
            // Sentinel rewrites its config file, so a fresh one per attempt.
            let mut conf = format!(
                "sentinel monitor {service} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 5000\n"
            );
            for line in extra_conf {
                conf.push_str(line);
                conf.push('\n');
            }
            let conf_path = dir.join("sentinel.conf");
            fs::write(&conf_path, conf).expect("writing sentinel.conf");
            match spawn_sentinel(&dir, &conf_path, port) {
                Ok((child, watchdog)) => {
                    return SentinelServer {
                        port,
                        dir,
                        child: Some(child),
                        watchdog: Some(watchdog),
                        service: service.to_owned(),
                    }
                }
                Err(e) => errors.push(format!("port {port}: {e}")),
            }
        }
        let log = read_log(&dir);
        let _ = fs::remove_dir_all(&dir);
        panic!(
            "could not start redis-server --sentinel after {START_ATTEMPTS} attempts:\n  {}\nlast log:\n{log}",
            errors.join("\n  ")
        );
    }

    /// The sentinel's loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The sentinel's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// The port of the master it names now (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    pub fn master_port(&self) -> Option<u16> {
        let out = redis_cli(
            self.port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.service],
        );
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }

    /// Waits until the sentinel has seen the replica on `replica_port` as a
    /// healthy replica of the master (so a failover can promote it).
    pub fn wait_for_replica(&self, replica_port: u16) {
        wait_for(
            &format!("sentinel knows replica {replica_port}"),
            Duration::from_secs(30),
            || {
                let out = redis_cli(self.port, &["SENTINEL", "REPLICAS", &self.service]);
                let lines: Vec<&str> = out.lines().map(str::trim).collect();
                let field = |name: &str| {
                    lines
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|i| lines.get(i + 1))
                        .copied()
                };
                let ok = field("port") == Some(replica_port.to_string().as_str())
                    && field("flags") == Some("slave")
                    && field("master-link-status") == Some("ok");
                if ok {
                    Ok(())
                } else {
                    Err(out.clone())
                }
            },
        );
    }

    /// `SENTINEL FAILOVER <service>`, retried while the sentinel is not
    /// ready for one (`NOGOODSLAVE`, `INPROG`) for up to `limit`.
    pub fn failover(&self, limit: Duration) {
        wait_for("SENTINEL FAILOVER accepted", limit, || {
            let out = redis_cli(self.port, &["SENTINEL", "FAILOVER", &self.service]);
            if out == "OK" {
                Ok(())
            } else {
                Err(out)
            }
        });
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn spawn_sentinel(dir: &Path, conf: &Path, port: u16) -> Result<(Child, Child), String> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .map_err(|e| format!("opening log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("cloning log: {e}"))?;
    let mut child = Command::new("redis-server")
        .arg(conf)
        .arg("--sentinel")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
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
            format!("spawning redis-server --sentinel: {e}")
        })?;
    let mut watchdog = match spawn_watchdog(child.id(), dir) {
        Ok(w) => w,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("spawning watchdog: {e}"));
        }
    };
    if let Err(e) = wait_until_ready(&mut child, port) {
        let _ = child.kill();
        let _ = child.wait();
        let _ = watchdog.kill();
        let _ = watchdog.wait();
        return Err(e);
    }
    Ok((child, watchdog))
}

/// Arguments of a Sentinel deployment's data nodes: a master refuses writes
/// (`NOREPLICAS`, retryable) unless a replica follows it, so writes to a
/// master that was just replaced are refused instead of lost.
pub const SENTINEL_DATA_NODE_ARGS: [&str; 4] = [
    "--min-replicas-to-write",
    "1",
    "--min-replicas-max-lag",
    "10",
];

/// One master, one replica (`--replicaof`) and one sentinel watching them
/// as `service`; dropped (killed) together.
pub struct SentinelDeployment {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel: SentinelServer,
}

impl SentinelDeployment {
    /// Starts all three and waits until the replica is in sync and the
    /// sentinel knows it.
    pub fn start(service: &str) -> SentinelDeployment {
        let master = RedisServer::start_with(&SENTINEL_DATA_NODE_ARGS);
        let master_port = master.port().to_string();
        let mut replica_args = vec!["--replicaof", "127.0.0.1", &master_port];
        replica_args.extend(SENTINEL_DATA_NODE_ARGS);
        let replica = RedisServer::start_with(&replica_args);
        wait_for("the replica is in sync", Duration::from_secs(20), || {
            let info = redis_cli(master.port(), &["INFO", "replication"]);
            let replica_info = redis_cli(replica.port(), &["INFO", "replication"]);
            if info.contains("connected_slaves:1")
                && info.contains("min_slaves_good_slaves:1")
                && replica_info.contains("master_link_status:up")
            {
                Ok(())
            } else {
                Err(format!("{info}\n{replica_info}"))
            }
        });
        let sentinel = SentinelServer::start(service, master.port(), &[]);
        sentinel.wait_for_replica(replica.port());
        SentinelDeployment {
            master,
            replica,
            sentinel,
        }
    }
}

/// A Sentinel deployment (service `mymaster`) shared by the whole test
/// binary, started on first use; tests sharing it keep to their own keys.
pub fn shared_sentinel() -> &'static SentinelDeployment {
    static SHARED: OnceLock<SentinelDeployment> = OnceLock::new();
    SHARED.get_or_init(|| SentinelDeployment::start("mymaster"))
}

/// An example of this package (`examples/<name>.rs`), built once per test
/// binary and name with the same cargo, profile and target dir as the test
/// binary; returns the executable's path.
pub fn example_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    built
        .entry(name.to_owned())
        .or_insert_with(|| build_example(name))
        .clone()
}

/// Builds an example of this package once (per name) with the same cargo,
/// profile and target dir as this test binary, and returns its path (from
/// cargo's own JSON report, so CARGO_TARGET_DIR and friends are respected).
fn build_example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<this test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target dir");
    let mut command = std::process::Command::new(env!("CARGO"));
    // Cargo sets these for the test process; some build scripts (ring's)
    // watch CARGO_MANIFEST_DIR, so passing them on would make this build
    // (and the next ordinary one) recompile half the dependency tree.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                &*key,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            )
        {
            command.env_remove(&*key);
        }
    }
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--example", name])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        command.arg("--release");
    }
    let output = command.output().expect("running cargo build");
    assert!(
        output.status.success(),
        "cargo build --example {name} failed ({})",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo did not report the executable of example {name}"))
}

/// `a` holds `cid`, `b` queues behind it and sleeps (it would not check the
/// queue for 30 s); releasing in `a` must hand the lock to `b` by a pushed
/// wake-up, within 2 s. Returns how long the hand-off took.
pub async fn pushed_handoff(
    a: &ticketlock::LockStore,
    b: &ticketlock::LockStore,
    cid: &str,
) -> Duration {
    let patient = ticketlock::LockOptions::default()
        .with_wait_time(Duration::from_secs(30))
        .with_dead_waiter_timeout(Duration::from_secs(90))
        .with_timeout(Duration::from_secs(20));
    let held = a.lock_with(cid, patient).await.expect("first lock");
    let waiter = {
        let b = b.clone();
        let cid = cid.to_owned();
        tokio::spawn(async move {
            let result = b.lock_with(&cid, patient).await;
            (result, Instant::now())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while a
        .get_lock(cid)
        .await
        .expect("get_lock")
        .is_none_or(|l| l.tickets().len() != 2)
    {
        assert!(
            Instant::now() < deadline,
            "the waiter's ticket never showed up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let it subscribe, poll once and go to sleep.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter got the lock while it was held"
    );
    let released = Instant::now();
    held.release().await.expect("release");
    let (result, acquired) = tokio::time::timeout(Duration::from_secs(6), waiter)
        .await
        .expect("the waiter was not handed the lock (no pushed wake-up?)")
        .expect("waiter task");
    result
        .expect("the waiter's lock")
        .release()
        .await
        .expect("release by the waiter");
    let took = acquired.duration_since(released);
    assert!(
        took < Duration::from_secs(2),
        "hand-off took {took:?}: not pushed"
    );
    took
}
