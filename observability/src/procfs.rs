//! Process statistics from `/proc/<pid>/` (CPU time, resident memory, threads, open fds).
//!
//! The readers do small synchronous reads of procfs: call them from a blocking context
//! (`tokio::task::spawn_blocking`), never directly in async code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// One process's resource usage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
}

/// Fields of `/proc/<pid>/stat` that we use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatFields {
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    pub threads: u64,
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted after its last `)`.
pub fn parse_stat(text: &str) -> Result<StatFields, String> {
    let close = text.rfind(')').ok_or("no ')' after the command name")?;
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        rest.get(n - 3)
            .ok_or_else(|| format!("field {n} missing"))?
            .parse::<u64>()
            .map_err(|e| format!("field {n}: {e}"))
    };
    Ok(StatFields {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        threads: field(20)?,
        rss_pages: field(24)?,
    })
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Reads the stats of process `pid`, or of this process when `pid` is `None`. Blocking.
pub fn process_stats(pid: Option<u32>) -> Result<ProcessStats, ProcError> {
    let dir = match pid {
        Some(p) => PathBuf::from(format!("/proc/{p}")),
        None => PathBuf::from("/proc/self"),
    };
    let stat_path = dir.join("stat");
    let text = std::fs::read_to_string(&stat_path).map_err(|source| ProcError::Io {
        path: stat_path.clone(),
        source,
    })?;
    let f = parse_stat(&text).map_err(|reason| ProcError::Parse { path: stat_path, reason })?;
    let fd_dir = dir.join("fd");
    let open_fds = std::fs::read_dir(&fd_dir)
        .map_err(|source| ProcError::Io { path: fd_dir, source })?
        .count() as u64;
    Ok(ProcessStats {
        cpu_seconds: (f.utime_ticks + f.stime_ticks) as f64 / clock_ticks() as f64,
        resident_bytes: f.rss_pages * page_size(),
        threads: f.threads,
        open_fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let line = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 \
                    1000 10000000 321 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let f = parse_stat(line).unwrap();
        assert_eq!(
            f,
            StatFields {
                utime_ticks: 250,
                stime_ticks: 50,
                threads: 7,
                rss_pages: 321
            }
        );
    }

    #[test]
    fn truncated_stat_is_an_error() {
        assert!(parse_stat("1 (x) S 1 2 3").is_err());
        assert!(parse_stat("garbage").is_err());
    }

    #[test]
    fn own_process_is_plausible() {
        let s = process_stats(None).unwrap();
        assert!(s.threads >= 1);
        assert!(s.resident_bytes > 1 << 20);
        assert!(s.open_fds >= 3);
    }
}
