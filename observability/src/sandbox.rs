//! The metrics of one sandbox, in its own registry: `joey_shim_*` (the runtime process hosting
//! the sandbox), `joey_hypervisor_*` (the VM), and — fetched from the agent at scrape time —
//! `joey_guest_*` and `joey_agent_*`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Counter, CounterVec, Encoder as _, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::procfs::{self, ProcessStats};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("prometheus: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("encoding the exposition: {0}")]
    Encode(String),
}

/// Buckets of `joey_shim_agent_rpc_duration_seconds` (long polls such as WaitProcess land high).
pub const RPC_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// What the agent reports about the guest (`GetGuestMetrics`), protocol-independent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestSample {
    pub mem_total_bytes: u64,
    pub mem_free_bytes: u64,
    pub mem_available_bytes: u64,
    pub mem_cached_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    /// Aggregate CPU time by mode (`user`, `nice`, `system`, `idle`, `iowait`, `irq`,
    /// `softirq`, `steal`), in seconds.
    pub cpu_seconds: Vec<(&'static str, f64)>,
    pub cpus: u32,
    pub agent: ProcessStats,
    /// Every live container's cgroup figures.
    pub containers: Vec<ContainerSample>,
}

/// One container's cgroup figures, as the agent reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSample {
    pub container_id: String,
    /// `memory.current`.
    pub memory_usage_bytes: u64,
    /// `memory.max`; 0 or `u64::MAX` mean no limit (the sample is then left out).
    pub memory_limit_bytes: u64,
    /// `cpu.stat` `usage_usec`.
    pub cpu_usage_usec: u64,
    /// `pids.current`.
    pub pids: u64,
    /// `memory.events` `oom_kill`.
    pub oom_kills: u64,
}

/// The counters of one device of the VM (monotonic since the device was created), read at
/// scrape time. Label values are fixed strings, so the families stay low-cardinality.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// `vsock`, `fs`, `blk` or `net`.
    pub device: &'static str,
    /// Bytes by direction (`to_guest`, `from_guest`).
    pub bytes: Vec<(&'static str, u64)>,
    /// Operations by kind (device specific, a few values).
    pub operations: Vec<(&'static str, u64)>,
    /// Malformed descriptor chains and failed requests.
    pub errors: u64,
    /// Frames dropped by direction (net: a frame larger than the guest's rx buffer, a tap that
    /// refused a frame); empty for devices that never drop.
    pub dropped: Vec<(&'static str, u64)>,
    /// Times the device's rate limiter held a queue back, by direction (`to_guest`,
    /// `from_guest`; blk: `both`); empty for devices without rate limiters.
    pub throttled: Vec<(&'static str, u64)>,
}

/// What the hypervisor counts about the VM, read at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HypervisorCounters {
    pub devices: Vec<DeviceCounters>,
    /// vCPU exits by reason (built-in VMM only; empty for QEMU).
    pub vcpu_exits: Vec<(&'static str, u64)>,
    /// Bytes of guest console output dropped by the console log's cap.
    pub console_dropped_bytes: u64,
}

/// Facts about the VM, known once it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct VmFacts {
    /// `qemu` or `builtin`.
    pub hypervisor: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// From asking for the VM until the agent answered.
    pub start_duration: Duration,
    /// The VMM process when it is not this process (QEMU).
    pub vmm_pid: Option<u32>,
    /// Where the VM came from: `pool` (leased from joey-pool) or `cold` (booted for this
    /// sandbox).
    pub source: String,
}

/// The metrics of one sandbox. Shared (`Arc`) between the actor, the agent client and the
/// metrics endpoint.
pub struct SandboxMetrics {
    registry: Registry,
    shim_cpu: Counter,
    shim_rss: IntGauge,
    shim_fds: IntGauge,
    shim_threads: IntGauge,
    agent_rpc: HistogramVec,
    agent_timeouts: IntCounter,
    agent_errors: IntCounter,
    vm_start: Gauge,
    guest_memory: IntGauge,
    vcpus: IntGauge,
    accel: IntGaugeVec,
    hypervisor: IntGaugeVec,
    vmm_cpu: Counter,
    vmm_rss: IntGauge,
    starts: IntCounterVec,
    /// (last shim CPU seconds, last VMM CPU seconds) folded into the counters.
    last_cpu: Mutex<(f64, f64)>,
    vmm_pid: Mutex<Option<u32>>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> Result<T, MetricsError> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Adds the non-negative difference `now - *last` to `c`.
fn advance(c: &Counter, last: &mut f64, now: f64) {
    if now > *last {
        c.inc_by(now - *last);
        *last = now;
    }
}

impl SandboxMetrics {
    pub fn new() -> Result<SandboxMetrics, MetricsError> {
        let r = Registry::new();
        let m = SandboxMetrics {
            shim_cpu: reg(
                &r,
                Counter::new(
                    "joey_shim_process_cpu_seconds_total",
                    "User and system CPU time of the runtime process hosting the sandbox.",
                )?,
            )?,
            shim_rss: reg(
                &r,
                IntGauge::new(
                    "joey_shim_process_resident_memory_bytes",
                    "Resident memory of the runtime process hosting the sandbox.",
                )?,
            )?,
            shim_fds: reg(
                &r,
                IntGauge::new(
                    "joey_shim_process_open_fds",
                    "Open file descriptors of the runtime process hosting the sandbox.",
                )?,
            )?,
            shim_threads: reg(
                &r,
                IntGauge::new(
                    "joey_shim_process_threads",
                    "Threads of the runtime process hosting the sandbox.",
                )?,
            )?,
            agent_rpc: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "joey_shim_agent_rpc_duration_seconds",
                        "Duration of agent RPCs made by the runtime, by method (long polls included).",
                    )
                    .buckets(RPC_BUCKETS.to_vec()),
                    &["method"],
                )?,
            )?,
            agent_timeouts: reg(
                &r,
                IntCounter::new(
                    "joey_shim_metrics_agent_timeouts_total",
                    "Scrapes whose guest metrics were skipped because the agent did not answer in time.",
                )?,
            )?,
            agent_errors: reg(
                &r,
                IntCounter::new(
                    "joey_shim_metrics_agent_errors_total",
                    "Scrapes whose guest metrics were skipped because the agent call failed.",
                )?,
            )?,
            vm_start: reg(
                &r,
                Gauge::new(
                    "joey_hypervisor_vm_start_duration_seconds",
                    "Time from asking the hypervisor for the VM until the guest agent answered.",
                )?,
            )?,
            guest_memory: reg(
                &r,
                IntGauge::new("joey_hypervisor_guest_memory_bytes", "Memory given to the guest.")?,
            )?,
            vcpus: reg(&r, IntGauge::new("joey_hypervisor_vcpus", "vCPUs given to the guest.")?)?,
            accel: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "joey_hypervisor_accelerator",
                        "The accelerator running the guest: 1 for the one in use (kvm or tcg).",
                    ),
                    &["accel"],
                )?,
            )?,
            hypervisor: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "joey_hypervisor_info",
                        "The hypervisor backend running the guest: 1 for the one in use (qemu or builtin).",
                    ),
                    &["kind"],
                )?,
            )?,
            vmm_cpu: reg(
                &r,
                Counter::new(
                    "joey_hypervisor_process_cpu_seconds_total",
                    "CPU time of the VMM process when it is a separate process (QEMU).",
                )?,
            )?,
            vmm_rss: reg(
                &r,
                IntGauge::new(
                    "joey_hypervisor_process_resident_memory_bytes",
                    "Resident memory of the VMM process when it is a separate process (QEMU).",
                )?,
            )?,
            starts: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "joey_sandbox_starts_total",
                        "Sandbox VMs started, by source: pool (leased from joey-pool) or cold (booted).",
                    ),
                    &["source"],
                )?,
            )?,
            registry: r,
            last_cpu: Mutex::new((0.0, 0.0)),
            vmm_pid: Mutex::new(None),
        };
        Ok(m)
    }

    /// The RPC latency histogram, for the agent client to time its calls with.
    pub fn agent_rpc_histogram(&self) -> HistogramVec {
        self.agent_rpc.clone()
    }

    /// Adds a collector defined elsewhere (the shim's task-service metrics) to this registry.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> Result<(), MetricsError> {
        self.registry.register(c)?;
        Ok(())
    }

    /// Records the VM's facts once it runs.
    pub fn set_vm(&self, f: &VmFacts) {
        self.vm_start.set(f.start_duration.as_secs_f64());
        self.guest_memory.set(f.memory_bytes.min(i64::MAX as u64) as i64);
        self.vcpus.set(f.vcpus as i64);
        self.accel.reset();
        self.accel.with_label_values(&[f.accel.as_str()]).set(1);
        self.hypervisor.reset();
        self.hypervisor.with_label_values(&[f.hypervisor.as_str()]).set(1);
        self.starts.with_label_values(&[f.source.as_str()]).inc();
        if let Ok(mut p) = self.vmm_pid.lock() {
            *p = f.vmm_pid;
        }
    }

    pub fn agent_timed_out(&self) {
        self.agent_timeouts.inc();
    }

    pub fn agent_failed(&self) {
        self.agent_errors.inc();
    }

    /// Re-reads this process's (and the VMM process's) stats from /proc. Blocking: call it
    /// from `spawn_blocking`.
    pub fn refresh_processes(&self) {
        let mut last = match self.last_cpu.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match procfs::process_stats(None) {
            Ok(s) => {
                advance(&self.shim_cpu, &mut last.0, s.cpu_seconds);
                self.shim_rss.set(s.resident_bytes as i64);
                self.shim_fds.set(s.open_fds as i64);
                self.shim_threads.set(s.threads as i64);
            }
            Err(e) => tracing::debug!(error = %e, "reading our own process stats"),
        }
        let pid = self.vmm_pid.lock().ok().and_then(|p| *p);
        if let Some(pid) = pid {
            match procfs::process_stats(Some(pid)) {
                Ok(s) => {
                    advance(&self.vmm_cpu, &mut last.1, s.cpu_seconds);
                    self.vmm_rss.set(s.resident_bytes as i64);
                }
                Err(e) => tracing::debug!(error = %e, pid, "reading the VMM process stats"),
            }
        }
    }

    /// The exposition: this registry, plus the guest families when `guest` is given and the
    /// device and vCPU counters when `hypervisor` is given.
    pub fn render(
        &self,
        guest: Option<&GuestSample>,
        hypervisor: Option<&HypervisorCounters>,
    ) -> Result<String, MetricsError> {
        let mut families = self.registry.gather();
        if let Some(h) = hypervisor {
            families.extend(hypervisor_registry(h)?.gather());
        }
        if let Some(g) = guest {
            families.extend(guest_registry(g)?.gather());
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .map_err(|e| MetricsError::Encode(e.to_string()))?;
        String::from_utf8(out).map_err(|e| MetricsError::Encode(e.to_string()))
    }
}

/// A throwaway registry holding the device and vCPU counters.
fn hypervisor_registry(h: &HypervisorCounters) -> Result<Registry, MetricsError> {
    let r = Registry::new();
    let bytes = IntCounterVec::new(
        Opts::new(
            "joey_hypervisor_device_bytes_total",
            "Bytes moved by the VM's virtio devices, by device and direction (to_guest, from_guest).",
        ),
        &["device", "direction"],
    )?;
    let ops = IntCounterVec::new(
        Opts::new(
            "joey_hypervisor_device_operations_total",
            "Operations of the VM's virtio devices (packets, requests), by device and operation.",
        ),
        &["device", "op"],
    )?;
    let errors = IntCounterVec::new(
        Opts::new(
            "joey_hypervisor_device_errors_total",
            "Malformed descriptor chains and failed requests of the VM's virtio devices.",
        ),
        &["device"],
    )?;
    let dropped = IntCounterVec::new(
        Opts::new(
            "joey_hypervisor_device_dropped_total",
            "Frames dropped by the VM's virtio devices, by device and direction (to_guest, from_guest).",
        ),
        &["device", "direction"],
    )?;
    let throttled = IntCounterVec::new(
        Opts::new(
            "joey_hypervisor_device_rate_limiter_throttled_total",
            "Times a rate limiter of the VM's virtio devices ([hypervisor.rate_limits]) held a queue back, by device and direction (to_guest, from_guest; blk: both).",
        ),
        &["device", "direction"],
    )?;
    for d in &h.devices {
        for (dir, n) in &d.bytes {
            bytes.with_label_values(&[d.device, dir]).inc_by(*n);
        }
        for (dir, n) in &d.dropped {
            dropped.with_label_values(&[d.device, dir]).inc_by(*n);
        }
        for (dir, n) in &d.throttled {
            throttled.with_label_values(&[d.device, dir]).inc_by(*n);
        }
        for (op, n) in &d.operations {
            ops.with_label_values(&[d.device, op]).inc_by(*n);
        }
        errors.with_label_values(&[d.device]).inc_by(d.errors);
    }
    r.register(Box::new(bytes))?;
    r.register(Box::new(ops))?;
    r.register(Box::new(errors))?;
    r.register(Box::new(dropped))?;
    r.register(Box::new(throttled))?;
    let exits = IntCounterVec::new(
        Opts::new(
            "joey_hypervisor_vcpu_exits_total",
            "vCPU exits of the built-in VMM, all vCPUs together, by reason.",
        ),
        &["reason"],
    )?;
    for (reason, n) in &h.vcpu_exits {
        exits.with_label_values(&[reason]).inc_by(*n);
    }
    r.register(Box::new(exits))?;
    let console = IntCounter::new(
        "joey_hypervisor_console_dropped_bytes_total",
        "Bytes of guest console output dropped to keep the console log under hypervisor.console_log_max_kib (the newest output is kept).",
    )?;
    console.inc_by(h.console_dropped_bytes);
    r.register(Box::new(console))?;
    Ok(r)
}

/// Adds the per-container families to `r`.
fn register_containers(r: &Registry, containers: &[ContainerSample]) -> Result<(), MetricsError> {
    let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["container_id"]);
    let counter = |name: &str, help: &str| CounterVec::new(Opts::new(name, help), &["container_id"]);
    let mem = gauge(
        "joey_guest_container_memory_usage_bytes",
        "Memory used by the container's cgroup (memory.current).",
    )?;
    let limit = gauge(
        "joey_guest_container_memory_limit_bytes",
        "Memory limit of the container's cgroup (memory.max); absent when unlimited.",
    )?;
    let cpu = counter(
        "joey_guest_container_cpu_seconds_total",
        "CPU time of the container's cgroup (cpu.stat usage_usec).",
    )?;
    let pids = gauge("joey_guest_container_pids", "Processes in the container's cgroup (pids.current).")?;
    let ooms = counter(
        "joey_guest_container_oom_kills_total",
        "Processes of the container OOM-killed (memory.events oom_kill).",
    )?;
    for c in containers {
        let id = [c.container_id.as_str()];
        mem.with_label_values(&id).set(c.memory_usage_bytes as f64);
        if c.memory_limit_bytes != 0 && c.memory_limit_bytes != u64::MAX {
            limit.with_label_values(&id).set(c.memory_limit_bytes as f64);
        }
        cpu.with_label_values(&id).inc_by(c.cpu_usage_usec as f64 / 1e6);
        pids.with_label_values(&id).set(c.pids as f64);
        ooms.with_label_values(&id).inc_by(c.oom_kills as f64);
    }
    for c in [mem, limit, pids] {
        r.register(Box::new(c))?;
    }
    for c in [cpu, ooms] {
        r.register(Box::new(c))?;
    }
    Ok(())
}

/// A throwaway registry holding one guest sample.
fn guest_registry(g: &GuestSample) -> Result<Registry, MetricsError> {
    let r = Registry::new();
    let gauge = |name: &str, help: &str, v: f64| -> Result<(), MetricsError> {
        let m = Gauge::new(name, help)?;
        m.set(v);
        r.register(Box::new(m))?;
        Ok(())
    };
    let counter = |name: &str, help: &str, v: f64| -> Result<(), MetricsError> {
        let m = Counter::new(name, help)?;
        m.inc_by(v.max(0.0));
        r.register(Box::new(m))?;
        Ok(())
    };
    let b = |v: u64| v as f64;
    gauge("joey_guest_memory_total_bytes", "Guest MemTotal (/proc/meminfo).", b(g.mem_total_bytes))?;
    gauge("joey_guest_memory_free_bytes", "Guest MemFree (/proc/meminfo).", b(g.mem_free_bytes))?;
    gauge(
        "joey_guest_memory_available_bytes",
        "Guest MemAvailable (/proc/meminfo).",
        b(g.mem_available_bytes),
    )?;
    gauge("joey_guest_memory_cached_bytes", "Guest Cached (/proc/meminfo).", b(g.mem_cached_bytes))?;
    gauge(
        "joey_guest_memory_used_bytes",
        "Guest memory in use: MemTotal - MemAvailable.",
        b(g.mem_total_bytes.saturating_sub(g.mem_available_bytes)),
    )?;
    gauge("joey_guest_load1", "Guest 1-minute load average.", g.load1)?;
    gauge("joey_guest_load5", "Guest 5-minute load average.", g.load5)?;
    gauge("joey_guest_load15", "Guest 15-minute load average.", g.load15)?;
    gauge("joey_guest_cpus", "Online guest CPUs.", g.cpus as f64)?;
    let cpu = CounterVec::new(
        Opts::new("joey_guest_cpu_seconds_total", "Guest CPU time by mode (/proc/stat), all CPUs together."),
        &["mode"],
    )?;
    for (mode, secs) in &g.cpu_seconds {
        cpu.with_label_values(&[mode]).inc_by(secs.max(0.0));
    }
    r.register(Box::new(cpu))?;
    counter(
        "joey_agent_process_cpu_seconds_total",
        "User and system CPU time of the guest agent.",
        g.agent.cpu_seconds,
    )?;
    gauge(
        "joey_agent_process_resident_memory_bytes",
        "Resident memory of the guest agent.",
        b(g.agent.resident_bytes),
    )?;
    gauge("joey_agent_process_threads", "Threads of the guest agent.", b(g.agent.threads))?;
    gauge("joey_agent_process_open_fds", "Open file descriptors of the guest agent.", b(g.agent.open_fds))?;
    register_containers(&r, &g.containers)?;
    Ok(r)
}

/// Every metric name a sandbox endpoint exposes with a reachable agent (histograms by family).
pub const SANDBOX_METRIC_NAMES: &[&str] = &[
    "joey_shim_process_cpu_seconds_total",
    "joey_shim_process_resident_memory_bytes",
    "joey_shim_process_open_fds",
    "joey_shim_process_threads",
    "joey_shim_agent_rpc_duration_seconds",
    "joey_shim_metrics_agent_timeouts_total",
    "joey_shim_metrics_agent_errors_total",
    "joey_hypervisor_vm_start_duration_seconds",
    "joey_hypervisor_guest_memory_bytes",
    "joey_hypervisor_vcpus",
    "joey_hypervisor_accelerator",
    "joey_hypervisor_info",
    "joey_hypervisor_process_cpu_seconds_total",
    "joey_hypervisor_process_resident_memory_bytes",
    "joey_sandbox_starts_total",
    "joey_hypervisor_device_bytes_total",
    "joey_hypervisor_device_operations_total",
    "joey_hypervisor_device_errors_total",
    "joey_hypervisor_device_dropped_total",
    "joey_hypervisor_device_rate_limiter_throttled_total",
    "joey_hypervisor_vcpu_exits_total",
    "joey_hypervisor_console_dropped_bytes_total",
    "joey_guest_memory_total_bytes",
    "joey_guest_memory_free_bytes",
    "joey_guest_memory_available_bytes",
    "joey_guest_memory_cached_bytes",
    "joey_guest_memory_used_bytes",
    "joey_guest_load1",
    "joey_guest_load5",
    "joey_guest_load15",
    "joey_guest_cpus",
    "joey_guest_cpu_seconds_total",
    "joey_agent_process_cpu_seconds_total",
    "joey_agent_process_resident_memory_bytes",
    "joey_agent_process_threads",
    "joey_agent_process_open_fds",
    "joey_guest_container_memory_usage_bytes",
    "joey_guest_container_memory_limit_bytes",
    "joey_guest_container_cpu_seconds_total",
    "joey_guest_container_pids",
    "joey_guest_container_oom_kills_total",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expo;

    fn sample() -> GuestSample {
        GuestSample {
            mem_total_bytes: 256 << 20,
            mem_free_bytes: 100 << 20,
            mem_available_bytes: 200 << 20,
            mem_cached_bytes: 10 << 20,
            load1: 0.5,
            load5: 0.25,
            load15: 0.1,
            cpu_seconds: vec![("user", 1.5), ("idle", 10.0)],
            cpus: 1,
            agent: ProcessStats {
                cpu_seconds: 0.2,
                resident_bytes: 4 << 20,
                threads: 4,
                open_fds: 9,
            },
            containers: vec![
                ContainerSample {
                    container_id: "web".into(),
                    memory_usage_bytes: 3 << 20,
                    memory_limit_bytes: 64 << 20,
                    cpu_usage_usec: 2_500_000,
                    pids: 3,
                    oom_kills: 1,
                },
                ContainerSample {
                    container_id: "db".into(),
                    memory_usage_bytes: 5 << 20,
                    memory_limit_bytes: u64::MAX,
                    cpu_usage_usec: 250,
                    pids: 1,
                    oom_kills: 0,
                },
            ],
        }
    }

    fn counters() -> HypervisorCounters {
        HypervisorCounters {
            devices: vec![
                DeviceCounters {
                    device: "vsock",
                    bytes: vec![("to_guest", 1000), ("from_guest", 200)],
                    operations: vec![("rx", 7), ("tx", 5)],
                    errors: 0,
                    dropped: vec![],
                    throttled: vec![("to_guest", 0), ("from_guest", 9)],
                },
                DeviceCounters {
                    device: "fs",
                    bytes: vec![("to_guest", 4096), ("from_guest", 80)],
                    operations: vec![("read", 2), ("lookup", 1)],
                    errors: 2,
                    dropped: vec![],
                    throttled: vec![],
                },
                DeviceCounters {
                    device: "net",
                    bytes: vec![("to_guest", 1514), ("from_guest", 98)],
                    operations: vec![("rx", 1), ("tx", 1)],
                    errors: 0,
                    dropped: vec![("to_guest", 3), ("from_guest", 0)],
                    throttled: vec![("to_guest", 4), ("from_guest", 0)],
                },
            ],
            vcpu_exits: vec![("io_out", 42), ("hlt", 0)],
            console_dropped_bytes: 4096,
        }
    }

    fn names(text: &str) -> Vec<String> {
        expo::parse(text, None).unwrap().into_iter().map(|f| f.name).collect()
    }

    #[test]
    fn every_family_is_rendered_with_a_guest_sample() {
        let m = SandboxMetrics::new().unwrap();
        m.set_vm(&VmFacts {
            hypervisor: "qemu".into(),
            accel: "tcg".into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            start_duration: Duration::from_millis(1500),
            vmm_pid: Some(std::process::id()),
            source: "pool".into(),
        });
        m.agent_rpc_histogram().with_label_values(&["Check"]).observe(0.001);
        m.refresh_processes();
        m.refresh_processes();
        let text = m.render(Some(&sample()), Some(&counters())).unwrap();
        let mut got = names(&text);
        got.sort();
        let mut want: Vec<String> = SANDBOX_METRIC_NAMES.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "{text}");
        assert!(text.contains("joey_hypervisor_accelerator{accel=\"tcg\"} 1"), "{text}");
        assert!(text.contains("joey_guest_memory_used_bytes 58720256"), "{text}");
        assert!(text.contains("joey_guest_cpu_seconds_total{mode=\"user\"} 1.5"), "{text}");
        assert!(text.contains("joey_hypervisor_vm_start_duration_seconds 1.5"), "{text}");
        assert!(text.contains("joey_sandbox_starts_total{source=\"pool\"} 1"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "joey_hypervisor_device_bytes_total{device=\"vsock\",direction=\"to_guest\"} 1000",
            "joey_hypervisor_device_bytes_total{device=\"fs\",direction=\"from_guest\"} 80",
            "joey_hypervisor_device_operations_total{device=\"vsock\",op=\"tx\"} 5",
            "joey_hypervisor_device_operations_total{device=\"fs\",op=\"read\"} 2",
            "joey_hypervisor_device_errors_total{device=\"fs\"} 2",
            "joey_hypervisor_device_dropped_total{device=\"net\",direction=\"to_guest\"} 3",
            "joey_hypervisor_device_rate_limiter_throttled_total{device=\"vsock\",direction=\"from_guest\"} 9",
            "joey_hypervisor_device_rate_limiter_throttled_total{device=\"net\",direction=\"to_guest\"} 4",
            "joey_hypervisor_device_bytes_total{device=\"net\",direction=\"to_guest\"} 1514",
            "joey_hypervisor_device_errors_total{device=\"vsock\"} 0",
            "joey_hypervisor_vcpu_exits_total{reason=\"io_out\"} 42",
            "joey_hypervisor_console_dropped_bytes_total 4096",
            "joey_hypervisor_vcpu_exits_total{reason=\"hlt\"} 0",
            "joey_guest_container_memory_usage_bytes{container_id=\"web\"} 3145728",
            "joey_guest_container_memory_usage_bytes{container_id=\"db\"} 5242880",
            "joey_guest_container_memory_limit_bytes{container_id=\"web\"} 67108864",
            "joey_guest_container_cpu_seconds_total{container_id=\"web\"} 2.5",
            "joey_guest_container_cpu_seconds_total{container_id=\"db\"} 0.00025",
            "joey_guest_container_pids{container_id=\"web\"} 3",
            "joey_guest_container_oom_kills_total{container_id=\"web\"} 1",
            "joey_guest_container_oom_kills_total{container_id=\"db\"} 0",
            "# TYPE joey_guest_container_cpu_seconds_total counter",
            "# TYPE joey_guest_container_memory_usage_bytes gauge",
            "# TYPE joey_hypervisor_vcpu_exits_total counter",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in:\n{text}");
        }
        // An unlimited container has no limit sample.
        assert!(!text.contains("joey_guest_container_memory_limit_bytes{container_id=\"db\"}"), "{text}");
    }

    #[test]
    fn without_containers_or_counters_their_families_are_absent() {
        let m = SandboxMetrics::new().unwrap();
        let g = GuestSample {
            containers: Vec::new(),
            ..sample()
        };
        let text = m.render(Some(&g), None).unwrap();
        assert!(text.contains("joey_guest_memory_total_bytes"), "{text}");
        assert!(!text.contains("joey_guest_container_"), "{text}");
        assert!(!text.contains("joey_hypervisor_device_"), "{text}");
        assert!(!text.contains("joey_hypervisor_vcpu_exits_total"), "{text}");
        // QEMU: device counters but no vCPU exits.
        let h = HypervisorCounters {
            vcpu_exits: Vec::new(),
            ..counters()
        };
        let text = m.render(None, Some(&h)).unwrap();
        assert!(text.contains("joey_hypervisor_device_errors_total{device=\"vsock\"} 0"), "{text}");
        assert!(!text.contains("joey_hypervisor_vcpu_exits_total"), "{text}");
    }

    /// Every family a sandbox endpoint or the monitor can emit is documented in docs/metrics.md
    /// (in a table row of its own, with its type).
    #[test]
    fn every_family_is_documented() {
        let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"));
        let m = SandboxMetrics::new().unwrap();
        m.agent_rpc_histogram().with_label_values(&["Check"]).observe(0.001);
        let text = m.render(Some(&sample()), Some(&counters())).unwrap();
        let mut families = expo::parse(&text, None).unwrap();
        families.extend(expo::parse(&crate::monitor::Monitor::render_own_for_docs(), None).unwrap());
        assert!(families.len() > SANDBOX_METRIC_NAMES.len(), "{families:?}");
        for f in families {
            let kind = f.kind.clone().unwrap();
            let row = doc
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&format!("`{}`", f.name)))
                .unwrap_or_else(|| panic!("{} is not in a table row of docs/metrics.md", f.name));
            assert!(row.contains(&format!("| {kind} |")), "{} documented without its type {kind}: {row}", f.name);
        }
    }

    #[test]
    fn without_guest_sample_the_guest_families_are_skipped() {
        let m = SandboxMetrics::new().unwrap();
        m.agent_timed_out();
        let text = m.render(None, None).unwrap();
        assert!(!text.contains("joey_guest_"));
        assert!(!text.contains("joey_agent_"));
        assert!(text.contains("joey_shim_metrics_agent_timeouts_total 1"));
    }
}
