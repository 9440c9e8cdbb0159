// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The device event loop: one OS thread (separate from the vCPU threads) that epolls every
//! queue ioeventfd and device fd of the virtio-mmio transports and runs the device handlers.
//! Used-buffer interrupts go to the guest through each transport's irqfd.
//!
//! Control: a bounded command channel plus an exit eventfd in the epoll set that wakes the
//! thread; [`EventLoopHandle::stop`] joins with a timeout.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::MmioTransport;
use crate::thread::{join_with_deadline, JoinError};
use crate::vmm::event::{panic_message, EventSender, VmEvent};

/// Capacity of the command channel.
const COMMAND_CAPACITY: usize = 4;
/// Epoll wait bound: the thread re-checks its command channel at least this often.
const POLL_TIMEOUT_MS: i32 = 500;
/// Events handled per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 32;
/// Token of the exit eventfd.
const EXIT_TOKEN: u64 = u64::MAX;
/// Slot of a device's own fd in a token (queue slots are the queue index).
const DEVICE_SLOT: u64 = 0xffff;

/// A transport shared between the MMIO bus and the event loop.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

/// Errors of the device event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("epoll: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("exit eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("spawning the device thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("device thread: {0}")]
    Join(#[from] JoinError),
}

/// Commands to the event loop thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopCommand {
    /// Run every device's fd handler once (e.g. after a resume).
    Kick,
    /// Leave the loop.
    Stop,
}

/// Where an epoll event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Queue { device: usize, queue: usize },
    Device { device: usize },
    Exit,
}

fn token(device: usize, slot: u64) -> u64 {
    ((device as u64) << 16) | slot
}

fn decode(token: u64) -> Source {
    if token == EXIT_TOKEN {
        return Source::Exit;
    }
    let device = (token >> 16) as usize;
    match token & 0xffff {
        DEVICE_SLOT => Source::Device { device },
        q => Source::Queue {
            device,
            queue: q as usize,
        },
    }
}

fn lock(t: &SharedTransport) -> MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

fn add(epoll: &Epoll, fd: RawFd, token: u64) -> Result<(), EventLoopError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(EventLoopError::Epoll)
}

/// Builds the epoll set: the exit eventfd, then every queue eventfd and device fd.
fn build_epoll(devices: &[SharedTransport], exit: &EventFd) -> Result<Epoll, EventLoopError> {
    let epoll = Epoll::new().map_err(EventLoopError::Epoll)?;
    add(&epoll, exit.as_raw_fd(), EXIT_TOKEN)?;
    for (i, d) in devices.iter().enumerate() {
        let t = lock(d);
        for (q, evt) in t.queue_evts().iter().enumerate() {
            add(&epoll, evt.as_raw_fd(), token(i, q as u64))?;
        }
        if let Some(fd) = t.device_fd() {
            add(&epoll, fd, token(i, DEVICE_SLOT))?;
        }
    }
    Ok(epoll)
}

/// Handle to the running device thread.
#[derive(Debug)]
pub struct EventLoopHandle {
    cmd_tx: Sender<LoopCommand>,
    exit_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Starts the device thread serving `devices`.
pub fn spawn(devices: Vec<SharedTransport>) -> Result<EventLoopHandle, EventLoopError> {
    spawn_reporting(devices, None)
}

/// [`spawn`], and if the thread ends other than by [`LoopCommand::Stop`] (it panicked, its
/// epoll failed, a failpoint), [`VmEvent::ThreadFailed`] goes to `events`.
pub fn spawn_reporting(
    devices: Vec<SharedTransport>,
    events: Option<EventSender>,
) -> Result<EventLoopHandle, EventLoopError> {
    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::EventFd)?;
    let epoll = build_epoll(&devices, &exit_evt)?;
    let thread_exit = exit_evt.try_clone().map_err(EventLoopError::EventFd)?;
    let (cmd_tx, cmd_rx) = bounded(COMMAND_CAPACITY);
    let thread = std::thread::Builder::new()
        .name("joey-virtio".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(epoll, devices, thread_exit, cmd_rx)
            }));
            let reason = match r {
                Ok(Ok(())) => return,
                Ok(Err(why)) => why,
                Err(p) => format!("panicked: {}", panic_message(&*p)),
            };
            tracing::error!("virtio event loop failed: {reason}");
            if let Some(ev) = events {
                ev.emit(VmEvent::ThreadFailed {
                    thread: "joey-virtio".into(),
                    reason,
                });
            }
        })
        .map_err(EventLoopError::Spawn)?;
    Ok(EventLoopHandle {
        cmd_tx,
        exit_evt,
        thread: Some(thread),
    })
}

/// The loop; `Err` says why it ended other than by [`LoopCommand::Stop`].
fn run(
    epoll: Epoll,
    devices: Vec<SharedTransport>,
    exit: EventFd,
    cmds: Receiver<LoopCommand>,
) -> Result<(), String> {
    crate::seccomp::apply_or_log(crate::seccomp::ThreadClass::Device);
    let mut events = vec![EpollEvent::default(); EVENTS_PER_WAIT];
    loop {
        if crate::failpoints::fired(crate::failpoints::EVENT_LOOP).is_some() {
            return Err(format!("failpoint {}", crate::failpoints::EVENT_LOOP));
        }
        let n = match epoll.wait(POLL_TIMEOUT_MS, &mut events[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(format!("epoll_wait failed: {e}")),
        };
        for ev in &events[..n] {
            match decode(ev.data()) {
                Source::Exit => {
                    let _ = exit.read();
                }
                Source::Queue { device, queue } => {
                    if let Some(d) = devices.get(device) {
                        lock(d).process_queue_event(queue);
                    }
                }
                Source::Device { device } => {
                    if let Some(d) = devices.get(device) {
                        lock(d).process_device_event();
                    }
                }
            }
        }
        while let Ok(cmd) = cmds.try_recv() {
            match cmd {
                LoopCommand::Stop => return Ok(()),
                LoopCommand::Kick => devices.iter().for_each(|d| lock(d).process_device_event()),
            }
        }
    }
}

impl EventLoopHandle {
    /// Sends `cmd` without blocking and wakes the thread.
    pub fn send(&self, cmd: LoopCommand) -> bool {
        let sent = match self.cmd_tx.try_send(cmd) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        };
        if let Err(e) = self.exit_evt.write(1) {
            tracing::warn!("virtio event loop: cannot wake thread: {e}");
        }
        sent
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        match &self.thread {
            Some(t) => t.is_finished(),
            None => true,
        }
    }

    /// Asks the thread to exit and joins it within `timeout`. On timeout the thread is left
    /// detached and an error is returned. Idempotent.
    pub fn stop(&mut self, timeout: Duration) -> Result<(), EventLoopError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.send(LoopCommand::Stop);
        join_with_deadline(thread, timeout).map_err(|e| {
            tracing::error!("virtio event loop: {e}");
            e.into()
        })
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(2)) {
            tracing::warn!("stopping the virtio event loop on drop: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{VirtioDevice, VirtioError};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    struct Counter {
        notified: Arc<AtomicUsize>,
        fd_events: Arc<AtomicUsize>,
        fd: EventFd,
        /// Panic on the device fd's event (a device bug).
        panics: bool,
    }

    impl VirtioDevice for Counter {
        fn device_type(&self) -> u32 {
            7
        }
        fn avail_features(&self) -> u64 {
            1 << 32
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn read_config(&self, _o: u64, _d: &mut [u8]) {}
        fn process_queue(
            &mut self,
            _m: &GuestMemoryMmap,
            _q: &mut [Queue],
            _i: usize,
        ) -> Result<bool, VirtioError> {
            self.notified.fetch_add(1, Ordering::SeqCst);
            Ok(false)
        }
        fn event_fd(&self) -> Option<RawFd> {
            Some(self.fd.as_raw_fd())
        }
        fn process_event(
            &mut self,
            _m: &GuestMemoryMmap,
            q: Option<&mut [Queue]>,
        ) -> Result<bool, VirtioError> {
            assert!(q.is_none(), "inactive device got its queues");
            let _ = self.fd.read();
            assert!(!self.panics, "device bug");
            self.fd_events.fetch_add(1, Ordering::SeqCst);
            Ok(false)
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn tokens_round_trip() {
        assert_eq!(
            decode(token(3, 2)),
            Source::Queue {
                device: 3,
                queue: 2
            }
        );
        assert_eq!(decode(token(5, DEVICE_SLOT)), Source::Device { device: 5 });
        assert_eq!(decode(EXIT_TOKEN), Source::Exit);
    }

    #[test]
    fn dispatches_device_fd_and_stops() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let fd_events = Arc::new(AtomicUsize::new(0));
        let notified = Arc::new(AtomicUsize::new(0));
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev_fd = fd.try_clone().unwrap();
        let t = MmioTransport::new(
            Box::new(Counter {
                notified: notified.clone(),
                fd_events: fd_events.clone(),
                fd,
                panics: false,
            }),
            mem,
        )
        .unwrap();
        let qevt = t.queue_evts()[0].try_clone().unwrap();
        let mut h = spawn(vec![Arc::new(Mutex::new(t))]).unwrap();
        dev_fd.write(1).unwrap();
        wait_for("device fd event", || fd_events.load(Ordering::SeqCst) == 1);
        // Queue notification of an inactive device: drained, handler not called.
        qevt.write(1).unwrap();
        wait_for("queue eventfd drained", || qevt.read().is_err());
        assert_eq!(notified.load(Ordering::SeqCst), 0);
        assert!(h.send(LoopCommand::Kick));
        wait_for("kick", || fd_events.load(Ordering::SeqCst) == 2);
        let t0 = Instant::now();
        h.stop(Duration::from_secs(2)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert!(h.is_finished());
        h.stop(Duration::from_secs(1)).unwrap();
    }

    /// Regression: a panicking device handler ended the thread silently; the VM kept running
    /// with dead devices (the guest's requests unanswered for ever). Now the owner hears of it.
    #[test]
    fn a_panicking_device_is_reported_as_a_failed_thread() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev_fd = fd.try_clone().unwrap();
        let t = MmioTransport::new(
            Box::new(Counter {
                notified: Arc::new(AtomicUsize::new(0)),
                fd_events: Arc::new(AtomicUsize::new(0)),
                fd,
                panics: true,
            }),
            mem,
        )
        .unwrap();
        let (tx, rx) = crossbeam_channel::bounded(4);
        let mut h = spawn_reporting(vec![Arc::new(Mutex::new(t))], Some(EventSender::new(tx))).unwrap();
        dev_fd.write(1).unwrap();
        let ev = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        match ev {
            VmEvent::ThreadFailed { thread, reason } => {
                assert_eq!(thread, "joey-virtio");
                assert!(reason.starts_with("panicked: device bug"), "{reason}");
            }
            other => panic!("unexpected event {other:?}"),
        }
        wait_for("the thread to end", || h.is_finished());
        h.stop(Duration::from_secs(1)).unwrap();
        // A stop is not a failure: nothing more is reported.
        assert!(rx.try_recv().is_err());
    }
}
