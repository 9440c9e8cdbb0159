// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The token bucket's arithmetic: any size, rate, burst and sequence of (time step, request)
//! keeps the budget within the bucket and grants no more than the burst, the initial bucket
//! and the refill over the elapsed time allow (plus one request's overshoot into debt).
#![no_main]

use joey_fuzz::Input;
use joey_vmm_core::rate_limiter::{BucketConfig, TokenBucket};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let cfg = BucketConfig {
        rate: input.u64(),
        one_time_burst: input.u64(),
        refill_time_ms: u64::from(input.u32()),
    };
    let Ok(mut b) = TokenBucket::new(cfg, 0) else {
        assert!(cfg.size() == 0);
        return;
    };
    let mut now = 0u64;
    let mut granted = 0u128;
    let mut largest = 0u128;
    while !input.is_empty() {
        now = now.saturating_add(u64::from(input.u32()));
        let tokens = input.u64();
        b.refill(now);
        assert!(b.budget() <= i128::from(b.size()));
        let wait = b.wait_ns(tokens);
        if b.can_take(tokens) {
            assert_eq!(wait, 0);
            b.take(tokens);
            granted += u128::from(tokens);
            largest = largest.max(u128::from(tokens));
        } else {
            assert!(wait > 0);
        }
    }
    let refilled = u128::from(now) * u128::from(cfg.rate) / 1_000_000_000;
    let max = u128::from(cfg.one_time_burst) + u128::from(b.size()) + refilled + largest;
    assert!(granted <= max, "granted {granted} > {max}");
});
