// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-net device (virtio id 1): one rx/tx queue pair between the guest and a host tap.
//!
//! Layers, bottom up:
//! - [`tap`]: the tap interface (`/dev/net/tun`, vnet header v1, no offloads, non-blocking);
//! - [`device`]: rx/tx queue processing ([`NetQueues`]) on any `GuestMemory` and
//!   `virtio_queue` queue, with bounded buffers, no frame lost while the guest has no rx buffer,
//!   and malformed chains consumed with a typed error;
//! - [`vhost_user`]: `vhost-user-backend` glue and the [`VhostUserNetServer`] used with QEMU's
//!   `-netdev vhost-user` + `-device virtio-net-device,netdev=...,mac=...` (QEMU keeps the
//!   control queue and serves MAC/status/MTU from its own config space), behind the
//!   [`relay`] QEMU 7.2 needs (it enables the rings before acking the features);
//! - [`virtio`]: the same device served in-process by the built-in VMM on its virtio-mmio
//!   transport ([`VirtioNet`], MAC, link status and MTU in its own config space).
//!
//! Features: `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_MTU`, `VIRTIO_NET_F_STATUS`;
//! no checksum/GSO offloads, no mergeable rx buffers, no control queue.

pub mod device;
pub mod metrics;
pub mod relay;
pub mod tap;
pub mod vhost_user;
pub mod virtio;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;


pub use device::{NetQueueError, NetQueues};
pub use metrics::{NetMetrics, NetSnapshot};
pub use tap::{Tap, TapError};
pub use vhost_user::{NetBackend, VhostUserNetHandle, VhostUserNetServer};
pub use virtio::VirtioNet;

/// Smallest MTU offered to the guest (IPv4 minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU: a frame (MTU + 14-byte Ethernet header + 4-byte VLAN tag) must fit the buffers.
pub const MAX_MTU: u16 = (device::MAX_FRAME_LEN - 18) as u16;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    /// Parses `aa:bb:cc:dd:ee:ff` (hex, case-insensitive).
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::InvalidMac(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

/// Rate limits of a virtio-net device, per direction (unlimited by default): "rx" is host →
/// guest, "tx" guest → host; bandwidth counts Ethernet frame bytes, ops count frames.
pub use crate::rate_limiter::RxTxLimiterConfig as NetRateLimits;

/// Configuration of a virtio-net device (the tap is opened by the caller, in the pod's netns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (the pod interface's).
    pub mac: MacAddr,
    /// The MTU the guest is told to use.
    pub mtu: u16,
    /// Rate limits.
    pub limits: NetRateLimits,
}

impl NetConfig {
    /// Checks the MAC (unicast, not all-zero) and the MTU range.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.mac.0[0] & 1 != 0 || self.mac.0 == [0; 6] {
            return Err(NetError::NotUnicast(self.mac));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(NetError::Mtu(self.mtu));
        }
        self.limits.rx.validate()?;
        self.limits.tx.validate()?;
        Ok(())
    }
}

/// A virtio-net device to attach to a VM: its config and its tap. The tap's owner (the Network
/// actor's caller) keeps it open for the VM's lifetime; the device serves a duplicate of its fd
/// ([`NetAttachment::device_tap`]).
#[derive(Clone, Debug)]
pub struct NetAttachment {
    /// MAC and MTU the guest sees.
    pub config: NetConfig,
    /// The tap in the pod's network namespace.
    pub tap: Arc<Tap>,
}

impl NetAttachment {
    /// The device's own handle on the tap.
    pub fn device_tap(&self) -> Result<Tap, NetError> {
        Ok(self.tap.try_clone()?)
    }
}

impl PartialEq for NetAttachment {
    /// Same config on the same tap interface.
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config && self.tap.name() == other.tap.name()
    }
}

impl Eq for NetAttachment {}

/// Errors of the virtio-net device stack.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A MAC address that does not parse.
    #[error("invalid MAC address {0:?} (expected aa:bb:cc:dd:ee:ff)")]
    InvalidMac(String),
    /// A multicast or all-zero MAC for the guest.
    #[error("guest MAC {0} is not a unicast address")]
    NotUnicast(MacAddr),
    /// An MTU out of range.
    #[error("MTU {0} out of range {MIN_MTU}..={MAX_MTU}")]
    Mtu(u16),
    /// The tap failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Queue processing failed.
    #[error(transparent)]
    Queue(#[from] NetQueueError),
    /// A rate limit that cannot be set up.
    #[error(transparent)]
    RateLimiter(#[from] crate::rate_limiter::RateLimiterError),
    /// The vhost-user relay failed.
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    /// vhost-user transport error.
    #[error(transparent)]
    VhostUser(#[from] crate::devices::vhost_user_server::VhostUserError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints() {
        let m: MacAddr = "02:Ab:cd:00:11:ff".parse().unwrap();
        assert_eq!(m, MacAddr([0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]));
        assert_eq!(m.to_string(), "02:ab:cd:00:11:ff");
        for bad in [
            "",
            "02:ab:cd:00:11",
            "02:ab:cd:00:11:ff:00",
            "2:ab:cd:00:11:ff",
            "zz:ab:cd:00:11:ff",
        ] {
            match bad.parse::<MacAddr>() {
                Err(NetError::InvalidMac(s)) => assert_eq!(s, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn config_is_checked() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        assert!(NetConfig { mac, mtu: 1500, limits: NetRateLimits::default() }.validate().is_ok());
        assert!(NetConfig { mac, mtu: MAX_MTU, limits: NetRateLimits::default() }.validate().is_ok());
        assert!(matches!(
            NetConfig { mac, mtu: 67, limits: NetRateLimits::default() }.validate(),
            Err(NetError::Mtu(67))
        ));
        assert!(matches!(
            NetConfig {
                mac,
                mtu: MAX_MTU + 1,
                limits: NetRateLimits::default(),
            }
            .validate(),
            Err(NetError::Mtu(_))
        ));
        let mc = MacAddr([1, 0, 0, 0, 0, 1]);
        assert!(matches!(
            NetConfig { mac: mc, mtu: 1500, limits: NetRateLimits::default() }.validate(),
            Err(NetError::NotUnicast(_))
        ));
        let e: NetError = TapError::InvalidName { name: "x/y".into() }.into();
        assert!(e.to_string().contains("x/y"));
        let e: NetError = NetQueueError::TooManyDescriptors.into();
        assert!(matches!(e, NetError::Queue(_)));
    }
}
