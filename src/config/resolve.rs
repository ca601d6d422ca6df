//! From a [`StoreConfig`] to the [`Deployment`] a backend connects to.
//!
//! Every rule about a configuration is checked here, once: the URL in
//! `host` merged with the fields, the default port of each mode, the nodes
//! (`host` and `port`, or `endpoints`), "a cluster has database 0 only", the
//! sentinel service, TLS and its files, the key prefix and the socket
//! timeout. Nothing is read from disk and nothing connects: the Redis
//! backend reads the TLS files when it builds its clients.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::url::{self, endpoint};
use super::{
    DeploymentMode, ScriptMode, StoreConfig, StoreType, DEFAULT_DB, DEFAULT_PORT,
    DEFAULT_SENTINEL_PORT, DEFAULT_SOCKET_TIMEOUT,
};
use crate::error::LockError;
use crate::validate;

/// A server's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// A name or an address (IPv6 without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// TLS towards some servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tls {
    /// Skip certificate checks (only with the `tls-insecure` feature).
    pub(crate) insecure: bool,
}

/// How to log in to some servers (the data nodes, or the sentinels).
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Access {
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) tls: Option<Tls>,
}

/// Where the data lives.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Topology {
    Standard(Endpoint),
    /// Startup nodes.
    Cluster(Vec<Endpoint>),
    /// The master the sentinels name for `service`.
    Sentinel {
        sentinels: Vec<Endpoint>,
        service: String,
        access: Access,
    },
}

/// The PEM files of a configuration (shared by data nodes and sentinels).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) ca_certs: Option<PathBuf>,
    pub(crate) certfile: Option<PathBuf>,
    pub(crate) keyfile: Option<PathBuf>,
}

/// A configuration checked and resolved: everything a backend needs.
/// (No `Debug`: it holds passwords.)
#[derive(Clone)]
pub(crate) struct Deployment {
    /// Which nodes to reach, and how they relate.
    pub(crate) topology: Topology,
    /// The data nodes' login and TLS.
    pub(crate) data: Access,
    /// The database number: always 0 on a cluster.
    pub(crate) db: i64,
    /// Where the TLS certificates come from, if not from the system.
    pub(crate) tls_files: TlsFiles,
    /// `lock:` or `<prefix>:lock:`.
    pub(crate) key_prefix: String,
    /// How long one command may take before it counts as failed.
    pub(crate) socket_timeout: Duration,
    /// FCALL, EVALSHA, or whichever the server takes.
    pub(crate) script_mode: ScriptMode,
}

impl Deployment {
    /// True when any connection (to data nodes or sentinels) speaks TLS.
    pub(crate) fn uses_tls(&self) -> bool {
        self.data.tls.is_some()
            || matches!(&self.topology, Topology::Sentinel { access, .. } if access.tls.is_some())
    }
}

/// Checks `config` (of `type: redis`) and resolves it; see the module doc.
pub(crate) fn resolve(config: &StoreConfig) -> Result<Deployment, LockError> {
    let c = merged(config)?;
    let mode = c.deployment_mode;
    let default_port = match mode {
        DeploymentMode::Sentinel => DEFAULT_SENTINEL_PORT,
        _ => DEFAULT_PORT,
    };
    if c.port == Some(0) {
        return Err(LockError::invalid("port", "0 is not a usable port"));
    }
    let mut nodes = if c.endpoints.is_empty() {
        let host = c.host.as_deref().unwrap_or("localhost");
        let (host, port) = endpoint(host).map_err(|why| {
            LockError::invalid(
                "host",
                format!("it is {why}; expected a host name or address"),
            )
        })?;
        vec![Endpoint {
            host,
            port: port.or(c.port).unwrap_or(default_port),
        }]
    } else if mode == DeploymentMode::Standard {
        return Err(LockError::invalid(
            "endpoints",
            "endpoints are for deployment_mode cluster or sentinel; a standard deployment has one host",
        ));
    } else {
        let n = c.endpoints.len();
        let mut nodes = Vec::with_capacity(n);
        for (i, e) in c.endpoints.iter().enumerate() {
            let (host, port) = endpoint(e).map_err(|why| {
                LockError::invalid("endpoints", format!("entry {} of {n} is {why}", i + 1))
            })?;
            nodes.push(Endpoint {
                host,
                port: port.unwrap_or(default_port),
            });
        }
        nodes
    };
    let db = match (mode, c.db) {
        (DeploymentMode::Cluster, Some(db)) if db != 0 => {
            return Err(LockError::invalid(
                "db",
                format!("a Redis Cluster has database 0 only, not {db}"),
            ))
        }
        (DeploymentMode::Cluster, _) => 0,
        (_, Some(db)) if db < 0 => {
            return Err(LockError::invalid(
                "db",
                format!("{db} is not a database number"),
            ))
        }
        (_, db) => db.unwrap_or(DEFAULT_DB),
    };
    let tls = Tls {
        insecure: c.ssl_insecure,
    };
    let sentinel_tls = mode == DeploymentMode::Sentinel && c.sentinel_use_ssl;
    let tls_files = TlsFiles {
        ca_certs: c.ssl_ca_certs.clone(),
        certfile: c.ssl_certfile.clone(),
        keyfile: c.ssl_keyfile.clone(),
    };
    if tls_files != TlsFiles::default() && !c.use_ssl && !sentinel_tls {
        return Err(LockError::invalid(
            "tls",
            "ssl_ca_certs, ssl_certfile or ssl_keyfile is set, but TLS is off: set use_ssl: true \
             (or sentinel_use_ssl) or use a rediss:// url",
        ));
    }
    if tls_files.keyfile.is_some() && tls_files.certfile.is_none() {
        return Err(LockError::invalid(
            "ssl_keyfile",
            "ssl_keyfile is set without ssl_certfile",
        ));
    }
    if c.ssl_insecure && !c.use_ssl && !sentinel_tls {
        return Err(LockError::invalid(
            "ssl_insecure",
            "skipping certificate checks needs TLS: set use_ssl: true or use a rediss:// url",
        ));
    }
    if c.ssl_insecure && !cfg!(feature = "tls-insecure") {
        return Err(LockError::invalid(
            "ssl_insecure",
            "skipping certificate checks (#insecure) needs ticketlock's `tls-insecure` feature",
        ));
    }
    let topology = match mode {
        DeploymentMode::Standard => Topology::Standard(nodes.swap_remove(0)),
        DeploymentMode::Cluster => Topology::Cluster(nodes),
        DeploymentMode::Sentinel => {
            let service = match c.sentinel_service.as_deref().map(str::trim) {
                Some(service) if !service.is_empty() => service.to_owned(),
                _ => {
                    return Err(LockError::invalid(
                        "sentinel_service",
                        "a sentinel deployment needs the master's name (sentinel_service, or the url's path)",
                    ))
                }
            };
            Topology::Sentinel {
                sentinels: nodes,
                service,
                access: Access {
                    username: c.sentinel_username.clone(),
                    password: c.sentinel_password.clone(),
                    tls: sentinel_tls.then_some(tls),
                },
            }
        }
    };
    Ok(Deployment {
        topology,
        data: Access {
            username: c.username.clone(),
            password: c.password.clone(),
            tls: c.use_ssl.then_some(tls),
        },
        db,
        tls_files,
        key_prefix: match c.key_prefix.as_deref() {
            None => validate::DEFAULT_KEY_PREFIX.to_owned(),
            Some(p) => validate::key_prefix(p)?,
        },
        socket_timeout: match c.socket_timeout {
            None => DEFAULT_SOCKET_TIMEOUT,
            Some(s) => validate::seconds(s, "socket timeout")?,
        },
        script_mode: c.script_mode,
    })
}

/// `config` with the URL in its `host` (if any) taken apart into fields.
/// The config's own fields win, but for `port`, which only fills in a port
/// the URL left out (Rasa's examples write `port: 6379` next to any URL).
fn merged(config: &StoreConfig) -> Result<Cow<'_, StoreConfig>, LockError> {
    if config.store_type != StoreType::Redis {
        return Err(LockError::invalid(
            "type",
            "only a `type: redis` configuration describes a Redis deployment",
        ));
    }
    let Some(host) = config.host.as_deref().filter(|h| h.contains("://")) else {
        return Ok(Cow::Borrowed(config));
    };
    let url = url::parse(host)?;
    if url.store_type != StoreType::Redis {
        return Err(LockError::invalid(
            "host",
            "memory:// is not a Redis address (`type: in_memory` selects the in-memory store)",
        ));
    }
    let mode = match (config.deployment_mode, url.deployment_mode) {
        // The URL says it all (a standard config may carry any URL).
        (DeploymentMode::Standard, mode) => mode,
        (mode, theirs) if mode == theirs => mode,
        // A plain URL for one node: the address (unless `endpoints` are
        // given), credentials, db and TLS of the deployment.
        (mode, DeploymentMode::Standard) => mode,
        (mode, theirs) => {
            return Err(LockError::invalid(
                "deployment mode",
                format!("deployment_mode is {mode:?} but the url is for {theirs:?}"),
            ))
        }
    };
    if !url.endpoints.is_empty() && !config.endpoints.is_empty() {
        return Err(LockError::invalid(
            "endpoints",
            "the url already names the nodes: give them either in the url or in endpoints",
        ));
    }
    let (host, port, endpoints) = if url.endpoints.is_empty() {
        let port = url.port.or(config.port);
        (url.host, port, config.endpoints.clone())
    } else {
        (None, None, url.endpoints)
    };
    Ok(Cow::Owned(StoreConfig {
        host,
        port,
        endpoints,
        deployment_mode: mode,
        db: config.db.or(url.db),
        username: config.username.clone().or(url.username),
        password: config.password.clone().or(url.password),
        use_ssl: config.use_ssl || url.use_ssl,
        ssl_insecure: config.ssl_insecure || url.ssl_insecure,
        sentinel_service: config.sentinel_service.clone().or(url.sentinel_service),
        ..config.clone()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(config: &StoreConfig) -> Deployment {
        resolve(config).unwrap_or_else(|e| panic!("{config:?}: {e}"))
    }

    fn refused(config: &StoreConfig) -> &'static str {
        match resolve(config) {
            Err(LockError::InvalidInput { what, .. }) => what,
            Err(other) => panic!("{config:?}: {other}"),
            Ok(_) => panic!("{config:?} accepted"),
        }
    }

    fn url(url: &str) -> StoreConfig {
        StoreConfig::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn nodes(d: &Deployment) -> Vec<String> {
        match &d.topology {
            Topology::Standard(node) => vec![node.to_string()],
            Topology::Cluster(nodes)
            | Topology::Sentinel {
                sentinels: nodes, ..
            } => nodes.iter().map(ToString::to_string).collect(),
        }
    }

    /// The Sentinel service and the sentinels' login and TLS.
    fn sentinel(d: &Deployment) -> (&str, &Access) {
        match &d.topology {
            Topology::Sentinel {
                service, access, ..
            } => (service, access),
            _ => panic!("not a sentinel deployment"),
        }
    }

    #[test]
    fn configs_follow_rasa_defaults() {
        let d = resolved(&StoreConfig::redis("10.1.2.3"));
        assert_eq!(nodes(&d), ["10.1.2.3:6379"]);
        assert_eq!((d.db, d.key_prefix.as_str()), (DEFAULT_DB, "lock:"));
        assert_eq!(d.socket_timeout, DEFAULT_SOCKET_TIMEOUT);
        let mut c = StoreConfig::redis("h");
        c.key_prefix = Some("bot-1".into());
        assert_eq!(refused(&c), "key prefix");
        c.key_prefix = Some("bot1".into());
        c.socket_timeout = Some(f64::NAN);
        assert_eq!(refused(&c), "socket timeout");
        c.socket_timeout = None;
        c.port = Some(0);
        assert_eq!(refused(&c), "port");
        for bad in ["", "a b", "u@h", "h/1"] {
            assert_eq!(refused(&StoreConfig::redis(bad)), "host", "{bad}");
        }
        let mut c = StoreConfig::redis("::1");
        c.port = Some(7000);
        assert_eq!(nodes(&resolved(&c)), ["[::1]:7000"]);
    }

    #[test]
    fn a_url_in_host_is_merged_with_the_fields() {
        // The URL's database unless the config names one; its port unless it has none.
        let mut c = StoreConfig::redis("redis://u:pw@h/3");
        c.port = Some(7000);
        let d = resolved(&c);
        assert_eq!((nodes(&d), d.db), (vec!["h:7000".to_owned()], 3));
        c.db = Some(4);
        c.password = Some("other".into());
        let d = resolved(&c);
        assert_eq!(d.db, 4);
        assert_eq!(d.data.username.as_deref(), Some("u"));
        assert_eq!(d.data.password.as_deref(), Some("other"));
        let mut c = StoreConfig::redis("redis://h:6380");
        c.port = Some(6379);
        assert_eq!(nodes(&resolved(&c)), ["h:6380"]);
        // TLS from either side.
        let mut c = StoreConfig::redis("redis://h");
        c.use_ssl = true;
        assert!(resolved(&c).data.tls.is_some());
        assert!(resolved(&StoreConfig::redis("rediss://h"))
            .data
            .tls
            .is_some());
        assert_eq!(refused(&StoreConfig::redis("memory://")), "host");
    }

    #[test]
    fn cluster_urls_and_configs_name_every_startup_node() {
        let d = resolved(&url(
            "redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002",
        ));
        assert_eq!(nodes(&d), ["10.0.0.1:7000", "10.0.0.2:7001", "[::1]:7002"]);
        assert_eq!((d.db, d.data.password.as_deref()), (0, Some("s3cret")));
        assert!(d.data.tls.is_none());
        let d = resolved(&url("rediss+cluster://h1,h2:7001/0"));
        assert_eq!(nodes(&d), ["h1:6379", "h2:7001"]);
        assert!(d.data.tls.is_some());

        let mut c = StoreConfig::redis("ignored");
        c.deployment_mode = DeploymentMode::Cluster;
        c.endpoints = vec!["n1:7000".into(), " n2:7001 ".into()];
        assert_eq!(nodes(&resolved(&c)), ["n1:7000", "n2:7001"]);
        // Without endpoints: host and port.
        let mut c = StoreConfig::redis("n3");
        c.deployment_mode = DeploymentMode::Cluster;
        c.port = Some(7005);
        assert_eq!(nodes(&resolved(&c)), ["n3:7005"]);
        // A plain URL as host gives the node (and its credentials).
        let mut c = StoreConfig::redis("redis://:pw@n4:7006");
        c.deployment_mode = DeploymentMode::Cluster;
        let d = resolved(&c);
        assert_eq!(
            (nodes(&d), d.data.password.as_deref()),
            (vec!["n4:7006".to_owned()], Some("pw"))
        );
        // The cluster URL in a standard config decides by itself.
        assert_eq!(
            nodes(&resolved(&StoreConfig::redis("redis+cluster://n5:1,n6:2"))),
            ["n5:1", "n6:2"]
        );
    }

    #[test]
    fn sentinel_urls_and_configs_name_the_sentinels_and_the_service() {
        let d = resolved(&url("redis+sentinel://:s3cret@s1:26380,s2/mymaster/3"));
        assert_eq!(nodes(&d), ["s1:26380", "s2:26379"]);
        assert_eq!(d.db, 3);
        let (service, access) = sentinel(&d);
        assert_eq!(service, "mymaster");
        assert!(access == &Access::default());
        assert!(resolved(&url("rediss+sentinel://s1/mymaster"))
            .data
            .tls
            .is_some());

        let mut c = StoreConfig::redis("localhost");
        c.deployment_mode = DeploymentMode::Sentinel;
        c.endpoints = vec!["s1:1".into(), "s2:2".into()];
        assert_eq!(refused(&c), "sentinel_service");
        c.sentinel_service = Some("svc".into());
        c.sentinel_username = Some("watcher".into());
        c.sentinel_password = Some("pw".into());
        c.sentinel_use_ssl = true;
        let d = resolved(&c);
        assert!(d.data.tls.is_none() && d.uses_tls());
        let (service, access) = sentinel(&d);
        assert_eq!(service, "svc");
        assert_eq!(access.password.as_deref(), Some("pw"));
        assert!(access.tls.is_some());
        // The host's URL names a sentinel; the config names the service.
        let mut c = StoreConfig::redis("redis+sentinel://s1:1/a");
        c.sentinel_service = Some("b".into());
        let d = resolved(&c);
        assert!(matches!(&d.topology, Topology::Sentinel { service, .. } if service == "b"));
        // A plain URL in sentinel mode is a sentinel's address (port 26379 by default).
        let mut c = StoreConfig::redis("redis://:pw@s9");
        c.deployment_mode = DeploymentMode::Sentinel;
        c.sentinel_service = Some("m".into());
        assert_eq!(nodes(&resolved(&c)), ["s9:26379"]);
    }

    #[test]
    fn malformed_deployments_are_typed_errors_without_secrets() {
        for bad in [
            "redis+cluster://",
            "redis+cluster://a:1,,b:2",
            "redis+cluster://u:s3cret@a:1,b:notaport",
            "redis+cluster://a:1/3",
            "redis+cluster://a:1?protocol=2",
            "redis+sentinel://s1:1",
            "redis+sentinel://s1:1/",
            "redis+sentinel://u:s3cret@s1:0/m",
            "redis+cluster://u:s3/cret@a:x",
            "redis+cluster://u:s3,cret@a:1,:2",
            "redis+sentinel://u:s3cret#x@s1:1/m/notadb",
            "redis+ring://a:1",
        ] {
            let error = StoreConfig::from_url(bad).and_then(|c| resolve(&c).map(drop));
            match error {
                Err(LockError::InvalidInput { reason, .. }) => {
                    for part in ["s3cret", "cret", "s3/", "s3,"] {
                        assert!(!reason.contains(part), "{bad}: {reason}")
                    }
                }
                Err(other) => panic!("{bad}: unexpected {other}"),
                Ok(()) => panic!("{bad}: accepted"),
            }
        }
        // (host, change, the setting refused)
        type Change = fn(&mut StoreConfig);
        let changes: [(&str, Change, &str); 6] = [
            (
                "h",
                |c| (c.deployment_mode, c.db) = (DeploymentMode::Cluster, Some(1)),
                "db",
            ),
            ("h", |c| c.db = Some(-1), "db"),
            ("h", |c| c.endpoints = vec!["a:1".into()], "endpoints"),
            (
                "redis+cluster://a:1",
                |c| c.deployment_mode = DeploymentMode::Sentinel,
                "deployment mode",
            ),
            (
                "redis+cluster://a:1",
                |c| c.endpoints = vec!["b:2".into()],
                "endpoints",
            ),
            (
                "h",
                |c| {
                    (c.deployment_mode, c.endpoints) = (DeploymentMode::Cluster, vec!["a b".into()])
                },
                "endpoints",
            ),
        ];
        for (host, change, setting) in changes {
            let mut c = StoreConfig::redis(host);
            change(&mut c);
            assert_eq!(refused(&c), setting, "{host}");
        }
        assert_eq!(refused(&StoreConfig::default()), "type");
    }

    #[test]
    fn tls_settings_need_tls() {
        let mut c = StoreConfig::redis("h");
        c.ssl_ca_certs = Some("/ca.pem".into());
        assert_eq!(refused(&c), "tls");
        c.use_ssl = true;
        assert!(resolve(&c).is_ok());
        c.ssl_keyfile = Some("/k.pem".into());
        assert_eq!(refused(&c), "ssl_keyfile");
        // The files also serve sentinels that speak TLS.
        let mut c = StoreConfig::redis("s1");
        c.deployment_mode = DeploymentMode::Sentinel;
        c.sentinel_service = Some("m".into());
        c.ssl_ca_certs = Some("/ca.pem".into());
        assert_eq!(refused(&c), "tls");
        c.sentinel_use_ssl = true;
        assert!(resolve(&c).is_ok());

        let mut c = StoreConfig::redis("h");
        c.ssl_insecure = true;
        assert_eq!(refused(&c), "ssl_insecure");
        let insecure = StoreConfig::from_url("rediss://h#insecure").unwrap();
        match (resolve(&insecure), cfg!(feature = "tls-insecure")) {
            (Ok(d), true) => assert_eq!(d.data.tls, Some(Tls { insecure: true })),
            (Err(LockError::InvalidInput { what, reason }), false) => {
                assert_eq!(what, "ssl_insecure");
                assert!(reason.contains("tls-insecure"), "{reason}");
            }
            (other, feature) => panic!("feature {feature}: {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn deployment_modes_deserialize_in_snake_case() {
        let c: StoreConfig = serde_json::from_str(
            r#"{"type": "redis", "deployment_mode": "sentinel", "endpoints": ["a:1", "b"],
                "sentinel_service": "mymaster", "ssl_ca_certs": "/ca.pem",
                "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem",
                "sentinel_username": "w", "sentinel_password": "p", "sentinel_use_ssl": true}"#,
        )
        .unwrap();
        assert_eq!(c.deployment_mode, DeploymentMode::Sentinel);
        assert_eq!(c.endpoints, ["a:1", "b"]);
        assert_eq!(
            c.ssl_keyfile.as_deref(),
            Some(std::path::Path::new("/k.pem"))
        );
        assert!(c.sentinel_use_ssl);
        let c: StoreConfig = serde_json::from_str(r#"{"deployment_mode": "cluster"}"#).unwrap();
        assert_eq!(c.deployment_mode, DeploymentMode::Cluster);
        assert_eq!(
            serde_json::from_str::<StoreConfig>("{}")
                .unwrap()
                .deployment_mode,
            DeploymentMode::Standard
        );
        assert!(serde_json::from_str::<StoreConfig>(r#"{"deployment_mode": "ring"}"#).is_err());
    }

    #[test]
    fn display_is_the_url_without_credentials() {
        let shown = |c: &StoreConfig| c.to_string();
        assert_eq!(shown(&StoreConfig::default()), "memory://");
        assert_eq!(shown(&StoreConfig::redis("h")), "redis://h:6379/1");
        assert_eq!(
            shown(&url("rediss://tok@h:1/2")),
            "rediss://<redacted>@h:1/2"
        );
        assert_eq!(
            shown(&url("redis+sentinel://u:s3cret@s1,[::1]:5/m/2")),
            "redis+sentinel://<redacted>@s1:26379,[::1]:5/m/2"
        );
        assert_eq!(
            shown(&url("redis+cluster://a:1,b:2")),
            "redis+cluster://a:1,b:2"
        );
        let mut c = StoreConfig::redis("h");
        c.password = Some("s3cret".into());
        c.key_prefix = Some("no-t valid".into());
        assert_eq!(shown(&c), "<invalid configuration>");
        let debug = format!("{:?}", url("redis://alice:s3cret@h"));
        assert!(
            !debug.contains("s3cret") && !debug.contains("alice"),
            "{debug}"
        );
    }
}
