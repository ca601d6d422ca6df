//! Self-checks of the test harness in `tests/support/`.

mod support;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use support::{ping_port, redis_url, unique_prefix, RedisServer};

fn connect_error(port: u16) -> Option<ErrorKind> {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .err()
        .map(|e| e.kind())
}

#[test]
fn started_server_answers_ping() {
    let server = RedisServer::start();
    assert!(server.ping(), "log:\n{}", server.log());
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    assert!(server.pid() > 0);
    let pidfile = std::fs::read_to_string(server.dir().join("redis.pid")).unwrap();
    assert_eq!(pidfile.trim(), server.pid().to_string());
}

#[test]
fn two_servers_get_different_ports() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.pid(), b.pid());
    assert!(a.ping() && b.ping());
}

#[test]
fn dropped_server_refuses_connections_and_cleans_up() {
    let server = RedisServer::start();
    let port = server.port();
    let dir = server.dir().to_path_buf();
    assert!(server.ping());
    drop(server);
    assert_eq!(connect_error(port), Some(ErrorKind::ConnectionRefused));
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
}

#[test]
fn restart_keeps_port_and_answers_again() {
    let mut server = RedisServer::start();
    let port = server.port();
    let old_pid = server.pid();

    server.stop();
    assert!(!server.is_running());
    assert_eq!(connect_error(port), Some(ErrorKind::ConnectionRefused));

    server.restart();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), old_pid);
    assert!(server.is_running());
    assert!(server.ping(), "log:\n{}", server.log());

    // restart() also works on a running server.
    server.restart();
    assert_eq!(server.port(), port);
    assert!(server.ping());
}

#[test]
fn sigstop_freezes_and_sigcont_resumes() {
    let server = RedisServer::start();
    server.sigstop();
    assert!(!ping_port(server.port(), Duration::from_millis(300)));
    server.sigcont();
    assert!(server.ping());
    // Dropping a frozen server must still kill it.
    server.sigstop();
}

#[test]
fn shared_url_answers_ping() {
    let url = redis_url();
    assert_eq!(url, redis_url(), "redis_url() must be stable");
    if support::env_redis_url().is_none() {
        let port: u16 = url
            .strip_prefix("redis://127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected shared url {url}"));
        assert!(ping_port(port, Duration::from_secs(1)));
    }
}

#[test]
fn unique_prefixes_are_alphanumeric_and_distinct() {
    let prefixes: Vec<String> = (0..1000).map(|_| unique_prefix("my_tag-1:x")).collect();
    for p in &prefixes {
        assert!(p.starts_with("mytag1x"), "{p}");
        assert!(p.chars().all(|c| c.is_ascii_alphanumeric()), "{p}");
    }
    let distinct: std::collections::HashSet<_> = prefixes.iter().collect();
    assert_eq!(distinct.len(), prefixes.len());
}

#[test]
fn a_valkey_server_is_valkey_9_and_answers_ping() {
    let server = RedisServer::start_valkey();
    assert!(server.ping(), "log:\n{}", server.log());
    let mut conn = support::connect(&server.url(), None, Duration::from_secs(1)).unwrap();
    let info: redis::InfoDict = redis::cmd("INFO").arg("server").query(&mut conn).unwrap();
    assert_eq!(info.get::<String>("server_name").as_deref(), Some("valkey"));
    let version: String = info.get("valkey_version").expect("valkey_version");
    assert!(version.starts_with("9."), "Valkey {version}, not 9");
    assert_eq!(info.get::<u32>("process_id"), Some(server.pid()));
    println!("valkey-server {version}");
}
