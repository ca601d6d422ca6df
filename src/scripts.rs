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
//!
//! Redis Cluster deployments announce wake-ups with sharded pub/sub
//! (`SPUBLISH`), so they stay on the conversation's shard. That variant of
//! every script ([`Channels::Sharded`]) is the same code with the one line
//! `local PUBLISH = 'PUBLISH'` of `lua/common.lua` reading `'SPUBLISH'`: its
//! own SHAs, and its own Functions library [`SHARDED_LIBRARY_NAME`] (function
//! names are global in Redis, so the two libraries never collide).

use std::sync::OnceLock;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};

const COMMON: &str = include_str!("../lua/common.lua");

/// Name of the Functions library; the version changes whenever a script's
/// contract does, so two versions of the crate can share one Redis.
pub const LIBRARY_NAME: &str = "ticketlock_v2";

/// Name of the Functions library of the sharded variant (Redis Cluster).
pub(crate) const SHARDED_LIBRARY_NAME: &str = "ticketlock_v2s";

/// The one line of `lua/common.lua` that differs between the variants.
const PUBLISH_LINE: &str = "local PUBLISH = 'PUBLISH'";
const SHARDED_PUBLISH_LINE: &str = "local PUBLISH = 'SPUBLISH'";

/// Which pub/sub the scripts announce wake-ups on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channels {
    /// `PUBLISH` / `SUBSCRIBE`: one server, or the master Sentinel names.
    Classic,
    /// `SPUBLISH` / `SSUBSCRIBE`: Redis Cluster, on the conversation's shard.
    Sharded,
}

impl Channels {
    fn library_name(self) -> &'static str {
        match self {
            Channels::Classic => LIBRARY_NAME,
            Channels::Sharded => SHARDED_LIBRARY_NAME,
        }
    }
}

/// `lua/common.lua` as the sharded variant needs it.
fn sharded_common() -> &'static str {
    static SHARDED: OnceLock<String> = OnceLock::new();
    SHARDED.get_or_init(|| COMMON.replacen(PUBLISH_LINE, SHARDED_PUBLISH_LINE, 1))
}

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
            sharded: OnceLock::new(),
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
    /// The sharded variant's code and SHA1.
    sharded: OnceLock<(String, String)>,
}

/// One invocation of a script: which one, on which keys, with which
/// arguments (what a connection runs, however it routes and invokes it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'a> {
    pub(crate) script: &'a Script,
    pub(crate) keys: &'a [String],
    pub(crate) args: &'a [String],
}

impl Call<'_> {
    /// [`Script::run`] of this call.
    pub(crate) async fn run(
        self,
        conn: &mut (impl ConnectionLike + Send),
        invoke: Invoke,
        channels: Channels,
    ) -> RedisResult<Value> {
        self.script
            .run(conn, invoke, channels, self.keys, self.args)
            .await
    }
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

    fn sharded(&self) -> &(String, String) {
        self.sharded.get_or_init(|| {
            let code = format!("{}{}", sharded_common(), self.body);
            let sha = sha1_smol::Sha1::from(&code).digest().to_string();
            (code, sha)
        })
    }

    fn code_for(&self, channels: Channels) -> &str {
        match channels {
            Channels::Classic => self.code,
            Channels::Sharded => &self.sharded().0,
        }
    }

    fn sha_for(&self, channels: Channels) -> &str {
        match channels {
            Channels::Classic => self.sha(),
            Channels::Sharded => &self.sharded().1,
        }
    }

    fn function_name_for(&self, channels: Channels) -> String {
        format!("{}_{}", channels.library_name(), self.name)
    }

    /// This script on `keys` with `args`.
    pub(crate) fn call<'a>(&'a self, keys: &'a [String], args: &'a [String]) -> Call<'a> {
        Call {
            script: self,
            keys,
            args,
        }
    }

    /// Runs the operation, loading the code and retrying once if the server lacks it.
    /// Every call carries the conversation's keys, so a Redis Cluster client
    /// routes it to the shard that owns them; `SCRIPT LOAD` and `FUNCTION
    /// LOAD` go to every node (redis-rs routes them so), the failed one included.
    pub(crate) async fn run(
        &self,
        conn: &mut (impl ConnectionLike + Send),
        invoke: Invoke,
        channels: Channels,
        keys: &[String],
        args: &[String],
    ) -> RedisResult<Value> {
        let mut call = match invoke {
            Invoke::Eval => {
                let mut call = redis::cmd("EVALSHA");
                call.arg(self.sha_for(channels));
                call
            }
            Invoke::Functions => {
                let mut call = redis::cmd(if self.read_only { "FCALL_RO" } else { "FCALL" });
                call.arg(self.function_name_for(channels));
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
                    .arg(self.code_for(channels))
                    .query_async(conn)
                    .await?;
                call.query_async(conn).await
            }
            Err(e) if invoke == Invoke::Functions && is_function_missing(&e) => {
                load_library(conn, channels).await?;
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
pub(crate) async fn load_library(
    conn: &mut (impl ConnectionLike + Send),
    channels: Channels,
) -> RedisResult<String> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library_for(channels))
        .query_async(conn)
        .await
}

/// Calls the read-only script's function with `FCALL_RO` (`read_only`) or
/// `FCALL`, as a store in Functions mode would: whether the server runs
/// what Functions mode sends (see `Conn::functions_usable`).
pub(crate) async fn probe(
    conn: &mut (impl ConnectionLike + Send),
    channels: Channels,
    read_only: bool,
    keys: &[String],
) -> RedisResult<Value> {
    redis::cmd(if read_only { "FCALL_RO" } else { "FCALL" })
        .arg(READ.function_name_for(channels))
        .arg(keys.len())
        .arg(keys)
        .arg(0)
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
pub(crate) static CANCEL: Script = lua!("cancel", false);
pub(crate) static INSPECT: Script = lua!("inspect", true);

static ALL: [&Script; 10] = [
    &ISSUE, &POLL, &RELEASE, &READ, &SAVE, &DELETE, &UPDATE, &EXTEND, &CANCEL, &INSPECT,
];

/// The line of `lua/common.lua` that reads the clock.
const TIME_LINE: &str = "  local t = redis.call('TIME')";

impl Script {
    /// This operation with its clock read from the hash `clock_key` (fields
    /// `s`, `us`) instead of `TIME`, and keys dropped once their expiry has
    /// passed on that clock (Redis's own expiry follows the real one). Only
    /// the differential tests build this (`__testing::manual_clock_stores`);
    /// it is run with plain EVAL on one server, never loaded or registered.
    pub(crate) fn with_manual_clock(&self, clock_key: &str) -> String {
        let manual = format!(
            "  local t = redis.call('HMGET', '{clock_key}', 's', 'us')\n  \
             local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n  \
             for _, k in ipairs(KEYS) do\n    \
               local at = redis.call('PEXPIRETIME', k)\n    \
               if at > 0 and at < now_ms then redis.call('DEL', k) end\n  \
             end"
        );
        assert!(
            COMMON.contains(TIME_LINE),
            "lua/common.lua no longer reads TIME in one line"
        );
        format!("{}{}", COMMON.replacen(TIME_LINE, &manual, 1), self.body)
    }
}

/// Every operation's script, in the order the README lists them.
pub fn scripts() -> &'static [&'static Script] {
    &ALL
}

/// The Functions library [`LIBRARY_NAME`]: the shared helpers once, then each
/// operation's file as the body of function `ticketlock_v2_<name>` (`KEYS`
/// and `ARGV` become its parameters). Load it with `FUNCTION LOAD REPLACE`.
pub fn library() -> &'static str {
    library_for(Channels::Classic)
}

/// The library of either variant: [`library`], or for [`Channels::Sharded`]
/// the same with `SPUBLISH`, named [`SHARDED_LIBRARY_NAME`].
pub(crate) fn library_for(channels: Channels) -> &'static str {
    static CLASSIC: OnceLock<String> = OnceLock::new();
    static SHARDED: OnceLock<String> = OnceLock::new();
    let (cell, common) = match channels {
        Channels::Classic => (&CLASSIC, COMMON),
        Channels::Sharded => (&SHARDED, sharded_common()),
    };
    cell.get_or_init(|| {
        let name = channels.library_name();
        let mut code = format!("#!lua name={name}\n{common}\n");
        for script in ALL {
            let flags = if script.read_only { "{ 'no-writes' }" } else { "{}" };
            code.push_str(&format!(
                "redis.register_function{{ function_name = '{}', flags = {flags}, callback = function(KEYS, ARGV)\n{}\nend }}\n",
                script.function_name_for(channels),
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
        assert!(lib.starts_with("#!lua name=ticketlock_v2\n"));
        assert_eq!(lib.matches("local function clock()").count(), 1);
        for s in ALL {
            assert_eq!(lib.matches(&format!("'{}'", s.function_name())).count(), 1);
            assert_eq!(lib.matches(s.body).count(), 1, "{}", s.name);
        }
        assert!(lib.contains("function_name = 'ticketlock_v2_read', flags = { 'no-writes' }"));
        assert!(lib.contains("function_name = 'ticketlock_v2_inspect', flags = { 'no-writes' }"));
    }

    #[test]
    fn the_sharded_variant_differs_in_the_publish_line_only() {
        // One switch, and no other way to publish.
        assert_eq!(COMMON.matches(PUBLISH_LINE).count(), 1);
        for s in ALL {
            for code in [s.code, s.code_for(Channels::Sharded)] {
                assert!(!code.contains("redis.call('PUBLISH'"), "{}", s.name);
                assert!(!code.contains("redis.call(\"PUBLISH\""), "{}", s.name);
            }
            let sharded = s.code_for(Channels::Sharded);
            assert_eq!(sharded.matches(SHARDED_PUBLISH_LINE).count(), 1);
            assert!(!sharded.contains(PUBLISH_LINE));
            assert_eq!(
                sharded.replacen(SHARDED_PUBLISH_LINE, PUBLISH_LINE, 1),
                s.code,
                "{}",
                s.name
            );
            assert_ne!(s.sha_for(Channels::Sharded), s.sha());
            assert_eq!(s.sha_for(Channels::Sharded).len(), 40);
        }
        let lib = library_for(Channels::Sharded);
        assert!(lib.starts_with("#!lua name=ticketlock_v2s\n"));
        assert!(lib.contains(SHARDED_PUBLISH_LINE));
        for s in ALL {
            let name = format!("'{SHARDED_LIBRARY_NAME}_{}'", s.name);
            assert_eq!(lib.matches(&name).count(), 1);
            // No function name of the classic library, which would collide.
            assert!(!lib.contains(&format!("'{}'", s.function_name())));
        }
    }
}
