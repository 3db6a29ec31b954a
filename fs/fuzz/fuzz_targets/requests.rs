//! Crafted FUSE requests straight into the filesystem's operations: forged
//! inode numbers and file handles, names with '/', '..', NUL or over 255
//! bytes, huge sizes, offsets and flags (see airlock_fs's `hostile`
//! module). Each must end cleanly and touch nothing outside the layers.
//! Run as root: `cargo fuzz run requests` in fs/fuzz (a nightly toolchain).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    airlock_fs::fuzz_requests(data);
});
