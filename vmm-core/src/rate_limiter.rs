// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Device rate limiters, Firecracker's model: two token buckets per limited queue, one for
//! bandwidth (bytes) and one for operations (frames, requests, packets).
//!
//! A bucket holds at most `size` tokens and refills at `rate` tokens per second (it refills
//! completely in `size / rate` seconds, the refill time); an optional one-time burst is spent
//! first, once. A request of `n` tokens passes when both buckets can give it; a request larger
//! than a bucket's size passes once that bucket is full and leaves it in debt (the debt is paid
//! by the refill before anything else passes), so the long-run rate never exceeds `rate`.
//!
//! When a request does not pass, the limiter is *blocked*: it arms a one-shot timerfd for the
//! moment enough tokens are back and refuses everything until that timer fired and
//! [`RateLimiter::event_handler`] ran. Devices put the timer fd in the epoll set they are
//! already watched through and simply stop processing the guest's queue while blocked (the
//! descriptor chain goes back to the avail ring, the frame stays pending): a guest cannot go
//! faster than the limit, whatever it posts.
//!
//! The bucket math is integer and exact: time in nanoseconds, the sub-token remainder of every
//! refill carried over. [`TokenBucket`] takes the time as an argument (tests drive it with a
//! fake clock); [`RateLimiter`] reads the monotonic clock.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NS_PER_S: u128 = 1_000_000_000;

/// Errors of the rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// A bucket with a zero refill time or a refill time so short that it holds no token.
    #[error(
        "token bucket of {rate} tokens/s with a refill time of {refill_time_ms} ms holds no token"
    )]
    EmptyBucket {
        /// Tokens per second.
        rate: u64,
        /// Refill time.
        refill_time_ms: u64,
    },
    /// The timerfd could not be created or armed.
    #[error("rate limiter timerfd: {0}")]
    Timer(#[source] io::Error),
}

/// One token bucket's settings. `rate` 0 means unlimited (no bucket).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketConfig {
    /// Refill rate in tokens per second (0: unlimited).
    pub rate: u64,
    /// Tokens granted once, on top of the bucket, before the rate applies.
    pub one_time_burst: u64,
    /// Time for an empty bucket to refill completely, in milliseconds: the bucket holds
    /// `rate * refill_time_ms / 1000` tokens.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// Whether this bucket limits anything.
    pub fn is_limited(&self) -> bool {
        self.rate != 0
    }

    /// The bucket's capacity in tokens.
    pub fn size(&self) -> u64 {
        (u128::from(self.rate) * u128::from(self.refill_time_ms) / 1000).min(u128::from(u64::MAX))
            as u64
    }
}

/// The two buckets of one limited queue (both unlimited by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LimiterConfig {
    /// Bytes per second.
    pub bandwidth: BucketConfig,
    /// Operations per second.
    pub ops: BucketConfig,
}

impl LimiterConfig {
    /// Whether either bucket limits anything.
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_limited() || self.ops.is_limited()
    }

    /// Checks that every limited bucket holds at least one token.
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        for b in [self.bandwidth, self.ops] {
            if b.is_limited() && b.size() == 0 {
                return Err(RateLimiterError::EmptyBucket {
                    rate: b.rate,
                    refill_time_ms: b.refill_time_ms,
                });
            }
        }
        Ok(())
    }
}

/// The limiters of a device with a receive (host → guest, "rx") and a transmit (guest → host,
/// "tx") side; unlimited by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RxTxLimiterConfig {
    /// To the guest.
    pub rx: LimiterConfig,
    /// From the guest.
    pub tx: LimiterConfig,
}

impl RxTxLimiterConfig {
    /// Whether either direction limits anything.
    pub fn is_limited(&self) -> bool {
        self.rx.is_limited() || self.tx.is_limited()
    }
}

/// A token bucket on an explicit clock (nanoseconds from any fixed origin).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    rate: u64,
    one_time_burst: u64,
    /// Tokens available; negative: the debt of a request larger than the bucket.
    budget: i128,
    /// Refill credit below one token, in token-nanoseconds (`< NS_PER_S`).
    remainder: u128,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket for `cfg` at time `now_ns`.
    pub fn new(cfg: BucketConfig, now_ns: u64) -> Result<Self, RateLimiterError> {
        let size = cfg.size();
        if size == 0 {
            return Err(RateLimiterError::EmptyBucket {
                rate: cfg.rate,
                refill_time_ms: cfg.refill_time_ms,
            });
        }
        Ok(TokenBucket {
            size,
            rate: cfg.rate,
            one_time_burst: cfg.one_time_burst,
            budget: i128::from(size),
            remainder: 0,
            last_ns: now_ns,
        })
    }

    /// Capacity.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tokens available now (after [`refill`](Self::refill)); negative while in debt.
    pub fn budget(&self) -> i128 {
        self.budget
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Adds the tokens earned since the last refill, exactly (the sub-token remainder is kept).
    pub fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        if self.budget >= i128::from(self.size) {
            self.remainder = 0;
            return;
        }
        let credit = u128::from(elapsed) * u128::from(self.rate) + self.remainder;
        let tokens = credit / NS_PER_S;
        self.remainder = credit % NS_PER_S;
        let room = (i128::from(self.size) - self.budget) as u128;
        if tokens >= room {
            self.budget = i128::from(self.size);
            self.remainder = 0;
        } else {
            self.budget += tokens as i128;
        }
    }

    /// Tokens the bucket itself must give for `tokens` (what the one-time burst does not cover).
    fn bucket_share(&self, tokens: u64) -> u64 {
        tokens.saturating_sub(self.one_time_burst)
    }

    /// Whether `tokens` can be taken now (call [`refill`](Self::refill) first).
    pub fn can_take(&self, tokens: u64) -> bool {
        let need = self.bucket_share(tokens);
        need == 0 || self.budget >= i128::from(need.min(self.size))
    }

    /// Takes `tokens`: the one-time burst first, then the bucket (possibly into debt). Call
    /// only after [`can_take`](Self::can_take) said yes.
    pub fn take(&mut self, tokens: u64) {
        let need = self.bucket_share(tokens);
        self.one_time_burst = self.one_time_burst.saturating_sub(tokens);
        self.budget -= i128::from(need);
    }

    /// Nanoseconds from the last refill until `tokens` can be taken (0: now).
    pub fn wait_ns(&self, tokens: u64) -> u64 {
        let need = i128::from(self.bucket_share(tokens).min(self.size));
        if need == 0 || self.budget >= need {
            return 0;
        }
        let missing = (need - self.budget) as u128 * NS_PER_S - self.remainder;
        let ns = missing.div_ceil(u128::from(self.rate));
        ns.min(u128::from(u64::MAX)) as u64
    }
}

/// A one-shot, non-blocking monotonic timerfd.
#[derive(Debug)]
struct Timer(OwnedFd);

impl Timer {
    fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Timer(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Arms the timer to fire once after `d` (at least 1 ns: zero would disarm it).
    fn arm(&self, d: Duration) -> io::Result<()> {
        let d = d.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec that outlives the call; no old value is asked.
        let r =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the expiration count: true if the timer fired since the last read.
    fn fired(&self) -> io::Result<bool> {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into `n`, which lives for the call.
        let r = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut n as *mut u64).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(false),
                _ => Err(e),
            };
        }
        Ok(n > 0)
    }
}

/// The rate limiter of one queue: a bandwidth and an ops bucket (each optional), and the timer
/// that says when a blocked limiter may go on. An unlimited limiter has no timer and always
/// passes.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Option<Timer>,
    blocked: bool,
    origin: Instant,
    /// Times a request was refused; shared with the device's metrics
    /// ([`RateLimiter::count_throttled_in`]).
    throttled: Arc<AtomicU64>,
}

impl Default for RateLimiter {
    /// Unlimited.
    fn default() -> Self {
        RateLimiter {
            bandwidth: None,
            ops: None,
            timer: None,
            blocked: false,
            origin: Instant::now(),
            throttled: Arc::default(),
        }
    }
}

impl RateLimiter {
    /// A limiter for `cfg` (full buckets); unlimited buckets are left out, and a fully
    /// unlimited limiter has no timer.
    pub fn new(cfg: LimiterConfig) -> Result<Self, RateLimiterError> {
        let mut l = RateLimiter::default();
        let bucket = |c: BucketConfig| c.is_limited().then(|| TokenBucket::new(c, 0)).transpose();
        l.bandwidth = bucket(cfg.bandwidth)?;
        l.ops = bucket(cfg.ops)?;
        if cfg.is_limited() {
            l.timer = Some(Timer::new().map_err(RateLimiterError::Timer)?);
        }
        Ok(l)
    }

    /// Whether anything is limited.
    pub fn is_limited(&self) -> bool {
        self.timer.is_some()
    }

    /// Whether the limiter waits for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// How many times a request was refused (the limiter became blocked).
    pub fn throttled_count(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Counts the refusals from now on in `counter` (a device's metrics counter, Firecracker's
    /// `rate_limiter_throttled_events`), which keeps what it already holds.
    pub fn count_throttled_in(&mut self, counter: Arc<AtomicU64>) {
        self.throttled = counter;
    }

    fn throttle(&mut self) {
        self.blocked = true;
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// The timer fd to watch (readable: tokens are back); `None` when unlimited.
    pub fn fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(|t| t.0.as_raw_fd())
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    /// Takes one operation and `bytes` bytes if both buckets allow it. Otherwise takes nothing,
    /// becomes blocked and arms the timer for when they will; `Err` only if the timer cannot be
    /// armed (the limiter then stays open rather than stalling the queue for good).
    pub fn consume(&mut self, bytes: u64) -> Result<bool, RateLimiterError> {
        if self.timer.is_none() {
            return Ok(true);
        }
        if self.blocked {
            return Ok(false);
        }
        let now = self.now_ns();
        let mut wait = 0u64;
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = b {
                b.refill(now);
                wait = wait.max(b.wait_ns(n));
            }
        }
        if wait == 0 {
            if let Some(b) = &mut self.bandwidth {
                b.take(bytes);
            }
            if let Some(b) = &mut self.ops {
                b.take(1);
            }
            return Ok(true);
        }
        if let Some(t) = &self.timer {
            t.arm(Duration::from_nanos(wait))
                .map_err(RateLimiterError::Timer)?;
        }
        self.throttle();
        Ok(false)
    }

    /// Charges one operation and `bytes` for work already done (e.g. a packet whose size was
    /// known only once it was built), into debt if need be. If a bucket is left without a
    /// token the limiter blocks until its timer fires; `Err` only if the timer cannot be armed.
    pub fn charge(&mut self, bytes: u64) -> Result<(), RateLimiterError> {
        if self.timer.is_none() {
            return Ok(());
        }
        let now = self.now_ns();
        let mut wait = 0u64;
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = b {
                b.refill(now);
                b.take(n);
                wait = wait.max(b.wait_ns(1));
            }
        }
        if wait > 0 && !self.blocked {
            if let Some(t) = &self.timer {
                t.arm(Duration::from_nanos(wait))
                    .map_err(RateLimiterError::Timer)?;
            }
            self.throttle();
        }
        Ok(())
    }

    /// Handles the timer fd's readiness: if the timer fired, the limiter is open again (the
    /// caller retries its queue). Returns whether it fired.
    pub fn event_handler(&mut self) -> Result<bool, RateLimiterError> {
        let Some(t) = &self.timer else {
            return Ok(false);
        };
        let fired = t.fired().map_err(RateLimiterError::Timer)?;
        if fired {
            self.blocked = false;
        }
        Ok(fired)
    }

    /// The buckets (bandwidth, ops), for tests and metrics.
    pub fn buckets(&self) -> (Option<&TokenBucket>, Option<&TokenBucket>) {
        (self.bandwidth.as_ref(), self.ops.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn bucket(rate: u64, burst: u64, refill_time_ms: u64) -> TokenBucket {
        TokenBucket::new(
            BucketConfig {
                rate,
                one_time_burst: burst,
                refill_time_ms,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn bucket_size_and_empty_bucket() {
        let c = BucketConfig {
            rate: 1000,
            one_time_burst: 0,
            refill_time_ms: 100,
        };
        assert_eq!(c.size(), 100);
        assert!(matches!(
            TokenBucket::new(
                BucketConfig {
                    refill_time_ms: 0,
                    ..c
                },
                0
            ),
            Err(RateLimiterError::EmptyBucket {
                rate: 1000,
                refill_time_ms: 0
            })
        ));
        // 3 tokens/s over 100 ms: 0.3 token, no bucket.
        assert!(TokenBucket::new(
            BucketConfig {
                rate: 3,
                one_time_burst: 0,
                refill_time_ms: 100
            },
            0
        )
        .is_err());
        assert!(!LimiterConfig::default().is_limited());
    }

    /// Exact token math on a fake clock: a full bucket, spending, refill with the sub-token
    /// remainder carried, the cap at the size.
    #[test]
    fn refill_is_exact() {
        // 3 tokens/s, 10 s refill time: 30 tokens.
        let mut b = bucket(3, 0, 10_000);
        assert_eq!((b.size(), b.budget()), (30, 30));
        assert!(b.can_take(30));
        b.take(30);
        assert_eq!(b.budget(), 0);
        assert!(!b.can_take(1));
        // 1/3 s gives exactly one token; 0.2 s gives none yet (0.6 token kept).
        assert_eq!(b.wait_ns(1), 333_333_334);
        b.refill(200 * MS);
        assert_eq!(b.budget(), 0);
        assert_eq!(b.wait_ns(1), 133_333_334);
        b.refill(400 * MS);
        assert_eq!(b.budget(), 1);
        // 0.2 token left over from 1.2 tokens.
        b.refill(600 * MS);
        assert_eq!(b.budget(), 1);
        b.refill(700 * MS);
        assert_eq!(b.budget(), 2);
        // 100 s later: capped at the size, remainder dropped.
        b.refill(100_700 * MS);
        assert_eq!(b.budget(), 30);
        b.take(1);
        b.refill(100_700 * MS + 333_333_333);
        assert_eq!(b.budget(), 29);
        b.refill(100_700 * MS + 333_333_334);
        assert_eq!(b.budget(), 30);
        // A clock going backwards adds nothing.
        b.take(5);
        b.refill(0);
        assert_eq!(b.budget(), 25);
    }

    /// Over any window the bucket grants at most size + rate * t tokens.
    #[test]
    fn long_run_rate_holds() {
        let mut b = bucket(1_000_000, 0, 100); // 1 MB/s, 100 KB bucket
        let mut granted = 0u64;
        let mut now = 0u64;
        // A greedy consumer of 1500-byte frames polling every 0.1 ms for 10 s.
        while now <= 10_000 * MS {
            b.refill(now);
            while b.can_take(1500) {
                b.take(1500);
                granted += 1500;
            }
            now += MS / 10;
        }
        let max = 100_000 + 1_000_000 * 10;
        assert!(granted <= max, "{granted} > {max}");
        assert!(granted > max - 1500, "{granted}");
    }

    /// A request larger than the bucket passes when the bucket is full and leaves a debt.
    #[test]
    fn oversize_request_goes_into_debt() {
        let mut b = bucket(1000, 0, 100); // 100 tokens
        assert!(b.can_take(250));
        b.take(250);
        assert_eq!(b.budget(), -150);
        assert!(!b.can_take(1));
        // 151 tokens to get one: 151 ms.
        assert_eq!(b.wait_ns(1), 151 * MS);
        // The next oversize request needs a full bucket: 250 ms.
        assert_eq!(b.wait_ns(1000), 250 * MS);
        b.refill(250 * MS);
        assert_eq!(b.budget(), 100);
        assert!(b.can_take(1000));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_once() {
        let mut b = bucket(1000, 500, 100);
        assert!(b.can_take(550));
        b.take(550);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        b.take(50);
        assert!(!b.can_take(1));
        let mut b = bucket(1000, 500, 100);
        b.take(200);
        assert_eq!((b.one_time_burst(), b.budget()), (300, 100));
        assert_eq!(b.wait_ns(400), 0);
    }

    /// The limiter: both buckets must allow a request, nothing is taken otherwise, the timer
    /// fires when the tokens are back, and it is blocked until then.
    #[test]
    fn limiter_blocks_until_its_timer_fires() {
        let mut l = RateLimiter::default();
        assert!(!l.is_limited() && l.fd().is_none());
        assert!(l.consume(u64::MAX).unwrap());
        assert!(!l.event_handler().unwrap());

        // 100 KB/s bandwidth (10 KB bucket at 100 ms), 10 ops/s (2 ops at 200 ms).
        let mut l = RateLimiter::new(LimiterConfig {
            bandwidth: BucketConfig {
                rate: 100_000,
                one_time_burst: 0,
                refill_time_ms: 100,
            },
            ops: BucketConfig {
                rate: 10,
                one_time_burst: 0,
                refill_time_ms: 200,
            },
        })
        .unwrap();
        let fd = l.fd().unwrap();
        assert!(l.consume(100).unwrap());
        assert!(l.consume(100).unwrap());
        // Ops exhausted: refused, and the bandwidth bucket is untouched.
        let t0 = Instant::now();
        assert!(!l.consume(100).unwrap());
        assert!(l.is_blocked());
        assert_eq!(l.throttled_count(), 1);
        assert!(l.buckets().0.unwrap().budget() >= 9800);
        let bw_before = l.buckets().0.unwrap().budget();
        assert!(!l.consume(1).unwrap());
        assert_eq!(l.buckets().0.unwrap().budget(), bw_before);
        assert_eq!(l.throttled_count(), 1);
        // Not before the tokens are back.
        assert!(!l.event_handler().unwrap());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one live pollfd, 5 s bound.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 5000) }, 1);
        assert!(
            t0.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t0.elapsed()
        );
        assert!(l.event_handler().unwrap());
        assert!(!l.is_blocked());
        // The fd is quiet again.
        // SAFETY: as above, no wait.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0);
        assert!(l.consume(100).unwrap());
    }

    /// The refusals land in the shared counter a device's metrics read.
    #[test]
    fn throttled_events_go_to_the_shared_counter() {
        let mut l = RateLimiter::new(LimiterConfig {
            bandwidth: BucketConfig::default(),
            ops: BucketConfig {
                rate: 10,
                one_time_burst: 0,
                refill_time_ms: 100,
            },
        })
        .unwrap();
        let counter = Arc::new(AtomicU64::new(5));
        l.count_throttled_in(counter.clone());
        assert!(l.consume(1).unwrap());
        assert_eq!(counter.load(Ordering::Relaxed), 5);
        assert!(!l.consume(1).unwrap());
        // Blocked: refused again, but one throttled event.
        assert!(!l.consume(1).unwrap());
        assert_eq!((counter.load(Ordering::Relaxed), l.throttled_count()), (6, 6));
        // A charge into debt while open is a throttled event too.
        let mut l = RateLimiter::new(LimiterConfig {
            bandwidth: BucketConfig {
                rate: 1000,
                one_time_burst: 0,
                refill_time_ms: 100,
            },
            ops: BucketConfig::default(),
        })
        .unwrap();
        l.count_throttled_in(counter.clone());
        l.charge(500).unwrap();
        assert!(l.is_blocked());
        assert_eq!(counter.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn limiter_refuses_a_bucket_without_tokens() {
        let e = RateLimiter::new(LimiterConfig {
            bandwidth: BucketConfig {
                rate: 5,
                one_time_burst: 0,
                refill_time_ms: 10,
            },
            ops: BucketConfig::default(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("holds no token"), "{e}");
    }
}
