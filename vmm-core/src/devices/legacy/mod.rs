//! Legacy PC devices of the built-in VMM: 8250 serial (COM1) and the i8042
//! controller (no keyboard or mouse: it answers the guest driver's probe and takes its
//! CPU-reset command).

pub mod capped_log;
pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{LogSink, RateLimit, SerialDevice};
