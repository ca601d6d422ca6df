//! `TICKET_LOCK_LIFETIME`, read when a store is created. One test in its own
//! binary, because the environment is shared by the whole process.

use std::time::Duration;

use ticketlock::{LockError, LockStore, DEFAULT_LIFETIME, LIFETIME_ENV};

#[tokio::test]
async fn the_lifetime_variable_sets_the_default_and_bad_values_are_refused() {
    std::env::remove_var(LIFETIME_ENV);
    let store = LockStore::create(None).await.unwrap();
    assert_eq!(store.default_lifetime(), DEFAULT_LIFETIME);

    std::env::set_var(LIFETIME_ENV, "0.25");
    let store = LockStore::from_url("memory://").await.unwrap();
    assert_eq!(store.default_lifetime(), Duration::from_millis(250));
    // The default applies to lock(): the ticket expires after 250 ms.
    let held = store.lock("c").await.unwrap();
    std::mem::forget(held);
    let started = std::time::Instant::now();
    let longer = ticketlock::LockOptions::default().with_lifetime(Duration::from_secs(10));
    store
        .lock_with("c", longer)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    for bad in ["0", "-3", "NaN", "inf", "soon", ""] {
        std::env::set_var(LIFETIME_ENV, bad);
        match LockStore::create(None).await {
            Err(LockError::InvalidInput { what, reason }) => {
                assert_eq!(what, "TICKET_LOCK_LIFETIME");
                assert!(!reason.is_empty());
            }
            other => panic!("{bad:?} accepted: {other:?}"),
        }
        assert!(LockStore::from_url("memory://").await.is_err());
    }
    std::env::remove_var(LIFETIME_ENV);
}
