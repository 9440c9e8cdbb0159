//! What the shim needs from a bundle's OCI `config.json`: the process and root settings, and
//! the CRI sandbox grouping annotation.

use std::path::Path;

/// The OCI annotation CRI puts on every container of a pod.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

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
}

/// Parses the bytes of a `config.json`; `path` is only used in messages.
pub fn parse(bytes: &[u8], path: &str) -> Result<ContainerSpec, SpecError> {
    let spec: oci_spec::runtime::Spec = serde_json::from_slice(bytes).map_err(|e| SpecError::Invalid {
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
    Ok(ContainerSpec {
        argv,
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().display().to_string(),
        terminal: process.terminal().unwrap_or(false),
        hostname: spec.hostname().clone().unwrap_or_default(),
        read_only: spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false),
        sandbox_id,
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
}
