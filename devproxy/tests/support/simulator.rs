//! A SIMULATED NVIDIA driver, for tests only: no GPU and no CUSE exist on
//! the machines the tests run on. It is a FUSE filesystem of regular
//! files, `nvidiactl`, `nvidia0`..`nvidia2` and `nvidia-uvm`, whose ioctls
//! implement a small part of
//! the driver's conventions from the ABI facts: exact sizes, ctl-only
//! escapes, the version handshake, RM status in the block with copy-out
//! on EINVAL, card info for three GPUs, root client / device / subdevice
//! allocation with handles, a GPU name control, free. It records every ioctl it receives, so tests
//! can assert what never reached it. It is not the driver and says so in
//! every name it returns.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, IoctlFlags, ReplyAttr,
    ReplyDirectory, ReplyEntry, ReplyIoctl, ReplyOpen, Request,
};

/// The version the simulator reports in the handshake.
pub const SIM_VERSION: &str = "580.142";
/// The GPU name its name control returns.
pub const SIM_GPU_NAME: &str = "Simulated NVIDIA H100 (not a GPU)";

const CTL_INO: u64 = 2;
const GPU_INO: u64 = 3;
const UVM_INO: u64 = 6;
/// The files, by inode: the control node, three GPUs (minors 0..2), UVM.
const NODES: [(u64, &str); 5] = [
    (CTL_INO, "nvidiactl"),
    (GPU_INO, "nvidia0"),
    (GPU_INO + 1, "nvidia1"),
    (GPU_INO + 2, "nvidia2"),
    (UVM_INO, "nvidia-uvm"),
];

/// One ioctl the simulator received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub node: &'static str,
    pub nr: u32,
    pub size: u32,
    /// The RM class (alloc) or control command, where there is one.
    pub what: u32,
}

#[derive(Debug, Default)]
struct State {
    /// The version it answers (SIM_VERSION unless set).
    version: Option<&'static str>,
    /// Permission bits of its device files (0o666 unless set).
    mode: Option<u16>,
    received: Vec<Received>,
    /// Every embedded pointer (inside control params) it dereferenced.
    embedded: Vec<u64>,
    handles: HashSet<u32>,
    next_client: u32,
}

/// The simulator; `received()` lists what reached it.
#[derive(Debug, Clone, Default)]
pub struct Simulator {
    state: Arc<Mutex<State>>,
}

impl Simulator {
    /// A simulator that answers the handshake with `version` (the
    /// broker's end-to-end tests use it; this crate's do not).
    #[allow(dead_code)]
    pub fn with_version(version: &'static str) -> Self {
        let s = Self::default();
        s.state.lock().unwrap().version = Some(version);
        s
    }

    /// A simulator whose device files have permission bits `mode` (owned
    /// by root), as a host that keeps its GPUs from other users has them
    /// (the broker's end-to-end tests use it).
    #[allow(dead_code)]
    pub fn with_mode(mode: u16) -> Self {
        let s = Self::default();
        s.state.lock().unwrap().mode = Some(mode);
        s
    }

    fn mode(&self) -> u16 {
        self.state.lock().unwrap().mode.unwrap_or(0o666)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The embedded pointers (inside control params) it was given, in the
    /// address space of the process that made the call.
    #[allow(dead_code)]
    pub fn embedded(&self) -> Vec<u64> {
        self.state.lock().unwrap().embedded.clone()
    }
}

/// The classes its device objects list (`GPU_GET_CLASSLIST`).
pub const SIM_CLASSES: [u32; 5] = [0x41, 0x80, 0x2080, 0xC86F, 0xC8B5];
/// Its build version strings (`SYSTEM_GET_BUILD_VERSION`).
pub const SIM_BUILD: &str = "580.142 (simulated)";

fn attr(ino: u64, mode: u16) -> FileAttr {
    let t = std::time::UNIX_EPOCH;
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: if ino == 1 {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if ino == 1 { 0o755 } else { mode },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Writes `data` at `addr` of the caller, as the driver copies params
/// out: NV_OK, or NV_ERR_INVALID_ARGUMENT when it cannot.
fn write_to(pid: nix::unistd::Pid, addr: u64, data: &[u8]) -> u32 {
    let remote = [nix::sys::uio::RemoteIoVec {
        base: addr as usize,
        len: data.len(),
    }];
    match nix::sys::uio::process_vm_writev(pid, &[IoSlice::new(data)], &remote) {
        Ok(n) if n == data.len() => NV_OK,
        _ => NV_ERR_INVALID_ARGUMENT,
    }
}

/// Reads `len` bytes at `addr` of the caller, as the driver copies params in.
fn read_from(pid: nix::unistd::Pid, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; len];
    let remote = [nix::sys::uio::RemoteIoVec {
        base: addr as usize,
        len,
    }];
    match nix::sys::uio::process_vm_readv(pid, &mut [std::io::IoSliceMut::new(&mut v)], &remote) {
        Ok(n) if n == len => Some(v),
        _ => None,
    }
}

/// Whether fd number `fd` of process `pid` is one of this simulator's
/// files whose name starts with `prefix`, resolved in that process's
/// table as the driver resolves an fd it is given.
fn fd_names(pid: nix::unistd::Pid, fd: u64, prefix: &str) -> bool {
    std::fs::read_link(format!("/proc/{}/fd/{fd}", pid.as_raw())).is_ok_and(|t| {
        t.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix))
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

const NV_OK: u32 = 0;
const NV_ERR_INVALID_ARGUMENT: u32 = 0x1F;
const NV_ERR_INVALID_CLASS: u32 = 0x22;
const NV_ERR_INVALID_OBJECT_PARENT: u32 = 0x3C;
const NV_ERR_NOT_SUPPORTED: u32 = 0x56;
const NV_ERR_OBJECT_NOT_FOUND: u32 = 0x57;

impl Filesystem for Simulator {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = NODES
            .iter()
            .find(|(_, n)| parent.0 == 1 && name.to_str() == Some(n));
        let Some((ino, _)) = found else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let ino = *ino;
        reply.entry(
            &Duration::from_secs(60),
            &attr(ino, self.mode()),
            Generation(0),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&Duration::from_secs(60), &attr(ino.0, self.mode()));
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        for (i, (ino, name)) in NODES.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, FileType::RegularFile, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: fuser::OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), fuser::FopenFlags::FOPEN_DIRECT_IO);
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let node = NODES
            .iter()
            .find(|(i, _)| *i == ino.0)
            .map_or("?", |(_, n)| *n);
        let nr = cmd & 0xFF;
        let size = (cmd >> 16) & 0x3FFF;
        let mut b = in_data.to_vec();
        let mut st = self.state.lock().unwrap();
        let what = match nr {
            0x2A if b.len() >= 12 => u32_at(&b, 8),
            0x2B if b.len() >= 16 => u32_at(&b, 12),
            _ => 0,
        };
        st.received.push(Received {
            node,
            nr,
            size,
            what,
        });
        let ctl = ino.0 == CTL_INO;
        if ino.0 == UVM_INO {
            // UVM numbers carry no size: nothing to copy either way.
            return reply.ioctl(0, &[]);
        }
        // The driver's transport checks: exact size, node.
        let exact = |n: usize| b.len() == n && size as usize == n;
        match nr {
            210 if ctl && exact(72) => {
                // CHECK_VERSION_STR: query ('2') answers the version.
                put_u32(&mut b, 4, 1);
                let v = st.version.unwrap_or(SIM_VERSION).as_bytes();
                b[8..72].fill(0);
                b[8..8 + v.len()].copy_from_slice(v);
                reply.ioctl(0, &b);
            }
            200 if ctl
                && size as usize == b.len()
                && b.len().is_multiple_of(72)
                && b.len() >= 3 * 72 =>
            {
                // CARD_INFO: three simulated GPUs, ids 0x100, 0x200, 0x300,
                // minors 0, 1, 2; the rest of the array is left empty.
                b.fill(0);
                for i in 0..3usize {
                    let e = &mut b[i * 72..(i + 1) * 72];
                    e[0] = 1;
                    put_u32(e, 16, 0x100 * (i as u32 + 1));
                    put_u32(e, 56, i as u32);
                }
                reply.ioctl(0, &b);
            }
            0x2B if ctl && exact(48) => {
                // RM_ALLOC (NVOS64): hRoot @0, parent @4, new @8, class @12.
                let (root, parent, new, class) =
                    (u32_at(&b, 0), u32_at(&b, 4), u32_at(&b, 8), u32_at(&b, 12));
                let status = match class {
                    0x41 => {
                        let h = if new == 0 {
                            st.next_client += 1;
                            0xC1D0_0000 + st.next_client
                        } else {
                            new
                        };
                        st.handles.insert(h);
                        put_u32(&mut b, 8, h);
                        NV_OK
                    }
                    0x80 | 0x2080
                        if !st.handles.contains(&root) || !st.handles.contains(&parent) =>
                    {
                        NV_ERR_INVALID_OBJECT_PARENT
                    }
                    0x80 | 0x2080 if u64_at(&b, 16) == 0 => NV_ERR_INVALID_ARGUMENT,
                    // A device names its GPU by device instance (0..2).
                    0x80 if read_from(
                        nix::unistd::Pid::from_raw(req.pid() as i32),
                        u64_at(&b, 16),
                        4,
                    )
                    .is_none_or(|d| u32_at(&d, 0) > 2) =>
                    {
                        NV_ERR_INVALID_ARGUMENT
                    }
                    0x80 | 0x2080 => {
                        st.handles.insert(new);
                        NV_OK
                    }
                    // NV01_EVENT_OS_EVENT: NV0005 {hParentClient @0, ...,
                    // data @16}; `data` is an fd the driver resolves in the
                    // caller's table, where it must be an nvidia node.
                    0x79 => {
                        let pid = nix::unistd::Pid::from_raw(req.pid() as i32);
                        match read_from(pid, u64_at(&b, 16), 24) {
                            Some(p) if st.handles.contains(&u32_at(&p, 0)) => {
                                if fd_names(pid, u64_at(&p, 16), "nvidia") {
                                    st.handles.insert(new);
                                    NV_OK
                                } else {
                                    NV_ERR_INVALID_ARGUMENT
                                }
                            }
                            _ => NV_ERR_INVALID_ARGUMENT,
                        }
                    }
                    _ => NV_ERR_INVALID_CLASS,
                };
                put_u32(&mut b, 40, status);
                reply.ioctl(0, &b);
            }
            0x2A if ctl && exact(32) => {
                // RM_CONTROL (NVOS54): cmd @8, params @16, size @24.
                let (cmd, params, psize) = (u32_at(&b, 8), u64_at(&b, 16), u32_at(&b, 24));
                let pid = nix::unistd::Pid::from_raw(req.pid() as i32);
                let status = if !st.handles.contains(&u32_at(&b, 4)) {
                    NV_ERR_OBJECT_NOT_FOUND
                } else if cmd == 0x201 && psize == 128 {
                    // GPU_GET_ATTACHED_IDS: all three, as the driver lists
                    // them to any client.
                    let mut ids = [0xFFu8; 128];
                    for (i, id) in [0x100u32, 0x200, 0x300].iter().enumerate() {
                        ids[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                    }
                    write_to(pid, params, &ids)
                } else if cmd == 0x204 && psize == 4 {
                    // GPU_GET_DEVICE_IDS: device instances 0, 1, 2.
                    write_to(pid, params, &0b111u32.to_le_bytes())
                } else if cmd == 0x205 && psize == 32 {
                    // GPU_GET_ID_INFO_V2: gpu 0x100 is device instance 0,
                    // 0x200 is 1, 0x300 is 2.
                    match read_from(pid, params, 32) {
                        Some(mut p) if [0x100, 0x200, 0x300].contains(&u32_at(&p, 0)) => {
                            let id = u32_at(&p, 0);
                            put_u32(&mut p, 8, (id >> 8) - 1);
                            write_to(pid, params, &p)
                        }
                        _ => NV_ERR_INVALID_ARGUMENT,
                    }
                } else if cmd == 0x21B && psize == 12 {
                    // GPU_GET_PCI_INFO of the id the caller names.
                    match read_from(pid, params, 12) {
                        Some(mut p) if [0x100, 0x200, 0x300].contains(&u32_at(&p, 0)) => {
                            let id = u32_at(&p, 0);
                            p[8..10].copy_from_slice(&((id >> 8) as u16).to_le_bytes());
                            write_to(pid, params, &p)
                        }
                        _ => NV_ERR_INVALID_ARGUMENT,
                    }
                } else if cmd == 0x80_0201 && psize == 16 {
                    // GPU_GET_CLASSLIST: {numClasses, classList}; a NULL
                    // list asks how many.
                    match read_from(pid, params, 16) {
                        Some(mut p) => {
                            let (n, list) = (u32_at(&p, 0), u64_at(&p, 8));
                            let mut status = NV_OK;
                            if list != 0 {
                                st.embedded.push(list);
                                status = if (n as usize) < SIM_CLASSES.len() {
                                    NV_ERR_INVALID_ARGUMENT
                                } else {
                                    let bytes: Vec<u8> =
                                        SIM_CLASSES.iter().flat_map(|c| c.to_le_bytes()).collect();
                                    write_to(pid, list, &bytes)
                                };
                            }
                            put_u32(&mut p, 0, SIM_CLASSES.len() as u32);
                            if status == NV_OK {
                                write_to(pid, params, &p)
                            } else {
                                status
                            }
                        }
                        None => NV_ERR_INVALID_ARGUMENT,
                    }
                } else if cmd == 0x101 && psize == 40 {
                    // SYSTEM_GET_BUILD_VERSION: three strings of
                    // sizeOfStrings bytes; too small (or any NULL) asks
                    // for the size.
                    match read_from(pid, params, 40) {
                        Some(mut p) => {
                            let size = u32_at(&p, 0) as usize;
                            let ptrs = [u64_at(&p, 8), u64_at(&p, 16), u64_at(&p, 24)];
                            let need = SIM_BUILD.len() + 1;
                            let mut status = NV_OK;
                            if size >= need && ptrs.iter().all(|x| *x != 0) {
                                let mut text = SIM_BUILD.as_bytes().to_vec();
                                text.resize(size, 0);
                                for x in ptrs {
                                    st.embedded.push(x);
                                    if status == NV_OK {
                                        status = write_to(pid, x, &text);
                                    }
                                }
                                put_u32(&mut p, 32, 142);
                            } else {
                                put_u32(&mut p, 0, need as u32);
                            }
                            if status == NV_OK {
                                write_to(pid, params, &p)
                            } else {
                                status
                            }
                        }
                        None => NV_ERR_INVALID_ARGUMENT,
                    }
                } else if cmd == 0x3D05 && psize == 24 {
                    // OS_UNIX_EXPORT_OBJECT_TO_FD: `fd` (@16) is resolved
                    // in the caller's fd table and must be a control node.
                    match read_from(pid, params, 24) {
                        Some(p) => {
                            if fd_names(pid, u64::from(u32_at(&p, 16)), "nvidiactl") {
                                NV_OK
                            } else {
                                NV_ERR_INVALID_ARGUMENT
                            }
                        }
                        None => NV_ERR_INVALID_ARGUMENT,
                    }
                } else if cmd == 0x2080_0110 && psize == 132 {
                    // GPU_GET_NAME_STRING: the name goes into the caller's
                    // params buffer, as the driver writes it.
                    let mut name = [0u8; 128];
                    name[..SIM_GPU_NAME.len()].copy_from_slice(SIM_GPU_NAME.as_bytes());
                    let remote = [nix::sys::uio::RemoteIoVec {
                        base: params as usize + 4,
                        len: 128,
                    }];
                    match nix::sys::uio::process_vm_writev(pid, &[IoSlice::new(&name)], &remote) {
                        Ok(128) => NV_OK,
                        _ => NV_ERR_INVALID_ARGUMENT,
                    }
                } else {
                    NV_ERR_NOT_SUPPORTED
                };
                put_u32(&mut b, 28, status);
                reply.ioctl(0, &b);
            }
            0x29 if ctl && exact(16) => {
                // RM_FREE (NVOS00): hObjectOld @8, status @12.
                let h = u32_at(&b, 8);
                let status = if st.handles.remove(&h) {
                    NV_OK
                } else {
                    NV_ERR_OBJECT_NOT_FOUND
                };
                put_u32(&mut b, 12, status);
                reply.ioctl(0, &b);
            }
            // Anything else: the driver's EINVAL, block copied out as is.
            _ => reply.error(fuser::Errno::EINVAL),
        }
    }
}
