//! A Sentinel deployment where everything speaks TLS (one CA) and wants a
//! password: master and replica replicating over TLS, and a sentinel with
//! `requirepass` (what `sentinel_username` / `sentinel_password` /
//! `sentinel_use_ssl` are for).

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use super::process::fresh_temp_dir;
use super::sentinel::{SentinelServer, SENTINEL_DATA_NODE_ARGS};
use super::server::{Launch, Program, RedisServer};
use super::tls::{ensure_openssl_installed, generate_tls_certs, TlsFiles};
use super::{redis_cli, wait_for};

/// Password of the data nodes of a [`SecureSentinelDeployment`].
pub const SECURE_DATA_PASSWORD: &str = "data-pw";
/// Password of its sentinel (`requirepass`).
pub const SECURE_SENTINEL_PASSWORD: &str = "sentinel-pw";

impl RedisServer {
    /// A TLS-only server with the given certificates (so that several share
    /// one CA) and extra arguments; checked with a real TLS `PING`.
    pub fn start_tls_files(tls: &TlsFiles, extra_args: &[&str]) -> RedisServer {
        ensure_openssl_installed();
        let launch = Launch::new(Program::Redis, extra_args, Some(tls.clone()));
        let server = Self::start_in(fresh_temp_dir(), launch);
        assert!(
            server.ping(),
            "TLS redis-server on port {} does not answer PING\nlog:\n{}",
            server.port(),
            server.log()
        );
        server
    }
}

/// Master and replica ([`SECURE_DATA_PASSWORD`], replicating over TLS) and a
/// sentinel ([`SECURE_SENTINEL_PASSWORD`]), all on one CA; dropped together.
pub struct SecureSentinelDeployment {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel: SentinelServer,
    pub tls: TlsFiles,
    service: String,
    _certs: TempCerts,
}

/// The deployment's certificate directory, removed on drop.
struct TempCerts(PathBuf);

impl Drop for TempCerts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl SecureSentinelDeployment {
    /// Starts all three and waits until the replica is in sync and the
    /// sentinel knows it.
    pub fn start(service: &str) -> SecureSentinelDeployment {
        ensure_openssl_installed();
        let certs = TempCerts(fresh_temp_dir());
        let tls = generate_tls_certs(&certs.0);
        let mut data_args = vec![
            "--requirepass",
            SECURE_DATA_PASSWORD,
            "--masterauth",
            SECURE_DATA_PASSWORD,
            "--tls-replication",
            "yes",
        ];
        data_args.extend(SENTINEL_DATA_NODE_ARGS);
        let master = RedisServer::start_tls_files(&tls, &data_args);
        let master_port = master.port().to_string();
        let mut replica_args = data_args.clone();
        replica_args.extend(["--replicaof", "127.0.0.1", &master_port]);
        let replica = RedisServer::start_tls_files(&tls, &replica_args);
        let sentinel = SentinelServer::start_tls(
            service,
            master.port(),
            &tls,
            SECURE_SENTINEL_PASSWORD,
            SECURE_DATA_PASSWORD,
        );
        let d = SecureSentinelDeployment {
            master,
            replica,
            sentinel,
            tls,
            service: service.to_owned(),
            _certs: certs,
        };
        wait_for("the replica is in sync", Duration::from_secs(20), || {
            let info = d.data_cli(d.master.port(), &["INFO", "replication"]);
            if info.contains("connected_slaves:1") && info.contains("min_slaves_good_slaves:1") {
                Ok(())
            } else {
                Err(info)
            }
        });
        wait_for(
            "the sentinel knows the replica",
            Duration::from_secs(30),
            || {
                let out = d.sentinel_cli(&["SENTINEL", "REPLICAS", service]);
                if out.contains(&d.replica.port().to_string())
                    && out.contains("master-link-status\nok")
                {
                    Ok(())
                } else {
                    Err(out)
                }
            },
        );
        d
    }

    fn cli(&self, port: u16, password: &str, args: &[&str]) -> String {
        let ca = self.tls.ca_cert.display().to_string();
        let mut all = vec![
            "--tls",
            "--cacert",
            &ca,
            "--no-auth-warning",
            "-a",
            password,
        ];
        all.extend(args);
        redis_cli(port, &all)
    }

    /// `redis-cli` against data node `port` (TLS, with the password).
    pub fn data_cli(&self, port: u16, args: &[&str]) -> String {
        self.cli(port, SECURE_DATA_PASSWORD, args)
    }

    /// `redis-cli` against the sentinel (TLS, with its password).
    pub fn sentinel_cli(&self, args: &[&str]) -> String {
        self.cli(self.sentinel.port(), SECURE_SENTINEL_PASSWORD, args)
    }

    /// The port of the master the sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        let out = self.sentinel_cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.service]);
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }

    /// `SENTINEL FAILOVER`, retried while the sentinel is not ready for one.
    pub fn failover(&self, limit: Duration) {
        wait_for("SENTINEL FAILOVER accepted", limit, || {
            match self.sentinel_cli(&["SENTINEL", "FAILOVER", &self.service]) {
                out if out == "OK" => Ok(()),
                out => Err(out),
            }
        });
    }
}

/// A [`SecureSentinelDeployment`] (service `mymaster`) shared by the test
/// binary, started on first use.
pub fn shared_secure_sentinel() -> &'static SecureSentinelDeployment {
    static SHARED: OnceLock<SecureSentinelDeployment> = OnceLock::new();
    SHARED.get_or_init(|| SecureSentinelDeployment::start("mymaster"))
}
