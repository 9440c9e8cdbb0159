//! Device bus: a range map from guest port / MMIO addresses to devices.
//!
//! One [`Bus`] for port IO and one for MMIO. Built before the vCPUs start and
//! shared read-only between vCPU threads (`Arc<Bus>`); each device sits
//! behind its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port IO or MMIO.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `base + offset`. Fill `data`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors inserting into the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("zero-length bus range at {0:#x}")]
    ZeroLength(u64),
    #[error("bus range {base:#x}+{len:#x} overflows")]
    Overflow { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

/// A shared, lockable device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    pub base: u64,
    pub len: u64,
}

impl BusRange {
    fn end(&self) -> u64 {
        self.base + self.len
    }
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
}

/// Range map of devices.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (BusRange, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.values().map(|(r, _)| r))
            .finish()
    }
}

impl Bus {
    /// Empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let range = BusRange { base, len };
        if base.checked_add(len).is_none() {
            return Err(BusError::Overflow { base, len });
        }
        if let Some((_, (r, _))) = self.devices.range(..=base).next_back() {
            if r.end() > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other: r.base,
                });
            }
        }
        if let Some((_, (r, _))) = self.devices.range(base..).next() {
            if r.base < range.end() {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other: r.base,
                });
            }
        }
        self.devices.insert(base, (range, device));
        Ok(())
    }

    /// Device covering `addr`: `(range, device)`.
    pub fn get(&self, addr: u64) -> Option<(BusRange, &SharedDevice)> {
        let (_, (r, d)) = self.devices.range(..=addr).next_back()?;
        r.contains(addr).then_some((*r, d))
    }

    /// Dispatches a read. Returns false (and leaves `data` alone) if no device is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.get(addr) {
            Some((r, d)) => {
                lock(d).read(r.base, addr - r.base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false if no device is mapped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.get(addr) {
            Some((r, d)) => {
                lock(d).write(r.base, addr - r.base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock (a device that panicked
/// keeps serving; we never propagate a panic into a vCPU thread).
pub fn lock(d: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        last: Option<(u64, u64, Vec<u8>)>,
    }
    impl BusDevice for Rec {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn lookup_and_dispatch() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Rec::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(Arc::new(Mutex::new(Rec::default())), 0x60, 5)
            .unwrap();
        assert_eq!(
            bus.get(0x3f8).unwrap().0,
            BusRange {
                base: 0x3f8,
                len: 8
            }
        );
        assert_eq!(bus.get(0x3ff).unwrap().0.base, 0x3f8);
        assert!(bus.get(0x400).is_none());
        assert!(bus.get(0x3f7).is_none());
        assert_eq!(bus.get(0x64).unwrap().0.base, 0x60);
        assert!(bus.get(0x65).is_none());
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(a.lock().unwrap().last, Some((0x3f8, 1, vec![7])));
        assert!(!bus.read(0x1000, &mut d));
        assert!(!bus.write(0, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Rec::default())) };
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf8, 9),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x0, 0x1000),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(dev(), 0xf8, 8).unwrap();
        bus.insert(dev(), 0x110, 8).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::ZeroLength(0x200))
        );
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
    }
}
