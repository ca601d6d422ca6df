//! The Lua scripts in `lua/`, embedded at compile time, and how to run them.
//!
//! Each operation is sent as `lua/common.lua` followed by the operation's
//! file, so the shared helpers exist once. Scripts run by SHA (EVALSHA); a
//! server that does not know the SHA (restart, `SCRIPT FLUSH`) gets the code
//! with `SCRIPT LOAD` and the call is retried exactly once. Every other error
//! passes through.

use std::sync::OnceLock;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisResult, ServerErrorKind, Value};

macro_rules! lua {
    ($name:literal) => {
        Script::new(
            $name,
            concat!(
                include_str!("../lua/common.lua"),
                include_str!(concat!("../lua/", $name, ".lua"))
            ),
        )
    };
}

/// One operation's complete code and its SHA1, computed locally once.
#[derive(Debug)]
pub(crate) struct Script {
    pub(crate) name: &'static str,
    pub(crate) code: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    const fn new(name: &'static str, code: &'static str) -> Self {
        Script {
            name,
            code,
            sha: OnceLock::new(),
        }
    }

    pub(crate) fn sha(&self) -> &str {
        self.sha
            .get_or_init(|| sha1_smol::Sha1::from(self.code).digest().to_string())
    }

    /// EVALSHA, loading the script and retrying once on NOSCRIPT.
    pub(crate) async fn run(
        &self,
        conn: &mut (impl ConnectionLike + Send),
        keys: &[String],
        args: &[String],
    ) -> RedisResult<Value> {
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.sha()).arg(keys.len()).arg(keys).arg(args);
        match call.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let loaded: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(self.code)
                    .query_async(conn)
                    .await?;
                debug_assert_eq!(loaded, self.sha());
                call.query_async(conn).await
            }
            other => other,
        }
    }
}

pub(crate) static ISSUE: Script = lua!("issue");
pub(crate) static POLL: Script = lua!("poll");
pub(crate) static RELEASE: Script = lua!("release");
pub(crate) static READ: Script = lua!("read");
pub(crate) static SAVE: Script = lua!("save");
pub(crate) static DELETE: Script = lua!("delete");
pub(crate) static UPDATE: Script = lua!("update");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_starts_with_the_shared_helpers_and_has_its_own_sha() {
        let all = [&ISSUE, &POLL, &RELEASE, &READ, &SAVE, &DELETE, &UPDATE];
        let mut shas: Vec<&str> = all.iter().map(|s| s.sha()).collect();
        shas.sort();
        shas.dedup();
        assert_eq!(shas.len(), all.len());
        for s in all {
            assert!(
                s.code.starts_with(include_str!("../lua/common.lua")),
                "{}",
                s.name
            );
            assert_eq!(s.sha().len(), 40);
        }
    }
}
