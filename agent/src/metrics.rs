//! Guest and agent resource usage for `GetGuestMetrics`, read from the guest's /proc at
//! request time: /proc/meminfo, /proc/loadavg, /proc/stat and /proc/self/{stat,fd}.
//!
//! [`collect`] does small synchronous procfs reads: the service runs it with
//! `spawn_blocking`.

use joey_agent_protocol::agent::GuestMetricsResponse;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {reason}")]
    Parse { path: &'static str, reason: String },
}

/// The /proc/meminfo fields we report, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    pub free: u64,
    pub available: u64,
    pub cached: u64,
}

/// Parses /proc/meminfo (values in kB). MemTotal and MemFree are required.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, String> {
    let mut m = MemInfo::default();
    let (mut total, mut free) = (false, false);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        let mut parts = rest.split_whitespace();
        let Some(Ok(v)) = parts.next().map(str::parse::<u64>) else { continue };
        let bytes = match parts.next() {
            Some("kB") => v.saturating_mul(1024),
            None => v,
            Some(u) => return Err(format!("{key}: unknown unit {u:?}")),
        };
        match key {
            "MemTotal" => {
                m.total = bytes;
                total = true;
            }
            "MemFree" => {
                m.free = bytes;
                free = true;
            }
            "MemAvailable" => m.available = bytes,
            "Cached" => m.cached = bytes,
            _ => {}
        }
    }
    if !total || !free {
        return Err("MemTotal or MemFree missing".into());
    }
    Ok(m)
}

/// Parses /proc/loadavg: the 1, 5 and 15 minute load averages.
pub fn parse_loadavg(text: &str) -> Result<(f64, f64, f64), String> {
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .map(|s| s.parse::<f64>().map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match v[..] {
        [a, b, c] => Ok((a, b, c)),
        _ => Err("fewer than 3 fields".into()),
    }
}

/// The aggregate CPU times of /proc/stat in ticks (user, nice, system, idle, iowait, irq,
/// softirq, steal) and the number of `cpuN` lines.
pub fn parse_stat(text: &str) -> Result<([u64; 8], u32), String> {
    let mut total = None;
    let mut cpus = 0u32;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("cpu") => {
                let mut t = [0u64; 8];
                for (i, slot) in t.iter_mut().enumerate() {
                    // Old kernels lack the later columns; missing ones are 0.
                    if let Some(s) = parts.next() {
                        *slot = s.parse().map_err(|e| format!("cpu column {}: {e}", i + 1))?;
                    }
                }
                total = Some(t);
            }
            Some(name) if name.starts_with("cpu") && name[3..].chars().all(|c| c.is_ascii_digit()) => cpus += 1,
            _ => {}
        }
    }
    total.map(|t| (t, cpus)).ok_or_else(|| "no aggregate \"cpu\" line".into())
}

/// (cpu ticks, threads, rss pages) of /proc/self/stat; fields counted after the last ')'.
pub fn parse_self_stat(text: &str) -> Result<(u64, u64, u64), String> {
    let close = text.rfind(')').ok_or("no ')' after the command name")?;
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        rest.get(n - 3)
            .ok_or_else(|| format!("field {n} missing"))?
            .parse::<u64>()
            .map_err(|e| format!("field {n}: {e}"))
    };
    Ok((field(14)? + field(15)?, field(20)?, field(24)?))
}

fn read(path: &'static str) -> Result<String, MetricsError> {
    std::fs::read_to_string(path).map_err(|source| MetricsError::Read { path, source })
}

fn sysconf(name: libc::c_int, default: u64) -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(name) };
    if v > 0 {
        v as u64
    } else {
        default
    }
}

/// Reads everything `GetGuestMetrics` reports. Blocking (procfs reads).
pub fn collect() -> Result<GuestMetricsResponse, MetricsError> {
    let parse = |path: &'static str| move |reason: String| MetricsError::Parse { path, reason };
    let mem = parse_meminfo(&read("/proc/meminfo")?).map_err(parse("/proc/meminfo"))?;
    let (l1, l5, l15) = parse_loadavg(&read("/proc/loadavg")?).map_err(parse("/proc/loadavg"))?;
    let (t, cpus) = parse_stat(&read("/proc/stat")?).map_err(parse("/proc/stat"))?;
    let (self_ticks, threads, rss_pages) =
        parse_self_stat(&read("/proc/self/stat")?).map_err(parse("/proc/self/stat"))?;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map_err(|source| MetricsError::Read {
            path: "/proc/self/fd",
            source,
        })?
        .count();
    let hz = sysconf(libc::_SC_CLK_TCK, 100) as f64;
    let secs = |ticks: u64| ticks as f64 / hz;
    Ok(GuestMetricsResponse {
        mem_total_bytes: mem.total,
        mem_free_bytes: mem.free,
        mem_available_bytes: mem.available,
        mem_cached_bytes: mem.cached,
        load1: l1,
        load5: l5,
        load15: l15,
        cpu_user_seconds: secs(t[0]),
        cpu_nice_seconds: secs(t[1]),
        cpu_system_seconds: secs(t[2]),
        cpu_idle_seconds: secs(t[3]),
        cpu_iowait_seconds: secs(t[4]),
        cpu_irq_seconds: secs(t[5]),
        cpu_softirq_seconds: secs(t[6]),
        cpu_steal_seconds: secs(t[7]),
        cpus,
        agent_cpu_seconds: secs(self_ticks),
        agent_resident_bytes: rss_pages.saturating_mul(sysconf(libc::_SC_PAGESIZE, 4096)),
        agent_threads: u32::try_from(threads).unwrap_or(u32::MAX),
        agent_open_fds: u32::try_from(fds).unwrap_or(u32::MAX),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let t = "MemTotal:         243540 kB\nMemFree:          180000 kB\nMemAvailable:     200000 kB\n\
                 Buffers:               0 kB\nCached:            30000 kB\nSwapCached:            0 kB\nHugePages_Total:       0\n";
        assert_eq!(
            parse_meminfo(t).unwrap(),
            MemInfo {
                total: 243540 * 1024,
                free: 180000 * 1024,
                available: 200000 * 1024,
                cached: 30000 * 1024
            }
        );
        assert!(parse_meminfo("Cached: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: 1 MB\nMemFree: 1 kB\n").is_err());
    }

    #[test]
    fn loadavg() {
        assert_eq!(parse_loadavg("0.52 0.25 0.10 1/80 1234\n").unwrap(), (0.52, 0.25, 0.10));
        assert!(parse_loadavg("0.5\n").is_err());
        assert!(parse_loadavg("a b c\n").is_err());
    }

    #[test]
    fn stat() {
        let t = "cpu  100 2 30 4000 5 6 7 8 0 0\ncpu0 50 1 15 2000 2 3 3 4 0 0\ncpu1 50 1 15 2000 3 3 4 4 0 0\n\
                 intr 1 2 3\nctxt 99\ncpufreq 1\n";
        assert_eq!(parse_stat(t).unwrap(), ([100, 2, 30, 4000, 5, 6, 7, 8], 2));
        assert!(parse_stat("intr 1\n").is_err());
        assert!(parse_stat("cpu x 1\n").is_err());
    }

    #[test]
    fn self_stat() {
        let t = "1 (joey (agent)) S 0 1 1 0 -1 4194560 100 0 0 0 25 5 0 0 20 0 3 0 10 100000 500 1 1";
        assert_eq!(parse_self_stat(t).unwrap(), (30, 3, 500));
    }

    #[test]
    fn collect_on_this_host() {
        let r = collect().unwrap();
        assert!(r.mem_total_bytes > 0 && r.mem_total_bytes >= r.mem_free_bytes);
        assert!(r.cpus >= 1);
        assert!(r.agent_threads >= 1 && r.agent_resident_bytes > 0 && r.agent_open_fds > 0);
    }
}
