//! `[debug]`: knobs for testing joey itself (docs/config.md). Empty by default; a production
//! config leaves this section out.

use serde::{Deserialize, Serialize};

/// Tasks of the `fail` crate's action syntax (`[<p>%][<cnt>*]<task>[(<arg>)]`, chained with
/// `->`).
const TASKS: &[&str] = &[
    "off", "return", "sleep", "panic", "print", "pause", "yield", "delay",
];

/// `[debug]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DebugConfig {
    /// Host failpoints set when the shim's serving process, `joeyctl run` or `joeyctl boot`
    /// starts: `<area>::<point>=<action>[;...]` (docs/faults.md lists the names). Only a build
    /// with the `failpoints` cargo feature has them: any other refuses to start when this is
    /// not empty.
    pub failpoints: String,
}

impl DebugConfig {
    /// The `(name, action)` pairs of [`DebugConfig::failpoints`], or why it is malformed (the
    /// message names no key).
    pub fn failpoint_pairs(&self) -> Result<Vec<(String, String)>, String> {
        parse_failpoints(&self.failpoints)
    }
}

/// Parses `<area>::<point>=<action>[;<area>::<point>=<action>...]` (empty items are skipped).
pub fn parse_failpoints(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split(';')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(|item| {
            let (name, action) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not <area>::<point>=<action>"))?;
            let (name, action) = (name.trim(), action.trim());
            let valid_name = name.split_once("::").is_some_and(|(a, p)| {
                [a, p].iter().all(|w| {
                    !w.is_empty()
                        && w.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                })
            });
            if !valid_name {
                return Err(format!(
                    "{name:?} is not a failpoint name (<area>::<point>, lower case)"
                ));
            }
            check_action(action).map_err(|e| format!("{name}: {e}"))?;
            Ok((name.to_string(), action.to_string()))
        })
        .collect()
}

/// Checks an action of the `fail` crate: `[<p>%][<cnt>*]<task>[(<arg>)]`, chained with `->`.
fn check_action(action: &str) -> Result<(), String> {
    if action.is_empty() {
        return Err("empty action".into());
    }
    for step in action.split("->") {
        let bad = || format!("{step:?} is not [<p>%][<cnt>*]<task>[(<arg>)]");
        let mut rest = step.trim();
        if let Some((p, r)) = rest.split_once('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&p) {
                return Err(bad());
            }
            rest = r;
        }
        if let Some((n, r)) = rest.split_once('*') {
            n.trim().parse::<usize>().map_err(|_| bad())?;
            rest = r;
        }
        let task = match rest.split_once('(') {
            Some((t, arg)) if arg.ends_with(')') => t,
            Some(_) => return Err(bad()),
            None => rest,
        };
        if !TASKS.contains(&task.trim()) {
            return Err(format!(
                "{:?} is not a task ({})",
                task.trim(),
                TASKS.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoint_lists_parse() {
        assert_eq!(parse_failpoints(""), Ok(vec![]));
        assert_eq!(
            parse_failpoints("vsock::tx=return(drop); vmm::vcpu_run=1*panic;"),
            Ok(vec![
                ("vsock::tx".into(), "return(drop)".into()),
                ("vmm::vcpu_run".into(), "1*panic".into()),
            ])
        );
        assert_eq!(
            parse_failpoints("fs::request=50%2*return(eio)->off"),
            Ok(vec![("fs::request".into(), "50%2*return(eio)->off".into())])
        );
        assert_eq!(
            parse_failpoints("vmm::event_loop=sleep(100)"),
            Ok(vec![("vmm::event_loop".into(), "sleep(100)".into())])
        );
    }

    #[test]
    fn malformed_failpoint_lists_are_named() {
        for (s, want) in [
            ("vsock::tx", "is not <area>::<point>=<action>"),
            ("tx=panic", "is not a failpoint name"),
            ("Vsock::tx=panic", "is not a failpoint name"),
            ("vsock::=panic", "is not a failpoint name"),
            ("vsock::tx=", "vsock::tx: empty action"),
            ("vsock::tx=explode", "\"explode\" is not a task"),
            ("vsock::tx=x*panic", "is not [<p>%]"),
            ("vsock::tx=200%panic", "is not [<p>%]"),
            ("vsock::tx=return(x", "is not [<p>%]"),
        ] {
            let e = parse_failpoints(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
