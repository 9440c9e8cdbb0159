//! `[hypervisor.rate_limits]` (joey-config's keys) as the device models' limiter settings
//! (joey-vmm-core's token buckets).

use joey_config::{LimitConfig, RxTxLimits};
use joey_vmm_core::rate_limiter::{BucketConfig, LimiterConfig, RxTxLimiterConfig};

/// One queue direction's buckets: bandwidth in bytes, ops in operations, one refill time.
pub fn limiter(l: &LimitConfig) -> LimiterConfig {
    LimiterConfig {
        bandwidth: BucketConfig {
            rate: l.bandwidth_bytes_per_s,
            one_time_burst: l.bandwidth_burst_bytes,
            refill_time_ms: l.refill_time_ms,
        },
        ops: BucketConfig {
            rate: l.ops_per_s,
            one_time_burst: l.ops_burst,
            refill_time_ms: l.refill_time_ms,
        },
    }
}

/// Both directions of a device.
pub fn rx_tx(l: &RxTxLimits) -> RxTxLimiterConfig {
    RxTxLimiterConfig {
        rx: limiter(&l.rx),
        tx: limiter(&l.tx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_buckets() {
        assert!(!rx_tx(&RxTxLimits::default()).is_limited());
        let l = RxTxLimits {
            rx: LimitConfig::default(),
            tx: LimitConfig {
                bandwidth_bytes_per_s: 1000,
                bandwidth_burst_bytes: 10,
                ops_per_s: 20,
                ops_burst: 2,
                refill_time_ms: 50,
            },
        };
        let c = rx_tx(&l);
        assert!(!c.rx.is_limited());
        assert_eq!(
            c.tx,
            LimiterConfig {
                bandwidth: BucketConfig {
                    rate: 1000,
                    one_time_burst: 10,
                    refill_time_ms: 50
                },
                ops: BucketConfig {
                    rate: 20,
                    one_time_burst: 2,
                    refill_time_ms: 50
                },
            }
        );
        assert_eq!((c.tx.bandwidth.size(), c.tx.ops.size()), (50, 1));
    }
}
