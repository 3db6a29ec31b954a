//! The ABI tables and the validator, for every driver version with tables:
//! the data rebuilds to its digests, every mirrored struct matches the
//! recorded layout, every admitted entry passes and its neighbours do not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use airlock_devproxy::abi::{AbiError, AbiSet, Selection, SizeRule, VersionPolicy};
use airlock_devproxy::layout::mirrors;
use airlock_devproxy::validate::{self, Decision, Grant, Node, Reply, canonical, check, status};

fn set() -> AbiSet {
    AbiSet::builtin().expect("built-in tables load")
}

#[test]
fn the_tree_rebuilds_every_version_to_its_digest() {
    let s = set();
    let names: Vec<String> = s.versions().map(|a| a.version.to_string()).collect();
    assert_eq!(
        names,
        [
            "535.288.01",
            "550.90.12",
            "570.195.03",
            "580.105.08",
            "580.142",
            "590.48.01"
        ]
    );
    for a in s.versions() {
        assert!(a.escapes.len() >= 40, "{}", a.version);
        assert!(a.controls.len() >= 180, "{}", a.version);
        assert!(!a.native_uvm().is_empty(), "{}", a.version);
    }
    // 580.142 changed nothing the tables hold since 580.105.08.
    let v: Vec<_> = s.versions().collect();
    assert_eq!(v[3].controls.len(), v[4].controls.len());
}

#[test]
fn a_corrupt_tree_fails_closed() {
    let text = include_str!("../abi/abi.json");
    let first = text.find("\"digest\": \"").unwrap() + 11;
    let mut bad = text.to_string();
    let flipped = if &bad[first..first + 1] == "0" {
        "1"
    } else {
        "0"
    };
    bad.replace_range(first..first + 1, flipped);
    let err = AbiSet::from_tree(&bad).unwrap_err();
    assert!(matches!(err, AbiError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("535.288.01"), "{err}");
}

#[test]
fn every_mirrored_struct_matches_every_recorded_layout() {
    let mine = mirrors();
    let mut checked = 0;
    for a in set().versions() {
        for (name, l) in &a.layouts {
            let m = mine
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name} is recorded but not mirrored"));
            assert_eq!(m.size, l.size, "{name} size, driver {}", a.version);
            assert_eq!(m.align, l.align, "{name} align, driver {}", a.version);
            let mine: Vec<(String, usize, usize)> = m
                .fields
                .iter()
                .map(|(f, o, s)| (f.trim_start_matches("r#").to_string(), *o, *s))
                .collect();
            assert_eq!(mine, l.fields, "{name} fields, driver {}", a.version);
            checked += 1;
        }
    }
    assert!(checked >= 6 * 20, "only {checked} layouts checked");
}

fn req(nr: u32, size: u32) -> u64 {
    u64::from(canonical(nr, size))
}

fn is_einval(d: &Decision) -> bool {
    matches!(d, Decision::Refuse(r) if r.reply == Reply::Errno(validate::EINVAL))
}

/// A block that passes the escape's content checks.
fn good_block(nr: u32, size: u32) -> Vec<u8> {
    let mut b = vec![0u8; size as usize];
    match nr {
        validate::esc::RM_ALLOC_MEMORY => b[12..16].copy_from_slice(&0x3Eu32.to_le_bytes()),
        validate::esc::RM_VID_HEAP_CONTROL => b[8..12].copy_from_slice(&2u32.to_le_bytes()),
        _ => {}
    }
    b
}

/// Escapes whose content, not only number and size, decides.
const BY_CONTENT: &[u32] = &[
    validate::esc::RM_CONTROL,
    validate::esc::RM_ALLOC,
    validate::esc::ATTACH_GPUS_TO_FD,
    validate::esc::RM_IDLE_CHANNELS,
    validate::esc::NUMA_INFO,
    validate::esc::EXPORT_TO_DMABUF_FD,
];

#[test]
fn every_admitted_escape_passes_and_its_neighbours_do_not() {
    let grant = Grant::default();
    for a in set().versions() {
        for e in a.escapes.values() {
            let size = match &e.size {
                SizeRule::Exact(n) | SizeRule::AtLeast(n) | SizeRule::Array(n) => *n,
                SizeRule::OneOf(ns) => ns[0],
                SizeRule::None(_) => 8,
            };
            let node = match e.node {
                airlock_devproxy::abi::NodeRule::Gpu => Node::Gpu,
                _ => Node::Ctl,
            };
            let d = check(a, &grant, node, req(e.nr, size), &good_block(e.nr, size));
            if !e.allowed || matches!(e.size, SizeRule::None(_)) {
                assert!(is_einval(&d), "{} {}: {d:?}", a.version, e.name);
                continue;
            }
            if BY_CONTENT.contains(&e.nr) {
                continue;
            }
            let Decision::Forward(p) = &d else {
                panic!("{} {} refused: {d:?}", a.version, e.name);
            };
            assert_eq!(p.request, canonical(e.nr, size));
            // Size off by one (where the rule fixes it).
            if matches!(e.size, SizeRule::Exact(_)) {
                for s in [size - 1, size + 1] {
                    let d = check(a, &grant, node, req(e.nr, s), &good_block(e.nr, s));
                    assert!(is_einval(&d), "{} {} size {s}: {d:?}", a.version, e.name);
                }
            }
            // The other node, where the escape is bound to one.
            let other = match e.node {
                airlock_devproxy::abi::NodeRule::Ctl => Some(Node::Gpu),
                airlock_devproxy::abi::NodeRule::Gpu => Some(Node::Ctl),
                _ => None,
            };
            if let Some(o) = other {
                let d = check(a, &grant, o, req(e.nr, size), &good_block(e.nr, size));
                assert!(is_einval(&d), "{} {} on {o:?}: {d:?}", a.version, e.name);
            }
            // Numbers next to it that the driver does not define.
            for n in [e.nr.wrapping_sub(1), e.nr + 1] {
                if n <= 0xFF && !a.escapes.contains_key(&n) && n != validate::esc::XFER {
                    let d = check(a, &grant, node, req(n, size), &good_block(n, size));
                    assert!(is_einval(&d), "{} nr {n:#x}: {d:?}", a.version);
                }
            }
        }
    }
}

#[test]
fn type_and_direction_bits_are_ignored_and_never_forwarded() {
    let s = set();
    let a = s.versions().last().unwrap();
    // NV_ESC_CHECK_VERSION_STR (210, 72 bytes) with type 'X' and no
    // direction: the driver would take it, so the proxy decides the same
    // and issues the canonical request.
    let odd = (72u64 << 16) | (u64::from(b'X') << 8) | 210;
    let d = check(a, &Grant::default(), Node::Ctl, odd, &[0; 72]);
    let Decision::Forward(p) = d else {
        panic!("{d:?}")
    };
    assert_eq!(p.request, canonical(210, 72));
    // Bits above 32 (a sign-extended constant) are dropped, as the
    // kernel drops them.
    let d = check(
        a,
        &Grant::default(),
        Node::Ctl,
        0xFFFF_FFFF_0000_0000 | req(210, 72),
        &[0; 72],
    );
    assert!(
        matches!(d, Decision::Forward(ref p) if p.request == canonical(210, 72)),
        "{d:?}"
    );
}

#[test]
fn xfer_is_refused() {
    for a in set().versions() {
        let d = check(a, &Grant::default(), Node::Ctl, req(211, 16), &[0; 16]);
        let Decision::Refuse(r) = d else { panic!() };
        assert_eq!(r.reply, Reply::Errno(validate::EINVAL));
        assert!(r.reason.contains("XFER"), "{}", r.reason);
    }
}

fn control(cmd: u32, params: u64, size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b[8..12].copy_from_slice(&cmd.to_le_bytes());
    b[16..24].copy_from_slice(&params.to_le_bytes());
    b[24..28].copy_from_slice(&size.to_le_bytes());
    b
}

#[test]
fn every_admitted_control_passes_with_its_size_and_no_other() {
    let g = Grant::default();
    for a in set().versions() {
        let r = req(0x2A, 32);
        for c in a.controls.values() {
            let ptr = if c.param_size > 0 { 0x7000_0000 } else { 0 };
            let d = check(a, &g, Node::Ctl, r, &control(c.cmd, ptr, c.param_size));
            if c.embedded && c.marshal.is_none() {
                let Decision::Refuse(x) = &d else {
                    panic!("{}: {d:?}", c.name)
                };
                assert_eq!(
                    x.reply,
                    Reply::Status {
                        at: 28,
                        status: status::NV_ERR_NOT_SUPPORTED
                    }
                );
                continue;
            }
            let Decision::Forward(p) = &d else {
                panic!("{} {}: {d:?}", a.version, c.name)
            };
            assert_eq!(
                p.buffers.iter().map(|b| b.len).sum::<usize>(),
                c.param_size as usize
            );
            // Embedded pointers and fds are marshalled as the table says.
            assert_eq!(p.nested, c.marshal, "{} {}", a.version, c.name);
            for s in [c.param_size + 1, c.param_size.wrapping_sub(1)] {
                if s == 0 || s > 1 << 20 {
                    continue;
                }
                let d = check(a, &g, Node::Ctl, r, &control(c.cmd, 0x7000_0000, s));
                assert!(
                    matches!(&d, Decision::Refuse(x) if x.reply == Reply::Status { at: 28, status: status::NV_ERR_INVALID_PARAM_STRUCT }),
                    "{} {} size {s}: {d:?}",
                    a.version,
                    c.name
                );
            }
            // A pointer without a size, or a size without a pointer.
            if c.param_size > 0 {
                let d = check(a, &g, Node::Ctl, r, &control(c.cmd, 0, c.param_size));
                assert!(is_einval(&d), "{}: {d:?}", c.name);
            }
            if !a.controls.contains_key(&(c.cmd + 1)) {
                let d = check(a, &g, Node::Ctl, r, &control(c.cmd + 1, ptr, c.param_size));
                assert!(
                    matches!(&d, Decision::Refuse(x) if x.reply == Reply::Status { at: 28, status: status::NV_ERR_NOT_SUPPORTED }),
                    "{:#x}: {d:?}",
                    c.cmd + 1
                );
            }
        }
    }
}

fn alloc64(class: u32, params: u64) -> Vec<u8> {
    let mut b = vec![0u8; 48];
    b[12..16].copy_from_slice(&class.to_le_bytes());
    b[16..24].copy_from_slice(&params.to_le_bytes());
    b
}

#[test]
fn every_plain_class_passes_and_unknown_ones_get_invalid_class() {
    let g = Grant::default();
    for a in set().versions() {
        for (size, status_at) in [(48u32, 40usize), (32, 28)] {
            let r = req(0x2B, size);
            for c in a.classes.values() {
                let mut b = alloc64(c.class, 0x7000_0000);
                b.truncate(size as usize);
                let d = check(a, &g, Node::Ctl, r, &b);
                if !c.plain && c.marshal.is_none() {
                    assert!(
                        matches!(&d, Decision::Refuse(x) if x.reply == Reply::Status { at: status_at, status: status::NV_ERR_INVALID_CLASS }),
                        "{}: {d:?}",
                        c.name
                    );
                    continue;
                }
                let Decision::Forward(p) = &d else {
                    panic!("{} {}: {d:?}", a.version, c.name)
                };
                // An OS event's fd and parent client are marshalled.
                assert_eq!(p.nested, c.marshal, "{}", c.name);
                let copied: usize = p
                    .buffers
                    .iter()
                    .filter(|b| b.pointer_at == 16)
                    .map(|b| b.len)
                    .sum();
                assert_eq!(
                    copied,
                    if c.param_size > 0 {
                        c.param_size as usize
                    } else {
                        0
                    },
                    "{}",
                    c.name
                );
                // Not on a GPU node (except the event classes).
                if ![0x05, 0x78, 0x79, 0x7E].contains(&c.class) {
                    let d = check(a, &g, Node::Gpu, r, &b);
                    assert!(is_einval(&d), "{} on a GPU node: {d:?}", c.name);
                }
            }
            let mut b = alloc64(0xDEAD, 0);
            b.truncate(size as usize);
            let d = check(a, &g, Node::Ctl, r, &b);
            assert!(
                matches!(&d, Decision::Refuse(x) if x.reply == Reply::Status { at: status_at, status: status::NV_ERR_INVALID_CLASS }),
                "{d:?}"
            );
        }
    }
}

#[test]
fn uvm_runs_natively_by_number_and_nothing_else_does() {
    let g = Grant::default();
    for a in set().versions() {
        for u in a.uvm.values() {
            let d = check(a, &g, Node::Uvm, u64::from(u.number), &[]);
            if u.allowed && u.routed {
                assert!(matches!(d, Decision::Native { .. }), "{}: {d:?}", u.name);
            } else {
                assert!(is_einval(&d), "{}: {d:?}", u.name);
            }
        }
        let d = check(a, &g, Node::Uvm, 0x7777, &[]);
        assert!(is_einval(&d), "{d:?}");
    }
}

#[test]
fn only_granted_gpus_can_be_attached() {
    let s = set();
    let a = s.versions().last().unwrap();
    let g = Grant {
        gpu_ids: vec![0x100, 0x300],
    };
    let ids = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let ok = check(a, &g, Node::Ctl, req(212, 8), &ids(&[0x100, 0x300]));
    assert!(matches!(ok, Decision::Forward(_)), "{ok:?}");
    let no = check(a, &g, Node::Ctl, req(212, 8), &ids(&[0x100, 0x200]));
    let Decision::Refuse(r) = no else { panic!() };
    assert!(r.reason.contains("0x200"), "{}", r.reason);
}

#[test]
fn host_versions_are_matched_exactly_or_refused_with_a_way_out() {
    let s = set();
    let exact = s.select("580.105.08", VersionPolicy::default()).unwrap();
    assert!(matches!(exact, Selection::Exact(a) if a.version.to_string() == "580.105.08"));
    // The lent GPU host's driver: a later 580 release.
    let err = s
        .select("580.159.04", VersionPolicy::default())
        .unwrap_err()
        .to_string();
    for part in [
        "580.159.04",
        "580.142",
        "allow_newer_in_branch",
        "nearest: 580.142 and 590.48.01",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    let opt_in = s
        .select(
            "580.159.04",
            VersionPolicy {
                allow_newer_in_branch: true,
            },
        )
        .unwrap();
    assert!(matches!(opt_in, Selection::NewerInBranch(a) if a.version.to_string() == "580.142"));
    // Never across a branch, never before the branch settled, never for a
    // branch not shown stable.
    for v in ["575.51.02", "580.82.09", "590.60.01", "600.1"] {
        let e = s
            .select(
                v,
                VersionPolicy {
                    allow_newer_in_branch: true,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains(v) && e.contains("supported: 535.288.01"), "{e}");
    }
    let e = s
        .select("575.51.02", VersionPolicy::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nearest: 570.195.03 and 580.105.08"), "{e}");
    assert!(matches!(
        s.select("five", VersionPolicy::default()),
        Err(AbiError::BadVersion(_))
    ));
    assert!(matches!(
        s.select("580.", VersionPolicy::default()),
        Err(AbiError::BadVersion(_))
    ));
}

#[test]
fn the_committed_tables_match_the_facts() {
    // The tables are generated from the driver facts kept beside the
    // checkout; where they are present, regenerating must give the
    // committed file.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let facts = root.join("../../shared/nvidia-abi/abi-facts.json");
    if !facts.exists() {
        eprintln!("{} absent: regeneration not checked", facts.display());
        return;
    }
    let out = std::process::Command::new("python3")
        .arg(root.join("tools/gen_abi.py"))
        .arg(&facts)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn card_info_shows_only_granted_gpus_numbered_as_the_sandboxs_nodes() {
    use airlock_devproxy::validate::{After, card_info};
    let s = set();
    let a = s.versions().last().unwrap();
    // The plan for CARD_INFO asks for the rewrite.
    let d = check(
        a,
        &Grant::default(),
        Node::Ctl,
        req(200, 4 * 72),
        &[0; 4 * 72],
    );
    assert!(
        matches!(d, Decision::Forward(ref p) if p.after == After::CardInfo),
        "{d:?}"
    );
    // Four host GPUs; the grant names the fourth, the second, and an id
    // the host does not have.
    let mut block = vec![0u8; 6 * 72];
    for i in 0..4usize {
        let e = &mut block[i * 72..(i + 1) * 72];
        e[0] = 1;
        e[16..20].copy_from_slice(&(0x100 * (i as u32 + 1)).to_le_bytes());
        e[56..60].copy_from_slice(&(i as u32).to_le_bytes());
        e[24..32].copy_from_slice(&(0xF000_0000u64 + i as u64).to_le_bytes());
    }
    let grant = Grant {
        gpu_ids: vec![0x400, 0x200, 0x999],
    };
    card_info(&mut block, &grant);
    let entry = |k: usize| &block[k * 72..(k + 1) * 72];
    let id = |k: usize| u32::from_le_bytes(entry(k)[16..20].try_into().unwrap());
    let minor = |k: usize| u32::from_le_bytes(entry(k)[56..60].try_into().unwrap());
    assert_eq!((entry(0)[0], id(0), minor(0)), (1, 0x400, 0));
    assert_eq!((entry(1)[0], id(1), minor(1)), (1, 0x200, 1));
    // The entry's other fields came with it.
    assert_eq!(
        u64::from_le_bytes(entry(0)[24..32].try_into().unwrap()),
        0xF000_0003
    );
    for k in 2..6 {
        assert!(entry(k).iter().all(|b| *b == 0), "entry {k} is not empty");
    }
}

/// Client-level controls that enumerate GPUs show only the granted ones,
/// and those that name a GPU must name a granted one, in every version
/// that admits them.
#[test]
fn gpu_enumeration_controls_are_held_to_the_grant() {
    use validate::{GpuIds, INVALID_ID, gpu_ids_after, gpu_ids_before};
    let g = Grant {
        gpu_ids: vec![0x300, 0x100],
    };
    let words = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let read = |b: &[u8], at: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| u32::from_le_bytes(b[at + 4 * i..at + 4 * i + 4].try_into().unwrap()))
            .collect()
    };
    for a in set().versions() {
        for (cmd, want) in [
            (0x201u32, Some(GpuIds::Attached)),
            (0x205, Some(GpuIds::Named)),
            (0x21B, Some(GpuIds::Named)),
            (0x275, Some(GpuIds::Named)),
            (0x279, Some(GpuIds::Named)),
            (0x215, Some(GpuIds::NamedList)),
            (0x216, Some(GpuIds::NamedList)),
            (0x204, Some(GpuIds::DeviceMask)),
            (0x288, Some(GpuIds::Active)),
        ] {
            let Some(c) = a.controls.get(&cmd) else {
                continue;
            };
            let d = check(
                a,
                &g,
                Node::Ctl,
                req(0x2A, 32),
                &control(cmd, 0x7000_0000, c.param_size),
            );
            let Decision::Forward(p) = d else {
                panic!("{}: {cmd:#x} refused: {d:?}", a.version)
            };
            assert_eq!(p.ids, want, "{} {cmd:#x}", a.version);
        }
        if let Some(c) = a.controls.get(&0x214) {
            let d = check(
                a,
                &g,
                Node::Ctl,
                req(0x2A, 32),
                &control(0x214, 0x7000_0000, c.param_size),
            );
            let Decision::Forward(p) = d else { panic!() };
            assert_eq!(
                p.ids,
                Some(GpuIds::Probed {
                    flags: c.param_size == 384
                }),
                "{}",
                a.version
            );
        }
    }
    // The driver lists all three; the sandbox sees its two.
    let mut attached = words(&[0x100, 0x200, 0x300]);
    attached.resize(128, 0xFF);
    gpu_ids_after(GpuIds::Attached, &mut attached, &g, &[]);
    assert_eq!(read(&attached, 0, 3), [0x100, 0x300, INVALID_ID]);
    let mut probed = words(&[0x100, 0x200, 0x300]);
    probed.resize(128, 0xFF);
    probed.extend(words(&[0x400]));
    probed.resize(256, 0xFF);
    probed.extend(words(&[1, 2, 3]));
    probed.resize(384, 0);
    gpu_ids_after(GpuIds::Probed { flags: true }, &mut probed, &g, &[]);
    assert_eq!(read(&probed, 0, 3), [0x100, 0x300, INVALID_ID]);
    assert_eq!(read(&probed, 128, 1), [INVALID_ID], "no excluded GPU shows");
    assert_eq!(
        read(&probed, 256, 3),
        [1, 3, 0],
        "flags move with their GPU"
    );
    // Naming: granted ones pass, others are refused; "all" is the grant.
    let mut named = words(&[0x200, 0, 0]);
    assert!(
        gpu_ids_before(GpuIds::Named, &mut named, &g, &[])
            .unwrap_err()
            .contains("0x200")
    );
    let mut named = words(&[0x300, 0, 0]);
    assert!(gpu_ids_before(GpuIds::Named, &mut named, &g, &[]).is_ok());
    let mut list = words(&[0x100, 0x200, INVALID_ID]);
    list.resize(132, 0);
    assert!(gpu_ids_before(GpuIds::NamedList, &mut list, &g, &[]).is_err());
    let mut all = words(&[0xFFFF]);
    all.resize(132, 0);
    gpu_ids_before(GpuIds::NamedList, &mut all, &g, &[]).unwrap();
    assert_eq!(read(&all, 0, 3), [0x300, 0x100, INVALID_ID]);
    // Device objects: only the granted GPUs' device instances (2 and 0
    // here), never another client's device; the instance mask is cut to
    // theirs.
    for a in set().versions() {
        let Some(c) = a.classes.get(&0x80) else {
            continue;
        };
        let d = check(a, &g, Node::Ctl, req(0x2B, 48), &alloc64(0x80, 0x7000_0000));
        let Decision::Forward(p) = d else {
            panic!("{}: {d:?} ({c:?})", a.version)
        };
        assert_eq!(p.ids, Some(GpuIds::DeviceAlloc), "{}", a.version);
        let d = check(a, &g, Node::Ctl, req(0x2B, 48), &alloc64(0x80, 0));
        assert!(matches!(d, Decision::Refuse(_)), "{}: {d:?}", a.version);
    }
    let instances = [2, 0];
    let mut dev = vec![0u8; 56];
    dev[0..4].copy_from_slice(&2u32.to_le_bytes());
    assert!(gpu_ids_before(GpuIds::DeviceAlloc, &mut dev, &g, &instances).is_ok());
    dev[0..4].copy_from_slice(&1u32.to_le_bytes());
    let why = gpu_ids_before(GpuIds::DeviceAlloc, &mut dev, &g, &instances).unwrap_err();
    assert!(why.contains("device instance 1"), "{why}");
    dev[0..4].copy_from_slice(&0u32.to_le_bytes());
    dev[8..12].copy_from_slice(&0xC1D0_0001u32.to_le_bytes());
    assert!(gpu_ids_before(GpuIds::DeviceAlloc, &mut dev, &g, &instances).is_err());
    let mut mask = 0b111u32.to_le_bytes().to_vec();
    gpu_ids_after(GpuIds::DeviceMask, &mut mask, &g, &instances);
    assert_eq!(read(&mask, 0, 1), [0b101]);
    // Active devices (MIG instances included): the granted GPUs' entries
    // only, in order, the count cut to match; the rest zeroed.
    let mut active = words(&[4, 0x100, 1, 0, 0x200, 0, 0, 0x300, 2, 5, 0x100, 3, 1]);
    active.resize(3076, 0xAB);
    gpu_ids_after(GpuIds::Active, &mut active, &g, &[]);
    assert_eq!(
        read(&active, 0, 10),
        [3, 0x100, 1, 0, 0x300, 2, 5, 0x100, 3, 1]
    );
    assert!(active[40..].iter().all(|b| *b == 0));
    // A count past the array is read as the array.
    let mut wild = words(&[u32::MAX, 0x300, 0, 0]);
    wild.resize(3076, 0);
    gpu_ids_after(GpuIds::Active, &mut wild, &g, &[]);
    assert_eq!(read(&wild, 0, 2), [1, 0x300]);
}

#[test]
fn embedded_pointer_controls_are_marshalled_by_their_known_shape_or_refused() {
    use airlock_devproxy::abi::Marshal;
    use airlock_devproxy::validate::{GpuIds, nested_buffers};
    let g = Grant::default();
    let r = req(0x2A, 32);
    let by_name = |a: &airlock_devproxy::abi::Abi, name: &str| {
        a.controls
            .values()
            .find(|c| c.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("{} has no {name}", a.version))
    };
    for a in set().versions() {
        // Every rule stays inside its params, pointers 8-aligned.
        for c in a.controls.values() {
            let Some(m) = &c.marshal else { continue };
            assert!(c.embedded, "{}", c.name);
            let size = c.param_size as usize;
            if let Some((at, n)) = m.count {
                assert!(at + n <= size, "{}", c.name);
            }
            for &(at, elem) in &m.arrays {
                assert!(at % 8 == 0 && at + 8 <= size && elem > 0, "{}", c.name);
            }
            for &at in m.null.iter() {
                assert!(at + 8 <= size, "{}", c.name);
            }
            for &(at, n) in m.fds.iter() {
                assert!(n == 4 && at + n <= size, "{}", c.name);
            }
        }
        let list = |count: (usize, usize), arrays: &[(usize, usize)]| Marshal {
            count: Some(count),
            arrays: arrays.to_vec(),
            null: vec![],
            fds: vec![],
            client: None,
        };
        let want = [
            ("NV0080_CTRL_CMD_GPU_GET_CLASSLIST", list((0, 4), &[(8, 4)])),
            ("NV2080_CTRL_CMD_GPU_GET_ENGINES", list((0, 4), &[(8, 4)])),
            ("NV2080_CTRL_CMD_FB_GET_INFO", list((0, 4), &[(8, 8)])),
            ("NV0080_CTRL_CMD_FIFO_GET_CAPS", list((0, 4), &[(8, 1)])),
            (
                "NV0080_CTRL_CMD_FIFO_GET_CHANNELLIST",
                list((0, 4), &[(8, 4), (16, 4)]),
            ),
            (
                "NV0000_CTRL_CMD_SYSTEM_GET_BUILD_VERSION",
                list((0, 4), &[(8, 1), (16, 1), (24, 1)]),
            ),
            (
                "NV0000_CTRL_CMD_GPU_GET_ID_INFO",
                Marshal {
                    count: None,
                    arrays: vec![],
                    null: vec![16],
                    fds: vec![],
                    client: None,
                },
            ),
            (
                "NV0000_CTRL_CMD_OS_UNIX_EXPORT_OBJECT_TO_FD",
                Marshal {
                    count: None,
                    arrays: vec![],
                    null: vec![],
                    fds: vec![(16, 4)],
                    client: None,
                },
            ),
        ];
        for (name, m) in want {
            assert_eq!(by_name(a, name).marshal, Some(m), "{} {name}", a.version);
        }
        // Shapes whose semantics are not known here stay refused.
        for name in [
            "NV2080_CTRL_CMD_GPU_EXEC_REG_OPS",
            "NV83DE_CTRL_CMD_DEBUG_READ_MEMORY",
            "NV0000_CTRL_CMD_SYSTEM_GET_P2P_CAPS",
            "NV2080_CTRL_CMD_FIFO_DISABLE_CHANNELS",
        ] {
            let c = by_name(a, name);
            let d = check(
                a,
                &g,
                Node::Ctl,
                r,
                &control(c.cmd, 0x7000_0000, c.param_size),
            );
            assert!(
                matches!(&d, Decision::Refuse(x) if x.reply == Reply::Status { at: 28, status: status::NV_ERR_NOT_SUPPORTED }
                    && x.reason.contains("does not marshal")),
                "{} {name}: {d:?}",
                a.version
            );
        }
        // Classes whose params only name other objects are forwarded as
        // plain blocks; the OS event's fd and parent client are
        // marshalled; debugger, IMEX and multicast fabric stay refused.
        let class = |name: &str| a.classes.values().find(|c| c.name == name).cloned();
        for name in [
            "NV01_CONTEXT_DMA",
            "NV01_MEMORY_VIRTUAL",
            "FERMI_CONTEXT_SHARE_A",
            "KEPLER_CHANNEL_GROUP_A",
            "AMPERE_CHANNEL_GPFIFO_A",
        ] {
            assert!(class(name).unwrap().plain, "{} {name}", a.version);
        }
        assert_eq!(
            class("NV01_EVENT_OS_EVENT").unwrap().marshal,
            Some(Marshal {
                count: None,
                arrays: vec![],
                null: vec![],
                fds: vec![(16, 8)],
                client: Some(0),
            })
        );
        for name in [
            "GT200_DEBUGGER",
            "NV_MEMORY_MULTICAST_FABRIC",
            "NV_IMEX_SESSION",
        ] {
            if let Some(c) = class(name) {
                assert!(!c.plain && c.marshal.is_none(), "{} {name}", a.version);
            }
        }
        // A VA-space token is data, not a pointer the driver follows.
        assert!(!by_name(a, "NV503C_CTRL_CMD_REGISTER_VA_SPACE").embedded);
        // GET_ID_INFO names a GPU: held to the grant like its V2.
        let c = by_name(a, "NV0000_CTRL_CMD_GPU_GET_ID_INFO");
        let d = check(
            a,
            &g,
            Node::Ctl,
            r,
            &control(c.cmd, 0x7000_0000, c.param_size),
        );
        let Decision::Forward(p) = d else {
            panic!("{d:?}")
        };
        assert_eq!(p.ids, Some(GpuIds::Named));
        // An embedded control without its params is refused.
        let c = by_name(a, "NV0080_CTRL_CMD_GPU_GET_CLASSLIST");
        let d = check(a, &g, Node::Ctl, r, &control(c.cmd, 0, 0));
        assert!(
            matches!(&d, Decision::Refuse(x) if x.reply == Reply::Status { at: 28, status: status::NV_ERR_INVALID_PARAM_STRUCT }),
            "{d:?}"
        );
    }

    // The arrays are sized from the proxy's copy of the params.
    let classes = list_marshal(&[(8, 4)]);
    let mut params = [0u8; 16];
    params[0..4].copy_from_slice(&5u32.to_le_bytes());
    // NULL: the driver's "how many?" form, nothing to copy.
    assert_eq!(nested_buffers(&classes, &params).unwrap(), vec![]);
    params[8..16].copy_from_slice(&0x7000_0000u64.to_le_bytes());
    let b = nested_buffers(&classes, &params).unwrap();
    assert_eq!((b.len(), b[0].pointer_at, b[0].len), (1, 8, 20));
    // Past the driver's 1 MiB bound on a copy: refused, not allocated.
    params[0..4].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    let e = nested_buffers(&classes, &params).unwrap_err();
    assert!(e.contains("exceed"), "{e}");
    params[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(nested_buffers(&classes, &params).is_err());
    // Three strings, one of them NULL.
    let strings = list_marshal(&[(8, 1), (16, 1), (24, 1)]);
    let mut params = [0u8; 40];
    params[0..4].copy_from_slice(&64u32.to_le_bytes());
    params[8..16].copy_from_slice(&0x7000_0000u64.to_le_bytes());
    params[24..32].copy_from_slice(&0x7000_1000u64.to_le_bytes());
    let b = nested_buffers(&strings, &params).unwrap();
    assert_eq!(
        b.iter().map(|b| (b.pointer_at, b.len)).collect::<Vec<_>>(),
        vec![(8, 64), (24, 64)]
    );
}

fn list_marshal(arrays: &[(usize, usize)]) -> airlock_devproxy::abi::Marshal {
    airlock_devproxy::abi::Marshal {
        count: Some((0, 4)),
        arrays: arrays.to_vec(),
        null: vec![],
        fds: vec![],
        client: None,
    }
}
