//! The forwarder: answers a sandbox's seccomp notifications for `ioctl`,
//! performing each admitted call itself and refusing the rest.
//!
//! For one notification: resolve the notifying process (pidfd), check the
//! notification is still pending (so the pid was not reused), take a
//! duplicate of the fd it named (`pidfd_getfd`) and identify the device
//! by its `st_rdev` (never by path). Copy the block the request names out
//! of the process (`process_vm_readv`), judge it ([`crate::validate`]),
//! and for a plan: copy every embedded buffer into our memory and point
//! the block at the copies, duplicate every fd field and put our numbers
//! in, issue the canonical request on our duplicate, then restore the
//! sandbox's pointers and fd numbers and copy the block and buffers back
//! (also on failure: the driver copies out on every path but `EFAULT`).
//! The syscall is answered with the driver's value or errno. Nothing that
//! was checked is answered with `CONTINUE`: by then another thread could
//! have rewritten the block or put another file at the fd number. The one
//! `CONTINUE` is for another device's request on a file that is no
//! granted device, when no escape takes its (nr, size) and it is no UVM
//! number ([`Forwarder`]'s `continuable`): no driver acts on it whatever
//! the fd names when it runs.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;

use crate::abi::Abi;
use crate::layout::{read_u32, read_u64};
use crate::sys;
use crate::validate::{self, Decision, Grant, Node, Reply};

/// What identifies a device file: a character device by its number; a
/// regular file (the simulated driver's FUSE files in tests) by its
/// device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKey {
    Char(u64),
    File { dev: u64, ino: u64 },
}

impl DeviceKey {
    /// The key of an open file.
    pub fn of(st: &rustix::fs::Stat) -> Self {
        if st.st_mode & libc::S_IFMT == libc::S_IFCHR {
            Self::Char(st.st_rdev)
        } else {
            Self::File {
                dev: st.st_dev,
                ino: st.st_ino,
            }
        }
    }
}

/// The devices a sandbox's fds may name.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Devices {
    /// `/dev/nvidiactl`.
    pub ctl: Option<DeviceKey>,
    /// The granted GPUs' nodes.
    pub gpus: Vec<DeviceKey>,
    /// `/dev/nvidia-uvm`.
    pub uvm: Option<DeviceKey>,
}

impl Devices {
    fn node_of(&self, key: DeviceKey) -> Option<Node> {
        if self.ctl == Some(key) {
            Some(Node::Ctl)
        } else if self.gpus.contains(&key) {
            Some(Node::Gpu)
        } else if self.uvm == Some(key) {
            Some(Node::Uvm)
        } else {
            None
        }
    }

    fn node_of_fd(&self, fd: &OwnedFd) -> Option<Node> {
        rustix::fs::fstat(fd)
            .ok()
            .and_then(|st| self.node_of(DeviceKey::of(&st)))
    }
}

/// What became of one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// Performed; the driver's value or errno went back.
    Forwarded {
        what: String,
        result: Result<i64, i32>,
    },
    /// Refused by the validator (audited with the reason).
    Refused { reason: String, reply: Reply },
    /// An ioctl on a file that is not a granted device: `ENOTTY`.
    NotADevice { fd: i32, request: u64 },
    /// Another device's request that no driver could act on whatever the
    /// fd names when it runs: let through as made.
    Continued { fd: i32, request: u64 },
    /// The caller's memory could not be read or written: `EFAULT`.
    Fault { what: String },
    /// The notifying thread went away first; nothing to answer.
    Gone,
}

/// One sandbox's forwarder.
#[derive(Debug)]
pub struct Forwarder<'a> {
    abi: &'a Abi,
    grant: Grant,
    devices: Devices,
    listener: OwnedFd,
    /// The granted GPUs' device instances, once learned.
    instances: std::sync::OnceLock<Vec<u32>>,
    /// Held by the one worker waiting in `NOTIF_RECV` (leader/followers):
    /// every thread blocked in the receive is woken by each notification
    /// (the listener's wait queue is not exclusive), so four workers
    /// waiting there cost three futile wake-ups per call (a bare round
    /// trip of 12.4 µs instead of 4.8 µs with one on a 2-vCPU VM,
    /// `bench/notify_floor.c`). The
    /// others wait on this lock, which wakes one. The receiver keeps it
    /// while it judges the call and lets go only before it calls the
    /// driver, which may block: a refused call hands nothing over, and a
    /// call that blocks in the driver never holds up the next.
    receiving: Mutex<()>,
}

impl<'a> Forwarder<'a> {
    pub fn new(abi: &'a Abi, grant: Grant, devices: Devices, listener: OwnedFd) -> Self {
        // Best effort: older kernels keep cross-CPU wake-ups.
        let _ = sys::sync_wake_up(listener.as_fd());
        Self {
            abi,
            grant,
            devices,
            listener,
            instances: std::sync::OnceLock::new(),
            receiving: Mutex::new(()),
        }
    }

    /// The seccomp listener, to wait on beside other descriptors.
    pub fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Whether a notification is waiting, within `timeout_ms`.
    ///
    /// # Errors
    /// The poll's.
    pub fn ready(&self, timeout_ms: i32) -> io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, poll};
        let timeout = rustix::event::Timespec {
            tv_sec: i64::from(timeout_ms / 1000),
            tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
        };
        let mut fds = [PollFd::new(&self.listener, PollFlags::IN)];
        let n = poll(&mut fds, Some(&timeout))?;
        Ok(n > 0 && fds[0].revents().contains(PollFlags::IN))
    }

    /// Receives and answers one notification.
    ///
    /// # Errors
    /// Only when the listener itself fails (the sandbox is gone); every
    /// problem with one call is answered to that call.
    pub fn serve_one(&self) -> io::Result<Served> {
        self.serve_next(&mut Receiving(None))
    }

    /// Receives and answers one notification as a worker that keeps its
    /// turn at receiving (`turn`) from one call to the next until a call
    /// goes to the driver: a worker serving calls that never reach the
    /// driver wakes no other.
    ///
    /// # Errors
    /// As [`Self::serve_one`].
    pub fn serve_next<'f>(&'f self, turn: &mut Receiving<'f>) -> io::Result<Served> {
        let turn = &mut turn.0;
        if turn.is_none() {
            // A poisoned lock guards nothing: the unit inside is all.
            *turn = Some(
                self.receiving
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        }
        let n = match sys::recv(self.listener.as_fd()) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Served::Gone),
            Err(e) => return Err(e),
        };
        let (served, val, errno) = self.judge(&n, turn);
        let sent = match &served {
            Served::Gone => return Ok(served),
            Served::Continued { .. } => sys::answer_continue(self.listener.as_fd(), n.id),
            _ => sys::answer(self.listener.as_fd(), n.id, val, errno),
        };
        match sent {
            Ok(()) => Ok(served),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Served::Gone),
            Err(e) => Err(e),
        }
    }

    /// The outcome of notification `n` and the (value, errno) to answer.
    fn judge(&self, n: &sys::Notification, turn: &mut Turn<'_>) -> (Served, i64, i32) {
        if i64::from(n.syscall) != libc::SYS_ioctl {
            return (
                Served::Refused {
                    reason: format!("syscall {} is not served here", n.syscall),
                    reply: Reply::Errno(libc::ENOSYS),
                },
                0,
                libc::ENOSYS,
            );
        }
        let fd = n.args[0] as i32;
        let request = n.args[1];
        let arg = n.args[2];
        let pid = Pid::from_raw(n.pid as i32);
        // Pid 0: the notifying thread is not visible from our pid namespace.
        let Some(rpid) = rustix::process::Pid::from_raw(n.pid as i32) else {
            return (
                Served::Refused {
                    reason: "the calling process is not visible to the proxy".into(),
                    reply: Reply::Errno(libc::ESRCH),
                },
                0,
                libc::ESRCH,
            );
        };
        // The notifying thread may be any thread of its process (CUDA's
        // are many): a thread pidfd names it.
        let Ok(pidfd) = open_thread(rpid) else {
            // Never left unanswered: its thread would wait for ever.
            return if self.continuable(request) {
                (Served::Continued { fd, request }, 0, 0)
            } else {
                (
                    Served::Refused {
                        reason: format!("thread {} of the caller cannot be resolved", n.pid),
                        reply: Reply::Errno(libc::ESRCH),
                    },
                    0,
                    libc::ESRCH,
                )
            };
        };
        if !sys::still_pending(self.listener.as_fd(), n.id) {
            return (Served::Gone, 0, 0);
        }
        let dup = match rustix::process::pidfd_getfd(
            &pidfd,
            fd,
            rustix::process::PidfdGetfdFlags::empty(),
        ) {
            Ok(d) => d,
            // A call no driver could act on runs as made even where we may
            // not look at the fd (the sandbox's pid 1 and its children
            // before they exec are not ours to inspect).
            Err(_) if self.continuable(request) => {
                return (Served::Continued { fd, request }, 0, 0);
            }
            Err(e) if e == rustix::io::Errno::BADF => {
                return (Served::NotADevice { fd, request }, 0, libc::EBADF);
            }
            Err(e) => {
                return (
                    Served::Refused {
                        reason: format!("fd {fd} of the caller cannot be inspected: {e}"),
                        reply: Reply::Errno(libc::EPERM),
                    },
                    0,
                    libc::EPERM,
                );
            }
        };
        let Some(node) = self.devices.node_of_fd(&dup) else {
            return if self.continuable(request) {
                (Served::Continued { fd, request }, 0, 0)
            } else {
                (Served::NotADevice { fd, request }, 0, libc::ENOTTY)
            };
        };
        let size = if node == Node::Uvm {
            0
        } else {
            validate::frontend_block_size(request)
        };
        let mut block = vec![0u8; size];
        if size > 0 && read_remote(pid, arg, &mut block).is_err() {
            return (
                Served::Fault {
                    what: format!("the {size}-byte block at {arg:#x}"),
                },
                0,
                libc::EFAULT,
            );
        }
        match validate::check(self.abi, &self.grant, node, request, &block) {
            Decision::Refuse(r) => refuse(pid, arg, r.reason, r.reply),
            // UVM is let through by number in the sandbox's own filter; one
            // that reaches us came some other way and is not performed here
            // (it binds to the caller's address space).
            Decision::Native { what } => (
                Served::Refused {
                    reason: format!("{what} runs in the caller's context only"),
                    reply: Reply::Errno(validate::EINVAL),
                },
                0,
                validate::EINVAL,
            ),
            Decision::Forward(plan) => self.perform(n.id, pid, &pidfd, dup, arg, block, plan, turn),
        }
    }

    /// The device instances of the granted GPUs, asked of the driver once
    /// (`GPU_GET_ID_INFO_V2` for each granted id, on the caller's client
    /// `h_client`, through the caller's nvidiactl) and kept: RM numbers
    /// device instances for the whole host. None when the driver does not
    /// answer for every one (the call needing them is then refused).
    fn device_instances(&self, ctl: BorrowedFd<'_>, h_client: u32) -> Option<Vec<u32>> {
        use crate::layout::at;
        if let Some(v) = self.instances.get() {
            return Some(v.clone());
        }
        let mut out = Vec::with_capacity(self.grant.gpu_ids.len());
        for id in &self.grant.gpu_ids {
            let mut params = [0u8; validate::ID_INFO_V2_SIZE];
            put_u32(&mut params, 0, *id);
            let mut block = [0u8; 32];
            // NVOS54: hClient @0, hObject @4 (the client itself).
            put_u32(&mut block, 0, h_client);
            put_u32(&mut block, 4, h_client);
            put_u32(&mut block, at::CTRL_CMD, validate::GET_ID_INFO_V2);
            put_u64(&mut block, at::CTRL_PARAMS, params.as_mut_ptr() as u64);
            put_u32(
                &mut block,
                at::CTRL_PARAMS_SIZE,
                validate::ID_INFO_V2_SIZE as u32,
            );
            let request = validate::canonical(validate::esc::RM_CONTROL, 32);
            sys::ioctl_block(ctl, request, &mut block).ok()?;
            if read_u32(&block, at::CTRL_STATUS) != 0 {
                return None;
            }
            out.push(read_u32(&params, validate::DEVICE_INSTANCE_AT));
        }
        let _ = self.instances.set(out.clone());
        Some(out)
    }

    /// Whether `request`, made on a file that is not a granted device, may
    /// run as made: no escape of the driver takes its (nr, size), and it is
    /// no number the UVM driver could route (no small integer, nothing in
    /// the UVM table). Then whichever file the fd names when it runs, no
    /// driver acts on it: its safety depends neither on memory nor on the
    /// file, which another thread may swap meanwhile.
    fn continuable(&self, request: u64) -> bool {
        let r = (request & 0xFFFF_FFFF) as u32;
        let (nr, size) = validate::decode(u64::from(r));
        r >= crate::filter::SMALL
            && !self.abi.uvm.contains_key(&r)
            && !self.abi.driver_accepts(nr, size)
    }

    #[allow(clippy::too_many_arguments)]
    fn perform(
        &self,
        id: u64,
        pid: Pid,
        pidfd: &OwnedFd,
        dup: OwnedFd,
        arg: u64,
        mut block: Vec<u8>,
        plan: validate::Plan,
        turn: &mut Turn<'_>,
    ) -> (Served, i64, i32) {
        // Embedded buffers into our memory; the block points at them.
        let mut buffers: Vec<(usize, u64, Vec<u8>)> = Vec::new();
        for b in &plan.buffers {
            let remote = read_u64(&block, b.pointer_at);
            let mut local = vec![0u8; b.len];
            if read_remote(pid, remote, &mut local).is_err() {
                return (
                    Served::Fault {
                        what: format!("{}: {} bytes at {remote:#x}", plan.what, b.len),
                    },
                    0,
                    libc::EFAULT,
                );
            }
            buffers.push((b.pointer_at, remote, local));
        }
        // Inside an embedded control's params: its arrays into guarded
        // buffers of ours, unused pointers NULL, fds ours.
        // What a call refused for its parameters answers, as the driver
        // would: NV_ERR_INVALID_ARGUMENT in the block's status.
        let invalid_argument = Reply::Status {
            at: validate::status_at(plan.request, block.len()),
            status: validate::status::NV_ERR_INVALID_ARGUMENT,
        };
        let mut nested = Nested::default();
        if let Some(m) = &plan.nested {
            let client = read_u32(&block, 0);
            let marshalled = match buffers.first_mut() {
                Some((_, _, params)) => self.marshal_in(m, pid, pidfd, client, params, &mut nested),
                None => Err(NestedError::Invalid("its params are missing".into())),
            };
            if let Err(e) = marshalled {
                let (reason, reply) = match e {
                    NestedError::Invalid(why) => (why, invalid_argument),
                    NestedError::Fault(where_) => {
                        return (
                            Served::Fault {
                                what: format!("{}: {where_}", plan.what),
                            },
                            0,
                            libc::EFAULT,
                        );
                    }
                    NestedError::NotADevice(why) => (why, Reply::Errno(validate::EINVAL)),
                    NestedError::NoMemory(why) => {
                        (format!("no memory for {why}"), Reply::Errno(libc::ENOMEM))
                    }
                };
                return refuse(pid, arg, format!("{}: {reason}", plan.what), reply);
            }
        }
        // The granted GPUs' device instances, where the rule needs them
        // (learned once, from the driver, on the caller's own client).
        let instances = match plan.ids {
            Some(rule) if rule.needs_instances() => {
                // Learning them calls the driver.
                turn.take();
                match self.device_instances(dup.as_fd(), read_u32(&block, 0)) {
                    Some(v) => v,
                    None => {
                        return refuse(
                            pid,
                            arg,
                            format!(
                                "{}: the granted GPUs' device instances cannot be learned",
                                plan.what
                            ),
                            invalid_argument,
                        );
                    }
                }
            }
            _ => Vec::new(),
        };
        // GPUs named in a control's or alloc's parameters must be granted.
        if let (Some(rule), Some((_, _, params))) = (plan.ids, buffers.first_mut())
            && let Err(why) = validate::gpu_ids_before(rule, params, &self.grant, &instances)
        {
            return refuse(pid, arg, format!("{}: {why}", plan.what), invalid_argument);
        }
        for (at, _, local) in &mut buffers {
            let addr = local.as_mut_ptr() as u64;
            block[*at..*at + 8].copy_from_slice(&addr.to_le_bytes());
        }
        // Fd fields: the sandbox's numbers become our duplicates' numbers,
        // and each must itself be a granted device.
        let mut held: Vec<OwnedFd> = Vec::new();
        let mut theirs_at: Vec<(usize, u32)> = Vec::new();
        for at in &plan.fds {
            let raw = read_u32(&block, *at);
            theirs_at.push((*at, raw));
            let theirs = raw as i32;
            let Some(d) = self.dup_granted(pidfd, theirs) else {
                return refuse(
                    pid,
                    arg,
                    format!("{}: fd {theirs} is not a granted device", plan.what),
                    Reply::Errno(validate::EINVAL),
                );
            };
            block[*at..*at + 4].copy_from_slice(&d.as_raw_fd().to_le_bytes());
            held.push(d);
        }
        // The driver may block: the next call is another worker's.
        turn.take();
        let result = sys::ioctl_block(dup.as_fd(), plan.request, &mut block);
        drop(held);
        if result.is_ok() && plan.after == validate::After::CardInfo {
            validate::card_info(&mut block, &self.grant);
        }
        // Lists of GPUs the driver returned show only the granted ones.
        if let (true, Some(rule), Some((_, _, params))) =
            (result.is_ok(), plan.ids, buffers.first_mut())
        {
            validate::gpu_ids_after(rule, params, &self.grant, &instances);
        }
        // The sandbox's own pointers and fd numbers go back in place.
        if let Some((_, _, params)) = buffers.first_mut() {
            nested.restore(params);
        }
        for (at, remote, _) in &buffers {
            block[*at..*at + 8].copy_from_slice(&remote.to_le_bytes());
        }
        for (at, theirs) in theirs_at {
            block[at..at + 4].copy_from_slice(&theirs.to_le_bytes());
        }
        // The memory is written by pid: the call must still be pending, so
        // that its thread still holds that pid (a thread killed meanwhile
        // could have had its number reused).
        if !sys::still_pending(self.listener.as_fd(), id) {
            return (Served::Gone, 0, 0);
        }
        // One write for all of it, in this order (where the sandbox made
        // regions overlap, the later one wins, as written one by one).
        let mut out: Vec<(u64, &[u8])> = Vec::with_capacity(1 + buffers.len());
        out.push((arg, &block));
        out.extend(buffers.iter().map(|(_, r, l)| (*r, l.as_slice())));
        out.extend(nested.arrays.iter().map(|(_, r, l)| (*r, l.as_slice())));
        let copied_out = write_remote_all(pid, &out).is_ok();
        let (val, errno) = match (result, copied_out) {
            (_, false) => (0, libc::EFAULT),
            (Ok(v), true) => (v, 0),
            (Err(e), true) => (0, e),
        };
        (
            Served::Forwarded {
                what: plan.what,
                result,
            },
            val,
            errno,
        )
    }
}

/// A worker's hold on the listener's receive (see `Forwarder::receiving`),
/// given up before anything that may block.
type Turn<'a> = Option<MutexGuard<'a, ()>>;

/// A worker's turn at receiving notifications, kept across
/// [`Forwarder::serve_next`] calls (start with `Receiving::default()`).
#[derive(Default)]
pub struct Receiving<'f>(Turn<'f>);

impl std::fmt::Debug for Receiving<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Receiving").field(&self.0.is_some()).finish()
    }
}

/// What marshalling an embedded control's params put in place, to be
/// undone on the params copy before it goes back to the sandbox.
#[derive(Default)]
struct Nested {
    /// (offset in params, the sandbox's pointer, our guarded copy).
    arrays: Vec<(usize, u64, sys::GuardedBuf)>,
    /// (offset in params, the sandbox's pointer) of pointers made NULL.
    nulled: Vec<(usize, u64)>,
    /// (offset in params, bytes, the sandbox's fd field) and our
    /// duplicates, held until the call is done.
    fds: Vec<(usize, usize, u64)>,
    held: Vec<OwnedFd>,
}

impl Nested {
    /// Puts the sandbox's own pointers and fd numbers back into `params`.
    fn restore(&mut self, params: &mut [u8]) {
        for (at, remote, _) in &self.arrays {
            put_u64(params, *at, *remote);
        }
        for (at, remote) in &self.nulled {
            put_u64(params, *at, *remote);
        }
        for (at, bytes, theirs) in &self.fds {
            match bytes {
                8 => put_u64(params, *at, *theirs),
                _ => put_u32(params, *at, *theirs as u32),
            }
        }
        self.held.clear();
    }
}

/// Why an embedded control's params could not be marshalled.
enum NestedError {
    /// The driver's own answer to these params: `NV_ERR_INVALID_ARGUMENT`.
    Invalid(String),
    /// An array the sandbox named cannot be read.
    Fault(String),
    /// An fd in the params is not a granted device: EINVAL.
    NotADevice(String),
    /// The proxy could not map a buffer (its cgroup's memory).
    NoMemory(String),
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

impl Forwarder<'_> {
    /// Marshals the embedded pointers and fds of a control's `params`
    /// (the proxy's copy) per `m`, recording in `out` what to undo.
    fn marshal_in(
        &self,
        m: &crate::abi::Marshal,
        pid: Pid,
        pidfd: &OwnedFd,
        client: u32,
        params: &mut [u8],
        out: &mut Nested,
    ) -> Result<(), NestedError> {
        if let Some(at) = m.client
            && params.get(at..at + 4).is_some()
            && read_u32(params, at) != client
        {
            return Err(NestedError::Invalid(format!(
                "client {:#x} in its params is not the caller's own ({client:#x})",
                read_u32(params, at)
            )));
        }
        let arrays = validate::nested_buffers(m, params).map_err(NestedError::Invalid)?;
        for b in arrays {
            let remote = read_u64(params, b.pointer_at);
            let mut local = sys::GuardedBuf::new(b.len)
                .map_err(|e| NestedError::NoMemory(format!("{} bytes: {e}", b.len)))?;
            if read_remote(pid, remote, local.as_mut_slice()).is_err() {
                return Err(NestedError::Fault(format!(
                    "{} bytes at {remote:#x} (an embedded array)",
                    b.len
                )));
            }
            put_u64(params, b.pointer_at, local.addr());
            out.arrays.push((b.pointer_at, remote, local));
        }
        for &at in &m.null {
            if at + 8 <= params.len() {
                out.nulled.push((at, read_u64(params, at)));
                put_u64(params, at, 0);
            }
        }
        for &(at, bytes) in &m.fds {
            if at + bytes > params.len() {
                continue;
            }
            let raw = match bytes {
                8 => read_u64(params, at),
                _ => u64::from(read_u32(params, at)),
            };
            // The fd as the driver reads it: a C int. A negative one names
            // no file in either process; a wider value is no fd at all.
            let fd = match (bytes, i32::try_from(raw)) {
                (8, Ok(fd)) => fd,
                (8, Err(_)) => {
                    return Err(NestedError::NotADevice(format!("{raw:#x} is not an fd")));
                }
                _ => raw as u32 as i32,
            };
            if fd < 0 {
                continue;
            }
            let dup = self.dup_granted(pidfd, fd).ok_or_else(|| {
                NestedError::NotADevice(format!("fd {fd} is not a granted device"))
            })?;
            out.fds.push((at, bytes, raw));
            match bytes {
                8 => put_u64(params, at, dup.as_raw_fd() as u64),
                _ => put_u32(params, at, dup.as_raw_fd() as u32),
            }
            out.held.push(dup);
        }
        Ok(())
    }

    /// Our duplicate of the caller's fd `fd` when it is a granted device
    /// (an fd field of a block or of a control's params).
    fn dup_granted(&self, pidfd: &OwnedFd, fd: i32) -> Option<OwnedFd> {
        rustix::process::pidfd_getfd(pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
            .ok()
            .filter(|d| self.devices.node_of_fd(d).is_some())
    }
}

/// Answers a refused call as `reply` says: an errno, or a status written
/// into the caller's block at `arg` (EFAULT where it cannot be).
fn refuse(pid: Pid, arg: u64, reason: String, reply: Reply) -> (Served, i64, i32) {
    let errno = match reply {
        Reply::Errno(e) => e,
        Reply::Status { at, status } => {
            if write_remote(pid, arg + at as u64, &status.to_le_bytes()).is_ok() {
                0
            } else {
                libc::EFAULT
            }
        }
    };
    (Served::Refused { reason, reply }, 0, errno)
}

/// A pidfd for thread `tid` (`PIDFD_THREAD`, Linux 6.9); on older
/// kernels a process pidfd, which only a thread-group leader has.
fn open_thread(tid: rustix::process::Pid) -> rustix::io::Result<OwnedFd> {
    /// `PIDFD_THREAD` (`O_EXCL`).
    const PIDFD_THREAD: u32 = libc::O_EXCL as u32;
    let thread = rustix::process::PidfdFlags::from_bits_retain(PIDFD_THREAD);
    match rustix::process::pidfd_open(tid, thread) {
        Err(rustix::io::Errno::INVAL) => {
            rustix::process::pidfd_open(tid, rustix::process::PidfdFlags::empty())
        }
        other => other,
    }
}

/// Reads `buf.len()` bytes at `addr` of process `pid`, all or nothing.
fn read_remote(pid: Pid, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    let len = buf.len();
    let remote = [RemoteIoVec {
        base: usize::try_from(addr).map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?,
        len,
    }];
    let n = process_vm_readv(pid, &mut [IoSliceMut::new(buf)], &remote)?;
    if n != len {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(())
}

/// Writes each `(addr, bytes)` into process `pid` with one call, in order;
/// Err unless every byte was written.
fn write_remote_all(pid: Pid, parts: &[(u64, &[u8])]) -> io::Result<()> {
    let fault = || io::Error::from_raw_os_error(libc::EFAULT);
    let remote = parts
        .iter()
        .map(|(addr, b)| {
            Ok(RemoteIoVec {
                base: usize::try_from(*addr).map_err(|_| fault())?,
                len: b.len(),
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    let local: Vec<IoSlice<'_>> = parts.iter().map(|(_, b)| IoSlice::new(b)).collect();
    let total: usize = parts.iter().map(|(_, b)| b.len()).sum();
    let n = process_vm_writev(pid, &local, &remote)?;
    if n != total {
        return Err(fault());
    }
    Ok(())
}

/// Writes `buf` at `addr` of process `pid`, all or nothing.
fn write_remote(pid: Pid, addr: u64, buf: &[u8]) -> io::Result<()> {
    let len = buf.len();
    let remote = [RemoteIoVec {
        base: usize::try_from(addr).map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?,
        len,
    }];
    let n = process_vm_writev(pid, &[IoSlice::new(buf)], &remote)?;
    if n != len {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(())
}
