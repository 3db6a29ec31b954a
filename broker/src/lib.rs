//! airlock-broker: the broker that owns every sandbox, its /v1 API, the
//! audit store, and the `airlock` CLI's embedded mode.
//!
//! Both binaries first check whether they were started in an internal role
//! ([`SHIM_ROLE`]: the sandbox launcher; [`FS_ROLE`]: a sandbox's
//! filesystem server, see [`component`]) and, if so, run it before any
//! async runtime or thread exists: the broker never forks itself and keeps
//! running Rust in the child; it posix_spawns its own binary in the role.
#![deny(unsafe_code)]

pub mod api;
pub mod audit;
pub mod authz;
pub mod broker;
pub mod cli;
mod cli_files;
mod cli_tty;
pub mod client;
pub mod component;
pub mod config;
pub mod fs_server;
pub mod gpu;
pub mod gpu_server;
pub mod mcp;
pub mod metrics;
pub mod net_server;
pub mod netlink;
pub mod sandbox;
pub mod spec;
pub mod sys;
pub mod tree;
pub mod util;

/// argv\[1\] that selects the shim role.
pub const SHIM_ROLE: &str = "__shim";
/// argv\[1\] that selects the filesystem server role.
pub const FS_ROLE: &str = "__fs";
/// argv\[1\] that selects the network gateway role.
pub const NET_ROLE: &str = "__net";
/// argv\[1\] that selects the device proxy role.
pub const DEVPROXY_ROLE: &str = "__devproxy";

/// Runs the shim if this process was started in that role; never returns
/// then. Call first thing in `main`.
pub fn dispatch_internal_role() {
    let mut args = std::env::args_os();
    let _ = args.next();
    let role = args.next();
    if role.as_deref() == Some(std::ffi::OsStr::new(SHIM_ROLE)) {
        let code = airlock_shim::launcher::main_with_fd3();
        std::process::exit(code);
    }
    if role.as_deref() == Some(std::ffi::OsStr::new(FS_ROLE)) {
        let code = fs_server::main();
        std::process::exit(code);
    }
    if role.as_deref() == Some(std::ffi::OsStr::new(NET_ROLE)) {
        let code = net_server::main();
        std::process::exit(code);
    }
    if role.as_deref() == Some(std::ffi::OsStr::new(DEVPROXY_ROLE)) {
        let code = gpu_server::main();
        std::process::exit(code);
    }
}

/// Hardening every binary applies before doing anything else: no core
/// dumps, no ptrace attach by other users' processes, and no dynamic-loader
/// variables passed on to anything we start.
pub fn harden_process() {
    sys::tune_allocator();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let _ = nix::sys::prctl::set_dumpable(false);
}
