// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Virtual devices of the joey VMM.

/// Legacy PC devices (8250 serial, i8042) of the built-in VMM.
pub mod legacy;
pub mod vsock;
