//! Per-connection rate limits (`--rate-frames`, `--rate-bytes`, `--rate-burst`).
//!
//! Two token buckets, one counting frames and one counting bytes, each holding up to
//! `burst` seconds' worth and refilling at its rate. The reader charges them for what
//! it has read and, before reading more, waits until neither is in debt. So a client
//! over its rate is not refused and loses nothing: the server stops reading it, TCP's
//! window fills, and its sends block (backpressure, as for a full server). A frame
//! larger than a whole bucket still passes, alone, and puts the bucket in debt for as
//! long as its bytes take at the rate.
//!
//! The arithmetic takes the time as an argument, so the tests drive it without a clock.

use std::time::{Duration, Instant};

/// What one connection may send; 0 turns a bucket off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// Frames per second (every frame, control frames included).
    pub frames: u32,
    /// Bytes per second of data frames (whole frames, headers included).
    pub bytes: u64,
    /// How much may come at once after a quiet spell: this long at the rates.
    pub burst: Duration,
}

impl RateLimits {
    /// No limit: the default.
    pub const OFF: RateLimits = RateLimits {
        frames: 0,
        bytes: 0,
        burst: Duration::from_secs(2),
    };

    pub fn is_off(&self) -> bool {
        self.frames == 0 && self.bytes == 0
    }
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits::OFF
    }
}

/// One token bucket.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    /// Per second; 0: off.
    rate: f64,
    capacity: f64,
    /// Below 0: in debt.
    left: f64,
}

impl Tokens {
    fn new(rate: f64, burst: Duration) -> Tokens {
        // At least one second's worth, and at least one token, so that any rate can
        // pass a frame.
        let capacity = (rate * burst.as_secs_f64()).max(rate).max(1.0);
        Tokens {
            rate,
            capacity,
            left: capacity,
        }
    }

    fn refill(&mut self, secs: f64) {
        if self.rate > 0.0 {
            self.left = (self.left + self.rate * secs).min(self.capacity);
        }
    }

    fn take(&mut self, n: f64) {
        if self.rate > 0.0 {
            self.left -= n;
        }
    }

    /// Seconds until this bucket is out of debt.
    fn debt_secs(&self) -> f64 {
        if self.rate > 0.0 && self.left < 0.0 {
            -self.left / self.rate
        } else {
            0.0
        }
    }
}

/// A connection's two buckets.
#[derive(Debug, Clone)]
pub struct Bucket {
    frames: Tokens,
    bytes: Tokens,
    last: Instant,
}

impl Bucket {
    /// Full buckets at `now`.
    pub fn new(limits: RateLimits, now: Instant) -> Bucket {
        Bucket {
            frames: Tokens::new(f64::from(limits.frames), limits.burst),
            bytes: Tokens::new(limits.bytes as f64, limits.burst),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.frames.refill(secs);
        self.bytes.refill(secs);
    }

    /// Takes `frames` frames of `bytes` bytes in all, read at `now`.
    pub fn charge(&mut self, frames: usize, bytes: usize, now: Instant) {
        self.refill(now);
        self.frames.take(frames as f64);
        self.bytes.take(bytes as f64);
    }

    /// How long to wait at `now` before reading more: `None` when neither bucket is in
    /// debt.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        let secs = self.frames.debt_secs().max(self.bytes.debt_secs());
        (secs > 0.0).then(|| Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = Instant::now();
        let limits = RateLimits {
            frames: 10,
            bytes: 0,
            burst: 2 * SEC,
        };
        let mut b = Bucket::new(limits, t0);
        b.charge(20, 0, t0);
        assert_eq!(b.wait(t0), None, "two seconds' worth at once");
        b.charge(5, 0, t0);
        let wait = b.wait(t0).expect("in debt");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert_eq!(b.wait(t0 + wait), None, "out of debt once waited");
        // A steady 10 a second never waits once the debt is paid.
        let mut now = t0 + wait;
        for _ in 0..50 {
            now += SEC / 10;
            b.charge(1, 0, now);
            assert!(b.wait(now).is_none_or(|w| w < Duration::from_millis(1)));
        }
    }

    #[test]
    fn bytes_and_frames_each_hold_and_the_longer_debt_decides() {
        let t0 = Instant::now();
        let limits = RateLimits {
            frames: 100,
            bytes: 1000,
            burst: SEC,
        };
        let mut b = Bucket::new(limits, t0);
        b.charge(1, 3000, t0);
        let wait = b.wait(t0).expect("the bytes are in debt");
        assert!((wait.as_secs_f64() - 2.0).abs() < 1e-9, "{wait:?}");
        let mut b = Bucket::new(limits, t0);
        b.charge(300, 10, t0);
        let wait = b.wait(t0).expect("the frames are in debt");
        assert!((wait.as_secs_f64() - 2.0).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn a_frame_larger_than_the_bucket_passes_alone_and_is_paid_for_after() {
        let t0 = Instant::now();
        let limits = RateLimits {
            frames: 0,
            bytes: 1000,
            burst: SEC,
        };
        let mut b = Bucket::new(limits, t0);
        assert_eq!(b.wait(t0), None, "nothing stops the first read");
        b.charge(1, 10_000, t0);
        let wait = b.wait(t0).expect("in debt");
        assert!((wait.as_secs_f64() - 9.0).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn off_never_waits() {
        let t0 = Instant::now();
        assert!(RateLimits::OFF.is_off());
        let mut b = Bucket::new(RateLimits::OFF, t0);
        b.charge(1_000_000, 1 << 40, t0);
        assert_eq!(b.wait(t0), None);
    }
}
