// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The agent's request decoding: the first byte picks an agent RPC, the rest is decoded as its
//! protobuf request (what the agent's ttrpc server does with a request's payload), and a
//! request that decodes re-encodes and decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    joey_fuzz::agent::decode(which, payload);
});
