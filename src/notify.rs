//! Per-conversation wake-ups, shared by both backends.
//!
//! Every state change that moves a queue's head publishes a [`Notice`]: the
//! ticket now served. Waiters in this process listen on one broadcast channel
//! per conversation; the in-memory backend sends notices directly, the Redis
//! backend forwards pub/sub messages. A notice is advisory for everyone except
//! the ticket it names: that waiter may take the lock without asking again,
//! because the script (or state machine) that sent it had just decided so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

/// Room for bursts of hand-offs; a waiter that falls further behind is told it
/// lagged and asks the store directly.
const CAPACITY: usize = 64;

/// Waiting tickets someone other than their owner took out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removed {
    None,
    Ticket(u64),
    /// Several were (`save_lock`): every waiter should ask.
    Several,
}

/// What a wake-up says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// In record `epoch`, `serving` is served now with fencing token `fence`
    /// (`None`: nobody is), and `removed` waiting tickets were taken out.
    Changed {
        epoch: u64,
        serving: Option<u64>,
        fence: Option<u64>,
        removed: Removed,
        /// Until the served ticket expires, unless renewed.
        serving_left: Option<Duration>,
    },
    /// Messages may have been lost (reconnect): every waiter should ask the store.
    Recheck,
}

impl Notice {
    /// Decodes a Redis pub/sub payload:
    /// `"<epoch> <serving> <fence> <removed> <serving_ms>"`, -1 for none and
    /// removed -2 for several (lua/common.lua `announce`).
    pub(crate) fn parse(payload: &[u8]) -> Notice {
        let text = std::str::from_utf8(payload).unwrap_or("");
        let fields: Option<Vec<i64>> = text.split(' ').map(|f| f.parse().ok()).collect();
        match fields.as_deref() {
            Some(&[epoch, serving, fence, removed, left]) if epoch >= 0 && removed >= -2 => {
                Notice::Changed {
                    epoch: epoch as u64,
                    serving: u64::try_from(serving).ok(),
                    fence: u64::try_from(fence).ok(),
                    removed: match removed {
                        -1 => Removed::None,
                        -2 => Removed::Several,
                        n => Removed::Ticket(n as u64),
                    },
                    serving_left: u64::try_from(left).ok().map(Duration::from_millis),
                }
            }
            _ => Notice::Recheck,
        }
    }
}

struct Channel {
    sender: broadcast::Sender<Notice>,
    listeners: usize,
    /// Whether the server side (a Redis SUBSCRIBE) is in place. Subscribing and
    /// unsubscribing take this lock, so they reach the server in the order the
    /// listener count changed.
    server: Arc<tokio::sync::Mutex<bool>>,
}

#[derive(Default)]
pub(crate) struct Notifier {
    channels: Mutex<HashMap<String, Channel>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let channels = self.channels.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("Notifier")
            .field("channels", &channels)
            .finish()
    }
}

impl Notifier {
    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (each change is one insert, remove or counter step), so poisoning is ignored.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts listening on `name`; the returned lock guards the server-side subscription.
    pub(crate) fn join(
        &self,
        name: &str,
    ) -> (broadcast::Receiver<Notice>, Arc<tokio::sync::Mutex<bool>>) {
        let mut channels = self.channels();
        let channel = channels.entry(name.to_owned()).or_insert_with(|| Channel {
            sender: broadcast::channel(CAPACITY).0,
            listeners: 0,
            server: Arc::default(),
        });
        channel.listeners += 1;
        (channel.sender.subscribe(), channel.server.clone())
    }

    /// Stops one listener; true when it was the last one on `name`.
    pub(crate) fn leave(&self, name: &str) -> bool {
        let mut channels = self.channels();
        let Some(channel) = channels.get_mut(name) else {
            return false;
        };
        channel.listeners -= 1;
        channel.listeners == 0
    }

    /// True when nobody listens on `name`.
    pub(crate) fn is_idle(&self, name: &str) -> bool {
        self.channels().get(name).is_none_or(|c| c.listeners == 0)
    }

    /// Forgets `name` if nobody listens on it. The Redis backend calls this
    /// with the channel's server lock held, after unsubscribing.
    pub(crate) fn forget_if_idle(&self, name: &str) {
        let mut channels = self.channels();
        if channels.get(name).is_some_and(|c| c.listeners == 0) {
            channels.remove(name);
        }
    }

    pub(crate) fn send(&self, name: &str, notice: Notice) {
        if let Some(channel) = self.channels().get(name) {
            // An error only means nobody listens right now.
            let _ = channel.sender.send(notice);
        }
    }

    /// Tells every listener to recheck, e.g. after a reconnect may have lost messages.
    pub(crate) fn send_all(&self, notice: Notice) {
        for channel in self.channels().values() {
            let _ = channel.sender.send(notice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_decode_to_notices() {
        let changed = |serving, fence, removed: Option<u64>, left: Option<u64>| Notice::Changed {
            epoch: 17,
            serving,
            fence,
            removed: removed.map_or(Removed::None, Removed::Ticket),
            serving_left: left.map(Duration::from_millis),
        };
        assert_eq!(
            Notice::parse(b"17 4 99 -1 50"),
            changed(Some(4), Some(99), None, Some(50))
        );
        assert_eq!(
            Notice::parse(b"17 -1 -1 -1 -1"),
            changed(None, None, None, None)
        );
        assert_eq!(
            Notice::parse(b"17 4 99 9 7"),
            changed(Some(4), Some(99), Some(9), Some(7))
        );
        assert_eq!(
            Notice::parse(b"17 4 99 -2 7"),
            Notice::Changed {
                epoch: 17,
                serving: Some(4),
                fence: Some(99),
                removed: Removed::Several,
                serving_left: Some(Duration::from_millis(7)),
            }
        );
        for bad in [
            &b"17 4 9 -3 1"[..],
            &b"17 4"[..],
            b"17 4 9 1",
            b"17 4 9 1 1 1",
            b"17 4 x 1 1",
            b"-1 4 4 4 4",
            b"garbage",
            &[0xff, 0xfe],
        ] {
            assert_eq!(Notice::parse(bad), Notice::Recheck);
        }
    }

    #[test]
    fn listeners_are_counted_per_channel() {
        let n = Notifier::default();
        let (mut rx, _) = n.join("a");
        let (_rx2, _) = n.join("a");
        n.send("a", Notice::Recheck);
        n.send("b", Notice::Recheck);
        assert_eq!(rx.try_recv().unwrap(), Notice::Recheck);
        assert!(!n.leave("a"));
        assert!(n.leave("a"));
        assert!(n.is_idle("a"));
        n.forget_if_idle("a");
        assert!(n.channels().is_empty());
    }
}
