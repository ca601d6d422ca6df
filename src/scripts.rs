//! The Lua scripts in `lua/`, embedded at compile time, and how to run them.
//!
//! Each operation is sent as `lua/common.lua` followed by the operation's
//! file, so the shared helpers exist once. The same files also make one Redis
//! Functions library ([`library`]): the helpers once, then each operation's
//! file as the body of a registered function. There is one source of each
//! operation either way.
//!
//! Scripts run by SHA (EVALSHA); a server that does not know the SHA (restart,
//! `SCRIPT FLUSH`) gets the code with `SCRIPT LOAD` and the call is retried
//! exactly once. Functions are called with FCALL (FCALL_RO for read-only
//! ones); a server that lost them (restart, `FUNCTION FLUSH`) gets the library
//! again and the call is retried exactly once. Every other error passes through.

use std::sync::OnceLock;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};

const COMMON: &str = include_str!("../lua/common.lua");

/// Name of the Functions library; the version changes whenever a script's
/// contract does, so two versions of the crate can share one Redis.
pub const LIBRARY_NAME: &str = "ticketlock_v1";

macro_rules! lua {
    ($name:literal, $read_only:expr) => {
        Script {
            name: $name,
            body: include_str!(concat!("../lua/", $name, ".lua")),
            code: concat!(
                include_str!("../lua/common.lua"),
                include_str!(concat!("../lua/", $name, ".lua"))
            ),
            read_only: $read_only,
            sha: OnceLock::new(),
        }
    };
}

/// One operation's script, for clients that run it themselves: its file, its
/// complete code (`lua/common.lua` + the file) and that code's SHA1.
#[derive(Debug)]
pub struct Script {
    name: &'static str,
    body: &'static str,
    code: &'static str,
    /// Registered with the `no-writes` flag and called with FCALL_RO.
    read_only: bool,
    sha: OnceLock<String>,
}

/// How a store runs the scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invoke {
    /// EVALSHA, SCRIPT LOAD on NOSCRIPT.
    Eval,
    /// FCALL, FUNCTION LOAD on "Function not found".
    Functions,
}

impl Script {
    /// The operation's name, as in `lua/<name>.lua`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The code sent to Redis: `lua/common.lua` followed by `lua/<name>.lua`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// SHA1 of [`code`](Self::code), as `EVALSHA` wants it.
    pub fn sha(&self) -> &str {
        self.sha
            .get_or_init(|| sha1_smol::Sha1::from(self.code).digest().to_string())
    }

    /// True for operations that write nothing (`no-writes`, callable with `FCALL_RO`).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The name this operation is registered under in the Functions library.
    pub fn function_name(&self) -> String {
        format!("{LIBRARY_NAME}_{}", self.name)
    }

    /// Runs the operation, loading the code and retrying once if the server lacks it.
    pub(crate) async fn run(
        &self,
        conn: &mut (impl ConnectionLike + Send),
        invoke: Invoke,
        keys: &[String],
        args: &[String],
    ) -> RedisResult<Value> {
        let mut call = match invoke {
            Invoke::Eval => {
                let mut call = redis::cmd("EVALSHA");
                call.arg(self.sha());
                call
            }
            Invoke::Functions => {
                let mut call = redis::cmd(if self.read_only { "FCALL_RO" } else { "FCALL" });
                call.arg(self.function_name());
                call
            }
        };
        call.arg(keys.len()).arg(keys).arg(args);
        match call.query_async(conn).await {
            Err(e)
                if invoke == Invoke::Eval
                    && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
            {
                let _: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(self.code)
                    .query_async(conn)
                    .await?;
                call.query_async(conn).await
            }
            Err(e) if invoke == Invoke::Functions && is_function_missing(&e) => {
                load_library(conn).await?;
                call.query_async(conn).await
            }
            other => other,
        }
    }
}

fn is_function_missing(e: &RedisError) -> bool {
    e.code() == Some("ERR")
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

/// Loads (or replaces) this version's Functions library; returns its name.
pub(crate) async fn load_library(conn: &mut (impl ConnectionLike + Send)) -> RedisResult<String> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library())
        .query_async(conn)
        .await
}

pub(crate) static ISSUE: Script = lua!("issue", false);
pub(crate) static POLL: Script = lua!("poll", false);
pub(crate) static RELEASE: Script = lua!("release", false);
pub(crate) static READ: Script = lua!("read", true);
pub(crate) static SAVE: Script = lua!("save", false);
pub(crate) static DELETE: Script = lua!("delete", false);
pub(crate) static UPDATE: Script = lua!("update", false);
pub(crate) static EXTEND: Script = lua!("extend", false);

static ALL: [&Script; 8] = [
    &ISSUE, &POLL, &RELEASE, &READ, &SAVE, &DELETE, &UPDATE, &EXTEND,
];

/// Every operation's script, in the order the README lists them.
pub fn scripts() -> &'static [&'static Script] {
    &ALL
}

/// The Functions library [`LIBRARY_NAME`]: the shared helpers once, then each
/// operation's file as the body of function `ticketlock_v1_<name>` (`KEYS`
/// and `ARGV` become its parameters). Load it with `FUNCTION LOAD REPLACE`.
pub fn library() -> &'static str {
    static LIBRARY: OnceLock<String> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let mut code = format!("#!lua name={LIBRARY_NAME}\n{COMMON}\n");
        for script in ALL {
            let flags = if script.read_only { "{ 'no-writes' }" } else { "{}" };
            code.push_str(&format!(
                "redis.register_function{{ function_name = '{}', flags = {flags}, callback = function(KEYS, ARGV)\n{}\nend }}\n",
                script.function_name(),
                script.body,
            ));
        }
        code
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_starts_with_the_shared_helpers_and_has_its_own_sha() {
        let mut shas: Vec<&str> = ALL.iter().map(|s| s.sha()).collect();
        shas.sort();
        shas.dedup();
        assert_eq!(shas.len(), ALL.len());
        for s in ALL {
            assert!(s.code.starts_with(COMMON), "{}", s.name);
            assert!(s.code.ends_with(s.body), "{}", s.name);
            assert_eq!(s.sha().len(), 40);
        }
    }

    #[test]
    fn the_library_holds_each_operation_once() {
        let lib = library();
        assert!(lib.starts_with("#!lua name=ticketlock_v1\n"));
        assert_eq!(lib.matches("local function clock()").count(), 1);
        for s in ALL {
            assert_eq!(lib.matches(&format!("'{}'", s.function_name())).count(), 1);
            assert_eq!(lib.matches(s.body).count(), 1, "{}", s.name);
        }
        assert!(lib.contains("function_name = 'ticketlock_v1_read', flags = { 'no-writes' }"));
    }
}
