//! A console log file of bounded size that keeps the newest output.
//!
//! A guest may write to its console without end (`yes > /dev/console`); the host must not
//! let that fill its disk. [`CappedLog`] appends until the file would exceed its cap, then
//! rewrites it with only the newest half of the cap (the older output is dropped and counted)
//! and appends on: the file never exceeds the cap, always holds at least the newest half of it
//! once it has been reached, and each byte is rewritten at most about once (amortised O(1)).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Smallest accepted cap (a cap of 0 means unlimited).
pub const MIN_CAP: u64 = 4096;

/// Errors of a capped log; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CappedLogError {
    #[error("console log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("console log {path}: cap of {cap} bytes is below the minimum of {MIN_CAP}")]
    CapTooSmall { path: String, cap: u64 },
}

/// A log file capped at `cap` bytes (0: unlimited) that keeps the newest output.
#[derive(Debug)]
pub struct CappedLog {
    file: File,
    path: String,
    cap: u64,
    len: u64,
    dropped: Arc<AtomicU64>,
}

impl CappedLog {
    /// Creates (truncates) `path`, capped at `cap` bytes (0: unlimited).
    pub fn create(path: &Path, cap: u64) -> Result<Self, CappedLogError> {
        let shown = path.display().to_string();
        if cap != 0 && cap < MIN_CAP {
            return Err(CappedLogError::CapTooSmall { path: shown, cap });
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| CappedLogError::Io {
                path: shown.clone(),
                source,
            })?;
        Ok(CappedLog {
            file,
            path: shown,
            cap,
            len: 0,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Bytes dropped to stay under the cap so far (shared: readable from other threads).
    pub fn dropped(&self) -> &Arc<AtomicU64> {
        &self.dropped
    }

    /// The current size of the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is in the file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn io(&self, source: io::Error) -> CappedLogError {
        CappedLogError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends `data`, first dropping the oldest output if the cap would be exceeded.
    pub fn append(&mut self, data: &[u8]) -> Result<(), CappedLogError> {
        let n = data.len() as u64;
        if self.cap == 0 || self.len + n <= self.cap {
            self.file.write_all(data).map_err(|e| self.io(e))?;
            self.len += n;
            return Ok(());
        }
        // Keep the newest half of the cap: the end of the file, then all of `data` (or only the
        // end of `data` when it alone exceeds that).
        let keep = self.cap / 2;
        let from_data = n.min(keep);
        let from_file = (keep - from_data).min(self.len);
        let mut kept = vec![0u8; from_file as usize];
        if from_file > 0 {
            self.file
                .seek(SeekFrom::Start(self.len - from_file))
                .and_then(|_| self.file.read_exact(&mut kept))
                .map_err(|e| self.io(e))?;
        }
        kept.extend_from_slice(&data[(n - from_data) as usize..]);
        self.file
            .set_len(0)
            .and_then(|_| self.file.seek(SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(&kept))
            .map_err(|e| self.io(e))?;
        self.dropped
            .fetch_add(self.len + n - kept.len() as u64, Ordering::Relaxed);
        self.len = kept.len() as u64;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }

    #[test]
    fn keeps_the_newest_output_under_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut log = CappedLog::create(&p, 8192).unwrap();
        // Numbered lines: which ones survive says what was kept.
        let mut all = Vec::new();
        for i in 0..2000u32 {
            let line = format!("line {i:05}\n");
            all.extend_from_slice(line.as_bytes());
            log.append(line.as_bytes()).unwrap();
            assert!(log.len() <= 8192);
            assert_eq!(log.len(), read(&p).len() as u64);
        }
        let got = read(&p);
        assert!(got.len() as u64 >= 4096, "{}", got.len());
        assert!(all.ends_with(&got), "the file is not the newest output");
        assert_eq!(
            log.dropped().load(Ordering::Relaxed),
            (all.len() - got.len()) as u64
        );
    }

    #[test]
    fn a_write_larger_than_the_cap_keeps_its_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut log = CappedLog::create(&p, 4096).unwrap();
        log.append(b"old").unwrap();
        let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        log.append(&big).unwrap();
        assert_eq!(read(&p), &big[big.len() - 2048..]);
        assert_eq!(log.dropped().load(Ordering::Relaxed), 3 + 10_000 - 2048);
        // And it goes on appending after that.
        log.append(b"tail").unwrap();
        assert!(read(&p).ends_with(b"tail"));
    }

    #[test]
    fn unlimited_and_bad_caps() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut log = CappedLog::create(&p, 0).unwrap();
        log.append(&vec![b'x'; 100_000]).unwrap();
        assert_eq!(read(&p).len(), 100_000);
        assert_eq!(log.dropped().load(Ordering::Relaxed), 0);
        assert!(matches!(
            CappedLog::create(&p, 100),
            Err(CappedLogError::CapTooSmall { cap: 100, .. })
        ));
        let e = CappedLog::create(&d.path().join("no/such/dir/log"), 0).unwrap_err();
        assert!(e.to_string().contains("no/such/dir/log"), "{e}");
    }
}
