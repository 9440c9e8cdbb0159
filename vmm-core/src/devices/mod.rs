// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Virtual devices of the joey VMM.

pub mod vsock;
