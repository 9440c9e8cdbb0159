//! Configuration for the joey runtime.
//!
//! The configuration is a TOML file. Every key is optional: missing keys take
//! the compiled-in defaults (see the `Default` impls). Unknown keys are errors
//! (`deny_unknown_fields` on every table), so a typo never goes unnoticed.
//!
//! Where the file comes from: see [`Config::load`] and `docs/config.md`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

mod annotations;
pub use annotations::{AnnotationError, ANNOTATION_PREFIX, NEVER_OVERRIDABLE};
pub mod rate_limits;
pub use rate_limits::{LimitConfig, RateLimitsConfig, RxTxLimits};
pub mod debug;
pub use debug::DebugConfig;

/// Config file read when neither `--config` nor `$JOEY_CONFIG` is given (if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/joey/config.toml";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "JOEY_CONFIG";

/// Origin used in errors when the config is the built-in defaults.
const ORIGIN_DEFAULTS: &str = "<defaults>";

/// Allowed values of `runtime.log_level`.
const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub agent: AgentConfig,
    pub runtime: RuntimeConfig,
    pub metrics: MetricsConfig,
    pub pool: PoolConfig,
    pub security: SecurityConfig,
    pub debug: DebugConfig,
}

/// Which VMM runs the sandbox microVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// Pick automatically.
    #[default]
    Auto,
    /// External QEMU process.
    Qemu,
    /// The built-in VMM (`joey-vmm-core`).
    Builtin,
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorKind::Auto => "auto",
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Builtin => "builtin",
        })
    }
}

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// `[hypervisor]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    pub kind: HypervisorKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    #[serde(serialize_with = "ser_path")]
    pub kernel: PathBuf,
    #[serde(serialize_with = "ser_path")]
    pub initrd: PathBuf,
    pub kernel_params: String,
    /// Cap of the guest console log on the host, in KiB; the newest output is kept (0:
    /// unlimited).
    pub console_log_max_kib: u32,
    /// Device rate limits (`[hypervisor.rate_limits]`).
    pub rate_limits: RateLimitsConfig,
    pub qemu: QemuConfig,
    pub builtin: BuiltinConfig,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            kind: HypervisorKind::Auto,
            vcpus: 1,
            memory_mib: 256,
            // The ELF vmlinux: QEMU boots it through its PVH entry (no decompression,
            // ~135 ms less under TCG than the bzImage; docs/performance.md).
            kernel: PathBuf::from("/usr/share/joey/guest/vmlinux"),
            initrd: PathBuf::from("/usr/share/joey/guest/initrd.img"),
            kernel_params: String::new(),
            console_log_max_kib: 1024,
            rate_limits: RateLimitsConfig::default(),
            qemu: QemuConfig::default(),
            builtin: BuiltinConfig::default(),
        }
    }
}

/// `[hypervisor.qemu]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// Looked up in `PATH` when not absolute.
    #[serde(serialize_with = "ser_path")]
    pub binary: PathBuf,
    pub accel: Accel,
    /// Under TCG: the size of QEMU's translated-code cache in MiB (`-accel tcg,tb-size=`); 0:
    /// QEMU's default. 16 keeps an idle VM's QEMU ~17 MiB smaller than the default at no
    /// measurable cost in boot time (docs/performance.md).
    pub tcg_tb_size_mib: u32,
}

/// Largest `hypervisor.qemu.tcg_tb_size_mib`.
pub const MAX_TCG_TB_SIZE_MIB: u32 = 4096;

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            tcg_tb_size_mib: 16,
        }
    }
}

/// `[hypervisor.builtin]`: the built-in VMM (`joey-vmm-core`) boots an ELF `vmlinux`
/// (64-bit entry), not the `bzImage` QEMU loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuiltinConfig {
    /// Uncompressed ELF guest kernel.
    #[serde(serialize_with = "ser_path")]
    pub kernel: PathBuf,
}

impl Default for BuiltinConfig {
    fn default() -> Self {
        BuiltinConfig {
            kernel: PathBuf::from("/usr/share/joey/guest/vmlinux"),
        }
    }
}

/// `[agent]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub vsock_port: u32,
    /// VM start -> agent answers Check.
    pub ready_timeout_ms: u64,
    /// Per agent RPC that is not a long wait.
    pub rpc_timeout_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            vsock_port: 1024,
            ready_timeout_ms: 30_000,
            rpc_timeout_ms: 10_000,
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Per-sandbox directories live under it.
    #[serde(serialize_with = "ser_path")]
    pub state_dir: PathBuf,
    /// How long the agent's DestroySandbox (kill what runs, sync) may take; the VM is stopped
    /// right after (QMP quit, then SIGKILL).
    pub shutdown_timeout_ms: u64,
    /// error | warn | info | debug | trace
    pub log_level: String,
    /// Config keys that `io.joey.config.<key>` annotations may override per sandbox.
    pub enable_annotations: Vec<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            state_dir: PathBuf::from("/run/joey"),
            shutdown_timeout_ms: 5_000,
            log_level: "warn".to_string(),
            enable_annotations: annotations::default_enabled(),
        }
    }
}

/// Largest accepted metrics timeout (`metrics.*_timeout_ms`), in milliseconds.
pub const MAX_METRICS_TIMEOUT_MS: u64 = 60_000;

/// `[metrics]`: the per-sandbox endpoint and joey-monitor (docs/metrics.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// How long a scrape of a sandbox's endpoint waits for the agent's guest metrics before
    /// it skips them (the endpoint answers 503 if the sandbox itself does not answer within
    /// this plus 300 ms).
    pub agent_timeout_ms: u64,
    /// joey-monitor: how long each scrape waits for every sandbox.
    pub monitor_scrape_timeout_ms: u64,
    /// joey-monitor: the address it serves `/metrics` on.
    pub monitor_listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            agent_timeout_ms: 500,
            monitor_scrape_timeout_ms: 1_000,
            monitor_listen: "127.0.0.1:8090".to_string(),
        }
    }
}

impl MetricsConfig {
    /// `metrics.agent_timeout_ms`.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.agent_timeout_ms)
    }

    /// How long the endpoint waits for the sandbox to answer a scrape: the agent timeout
    /// plus 300 ms.
    pub fn reply_timeout(&self) -> Duration {
        self.agent_timeout() + Duration::from_millis(300)
    }

    /// `metrics.monitor_scrape_timeout_ms`.
    pub fn monitor_scrape_timeout(&self) -> Duration {
        Duration::from_millis(self.monitor_scrape_timeout_ms)
    }

    /// `metrics.monitor_listen` as a socket address.
    pub fn monitor_listen_addr(&self) -> Result<SocketAddr, String> {
        self.monitor_listen
            .parse()
            .map_err(|_| format!("{:?} is not an IP address and port (like 127.0.0.1:8090)", self.monitor_listen))
    }
}

/// Most VMs `pool.size` may keep booted.
pub const MAX_POOL_SIZE: u32 = 64;

/// `[pool]`: the warm VM pool kept by `joey-pool` and leased by joeyctl and the shim
/// (docs/pool.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// VMs kept booted (agent answered) per VM shape; 0: no pool (joeyctl and the shim always
    /// boot cold, `joey-pool` refuses to start).
    pub size: u32,
}

/// `security.seccomp`: what a system call outside a thread's seccomp allowlist does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// The process dies of SIGSYS (`SECCOMP_RET_KILL_PROCESS`).
    #[default]
    Kill,
    /// SIGSYS to the thread: the call is logged, counted and fails with EPERM.
    Trap,
    /// No filters (debugging only).
    Off,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Trap => "trap",
            SeccompMode::Off => "off",
        })
    }
}

/// `[security]`: host-side confinement of the runtime and QEMU (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Seccomp filters on every thread of the shim and `joeyctl run` (and so of QEMU).
    pub seccomp: SeccompMode,
}

/// Checks a metrics timeout: in 1..=[`MAX_METRICS_TIMEOUT_MS`]; the message names no key.
pub fn check_metrics_timeout_ms(ms: u64) -> Result<(), String> {
    if ms == 0 || ms > MAX_METRICS_TIMEOUT_MS {
        Err(format!("{ms} is out of range (valid: 1..={MAX_METRICS_TIMEOUT_MS} ms)"))
    } else {
        Ok(())
    }
}

/// Paths are written as (lossy) UTF-8 strings so that `to_toml_string` never fails.
fn ser_path<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Config errors. Every variant displays as a single line.
///
/// `path` in `Parse`/`Invalid`/`MissingFile` is the config file path, or
/// `"<defaults>"` / `"<string>"` when the config did not come from a file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: invalid value for `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
    #[error("{path}: `{key}` points to {}, which does not exist", file.display())]
    MissingFile {
        path: String,
        key: String,
        file: PathBuf,
    },
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl Config {
    /// Explicit path (from `--config`) wins, else `$JOEY_CONFIG` (if set and
    /// non-empty), else [`DEFAULT_CONFIG_PATH`] if it exists, else the built-in
    /// defaults.
    ///
    /// Returns the config and the file it came from (`None` = built-in
    /// defaults). A file given explicitly (flag or env) that does not exist is
    /// an error ([`ConfigError::Read`]).
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let env = std::env::var_os(CONFIG_ENV);
        load_with(
            explicit,
            env.as_deref().map(Path::new),
            Path::new(DEFAULT_CONFIG_PATH),
        )
    }

    /// Parses TOML text and validates it. `origin` names the source in errors
    /// (a file path, or `"<string>"`).
    pub fn from_toml_str(s: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(s).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: flatten_toml_error(&e, s),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads, parses and validates one file.
    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text, &path.display().to_string())
    }

    /// Range checks; the first bad value is returned as [`ConfigError::Invalid`].
    ///
    /// - `hypervisor.vcpus` in 1..=64
    /// - `hypervisor.memory_mib` in 64..=65536
    /// - `hypervisor.console_log_max_kib` 0 (unlimited) or 4..=1048576
    /// - `hypervisor.rate_limits.*`: see [`RateLimitsConfig::check`]
    /// - `hypervisor.kernel`, `hypervisor.initrd`, `hypervisor.qemu.binary`,
    ///   `hypervisor.builtin.kernel` not empty
    /// - `agent.vsock_port` in 1024..=4294967294 (below 1024 is privileged,
    ///   4294967295 is VMADDR_PORT_ANY)
    /// - `agent.ready_timeout_ms`, `agent.rpc_timeout_ms`,
    ///   `runtime.shutdown_timeout_ms` > 0
    /// - `runtime.state_dir` absolute
    /// - `runtime.log_level` one of error|warn|info|debug|trace
    /// - `metrics.agent_timeout_ms`, `metrics.monitor_scrape_timeout_ms` in 1..=60000
    /// - `metrics.monitor_listen` an IP address and port
    /// - `pool.size` in 0..=[`MAX_POOL_SIZE`]
    /// - `runtime.enable_annotations` only scalar keys that are not paths
    /// - `debug.failpoints` `<area>::<point>=<action>[;...]` (see [`debug::parse_failpoints`])
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            key: key.to_string(),
            message,
        };
        let h = &self.hypervisor;
        if !(1..=64).contains(&h.vcpus) {
            return Err(invalid(
                "hypervisor.vcpus",
                format!("{} is out of range (valid: 1..=64)", h.vcpus),
            ));
        }
        if !(64..=65536).contains(&h.memory_mib) {
            return Err(invalid(
                "hypervisor.memory_mib",
                format!("{} is out of range (valid: 64..=65536)", h.memory_mib),
            ));
        }
        if h.console_log_max_kib != 0 && !(4..=1_048_576).contains(&h.console_log_max_kib) {
            return Err(invalid(
                "hypervisor.console_log_max_kib",
                format!(
                    "{} is out of range (valid: 0 for unlimited, or 4..=1048576)",
                    h.console_log_max_kib
                ),
            ));
        }
        if h.qemu.tcg_tb_size_mib > MAX_TCG_TB_SIZE_MIB {
            return Err(invalid(
                "hypervisor.qemu.tcg_tb_size_mib",
                format!(
                    "{} is out of range (valid: 0 for QEMU's default, or 1..={MAX_TCG_TB_SIZE_MIB})",
                    h.qemu.tcg_tb_size_mib
                ),
            ));
        }
        h.rate_limits
            .check()
            .map_err(|(key, msg)| invalid(&key, msg))?;
        for (key, p) in [
            ("hypervisor.kernel", &h.kernel),
            ("hypervisor.initrd", &h.initrd),
            ("hypervisor.qemu.binary", &h.qemu.binary),
            ("hypervisor.builtin.kernel", &h.builtin.kernel),
        ] {
            if p.as_os_str().is_empty() {
                return Err(invalid(key, "must not be empty".to_string()));
            }
        }
        let a = &self.agent;
        if a.vsock_port < 1024 || a.vsock_port == u32::MAX {
            return Err(invalid(
                "agent.vsock_port",
                format!(
                    "{} is out of range (valid: 1024..=4294967294)",
                    a.vsock_port
                ),
            ));
        }
        let r = &self.runtime;
        for (key, v) in [
            ("agent.ready_timeout_ms", a.ready_timeout_ms),
            ("agent.rpc_timeout_ms", a.rpc_timeout_ms),
            ("runtime.shutdown_timeout_ms", r.shutdown_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0".to_string()));
            }
        }
        if !r.state_dir.is_absolute() {
            return Err(invalid(
                "runtime.state_dir",
                format!("{} is not an absolute path", r.state_dir.display()),
            ));
        }
        if !LOG_LEVELS.contains(&r.log_level.as_str()) {
            return Err(invalid(
                "runtime.log_level",
                format!(
                    "{:?} is not one of error, warn, info, debug, trace",
                    r.log_level
                ),
            ));
        }
        let m = &self.metrics;
        for (key, v) in [
            ("metrics.agent_timeout_ms", m.agent_timeout_ms),
            ("metrics.monitor_scrape_timeout_ms", m.monitor_scrape_timeout_ms),
        ] {
            check_metrics_timeout_ms(v).map_err(|msg| invalid(key, msg))?;
        }
        m.monitor_listen_addr()
            .map_err(|msg| invalid("metrics.monitor_listen", msg))?;
        if self.pool.size > MAX_POOL_SIZE {
            return Err(invalid(
                "pool.size",
                format!("{} is out of range (valid: 0..={MAX_POOL_SIZE})", self.pool.size),
            ));
        }
        self.debug
            .failpoint_pairs()
            .map_err(|msg| invalid("debug.failpoints", msg))?;
        if !r.enable_annotations.is_empty() {
            let defaults = toml::Value::try_from(Config::default())
                .map_err(|e| invalid("runtime.enable_annotations", e.to_string()))?;
            for key in &r.enable_annotations {
                annotations::check_enabled_key(&defaults, key)
                    .map_err(|msg| invalid("runtime.enable_annotations", msg))?;
            }
        }
        Ok(())
    }

    /// Checks that `hypervisor.kernel` and `hypervisor.initrd` exist
    /// ([`ConfigError::MissingFile`]): the files the QEMU backend boots. Called at sandbox
    /// start, not at load.
    pub fn check_files(&self, origin: &str) -> Result<(), ConfigError> {
        Self::check_exist(
            origin,
            [
                ("hypervisor.kernel", &self.hypervisor.kernel),
                ("hypervisor.initrd", &self.hypervisor.initrd),
            ],
        )
    }

    /// Checks that `hypervisor.builtin.kernel` and `hypervisor.initrd` exist: the files the
    /// built-in VMM boots.
    pub fn check_builtin_files(&self, origin: &str) -> Result<(), ConfigError> {
        Self::check_exist(
            origin,
            [
                ("hypervisor.builtin.kernel", &self.hypervisor.builtin.kernel),
                ("hypervisor.initrd", &self.hypervisor.initrd),
            ],
        )
    }

    fn check_exist<'a>(
        origin: &str,
        files: impl IntoIterator<Item = (&'static str, &'a PathBuf)>,
    ) -> Result<(), ConfigError> {
        for (key, file) in files {
            if !file.exists() {
                return Err(ConfigError::MissingFile {
                    path: origin.to_string(),
                    key: key.to_string(),
                    file: file.clone(),
                });
            }
        }
        Ok(())
    }

    /// The full config as TOML, every key written (for `joeyctl config dump`).
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("Config always serializes to TOML")
    }
}

/// [`Config::load`] with the environment value and default path injected (testable).
fn load_with(
    explicit: Option<&Path>,
    env: Option<&Path>,
    default_path: &Path,
) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let chosen = explicit.or(env.filter(|p| !p.as_os_str().is_empty()));
    if let Some(path) = chosen {
        return Ok((Config::load_file(path)?, Some(path.to_path_buf())));
    }
    if default_path.exists() {
        return Ok((
            Config::load_file(default_path)?,
            Some(default_path.to_path_buf()),
        ));
    }
    let cfg = Config::default();
    cfg.validate(ORIGIN_DEFAULTS)?;
    Ok((cfg, None))
}

/// Turns toml's multi-line, source-quoting error into one line:
/// `line L, column C: <message lines joined with "; ">`.
fn flatten_toml_error(e: &toml::de::Error, src: &str) -> String {
    let msg = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match e.span() {
        Some(span) => {
            let mut start = span.start.min(src.len());
            while !src.is_char_boundary(start) {
                start -= 1;
            }
            let before = &src[..start];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before[line_start..].chars().count() + 1;
            format!("line {line}, column {column}: {msg}")
        }
        None => msg,
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const FULL_EXAMPLE: &str = r#"
[hypervisor]
kind = "qemu"
vcpus = 4
memory_mib = 2048
kernel = "/opt/joey/vmlinuz"
initrd = "/opt/joey/initrd.img"
kernel_params = "console=ttyS0 quiet"

[hypervisor.rate_limits.net.tx]
bandwidth_bytes_per_s = 1048576
ops_per_s = 10000

[hypervisor.qemu]
binary = "/usr/bin/qemu-system-x86_64"
accel = "kvm"
tcg_tb_size_mib = 32

[hypervisor.builtin]
kernel = "/opt/joey/vmlinux"

[agent]
vsock_port = 2048
ready_timeout_ms = 60000
rpc_timeout_ms = 5000

[runtime]
state_dir = "/var/run/joey"
shutdown_timeout_ms = 3000
log_level = "debug"
enable_annotations = ["hypervisor.memory_mib"]

[metrics]
agent_timeout_ms = 250
monitor_scrape_timeout_ms = 2000
monitor_listen = "[::1]:9100"

[pool]
size = 2

[security]
seccomp = "trap"
"#;

    fn write_tmp(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        p
    }

    fn full_example() -> Config {
        Config {
            hypervisor: HypervisorConfig {
                kind: HypervisorKind::Qemu,
                vcpus: 4,
                memory_mib: 2048,
                kernel: "/opt/joey/vmlinuz".into(),
                initrd: "/opt/joey/initrd.img".into(),
                kernel_params: "console=ttyS0 quiet".into(),
                console_log_max_kib: 1024,
                rate_limits: RateLimitsConfig {
                    net: RxTxLimits {
                        tx: LimitConfig {
                            bandwidth_bytes_per_s: 1_048_576,
                            ops_per_s: 10_000,
                            ..LimitConfig::default()
                        },
                        ..RxTxLimits::default()
                    },
                },
                qemu: QemuConfig {
                    binary: "/usr/bin/qemu-system-x86_64".into(),
                    accel: Accel::Kvm,
                    tcg_tb_size_mib: 32,
                },
                builtin: BuiltinConfig {
                    kernel: "/opt/joey/vmlinux".into(),
                },
            },
            agent: AgentConfig {
                vsock_port: 2048,
                ready_timeout_ms: 60_000,
                rpc_timeout_ms: 5_000,
            },
            runtime: RuntimeConfig {
                state_dir: "/var/run/joey".into(),
                shutdown_timeout_ms: 3_000,
                log_level: "debug".into(),
                enable_annotations: vec!["hypervisor.memory_mib".into()],
            },
            metrics: MetricsConfig {
                agent_timeout_ms: 250,
                monitor_scrape_timeout_ms: 2_000,
                monitor_listen: "[::1]:9100".into(),
            },
            pool: PoolConfig { size: 2 },
            security: SecurityConfig {
                seccomp: SeccompMode::Trap,
            },
            debug: DebugConfig::default(),
        }
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.hypervisor.kind, HypervisorKind::Auto);
        assert_eq!(c.hypervisor.vcpus, 1);
        assert_eq!(c.hypervisor.memory_mib, 256);
        assert_eq!(
            c.hypervisor.kernel,
            Path::new("/usr/share/joey/guest/vmlinux")
        );
        assert_eq!(
            c.hypervisor.initrd,
            Path::new("/usr/share/joey/guest/initrd.img")
        );
        assert_eq!(c.hypervisor.kernel_params, "");
        assert_eq!(c.hypervisor.qemu.binary, Path::new("qemu-system-x86_64"));
        assert_eq!(c.hypervisor.qemu.tcg_tb_size_mib, 16);
        let e = Config::from_toml_str("[hypervisor.qemu]\ntcg_tb_size_mib = 5000\n", "<string>").unwrap_err();
        assert_eq!(
            e.to_string(),
            "<string>: invalid value for `hypervisor.qemu.tcg_tb_size_mib`: 5000 is out of range \
             (valid: 0 for QEMU's default, or 1..=4096)"
        );
        assert_eq!(c.hypervisor.qemu.accel, Accel::Auto);
        assert_eq!(
            c.hypervisor.builtin.kernel,
            Path::new("/usr/share/joey/guest/vmlinux")
        );
        assert_eq!(c.agent.vsock_port, 1024);
        assert_eq!(c.agent.ready_timeout_ms, 30_000);
        assert_eq!(c.agent.rpc_timeout_ms, 10_000);
        assert_eq!(c.runtime.state_dir, Path::new("/run/joey"));
        assert_eq!(c.runtime.shutdown_timeout_ms, 5_000);
        assert_eq!(c.runtime.log_level, "warn");
        // Today's constants of the metrics endpoint and joey-monitor.
        assert_eq!(c.metrics.agent_timeout_ms, 500);
        assert_eq!(c.metrics.reply_timeout(), Duration::from_millis(800));
        assert_eq!(c.metrics.monitor_scrape_timeout_ms, 1_000);
        assert_eq!(
            c.metrics.monitor_listen_addr().unwrap(),
            "127.0.0.1:8090".parse::<SocketAddr>().unwrap()
        );
        c.validate("<defaults>").unwrap();
        // Empty text and empty tables give the defaults.
        assert_eq!(Config::from_toml_str("", "<string>").unwrap(), c);
        assert_eq!(
            Config::from_toml_str(
                "[hypervisor]\n[hypervisor.qemu]\n[hypervisor.builtin]\n[agent]\n[runtime]\n[metrics]\n",
                "<string>"
            )
            .unwrap(),
            c
        );
        // Partial tables keep the other defaults.
        let p = Config::from_toml_str("[hypervisor]\nvcpus = 2\n", "<string>").unwrap();
        assert_eq!(p.hypervisor.vcpus, 2);
        assert_eq!(p.hypervisor.memory_mib, 256);
        assert_eq!(p.agent, AgentConfig::default());
    }

    #[test]
    fn security_seccomp_modes() {
        assert_eq!(Config::default().security.seccomp, SeccompMode::Kill);
        for (text, mode) in [("kill", SeccompMode::Kill), ("trap", SeccompMode::Trap), ("off", SeccompMode::Off)] {
            let c = Config::from_toml_str(&format!("[security]\nseccomp = \"{text}\"\n"), "<string>").unwrap();
            assert_eq!(c.security.seccomp, mode);
            assert_eq!(mode.to_string(), text);
        }
        let e = Config::from_toml_str("[security]\nseccomp = \"log\"\n", "<string>").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert!(e.to_string().contains("unknown variant `log`"), "{e}");
        let e = Config::from_toml_str("[security]\nsecomp = \"off\"\n", "<string>").unwrap_err();
        assert!(e.to_string().contains("secomp"), "{e}");
    }

    #[test]
    fn rate_limits_parse_validate_and_annotate() {
        let c = Config::from_toml_str(
            "[hypervisor.rate_limits.net.rx]\nbandwidth_bytes_per_s = 2000000\nrefill_time_ms = 50\n",
            "<string>",
        )
        .unwrap();
        assert_eq!(c.hypervisor.rate_limits.net.rx.bandwidth_bytes_per_s, 2_000_000);
        assert_eq!(c.hypervisor.rate_limits.net.rx.refill_time_ms, 50);
        assert_eq!(c.hypervisor.rate_limits.net.tx, LimitConfig::default());
        let e = Config::from_toml_str("[hypervisor.rate_limits.net.rx]\nbandwith = 1\n", "<string>")
            .unwrap_err();
        assert!(e.to_string().contains("bandwith"), "{e}");
        let e = Config::from_toml_str("[hypervisor.rate_limits.blk]\n", "<string>").unwrap_err();
        assert!(e.to_string().contains("blk"), "{e}");
        let e = Config::from_toml_str(
            "[hypervisor.rate_limits.net.tx]\nops_per_s = 1\n",
            "<string>",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "<string>: invalid value for `hypervisor.rate_limits.net.tx.ops_per_s`: 1/s over \
             refill_time_ms = 100 is less than one token (0: unlimited)"
        );
        // Per pod, through an enabled annotation.
        let key = "hypervisor.rate_limits.net.tx.bandwidth_bytes_per_s";
        let mut base = Config::default();
        base.runtime.enable_annotations.push(key.to_string());
        base.validate("<defaults>").unwrap();
        let annotation = format!("{ANNOTATION_PREFIX}{key}");
        let c = base.with_annotations([(annotation.as_str(), "500000")]).unwrap();
        assert_eq!(c.hypervisor.rate_limits.net.tx.bandwidth_bytes_per_s, 500_000);
    }

    #[test]
    fn display_lowercase() {
        assert_eq!(HypervisorKind::Auto.to_string(), "auto");
        assert_eq!(HypervisorKind::Qemu.to_string(), "qemu");
        assert_eq!(HypervisorKind::Builtin.to_string(), "builtin");
        assert_eq!(Accel::Auto.to_string(), "auto");
        assert_eq!(Accel::Kvm.to_string(), "kvm");
        assert_eq!(Accel::Tcg.to_string(), "tcg");
        let c = Config::from_toml_str(
            "[hypervisor]\nkind = \"builtin\"\n[hypervisor.qemu]\naccel = \"tcg\"\n",
            "<string>",
        )
        .unwrap();
        assert_eq!(c.hypervisor.kind, HypervisorKind::Builtin);
        assert_eq!(c.hypervisor.qemu.accel, Accel::Tcg);
    }

    #[test]
    fn full_example_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_tmp(dir.path(), "config.toml", FULL_EXAMPLE);
        let c = Config::load_file(&p).unwrap();
        assert_eq!(c, full_example());
        let dumped = c.to_toml_string();
        let again = Config::from_toml_str(&dumped, "<string>").unwrap();
        assert_eq!(again, c);
        // Defaults dump every key and round-trip too.
        let d = Config::default().to_toml_string();
        for key in [
            "[hypervisor]",
            "kind",
            "vcpus",
            "memory_mib",
            "kernel",
            "initrd",
            "kernel_params",
            "console_log_max_kib",
            "[hypervisor.qemu]",
            "binary",
            "accel",
            "[hypervisor.builtin]",
            "[agent]",
            "vsock_port",
            "ready_timeout_ms",
            "rpc_timeout_ms",
            "[runtime]",
            "state_dir",
            "shutdown_timeout_ms",
            "log_level",
            "enable_annotations",
            "[metrics]",
            "agent_timeout_ms",
            "monitor_scrape_timeout_ms",
            "monitor_listen",
        ] {
            assert!(d.contains(key), "dump lacks {key}:\n{d}");
        }
        assert_eq!(
            Config::from_toml_str(&d, "<string>").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn docs_example_parses() {
        // The example in docs/config.md must stay valid.
        // The first ```toml block sets every key to its default; all blocks must parse.
        let doc = include_str!("../../docs/config.md");
        let blocks: Vec<&str> = doc
            .split("```toml\n")
            .skip(1)
            .map(|b| &b[..b.find("```").unwrap()])
            .collect();
        assert!(!blocks.is_empty(), "docs/config.md has no ```toml block");
        let first = Config::from_toml_str(blocks[0], "docs/config.md").unwrap();
        assert_eq!(first, Config::default());
        assert_eq!(blocks[0].trim(), Config::default().to_toml_string().trim());
        for b in &blocks[1..] {
            Config::from_toml_str(b, "docs/config.md").unwrap();
        }
    }

    #[test]
    fn unknown_top_level_key_is_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_tmp(
            dir.path(),
            "c.toml",
            "[hypervisor]\nvcpus = 2\n\n[runtim]\nlog_level = \"info\"\n",
        );
        let e = Config::load_file(&p).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        let s = e.to_string();
        assert!(s.contains("runtim"), "{s}");
        assert!(s.contains(&p.display().to_string()), "{s}");
        assert!(s.contains("line 4"), "{s}");
        assert!(!s.contains('\n'), "not one line: {s:?}");
    }

    #[test]
    fn unknown_nested_key_is_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_tmp(dir.path(), "c.toml", "# comment\n[hypervisor]\nvcpu = 2\n");
        let e = Config::load_file(&p).unwrap_err();
        let s = e.to_string();
        match &e {
            ConfigError::Parse { path, message } => {
                assert_eq!(path, &p.display().to_string());
                assert!(message.contains("`vcpu`"), "{message}");
                assert!(message.starts_with("line 3, column 1:"), "{message}");
            }
            other => panic!("expected Parse, got {other:?}"),
        }
        assert!(s.starts_with(&format!("{}: ", p.display())), "{s}");
        assert!(!s.contains('\n'), "not one line: {s:?}");

        // Deeper table too.
        let e = Config::from_toml_str("[hypervisor.qemu]\naccelerator = \"kvm\"\n", "<string>")
            .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("<string>: "), "{s}");
        assert!(s.contains("accelerator"), "{s}");
        assert!(!s.contains('\n'), "{s:?}");
        let e = Config::from_toml_str("[hypervisor.builtin]\nkernal = \"/k\"\n", "<string>")
            .unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert!(e.to_string().contains("kernal"), "{e}");
    }

    #[test]
    fn syntax_error_is_one_line() {
        let e = Config::from_toml_str("[hypervisor\nvcpus = 2\n", "<string>").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        let s = e.to_string();
        assert!(s.starts_with("<string>: line 1"), "{s}");
        assert!(!s.contains('\n'), "{s:?}");
        let e = Config::from_toml_str("[agent]\nvsock_port = \n", "<string>").unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn wrong_type_is_parse_error() {
        let e = Config::from_toml_str("[hypervisor]\nvcpus = \"two\"\n", "<string>").unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert!(s.contains("line 2"), "{s}");
        assert!(s.contains("invalid type"), "{s}");
        assert!(!s.contains('\n'), "{s:?}");
        // Negative into u32, and a table where a value is expected.
        assert!(matches!(
            Config::from_toml_str("[agent]\nvsock_port = -1\n", "<string>"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::from_toml_str("hypervisor = 3\n", "<string>"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn bad_kind_names_allowed_values() {
        let e = Config::from_toml_str("[hypervisor]\nkind = \"xen\"\n", "<string>").unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        for v in ["xen", "auto", "qemu", "builtin"] {
            assert!(s.contains(v), "{s}");
        }
        let e =
            Config::from_toml_str("[hypervisor.qemu]\naccel = \"hvf\"\n", "<string>").unwrap_err();
        let s = e.to_string();
        for v in ["hvf", "auto", "kvm", "tcg"] {
            assert!(s.contains(v), "{s}");
        }
        // Case matters.
        assert!(Config::from_toml_str("[hypervisor]\nkind = \"QEMU\"\n", "<string>").is_err());
    }

    #[test]
    fn pool_keys_are_checked() {
        assert_eq!(Config::default().pool.size, 0, "the pool is off by default");
        let c = Config::from_toml_str("[pool]\nsize = 64\n", "<string>").unwrap();
        assert_eq!(c.pool.size, MAX_POOL_SIZE);
        let e = Config::from_toml_str("[pool]\nsize = 65\n", "/etc/joey/config.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/joey/config.toml: invalid value for `pool.size`: 65 is out of range (valid: 0..=64)"
        );
        let e = Config::from_toml_str("[pool]\nsize = -1\n", "<string>").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        let e = Config::from_toml_str("[pool]\nsizes = 3\n", "<string>").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }) && e.to_string().contains("sizes"), "{e}");
    }

    fn invalid_key(toml: &str) -> String {
        match Config::from_toml_str(toml, "/x/config.toml") {
            Err(ConfigError::Invalid { path, key, message }) => {
                assert_eq!(path, "/x/config.toml");
                assert!(!message.is_empty());
                key
            }
            other => panic!("{toml:?}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn metrics_keys_are_checked() {
        let c = Config::from_toml_str(
            "[metrics]\nagent_timeout_ms = 60000\nmonitor_scrape_timeout_ms = 1\nmonitor_listen = \"0.0.0.0:9000\"\n",
            "<string>",
        )
        .unwrap();
        assert_eq!(c.metrics.agent_timeout(), Duration::from_secs(60));
        assert_eq!(c.metrics.monitor_scrape_timeout(), Duration::from_millis(1));
        assert_eq!(c.metrics.monitor_listen_addr().unwrap().port(), 9000);
        let e = Config::from_toml_str("[metrics]\nagent_timeout_ms = 0\n", "/etc/joey/config.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/joey/config.toml: invalid value for `metrics.agent_timeout_ms`: 0 is out of range (valid: 1..=60000 ms)"
        );
        assert_eq!(
            invalid_key("[metrics]\nagent_timeout_ms = 60001\n"),
            "metrics.agent_timeout_ms"
        );
        assert_eq!(
            invalid_key("[metrics]\nmonitor_scrape_timeout_ms = 0\n"),
            "metrics.monitor_scrape_timeout_ms"
        );
        assert_eq!(
            invalid_key("[metrics]\nmonitor_scrape_timeout_ms = 600000\n"),
            "metrics.monitor_scrape_timeout_ms"
        );
        assert_eq!(
            invalid_key("[metrics]\nmonitor_listen = \"localhost\"\n"),
            "metrics.monitor_listen"
        );
        // Unknown keys in [metrics] are refused, naming the key.
        let e = Config::from_toml_str("[metrics]\nscrape_timeout = 3\n", "<string>").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert!(e.to_string().contains("scrape_timeout"), "{e}");
        assert!(check_metrics_timeout_ms(60_000).is_ok());
        assert!(check_metrics_timeout_ms(60_001).is_err());
    }

    #[test]
    fn out_of_range_values_are_invalid() {
        let e = Config::from_toml_str("[hypervisor]\nvcpus = 65\n", "/etc/joey/config.toml")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/joey/config.toml: invalid value for `hypervisor.vcpus`: 65 is out of range (valid: 1..=64)"
        );
        assert_eq!(invalid_key("[hypervisor]\nvcpus = 0\n"), "hypervisor.vcpus");
        assert_eq!(
            invalid_key("[hypervisor]\nmemory_mib = 63\n"),
            "hypervisor.memory_mib"
        );
        assert_eq!(
            invalid_key("[hypervisor]\nmemory_mib = 65537\n"),
            "hypervisor.memory_mib"
        );
        assert_eq!(
            invalid_key("[hypervisor]\nconsole_log_max_kib = 3\n"),
            "hypervisor.console_log_max_kib"
        );
        assert_eq!(
            invalid_key("[hypervisor]\nkernel = \"\"\n"),
            "hypervisor.kernel"
        );
        assert_eq!(
            invalid_key("[hypervisor]\ninitrd = \"\"\n"),
            "hypervisor.initrd"
        );
        assert_eq!(
            invalid_key("[hypervisor.qemu]\nbinary = \"\"\n"),
            "hypervisor.qemu.binary"
        );
        assert_eq!(
            invalid_key("[hypervisor.builtin]\nkernel = \"\"\n"),
            "hypervisor.builtin.kernel"
        );
        assert_eq!(
            invalid_key("[agent]\nvsock_port = 1023\n"),
            "agent.vsock_port"
        );
        assert_eq!(
            invalid_key("[agent]\nvsock_port = 4294967295\n"),
            "agent.vsock_port"
        );
        assert_eq!(
            invalid_key("[agent]\nready_timeout_ms = 0\n"),
            "agent.ready_timeout_ms"
        );
        assert_eq!(
            invalid_key("[agent]\nrpc_timeout_ms = 0\n"),
            "agent.rpc_timeout_ms"
        );
        assert_eq!(
            invalid_key("[runtime]\nshutdown_timeout_ms = 0\n"),
            "runtime.shutdown_timeout_ms"
        );
        assert_eq!(
            invalid_key("[runtime]\nstate_dir = \"run/joey\"\n"),
            "runtime.state_dir"
        );
        assert_eq!(
            invalid_key("[runtime]\nlog_level = \"verbose\"\n"),
            "runtime.log_level"
        );
        assert_eq!(
            invalid_key("[runtime]\nlog_level = \"INFO\"\n"),
            "runtime.log_level"
        );
        // Boundaries are valid.
        Config::from_toml_str(
            "[hypervisor]\nvcpus = 64\nmemory_mib = 65536\n[agent]\nvsock_port = 4294967294\n",
            "<string>",
        )
        .unwrap();
        Config::from_toml_str("[hypervisor]\nvcpus = 1\nmemory_mib = 64\n", "<string>").unwrap();
        for l in LOG_LEVELS {
            Config::from_toml_str(&format!("[runtime]\nlog_level = \"{l}\"\n"), "<string>")
                .unwrap();
        }
    }

    #[test]
    fn load_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let explicit = write_tmp(dir.path(), "explicit.toml", "[hypervisor]\nvcpus = 2\n");
        let env = write_tmp(dir.path(), "env.toml", "[hypervisor]\nvcpus = 3\n");
        let default = write_tmp(dir.path(), "default.toml", "[hypervisor]\nvcpus = 4\n");
        let absent = dir.path().join("absent.toml");

        let (c, from) = load_with(Some(&explicit), Some(&env), &default).unwrap();
        assert_eq!(
            (c.hypervisor.vcpus, from.as_deref()),
            (2, Some(explicit.as_path()))
        );
        let (c, from) = load_with(None, Some(&env), &default).unwrap();
        assert_eq!(
            (c.hypervisor.vcpus, from.as_deref()),
            (3, Some(env.as_path()))
        );
        let (c, from) = load_with(None, None, &default).unwrap();
        assert_eq!(
            (c.hypervisor.vcpus, from.as_deref()),
            (4, Some(default.as_path()))
        );
        // Empty env value counts as unset.
        let (c, _) = load_with(None, Some(Path::new("")), &default).unwrap();
        assert_eq!(c.hypervisor.vcpus, 4);
        // No file anywhere: built-in defaults, no path.
        let (c, from) = load_with(None, None, &absent).unwrap();
        assert_eq!((c, from), (Config::default(), None));
        // An existing default file with errors is still an error.
        let bad = write_tmp(dir.path(), "bad.toml", "bogus = 1\n");
        assert!(matches!(
            load_with(None, None, &bad),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn missing_explicit_file_is_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("nope.toml");
        let default = write_tmp(dir.path(), "default.toml", "");
        for (explicit, env) in [
            (Some(absent.as_path()), None),
            (None, Some(absent.as_path())),
        ] {
            match load_with(explicit, env, &default) {
                Err(ConfigError::Read { path, source }) => {
                    assert_eq!(path, absent);
                    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
                }
                other => panic!("expected Read, got {other:?}"),
            }
        }
        let e = Config::load(Some(&absent)).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with(&format!("cannot read config file {}: ", absent.display())),
            "{s}"
        );
        assert!(!s.contains('\n'), "{s:?}");
    }

    /// The only test that touches the process environment (`JOEY_CONFIG`).
    #[test]
    fn load_reads_env_var() {
        let dir = tempfile::tempdir().unwrap();
        let explicit = write_tmp(dir.path(), "explicit.toml", "[hypervisor]\nvcpus = 2\n");
        let env = write_tmp(dir.path(), "env.toml", "[hypervisor]\nvcpus = 3\n");
        let saved = std::env::var_os(CONFIG_ENV);

        std::env::set_var(CONFIG_ENV, &env);
        let r1 = Config::load(None);
        let r2 = Config::load(Some(&explicit));
        std::env::set_var(CONFIG_ENV, dir.path().join("missing.toml"));
        let r3 = Config::load(None);
        match saved {
            Some(v) => std::env::set_var(CONFIG_ENV, v),
            None => std::env::remove_var(CONFIG_ENV),
        }

        let (c, from) = r1.unwrap();
        assert_eq!((c.hypervisor.vcpus, from), (3, Some(env.clone())));
        let (c, from) = r2.unwrap();
        assert_eq!((c.hypervisor.vcpus, from), (2, Some(explicit.clone())));
        assert!(matches!(r3, Err(ConfigError::Read { .. })), "{r3:?}");
    }

    #[test]
    fn check_files_reports_missing_kernel_and_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = write_tmp(dir.path(), "bzImage", "k");
        let initrd = write_tmp(dir.path(), "initrd.img", "i");
        let mut c = Config::default();
        c.hypervisor.kernel = dir.path().join("no-bzImage");
        c.hypervisor.initrd = initrd.clone();
        let e = c.check_files("/etc/joey/config.toml").unwrap_err();
        match &e {
            ConfigError::MissingFile { path, key, file } => {
                assert_eq!(path, "/etc/joey/config.toml");
                assert_eq!(key, "hypervisor.kernel");
                assert_eq!(file, &dir.path().join("no-bzImage"));
            }
            other => panic!("expected MissingFile, got {other:?}"),
        }
        assert_eq!(
            e.to_string(),
            format!(
                "/etc/joey/config.toml: `hypervisor.kernel` points to {}, which does not exist",
                dir.path().join("no-bzImage").display()
            )
        );
        c.hypervisor.kernel = kernel;
        c.hypervisor.initrd = dir.path().join("no-initrd");
        match c.check_files("<defaults>") {
            Err(ConfigError::MissingFile { key, .. }) => assert_eq!(key, "hypervisor.initrd"),
            other => panic!("expected MissingFile, got {other:?}"),
        }
        c.hypervisor.initrd = initrd.clone();
        c.check_files("<defaults>").unwrap();
    }

    #[test]
    fn check_builtin_files_reports_missing_vmlinux() {
        let dir = tempfile::tempdir().unwrap();
        let vmlinux = write_tmp(dir.path(), "vmlinux", "k");
        let initrd = write_tmp(dir.path(), "initrd.img", "i");
        let mut c = Config::default();
        // The bzImage is not needed by the built-in VMM.
        c.hypervisor.kernel = dir.path().join("no-bzImage");
        c.hypervisor.builtin.kernel = dir.path().join("no-vmlinux");
        c.hypervisor.initrd = initrd;
        let e = c.check_builtin_files("<defaults>").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "<defaults>: `hypervisor.builtin.kernel` points to {}, which does not exist",
                dir.path().join("no-vmlinux").display()
            )
        );
        c.hypervisor.builtin.kernel = vmlinux;
        c.check_builtin_files("<defaults>").unwrap();
        c.hypervisor.initrd = dir.path().join("no-initrd");
        match c.check_builtin_files("<defaults>") {
            Err(ConfigError::MissingFile { key, .. }) => assert_eq!(key, "hypervisor.initrd"),
            other => panic!("expected MissingFile, got {other:?}"),
        }
    }

    #[test]
    fn debug_failpoints_are_validated_and_named() {
        let c = Config::from_toml_str("[debug]\nfailpoints = \"vmm::vcpu_run=panic\"\n", "f")
            .unwrap();
        assert_eq!(
            c.debug.failpoint_pairs().unwrap(),
            vec![("vmm::vcpu_run".to_string(), "panic".to_string())]
        );
        assert!(Config::default().debug.failpoints.is_empty());
        let e = Config::from_toml_str("[debug]\nfailpoints = \"vmm::vcpu_run\"\n", "f")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f: invalid value for `debug.failpoints`: \"vmm::vcpu_run\" is not <area>::<point>=<action>"
        );
        let e = Config::from_toml_str("[debug]\nfailpoint = \"\"\n", "f").unwrap_err();
        assert!(e.to_string().contains("unknown field `failpoint`"), "{e}");
    }
}
