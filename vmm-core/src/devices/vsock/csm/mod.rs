// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The state machine of one vsock connection ("csm"), apart from the muxer that keeps the table
//! of connections and routes events to them (the split of Firecracker's `vsock/csm`).
//!
//! - [`connection`]: [`VsockConnection`], one connection's setup state, credit accounting,
//!   shutdown tracking, guest packets in and packets for the guest out;
//! - [`txbuf`]: [`TxBuf`](txbuf::TxBuf), the bounded buffer of guest data the host stream could
//!   not take yet.
//!
//! Flow control follows the virtio-vsock credit scheme: a connection never sends the guest more
//! than its advertised credit, advertises [`CONN_BUF_ALLOC`] bytes of buffer and keeps at most
//! that many bytes of guest data that the host stream could not take yet.

pub mod connection;
pub mod txbuf;

use std::io;

use vm_memory::VolatileMemoryError;

pub use connection::VsockConnection;

use super::packet::{VsockHeader, VSOCK_HOST_CID, VSOCK_OP_RST, VSOCK_TYPE_STREAM};

/// Receive buffer we advertise to the guest for every connection (bytes).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send an unsolicited credit update once this many bytes were forwarded since the last header.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Identifies a connection: (host side port, guest side port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on the host side (`src_port` of packets we send).
    pub local_port: u32,
    /// Port on the guest side (`dst_port` of packets we send).
    pub peer_port: u32,
}

/// Where a connection is in its setup. Each direction of an established connection may have
/// been shut down since; the connection tracks that apart (see [`VsockConnection`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host asked to connect; `OP_REQUEST` queued or sent, waiting for `OP_RESPONSE`.
    LocalInit,
    /// Guest asked to connect and the host socket accepted; `OP_RESPONSE` not sent yet.
    PeerInit,
    /// Data may flow.
    Established,
}

impl ConnState {
    /// Whether `self -> next` is a legal transition.
    pub fn can_transition_to(self, next: ConnState) -> bool {
        use ConnState::*;
        matches!(
            (self, next),
            (LocalInit, Established) | (PeerInit, Established)
        )
    }

    /// Checked transition.
    pub fn transition(self, next: ConnState) -> Result<ConnState, CsmError> {
        if self.can_transition_to(next) {
            Ok(next)
        } else {
            Err(CsmError::InvalidTransition {
                from: self,
                to: next,
            })
        }
    }
}

/// Why a connection has to be reset (host stream closed, `OP_RST` to the guest).
#[derive(Debug, thiserror::Error)]
pub enum CsmError {
    /// A packet asked for a state change the connection cannot make (e.g. a second
    /// `OP_RESPONSE`).
    #[error("invalid connection state transition {from:?} -> {to:?}")]
    InvalidTransition {
        /// The connection's state.
        from: ConnState,
        /// The state the packet asked for.
        to: ConnState,
    },
    /// The guest sent an op that is not valid in the connection's state.
    #[error("unexpected op {op} in state {state:?}")]
    UnexpectedOp {
        /// The `VSOCK_OP_*` of the packet.
        op: u16,
        /// The connection's state.
        state: ConnState,
    },
    /// The guest sent more data than the credit we advertised.
    #[error("guest exceeded its credit ({len} bytes, {free} free)")]
    CreditExceeded {
        /// Payload length of the packet.
        len: usize,
        /// Buffer space left.
        free: usize,
    },
    /// A guest data buffer could not be accessed.
    #[error("bad guest data slice: {0}")]
    GuestMemory(#[source] VolatileMemoryError),
    /// Writing to the host stream failed (a zero-length write is `WriteZero`).
    #[error("host stream write failed: {0}")]
    HostWrite(#[source] io::Error),
    /// The `OK <port>` line did not fit in the fresh host stream's send buffer.
    #[error("short write of the OK line ({written} of {len} bytes)")]
    ShortOkLine {
        /// Bytes written.
        written: usize,
        /// Length of the line.
        len: usize,
    },
    /// Epoll reported an error condition on the host stream.
    #[error("host stream error")]
    HostStream,
}

/// What the muxer does with a connection after it handled a packet or produced one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnAction {
    /// It stays in the table.
    Keep,
    /// It is gone on both sides: forget it without telling the guest.
    Forget,
}

/// The `OP_RST` the host sends for connection `key` of guest `guest_cid`.
pub fn rst_header(key: ConnKey, guest_cid: u64) -> VsockHeader {
    VsockHeader {
        src_cid: VSOCK_HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        len: 0,
        type_: VSOCK_TYPE_STREAM,
        op: VSOCK_OP_RST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_setup_states_become_established() {
        use ConnState::*;
        assert_eq!(LocalInit.transition(Established).unwrap(), Established);
        assert_eq!(PeerInit.transition(Established).unwrap(), Established);
        for (from, to) in [
            (Established, Established),
            (Established, LocalInit),
            (LocalInit, PeerInit),
            (PeerInit, LocalInit),
            (LocalInit, LocalInit),
        ] {
            let e = from.transition(to).unwrap_err();
            assert!(
                matches!(e, CsmError::InvalidTransition { from: f, to: t } if f == from && t == to),
                "{e}"
            );
        }
    }

    #[test]
    fn rst_header_addresses_the_guest_side() {
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 1024,
        };
        let h = rst_header(key, 7);
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (VSOCK_HOST_CID, 7, 1 << 30, 1024)
        );
        assert_eq!(
            (h.op, h.type_, h.buf_alloc, h.fwd_cnt),
            (VSOCK_OP_RST, 1, 0, 0)
        );
    }
}
