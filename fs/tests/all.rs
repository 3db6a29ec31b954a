//! Integration tests: real FUSE mounts in temp dirs, run as root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod suite;
