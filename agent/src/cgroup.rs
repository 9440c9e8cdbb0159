//! cgroup v2 groups of containers: `/sys/fs/cgroup/joey/<id>`.
//!
//! The agent mounts cgroup2 at [`CGROUP_ROOT`]. Each container gets its own group below
//! `joey/`; the controllers joey uses (cpu, memory, pids, io, cpuset where the kernel has them)
//! are enabled in the `cgroup.subtree_control` of the parents. Resource limits come from the
//! OCI `LinuxResources` ([`resource_writes`] turns them into file writes, with runc's
//! conversions), the container's first process joins the group from the forked child by writing
//! `0` to `cgroup.procs` (opened here before the fork), and the figures for StatsContainer are
//! parsed from the group's files. Everything here is blocking file I/O on cgroupfs: callers run
//! it on blocking threads.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use joey_agent_protocol::agent::ContainerStats;
use oci_spec::runtime::LinuxResources;

/// Where the agent mounts cgroup2 in the guest.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Parent group of every container's group.
pub const JOEY_GROUP: &str = "joey";
/// Controllers enabled for container groups when the kernel offers them.
pub const CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io", "cpuset"];
/// cgroup v2 filesystem magic (statfs f_type).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Polling step while waiting for a cgroup state change.
const POLL_STEP: Duration = Duration::from_millis(10);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("invalid resources: {0}")]
    InvalidResources(String),
    #[error("invalid resources JSON: {0}")]
    Json(String),
    #[error("cgroup {path}: {what} not reached within {timeout:?}")]
    Timeout {
        path: String,
        what: &'static str,
        timeout: Duration,
    },
    #[error("cgroup {path}: cannot parse {file}: {reason}")]
    Parse {
        path: String,
        file: &'static str,
        reason: String,
    },
}

/// True when `root` is a cgroup2 mount.
pub fn is_cgroup2(root: &Path) -> bool {
    nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// One container's group.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// Enables `wanted` controllers that `dir/cgroup.controllers` lists in `dir/cgroup.subtree_control`,
/// one at a time (a controller the kernel refuses is left out, the others still get enabled).
fn enable_controllers(dir: &Path, wanted: &[&str]) -> Result<Vec<String>, CgroupError> {
    let avail = std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(io_err(dir, "read cgroup.controllers"))?;
    let avail: Vec<&str> = avail.split_whitespace().collect();
    let mut enabled = Vec::new();
    for c in wanted.iter().filter(|c| avail.contains(c)) {
        match std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
            Ok(()) => enabled.push(c.to_string()),
            Err(e) => agent_log!("cgroup {}: cannot enable {c}: {e}", dir.display()),
        }
    }
    Ok(enabled)
}

impl Cgroup {
    /// The group of container `id` below `root` (not created).
    pub fn at(root: &Path, id: &str) -> Cgroup {
        Cgroup {
            path: root.join(JOEY_GROUP).join(id),
        }
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates `root/joey/<id>` with the controllers enabled on the way. An existing empty
    /// group (left by a container that was never removed) is reused.
    pub fn create(root: &Path, id: &str) -> Result<Cgroup, CgroupError> {
        let parent = root.join(JOEY_GROUP);
        enable_controllers(root, CONTROLLERS)?;
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&parent, "mkdir")(e)),
        }
        enable_controllers(&parent, CONTROLLERS)?;
        let cg = Cgroup::at(root, id);
        match std::fs::create_dir(&cg.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !cg.procs()?.is_empty() {
                    return Err(io_err(&cg.path, "create")(io::Error::other(
                        "the group exists and still has processes",
                    )));
                }
            }
            Err(e) => return Err(io_err(&cg.path, "mkdir")(e)),
        }
        Ok(cg)
    }

    fn read(&self, file: &'static str) -> Result<String, CgroupError> {
        std::fs::read_to_string(self.path.join(file)).map_err(io_err(&self.path, file))
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        std::fs::write(self.path.join(file), value).map_err(|source| CgroupError::Io {
            path: self.path.display().to_string(),
            op: "write",
            source: io::Error::new(source.kind(), format!("{file} = {value:?}: {source}")),
        })
    }

    /// `cgroup.procs` opened for writing (close-on-exec), for the child to join with "0".
    pub fn open_procs(&self) -> Result<OwnedFd, CgroupError> {
        let f: File = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.path.join("cgroup.procs"))
            .map_err(io_err(&self.path, "open cgroup.procs"))?;
        Ok(f.into())
    }

    /// Applies `r` (see [`resource_writes`]).
    pub fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        for (file, value) in resource_writes(r)? {
            let p = self.path.join(file);
            if !p.exists() {
                if optional_file(file, &value) {
                    agent_log!("cgroup {}: no {file}, skipping {value:?}", self.path.display());
                    continue;
                }
                return Err(CgroupError::InvalidResources(format!(
                    "{file} is not available in this guest (controller missing), cannot set {value:?}"
                )));
            }
            self.write(file, &value)?;
        }
        Ok(())
    }

    /// Pids in the group, ascending.
    pub fn procs(&self) -> Result<Vec<u32>, CgroupError> {
        let text = self.read("cgroup.procs")?;
        let mut pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// Freezes (or thaws) the group and waits until `cgroup.events` says so.
    pub fn set_frozen(&self, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { 1 } else { 0 };
        let deadline = Instant::now() + timeout;
        loop {
            let events = parse_flat_keyed(&self.read("cgroup.events")?);
            if events.get("frozen") == Some(&want) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Timeout {
                    path: self.path.display().to_string(),
                    what: if frozen { "frozen 1" } else { "frozen 0" },
                    timeout,
                });
            }
            std::thread::sleep(POLL_STEP);
        }
    }

    /// The `oom_kill` count of `memory.events` (0 without the memory controller).
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.path.join("memory.events"))
            .map(|t| parse_flat_keyed(&t).get("oom_kill").copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Figures for StatsContainer. Files of a missing controller read as zero.
    pub fn stats(&self) -> ContainerStats {
        let read = |f: &str| std::fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let value = |f: &str| parse_single(&read(f));
        let cpu = parse_flat_keyed(&read("cpu.stat"));
        let events = parse_flat_keyed(&read("memory.events"));
        let g = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        ContainerStats {
            cpu_usage_usec: g(&cpu, "usage_usec"),
            cpu_user_usec: g(&cpu, "user_usec"),
            cpu_system_usec: g(&cpu, "system_usec"),
            cpu_nr_periods: g(&cpu, "nr_periods"),
            cpu_nr_throttled: g(&cpu, "nr_throttled"),
            cpu_throttled_usec: g(&cpu, "throttled_usec"),
            memory_usage_bytes: value("memory.current"),
            memory_limit_bytes: value("memory.max"),
            memory_swap_usage_bytes: value("memory.swap.current"),
            memory_swap_limit_bytes: value("memory.swap.max"),
            memory_stat: parse_flat_keyed(&read("memory.stat")),
            memory_events_low: g(&events, "low"),
            memory_events_high: g(&events, "high"),
            memory_events_max: g(&events, "max"),
            memory_events_oom: g(&events, "oom"),
            memory_events_oom_kill: g(&events, "oom_kill"),
            pids_current: value("pids.current"),
            pids_limit: value("pids.max"),
            ..Default::default()
        }
    }

    /// Kills every process of the group (`cgroup.kill`, or SIGKILL to each pid), waits until
    /// it is empty and removes it. A group that is already gone is fine.
    pub fn kill_and_remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        // A frozen group would hold SIGKILLed processes until thawed.
        let _ = self.write("cgroup.freeze", "0");
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.procs()?;
            if pids.is_empty() {
                break;
            }
            if self.path.join("cgroup.kill").exists() {
                self.write("cgroup.kill", "1")?;
            } else {
                for pid in &pids {
                    // SAFETY: kill(2) takes no pointers. The pid was listed in the group a moment
                    // ago; the group only holds the container's processes.
                    unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
                }
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Timeout {
                    path: self.path.display().to_string(),
                    what: "an empty cgroup.procs",
                    timeout,
                });
            }
            std::thread::sleep(POLL_STEP);
        }
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                // EBUSY while the last exits are being accounted.
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(POLL_STEP)
                }
                Err(e) => return Err(io_err(&self.path, "rmdir")(e)),
            }
        }
    }
}

/// Files a guest may lack without the limit mattering: no swap means no swap to limit.
fn optional_file(file: &str, _value: &str) -> bool {
    matches!(file, "memory.swap.max")
}

/// Parses a cgroup single-value file; "max" (no limit) is 0.
pub fn parse_single(text: &str) -> u64 {
    match text.trim() {
        "max" => 0,
        v => v.parse().unwrap_or(0),
    }
}

/// Parses a flat keyed file ("key value" lines: cpu.stat, memory.stat, memory.events,
/// cgroup.events). Lines that are not "key number" are skipped.
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// runc's cpu.shares (cgroup v1, 2..262144) to cpu.weight (cgroup v2, 1..10000) conversion.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.saturating_sub(2) * 9999) / 262142
}

/// runc's memory.swap (limit + swap) to memory.swap.max (swap only); `None`: leave unset.
pub fn swap_max(swap: i64, limit: i64) -> Result<Option<String>, CgroupError> {
    if limit == -1 && swap == 0 {
        return Ok(Some("max".into()));
    }
    match swap {
        0 => return Ok(None),
        -1 => return Ok(Some("max".into())),
        s if s < -1 => return Err(CgroupError::InvalidResources(format!("invalid memory.swap {s}"))),
        _ => {}
    }
    if limit == 0 || limit == -1 {
        return Err(CgroupError::InvalidResources(
            "memory.swap needs a memory.limit".into(),
        ));
    }
    if swap < limit {
        return Err(CgroupError::InvalidResources(format!(
            "memory.swap {swap} (memory + swap) is below memory.limit {limit}"
        )));
    }
    Ok(Some((swap - limit).to_string()))
}

fn limit_value(what: &str, v: i64) -> Result<Option<String>, CgroupError> {
    match v {
        0 => Ok(None),
        -1 => Ok(Some("max".into())),
        v if v < -1 => Err(CgroupError::InvalidResources(format!("invalid {what} {v}"))),
        v => Ok(Some(v.to_string())),
    }
}

/// Parses an OCI LinuxResources JSON object (UpdateContainer).
pub fn parse_resources(json: &str) -> Result<LinuxResources, CgroupError> {
    serde_json::from_str(json).map_err(|e| CgroupError::Json(e.to_string()))
}

/// The cgroup v2 file writes for `r`, in order: memory.max, memory.swap.max, memory.low,
/// cpu.weight, cpu.max, cpuset.cpus, cpuset.mems, pids.max. Unset values write nothing.
pub fn resource_writes(r: &LinuxResources) -> Result<Vec<(&'static str, String)>, CgroupError> {
    let mut out = Vec::new();
    if let Some(m) = r.memory() {
        let limit = m.limit().unwrap_or(0);
        if let Some(v) = limit_value("memory.limit", limit)? {
            out.push(("memory.max", v));
        }
        if let Some(v) = swap_max(m.swap().unwrap_or(0), limit)? {
            out.push(("memory.swap.max", v));
        }
        if let Some(v) = limit_value("memory.reservation", m.reservation().unwrap_or(0))? {
            out.push(("memory.low", v));
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares().filter(|s| *s != 0) {
            if !(2..=262144).contains(&shares) {
                return Err(CgroupError::InvalidResources(format!(
                    "cpu.shares {shares} is outside 2..262144"
                )));
            }
            out.push(("cpu.weight", shares_to_weight(shares).to_string()));
        }
        let quota = c.quota().unwrap_or(0);
        let period = c.period().unwrap_or(0);
        if quota != 0 || period != 0 {
            let period = if period == 0 { 100_000 } else { period };
            if !(1000..=1_000_000).contains(&period) {
                return Err(CgroupError::InvalidResources(format!(
                    "cpu.period {period} is outside 1000..1000000"
                )));
            }
            let q = if quota > 0 { quota.to_string() } else { "max".to_string() };
            out.push(("cpu.max", format!("{q} {period}")));
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            check_list("cpu.cpus", cpus)?;
            out.push(("cpuset.cpus", cpus.to_string()));
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            check_list("cpu.mems", mems)?;
            out.push(("cpuset.mems", mems.to_string()));
        }
    }
    if let Some(p) = r.pids() {
        match p.limit() {
            0 => {}
            l if l < 0 => out.push(("pids.max", "max".into())),
            l => out.push(("pids.max", l.to_string())),
        }
    }
    Ok(out)
}

/// A cpuset list like "0-2,4".
fn check_list(what: &str, s: &str) -> Result<(), CgroupError> {
    let ok = s.split(',').all(|part| {
        let mut it = part.splitn(2, '-');
        let a = it.next().map(|x| x.parse::<u32>().is_ok()).unwrap_or(false);
        let b = it.next().map(|x| x.parse::<u32>().is_ok()).unwrap_or(true);
        a && b
    });
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidResources(format!("invalid {what} list {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        parse_resources(json).expect("valid resources")
    }

    #[test]
    fn runc_conversions() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262144), 10000);
        assert_eq!(swap_max(0, 100).unwrap(), None);
        assert_eq!(swap_max(-1, 100).unwrap().as_deref(), Some("max"));
        assert_eq!(swap_max(0, -1).unwrap().as_deref(), Some("max"));
        assert_eq!(swap_max(300, 100).unwrap().as_deref(), Some("200"));
        assert!(swap_max(50, 100).unwrap_err().to_string().contains("below memory.limit 100"));
        assert!(swap_max(300, 0).is_err());
    }

    #[test]
    fn writes_for_a_full_resources_object() {
        let r = res(r#"{"memory":{"limit":67108864,"swap":134217728,"reservation":1048576},
            "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0-1","mems":"0"},
            "pids":{"limit":32}}"#);
        let w = resource_writes(&r).unwrap();
        let expect: Vec<(&str, String)> = vec![
            ("memory.max", "67108864".into()),
            ("memory.swap.max", "67108864".into()),
            ("memory.low", "1048576".into()),
            ("cpu.weight", "39".into()),
            ("cpu.max", "50000 100000".into()),
            ("cpuset.cpus", "0-1".into()),
            ("cpuset.mems", "0".into()),
            ("pids.max", "32".into()),
        ];
        assert_eq!(w, expect);
    }

    #[test]
    fn unlimited_and_unset_values() {
        let w = resource_writes(&res(r#"{"memory":{"limit":-1},"cpu":{"quota":-1},"pids":{"limit":-1}}"#)).unwrap();
        assert_eq!(
            w,
            vec![
                ("memory.max", "max".to_string()),
                ("memory.swap.max", "max".to_string()),
                ("cpu.max", "max 100000".to_string()),
                ("pids.max", "max".to_string()),
            ]
        );
        assert!(resource_writes(&res(r#"{"pids":{"limit":0},"cpu":{}}"#)).unwrap().is_empty());
        let e = resource_writes(&res(r#"{"cpu":{"cpus":"0-x"}}"#)).unwrap_err();
        assert_eq!(e.to_string(), "invalid resources: invalid cpu.cpus list \"0-x\"");
        assert!(resource_writes(&res(r#"{"cpu":{"shares":1}}"#)).is_err());
        assert!(matches!(parse_resources("{\"memory\":3}"), Err(CgroupError::Json(_))));
    }

    #[test]
    fn file_formats() {
        assert_eq!(parse_single("max\n"), 0);
        assert_eq!(parse_single("4096\n"), 4096);
        let m = parse_flat_keyed("usage_usec 120\nuser_usec 100\nsystem_usec 20\nbogus\n");
        assert_eq!(m.len(), 3);
        assert_eq!(m["usage_usec"], 120);
        assert_eq!(parse_flat_keyed("populated 1\nfrozen 0\n")["frozen"], 0);
    }

    #[test]
    fn stats_apply_and_procs_on_a_fake_group() {
        let d = tempfile::tempdir().unwrap();
        let cg = Cgroup::at(d.path(), "c1");
        std::fs::create_dir_all(cg.path()).unwrap();
        let put = |f: &str, v: &str| std::fs::write(cg.path().join(f), v).unwrap();
        put("cpu.stat", "usage_usec 7\nuser_usec 5\nsystem_usec 2\nnr_periods 3\nnr_throttled 1\nthrottled_usec 9\n");
        put("memory.current", "1000\n");
        put("memory.max", "max\n");
        put("memory.stat", "anon 10\nfile 20\n");
        put("memory.events", "low 0\nhigh 1\nmax 2\noom 3\noom_kill 4\n");
        put("pids.current", "2\n");
        put("pids.max", "32\n");
        put("cgroup.procs", "30\n4\n12\n");
        let s = cg.stats();
        assert_eq!((s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec), (7, 5, 2));
        assert_eq!((s.cpu_nr_periods, s.cpu_nr_throttled, s.cpu_throttled_usec), (3, 1, 9));
        assert_eq!((s.memory_usage_bytes, s.memory_limit_bytes, s.memory_swap_limit_bytes), (1000, 0, 0));
        assert_eq!(s.memory_stat.get("file"), Some(&20));
        assert_eq!((s.memory_events_high, s.memory_events_oom_kill), (1, 4));
        assert_eq!((s.pids_current, s.pids_limit), (2, 32));
        assert_eq!(cg.oom_kills(), 4);
        assert_eq!(cg.procs().unwrap(), vec![4, 12, 30]);

        // Only existing files are written; a missing swap file is skipped, a missing pids.max
        // is an error naming the file.
        put("memory.max", "");
        cg.apply(&res(r#"{"memory":{"limit":4096,"swap":8192}}"#)).unwrap();
        assert_eq!(std::fs::read_to_string(cg.path().join("memory.max")).unwrap(), "4096");
        assert!(!cg.path().join("memory.swap.max").exists());
        std::fs::remove_file(cg.path().join("pids.max")).unwrap();
        let e = cg.apply(&res(r#"{"pids":{"limit":5}}"#)).unwrap_err();
        assert!(e.to_string().contains("pids.max"), "{e}");
    }
}
