//! Joining threads with a deadline.
//!
//! `std::thread::JoinHandle::join` waits without a bound. Every owner of a device, vCPU or VMM
//! thread joins through [`join_with_deadline`] instead: it waits (polling `is_finished` with a
//! short, growing pause) until the thread has ended or the deadline has passed, and only then
//! calls `join`, which is instant for a finished thread. A thread that misses the deadline is
//! left detached and reported as [`JoinError::Timeout`]. This is blocking code: async callers run
//! it on `spawn_blocking`.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest pause between two looks at a thread that has not ended yet.
const MAX_POLL: Duration = Duration::from_millis(10);

/// Why a join did not return the thread's result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The thread was still running at the deadline; it is left detached.
    #[error("thread did not end within {0:?}; left detached")]
    Timeout(Duration),
    /// The thread panicked.
    #[error("thread panicked")]
    Panicked,
}

/// Waits up to `timeout` for `handle`'s thread to end; true when it has (it can then be joined
/// without blocking).
pub fn wait_finished<T>(handle: &JoinHandle<T>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(500);
    while !handle.is_finished() {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
    true
}

/// Joins `handle` if its thread ends within `timeout`; otherwise leaves it detached.
pub fn join_with_deadline<T>(handle: JoinHandle<T>, timeout: Duration) -> Result<T, JoinError> {
    if !wait_finished(&handle, timeout) {
        return Err(JoinError::Timeout(timeout));
    }
    handle.join().map_err(|_| JoinError::Panicked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn returns_the_threads_result() {
        let t = std::thread::spawn(|| 42);
        assert_eq!(join_with_deadline(t, Duration::from_secs(5)), Ok(42));
    }

    #[test]
    fn a_thread_still_running_at_the_deadline_times_out() {
        let (tx, rx) = mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let t0 = Instant::now();
        let e = join_with_deadline(t, Duration::from_millis(30)).unwrap_err();
        assert_eq!(e, JoinError::Timeout(Duration::from_millis(30)));
        assert_eq!(
            e.to_string(),
            "thread did not end within 30ms; left detached"
        );
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(30) && took < Duration::from_secs(2),
            "{took:?}"
        );
        drop(tx);
    }

    #[test]
    fn a_panic_is_typed() {
        let t = std::thread::spawn(|| -> u8 { panic!("boom") });
        assert_eq!(
            join_with_deadline(t, Duration::from_secs(5)),
            Err(JoinError::Panicked)
        );
    }

    #[test]
    fn wait_finished_sees_a_late_end() {
        let (tx, rx) = mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        assert!(!wait_finished(&t, Duration::ZERO));
        drop(tx);
        assert!(wait_finished(&t, Duration::from_secs(5)));
        assert!(t.is_finished());
    }
}
