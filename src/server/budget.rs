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
            let mut s = self.lock();
            if s.take(n, self.limit) {
                Poll::Ready(())
            } else {
                s.waiting.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Takes `n` bytes if they fit now, as [`Budget::acquire`] would.
    pub fn try_acquire(&self, n: usize) -> bool {
        self.lock().take(n, self.limit)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives back bytes taken with [`Budget::acquire`].
    pub fn release(&self, n: usize) {
        let mut s = self.lock();
        s.used = s.used.saturating_sub(n);
        for w in s.waiting.drain(..) {
            w.wake();
        }
    }
}

impl State {
    /// Takes `n` bytes if they fit under `limit`; when nothing is taken, anything fits.
    fn take(&mut self, n: usize, limit: usize) -> bool {
        let fits = self.used == 0 || self.used + n <= limit;
        if fits {
            self.used += n;
        }
        fits
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
        assert!(!b.try_acquire(1), "try_acquire takes what acquire would");
        b.release(50);
        assert!(b.try_acquire(1));
        assert!(b.acquire(1).now_or_never().is_some());
    }
}
