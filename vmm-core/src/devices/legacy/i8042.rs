//! i8042 keyboard controller with nothing plugged in, used for the guest's reset request
//! (command 0xFE written to port 0x64).
//!
//! Linux's i8042 driver probes the controller at boot: it reads and writes the controller
//! configuration byte (CTR) and tests the AUX port, polling the status register for each answer
//! (up to 500 ms per answer that never comes: "i8042: Can't read CTR"). So the controller answers
//! those commands at once, with no device on either port: the AUX loopback answers on the
//! keyboard side (the driver reads that as "no AUX port") and the AUX interface test reports a
//! stuck clock line. Bytes for the keyboard itself get no answer (no keyboard; the driver's own
//! timeouts handle that, off the boot path). No interrupt is ever raised.
//!
//! The first 0xFE reports [`VmEvent::Reset`]; Linux's `reboot=k` writes it ten times in a row
//! before giving up, and the VM stops at the first, so the later ones are ignored.

use std::collections::VecDeque;

use crate::vmm::bus::BusDevice;
use crate::vmm::event::{EventSender, VmEvent};

/// Port offsets from the device base (0x60).
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_NOT_INHIBITED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;

/// Controller configuration byte (CTR) bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_AT_DEFAULT: u8 = CTR_KBD_INT | CTR_SYSTEM;

/// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_KBD_LOOP: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Answers.
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;
const INTERFACE_TEST_CLOCK_LOW: u8 = 0x01;
/// Output port: system not in reset, A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
/// The largest answer queue a guest can build (one byte per command; bounded anyway).
const OUTPUT_CAPACITY: usize = 16;

/// What the next byte written to the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataTarget {
    /// The keyboard (nothing is plugged in: dropped).
    Keyboard,
    Ctr,
    OutputPort,
    KbdLoop,
    AuxLoop,
    /// The AUX device (nothing is plugged in: dropped).
    AuxDevice,
}

/// i8042 device mapped at ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042 {
    events: EventSender,
    ctr: u8,
    output_port: u8,
    /// Answers waiting for the guest: (byte, from the AUX side).
    output: VecDeque<(u8, bool)>,
    next_data: DataTarget,
    last_was_command: bool,
    reset_requested: bool,
}

impl I8042 {
    /// Creates the device; a guest reset is reported on `events`.
    pub fn new(events: EventSender) -> Self {
        I8042 {
            events,
            ctr: CTR_AT_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            output: VecDeque::new(),
            next_data: DataTarget::Keyboard,
            last_was_command: false,
            reset_requested: false,
        }
    }

    fn answer(&mut self, byte: u8, aux: bool) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back((byte, aux));
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_NOT_INHIBITED;
        if self.ctr & CTR_SYSTEM != 0 {
            s |= STATUS_SYSTEM;
        }
        if let Some(&(_, aux)) = self.output.front() {
            s |= STATUS_OUTPUT_FULL;
            if aux {
                s |= STATUS_AUX_DATA;
            }
        }
        if self.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.next_data = DataTarget::Keyboard;
        match cmd {
            CMD_READ_CTR => self.answer(self.ctr, false),
            CMD_WRITE_CTR => self.next_data = DataTarget::Ctr,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.answer(INTERFACE_TEST_CLOCK_LOW, false),
            CMD_SELF_TEST => self.answer(SELF_TEST_PASSED, false),
            CMD_KBD_TEST => self.answer(INTERFACE_TEST_PASSED, false),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.answer(self.output_port, false),
            CMD_WRITE_OUTPUT_PORT => self.next_data = DataTarget::OutputPort,
            CMD_KBD_LOOP => self.next_data = DataTarget::KbdLoop,
            CMD_AUX_LOOP => self.next_data = DataTarget::AuxLoop,
            CMD_AUX_SEND => self.next_data = DataTarget::AuxDevice,
            CMD_RESET_CPU if !self.reset_requested => {
                self.reset_requested = true;
                tracing::info!("guest requested reset through i8042");
                self.events.emit(VmEvent::Reset);
            }
            CMD_RESET_CPU => tracing::debug!("i8042: reset already requested"),
            other => tracing::debug!("i8042: ignoring command {other:#04x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        match std::mem::replace(&mut self.next_data, DataTarget::Keyboard) {
            DataTarget::Ctr => self.ctr = byte,
            DataTarget::OutputPort => self.output_port = byte,
            // No AUX port: the loopback comes back on the keyboard side.
            DataTarget::KbdLoop | DataTarget::AuxLoop => self.answer(byte, false),
            DataTarget::Keyboard | DataTarget::AuxDevice => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (DATA_OFFSET, 1) => data[0] = self.output.pop_front().map_or(0, |(b, _)| b),
            (COMMAND_OFFSET, 1) => data[0] = self.status(),
            _ => data.fill(0xff),
        }
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, &[b]) => {
                self.last_was_command = false;
                self.data(b);
            }
            (COMMAND_OFFSET, &[c]) => {
                self.last_was_command = true;
                self.command(c);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, crossbeam_channel::Receiver<VmEvent>) {
        let (tx, rx) = crossbeam_channel::bounded(16);
        (I8042::new(EventSender::new(tx)), rx)
    }

    fn status(d: &mut I8042) -> u8 {
        let mut b = [0u8];
        d.read(0x60, COMMAND_OFFSET, &mut b);
        b[0]
    }

    fn data(d: &mut I8042) -> u8 {
        let mut b = [0u8];
        d.read(0x60, DATA_OFFSET, &mut b);
        b[0]
    }

    /// Writes a command, then its data byte if any, and returns the answer bytes.
    fn command(d: &mut I8042, cmd: u8, param: Option<u8>) -> Vec<(u8, u8)> {
        d.write(0x60, COMMAND_OFFSET, &[cmd]);
        if let Some(p) = param {
            d.write(0x60, DATA_OFFSET, &[p]);
        }
        let mut out = Vec::new();
        while status(d) & STATUS_OUTPUT_FULL != 0 {
            let s = status(d);
            out.push((data(d), s));
        }
        out
    }

    #[test]
    fn reset_is_reported_once_however_often_the_guest_asks() {
        let (mut d, rx) = device();
        command(&mut d, CMD_READ_CTR, None);
        assert!(rx.try_recv().is_err());
        for _ in 0..10 {
            d.write(0x60, COMMAND_OFFSET, &[CMD_RESET_CPU]);
        }
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Reset);
        assert!(rx.try_recv().is_err());
        d.write(0x60, COMMAND_OFFSET, &[CMD_RESET_CPU, 0]); // malformed access ignored
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn ctr_reads_back_what_was_written() {
        let (mut d, _rx) = device();
        assert_eq!(status(&mut d) & STATUS_OUTPUT_FULL, 0);
        let ctr = command(&mut d, CMD_READ_CTR, None);
        assert_eq!(ctr.len(), 1);
        assert_eq!(ctr[0].0, CTR_AT_DEFAULT);
        assert_eq!(ctr[0].1 & STATUS_AUX_DATA, 0);
        assert!(command(&mut d, CMD_WRITE_CTR, Some(0x65)).is_empty());
        assert_eq!(command(&mut d, CMD_READ_CTR, None)[0].0, 0x65);
        command(&mut d, CMD_KBD_ENABLE, None);
        command(&mut d, CMD_AUX_ENABLE, None);
        assert_eq!(command(&mut d, CMD_READ_CTR, None)[0].0, 0x45);
        command(&mut d, CMD_KBD_DISABLE, None);
        command(&mut d, CMD_AUX_DISABLE, None);
        assert_eq!(command(&mut d, CMD_READ_CTR, None)[0].0, 0x75);
    }

    #[test]
    fn status_says_system_flag_and_who_wrote_last() {
        let (mut d, _rx) = device();
        assert_eq!(status(&mut d), STATUS_NOT_INHIBITED | STATUS_SYSTEM);
        d.write(0x60, COMMAND_OFFSET, &[CMD_KBD_ENABLE]);
        assert_ne!(status(&mut d) & STATUS_LAST_WAS_COMMAND, 0);
        d.write(0x60, DATA_OFFSET, &[0xf4]); // to the (absent) keyboard: no answer
        assert_eq!(status(&mut d), STATUS_NOT_INHIBITED | STATUS_SYSTEM);
        assert_eq!(data(&mut d), 0, "an empty output buffer reads 0");
    }

    #[test]
    fn tests_pass_and_the_aux_port_is_absent() {
        let (mut d, _rx) = device();
        assert_eq!(
            command(&mut d, CMD_SELF_TEST, None),
            vec![(SELF_TEST_PASSED, 0x1d)]
        );
        assert_eq!(
            command(&mut d, CMD_KBD_TEST, None)[0].0,
            INTERFACE_TEST_PASSED
        );
        // Linux: AUX loopback answered without the AUX flag, AUX test != 0: no AUX port.
        let lp = command(&mut d, CMD_AUX_LOOP, Some(0x5a));
        assert_eq!(lp.len(), 1);
        assert_eq!(lp[0].0, 0x5a);
        assert_eq!(lp[0].1 & STATUS_AUX_DATA, 0);
        assert_eq!(
            command(&mut d, CMD_AUX_TEST, None)[0].0,
            INTERFACE_TEST_CLOCK_LOW
        );
        assert_eq!(command(&mut d, CMD_KBD_LOOP, Some(0xa5))[0].0, 0xa5);
        assert!(command(&mut d, CMD_AUX_SEND, Some(0xff)).is_empty());
        assert_eq!(
            command(&mut d, CMD_READ_OUTPUT_PORT, None)[0].0,
            OUTPUT_PORT_DEFAULT
        );
        assert!(command(&mut d, CMD_WRITE_OUTPUT_PORT, Some(0x01)).is_empty());
        assert_eq!(command(&mut d, CMD_READ_OUTPUT_PORT, None)[0].0, 0x01);
    }

    #[test]
    fn a_guest_cannot_grow_the_answer_queue_without_bound() {
        let (mut d, _rx) = device();
        for _ in 0..1000 {
            d.write(0x60, COMMAND_OFFSET, &[CMD_READ_CTR]);
        }
        assert_eq!(d.output.len(), OUTPUT_CAPACITY);
        let mut wide = [0u8; 2];
        d.read(0x60, DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0xff, 0xff], "a 2-byte access reads all ones");
    }
}
