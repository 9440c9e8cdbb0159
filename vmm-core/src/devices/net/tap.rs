// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! A tap interface opened through `/dev/net/tun`: whole Ethernet frames, each preceded by a
//! 12-byte `virtio_net_hdr_v1` (`IFF_VNET_HDR` + `TUNSETVNETHDRSZ`), no offloads
//! (`TUNSETOFFLOAD` 0), non-blocking.
//!
//! The fd belongs to the network namespace the tap was created in (the opening thread's), and
//! keeps working from any thread and namespace afterwards.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The clone device.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Length of the per-frame vnet header the tap is configured with (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Errors of a tap interface; each names the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or has characters Linux refuses.
    #[error(
        "invalid tap name {name:?}: 1 to {MAX_NAME_LEN} bytes, no '/', ':', whitespace or NUL"
    )]
    InvalidName {
        /// The name.
        name: String,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("tap {name}: cannot open {TUN_DEVICE}: {source}")]
    Open {
        /// The tap.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// A tun ioctl failed.
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        /// The tap.
        name: String,
        /// The ioctl.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Reading a frame failed.
    #[error("tap {name}: read failed: {source}")]
    Read {
        /// The tap.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// Writing a frame failed.
    #[error("tap {name}: write failed: {source}")]
    Write {
        /// The tap.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// Duplicating the tap's fd failed.
    #[error("tap {name}: cannot duplicate its fd: {source}")]
    Dup {
        /// The tap.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// The kernel took only part of a frame.
    #[error("tap {name}: short write ({written} of {len} bytes)")]
    ShortWrite {
        /// The tap.
        name: String,
        /// Bytes written.
        written: usize,
        /// Frame length (with the vnet header).
        len: usize,
    },
}

/// `struct ifreq` restricted to what TUNSETIFF uses (name + flags), padded to its 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks `name` the way the kernel's `dev_valid_name` does.
fn check_name(name: &str) -> Result<(), TapError> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(TapError::InvalidName {
            name: name.to_string(),
        });
    }
    Ok(())
}

impl Tap {
    /// Opens (creating it if needed, in the calling thread's network namespace) the tap `name`
    /// in multi-frame, vnet-header mode with offloads off. The fd is non-blocking and close-on-exec.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| TapError::Open {
                name: name.to_string(),
                source,
            })?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may update the name of) a `struct ifreq`; `req` is a
        // properly sized, initialised ifreq (name NUL terminated: at most IFNAMSIZ-1 bytes
        // copied) that lives across the call; the fd is ours.
        let r = unsafe { libc::ioctl(tap.fd(), libc::TUNSETIFF, &mut req as *mut IfReqFlags) };
        tap.check(r, "TUNSETIFF")?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points to a live local.
        let r = unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        tap.check(r, "TUNSETVNETHDRSZ")?;
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags).
        let r = unsafe { libc::ioctl(tap.fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        tap.check(r, "TUNSETOFFLOAD")?;
        Ok(tap)
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check(&self, r: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (vnet header + Ethernet frame) into `buf`. `Ok(None)` when no frame is
    /// queued. A frame longer than `buf` is truncated by the kernel.
    pub fn read_frame(&self, buf: &mut [u8]) -> Result<Option<usize>, TapError> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(TapError::Read {
                        name: self.name.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Writes one frame (vnet header + Ethernet frame). `Ok(false)` if the tap cannot take it
    /// now (`EAGAIN`); the frame is then not sent.
    pub fn write_frame(&self, frame: &[u8]) -> Result<bool, TapError> {
        loop {
            match (&self.file).write(frame) {
                Ok(n) if n == frame.len() => return Ok(true),
                Ok(written) => {
                    return Err(TapError::ShortWrite {
                        name: self.name.clone(),
                        written,
                        len: frame.len(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(TapError::Write {
                        name: self.name.clone(),
                        source,
                    })
                }
            }
        }
    }
}

impl Tap {
    /// A second handle on the same tap queue (a duplicate of its fd): a device takes one while
    /// its owner keeps the other.
    pub fn try_clone(&self) -> Result<Tap, TapError> {
        Ok(Tap {
            file: self.file.try_clone().map_err(|source| TapError::Dup {
                name: self.name.clone(),
                source,
            })?,
            name: self.name.clone(),
        })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Duration;

    /// Local experimental EtherType: test frames never meet a protocol handler.
    pub(crate) const TEST_ETHERTYPE: u16 = 0x88b5;

    /// A tap in a private network namespace, up, with a raw `AF_PACKET` socket bound to it for
    /// `TEST_ETHERTYPE`: what the socket sends, the tap reads; what the tap writes, it receives.
    pub(crate) struct TestTap {
        pub(crate) tap: Tap,
        pub(crate) packet: OwnedFd,
    }

    fn os_check(r: libc::c_int, what: &str) {
        assert!(r >= 0, "{what}: {}", io::Error::last_os_error());
    }

    /// Creates the namespace, the tap (IPv6 off so the kernel sends nothing on its own) and the
    /// packet socket on a thread of their own; the fds outlive it and keep the netns alive.
    pub(crate) fn test_tap() -> TestTap {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) only changes the calling (short-lived) thread's namespaces.
            os_check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare");
            for p in ["all", "default"] {
                // /proc/sys/net is resolved in the opening thread's namespace.
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{p}/disable_ipv6"), "1");
            }
            let tap = Tap::open("jtap0").unwrap();
            // SAFETY: plain socket(2); the result is checked and owned right away.
            let s =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            os_check(s, "socket(AF_INET)");
            // SAFETY: `s` is a fresh fd nobody else owns.
            let ctl = unsafe { OwnedFd::from_raw_fd(s) };
            let mut req = IfReqFlags {
                name: [0; libc::IFNAMSIZ],
                flags: 0,
                _pad: [0; 22],
            };
            req.name[..5].copy_from_slice(b"jtap0");
            // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write a live, initialised ifreq.
            os_check(
                unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) },
                "SIOCGIFFLAGS",
            );
            req.flags |= libc::IFF_UP as libc::c_short;
            // SAFETY: as above.
            os_check(
                unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) },
                "SIOCSIFFLAGS",
            );
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(c"jtap0".as_ptr()) };
            assert_ne!(ifindex, 0);
            let proto = TEST_ETHERTYPE.to_be();
            // SAFETY: plain socket(2); checked and owned right away.
            let s = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::c_int::from(proto),
                )
            };
            os_check(s, "socket(AF_PACKET)");
            // SAFETY: `s` is a fresh fd nobody else owns.
            let packet = unsafe { OwnedFd::from_raw_fd(s) };
            // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: bind(2) reads `size_of::<sockaddr_ll>()` bytes of the live `sll`.
            os_check(
                unsafe {
                    libc::bind(
                        packet.as_raw_fd(),
                        &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                },
                "bind(AF_PACKET)",
            );
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            // SAFETY: setsockopt(2) reads a live timeval of the given size.
            os_check(
                unsafe {
                    libc::setsockopt(
                        packet.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        &tv as *const libc::timeval as *const libc::c_void,
                        std::mem::size_of::<libc::timeval>() as u32,
                    )
                },
                "SO_RCVTIMEO",
            );
            TestTap { tap, packet }
        })
        .join()
        .unwrap()
    }

    /// A test Ethernet frame of `len` bytes (>= 14): broadcast, our ethertype, payload `seed`+i.
    pub(crate) fn test_frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
        f.extend((0..len - 14).map(|i| seed.wrapping_add(i as u8)));
        f
    }

    impl TestTap {
        /// Sends `frame` out of the interface: the tap fd reads it.
        pub(crate) fn send(&self, frame: &[u8]) {
            // SAFETY: send(2) reads `frame.len()` bytes of a live slice.
            let n = unsafe {
                libc::send(
                    self.packet.as_raw_fd(),
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                )
            };
            assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
        }

        /// Receives one frame the tap fd wrote (5 s timeout).
        pub(crate) fn recv(&self) -> Vec<u8> {
            let mut buf = vec![0u8; 70_000];
            // SAFETY: recv(2) writes at most `buf.len()` bytes into a live buffer.
            let n = unsafe {
                libc::recv(
                    self.packet.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            assert!(n >= 0, "recv: {}", io::Error::last_os_error());
            buf.truncate(n as usize);
            buf
        }

        /// Reads the next frame from the tap fd, waiting at most 5 s.
        pub(crate) fn read_tap(&self) -> Vec<u8> {
            let mut buf = vec![0u8; 70_000];
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(n) = self.tap.read_frame(&mut buf).unwrap() {
                    buf.truncate(n);
                    return buf;
                }
                assert!(std::time::Instant::now() < deadline, "no frame on the tap");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "a b", "a:b", "1234567890123456", ".", ".."] {
            match Tap::open(bad) {
                Err(TapError::InvalidName { name }) => assert_eq!(name, bad),
                other => panic!("{bad:?}: expected InvalidName, got {other:?}"),
            }
        }
        assert!(check_name("123456789012345").is_ok());
    }

    #[test]
    fn frames_both_ways() {
        let t = test_tap();
        assert_eq!(t.tap.name(), "jtap0");
        // Nothing queued: no frame, no error.
        let mut buf = vec![0u8; 2048];
        assert_eq!(t.tap.read_frame(&mut buf).unwrap(), None);
        // Interface → tap fd: vnet header (no offloads: no GSO) + the exact frame.
        let f = test_frame(100, 1);
        t.send(&f);
        let got = t.read_tap();
        assert_eq!(got.len(), VNET_HDR_LEN + f.len());
        assert_eq!(got[1..VNET_HDR_LEN], [0u8; VNET_HDR_LEN - 1]);
        assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
        // Tap fd → interface.
        let f = test_frame(300, 7);
        let mut out = vec![0u8; VNET_HDR_LEN];
        out.extend_from_slice(&f);
        assert!(t.tap.write_frame(&out).unwrap());
        assert_eq!(t.recv(), f);
        // A frame shorter than the vnet header is refused with an error naming the tap.
        match t.tap.write_frame(&[0u8; 4]) {
            Err(e @ TapError::Write { .. }) => assert!(e.to_string().contains("jtap0"), "{e}"),
            other => panic!("expected Write error, got {other:?}"),
        }
    }

    #[test]
    fn busy_tap_is_a_typed_error_naming_it() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) only changes the calling (short-lived) thread's namespaces.
            os_check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare");
            let _first = Tap::open("jbusy0").unwrap();
            // A single-queue tap has one queue: a second attach is refused (EBUSY).
            match Tap::open("jbusy0") {
                Err(
                    e @ TapError::Ioctl {
                        what: "TUNSETIFF", ..
                    },
                ) => {
                    assert!(
                        e.to_string().contains("tap jbusy0: TUNSETIFF failed"),
                        "{e}"
                    )
                }
                other => panic!("expected a TUNSETIFF error, got {other:?}"),
            }
        })
        .join()
        .unwrap();
    }
}
