//! Logging set-up shared by joey's binaries.
//!
//! The level is `runtime.log_level` from the config (docs/config.md), for `joeyctl`,
//! `joey-monitor` and `containerd-shim-joey-v2` alike. `$JOEY_LOG` (tracing's filter syntax,
//! e.g. `debug` or `joey_actors=trace`) overrides it for one process; a flag that asks for more
//! (`joeyctl run -v`, `joey-monitor -v`, containerd's `-debug` for the shim) raises it to at
//! least `info` (`debug` for `-debug`), never lowers it.

use tracing_subscriber::EnvFilter;

/// Environment variable that overrides the configured level.
pub const LOG_ENV: &str = "JOEY_LOG";

/// Levels from quietest to loudest (the values `runtime.log_level` accepts).
const LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

fn rank(level: &str) -> usize {
    LEVELS.iter().position(|l| *l == level).unwrap_or(1)
}

/// `level`, raised to `floor` when `floor` is louder.
pub fn at_least<'a>(level: &'a str, floor: &'a str) -> &'a str {
    if rank(floor) > rank(level) {
        floor
    } else {
        level
    }
}

/// The filter for a process: `$JOEY_LOG` when it is set and valid, else `level`.
pub fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new(directives(level)))
}

/// The filter directives for `level`: ttrpc's own records only at debug and trace. It logs its
/// side of failures joey reports itself, as errors (a request that timed out and whose reply
/// came late: "ERROR The request has returned"), which would break `joeyctl`'s one error line.
fn directives(level: &str) -> String {
    if rank(level) >= rank("debug") {
        level.to_string()
    } else {
        format!("{level},ttrpc=off")
    }
}

/// Logs to stderr (joeyctl, joey-monitor) at `level` (see [`filter`]).
pub fn init_stderr(level: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr)
        // Colour only for a terminal: escape codes in a log file or a pipe are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_raise_never_lower() {
        assert_eq!(at_least("warn", "info"), "info");
        assert_eq!(at_least("error", "info"), "info");
        assert_eq!(at_least("debug", "info"), "debug");
        assert_eq!(at_least("trace", "debug"), "trace");
        assert_eq!(at_least("info", "info"), "info");
    }

    #[test]
    fn ttrpc_records_only_when_debugging() {
        assert_eq!(directives("error"), "error,ttrpc=off");
        assert_eq!(directives("warn"), "warn,ttrpc=off");
        assert_eq!(directives("info"), "info,ttrpc=off");
        assert_eq!(directives("debug"), "debug");
        assert_eq!(directives("trace"), "trace");
    }

    #[test]
    fn every_config_level_is_known() {
        for l in LEVELS {
            assert_eq!(at_least(l, l), *l);
            EnvFilter::try_new(l).unwrap();
        }
    }
}
