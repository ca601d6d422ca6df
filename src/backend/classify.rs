//! What a Redis error means, decided in one place: whether repeating the call
//! may help (the `retryable` flag of [`LockError::Backend`](crate::LockError)),
//! whether the Sentinel master must be looked up again, whether the server
//! refused a command (the script mode's fallback), and whether the data is
//! foreign. Every other module asks [`classify`]; none looks at error kinds
//! or codes itself.

use std::sync::Arc;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::Fault;

/// The kinds of Redis failure the crate tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The server answered it cannot take writes (a demoted master:
    /// `READONLY`; `MASTERDOWN`; a master short of the replicas its
    /// `min-replicas-to-write` asks for: `NOREPLICAS`, as during a failover).
    /// Nothing was changed.
    NotMaster,
    /// No answer: refused, dropped, timed out, or any other I/O failure.
    Unanswered,
    /// The server is busy for now (`LOADING`, `TRYAGAIN`, `CLUSTERDOWN`).
    Busy,
    /// TLS failed (an untrusted certificate, a wrong name, a peer that does
    /// not speak TLS). It comes as an I/O error, but repeating cannot fix it.
    Tls,
    /// The server refused the command itself: `NOPERM` for the command (an
    /// ACL), or an unknown command (`rename-command`, an older server). It
    /// did not run.
    Refused,
    /// A key holds another type than the scripts write (`WRONGTYPE`).
    Foreign,
    /// Anything else: a wrong password, a script error, ...
    Other,
}

impl Class {
    /// Whether repeating the same call later may succeed.
    pub(crate) fn is_retryable(self) -> bool {
        matches!(self, Class::NotMaster | Class::Unanswered | Class::Busy)
    }
}

/// The one classifier of Redis errors.
pub(crate) fn classify(e: &RedisError) -> Class {
    match e.kind() {
        _ if e.code() == Some("WRONGTYPE") => Class::Foreign,
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown) => {
            Class::NotMaster
        }
        _ if e.code() == Some("NOREPLICAS") => Class::NotMaster,
        ErrorKind::Server(
            ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown,
        ) => Class::Busy,
        // The command itself, not its keys or channels: "... no permissions
        // to run the 'fcall' command" (a key refused is Other: another way
        // of calling would be refused too).
        ErrorKind::Server(ServerErrorKind::NoPerm)
            if e.detail().is_some_and(|d| d.contains("permissions to run")) =>
        {
            Class::Refused
        }
        _ if e.code() == Some("ERR")
            && e.detail().is_some_and(|d| d.starts_with("unknown command")) =>
        {
            Class::Refused
        }
        _ if is_tls_failure(e) => Class::Tls,
        _ if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal() =>
        {
            Class::Unanswered
        }
        _ => Class::Other,
    }
}

/// True when the server answered with an error (as opposed to no answer):
/// a command that was refused or failed, not a connection that did.
pub(crate) fn is_server_reply(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(_))
}

/// A TLS failure comes as an I/O error whose cause is a `rustls::Error`,
/// somewhere down the chain of sources.
fn is_tls_failure(error: &RedisError) -> bool {
    tls_error(error).is_some()
}

/// The `rustls::Error` behind `error`, if TLS failed.
pub(crate) fn tls_error(error: &RedisError) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(found) = rustls_in(e) {
            return Some(found);
        }
        source = e.source();
    }
    None
}

fn rustls_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    // redis keeps I/O errors behind an Arc, and io::Error::source() skips
    // the error it wraps, so look inside both by hand.
    let e: &'a (dyn std::error::Error + 'static) = match e.downcast_ref::<Shared>() {
        Some(shared) => &**shared,
        None => e,
    };
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })
}

impl From<RedisError> for Fault {
    fn from(e: RedisError) -> Self {
        // Redis appends where in a script an error was raised.
        let detail = e.detail().map(|d| d.split(" script: ").next().unwrap_or(d));
        // A script refusing its arguments for this conversation (lua/common.lua
        // raises "ERR ticketlock: ..." before it writes anything).
        if let Some(reason) = detail
            .filter(|_| e.code() == Some("ERR"))
            .and_then(|d| d.strip_prefix("ticketlock: "))
        {
            return Fault::Refused(reason.to_owned());
        }
        match classify(&e) {
            Class::Foreign => {
                Fault::Foreign(detail.unwrap_or("a key holds the wrong type").to_owned())
            }
            class => Fault::Store {
                retryable: class.is_retryable(),
                // Sent, but no answer: it may have run. A refused connection
                // never sent it.
                unknown_outcome: class == Class::Unanswered && !e.is_connection_refusal(),
                source: Box::new(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &str) -> RedisError {
        redis::RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "server error",
            format!("{code} {detail}"),
        ))
    }

    fn parsed(line: &str) -> RedisError {
        // The way a reply line reaches us: through the RESP parser.
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(redis::Value::ServerError(e)) => e.into(),
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn every_family_has_its_class() {
        let io = |kind| RedisError::from(std::io::Error::new(kind, "x"));
        assert_eq!(
            classify(&io(std::io::ErrorKind::TimedOut)),
            Class::Unanswered
        );
        assert_eq!(
            classify(&io(std::io::ErrorKind::ConnectionRefused)),
            Class::Unanswered
        );
        assert_eq!(classify(&parsed("READONLY no")), Class::NotMaster);
        assert_eq!(classify(&parsed("NOREPLICAS not enough")), Class::NotMaster);
        assert_eq!(classify(&parsed("LOADING wait")), Class::Busy);
        assert_eq!(
            classify(&parsed(
                "NOPERM this user has no permissions to run the 'fcall' command"
            )),
            Class::Refused
        );
        assert_eq!(
            classify(&parsed(
                "NOPERM this user has no permissions to access one of the keys used as arguments"
            )),
            Class::Other
        );
        assert_eq!(
            classify(&parsed("ERR unknown command 'FCALL', with args")),
            Class::Refused
        );
        assert_eq!(classify(&parsed("WRONGTYPE Operation")), Class::Foreign);
        assert_eq!(classify(&parsed("ERR user_script:1: boom")), Class::Other);
        assert_eq!(classify(&server("WRONGPASS", "invalid")), Class::Other);
        let tls = RedisError::from(std::io::Error::other(rustls::Error::DecryptError));
        assert_eq!(classify(&tls), Class::Tls);
        for (class, retryable) in [
            (Class::NotMaster, true),
            (Class::Unanswered, true),
            (Class::Busy, true),
            (Class::Tls, false),
            (Class::Refused, false),
            (Class::Foreign, false),
            (Class::Other, false),
        ] {
            assert_eq!(class.is_retryable(), retryable, "{class:?}");
        }
    }
}
