//! airlock-shim: starts a sandbox and stays inside it as pid 1.
//!
//! The broker runs the shim as a fresh, single-threaded process (the
//! `__shim` role of its binaries) with one end of a [`channel`] on fd 3.
//! [`launcher`] joins the cgroup, clones into new namespaces and writes the id
//! maps; [`init`] builds the mount view from a pure [`plan`], prepares the
//! jail ([`landlock`], [`seccomp`], [`caps`]), proves it with [`selftest`],
//! then runs exec requests. [`cgroup`] is also used by the broker to create
//! and remove each sandbox's group.
#![deny(unsafe_code)]

pub mod caps;
pub mod cgroup;
pub mod channel;
pub mod files;
pub mod init;
pub mod jail;
pub mod landlock;
pub mod launcher;
pub mod mount;
pub mod plan;
pub mod seccomp;
pub mod selftest;
pub mod spec;
pub mod sys;
