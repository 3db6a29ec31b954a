//! The sandbox-side ioctl filter, for every version: its meaning checked
//! with a classic BPF interpreter over every escape and UVM number, and
//! the kernel's verdict on it (it loads).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use airlock_devproxy::abi::{AbiSet, SizeRule};
use airlock_devproxy::filter::{ALLOW, ARCH, NOTIFY, SYS_IOCTL, ioctl_filter, run};
use airlock_devproxy::validate::canonical;

fn odd(nr: u32, size: u32) -> u64 {
    // Type 'X', no direction: the driver decodes nr and size only.
    u64::from((size << 16) | (u32::from(b'X') << 8) | nr)
}

#[test]
fn the_filter_notifies_what_the_driver_could_accept_and_nothing_else() {
    let set = AbiSet::builtin().unwrap();
    for a in set.versions() {
        let prog = ioctl_filter(a).unwrap();
        assert!(prog.len() < 4096, "{} instructions", prog.len());
        let verdict = |req: u64| run(&prog, ARCH, SYS_IOCTL, req);
        for e in a.escapes.values() {
            let size = match &e.size {
                SizeRule::Exact(n) | SizeRule::AtLeast(n) | SizeRule::Array(n) => *n,
                SizeRule::OneOf(ns) => ns[0],
                SizeRule::None(_) => 8,
            };
            // Whatever the size: a wrong one is the proxy's to refuse.
            for s in [size, size + 1, 0, 0x3FFF] {
                let what = format!("{} {} size {s}", a.version, e.name);
                assert_eq!(verdict(u64::from(canonical(e.nr, s))), NOTIFY, "{what}");
                assert_eq!(verdict(odd(e.nr, s)), NOTIFY, "{what}, odd bits");
                // A sign-extended request: the kernel drops the high bits.
                let ext = 0xFFFF_FFFF_0000_0000 | u64::from(canonical(e.nr, s));
                assert_eq!(verdict(ext), NOTIFY, "{what}, sign-extended");
            }
        }
        assert_eq!(verdict(u64::from(canonical(211, 16))), NOTIFY, "XFER");
        let native = a.native_uvm();
        for u in a.uvm.values() {
            let want = if native.contains(&u.number) {
                ALLOW
            } else {
                NOTIFY
            };
            assert_eq!(
                verdict(u64::from(u.number)),
                want,
                "{} {}",
                a.version,
                u.name
            );
        }
        // Small integers (UVM's space, test numbers included) are the
        // proxy's unless admitted.
        for req in 0..u64::from(airlock_devproxy::filter::SMALL) {
            let want = if native.contains(&(req as u32)) {
                ALLOW
            } else {
                NOTIFY
            };
            assert_eq!(verdict(req), want, "{req:#x}");
        }
        // Other devices' ioctls: theirs, unless their nr is an escape's.
        for req in [0x5401u64, 0x541B, 0x8004_5430, 0x4004_5431, 0xC018_2101] {
            assert_eq!(verdict(req), ALLOW, "{req:#x}");
        }
        assert_eq!(verdict(0x5441), NOTIFY, "TIOCGPTPEER shares nr 0x41");
        assert_eq!(
            run(&prog, ARCH, 0, u64::from(canonical(42, 32))),
            ALLOW,
            "read(2)"
        );
        assert_eq!(
            run(&prog, 0x4000_0003, SYS_IOCTL, u64::from(canonical(42, 32))),
            ALLOW
        );
    }
}
