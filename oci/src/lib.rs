//! What the shim needs from a bundle's OCI `config.json`: the process and root settings, the
//! CRI sandbox grouping annotation, and the spec translated for the guest ([`translate`]).
//!
//! A crate of its own with only `serde_json` and `oci-spec` (no async runtime), so that the
//! `oci_spec` fuzz target builds it cheaply; the shim re-exports it as `joey_shim::shim::spec`.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where the guest mounts the shared directory (`joey_agent_protocol::GUEST_SHARED_DIR`; the
/// ShareFs actor checks that the two agree).
pub const GUEST_SHARED_DIR: &str = "/run/joey/shared";

/// One host directory or file shared into the guest for a container's bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeShare {
    pub host_path: PathBuf,
    pub read_only: bool,
}

/// Guest path of a container's `index`-th shared volume.
pub fn guest_volume_path(container_id: &str, index: usize) -> String {
    format!("{GUEST_SHARED_DIR}/{container_id}/volumes/{index}")
}

/// Guest path of a shared container rootfs.
pub fn guest_rootfs_path(container_id: &str) -> String {
    format!("{GUEST_SHARED_DIR}/{container_id}/rootfs")
}

/// The OCI annotation CRI puts on every container of a pod.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The OCI annotation CRI puts on a pod's containers: `sandbox` (the pause container) or
/// `container`.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a valid OCI runtime spec: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{path}: {what}")]
    Unsupported { path: String, what: String },
}

/// The parts of the OCI spec the shim turns into a `CreateContainer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub terminal: bool,
    pub hostname: String,
    pub read_only: bool,
    /// `io.kubernetes.cri.sandbox-id`, if any.
    pub sandbox_id: Option<String>,
    /// The spec's annotations (the `io.joey.config.*` ones are config overrides, docs/config.md).
    pub annotations: Vec<(String, String)>,
    /// The whole spec as parsed JSON (validated by `oci-spec`), for [`translate`].
    pub raw: Value,
    /// Where the spec came from (for messages).
    pub path: String,
}

impl ContainerSpec {
    /// The `path` of the spec's `network` namespace: the pod's network namespace (CNI's, or
    /// `ctr run --with-ns network:<path>`), whose interfaces the sandbox carries into its VM.
    pub fn network_namespace(&self) -> Option<PathBuf> {
        self.raw
            .pointer("/linux/namespaces")?
            .as_array()?
            .iter()
            .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))?
            .get("path")?
            .as_str()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }
}

/// The spec as the guest needs it, and the host sources to share for its bind mounts.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestSpec {
    /// `CreateContainerRequest.oci_spec_json`.
    pub json: String,
    /// Index n is shared at [`guest_volume_path`]`(id, n)`.
    pub volumes: Vec<VolumeShare>,
}

fn is_bind(m: &Value) -> bool {
    let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
    ty == "bind"
        || ty == "rbind"
        || m.get("options")
            .and_then(Value::as_array)
            .is_some_and(|o| o.iter().any(|o| matches!(o.as_str(), Some("bind" | "rbind"))))
}

fn has_option(m: &Value, opt: &str) -> bool {
    m.get("options")
        .and_then(Value::as_array)
        .is_some_and(|o| o.iter().any(|o| o.as_str() == Some(opt)))
}

/// Translates a parsed spec for the guest (blocking: it checks bind mount sources on the host):
/// `root.path` becomes the guest rootfs path of `container_id`; every bind mount's source must
/// be an existing absolute host path and becomes the guest path of its shared volume (read-only
/// where its options say "ro"); the host-only parts are dropped (`linux.cgroupsPath`, the
/// `path` of namespaces, `hooks`); everything else is kept as is.
pub fn translate(spec: &ContainerSpec, container_id: &str) -> Result<GuestSpec, SpecError> {
    let bad = |what: String| SpecError::Unsupported {
        path: spec.path.clone(),
        what,
    };
    let mut v = spec.raw.clone();
    let obj = v
        .as_object_mut()
        .ok_or_else(|| bad("the spec is not a JSON object".into()))?;
    let readonly = spec.read_only;
    obj.insert(
        "root".into(),
        serde_json::json!({"path": guest_rootfs_path(container_id), "readonly": readonly}),
    );
    obj.remove("hooks");
    let mut volumes = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        for (i, m) in mounts.iter_mut().enumerate() {
            if !is_bind(m) {
                continue;
            }
            let dest = m.get("destination").and_then(Value::as_str).unwrap_or("").to_string();
            let src = m.get("source").and_then(Value::as_str).unwrap_or("").to_string();
            if src.is_empty() || !src.starts_with('/') {
                return Err(bad(format!(
                    "mount {i} (destination {dest:?}): a bind mount needs an absolute host source, got {src:?}"
                )));
            }
            if std::fs::symlink_metadata(&src).is_err() {
                return Err(bad(format!(
                    "mount {i} (destination {dest:?}): bind source {src} does not exist"
                )));
            }
            let guest = guest_volume_path(container_id, volumes.len());
            volumes.push(VolumeShare {
                host_path: PathBuf::from(&src),
                read_only: has_option(m, "ro"),
            });
            m["source"] = Value::String(guest);
        }
    }
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("cgroupsPath");
        // The pod's IPC and UTS namespaces are the guest's (one VM per pod): the sandbox
        // container's (which CRI creates new) and those an app container joins by path.
        let pod_sandbox = spec.annotations.iter().any(|(k, v)| k == CRI_CONTAINER_TYPE && v == "sandbox");
        if let Some(ns) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            for n in ns.iter_mut() {
                if let Some(n) = n.as_object_mut() {
                    let ty = n.get("type").and_then(Value::as_str).unwrap_or("");
                    let pod_ipc_uts = matches!(ty, "ipc" | "uts") && (pod_sandbox || n.contains_key("path"));
                    // A network namespace path (the pod's) means the guest's namespace there.
                    if ty == "network" && n.contains_key("path") {
                        n.insert("path".into(), Value::String("/proc/1/ns/net".into()));
                    } else if pod_ipc_uts {
                        n.insert("path".into(), Value::String(format!("/proc/1/ns/{ty}")));
                    } else {
                        n.remove("path");
                    }
                }
            }
        }
    }
    let json = serde_json::to_string(&v).map_err(|e| bad(format!("serialize: {e}")))?;
    Ok(GuestSpec { json, volumes })
}

/// Checks containerd's exec process spec (an OCI `process` object as JSON) and returns it
/// re-serialized for `ExecProcessRequest.oci_process_json`, with the parts the flat fields need.
pub fn parse_process(bytes: &[u8]) -> Result<ExecSpec, SpecError> {
    let what = "exec process spec";
    let p: oci_spec::runtime::Process = serde_json::from_slice(bytes).map_err(|e| SpecError::Invalid {
        path: what.into(),
        reason: e.to_string(),
    })?;
    let argv = p.args().clone().unwrap_or_default();
    if argv.is_empty() || argv[0].is_empty() {
        return Err(SpecError::Unsupported {
            path: what.into(),
            what: "process.args is empty".into(),
        });
    }
    Ok(ExecSpec {
        json: String::from_utf8_lossy(bytes).into_owned(),
        argv,
        env: p.env().clone().unwrap_or_default(),
        cwd: p.cwd().display().to_string(),
        terminal: p.terminal().unwrap_or(false),
    })
}

/// An exec's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    pub json: String,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub terminal: bool,
}

/// Parses the bytes of a `config.json`; `path` is only used in messages.
pub fn parse(bytes: &[u8], path: &str) -> Result<ContainerSpec, SpecError> {
    let raw: Value = serde_json::from_slice(bytes).map_err(|e| SpecError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let spec: oci_spec::runtime::Spec = serde_json::from_value(raw.clone()).map_err(|e| SpecError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let process = spec.process().as_ref().ok_or_else(|| SpecError::Unsupported {
        path: path.into(),
        what: "no process: nothing to run".into(),
    })?;
    let argv = process.args().clone().unwrap_or_default();
    if argv.is_empty() || argv[0].is_empty() {
        return Err(SpecError::Unsupported {
            path: path.into(),
            what: "process.args is empty".into(),
        });
    }
    let sandbox_id = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(CRI_SANDBOX_ID))
        .filter(|s| !s.is_empty())
        .cloned();
    let mut annotations: Vec<(String, String)> =
        spec.annotations().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
    annotations.sort();
    Ok(ContainerSpec {
        annotations,
        argv,
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().display().to_string(),
        terminal: process.terminal().unwrap_or(false),
        hostname: spec.hostname().clone().unwrap_or_default(),
        read_only: spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false),
        sandbox_id,
        raw,
        path: path.into(),
    })
}

/// Reads and parses `<bundle>/config.json` (blocking: call it off the async runtime).
pub fn load(bundle: &Path) -> Result<ContainerSpec, SpecError> {
    let p = bundle.join("config.json");
    let path = p.display().to_string();
    let bytes = std::fs::read(&p).map_err(|e| SpecError::Read {
        path: path.clone(),
        source: e,
    })?;
    parse(&bytes, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_dir_is_the_agents() {
        assert_eq!(GUEST_SHARED_DIR, joey_agent_protocol::GUEST_SHARED_DIR);
        assert_eq!(guest_rootfs_path("c1"), "/run/joey/shared/c1/rootfs");
        assert_eq!(guest_volume_path("c1", 2), "/run/joey/shared/c1/volumes/2");
    }

    const GOOD: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0},
                    "args": ["sh", "-c", "exit 3"], "env": ["PATH=/bin"], "cwd": "/tmp"},
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "h1",
        "annotations": {"io.kubernetes.cri.sandbox-id": "sb1"}
    }"#;

    #[test]
    fn parses_process_root_and_annotation() {
        let s = parse(GOOD.as_bytes(), "config.json").expect("valid");
        assert_eq!(s.argv, vec!["sh", "-c", "exit 3"]);
        assert_eq!(s.env, vec!["PATH=/bin"]);
        assert_eq!(s.cwd, "/tmp");
        assert!(!s.terminal);
        assert!(s.read_only);
        assert_eq!(s.hostname, "h1");
        assert_eq!(s.sandbox_id.as_deref(), Some("sb1"));
    }

    #[test]
    fn malformed_json_is_a_clear_error() {
        let e = parse(b"{not json", "/b/config.json").unwrap_err();
        assert!(matches!(e, SpecError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("/b/config.json"), "{e}");
    }

    #[test]
    fn missing_or_empty_args_is_refused() {
        let no_proc = r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#;
        assert!(matches!(parse(no_proc.as_bytes(), "c").unwrap_err(), SpecError::Unsupported { .. }));
        let empty = r#"{"ociVersion": "1.0.2", "process": {"user": {"uid": 0, "gid": 0}, "args": [], "cwd": "/"}}"#;
        assert!(matches!(parse(empty.as_bytes(), "c").unwrap_err(), SpecError::Unsupported { .. }));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let d = std::env::temp_dir().join("joey-shim-spec-test-none");
        assert!(matches!(load(&d).unwrap_err(), SpecError::Read { .. }));
    }

    fn spec_with(extra_mounts: &str, extra_linux: &str) -> String {
        format!(
            r#"{{
            "ociVersion": "1.0.2",
            "process": {{"user": {{"uid": 0, "gid": 0}}, "args": ["sh"], "cwd": "/",
                        "rlimits": [{{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}}],
                        "capabilities": {{"bounding": ["CAP_KILL"]}}}},
            "root": {{"path": "/run/containerd/x/rootfs", "readonly": false}},
            "hooks": {{"prestart": [{{"path": "/usr/bin/host-hook"}}]}},
            "mounts": [{{"destination": "/proc", "type": "proc", "source": "proc"}}{extra_mounts}],
            "linux": {{"cgroupsPath": "/default/c1",
                      "namespaces": [{{"type": "pid"}}, {{"type": "network", "path": "/proc/1/ns/net"}}],
                      "resources": {{"memory": {{"limit": 1048576}}}},
                      "maskedPaths": ["/proc/kcore"]{extra_linux}}}
        }}"#
        )
    }

    #[test]
    fn translate_rewrites_root_binds_and_drops_host_parts() {
        let d = tempfile::tempdir().unwrap();
        let src_ro = d.path().join("ro");
        std::fs::create_dir(&src_ro).unwrap();
        let src_rw = d.path().join("rw.txt");
        std::fs::write(&src_rw, b"x").unwrap();
        let mounts = format!(
            r#", {{"destination": "/data", "type": "bind", "source": "{}", "options": ["rbind", "ro"]}},
                {{"destination": "/etc/f", "type": "none", "source": "{}", "options": ["bind", "rw"]}},
                {{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}}"#,
            src_ro.display(),
            src_rw.display()
        );
        let s = parse(spec_with(&mounts, "").as_bytes(), "config.json").unwrap();
        let g = translate(&s, "c1").unwrap();
        assert_eq!(
            g.volumes,
            vec![
                VolumeShare { host_path: src_ro.clone(), read_only: true },
                VolumeShare { host_path: src_rw.clone(), read_only: false },
            ]
        );
        let v: Value = serde_json::from_str(&g.json).unwrap();
        assert_eq!(v["root"], serde_json::json!({"path": "/run/joey/shared/c1/rootfs", "readonly": false}));
        assert_eq!(v["mounts"][0]["source"], "proc");
        assert_eq!(v["mounts"][1]["source"], "/run/joey/shared/c1/volumes/0");
        assert_eq!(v["mounts"][1]["options"], serde_json::json!(["rbind", "ro"]));
        assert_eq!(v["mounts"][2]["source"], "/run/joey/shared/c1/volumes/1");
        assert_eq!(v["mounts"][3]["source"], "tmpfs");
        assert!(v.get("hooks").is_none());
        assert!(v["linux"].get("cgroupsPath").is_none());
        assert_eq!(
            v["linux"]["namespaces"],
            serde_json::json!([{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}])
        );
        // Kept as is.
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 1048576);
        assert_eq!(v["linux"]["maskedPaths"], serde_json::json!(["/proc/kcore"]));
        assert_eq!(v["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(v["process"]["capabilities"]["bounding"], serde_json::json!(["CAP_KILL"]));
    }

    /// A CRI pod's IPC and UTS namespaces are the guest's: the sandbox container's (new in its
    /// spec) and an app container's (a path to the pause process's); elsewhere paths go.
    #[test]
    fn translate_maps_pod_ipc_and_uts_to_the_guest() {
        let ns = |annotations: &str, namespaces: &str| {
            let json = format!(
                r#"{{"ociVersion": "1.0.2", "process": {{"user": {{"uid": 0, "gid": 0}}, "args": ["sh"], "cwd": "/"}},
                "root": {{"path": "rootfs"}}, "annotations": {{{annotations}}},
                "linux": {{"namespaces": {namespaces}}}}}"#
            );
            let spec = parse(json.as_bytes(), "config.json").expect("valid");
            let v: Value = serde_json::from_str(&translate(&spec, "c1").expect("translate").json).unwrap();
            v["linux"]["namespaces"].clone()
        };
        let sandbox = ns(
            r#""io.kubernetes.cri.container-type": "sandbox""#,
            r#"[{"type": "ipc"}, {"type": "uts"}, {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]"#,
        );
        assert_eq!(
            sandbox,
            serde_json::json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "uts", "path": "/proc/1/ns/uts"},
                {"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}])
        );
        let app = ns(
            r#""io.kubernetes.cri.container-type": "container""#,
            r#"[{"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "pid"}]"#,
        );
        assert_eq!(
            app,
            serde_json::json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "uts", "path": "/proc/1/ns/uts"}, {"type": "pid"}])
        );
        let plain = ns("", r#"[{"type": "ipc"}, {"type": "uts"}, {"type": "pid", "path": "/proc/42/ns/pid"}]"#);
        assert_eq!(plain, serde_json::json!([{"type": "ipc"}, {"type": "uts"}, {"type": "pid"}]));
    }

    #[test]
    fn translate_refuses_a_bind_with_a_missing_or_relative_source() {
        let m = r#", {"destination": "/data", "type": "bind", "source": "/nonexistent/joey-src", "options": ["rbind"]}"#;
        let s = parse(spec_with(m, "").as_bytes(), "/b/config.json").unwrap();
        let e = translate(&s, "c1").unwrap_err().to_string();
        assert_eq!(
            e,
            "/b/config.json: mount 1 (destination \"/data\"): bind source /nonexistent/joey-src does not exist"
        );
        let m = r#", {"destination": "/data", "type": "bind", "source": "rel", "options": ["rbind"]}"#;
        let s = parse(spec_with(m, "").as_bytes(), "c").unwrap();
        let e = translate(&s, "c1").unwrap_err().to_string();
        assert!(e.contains("absolute host source") && e.contains("\"rel\""), "{e}");
    }

    #[test]
    fn invalid_rlimit_type_is_named() {
        let bad = spec_with("", "").replace("RLIMIT_NOFILE", "RLIMIT_BOGUS");
        let e = parse(bad.as_bytes(), "c").unwrap_err();
        assert!(matches!(e, SpecError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("RLIMIT_BOGUS"), "{e}");
    }

    #[test]
    fn exec_process_spec() {
        let p = parse_process(br#"{"args": ["echo", "hi"], "env": ["A=1"], "cwd": "/tmp", "terminal": true,
                                   "user": {"uid": 0, "gid": 0}}"#)
            .unwrap();
        assert_eq!(p.argv, vec!["echo", "hi"]);
        assert_eq!(p.env, vec!["A=1"]);
        assert_eq!(p.cwd, "/tmp");
        assert!(p.terminal);
        assert!(parse_process(br#"{"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#).is_err());
        assert!(parse_process(b"nope").is_err());
    }
}
