//! Per-sandbox overrides from OCI annotations, Kata style.
//!
//! An annotation `io.joey.config.<section>.<key>=<value>` on the sandbox's OCI spec (pod
//! annotations reach it through containerd's `pod_annotations`) overrides that config key for
//! that one sandbox — but only when the key is listed in `runtime.enable_annotations`. Keys that
//! name a path (kernel, initrd, binaries, the state directory) and the list itself are never
//! overridable. Every other `io.joey.config.*` annotation is refused with an error that names
//! it; annotations outside the prefix are not joey's business and are ignored.

use crate::{Config, ConfigError};

/// Prefix of the annotations that override config keys.
pub const ANNOTATION_PREFIX: &str = "io.joey.config.";

/// Keys that are never overridable by an annotation, whatever `runtime.enable_annotations`
/// says: they name files or directories on the host (what a pod could point joey at) or the
/// override policy itself.
pub const NEVER_OVERRIDABLE: &[&str] = &[
    "hypervisor.kernel",
    "hypervisor.initrd",
    "hypervisor.qemu.binary",
    "hypervisor.builtin.kernel",
    "runtime.state_dir",
    "runtime.enable_annotations",
];

/// Keys of the host's confinement (docs/security.md): never overridable by a pod either.
/// `debug.failpoints` too: a pod must not inject faults into its host's runtime.
pub const CONFINEMENT_KEYS: &[&str] = &["security.seccomp", "debug.failpoints"];

/// The default of `runtime.enable_annotations`: the sandbox's size.
pub fn default_enabled() -> Vec<String> {
    vec!["hypervisor.vcpus".to_string(), "hypervisor.memory_mib".to_string()]
}

/// Why an `io.joey.config.*` annotation was refused. Each names the annotation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("annotation {annotation}: `{key}` names a path and is never overridable")]
    PathKey { annotation: String, key: String },
    #[error("annotation {annotation}: `{key}` is the host's confinement and is never overridable")]
    Confinement { annotation: String, key: String },
    #[error("annotation {annotation}: `{key}` is not a joey config key")]
    UnknownKey { annotation: String, key: String },
    #[error("annotation {annotation}: `{key}` is not listed in runtime.enable_annotations")]
    NotEnabled { annotation: String, key: String },
    #[error("annotation {annotation}: {message}")]
    InvalidValue { annotation: String, message: String },
}

/// Checks one entry of `runtime.enable_annotations`: a known scalar key that may be overridden.
pub(crate) fn check_enabled_key(defaults: &toml::Value, key: &str) -> Result<(), String> {
    if NEVER_OVERRIDABLE.contains(&key) || CONFINEMENT_KEYS.contains(&key) {
        return Err(format!("`{key}` is never overridable by annotations"));
    }
    match lookup(defaults, key) {
        Some(v) if !v.is_table() && !v.is_array() => Ok(()),
        _ => Err(format!("`{key}` is not a config key")),
    }
}

fn lookup<'a>(v: &'a toml::Value, key: &str) -> Option<&'a toml::Value> {
    key.split('.').try_fold(v, |v, part| v.as_table()?.get(part))
}

fn lookup_mut<'a>(v: &'a mut toml::Value, key: &str) -> Option<&'a mut toml::Value> {
    key.split('.')
        .try_fold(v, |v, part| v.as_table_mut()?.get_mut(part))
}

/// Parses `raw` as the same TOML type as `current`.
fn parse_like(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    match current {
        toml::Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{raw:?} is not an integer")),
        toml::Value::Boolean(_) => raw
            .trim()
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|_| format!("{raw:?} is not true or false")),
        toml::Value::Float(_) => raw
            .trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| format!("{raw:?} is not a number")),
        _ => Ok(toml::Value::String(raw.to_string())),
    }
}

impl Config {
    /// This config with the sandbox's `io.joey.config.*` annotations applied (see the module
    /// docs). Annotations are applied in the order given; the result is validated as a whole,
    /// and a value out of range is refused naming the annotation. Nothing is changed when any
    /// annotation is refused.
    pub fn with_annotations<'a, I>(&self, annotations: I) -> Result<Config, AnnotationError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut picked: Vec<(&str, &str, &str)> = Vec::new();
        for (name, value) in annotations {
            let Some(key) = name.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            picked.push((name, key, value));
        }
        if picked.is_empty() {
            return Ok(self.clone());
        }
        let mut tree = toml::Value::try_from(self).map_err(|e| AnnotationError::InvalidValue {
            annotation: picked[0].0.to_string(),
            message: format!("config does not serialize: {e}"),
        })?;
        for (name, key, raw) in &picked {
            let annotation = name.to_string();
            if NEVER_OVERRIDABLE.contains(key) {
                return Err(AnnotationError::PathKey { annotation, key: key.to_string() });
            }
            if CONFINEMENT_KEYS.contains(key) {
                return Err(AnnotationError::Confinement { annotation, key: key.to_string() });
            }
            let Some(slot) = lookup_mut(&mut tree, key).filter(|v| !v.is_table() && !v.is_array()) else {
                return Err(AnnotationError::UnknownKey { annotation, key: key.to_string() });
            };
            if !self.runtime.enable_annotations.iter().any(|k| k == key) {
                return Err(AnnotationError::NotEnabled { annotation, key: key.to_string() });
            }
            *slot = parse_like(slot, raw).map_err(|message| AnnotationError::InvalidValue { annotation, message })?;
        }
        let last = picked[picked.len() - 1].0;
        let cfg: Config = tree.try_into().map_err(|e: toml::de::Error| AnnotationError::InvalidValue {
            annotation: last.to_string(),
            message: e.message().trim().to_string(),
        })?;
        cfg.validate("<annotations>").map_err(|e| match e {
            ConfigError::Invalid { key, message, .. } => AnnotationError::InvalidValue {
                annotation: picked
                    .iter()
                    .find(|(_, k, _)| *k == key)
                    .map_or(last, |p| p.0)
                    .to_string(),
                message: format!("invalid value for `{key}`: {message}"),
            },
            other => AnnotationError::InvalidValue { annotation: last.to_string(), message: other.to_string() },
        })?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(cfg: &Config, a: &[(&str, &str)]) -> Result<Config, AnnotationError> {
        cfg.with_annotations(a.iter().copied())
    }

    #[test]
    fn enabled_keys_are_overridden() {
        let c = Config::default();
        let o = apply(
            &c,
            &[
                ("io.joey.config.hypervisor.memory_mib", "512"),
                ("io.joey.config.hypervisor.vcpus", " 2 "),
                ("io.kubernetes.cri.sandbox-id", "abc"),
            ],
        )
        .unwrap();
        assert_eq!(o.hypervisor.memory_mib, 512);
        assert_eq!(o.hypervisor.vcpus, 2);
        let mut expect = c.clone();
        expect.hypervisor.memory_mib = 512;
        expect.hypervisor.vcpus = 2;
        assert_eq!(o, expect);
    }

    #[test]
    fn no_joey_annotation_is_the_same_config() {
        let c = Config::default();
        assert_eq!(apply(&c, &[("org.opencontainers.image.ref.name", "x")]).unwrap(), c);
        assert_eq!(apply(&c, &[]).unwrap(), c);
    }

    #[test]
    fn path_keys_are_never_overridable() {
        let mut c = Config::default();
        // Even if someone lists them, the list is refused at load (see below) and apply refuses.
        c.runtime.enable_annotations.push("hypervisor.kernel".into());
        for key in NEVER_OVERRIDABLE {
            let name = format!("{ANNOTATION_PREFIX}{key}");
            let e = apply(&c, &[(&name, "/tmp/evil")]).unwrap_err();
            assert_eq!(e, AnnotationError::PathKey { annotation: name.clone(), key: key.to_string() });
            assert_eq!(
                e.to_string(),
                format!("annotation {name}: `{key}` names a path and is never overridable")
            );
        }
    }

    #[test]
    fn confinement_keys_are_never_overridable() {
        let mut c = Config::default();
        c.runtime.enable_annotations.push("security.seccomp".into());
        let e = apply(&c, &[("io.joey.config.security.seccomp", "off")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation io.joey.config.security.seccomp: `security.seccomp` is the host's confinement and is never overridable"
        );
        let e = Config::from_toml_str("[runtime]\nenable_annotations = [\"security.seccomp\"]\n", "<string>").unwrap_err();
        assert!(e.to_string().contains("`security.seccomp` is never overridable by annotations"), "{e}");
    }

    #[test]
    fn keys_not_enabled_or_unknown_are_refused() {
        let c = Config::default();
        let e = apply(&c, &[("io.joey.config.agent.rpc_timeout_ms", "5")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation io.joey.config.agent.rpc_timeout_ms: `agent.rpc_timeout_ms` is not listed in runtime.enable_annotations"
        );
        let e = apply(&c, &[("io.joey.config.hypervisor.vcpu", "2")]).unwrap_err();
        assert_eq!(
            e,
            AnnotationError::UnknownKey {
                annotation: "io.joey.config.hypervisor.vcpu".into(),
                key: "hypervisor.vcpu".into()
            }
        );
        let e = apply(&c, &[("io.joey.config.hypervisor", "x")]).unwrap_err();
        assert!(matches!(e, AnnotationError::UnknownKey { .. }), "{e:?}");
        let e = apply(&c, &[("io.joey.config.", "x")]).unwrap_err();
        assert!(matches!(e, AnnotationError::UnknownKey { .. }), "{e:?}");
    }

    #[test]
    fn bad_values_name_the_annotation() {
        let c = Config::default();
        let e = apply(&c, &[("io.joey.config.hypervisor.memory_mib", "lots")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation io.joey.config.hypervisor.memory_mib: \"lots\" is not an integer"
        );
        let e = apply(
            &c,
            &[("io.joey.config.hypervisor.vcpus", "2"), ("io.joey.config.hypervisor.memory_mib", "16")],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation io.joey.config.hypervisor.memory_mib: invalid value for `hypervisor.memory_mib`: 16 is out of range (valid: 64..=65536)"
        );
        let e = apply(&c, &[("io.joey.config.hypervisor.vcpus", "-1")]).unwrap_err();
        assert!(e.to_string().starts_with("annotation io.joey.config.hypervisor.vcpus: "), "{e}");
    }

    #[test]
    fn other_scalar_kinds_can_be_enabled() {
        let mut c = Config::default();
        c.runtime.enable_annotations = vec!["runtime.log_level".into(), "hypervisor.kind".into()];
        let o = apply(&c, &[("io.joey.config.runtime.log_level", "debug"), ("io.joey.config.hypervisor.kind", "qemu")])
            .unwrap();
        assert_eq!(o.runtime.log_level, "debug");
        assert_eq!(o.hypervisor.kind, crate::HypervisorKind::Qemu);
        let e = apply(&c, &[("io.joey.config.hypervisor.kind", "firecracker")]).unwrap_err();
        assert!(
            e.to_string().starts_with("annotation io.joey.config.hypervisor.kind: "),
            "{e}"
        );
        // The vCPU default is no longer enabled with this list.
        assert!(matches!(
            apply(&c, &[("io.joey.config.hypervisor.vcpus", "2")]),
            Err(AnnotationError::NotEnabled { .. })
        ));
    }

    #[test]
    fn enable_list_is_checked_at_load() {
        let e = Config::from_toml_str("[runtime]\nenable_annotations = [\"hypervisor.initrd\"]\n", "c.toml")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.toml: invalid value for `runtime.enable_annotations`: `hypervisor.initrd` is never overridable by annotations"
        );
        let e = Config::from_toml_str("[runtime]\nenable_annotations = [\"hypervisor.cpus\"]\n", "c.toml")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.toml: invalid value for `runtime.enable_annotations`: `hypervisor.cpus` is not a config key"
        );
        let c = Config::from_toml_str("[runtime]\nenable_annotations = []\n", "c.toml").unwrap();
        assert!(matches!(
            apply(&c, &[("io.joey.config.hypervisor.memory_mib", "512")]),
            Err(AnnotationError::NotEnabled { .. })
        ));
    }
}
