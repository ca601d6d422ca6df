//! `ticketlock scripts`: the Lua scripts for clients in other languages.
//!
//! `show` prints them (each operation's code is `lua/common.lua` followed by
//! its file, exactly what the crate sends); `load` puts them into a Redis with
//! SCRIPT LOAD (checking each SHA1) and loads the Functions library, so any
//! client can call them by SHA (EVALSHA) or name (FCALL).

use std::process::ExitCode;

use redis::aio::MultiplexedConnection;
use redis::Value;
use serde::Serialize;
use ticketlock::{functions_library, lua_scripts, LuaScript, LIBRARY_NAME};

use super::connect::{connect, required_config};
use super::{print_error, print_out, CliError, EXIT_CODES};

/// Arguments of `ticketlock scripts`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES)]
pub(crate) struct ScriptsArgs {
    #[command(subcommand)]
    command: ScriptsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ScriptsCommand {
    /// Print every operation's complete script, each after a header line
    /// `-- ticketlock_v2: <name> sha1 <sha>`; the SHA1 is that of the code
    /// after the header line (what EVALSHA wants).
    #[command(after_help = EXIT_CODES)]
    Show(ShowArgs),
    /// Load every script (SCRIPT LOAD, checking its SHA1) and the Functions
    /// library (FUNCTION LOAD REPLACE) into a Redis; prints `<name> <sha>` per script.
    #[command(after_help = EXIT_CODES)]
    Load(LoadArgs),
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    /// Only this operation (issue, poll, release, read, save, delete, update, extend).
    #[arg(value_name = "NAME")]
    name: Option<String>,

    /// Print the Functions library (for FUNCTION LOAD) instead.
    #[arg(long, conflicts_with = "name")]
    library: bool,

    /// Print JSON instead: the scripts' names, function names, SHA1s and code.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Redis to load into (redis://[user:password@]host[:port][/db] or rediss://...).
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,

    /// Print one JSON object on stdout instead of lines.
    #[arg(long)]
    json: bool,
}

/// Runs `ticketlock scripts ...`.
pub(crate) async fn run(args: ScriptsArgs) -> Result<ExitCode, CliError> {
    match args.command {
        ScriptsCommand::Show(args) => show(&args),
        ScriptsCommand::Load(args) => load(&args).await,
    }
}

/// The header line before each script.
fn header(script: &LuaScript) -> String {
    format!("-- {LIBRARY_NAME}: {} sha1 {}", script.name(), script.sha())
}

#[derive(Debug, Serialize)]
struct ScriptJson<'a> {
    name: &'a str,
    function: String,
    read_only: bool,
    sha1: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
}

impl<'a> ScriptJson<'a> {
    fn new(script: &'a LuaScript, with_code: bool) -> Self {
        ScriptJson {
            name: script.name(),
            function: script.function_name(),
            read_only: script.is_read_only(),
            sha1: script.sha(),
            code: with_code.then_some(script.code()),
        }
    }
}

fn show(args: &ShowArgs) -> Result<ExitCode, CliError> {
    let all = lua_scripts();
    if args.library {
        let text = if args.json {
            let value = serde_json::json!({
                "library": LIBRARY_NAME,
                "functions": all.iter().map(|s| ScriptJson::new(s, false)).collect::<Vec<_>>(),
                "code": functions_library(),
            });
            format!("{value}\n")
        } else {
            with_newline(functions_library())
        };
        print_out(&text);
        return Ok(ExitCode::SUCCESS);
    }
    let chosen: Vec<&LuaScript> = match &args.name {
        None => all.to_vec(),
        Some(name) => match all.iter().find(|s| s.name() == name.trim()) {
            Some(script) => vec![*script],
            None => {
                let names: Vec<&str> = all.iter().map(|s| s.name()).collect();
                return Err(CliError::usage(format!(
                    "no script named {name:?} (there are: {})",
                    names.join(", ")
                )));
            }
        },
    };
    let mut out = String::new();
    if args.json {
        let value: Vec<ScriptJson> = chosen.iter().map(|s| ScriptJson::new(s, true)).collect();
        out = serde_json::to_string(&value)
            .map_err(|e| CliError::store(format!("cannot encode the scripts: {e}")))?;
        out.push('\n');
    } else {
        // Header, then the code byte for byte: everything between two header
        // lines is exactly what the SHA1 is computed over.
        for script in chosen {
            out.push_str(&header(script));
            out.push('\n');
            out.push_str(&with_newline(script.code()));
        }
    }
    print_out(&out);
    Ok(ExitCode::SUCCESS)
}

fn with_newline(code: &str) -> String {
    if code.ends_with('\n') {
        code.to_owned()
    } else {
        format!("{code}\n")
    }
}

/// How loading the library went.
#[derive(Debug, Serialize)]
struct LibraryJson {
    name: &'static str,
    loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    functions: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn load(args: &LoadArgs) -> Result<ExitCode, CliError> {
    let config = required_config(args.redis.as_deref(), "scripts load")?;
    let shown = config.to_string();
    let mut conn = connect(&config).await?;

    let mut lines = String::new();
    let mut mismatches = Vec::new();
    let mut loaded = Vec::new();
    for script in lua_scripts() {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script.code())
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                CliError::store(format!(
                    "cannot load script {} into {shown}: {e}",
                    script.name()
                ))
            })?;
        tracing::debug!(script = script.name(), sha = %sha, "script loaded");
        if !sha.eq_ignore_ascii_case(script.sha()) {
            mismatches.push(format!(
                "{}: Redis says sha1 {sha}, ticketlock computed {}",
                script.name(),
                script.sha()
            ));
        }
        lines.push_str(&format!("{} {sha}\n", script.name()));
        loaded.push(ScriptJson::new(script, false));
    }
    if !mismatches.is_empty() {
        // EVALSHA with the documented SHAs would not find these scripts.
        if !args.json {
            print_out(&lines);
        } else {
            print_json(&loaded, None)?;
        }
        print_error(&format!(
            "SHA1 mismatch, the library was not loaded: {}",
            mismatches.join("; ")
        ));
        return Ok(ExitCode::FAILURE);
    }

    let library = match load_library(&mut conn).await {
        Ok(functions) => {
            if functions != lua_scripts().len() {
                if !args.json {
                    print_out(&lines);
                }
                print_error(&format!(
                    "library {LIBRARY_NAME} was loaded into {shown} but lists {functions} \
                     functions, expected {}",
                    lua_scripts().len()
                ));
                return Ok(ExitCode::FAILURE);
            }
            lines.push_str(&format!(
                "library {LIBRARY_NAME} loaded ({functions} functions)\n"
            ));
            LibraryJson {
                name: LIBRARY_NAME,
                loaded: true,
                functions: Some(functions),
                error: None,
            }
        }
        Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => {
            // Redis < 7 (no FUNCTION) or an ACL without it: the scripts
            // still run by EVALSHA, which is what they were loaded for.
            print_error(&format!(
                "warning: {shown} refused the Functions library ({e}); \
                 the scripts above are loaded and run by EVALSHA"
            ));
            LibraryJson {
                name: LIBRARY_NAME,
                loaded: false,
                functions: None,
                error: Some(e.to_string()),
            }
        }
        Err(e) => {
            print_out(&lines);
            return Err(CliError::store(format!(
                "cannot load the Functions library into {shown}: {e}"
            )));
        }
    };
    if args.json {
        print_json(&loaded, Some(library))?;
    } else {
        print_out(&lines);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json(scripts: &[ScriptJson], library: Option<LibraryJson>) -> Result<(), CliError> {
    let value = serde_json::json!({ "scripts": scripts, "library": library });
    print_out(&format!("{value}\n"));
    Ok(())
}

/// FUNCTION LOAD REPLACE, then counts the library's functions in FUNCTION LIST.
async fn load_library(conn: &mut MultiplexedConnection) -> redis::RedisResult<usize> {
    let name: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(functions_library())
        .query_async(conn)
        .await?;
    tracing::debug!(library = %name, "function library loaded");
    let list: Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(LIBRARY_NAME)
        .query_async(conn)
        .await?;
    Ok(count_functions(&list))
}

/// Functions of [`LIBRARY_NAME`] in a FUNCTION LIST reply (RESP2 or RESP3).
fn count_functions(list: &Value) -> usize {
    let Value::Array(libraries) = list else {
        return 0;
    };
    libraries
        .iter()
        .filter_map(|library| {
            let entries = fields(library);
            let name = entries.iter().find(|(k, _)| k == "library_name")?.1;
            if !matches!(name, Value::BulkString(b) if b == LIBRARY_NAME.as_bytes())
                && !matches!(name, Value::SimpleString(s) if s == LIBRARY_NAME)
            {
                return None;
            }
            match entries.iter().find(|(k, _)| k == "functions")?.1 {
                Value::Array(functions) => Some(functions.len()),
                _ => None,
            }
        })
        .sum()
}

/// A RESP2 flat key/value array or a RESP3 map as (key, value) pairs.
fn fields(value: &Value) -> Vec<(String, &Value)> {
    let key = |k: &Value| match k {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    match value {
        Value::Map(entries) => entries.iter().map(|(k, v)| (key(k), v)).collect(),
        Value::Array(items) => items
            .chunks_exact(2)
            .map(|pair| (key(&pair[0]), &pair[1]))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_lists_are_counted_in_both_protocols() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let functions = Value::Array(vec![Value::Array(vec![]), Value::Array(vec![])]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("library_name"),
            bulk(LIBRARY_NAME),
            bulk("functions"),
            functions.clone(),
        ])]);
        let resp3 = Value::Array(vec![Value::Map(vec![
            (bulk("library_name"), bulk(LIBRARY_NAME)),
            (bulk("functions"), functions),
        ])]);
        assert_eq!(count_functions(&resp2), 2);
        assert_eq!(count_functions(&resp3), 2);
        assert_eq!(count_functions(&Value::Array(vec![])), 0);
    }
}
