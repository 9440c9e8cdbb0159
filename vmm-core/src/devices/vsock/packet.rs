// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-vsock wire constants and a plain-old-data copy of the packet header.
//!
//! The header of a guest packet is copied once out of guest memory ([`VsockHeader::from_packet`])
//! so every later decision uses the same values (no time-of-check/time-of-use on guest memory).
//! Headers for the guest are built in host memory and written with one call
//! ([`VsockHeader::write_to`]).

use virtio_vsock::packet::{Error as PacketError, VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

/// The well-known CID of the host.
pub const VSOCK_HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`: the only socket type this device supports.
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Connection request.
pub const VSOCK_OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const VSOCK_OP_RESPONSE: u16 = 2;
/// Connection reset / refused.
pub const VSOCK_OP_RST: u16 = 3;
/// Half or full shutdown; see the `VSOCK_FLAGS_SHUTDOWN_*` flags.
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
/// Data.
pub const VSOCK_OP_RW: u16 = 5;
/// Unsolicited credit information.
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// Request for a credit update.
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flag: the sender will not receive any more data.
pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will not send any more data.
pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;

/// Size of the packed `virtio_vsock_hdr`.
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;

/// Host-memory copy of a `virtio_vsock_hdr` (all fields in native endianness).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`VSOCK_TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`VSOCK_OP_*`).
    pub op: u16,
    /// Operation specific flags.
    pub flags: u32,
    /// Receive buffer size of the sender.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Copies the header of a packet parsed from a descriptor chain.
    pub fn from_packet<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        VsockHeader {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Serialises the header in the little-endian wire layout.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the little-endian wire layout.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        VsockHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Writes the whole header into the (device-writable) header buffer of `pkt`.
    pub fn write_to<B: BitmapSlice>(
        &self,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Result<(), PacketError> {
        pkt.set_header_from_raw(&self.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_through_bytes_and_packet() {
        let hdr = VsockHeader {
            src_cid: 3,
            dst_cid: VSOCK_HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 7,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RW,
            flags: VSOCK_FLAGS_SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 99,
        };
        assert_eq!(VsockHeader::from_bytes(&hdr.to_bytes()), hdr);

        let mut raw = [0u8; HEADER_SIZE];
        let mut data = [0u8; 16];
        {
            // SAFETY: `raw` and `data` outlive `pkt`, and nothing else accesses them meanwhile.
            let mut pkt = unsafe { VsockPacket::new(&mut raw, Some(&mut data)) }.unwrap();
            hdr.write_to(&mut pkt).unwrap();
            assert_eq!(VsockHeader::from_packet(&pkt), hdr);
        }
        assert_eq!(VsockHeader::from_bytes(&raw), hdr);
    }
}
