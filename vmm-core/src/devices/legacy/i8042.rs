//! i8042 keyboard controller, used only for the guest's reset request
//! (command 0xFE written to port 0x64).

use vm_superio::{I8042Device, Trigger};

use crate::vmm::bus::BusDevice;
use crate::vmm::event::{EventSender, VmEvent};

/// Errors of the i8042 device (its reset trigger never fails; a closed or full
/// event channel is logged by [`EventSender`]).
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {}

/// Trigger that reports [`VmEvent::Reset`].
#[derive(Debug, Clone)]
pub struct ResetTrigger(EventSender);

impl Trigger for ResetTrigger {
    type E = I8042Error;
    fn trigger(&self) -> Result<(), I8042Error> {
        tracing::info!("guest requested reset through i8042");
        self.0.emit(VmEvent::Reset);
        Ok(())
    }
}

/// i8042 device mapped at ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// Creates the device; a guest reset is reported on `events`.
    pub fn new(events: EventSender) -> Self {
        I8042 {
            inner: I8042Device::new(ResetTrigger(events)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset <= u8::MAX as u64 {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset <= u8::MAX as u64 {
            let _ = self.inner.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_emits_event() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let mut d = I8042::new(EventSender::new(tx));
        d.write(0x60, 4, &[0x20]); // some other command
        assert!(rx.try_recv().is_err());
        d.write(0x60, 4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Reset);
        d.write(0x60, 4, &[0xfe, 0]); // malformed access ignored
        assert!(rx.try_recv().is_err());
    }
}
