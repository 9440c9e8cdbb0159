//! 8250 UART on COM1 (vm-superio `Serial`), output to a rate-limited log sink.

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::capped_log::{CappedLog, CappedLogError};
use crate::vmm::bus::BusDevice;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial log: {0}")]
    Log(#[from] CappedLogError),
    #[error("creating serial interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// Byte budget of the serial log: `burst` bytes at once, refilled at
/// `bytes_per_sec`. Output past the budget is dropped (and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_sec: u64,
    pub burst: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            bytes_per_sec: 256 * 1024,
            burst: 1024 * 1024,
        }
    }
}

#[derive(Debug)]
enum SinkTarget {
    File(CappedLog),
    Memory(Arc<Mutex<Vec<u8>>>),
}

/// Where guest serial output goes: a file or an in-memory buffer, behind a token bucket.
#[derive(Debug)]
pub struct LogSink {
    target: SinkTarget,
    limit: RateLimit,
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl LogSink {
    /// Truncates/creates `path` and writes to it, keeping at most `cap` bytes, the newest
    /// (0: unlimited; see [`CappedLog`]).
    pub fn file(path: &Path, limit: RateLimit, cap: u64) -> Result<Self, SerialError> {
        Ok(Self::new(SinkTarget::File(CappedLog::create(path, cap)?), limit))
    }

    /// Bytes the file's cap dropped so far (`None` for a memory sink).
    pub fn cap_dropped(&self) -> Option<Arc<AtomicU64>> {
        match &self.target {
            SinkTarget::File(f) => Some(f.dropped().clone()),
            SinkTarget::Memory(_) => None,
        }
    }

    /// Writes into a shared buffer (returned alongside).
    pub fn memory(limit: RateLimit) -> (Self, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (Self::new(SinkTarget::Memory(buf.clone()), limit), buf)
    }

    fn new(target: SinkTarget, limit: RateLimit) -> Self {
        LogSink {
            target,
            limit,
            tokens: limit.burst as f64,
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// Bytes dropped by the rate limiter so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens =
            (self.tokens + dt * self.limit.bytes_per_sec as f64).min(self.limit.burst as f64);
    }

    fn emit(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.target {
            SinkTarget::File(f) => f.write_all(buf),
            SinkTarget::Memory(m) => {
                m.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(buf);
                Ok(())
            }
        }
    }

    /// Rate-limited write at time `now` (exposed for tests).
    pub fn write_at(&mut self, buf: &[u8], now: Instant) -> io::Result<usize> {
        self.refill(now);
        let allowed = (self.tokens.floor() as usize).min(buf.len());
        if allowed > 0 {
            if self.dropped > 0 {
                let note = format!("\n[serial: {} bytes dropped by rate limit]\n", self.dropped);
                self.dropped = 0;
                self.emit(note.as_bytes())?;
            }
            self.emit(&buf[..allowed])?;
            self.tokens -= allowed as f64;
        }
        self.dropped += (buf.len() - allowed) as u64;
        // Report everything as written: the guest must never stall on its console.
        Ok(buf.len())
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_at(buf, Instant::now())
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.target {
            SinkTarget::File(f) => f.flush(),
            SinkTarget::Memory(_) => Ok(()),
        }
    }
}

/// Serial interrupt line: an eventfd registered as KVM irqfd for GSI 4.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl IrqTrigger {
    /// New non-blocking eventfd trigger.
    pub fn new() -> Result<Self, SerialError> {
        Ok(IrqTrigger(
            EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?,
        ))
    }
}

/// COM1 as a bus device.
#[derive(Debug)]
pub struct SerialDevice {
    inner: Serial<IrqTrigger, vm_superio::serial::NoEvents, LogSink>,
}

impl SerialDevice {
    /// Serial device writing to `sink` and raising `irq`.
    pub fn new(irq: IrqTrigger, sink: LogSink) -> Self {
        SerialDevice {
            inner: Serial::new(irq, sink),
        }
    }

    /// The interrupt eventfd (to register as irqfd).
    pub fn irq_evt(&self) -> &EventFd {
        &self.inner.interrupt_evt().0
    }

    /// Bytes dropped by the rate limiter.
    pub fn dropped(&self) -> u64 {
        self.inner.writer().dropped()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.inner.write(offset as u8, data[0]) {
                tracing::trace!("serial write: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn serial_writes_thr_to_sink() {
        let (sink, buf) = LogSink::memory(RateLimit::default());
        let mut s = SerialDevice::new(IrqTrigger::new().unwrap(), sink);
        for b in b"PROBE x ok\n" {
            s.write(0x3f8, 0, &[*b]);
        }
        let mut lsr = [0u8];
        s.read(0x3f8, 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        assert_eq!(&buf.lock().unwrap()[..], b"PROBE x ok\n");
    }

    #[test]
    fn rate_limit_drops_excess_and_notes_it() {
        let (mut sink, buf) = LogSink::memory(RateLimit {
            bytes_per_sec: 10,
            burst: 10,
        });
        let t0 = Instant::now();
        assert_eq!(sink.write_at(&[b'a'; 25], t0).unwrap(), 25);
        assert_eq!(buf.lock().unwrap().len(), 10);
        assert_eq!(sink.dropped(), 15);
        sink.write_at(b"bb", t0 + Duration::from_secs(1)).unwrap();
        let out = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert!(
            out.ends_with("[serial: 15 bytes dropped by rate limit]\nbb"),
            "{out}"
        );
        assert_eq!(sink.dropped(), 0);
    }
}
