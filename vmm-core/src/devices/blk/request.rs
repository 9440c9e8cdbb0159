// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-blk request parsing: turns a descriptor chain into a validated [`Request`].
//!
//! Layout (virtio 1.x, 5.2.6): a device-readable 16-byte header (`le32 type`, `le32 reserved`,
//! `le64 sector`), data descriptors (device-writable for `T_IN`/`T_GET_ID`, device-readable for
//! `T_OUT`), and a device-writable status byte in the last descriptor. Everything the guest
//! controls is checked before any I/O: descriptor count, loops, zero lengths, guest addresses
//! and directions.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

use super::{BlockError, MAX_DESCRIPTORS, REQUEST_HEADER_SIZE};

/// Request type from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            t => RequestType::Unsupported(t),
        }
    }
}

/// The request header as the guest lays it out.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
pub struct RequestHeader {
    pub type_: u32,
    pub reserved: u32,
    pub sector: u64,
}

// SAFETY: plain old data of integer fields without padding; any byte pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// One data buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataBuf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    pub data: Vec<DataBuf>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total data length.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|d| u64::from(d.len)).sum()
    }
}

/// A chain that is not a valid request; `status` is the status byte address if the chain has a
/// usable one (the device then answers `VIRTIO_BLK_S_IOERR` there).
#[derive(Debug)]
pub struct ParseError {
    pub error: BlockError,
    pub status: Option<GuestAddress>,
}

/// Collects the descriptors of a chain, rejecting long and looping chains.
pub fn collect_descriptors(
    chain: impl Iterator<Item = Descriptor>,
) -> Result<Vec<Descriptor>, BlockError> {
    let mut descs = Vec::new();
    for d in chain {
        if descs.len() == MAX_DESCRIPTORS {
            return Err(BlockError::TooManyDescriptors);
        }
        descs.push(d);
    }
    // virtio-queue stops after `queue size` descriptors or at a bad `next`: a last descriptor
    // that still has NEXT set means the chain loops or leaves the table.
    if descs.last().is_some_and(|d| d.has_next()) {
        return Err(BlockError::ChainTruncated);
    }
    Ok(descs)
}

fn check_desc<M: GuestMemory>(mem: &M, d: &Descriptor) -> Result<(), BlockError> {
    if d.len() == 0 {
        return Err(BlockError::ZeroLengthDescriptor);
    }
    if !mem.check_range(d.addr(), d.len() as usize) {
        return Err(BlockError::AddressOutOfRange {
            addr: d.addr().0,
            len: d.len(),
        });
    }
    Ok(())
}

/// The status byte address of `descs`, if the last descriptor can hold one.
fn status_candidate<M: GuestMemory>(mem: &M, descs: &[Descriptor]) -> Option<GuestAddress> {
    let last = descs.last()?;
    (descs.len() >= 2 && last.is_write_only() && last.len() >= 1 && mem.check_range(last.addr(), 1))
        .then_some(last.addr())
}

fn data_direction_ok(kind: RequestType, d: &Descriptor) -> bool {
    match kind {
        RequestType::In | RequestType::GetId => d.is_write_only(),
        RequestType::Out => !d.is_write_only(),
        RequestType::Flush | RequestType::Unsupported(_) => true,
    }
}

fn validate<M: GuestMemory>(mem: &M, descs: &[Descriptor]) -> Result<Request, BlockError> {
    if descs.len() < 2 {
        return Err(BlockError::ChainTooShort(descs.len()));
    }
    for d in descs {
        check_desc(mem, d)?;
    }
    let (head, status) = (&descs[0], &descs[descs.len() - 1]);
    if head.is_write_only() || head.len() < REQUEST_HEADER_SIZE {
        return Err(BlockError::BadHeader);
    }
    if !status.is_write_only() {
        return Err(BlockError::BadStatus);
    }
    let hdr: RequestHeader = mem.read_obj(head.addr())?;
    let kind = RequestType::from(u32::from_le(hdr.type_));
    let middle = &descs[1..descs.len() - 1];
    if let Some(bad) = middle.iter().find(|d| !data_direction_ok(kind, d)) {
        let _ = bad;
        return Err(BlockError::WrongDirection(u32::from_le(hdr.type_)));
    }
    Ok(Request {
        kind,
        sector: u64::from_le(hdr.sector),
        data: middle
            .iter()
            .map(|d| DataBuf {
                addr: d.addr(),
                len: d.len(),
            })
            .collect(),
        status: status.addr(),
    })
}

/// Parses a descriptor chain into a request.
pub fn parse<M: GuestMemory>(
    mem: &M,
    chain: impl Iterator<Item = Descriptor>,
) -> Result<Request, ParseError> {
    let descs = collect_descriptors(chain).map_err(|error| ParseError {
        error,
        status: None,
    })?;
    validate(mem, &descs).map_err(|error| ParseError {
        error,
        status: status_candidate(mem, &descs),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    pub(crate) const W: u16 = VRING_DESC_F_WRITE as u16;
    pub(crate) const HDR: u64 = 0x10000;
    pub(crate) const DATA: u64 = 0x11000;
    pub(crate) const STATUS: u64 = 0x12000;

    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap()
    }

    pub(crate) fn raw(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    pub(crate) fn write_header(m: &GuestMemoryMmap, type_: u32, sector: u64) {
        let h = RequestHeader {
            type_: type_.to_le(),
            reserved: 0,
            sector: sector.to_le(),
        };
        m.write_obj(h, GuestAddress(HDR)).unwrap();
    }

    fn parse_chain(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, ParseError> {
        let q = MockSplitQueue::create(m, GuestAddress(0), 16);
        let chain = q.build_desc_chain(descs).unwrap();
        parse(m, chain)
    }

    #[test]
    fn parses_read_request() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 3);
        let r = parse_chain(
            &m,
            &[
                raw(HDR, 16, 0),
                raw(DATA, 512, W),
                raw(DATA + 512, 512, W),
                raw(STATUS, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.sector, 3);
        assert_eq!(r.data_len(), 1024);
        assert_eq!(r.status, GuestAddress(STATUS));
    }

    #[test]
    fn parses_flush_without_data() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse_chain(&m, &[raw(HDR, 16, 0), raw(STATUS, 1, W)]).unwrap();
        assert_eq!(r.kind, RequestType::Flush);
        assert!(r.data.is_empty());
    }

    fn expect_err(
        m: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        want_status: bool,
        check: impl Fn(&BlockError) -> bool,
    ) {
        let e = parse_chain(m, descs).unwrap_err();
        assert!(check(&e.error), "unexpected error {:?}", e.error);
        assert_eq!(e.status.is_some(), want_status, "{:?}", e);
    }

    #[test]
    fn rejects_malformed_chains() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 0);
        // Out-of-range data buffer.
        expect_err(
            &m,
            &[raw(HDR, 16, 0), raw(0x3ff00, 512, W), raw(STATUS, 1, W)],
            true,
            |e| matches!(e, BlockError::AddressOutOfRange { addr: 0x3ff00, .. }),
        );
        // Zero-length data descriptor.
        expect_err(
            &m,
            &[raw(HDR, 16, 0), raw(DATA, 0, W), raw(STATUS, 1, W)],
            true,
            |e| matches!(e, BlockError::ZeroLengthDescriptor),
        );
        // Wrong direction: read into a device-readable buffer.
        expect_err(
            &m,
            &[raw(HDR, 16, 0), raw(DATA, 512, 0), raw(STATUS, 1, W)],
            true,
            |e| matches!(e, BlockError::WrongDirection(0)),
        );
        // Device-writable header.
        expect_err(
            &m,
            &[raw(HDR, 16, W), raw(DATA, 512, W), raw(STATUS, 1, W)],
            true,
            |e| matches!(e, BlockError::BadHeader),
        );
        // Short header.
        expect_err(&m, &[raw(HDR, 8, 0), raw(STATUS, 1, W)], true, |e| {
            matches!(e, BlockError::BadHeader)
        });
        // Read-only status.
        expect_err(
            &m,
            &[raw(HDR, 16, 0), raw(DATA, 512, W), raw(STATUS, 1, 0)],
            false,
            |e| matches!(e, BlockError::BadStatus),
        );
        // Header only.
        expect_err(&m, &[raw(HDR, 16, 0)], false, |e| {
            matches!(e, BlockError::ChainTooShort(1))
        });
        // Header out of memory.
        expect_err(
            &m,
            &[raw(0x4_0000_0000, 16, 0), raw(STATUS, 1, W)],
            true,
            |e| matches!(e, BlockError::AddressOutOfRange { .. }),
        );
    }

    #[test]
    fn write_request_needs_readable_data() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_OUT, 0);
        expect_err(
            &m,
            &[raw(HDR, 16, 0), raw(DATA, 512, W), raw(STATUS, 1, W)],
            true,
            |e| matches!(e, BlockError::WrongDirection(1)),
        );
    }

    #[test]
    fn rejects_too_many_descriptors() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::create(&m, GuestAddress(0), 128);
        let mut descs = vec![raw(HDR, 16, 0)];
        descs.extend((0..MAX_DESCRIPTORS as u64).map(|i| raw(DATA + i * 16, 16, W)));
        descs.push(raw(STATUS, 1, W));
        let chain = q.build_desc_chain(&descs).unwrap();
        let e = parse(&m, chain).unwrap_err();
        assert!(matches!(e.error, BlockError::TooManyDescriptors));
        assert!(e.status.is_none());
    }

    #[test]
    fn rejects_descriptor_loops() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let n = VRING_DESC_F_NEXT as u16;
        // 0 -> 1 -> 2 -> 1 -> ...
        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, 16, n, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 512, W | n, 2)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, W | n, 1)),
        ];
        let chain = q.build_multiple_desc_chains(&descs).unwrap();
        let e = parse(&m, chain).unwrap_err();
        assert!(
            matches!(e.error, BlockError::ChainTruncated),
            "{:?}",
            e.error
        );
        // `next` outside the table.
        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, 16, n, 1)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, W | n, 99)),
        ];
        let chain = q.build_multiple_desc_chains(&descs).unwrap();
        let e = parse(&m, chain).unwrap_err();
        assert!(
            matches!(e.error, BlockError::ChainTruncated),
            "{:?}",
            e.error
        );
    }
}
