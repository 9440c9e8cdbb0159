//! `[hypervisor.rate_limits]`: token-bucket rate limits of the guest's devices (Firecracker's
//! model, see docs/config.md). Every limit is 0 (unlimited) by default.

use serde::{Deserialize, Serialize};

/// Longest refill time accepted.
pub const MAX_REFILL_TIME_MS: u64 = 60_000;

/// The limits of one device queue direction: a bandwidth bucket and an operations bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitConfig {
    /// Bytes per second (0: unlimited).
    pub bandwidth_bytes_per_s: u64,
    /// Bytes granted once, on top of the bucket, before the rate applies.
    pub bandwidth_burst_bytes: u64,
    /// Operations (frames, requests, packets) per second (0: unlimited).
    pub ops_per_s: u64,
    /// Operations granted once before the rate applies.
    pub ops_burst: u64,
    /// Time for an empty bucket to refill completely, in ms: a bucket holds `rate *
    /// refill_time_ms / 1000` tokens, which is how much can go at once.
    pub refill_time_ms: u64,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            bandwidth_bytes_per_s: 0,
            bandwidth_burst_bytes: 0,
            ops_per_s: 0,
            ops_burst: 0,
            refill_time_ms: 100,
        }
    }
}

impl LimitConfig {
    /// Whether anything is limited.
    pub fn is_limited(&self) -> bool {
        self.bandwidth_bytes_per_s != 0 || self.ops_per_s != 0
    }

    /// `refill_time_ms` in 1..=60000 and every limited bucket holding at least one token.
    /// Returns the bad key's last component and the message.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if !(1..=MAX_REFILL_TIME_MS).contains(&self.refill_time_ms) {
            return Err((
                "refill_time_ms",
                format!(
                    "{} is out of range (valid: 1..={MAX_REFILL_TIME_MS})",
                    self.refill_time_ms
                ),
            ));
        }
        for (key, rate) in [
            ("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s),
            ("ops_per_s", self.ops_per_s),
        ] {
            let tokens = u128::from(rate) * u128::from(self.refill_time_ms) / 1000;
            if rate != 0 && tokens == 0 {
                return Err((
                    key,
                    format!(
                        "{rate}/s over refill_time_ms = {} is less than one token (0: unlimited)",
                        self.refill_time_ms
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Limits of a device with a receive (host → guest) and a transmit (guest → host) side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RxTxLimits {
    pub rx: LimitConfig,
    pub tx: LimitConfig,
}

/// `[hypervisor.rate_limits]`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Every virtio-net interface of the sandbox, each on its own.
    pub net: RxTxLimits,
    /// The vsock device (the agent's RPCs and the containers' I/O streams): `rx` packets to the
    /// guest, `tx` packets from it; bandwidth counts payload bytes.
    pub vsock: RxTxLimits,
    /// Every virtio-blk device (requests and their data bytes; built-in VMM only, and joey
    /// attaches no disk to a sandbox today).
    pub blk: LimitConfig,
}

impl RateLimitsConfig {
    /// Checks every limit; on error returns the full key (`hypervisor.rate_limits.…`) and the
    /// message.
    pub fn check(&self) -> Result<(), (String, String)> {
        for (name, l) in [
            ("net.rx", &self.net.rx),
            ("net.tx", &self.net.tx),
            ("vsock.rx", &self.vsock.rx),
            ("vsock.tx", &self.vsock.tx),
            ("blk", &self.blk),
        ] {
            l.check()
                .map_err(|(key, msg)| (format!("hypervisor.rate_limits.{name}.{key}"), msg))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_by_default_and_checked() {
        let c = RateLimitsConfig::default();
        assert!(!c.net.rx.is_limited() && !c.net.tx.is_limited());
        assert_eq!(c.check(), Ok(()));
        let mut c = RateLimitsConfig::default();
        c.net.tx.bandwidth_bytes_per_s = 1_000_000;
        assert!(c.net.tx.is_limited());
        assert_eq!(c.check(), Ok(()));
        c.net.tx.refill_time_ms = 0;
        assert_eq!(
            c.check(),
            Err((
                "hypervisor.rate_limits.net.tx.refill_time_ms".to_string(),
                "0 is out of range (valid: 1..=60000)".to_string()
            ))
        );
        let mut c = RateLimitsConfig::default();
        c.net.rx.ops_per_s = 5;
        c.net.rx.refill_time_ms = 100;
        assert_eq!(
            c.check(),
            Err((
                "hypervisor.rate_limits.net.rx.ops_per_s".to_string(),
                "5/s over refill_time_ms = 100 is less than one token (0: unlimited)".to_string()
            ))
        );
        let mut c = RateLimitsConfig::default();
        c.vsock.tx.refill_time_ms = 60_001;
        assert_eq!(
            c.check().unwrap_err().0,
            "hypervisor.rate_limits.vsock.tx.refill_time_ms"
        );
        let mut c = RateLimitsConfig::default();
        c.blk.bandwidth_bytes_per_s = 9;
        assert_eq!(
            c.check().unwrap_err().0,
            "hypervisor.rate_limits.blk.bandwidth_bytes_per_s"
        );
        c.blk.bandwidth_bytes_per_s = 10;
        assert!(c.blk.is_limited());
        assert_eq!(c.check(), Ok(()));
    }
}
