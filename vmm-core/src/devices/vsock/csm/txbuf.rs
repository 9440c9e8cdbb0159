// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The guest-to-host buffer of one connection, and the `SIGPIPE`-free writes to its host
//! stream.
//!
//! Guest data goes straight to the host stream while nothing is buffered; what the stream does
//! not take right now is kept, in order, up to [`CONN_BUF_ALLOC`] bytes in total: the credit the
//! connection advertises, so a guest that respects it never overflows the buffer.

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::{CsmError, CONN_BUF_ALLOC};

/// Guest data the host stream could not take yet (at most [`CONN_BUF_ALLOC`] bytes).
#[derive(Debug, Default)]
pub struct TxBuf {
    data: VecDeque<u8>,
}

impl TxBuf {
    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Room left before the advertised buffer is full.
    pub fn free(&self) -> usize {
        (CONN_BUF_ALLOC as usize).saturating_sub(self.data.len())
    }

    /// Accepts `data` from the guest: writes what `stream` takes right now (only while nothing
    /// is buffered, so bytes stay in order) and buffers the rest. Returns the bytes written to
    /// the stream. More than [`free`](Self::free) bytes is the guest overrunning its credit.
    pub fn push<B: BitmapSlice>(
        &mut self,
        stream: &UnixStream,
        data: &VolatileSlice<'_, B>,
    ) -> Result<usize, CsmError> {
        let len = data.len();
        let free = self.free();
        if len > free {
            return Err(CsmError::CreditExceeded { len, free });
        }
        let mut written = 0usize;
        if self.data.is_empty() {
            while written < len {
                let chunk = data
                    .subslice(written, len - written)
                    .map_err(CsmError::GuestMemory)?;
                match send_volatile_nosignal(stream, &chunk) {
                    Ok(0) => return Err(CsmError::HostWrite(ErrorKind::WriteZero.into())),
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(CsmError::HostWrite(e)),
                }
            }
        }
        if written < len {
            let rest = data
                .subslice(written, len - written)
                .map_err(CsmError::GuestMemory)?;
            let mut tmp = vec![0u8; rest.len()];
            rest.copy_to(&mut tmp[..]);
            self.data.extend(tmp);
        }
        Ok(written)
    }

    /// Writes buffered bytes to `stream` until it would block. Returns the bytes written.
    pub fn flush_to(&mut self, stream: &UnixStream) -> Result<usize, CsmError> {
        let mut written = 0usize;
        while !self.data.is_empty() {
            let (front, _) = self.data.as_slices();
            match send_nosignal(stream, front) {
                Ok(0) => return Err(CsmError::HostWrite(ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.data.drain(..n);
                    written += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(CsmError::HostWrite(e)),
            }
        }
        Ok(written)
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a host peer that went away yields `EPIPE`, never `SIGPIPE`.
pub fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
    unsafe { send_raw_nosignal(stream, buf.as_ptr(), buf.len()) }
}

/// [`send_nosignal`] straight from guest memory.
fn send_volatile_nosignal<B: BitmapSlice>(
    stream: &UnixStream,
    buf: &VolatileSlice<'_, B>,
) -> io::Result<usize> {
    let guard = buf.ptr_guard();
    // SAFETY: the guard keeps the mapping behind `buf` valid for `buf.len()` bytes during the
    // call and the kernel only reads from it. Concurrent guest writes can only change the bytes
    // sent, which is the guest's own business.
    unsafe { send_raw_nosignal(stream, guard.as_ptr(), buf.len()) }
}

/// Non-blocking `send(2)` of the `len` bytes at `ptr` with `MSG_NOSIGNAL`.
///
/// # Safety
///
/// `ptr` must be valid for reads of `len` bytes for the duration of the call.
unsafe fn send_raw_nosignal(stream: &UnixStream, ptr: *const u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees that `ptr` is readable for `len` bytes.
    let r = unsafe {
        libc::send(
            stream.as_raw_fd(),
            ptr.cast::<libc::c_void>(),
            len,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Fills `s`'s send buffer (non-blocking) and returns how many bytes it took.
    fn fill(s: &UnixStream) -> usize {
        let junk = [0u8; 4096];
        let mut n = 0;
        loop {
            match send_nosignal(s, &junk) {
                Ok(k) => n += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
                Err(e) => panic!("send: {e}"),
            }
        }
    }

    #[test]
    fn writes_through_while_empty_and_keeps_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut tx = TxBuf::default();
        let mut src = *b"hello";
        assert_eq!(tx.push(&a, &VolatileSlice::from(&mut src[..])).unwrap(), 5);
        assert!(tx.is_empty());
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        // A full stream: the bytes are kept, and later ones queue behind them.
        let filled = fill(&a);
        let mut one = *b"one";
        let mut two = *b"two";
        assert_eq!(tx.push(&a, &VolatileSlice::from(&mut one[..])).unwrap(), 0);
        assert_eq!(tx.push(&a, &VolatileSlice::from(&mut two[..])).unwrap(), 0);
        assert_eq!(tx.free(), CONN_BUF_ALLOC as usize - 6);
        let mut sink = vec![0u8; filled];
        b.read_exact(&mut sink).unwrap();
        assert_eq!(tx.flush_to(&a).unwrap(), 6);
        assert!(tx.is_empty());
        b.read_exact(&mut got[..3]).unwrap();
        assert_eq!(&got[..3], b"one");
        b.read_exact(&mut got[..3]).unwrap();
        assert_eq!(&got[..3], b"two");
    }

    #[test]
    fn refuses_more_than_the_advertised_buffer() {
        let (a, _b) = UnixStream::pair().unwrap();
        fill(&a);
        let mut tx = TxBuf::default();
        let mut big = vec![1u8; CONN_BUF_ALLOC as usize];
        assert_eq!(tx.push(&a, &VolatileSlice::from(&mut big[..])).unwrap(), 0);
        assert_eq!(tx.free(), 0);
        let mut one = [2u8; 1];
        let e = tx.push(&a, &VolatileSlice::from(&mut one[..])).unwrap_err();
        assert!(
            matches!(e, CsmError::CreditExceeded { len: 1, free: 0 }),
            "{e}"
        );
        assert_eq!(tx.free(), 0);
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut tx = TxBuf::default();
        let mut data = *b"x";
        let e = tx
            .push(&a, &VolatileSlice::from(&mut data[..]))
            .unwrap_err();
        assert!(
            matches!(&e, CsmError::HostWrite(io) if io.kind() == ErrorKind::BrokenPipe),
            "{e}"
        );
    }
}
