//! Redis Sentinel: a private sentinel process, and a whole deployment
//! (master, replica, sentinel) on 127.0.0.1, every process stopped by pid.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::process::{
    fresh_temp_dir, read_log, start_on_free_port, supervise, wait_until_ready, Supervised,
    START_TIMEOUT,
};
use super::server::{Program, RedisServer};
use super::tls::{tls_ping, TlsFiles};
use super::{redis_cli, wait_for};

/// A private Redis Sentinel (`redis-server <conf> --sentinel`) on a free
/// loopback port, monitoring `service` at `127.0.0.1:<master_port>` with a
/// quorum of 1, `down-after-milliseconds 1000` and `failover-timeout 5000`
/// (plus `extra_conf` lines). Killed (SIGKILL, by pid) on drop, with its temp
/// dir; a watchdog kills it if the test process dies first.
pub struct SentinelServer {
    port: u16,
    dir: PathBuf,
    /// Dropped (killed) before the dir goes.
    process: Option<Supervised>,
    service: String,
}

impl SentinelServer {
    /// Starts the sentinel and waits until it answers PING (and is ours).
    pub fn start(service: &str, master_port: u16, extra_conf: &[&str]) -> SentinelServer {
        let program = Program::Redis.path();
        let dir = fresh_temp_dir();
        let (port, process) = start_on_free_port(&dir, |port| {
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
            let mut command = Command::new(&program);
            command
                .arg(&conf_path)
                .arg("--sentinel")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--daemonize", "no"])
                .arg("--dir")
                .arg(&dir);
            supervise(&mut command, super::NO_REDIS_MESSAGE, &dir, |child| {
                wait_until_ready(child, port)
            })
        });
        SentinelServer {
            port,
            dir,
            process: Some(process),
            service: service.to_owned(),
        }
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

impl SentinelServer {
    /// A sentinel that speaks TLS only (`--port 0 --tls-port`) and wants
    /// `password` (`requirepass`), watching a TLS master that wants
    /// `master_password`; ready once it answers a TLS `PING` with the password.
    pub fn start_tls(
        service: &str,
        master_port: u16,
        tls: &TlsFiles,
        password: &str,
        master_password: &str,
    ) -> SentinelServer {
        let program = Program::Redis.path();
        let dir = fresh_temp_dir();
        let (port, process) = start_on_free_port(&dir, |port| {
            let conf = format!(
                "sentinel monitor {service} 127.0.0.1 {master_port} 1\n\
                 sentinel auth-pass {service} {master_password}\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 5000\n\
                 requirepass {password}\n\
                 tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                 tls-auth-clients no\ntls-replication yes\n",
                tls.cert.display(),
                tls.key.display(),
                tls.ca_cert.display()
            );
            let conf_path = dir.join("sentinel.conf");
            fs::write(&conf_path, conf).expect("writing sentinel.conf");
            let mut command = Command::new(&program);
            command
                .arg(&conf_path)
                .arg("--sentinel")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--daemonize", "no"])
                .arg("--dir")
                .arg(&dir);
            supervise(&mut command, super::NO_REDIS_MESSAGE, &dir, |child| {
                // A sentinel logs no "Ready" line: a TLS PING with its password it is.
                let deadline = Instant::now() + START_TIMEOUT;
                while !tls_ping(
                    port,
                    &tls.ca_cert,
                    Some(password),
                    Duration::from_millis(500),
                ) {
                    if Instant::now() >= deadline || matches!(child.try_wait(), Ok(Some(_))) {
                        return Err(format!("TLS sentinel on port {port} does not answer"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(())
            })
        });
        SentinelServer {
            port,
            dir,
            process: Some(process),
            service: service.to_owned(),
        }
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        self.process = None;
        let _ = fs::remove_dir_all(&self.dir);
    }
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
