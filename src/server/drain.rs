//! Draining a node (SIGUSR1, or `POST /v1/drain` on the admin listener): take it out
//! of service without cutting its users off.
//!
//! On a drain the node stops accepting chat connections and WebSocket upgrades (so a
//! load balancer's check fails and it sends new clients elsewhere), `/readyz` answers
//! 503 `draining`, and every open connection gets the notice `reconnect` while it goes
//! on being served: a client connects again (through the balancer, to another node)
//! and then lets the old connection go, so nothing it sends or is sent waits on a gap.
//! When the last connection has gone, or the deadline passes, the node stops as on
//! SIGTERM: what is queued is flushed, those still connected get `shutting-down`, and
//! the store commits.
//!
//! This file holds only the trigger, shared by the signal handler, the admin listener
//! and the node's assembly, which does the rest ([`crate::node`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::channel::oneshot;

/// The switch that starts a drain, once.
#[derive(Debug)]
pub struct Drain {
    start: Mutex<Option<oneshot::Sender<Duration>>>,
    draining: AtomicBool,
}

impl Drain {
    /// The switch, and what the node waits on: the deadline of the drain asked for.
    pub fn new() -> (Drain, oneshot::Receiver<Duration>) {
        let (tx, rx) = oneshot::channel();
        let drain = Drain {
            start: Mutex::new(Some(tx)),
            draining: AtomicBool::new(false),
        };
        (drain, rx)
    }

    /// Starts draining, to end by `deadline`; `false` when a drain already began (or
    /// the node is stopping).
    pub fn start(&self, deadline: Duration) -> bool {
        let start = self.start.lock().unwrap_or_else(|e| e.into_inner()).take();
        let started = start.is_some_and(|tx| tx.send(deadline).is_ok());
        if started {
            self.draining.store(true, Ordering::Release);
        }
        started
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_drain_starts_once_with_its_deadline() {
        let (drain, mut started) = Drain::new();
        assert!(!drain.is_draining());
        assert!(started.try_recv().expect("open").is_none());
        assert!(drain.start(Duration::from_secs(7)));
        assert!(drain.is_draining());
        assert!(!drain.start(Duration::from_secs(1)), "only once");
        assert_eq!(started.now_or_never(), Some(Ok(Duration::from_secs(7))));
    }

    #[test]
    fn a_stopping_node_cannot_be_drained() {
        let (drain, started) = Drain::new();
        drop(started);
        assert!(!drain.start(Duration::from_secs(1)));
        assert!(!drain.is_draining());
    }
}
