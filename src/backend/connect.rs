//! From a resolved [`Deployment`] to a connected Redis backend: the redis-rs
//! clients (addresses, logins, TLS and its files), and connecting them within
//! the socket timeout, with a hint when the failure looks like TLS spoken to
//! a plain server or the other way round. The only place where redis-rs
//! clients are configured.

use std::fmt;
use std::path::Path;

use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion,
    RedisConnectionInfo, RedisError, TlsCertificates, TlsMode,
};

use super::classify::{classify, tls_error, Class};
use super::connection::{within, Connector};
use super::redis::RedisBackend;
use super::Fault;
use crate::config::{Access, Deployment, Endpoint, Tls, TlsFiles, Topology};
use crate::error::LockError;
use crate::keys::KeySpace;

/// Connects the Redis backend `d` describes. Everything, from the first
/// connection to the script mode's probe, ends within the socket timeout.
pub(crate) async fn open(d: Deployment) -> Result<RedisBackend, LockError> {
    let connector = connector(&d)?;
    if d.uses_tls() {
        // rustls needs a process-wide crypto provider; another may already be installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let timeout = d.socket_timeout;
    let connecting = RedisBackend::connect(
        connector,
        KeySpace::new(d.key_prefix.clone()),
        timeout,
        d.script_mode,
    );
    match within(timeout, "connecting", connecting).await {
        Ok(backend) => Ok(backend),
        Err(e) => Err(connect_error(&d, e)),
    }
}

/// The redis-rs clients of `d`, not connected. The TLS files are read and
/// parsed here, so a bad file is an error of the configuration.
pub(crate) fn connector(d: &Deployment) -> Result<Connector, LockError> {
    let certs = certificates(&d.tls_files)?;
    let invalid = |e: RedisError| LockError::invalid("redis connection", e.to_string());
    let data_certs = d.data.tls.and(certs.clone());
    Ok(match &d.topology {
        Topology::Standard(node) => {
            let info = node_info(node, &d.data, d.db).map_err(invalid)?;
            Connector::Standard(client(info, data_certs).map_err(invalid)?)
        }
        Topology::Cluster(nodes) => {
            let nodes = nodes
                .iter()
                .map(|n| node_info(n, &d.data, d.db))
                .collect::<Result<Vec<_>, _>>()
                .map_err(invalid)?;
            // Built once here for its checks (one user, password, TLS mode
            // across the nodes); the backend builds its own with a push sender.
            let mut check =
                ClusterClientBuilder::new(nodes.clone()).use_protocol(ProtocolVersion::RESP3);
            if let Some(certs) = &data_certs {
                check = check.certs(certs.clone());
            }
            check.build().map_err(invalid)?;
            Connector::Cluster {
                nodes,
                certs: data_certs,
            }
        }
        Topology::Sentinel {
            sentinels,
            service,
            access,
        } => {
            let mut builder = SentinelClientBuilder::new(
                sentinels.iter().map(|s| address(s, access.tls)),
                service,
                SentinelServerType::Master,
            )
            .map_err(invalid)?
            .set_client_to_redis_protocol(ProtocolVersion::RESP3)
            .set_client_to_redis_db(d.db);
            if let Some(user) = &d.data.username {
                builder = builder.set_client_to_redis_username(user);
            }
            if let Some(password) = &d.data.password {
                builder = builder.set_client_to_redis_password(password);
            }
            if let Some(tls) = d.data.tls {
                builder = builder.set_client_to_redis_tls_mode(tls_mode(tls));
            }
            if let Some(certs) = data_certs {
                builder = builder.set_client_to_redis_certificates(certs);
            }
            if let Some(user) = &access.username {
                builder = builder.set_client_to_sentinel_username(user);
            }
            if let Some(password) = &access.password {
                builder = builder.set_client_to_sentinel_password(password);
            }
            let sentinel_certs = access.tls.and(certs);
            if let Some(tls) = access.tls {
                builder = builder.set_client_to_sentinel_tls_mode(tls_mode(tls));
            }
            if let Some(certs) = &sentinel_certs {
                builder = builder.set_client_to_sentinel_certificates(certs.clone());
            }
            let watchers = sentinels
                .iter()
                .map(|s| client(node_info(s, access, 0)?, sentinel_certs.clone()))
                .collect::<Result<_, _>>()
                .map_err(invalid)?;
            Connector::Sentinel {
                client: builder.build().map_err(invalid)?,
                service: service.clone(),
                sentinels: sentinels.iter().map(ToString::to_string).collect(),
                watchers,
            }
        }
    })
}

fn tls_mode(tls: Tls) -> TlsMode {
    if tls.insecure {
        TlsMode::Insecure
    } else {
        TlsMode::Secure
    }
}

fn address(node: &Endpoint, tls: Option<Tls>) -> ConnectionAddr {
    match tls {
        None => ConnectionAddr::Tcp(node.host.clone(), node.port),
        Some(tls) => ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: tls.insecure,
            tls_params: None,
        },
    }
}

/// One server's address and login, speaking RESP3 (wake-ups arrive as pushes).
fn node_info(node: &Endpoint, access: &Access, db: i64) -> redis::RedisResult<ConnectionInfo> {
    let mut settings = RedisConnectionInfo::default()
        .set_protocol(ProtocolVersion::RESP3)
        .set_db(db);
    if let Some(user) = &access.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &access.password {
        settings = settings.set_password(password);
    }
    Ok(address(node, access.tls)
        .into_connection_info()?
        .set_redis_settings(settings))
}

fn client(
    info: ConnectionInfo,
    certs: Option<TlsCertificates>,
) -> redis::RedisResult<redis::Client> {
    match certs {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
}

/// The CA and client certificate files, read and checked.
fn certificates(files: &TlsFiles) -> Result<Option<TlsCertificates>, LockError> {
    if files == &TlsFiles::default() {
        return Ok(None);
    }
    let root_cert = match &files.ca_certs {
        Some(path) => Some(read_pem("ssl_ca_certs", path)?),
        None => None,
    };
    let client_tls = match &files.certfile {
        None => None,
        Some(cert) => {
            let client_cert = read_pem("ssl_certfile", cert)?;
            let client_key = match &files.keyfile {
                Some(key) => std::fs::read(key).map_err(|e| cannot_read("ssl_keyfile", key, e))?,
                None => client_cert.clone(),
            };
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
    };
    let certs = TlsCertificates {
        client_tls,
        root_cert,
    };
    // Parse them now (redis-rs does so when a client is built), so a bad file
    // is an error of the configuration rather than of every connection.
    let probe = address(
        &Endpoint {
            host: "127.0.0.1".into(),
            port: 6379,
        },
        Some(Tls { insecure: false }),
    );
    redis::Client::build_with_tls(probe, certs.clone())
        .map_err(|e| LockError::invalid("tls", format!("the TLS files do not load: {e}")))?;
    Ok(Some(certs))
}

/// A PEM file that must hold a certificate.
fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, LockError> {
    let pem = std::fs::read(path).map_err(|e| cannot_read(what, path, e))?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(LockError::invalid(
            what,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(pem)
}

fn cannot_read(what: &'static str, path: &Path, e: std::io::Error) -> LockError {
    LockError::invalid(what, format!("cannot read {}: {e}", path.display()))
}

/// A connection failure, with a hint where the cause is likely to be
/// elsewhere than the message says: TLS spoken to a plain server (it waits
/// for a command line that never ends, or answers in plain text), or plain
/// text spoken to a TLS server (it drops the connection at once).
fn connect_error(d: &Deployment, e: RedisError) -> LockError {
    let class = classify(&e);
    let refused = e.is_connection_refusal();
    let not_tls_reply = matches!(tls_error(&e), Some(rustls::Error::InvalidMessage(_)));
    // Behind sentinels the failure may be on either hop: a hint only when
    // both speak alike.
    let tls = match &d.topology {
        Topology::Sentinel { access, .. } if access.tls.is_some() != d.data.tls.is_some() => {
            return Fault::from(e).into_error(None)
        }
        _ => d.data.tls.is_some(),
    };
    let hint = match (tls, class) {
        (true, Class::Unanswered) if !refused => Some(
            "no TLS answer: is the server speaking TLS? a plain server needs redis://, not rediss://"
                .to_owned(),
        ),
        (true, Class::Tls) if not_tls_reply => Some(
            "is the server speaking TLS? a plain server needs redis://, not rediss://".to_owned(),
        ),
        (false, Class::Unanswered) if e.is_connection_dropped() && !refused => Some(
            "the server hung up at once: is it speaking TLS only? try rediss://".to_owned(),
        ),
        _ => None,
    };
    let fault = match hint {
        None => Fault::from(e),
        Some(hint) => Fault::Store {
            retryable: class.is_retryable(),
            unknown_outcome: false,
            source: Box::new(Hinted { source: e, hint }),
        },
    };
    fault.into_error(None)
}

/// An error with a hint about its likely cause.
#[derive(Debug)]
struct Hinted {
    source: RedisError,
    hint: String,
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.source, self.hint)
    }
}

impl std::error::Error for Hinted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Not part of the store: the `ticketlock` binary's `inspect` and `scripts
/// load` talk to one server directly, connected the same way.
#[cfg(feature = "cli")]
pub(crate) async fn one_server(
    d: &Deployment,
) -> Result<redis::aio::MultiplexedConnection, LockError> {
    let Topology::Standard(node) = &d.topology else {
        return Err(LockError::invalid(
            "url",
            "this needs one server (a redis:// or rediss:// url): inspect and scripts load \
             talk to the node or master holding the keys, simulate keeps its probes there",
        ));
    };
    let certs = certificates(&d.tls_files)?;
    if d.uses_tls() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let client = node_info(node, &d.data, d.db)
        .and_then(|info| client(info, d.data.tls.and(certs)))
        .map_err(|e| LockError::invalid("redis connection", e.to_string()))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(d.socket_timeout))
        .set_response_timeout(Some(d.socket_timeout));
    within(
        d.socket_timeout,
        "connecting",
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|e| connect_error(d, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resolve;
    use crate::StoreConfig;

    fn built(config: &StoreConfig) -> Result<Connector, LockError> {
        connector(&resolve(config)?)
    }

    #[test]
    fn clients_carry_address_login_db_and_resp3() {
        let Connector::Standard(client) = built(&StoreConfig::redis("redis://u:pw@h:7/3")).unwrap()
        else {
            panic!("not one server")
        };
        let info = client.get_connection_info();
        assert_eq!(info.addr().to_string(), "h:7");
        let settings = info.redis_settings();
        assert_eq!(
            (settings.username(), settings.password()),
            (Some("u"), Some("pw"))
        );
        assert_eq!(settings.db(), 3);
        assert_eq!(settings.protocol(), ProtocolVersion::RESP3);

        let Connector::Cluster { nodes, .. } =
            built(&StoreConfig::redis("rediss+cluster://:pw@a:1,[::1]:2")).unwrap()
        else {
            panic!("not a cluster")
        };
        assert_eq!(nodes.len(), 2);
        for n in &nodes {
            assert!(matches!(
                n.addr(),
                ConnectionAddr::TcpTls {
                    insecure: false,
                    ..
                }
            ));
            assert_eq!(n.redis_settings().password(), Some("pw"));
            assert_eq!(n.redis_settings().db(), 0);
        }

        let mut c = StoreConfig::redis("redis+sentinel://s1,s2:5/m");
        c.sentinel_password = Some("watch".into());
        let Connector::Sentinel {
            sentinels,
            service,
            watchers,
            ..
        } = built(&c).unwrap()
        else {
            panic!("not sentinels")
        };
        assert_eq!(
            (sentinels.as_slice(), service.as_str()),
            (&["s1:26379".to_owned(), "s2:5".to_owned()][..], "m")
        );
        assert_eq!(
            watchers[1]
                .get_connection_info()
                .redis_settings()
                .password(),
            Some("watch")
        );
    }

    #[test]
    fn tls_files_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("ticketlock-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let mut c = StoreConfig::redis("h");
        c.use_ssl = true;
        c.ssl_ca_certs = Some(not_pem.clone());
        assert!(matches!(
            built(&c),
            Err(LockError::InvalidInput {
                what: "ssl_ca_certs",
                ..
            })
        ));
        c.ssl_ca_certs = Some(dir.join("missing.pem"));
        match built(&c) {
            Err(LockError::InvalidInput {
                what: "ssl_ca_certs",
                reason,
            }) => assert!(reason.contains("missing.pem"), "{reason}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        c.ssl_ca_certs = None;
        c.ssl_certfile = Some(not_pem);
        assert!(matches!(
            built(&c),
            Err(LockError::InvalidInput {
                what: "ssl_certfile",
                ..
            })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
