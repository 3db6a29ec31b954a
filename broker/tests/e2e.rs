//! End-to-end tests: real sandboxes (FUSE, namespaces, cgroups, seccomp,
//! landlock, SQLite) driven through the `airlock` and `brokerd` binaries.
//! They live in the broker package because Cargo hands binary paths
//! (`CARGO_BIN_EXE_*`) only to that package's own tests. Run as root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
