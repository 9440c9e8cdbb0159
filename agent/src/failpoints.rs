//! Failpoints for the fault-injection harness (docs/faults.md), compiled in only with the
//! `failpoints` cargo feature (the `fail` crate); a release agent has none.
//!
//! The host names them on the kernel command line (through `hypervisor.kernel_params`):
//! `joey.failpoints=<rpc>=<action>[;<rpc>=<action>...]`, where `<rpc>` is an agent RPC's method
//! name (`exec_process`, `create_container`, ...) and `<action>` one of
//!
//! - `return(error)`: the RPC fails with INTERNAL "failpoint agent::<rpc>";
//! - `return(crash)`: the agent aborts (PID 1 dies: the guest kernel panics and the VM ends);
//! - `return(hang)`: the RPC never answers (the host's deadline ends the wait);
//! - `return(delay:<ms>)`: the RPC is served `<ms>` milliseconds late (an async sleep: the
//!   agent's other RPCs go on meanwhile, unlike the `fail` crate's blocking `sleep(<ms>)`);
//! - any other action of the `fail` crate (`off`, `1*return(error)`, ...).

use crate::service::ServiceError;

/// The kernel command-line parameter naming the failpoints.
pub const PARAM: &str = "joey.failpoints";

/// The `(failpoint, action)` pairs of `joey.failpoints=` on the kernel command line `cmdline`
/// (the last such parameter counts), each failpoint named `agent::<rpc>`.
pub fn parse(cmdline: &str) -> Result<Vec<(String, String)>, String> {
    let Some(v) = cmdline
        .split_whitespace()
        .rev()
        .find_map(|p| p.strip_prefix(PARAM)?.strip_prefix('='))
    else {
        return Ok(Vec::new());
    };
    v.split(';')
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('=') {
            Some((rpc, action)) if !rpc.is_empty() && !action.is_empty() => {
                Ok((format!("agent::{rpc}"), action.to_string()))
            }
            _ => Err(format!(
                "invalid {PARAM} item {item:?} (expected <rpc>=<action>)"
            )),
        })
        .collect()
}

/// Configures the failpoints the kernel command line names; logs what it did.
pub fn setup(cmdline: &str) {
    let points = match parse(cmdline) {
        Ok(p) if p.is_empty() => return,
        Ok(p) => p,
        Err(e) => {
            agent_log!("{e}; no failpoints");
            return;
        }
    };
    #[cfg(feature = "failpoints")]
    for (name, action) in points {
        match fail::cfg(&name, &action) {
            Ok(()) => agent_log!("failpoint {name} = {action}"),
            Err(e) => agent_log!("failpoint {name} = {action}: {e}"),
        }
    }
    #[cfg(not(feature = "failpoints"))]
    agent_log!(
        "{PARAM} ignored ({} failpoints): this agent was built without the failpoints feature",
        points.len()
    );
}

/// The milliseconds of a `delay:<ms>` return argument.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn delay_ms(arg: &str) -> Option<u64> {
    arg.strip_prefix("delay:")?.parse().ok()
}

/// Failpoint `agent::<rpc>`, evaluated before the RPC is served: `Err` ends the RPC with it.
pub async fn inject(rpc: &str) -> Result<(), ServiceError> {
    #[cfg(feature = "failpoints")]
    {
        let name = format!("agent::{rpc}");
        match fail::eval(&name, |arg| arg) {
            None => {}
            Some(Some(a)) if a == "crash" => {
                agent_log!("failpoint {name}: crash");
                std::process::abort();
            }
            Some(Some(a)) if a == "hang" => {
                agent_log!("failpoint {name}: hang");
                std::future::pending::<()>().await;
            }
            Some(a) => match a.as_deref().and_then(delay_ms) {
                Some(ms) => {
                    agent_log!("failpoint {name}: delay {ms} ms");
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                None => return Err(ServiceError::Internal(format!("failpoint {name}"))),
            },
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = rpc;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoints_on_the_kernel_command_line() {
        assert_eq!(parse("console=ttyS0 quiet"), Ok(vec![]));
        assert_eq!(
            parse(
                "quiet joey.failpoints=exec_process=return(crash);create_container=1*return(error)"
            ),
            Ok(vec![
                ("agent::exec_process".into(), "return(crash)".into()),
                ("agent::create_container".into(), "1*return(error)".into()),
            ])
        );
        assert_eq!(
            parse("joey.failpoints=check=return(hang) joey.failpoints=version=return(error)"),
            Ok(vec![("agent::version".into(), "return(error)".into())])
        );
        assert!(parse("joey.failpoints=exec_process")
            .unwrap_err()
            .contains("exec_process"));
        assert!(parse("joey.failpoints==return").is_err());
    }

    #[test]
    fn delay_arguments() {
        assert_eq!(delay_ms("delay:3000"), Some(3000));
        assert_eq!(delay_ms("delay:"), None);
        assert_eq!(delay_ms("delay:-1"), None);
        assert_eq!(delay_ms("hang"), None);
    }

    #[cfg(feature = "failpoints")]
    #[tokio::test]
    async fn return_error_fails_the_rpc_and_off_lets_it_through() {
        assert!(inject("test_rpc").await.is_ok());
        fail::cfg("agent::test_rpc", "return(error)").unwrap();
        let e = inject("test_rpc").await.unwrap_err();
        assert_eq!(e.to_string(), "internal error: failpoint agent::test_rpc");
        fail::cfg("agent::test_rpc", "off").unwrap();
        assert!(inject("test_rpc").await.is_ok());
    }

    #[cfg(feature = "failpoints")]
    #[tokio::test]
    async fn delay_serves_the_rpc_late() {
        fail::cfg("agent::test_delay", "return(delay:200)").unwrap();
        let t0 = std::time::Instant::now();
        assert!(inject("test_delay").await.is_ok());
        assert!(t0.elapsed() >= std::time::Duration::from_millis(200));
        fail::cfg("agent::test_delay", "off").unwrap();
    }
}
