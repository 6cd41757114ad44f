//! A byte budget shared by many tasks: how the inbound path stays bounded in bytes,
//! not just in messages, whatever size the frames are.

use std::future::poll_fn;
use std::sync::Mutex;
use std::task::{Poll, Waker};

#[derive(Debug)]
pub struct Budget {
    limit: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    used: usize,
    waiting: Vec<Waker>,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            state: Mutex::default(),
        }
    }

    /// Waits until `n` more bytes fit, then takes them. When nothing is taken, any
    /// amount fits, so one frame larger than the budget still gets through alone.
    pub async fn acquire(&self, n: usize) {
        poll_fn(|cx| {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.used == 0 || s.used + n <= self.limit {
                s.used += n;
                Poll::Ready(())
            } else {
                s.waiting.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Gives back bytes taken with [`Budget::acquire`].
    pub fn release(&self, n: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.used = s.used.saturating_sub(n);
        for w in s.waiting.drain(..) {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn waits_for_room_and_lets_one_oversized_request_through() {
        let b = Budget::new(10);
        assert!(b.acquire(8).now_or_never().is_some());
        assert!(
            b.acquire(5).now_or_never().is_none(),
            "8 + 5 > 10 must wait"
        );
        b.release(8);
        assert!(
            b.acquire(50).now_or_never().is_some(),
            "alone, any size fits"
        );
        assert!(b.acquire(1).now_or_never().is_none());
        b.release(50);
        assert!(b.acquire(1).now_or_never().is_some());
    }
}
