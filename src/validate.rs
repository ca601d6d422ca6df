//! Input rules shared by both backends, the configuration and the CLI.

use std::time::Duration;

use crate::error::{shown, LockError};

/// Longest conversation id accepted, in bytes. Rasa's sender ids are short;
/// a bound keeps keys, channel names and messages small.
pub const MAX_CONVERSATION_ID_LEN: usize = 1024;
/// Longest ticket lifetime accepted (365 days); the Lua scripts hold the same bound.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) fn conversation_id(id: &str) -> Result<(), LockError> {
    if id.is_empty() {
        return Err(LockError::invalid("conversation id", "it is empty"));
    }
    if id.len() > MAX_CONVERSATION_ID_LEN {
        return Err(LockError::invalid(
            "conversation id",
            format!(
                "{} is {} bytes, more than the {MAX_CONVERSATION_ID_LEN} allowed",
                shown(id),
                id.len()
            ),
        ));
    }
    Ok(())
}

/// A lifetime in whole milliseconds (sub-millisecond rests round up, so a
/// tiny positive lifetime is never turned into zero).
pub(crate) fn lifetime_ms(lifetime: Duration, what: &'static str) -> Result<u64, LockError> {
    if lifetime.is_zero() {
        return Err(LockError::invalid(what, "it must be greater than zero"));
    }
    if lifetime > MAX_LIFETIME {
        return Err(LockError::invalid(
            what,
            format!("{lifetime:?} is longer than the maximum of {MAX_LIFETIME:?}"),
        ));
    }
    Ok(lifetime.as_nanos().div_ceil(1_000_000) as u64)
}

/// Seconds as written in environment variables, YAML and the CLI: fractional,
/// finite, greater than zero.
pub(crate) fn seconds(value: f64, what: &'static str) -> Result<Duration, LockError> {
    if !value.is_finite() {
        return Err(LockError::invalid(
            what,
            format!("{value} seconds is not a finite number"),
        ));
    }
    if value <= 0.0 {
        return Err(LockError::invalid(
            what,
            format!("{value} seconds is not greater than zero"),
        ));
    }
    if value > MAX_LIFETIME.as_secs_f64() {
        return Err(LockError::invalid(
            what,
            format!(
                "{value} seconds is longer than the maximum of {} seconds",
                MAX_LIFETIME.as_secs()
            ),
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

/// Parses a seconds value written as text (environment variables, CLI flags).
pub(crate) fn seconds_text(text: &str, what: &'static str) -> Result<Duration, LockError> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| LockError::invalid(what, format!("{text:?} is not a number of seconds")))?;
    seconds(value, what)
}

/// A key prefix must be ASCII alphanumeric; it becomes `<prefix>:lock:`.
pub(crate) fn key_prefix(prefix: &str) -> Result<String, LockError> {
    if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(LockError::invalid(
            "key prefix",
            format!(
                "{:?} must be non-empty and ASCII alphanumeric",
                shown(prefix)
            ),
        ));
    }
    Ok(format!("{prefix}:{DEFAULT_KEY_PREFIX}"))
}

/// Prefix of every key when none is configured (Rasa's `lock:`).
pub const DEFAULT_KEY_PREFIX: &str = "lock:";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_round_up_to_whole_milliseconds() {
        assert_eq!(
            lifetime_ms(Duration::from_micros(1), "lifetime").unwrap(),
            1
        );
        assert_eq!(
            lifetime_ms(Duration::from_millis(1500), "lifetime").unwrap(),
            1500
        );
        assert!(lifetime_ms(Duration::ZERO, "lifetime").is_err());
        assert!(lifetime_ms(Duration::MAX, "lifetime").is_err());
    }

    #[test]
    fn seconds_reject_what_is_not_a_positive_finite_number() {
        for bad in ["0", "-1", "NaN", "inf", "", "abc", "1e30"] {
            assert!(seconds_text(bad, "lifetime").is_err(), "{bad} accepted");
        }
        assert_eq!(
            seconds_text(" 0.25 ", "lifetime").unwrap(),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn prefixes_must_be_alphanumeric() {
        assert_eq!(key_prefix("bot1").unwrap(), "bot1:lock:");
        for bad in ["", "a:b", "a{b}", "é", "a b", "a*"] {
            assert!(key_prefix(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ids_are_bounded_and_shown_escaped() {
        assert!(conversation_id("").is_err());
        assert!(conversation_id(&"x".repeat(MAX_CONVERSATION_ID_LEN + 1)).is_err());
        assert!(conversation_id("a{b}*:? é\n\0").is_ok());
        assert_eq!(shown("a\nb"), "a\\nb");
    }
}
