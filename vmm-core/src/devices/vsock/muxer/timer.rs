// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The muxer's deadline timer: one non-blocking timerfd in the muxer's epoll set that fires at
//! the earliest deadline anybody asked for (a host stream's `CONNECT` line, the guest's answer
//! to a host-initiated request, the end of a listener pause). On expiry the muxer looks at
//! every deadline and re-arms the timer for the next one.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use tracing::warn;
use vmm_sys_util::timerfd::TimerFd;

/// A timerfd armed for the earliest requested deadline.
pub struct DeadlineTimer {
    fd: TimerFd,
    armed: Option<Instant>,
}

impl DeadlineTimer {
    /// A disarmed, non-blocking timer.
    pub fn new() -> io::Result<Self> {
        let fd = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        set_fd_nonblocking(fd.as_raw_fd())?;
        Ok(DeadlineTimer { fd, armed: None })
    }

    /// Makes the timer fire at `deadline` at the latest (an earlier armed deadline is kept).
    pub fn arm(&mut self, deadline: Instant) {
        if self.armed.is_some_and(|d| d <= deadline) {
            return;
        }
        let dur = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.fd.reset(dur, None) {
            Ok(()) => self.armed = Some(deadline),
            Err(e) => warn!("vsock: cannot arm connect timer: {e}"),
        }
    }

    /// Acknowledges an expiry: clears the fd's readiness and forgets the armed deadline.
    pub fn ack(&mut self) {
        // Non-blocking read; EAGAIN just means nothing expired.
        let _ = self.fd.wait();
        self.armed = None;
    }
}

impl AsRawFd for DeadlineTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn set_fd_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we own has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own only changes its status flags.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the timer's fd is readable within `ms` milliseconds.
    fn fires_within(t: &DeadlineTimer, ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: t.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        r > 0
    }

    #[test]
    fn keeps_the_earliest_deadline_and_rearms_after_ack() {
        let mut t = DeadlineTimer::new().unwrap();
        assert!(!fires_within(&t, 0));
        let now = Instant::now();
        t.arm(now + Duration::from_millis(20));
        // A later deadline does not push the armed one back.
        t.arm(now + Duration::from_secs(3600));
        assert!(fires_within(&t, 2000));
        t.ack();
        assert!(!fires_within(&t, 0), "ack clears readiness");
        t.ack();
        t.arm(Instant::now() + Duration::from_secs(3600));
        // An earlier deadline replaces the armed one.
        t.arm(Instant::now());
        assert!(fires_within(&t, 2000));
    }
}
