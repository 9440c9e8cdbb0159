// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Decoding of the agent's requests (the protobuf payloads of `AgentService`'s RPCs).

use joey_agent_protocol::agent::*;
use protobuf::Message;

/// Decodes `payload` as `M`; a message that decodes must re-encode and decode to itself.
fn round_trip<M: Message + PartialEq + std::fmt::Debug>(payload: &[u8]) {
    let Ok(m) = M::parse_from_bytes(payload) else {
        return;
    };
    let bytes = m.write_to_bytes().expect("a decoded message encodes");
    let again = M::parse_from_bytes(&bytes).expect("an encoded message decodes");
    assert_eq!(again, m);
}

/// Decodes `payload` as the request type number `which` (modulo the number of types).
pub fn decode(which: u8, payload: &[u8]) {
    match which % 14 {
        0 => round_trip::<Empty>(payload),
        1 => round_trip::<CheckRequest>(payload),
        2 => round_trip::<ExecProcessRequest>(payload),
        3 => round_trip::<WaitProcessRequest>(payload),
        4 => round_trip::<SignalProcessRequest>(payload),
        5 => round_trip::<WriteStdinRequest>(payload),
        6 => round_trip::<CloseStdinRequest>(payload),
        7 => round_trip::<ReadOutputRequest>(payload),
        8 => round_trip::<DestroySandboxRequest>(payload),
        9 => round_trip::<CreateContainerRequest>(payload),
        10 => round_trip::<ContainerRequest>(payload),
        11 => round_trip::<UpdateContainerRequest>(payload),
        12 => round_trip::<ResizeTerminalRequest>(payload),
        _ => round_trip::<ConfigureNetworkRequest>(payload),
    }
}
