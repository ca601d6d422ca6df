//! Bounded fuzzing (proptest) of what parses outside input: URLs, Rasa-style
//! configurations, script replies and TicketLock JSON. None of it may panic,
//! and nothing here connects anywhere: the checks stop before a connection.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use ticketlock::__testing::{check_config, check_url};
use ticketlock::{LockError, StoreConfig, TicketLock};

const SCRIPTS: [&str; 6] = ["issue", "poll", "release", "read", "update", "extend"];

/// A URL-ish string with `secret` planted where a password or token goes,
/// mangled the ways people mangle URLs: scheme typos, a missing or doubled
/// `@`, stray separators, bad hosts, ports, paths and fragments.
pub fn planted_url(secret: &'static str) -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec![
        "redis://",
        "rediss://",
        "redis+cluster://",
        "rediss+sentinel://",
        "redis//",
        "redis:/",
        "redis:",
        "http://",
        "",
        "://",
        "REDIS://",
        "redis+sentinel//",
        "memory://",
    ]);
    let userinfo = prop::sample::select(vec![
        "user:{s}@",
        ":{s}@",
        "{s}@",
        "user:{s}@@",
        "us@er:{s}@",
        "user:{s}",
        "user:{s}/",
        "user:{s}#",
        "user:{s},",
        "{s}:",
        ":{s}",
        "user%3A{s}@",
        "u:{s}@h:1,",
        "{s}",
    ]);
    let host = prop::sample::select(vec![
        "127.0.0.1:1",
        "h",
        "h:notaport",
        "[::1",
        "a:1,b:2",
        "",
        "h h",
        "h:0",
        "[::1]:2",
        "::1",
    ]);
    let tail = prop::sample::select(vec![
        "",
        "/0",
        "/x",
        "/svc",
        "/svc/2",
        "#insecure",
        "#x",
        "?a=b",
        "/0?x",
        "/-1",
    ]);
    let junk = prop::sample::select(vec![
        "", ":", "/", "@", "#", "?", ",", "[", "]", "%", " ", "://", "\n",
    ]);
    (
        scheme,
        userinfo,
        host,
        tail,
        junk,
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(scheme, userinfo, host, tail, junk, at)| {
            let mut url = format!("{scheme}{}{host}{tail}", userinfo.replace("{s}", secret));
            // Junk anywhere but inside the secret (which it would only break up).
            let secret_at = url.find(secret).unwrap_or(url.len());
            let mut i = at.index(url.len() + 1);
            if (secret_at..secret_at + secret.len()).contains(&i) {
                i = secret_at;
            }
            while !url.is_char_boundary(i) {
                i -= 1;
            }
            url.insert_str(i, junk);
            url
        })
}

/// Nothing of checking `config` shows `secret`; nor does the config itself
/// where the secret is user-info (before the last `@`: a secret typed where
/// the host goes is, as far as anyone can tell, a host).
fn assert_hidden(secret: &str, url: &str, config: &StoreConfig) -> Result<(), TestCaseError> {
    let user_info = url.rfind('@') > url.find(secret);
    if user_info {
        for text in [format!("{config:?}"), config.to_string()] {
            prop_assert!(!text.contains(secret), "{url:?} shown as {text}");
        }
    }
    if let Err(e) = check_config(config) {
        prop_assert!(!e.to_string().contains(secret), "{url:?}: {e}");
        prop_assert!(!format!("{e:?}").contains(secret), "{url:?}: {e:?}");
    }
    Ok(())
}

fn config_strategy() -> impl Strategy<Value = serde_json::Value> {
    let text = prop_oneof![
        Just(String::new()),
        "[a-z0-9.:/@?#%{}\\[\\] -]{0,40}",
        any::<String>(),
        Just("redis://".to_owned()),
        Just("rediss://u:p@h:1/2".to_owned()),
    ];
    let number = prop_oneof![
        any::<f64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::json!("12")),
    ];
    (
        prop_oneof![
            Just("redis"),
            Just("in_memory"),
            Just("memory"),
            Just("bogus")
        ],
        text.clone(),
        number.clone(),
        number.clone(),
        "pw-[a-z]{10}",
        text,
        number,
    )
        .prop_map(|(kind, host, port, db, password, prefix, timeout)| {
            serde_json::json!({
                "type": kind, "host": host, "port": port, "db": db,
                "password": password, "key_prefix": prefix, "socket_timeout": timeout,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn urls_never_panic_and_errors_never_show_the_password(url in any::<String>(), password in "[a-z]{6,12}") {
        let _ = check_url(&url);
        let with_secret = format!("redis://user:{password}@{url}");
        if let Err(e) = check_url(&with_secret) {
            prop_assert!(!e.to_string().contains(&password), "{e}");
            prop_assert!(!format!("{e:?}").contains(&password), "{e:?}");
        }
    }

    #[test]
    fn malformed_urls_never_show_a_planted_secret(url in planted_url("S3CRETxyzzy")) {
        let secret = "S3CRETxyzzy";
        match StoreConfig::from_url(&url) {
            Err(e) => {
                prop_assert!(!e.to_string().contains(secret), "{url:?}: {e}");
                prop_assert!(!format!("{e:?}").contains(secret), "{url:?}: {e:?}");
            }
            Ok(config) => assert_hidden(secret, &url, &config)?,
        }
        if let Err(e) = check_url(&url) {
            prop_assert!(!format!("{e} {e:?}").contains(secret), "{url:?}: {e}");
        }
        // The same text as a config's host (Rasa's `url:` key).
        assert_hidden(secret, &url, &StoreConfig::redis(url.clone()))?;
        // Sentinel credentials are never shown, whatever the URL holds.
        let mut sentinel = StoreConfig::redis(url.clone());
        sentinel.deployment_mode = ticketlock::DeploymentMode::Sentinel;
        sentinel.sentinel_password = Some("S3NTINELpw".to_owned());
        sentinel.sentinel_username = Some("S3NTINELuser".to_owned());
        assert_hidden(secret, &url, &sentinel)?;
        for text in [format!("{sentinel:?}"), sentinel.to_string()] {
            prop_assert!(!text.contains("S3NTINEL"), "{url:?}: {text}");
        }
    }

    #[test]
    fn configs_never_panic(value in config_strategy()) {
        // Either serde refuses it, or the store's own checks answer.
        if let Ok(config) = serde_json::from_value::<StoreConfig>(value) {
            if config.store_type == ticketlock::StoreType::Redis {
                match check_config(&config) {
                    Ok(()) | Err(LockError::InvalidInput { .. }) => {}
                    Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
                }
            }
            if let Some(password) = config.password.as_deref() {
                let shown = format!("{config:?}");
                prop_assert!(!shown.contains(password), "{}", shown);
            }
        }
    }

    #[test]
    fn script_replies_never_panic(script in prop::sample::select(&SCRIPTS[..]), reply in prop::collection::vec(any::<i64>(), 0..12)) {
        let _ = ticketlock::__bench::decode(script, &reply);
    }

    #[test]
    fn plausible_replies_never_panic(script in prop::sample::select(&SCRIPTS[..]), reply in prop::collection::vec(-2i64..5, 0..10)) {
        let _ = ticketlock::__bench::decode(script, &reply);
    }

    #[test]
    fn ticket_lock_json_never_panics(json in any::<String>(), numbers in prop::collection::vec(any::<u64>(), 0..5)) {
        let _ = serde_json::from_str::<TicketLock>(&json);
        let tickets: Vec<_> = numbers.iter().map(|n| serde_json::json!({"number": n, "expires_in_ms": n})).collect();
        let value = serde_json::json!({"conversation_id": "c", "tickets": tickets, "next_number": numbers.first().copied().unwrap_or(0)});
        if let Ok(lock) = serde_json::from_value::<TicketLock>(value) {
            let _ = (lock.now_serving(), lock.last_issued(), lock.is_someone_waiting());
        }
    }
}
