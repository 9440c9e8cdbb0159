// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The muxer's rx queue: what waits for a guest receive buffer.
//!
//! Two kinds of entries: `OP_RST` headers that answer packets matching no connection (or close
//! one the muxer dropped), sent first and bounded by [`MAX_PENDING_RST`]; and the keys of
//! connections with pending packets, served round robin (a connection is queued at most once,
//! see [`VsockConnection::claim_rxq_slot`](super::super::csm::VsockConnection::claim_rxq_slot),
//! so that part is bounded by the connection table).

use std::collections::VecDeque;

use tracing::warn;

use super::super::csm::ConnKey;
use super::super::packet::{VsockHeader, VSOCK_OP_RST};

/// Maximum number of queued RST replies for packets that match no connection.
pub const MAX_PENDING_RST: usize = 1024;

/// RST replies and connections waiting for rx buffers.
#[derive(Debug, Default)]
pub struct MuxerRxQ {
    rsts: VecDeque<VsockHeader>,
    conns: VecDeque<ConnKey>,
}

impl MuxerRxQ {
    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.rsts.is_empty() && self.conns.is_empty()
    }

    /// Forgets everything (device reset).
    pub fn clear(&mut self) {
        self.rsts.clear();
        self.conns.clear();
    }

    /// Queues an `OP_RST` for the guest; dropped (with a warning) beyond [`MAX_PENDING_RST`].
    pub fn push_rst(&mut self, rst: VsockHeader) {
        if self.rsts.len() >= MAX_PENDING_RST {
            warn!("vsock: too many pending resets, dropping one");
            return;
        }
        self.rsts.push_back(rst);
    }

    /// Queues the `OP_RST` answering `hdr` (unless `hdr` is itself a RST).
    pub fn reply_rst(&mut self, hdr: &VsockHeader) {
        if hdr.op == VSOCK_OP_RST {
            return;
        }
        self.push_rst(VsockHeader {
            src_cid: hdr.dst_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: VSOCK_OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// The oldest queued RST.
    pub fn pop_rst(&mut self) -> Option<VsockHeader> {
        self.rsts.pop_front()
    }

    /// Queues a connection with pending packets.
    pub fn push_conn(&mut self, key: ConnKey) {
        self.conns.push_back(key);
    }

    /// The connection whose turn it is.
    pub fn pop_conn(&mut self) -> Option<ConnKey> {
        self.conns.pop_front()
    }

    /// Number of queued connections.
    pub fn conns_len(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vsock::packet::{VSOCK_OP_REQUEST, VSOCK_OP_RW};

    fn hdr(op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 10,
            dst_port: 20,
            type_: 1,
            op,
            buf_alloc: 5,
            fwd_cnt: 6,
            ..Default::default()
        }
    }

    #[test]
    fn rst_replies_swap_addresses_and_never_answer_a_rst() {
        let mut q = MuxerRxQ::default();
        q.reply_rst(&hdr(VSOCK_OP_RST));
        assert!(q.is_empty());
        q.reply_rst(&hdr(VSOCK_OP_RW));
        let r = q.pop_rst().unwrap();
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (2, 3, 20, 10)
        );
        assert_eq!(
            (r.op, r.type_, r.buf_alloc, r.fwd_cnt),
            (VSOCK_OP_RST, 1, 0, 0)
        );
        assert!(q.is_empty());
    }

    #[test]
    fn rsts_are_bounded_and_connections_kept_in_order() {
        let mut q = MuxerRxQ::default();
        for _ in 0..MAX_PENDING_RST + 5 {
            q.reply_rst(&hdr(VSOCK_OP_REQUEST));
        }
        let key = |p| ConnKey {
            local_port: p,
            peer_port: 1,
        };
        q.push_conn(key(1));
        q.push_conn(key(2));
        assert_eq!(q.conns_len(), 2);
        let mut n = 0;
        while q.pop_rst().is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_PENDING_RST);
        assert_eq!(q.pop_conn(), Some(key(1)));
        assert!(!q.is_empty());
        q.clear();
        assert!(q.is_empty());
        assert_eq!(q.pop_conn(), None);
    }
}
