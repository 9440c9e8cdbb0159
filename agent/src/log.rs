//! Minimal logging: one line per message on stderr, prefixed with `joey-agent:`.
//!
//! As PID 1 stderr is `/dev/console` (the serial console of the microVM); in `--listen` mode it is
//! whatever the caller gave us. Write errors are ignored: logging must never take the agent down
//! (`eprintln!` would panic on e.g. EIO).

use std::io::Write;

/// Prefix of every line the agent prints.
pub const PREFIX: &str = "joey-agent:";

/// Writes one log line. Use the [`agent_log!`] macro instead of calling this directly.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    let line = format!("{PREFIX} {args}\n");
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
}

/// `agent_log!("fmt", args..)`: logs one line with the `joey-agent:` prefix.
macro_rules! agent_log {
    ($($arg:tt)*) => {
        $crate::log::write_line(format_args!($($arg)*))
    };
}
