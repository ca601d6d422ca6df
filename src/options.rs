//! Per-call options of [`LockStore::lock_with`](crate::LockStore::lock_with).

use std::time::Duration;

use crate::error::LockError;
use crate::validate;

/// A ticket's lifetime when nothing else is configured (Rasa's default).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// How often a waiter asks the store when no wake-up arrived. Wake-ups hand
/// the lock over; this poll is only the safety net for a lost message.
pub const DEFAULT_WAIT_TIME: Duration = Duration::from_secs(1);
/// How long a waiting ticket survives without its waiter checking in; a
/// waiter that died stops blocking the queue this long after its last check.
pub const DEFAULT_DEAD_WAITER_TIMEOUT: Duration = Duration::from_secs(5);
/// Environment variable overriding [`DEFAULT_LIFETIME`], in seconds (fractions allowed).
pub const LIFETIME_ENV: &str = "TICKET_LOCK_LIFETIME";

/// How to take a lock. Unset values fall back to the store's defaults.
///
/// ```
/// use std::time::Duration;
/// use ticketlock::LockOptions;
///
/// let options = LockOptions::default()
///     .with_lifetime(Duration::from_secs(30))
///     .with_wait_time(Duration::from_millis(250))
///     .with_timeout(Duration::from_secs(5));
/// assert_eq!(options.timeout(), Some(Duration::from_secs(5)));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockOptions {
    lifetime: Option<Duration>,
    wait_time: Option<Duration>,
    timeout: Option<Duration>,
    dead_waiter_timeout: Option<Duration>,
    auto_renew: bool,
}

impl LockOptions {
    /// The lease: how long the lock stays held from the moment it is granted,
    /// unless renewed ([`with_auto_renew`](Self::with_auto_renew),
    /// [`LockGuard::extend`](crate::LockGuard::extend)). Waiting does not use it
    /// up. Default: the store's ([`DEFAULT_LIFETIME`] or `TICKET_LOCK_LIFETIME`).
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// Longest pause between two checks of the queue when no wake-up arrives
    /// (default [`DEFAULT_WAIT_TIME`]). Hand-over does not wait for it.
    pub fn with_wait_time(mut self, wait_time: Duration) -> Self {
        self.wait_time = Some(wait_time);
        self
    }

    /// Give up after this long, give the ticket back and return
    /// [`LockError::Timeout`], also while the store does not answer.
    /// `Duration::ZERO` tries once: the lock is taken only if it is free
    /// (the store's answer is awaited, for at most the socket timeout).
    /// Default: wait as long as the queue moves; a live waiter's ticket does
    /// not expire.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long the waiting ticket survives without this waiter checking in
    /// (it checks in three times per period): if the process dies, the queue
    /// moves on this long after its last check. Default
    /// [`DEFAULT_DEAD_WAITER_TIMEOUT`].
    pub fn with_dead_waiter_timeout(mut self, timeout: Duration) -> Self {
        self.dead_waiter_timeout = Some(timeout);
        self
    }

    /// Keep the lease alive while the guard lives: renew it every third of
    /// the lifetime. Default: off (the lease ends after the lifetime).
    pub fn with_auto_renew(mut self, auto_renew: bool) -> Self {
        self.auto_renew = auto_renew;
        self
    }

    /// The lifetime set, if any.
    pub fn lifetime(&self) -> Option<Duration> {
        self.lifetime
    }

    /// The wait time set, if any.
    pub fn wait_time(&self) -> Option<Duration> {
        self.wait_time
    }

    /// The timeout set, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The dead-waiter timeout set, if any.
    pub fn dead_waiter_timeout(&self) -> Option<Duration> {
        self.dead_waiter_timeout
    }

    /// Whether the lease is renewed while the guard lives.
    pub fn auto_renew(&self) -> bool {
        self.auto_renew
    }

    /// Checks the options the way [`lock_with`](crate::LockStore::lock_with)
    /// will (an unset lifetime counts as [`DEFAULT_LIFETIME`]): every
    /// duration greater than zero and at most [`MAX_LIFETIME`](crate::MAX_LIFETIME).
    ///
    /// ```
    /// use std::time::Duration;
    /// use ticketlock::LockOptions;
    /// assert!(LockOptions::default().with_lifetime(Duration::from_secs(30)).check().is_ok());
    /// assert!(LockOptions::default().with_lifetime(Duration::ZERO).check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), LockError> {
        self.resolve(DEFAULT_LIFETIME).map(drop)
    }

    pub(crate) fn resolve(&self, default_lifetime: Duration) -> Result<Resolved, LockError> {
        let lifetime = self.lifetime.unwrap_or(default_lifetime);
        let wait_time = self.wait_time.unwrap_or(DEFAULT_WAIT_TIME);
        if wait_time.is_zero() {
            return Err(LockError::invalid(
                "wait time",
                "it must be greater than zero",
            ));
        }
        let dead_waiter = self
            .dead_waiter_timeout
            .unwrap_or(DEFAULT_DEAD_WAITER_TIMEOUT);
        Ok(Resolved {
            lifetime_ms: validate::lifetime_ms(lifetime, "lifetime")?,
            liveness_ms: validate::lifetime_ms(dead_waiter, "dead-waiter timeout")?,
            wait_time,
            timeout: self.timeout,
            auto_renew: self.auto_renew,
        })
    }
}

/// Options checked and filled in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved {
    pub(crate) lifetime_ms: u64,
    pub(crate) liveness_ms: u64,
    pub(crate) wait_time: Duration,
    pub(crate) timeout: Option<Duration>,
    pub(crate) auto_renew: bool,
}

impl Resolved {
    pub(crate) fn lifetime(&self) -> Duration {
        Duration::from_millis(self.lifetime_ms)
    }

    /// How often a waiter checks in at the latest: three times per
    /// dead-waiter period, so one lost check does not cost its place.
    pub(crate) fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.liveness_ms / 3).max(Duration::from_millis(1))
    }
}

/// The default lifetime: `TICKET_LOCK_LIFETIME` when set, else [`DEFAULT_LIFETIME`].
/// An unparsable value is an error, never a silent fallback.
pub(crate) fn lifetime_from_env() -> Result<Duration, LockError> {
    match std::env::var(LIFETIME_ENV) {
        Ok(text) => validate::seconds_text(&text, "TICKET_LOCK_LIFETIME"),
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_LIFETIME),
        Err(std::env::VarError::NotUnicode(_)) => Err(LockError::invalid(
            "TICKET_LOCK_LIFETIME",
            "it is not valid unicode",
        )),
    }
}
