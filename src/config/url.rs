//! The URL grammar: one function turns a URL into [`StoreConfig`] fields,
//! and one writes a resolved deployment back as a URL with its credentials
//! hidden. Nothing else in the crate (or its command line) parses a URL.
//!
//! ```text
//! scheme://[userinfo@]host[:port][,host[:port]...][/path][#insecure]
//! ```
//!
//! The user-info ends at the *last* `@`: a password may hold `@`, `/`, `#`
//! or `,`, and whatever part of it that is, it stays on the hidden side.
//! Errors never quote the input: they name the part that is wrong (the
//! scheme when it is a well-known other one, the position of a bad host), so
//! a mistyped URL cannot carry its password into a log.

use std::fmt;

use super::resolve::{Deployment, Endpoint, Topology};
use super::{DeploymentMode, StoreConfig, StoreType};
use crate::error::LockError;

/// What secrets are replaced with wherever a configuration is shown.
pub(crate) const REDACTED: &str = "<redacted>";

const URL_FORMS: &str = "expected redis://[user:password@]host[:port][/db], rediss://..., \
     redis+cluster://[user:password@]host:port,host:port[/0], \
     redis+sentinel://[user:password@]host:port,host:port/<service>[/db] (rediss+ for TLS) or memory://";

/// The spellings of the in-memory store (what `type: in_memory` selects).
pub(crate) fn is_memory_url(url: &str) -> bool {
    matches!(
        url.trim(),
        "memory" | "memory://" | "in_memory" | "in_memory://"
    )
}

fn bad(why: impl fmt::Display) -> LockError {
    LockError::invalid("url", format!("{why} ({URL_FORMS})"))
}

/// `url` as configuration fields; see [`StoreConfig::from_url`].
pub(crate) fn parse(url: &str) -> Result<StoreConfig, LockError> {
    let url = url.trim();
    if is_memory_url(url) {
        return Ok(StoreConfig::default());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("it does not start with a scheme such as redis://"));
    };
    let (mode, tls) = match scheme {
        "redis" => (DeploymentMode::Standard, false),
        "rediss" => (DeploymentMode::Standard, true),
        "redis+cluster" => (DeploymentMode::Cluster, false),
        "rediss+cluster" => (DeploymentMode::Cluster, true),
        "redis+sentinel" => (DeploymentMode::Sentinel, false),
        "rediss+sentinel" => (DeploymentMode::Sentinel, true),
        // Named only when it is a well-known one: whatever else stands
        // before `://` may be a password typed in the wrong place.
        "http" | "https" | "tcp" | "unix" | "valkey" | "valkeys" => {
            return Err(bad(format_args!("unsupported scheme {scheme}://")))
        }
        _ => return Err(bad("unsupported scheme")),
    };
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, rest),
    };
    let (rest, insecure) = match rest.split_once('#') {
        None => (rest, false),
        Some((rest, "insecure")) if tls => (rest, true),
        Some((_, "insecure")) => return Err(bad("#insecure is for rediss:// urls")),
        Some(_) => return Err(bad("only #insecure may follow #")),
    };
    if rest.contains('?') {
        return Err(bad("query parameters are not supported"));
    }
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hosts: Vec<&str> = hosts.split(',').collect();
    if mode == DeploymentMode::Standard && hosts.len() > 1 {
        return Err(bad(format_args!(
            "{scheme}:// takes one host; several need redis+cluster:// or redis+sentinel://"
        )));
    }
    let mut nodes = Vec::with_capacity(hosts.len());
    for (i, host) in hosts.iter().enumerate() {
        let node = endpoint(host).map_err(|why| match hosts.len() {
            1 => bad(format_args!("the host is {why}")),
            n => bad(format_args!("host {} of {n} is {why}", i + 1)),
        })?;
        nodes.push(node);
    }
    let (service, db) = match mode {
        DeploymentMode::Sentinel => path.split_once('/').unwrap_or((path, "")),
        _ => ("", path),
    };
    let db = match db {
        "" => 0,
        db => db
            .parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or_else(|| bad("the path is not a database number"))?,
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(userinfo) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let decoded = |text: &str| match percent_decoded(text) {
                Some(text) => Ok((!text.is_empty()).then_some(text)),
                None => Err(bad(
                    "user or password is not valid UTF-8 once percent-decoded",
                )),
            };
            (decoded(user)?, decoded(password)?)
        }
    };
    let mut config = StoreConfig {
        store_type: StoreType::Redis,
        db: Some(db),
        username,
        password,
        use_ssl: tls,
        ssl_insecure: insecure,
        deployment_mode: mode,
        sentinel_service: (!service.is_empty()).then(|| service.to_owned()),
        ..StoreConfig::default()
    };
    match mode {
        DeploymentMode::Standard => {
            let (host, port) = nodes.swap_remove(0);
            config.host = Some(host);
            config.port = port;
        }
        _ => {
            config.endpoints = nodes
                .into_iter()
                .map(|(host, port)| match port {
                    Some(port) => Endpoint { host, port }.to_string(),
                    None if host.contains(':') => format!("[{host}]"),
                    None => host,
                })
                .collect();
        }
    }
    Ok(config)
}

/// `%XX` sequences decoded; a `%` not followed by two hex digits stays as
/// it is. `None` when the result is not UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        match (bytes[i], hex) {
            (b'%', Some(hex)) => {
                let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
                out.push(digit(hex[0]) << 4 | digit(hex[1]));
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The `host[:port]` grammar (URLs, `host`, `endpoints`): a host name
/// (letters, digits, `-`, `_`, `.`), an IPv4 address, an IPv6 address bare
/// or in brackets (`[v6]:port`). Returns the host (IPv6 without brackets)
/// and the port if one is given; the error says what is wrong without
/// repeating the text.
pub(crate) fn endpoint(text: &str) -> Result<(String, Option<u16>), &'static str> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty");
    }
    let is_v6 = |host: &str| host.parse::<std::net::Ipv6Addr>().is_ok();
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address without its ]")?;
        if !is_v6(host) {
            return Err("not an IPv6 address in [ ]");
        }
        match after {
            "" => (host, None),
            after => (host, Some(after.strip_prefix(':').ok_or("not [v6]:port")?)),
        }
    } else if is_v6(t) {
        // A bare IPv6 address, without a port.
        (t, None)
    } else {
        match t.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (t, None),
        }
    };
    let name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if host.is_empty() || !(is_v6(host) || host.chars().all(name)) {
        return Err("not a host[:port]");
    }
    let port = match port {
        None => None,
        Some(port) => match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err("not a host with a port from 1 to 65535"),
            Ok(port) => Some(port),
        },
    };
    Ok((host.to_owned(), port))
}

/// `host` or an `endpoints` entry as `Debug` shows it: a valid host as it
/// is, a URL with its user-info hidden, anything else not at all (a
/// password typed into the wrong place must not show).
pub(crate) fn shown_host(text: &str) -> String {
    if endpoint(text).is_ok() {
        return text.trim().to_owned();
    }
    if parse(text).is_err() {
        return "<not a valid host or url>".to_owned();
    }
    // It parsed, so everything after the user-info is well-formed.
    let text = text.trim();
    match text.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, rest)) => format!("{scheme}://{REDACTED}@{rest}"),
            None => text.to_owned(),
        },
        None => text.to_owned(),
    }
}

/// A resolved deployment as a URL, credentials hidden (`StoreConfig`'s `Display`).
pub(crate) fn write_url(f: &mut fmt::Formatter<'_>, d: &Deployment) -> fmt::Result {
    let s = if d.data.tls.is_some() { "s" } else { "" };
    let (kind, nodes) = match &d.topology {
        Topology::Standard(node) => ("", std::slice::from_ref(node)),
        Topology::Cluster(nodes) => ("+cluster", nodes.as_slice()),
        Topology::Sentinel { sentinels, .. } => ("+sentinel", sentinels.as_slice()),
    };
    write!(f, "redis{s}{kind}://")?;
    if d.data.username.is_some() || d.data.password.is_some() {
        write!(f, "{REDACTED}@")?;
    }
    for (i, node) in nodes.iter().enumerate() {
        let comma = if i > 0 { "," } else { "" };
        write!(f, "{comma}{node}")?;
    }
    match &d.topology {
        Topology::Standard(_) => write!(f, "/{}", d.db)?,
        Topology::Cluster(_) => {}
        Topology::Sentinel { service, .. } => write!(f, "/{service}/{}", d.db)?,
    }
    if d.data.tls.as_ref().is_some_and(|tls| tls.insecure) {
        f.write_str("#insecure")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(url: &str) -> String {
        match parse(url) {
            Err(LockError::InvalidInput {
                what: "url",
                reason,
            }) => reason,
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn urls_become_config_fields() {
        let c = parse("rediss://app:p%40ss@[::1]:6380/3").unwrap();
        assert_eq!(c.store_type, StoreType::Redis);
        assert_eq!(c.deployment_mode, DeploymentMode::Standard);
        assert_eq!(
            (c.host.as_deref(), c.port, c.db),
            (Some("::1"), Some(6380), Some(3))
        );
        assert_eq!(c.username.as_deref(), Some("app"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert!(c.use_ssl && !c.ssl_insecure);

        let c = parse(" redis://:a@b@h ").unwrap();
        assert_eq!((c.username, c.password.as_deref()), (None, Some("a@b")));
        assert_eq!((c.port, c.db), (None, Some(0)));

        let c = parse("rediss+cluster://h1,h2:7001,[::1]:7002/0#insecure").unwrap();
        assert_eq!(c.deployment_mode, DeploymentMode::Cluster);
        assert_eq!(c.endpoints, ["h1", "h2:7001", "[::1]:7002"]);
        assert_eq!(c.host, None);
        assert!(c.use_ssl && c.ssl_insecure);

        let c = parse("redis+sentinel://s1/mymaster").unwrap();
        assert_eq!(c.sentinel_service.as_deref(), Some("mymaster"));
        assert_eq!(c.db, Some(0));
        assert_eq!(parse("redis+sentinel://s1").unwrap().sentinel_service, None);

        for memory in ["memory://", " memory ", "in_memory://", "in_memory"] {
            assert_eq!(parse(memory).unwrap().store_type, StoreType::InMemory);
        }
    }

    #[test]
    fn malformed_urls_say_what_is_wrong_without_quoting_it() {
        for (url, says) in [
            ("", "scheme"),
            ("user:s3cret@127.0.0.1:6379", "scheme"),
            ("redis//:s3cret@host", "scheme"),
            ("http://x", "unsupported scheme http://"),
            ("u:s3cret@h://x", "unsupported scheme ("),
            ("s3cret://h", "unsupported scheme ("),
            ("redis://:s3cret@", "the host is empty"),
            ("redis://u:s3cret@h:notaport", "port"),
            ("redis://u:s3cret@h:1/x", "database"),
            ("redis://h:1/-1", "database"),
            ("redis://h,h2", "one host"),
            ("redis+cluster://a:1,,b:2", "host 2 of 3 is empty"),
            ("redis+cluster://a:1?protocol=2", "query"),
            ("redis://h#insecure", "rediss"),
            ("rediss://h#x", "#insecure"),
            ("redis://%FF@h", "UTF-8"),
        ] {
            let reason = reason(url);
            assert!(reason.contains(says), "{url}: {reason}");
            assert!(
                !reason.contains("s3cret") && !reason.contains("notaport"),
                "{reason}"
            );
        }
    }

    #[test]
    fn endpoints_take_hosts_ports_and_ipv6() {
        let ok = |t: &str| endpoint(t).unwrap();
        assert_eq!(ok("h"), ("h".into(), None));
        assert_eq!(ok(" h:1 "), ("h".into(), Some(1)));
        assert_eq!(ok("[::1]:7000"), ("::1".into(), Some(7000)));
        assert_eq!(ok("[::1]"), ("::1".into(), None));
        assert_eq!(ok("::1"), ("::1".into(), None));
        for bad in [
            "", "h:0", "h:x", "h:70000", "[::1", "[::1]x", "a/b", "u@h", "h:1,h:2", ":1",
        ] {
            assert!(endpoint(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn debug_shows_hosts_and_urls_without_credentials() {
        assert_eq!(shown_host("10.0.0.5"), "10.0.0.5");
        assert_eq!(
            shown_host("rediss://tok@h:1/2"),
            "rediss://<redacted>@h:1/2"
        );
        assert_eq!(shown_host("redis://u:p@w@h"), "redis://<redacted>@h");
        assert_eq!(shown_host("redis//:s3cret@h"), "<not a valid host or url>");
        assert_eq!(shown_host("u:s3cret"), "<not a valid host or url>");
    }
}
