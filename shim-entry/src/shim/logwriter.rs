//! The shim's log writer: containerd's `log` fifo is written by a dedicated thread fed through
//! a bounded queue, so that logging never blocks the async runtime. A reader that is slow or
//! gone fills the queue; lines that do not fit are dropped and counted, and the thread writes
//! one line saying how many were dropped before the next line it writes.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// Log lines waiting for the fifo; one more is dropped.
pub const QUEUE_LINES: usize = 1024;

/// A `tracing_subscriber` writer (cheap to clone): each event's text is one queued line.
#[derive(Clone)]
pub struct LogWriter {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl LogWriter {
    /// Starts the thread that writes queued lines to `out` (blocking writes, on that thread
    /// only). It ends when every writer is gone.
    pub fn start(out: impl Write + Send + 'static, capacity: usize) -> std::io::Result<LogWriter> {
        let (tx, rx) = sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        std::thread::Builder::new()
            .name("joey-shim-log".into())
            .spawn(move || drain(rx, out, d))?;
        Ok(LogWriter { tx, dropped })
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn drain(rx: Receiver<Vec<u8>>, mut out: impl Write, dropped: Arc<AtomicU64>) {
    let mut reported = 0;
    while let Ok(line) = rx.recv() {
        let now = dropped.load(Ordering::Relaxed);
        if now != reported {
            let note = format!(
                "joey shim: {} log lines dropped (the log reader is slow or gone)\n",
                now - reported
            );
            reported = now;
            let _ = out.write_all(note.as_bytes());
        }
        if out.write_all(&line).is_err() {
            // The reader is gone: what follows is dropped too (and counted).
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One event's text, queued when the event is done (dropped).
pub struct Line {
    buf: Vec<u8>,
    writer: LogWriter,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.writer.tx.try_send(std::mem::take(&mut self.buf)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.writer.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::new(),
            writer: self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::time::{Duration, Instant};

    use tracing_subscriber::fmt::MakeWriter as _;

    use super::*;

    fn line(w: &LogWriter, text: &str) {
        let mut l = w.make_writer();
        l.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn an_unread_pipe_drops_lines_without_blocking_and_says_so() {
        let (r, wr) = nix::unistd::pipe().unwrap();
        let w = LogWriter::start(std::fs::File::from(wr), 4).unwrap();
        // 1 KiB lines: the pipe (64 KiB) fills, then the queue, then lines are dropped.
        let text = format!("{}\n", "x".repeat(1023));
        let t0 = Instant::now();
        for _ in 0..1000 {
            line(&w, &text);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "logging blocked: {:?}",
            t0.elapsed()
        );
        let dropped = w.dropped();
        assert!(dropped > 500, "{dropped}");
        // The reader comes back: the queued lines arrive, then the next line after a note.
        let mut r = std::fs::File::from(r);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while !String::from_utf8_lossy(&all).contains("last\n") {
                let n = r.read(&mut buf).unwrap();
                assert!(n > 0, "EOF before the last line");
                all.extend_from_slice(&buf[..n]);
            }
            String::from_utf8(all).unwrap()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        // Sent until it fits in the queue (the thread drains it once the pipe is read).
        let mut attempts = 0;
        loop {
            let before = w.dropped();
            line(&w, "last\n");
            attempts += 1;
            if w.dropped() == before {
                break;
            }
            assert!(Instant::now() < deadline, "the queue never drained");
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = reader.join().unwrap();
        assert!(out.ends_with("\nlast\n"), "{}", &out[out.len() - 200..]);
        // Every dropped line is in a note; every line is either written or dropped.
        let noted: u64 = out
            .lines()
            .filter_map(|l| l.strip_prefix("joey shim: "))
            .map(|l| l.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(noted, w.dropped());
        assert_eq!(out.matches(&text).count() as u64 + noted, 1000 + attempts - 1);
    }
}
