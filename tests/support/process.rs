//! The process supervisor: every server the harness starts runs under a
//! [`Supervised`] (the process plus a watchdog that kills it once the test
//! process is gone), on a free loopback port, with its log in its temp dir.

use std::fs::{self, File};
use std::io::{self, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::server::{connect, local_url, ping};
use super::unique_prefix;

/// How long to wait for a freshly started server to answer PING.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How many ports to try before giving up on starting a server.
const START_ATTEMPTS: usize = 5;
/// What redis-server (and valkey-server, which adds " tcp") logs once it
/// listens on every configured port.
const READY_LINE: &str = "Ready to accept connections";

/// `<dir>/<name>` for the first directory of `PATH` holding it.
pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The target dir this test binary was built into (`<target>/<profile>/deps/<binary>`).
pub(super) fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// A running server process and the watchdog that kills it if the test
/// process dies first. Dropping it kills both (the server first, so the
/// watchdog never outlives it to hit a reused pid).
pub(super) struct Supervised {
    child: Child,
    watchdog: Child,
}

impl Supervised {
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub(super) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        for process in [&mut self.child, &mut self.watchdog] {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Tries up to [`START_ATTEMPTS`] free ports: `spawn` starts a process on
/// the port and waits until it is ready. Panics with every attempt's error
/// and the log (removing `dir`) when none works.
pub(super) fn start_on_free_port(
    dir: &Path,
    mut spawn: impl FnMut(u16) -> Result<Supervised, String>,
) -> (u16, Supervised) {
    let mut errors = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let port = match free_port() {
            Ok(port) => port,
            Err(e) => {
                errors.push(format!("picking a free port: {e}"));
                continue;
            }
        };
        match spawn(port) {
            Ok(process) => return (port, process),
            Err(e) => errors.push(format!("port {port}: {e}")),
        }
    }
    let log = read_log(dir);
    let _ = fs::remove_dir_all(dir);
    panic!(
        "could not start a server after {START_ATTEMPTS} attempts:\n  {}\nlast log:\n{log}",
        errors.join("\n  ")
    );
}

/// Spawns `command` with stdout and stderr appended to `dir/redis.log` and
/// its pid in `dir/redis.pid`, then its watchdog, then waits for `ready`;
/// kills both if that fails. A missing program panics with `missing`.
pub(super) fn supervise(
    command: &mut Command,
    missing: &str,
    dir: &Path,
    ready: impl FnOnce(&mut Child) -> Result<(), String>,
) -> Result<Supervised, String> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .map_err(|e| format!("opening log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("cloning log: {e}"))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                panic!("{missing}");
            }
            format!("spawning {command:?}: {e}")
        })?;
    let pid = child.id();
    let _ = fs::write(dir.join("redis.pid"), format!("{pid}\n"));
    let watchdog = match spawn_watchdog(pid, dir) {
        Ok(watchdog) => watchdog,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("spawning watchdog: {e}"));
        }
    };
    let mut process = Supervised { child, watchdog };
    // On error `process` is dropped here, which kills both.
    ready(&mut process.child).map(|()| process)
}

/// A `sh` loop that polls this test process every 0.5 s and, once it is
/// gone, SIGKILLs the server and removes its temp dir. Killed before the
/// server itself goes ([`Supervised`]), so it never outlives its server to
/// hit a reused pid.
fn spawn_watchdog(server_pid: u32, dir: &Path) -> io::Result<Child> {
    const SCRIPT: &str = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
        case "$(cat "/proc/$2/comm" 2>/dev/null || echo redis-server)" in
            redis*|valkey*) kill -s KILL "$2" 2>/dev/null ;;
        esac
        sleep 0.2
        rm -rf "$3"
    "#;
    Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("ticketlock-redis-watchdog")
        .arg(std::process::id().to_string())
        .arg(server_pid.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Waits until `port` answers PING and `INFO server` names our child.
pub(super) fn wait_until_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let url = local_url(false, None, port);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the server exited early ({status})"));
        }
        if ping(&url, None, Duration::from_millis(250)) {
            // Someone else may hold the port (our server then fails to bind
            // and exits): make sure the one answering is ours.
            return match server_pid(&url) {
                Some(pid) if pid == child.id() => Ok(()),
                Some(pid) => Err(format!("port taken by another server (pid {pid})")),
                None => Err("port taken by something that is not our server".into()),
            };
        }
        if Instant::now() >= deadline {
            return Err(format!("no answer to PING within {START_TIMEOUT:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for [`READY_LINE`] in the part of our log written since
/// `log_start`. Only this child writes that part, and the server logs the
/// line only after binding every port it was given (it exits when one is
/// taken), so the line also proves the port is ours.
pub(super) fn wait_until_logged_ready(
    child: &mut Child,
    dir: &Path,
    log_start: u64,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let start = usize::try_from(log_start).unwrap_or(usize::MAX);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the server exited early ({status})"));
        }
        let log = fs::read(dir.join("redis.log")).unwrap_or_default();
        let ours = log.get(start..).unwrap_or_default();
        if String::from_utf8_lossy(ours).contains(READY_LINE) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the server did not log {READY_LINE:?} within {START_TIMEOUT:?}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `process_id` from `INFO server`.
pub(super) fn server_pid(url: &str) -> Option<u32> {
    let mut conn = connect(url, None, Duration::from_secs(1)).ok()?;
    let info: redis::InfoDict = redis::cmd("INFO").arg("server").query(&mut conn).ok()?;
    info.get("process_id")
}

/// A new temp dir for one server (or one set of certificates).
pub(super) fn fresh_temp_dir() -> PathBuf {
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

/// A loopback port nobody listens on right now.
pub(super) fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    drop(listener);
    Ok(port)
}

/// `dir/redis.log`, or nothing.
pub(super) fn read_log(dir: &Path) -> String {
    let mut log = String::new();
    if let Ok(mut f) = File::open(dir.join("redis.log")) {
        let _ = f.read_to_string(&mut log);
    }
    log
}
