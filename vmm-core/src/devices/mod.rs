// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Virtual devices of the joey VMM.

/// Legacy PC devices (8250 serial, i8042) of the built-in VMM.
pub mod legacy;
pub mod vsock;
pub mod fs;
/// virtio-net (tap backend), in-process and over vhost-user.
pub mod net;
/// Serving a vhost-user device backend to one frontend on a dedicated thread.
pub mod vhost_user_server;
/// virtio-blk (raw file backend) of the built-in VMM.
pub mod blk;
/// virtio-mmio transport and the device event loop of the built-in VMM.
pub mod virtio;
