//! Bounded fuzzing (proptest) of what parses outside input: URLs, Rasa-style
//! configurations, script replies and TicketLock JSON. None of it may panic,
//! and nothing here connects anywhere: the checks stop before a connection.

use proptest::prelude::*;
use ticketlock::__testing::{check_config, check_url};
use ticketlock::{LockError, StoreConfig, TicketLock};

const SCRIPTS: [&str; 6] = ["issue", "poll", "release", "read", "update", "extend"];

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
