//! The `__devproxy` role: one sandbox's device proxy in a process of its
//! own (see `airlock_devproxy`'s crate docs for the mechanism).
//!
//! The sandbox's pid 1 installs the proxy's ioctl filter with a new
//! seccomp listener and sends the listener to the broker, which hands the
//! proxy exactly two descriptors: that listener and the sandbox's user
//! namespace. The proxy joins the sandbox's cgroup, picks the ABI tables
//! for the host driver's version (the broker checked they exist), enters
//! the sandbox's user namespace and becomes the sandbox range's nobody
//! there, keeping one capability, CAP_SYS_PTRACE, and that only in the
//! sandbox's namespace: it is what reading a sandbox process's parameter
//! block (`process_vm_readv`) and duplicating its fd (`pidfd_getfd`) need.
//! In the host's namespace it holds nothing, so the driver sees an
//! unprivileged caller. Then no_new_privs, RLIMIT_NOFILE, and the seccomp
//! allow-list `devproxy/seccomp.json`, which has no call that opens a
//! path or a socket. (No landlock domain: landlock lets a process reach
//! only processes inside its own domain, which the sandbox's are not.)
//!
//! Each refused call becomes an event (a `denial/ioctl` audit row with the
//! reason), within a budget; the calls served are counted by kind and
//! reported as a `device/ioctls` row every minute they change and when
//! the sandbox ends. If the proxy dies, its sandbox is torn down; if the
//! broker dies, it exits.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_devproxy::forward::{Devices, Forwarder, Served};
use airlock_devproxy::validate::{Grant, Reply};
use airlock_devproxy::{AbiSet, VersionPolicy};
use airlock_shim::channel::Channel;
use airlock_shim::jail::JailReport;
use serde::{Deserialize, Serialize};

use crate::component::{self, Report, Role};

/// The device proxy role.
#[derive(Debug)]
pub struct GpuRole;

impl Role for GpuRole {
    const ARG: &'static str = crate::DEVPROXY_ROLE;
    const NAME: &'static str = "devproxy";
    type Spec = GpuServerSpec;
    type Ready = GpuReady;
    type Event = GpuEvent;
    type Command = GpuCommand;
}

/// What the broker tells a running proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GpuCommand {
    /// Report the last counts and exit: the sandbox is going.
    Drain,
}

/// What a proxy serves. Two descriptors travel beside it: the sandbox's
/// seccomp listener, then its user namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuServerSpec {
    /// The sandbox, for messages.
    pub sandbox_id: String,
    /// The host driver's version (from its handshake).
    pub driver: String,
    /// Whether a later release of a stable branch may use the branch's
    /// newest tables (the operator's opt-in).
    pub allow_newer_in_branch: bool,
    /// The driver's ids of the granted GPUs, in the sandbox's order.
    pub gpu_ids: Vec<u32>,
    /// The files the sandbox's fds may name.
    pub devices: Devices,
    /// Refusals itemised per second at most (ten times that in a burst);
    /// past that they are only counted.
    pub events_per_sec: f64,
    /// Files to write "0" to, joining the sandbox's cgroup.
    pub cgroup_procs: Vec<std::path::PathBuf>,
    /// Open-files limit.
    pub nofile: u64,
    /// Uid and gid inside the sandbox's user namespace the proxy runs as
    /// (its nobody).
    pub run_as: (u32, u32),
}

/// What a proxy reports once confined.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuReady {
    /// What the jail reached.
    pub jail: JailReport,
    /// Whose tables it serves.
    pub tables: String,
}

/// What a proxy reports while it serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GpuEvent {
    /// A call that never reached the driver.
    Refused {
        /// Why.
        reason: String,
        /// What the caller got: `"EINVAL"`-style errno, or the RM status.
        reply: String,
    },
    /// Calls served since the last summary.
    Summary(IoctlCounts),
}

/// Calls served over an interval, by outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IoctlCounts {
    /// Performed on the driver, by kind (`RM_CONTROL 0x20800110`...).
    pub forwarded: BTreeMap<String, u64>,
    /// Of those, how many the driver failed (errno).
    pub driver_errors: u64,
    /// Refused before the driver.
    pub refused: u64,
    /// Refusals past the event budget (counted here, not itemised).
    pub refused_not_itemised: u64,
    /// Driver-shaped requests on files that are no granted device.
    pub not_a_device: u64,
    /// Other devices' requests let through as made.
    pub continued: u64,
    /// Blocks that could not be read or written (EFAULT).
    pub faults: u64,
    /// Seconds the interval covers.
    pub seconds: u64,
    /// Whether this is the last summary (the sandbox ended).
    #[serde(default)]
    pub last: bool,
}

impl IoctlCounts {
    fn is_empty(&self) -> bool {
        self.forwarded.is_empty()
            && self.refused == 0
            && self.not_a_device == 0
            && self.continued == 0
            && self.faults == 0
    }
}

/// The proxy's seccomp allow-list, as data.
pub const DEVPROXY_SECCOMP: &str = include_str!("../../devproxy/seccomp.json");

/// How often counts are reported while they change.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// Kinds of forwarded call counted by name at most; the rest are summed
/// under "other" (a sandbox chooses control numbers).
const MAX_KINDS: usize = 512;

/// Entry point of the `__devproxy` role; returns the exit status.
pub fn main() -> i32 {
    crate::sys::map_large_allocations();
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("airlock devproxy component: set_dumpable: {e}");
    }
    let Some((chan, spec, fds)) = component::accept_start::<GpuRole>() else {
        return 1;
    };
    match serve(&chan, spec, fds) {
        Ok(()) => 0,
        Err((stage, error)) => {
            component::report_failed::<GpuRole>(&chan, stage, error);
            1
        }
    }
}

type Stage = (&'static str, String);

fn serve(chan: &Channel, spec: GpuServerSpec, fds: Vec<OwnedFd>) -> Result<(), Stage> {
    for f in &spec.cgroup_procs {
        std::fs::write(f, "0").map_err(|e| ("join cgroup", format!("{}: {e}", f.display())))?;
    }
    let mut fds = fds.into_iter();
    let (Some(listener), Some(userns), None) = (fds.next(), fds.next(), fds.next()) else {
        return Err(("read spec", "expected exactly two descriptors".into()));
    };
    // The tables live as long as the process: its workers borrow them.
    let set: &'static AbiSet = Box::leak(Box::new(
        AbiSet::builtin().map_err(|e| ("ABI tables", e.to_string()))?,
    ));
    let policy = VersionPolicy {
        allow_newer_in_branch: spec.allow_newer_in_branch,
    };
    let abi = set
        .select(&spec.driver, policy)
        .map_err(|e| ("ABI tables", e.to_string()))?
        .abi();
    // The workers' end for events (dup is not in the allow-list).
    let events = Arc::new(
        chan.fd()
            .try_clone_to_owned()
            .map(Channel::from_fd)
            .map_err(|e| ("control channel", e.to_string()))?,
    );
    let jail = confine(&userns, spec.run_as, spec.nofile).map_err(|e| ("jail", e))?;
    drop(userns);
    let grant = Grant {
        gpu_ids: spec.gpu_ids.clone(),
    };
    let fwd = Arc::new(Forwarder::new(abi, grant, spec.devices.clone(), listener));
    let shared = Arc::new(Shared {
        counts: Mutex::new(IoctlCounts::default()),
        limiter: crate::util::RateLimiter::new(spec.events_per_sec, 10.0 * spec.events_per_sec),
    });
    // Several calls in flight at once: one thread's long driver call
    // does not hold up the sandbox's other threads.
    for _ in 0..WORKERS {
        let (fwd, shared, events) = (Arc::clone(&fwd), Arc::clone(&shared), Arc::clone(&events));
        std::thread::Builder::new()
            .spawn(move || worker(&fwd, &shared, &events))
            .map_err(|e| ("start a worker", e.to_string()))?;
    }
    let ready: Report<GpuReady, GpuEvent> = Report::Ready {
        version: component::PROTOCOL_VERSION,
        ready: GpuReady {
            jail,
            tables: abi.version.to_string(),
        },
    };
    chan.send(&ready, &[])
        .map_err(|e| ("report ready", e.to_string()))?;
    let mut since = Instant::now();
    loop {
        if command_waiting(chan)? {
            // Drain, or the broker closed its end (it died or stops us).
            // The command is read, not left queued: a socket closed with
            // unread data resets its peer, which then loses what we send.
            let drain = matches!(
                chan.recv::<component::Control<GpuServerSpec, GpuCommand>>(),
                Ok((
                    component::Control::Command {
                        command: GpuCommand::Drain
                    },
                    _
                ))
            );
            if drain {
                let mut counts = std::mem::take(&mut *crate::util::lock_or_recover(&shared.counts));
                counts.seconds = since.elapsed().as_secs();
                counts.last = true;
                let _ = send(chan, GpuEvent::Summary(counts));
            }
            // Returning ends the process, its workers with it.
            return Ok(());
        }
        if since.elapsed() >= SUMMARY_EVERY {
            let counts = std::mem::take(&mut *crate::util::lock_or_recover(&shared.counts));
            if !counts.is_empty() {
                let seconds = since.elapsed().as_secs();
                let _ = send(chan, GpuEvent::Summary(IoctlCounts { seconds, ..counts }));
            }
            since = Instant::now();
        }
    }
}

/// Threads answering notifications.
const WORKERS: usize = 4;

/// What the workers share with the main thread.
struct Shared {
    counts: Mutex<IoctlCounts>,
    limiter: crate::util::RateLimiter,
}

fn send(chan: &Channel, event: GpuEvent) -> Result<(), airlock_shim::channel::ChannelError> {
    let msg: Report<GpuReady, GpuEvent> = Report::Event { event };
    chan.send(&msg, &[])
}

/// Answers notifications until the listener fails (the sandbox is gone).
fn worker(fwd: &Forwarder<'_>, shared: &Shared, events: &Channel) {
    let mut turn = airlock_devproxy::forward::Receiving::default();
    while let Ok(served) = fwd.serve_next(&mut turn) {
        let refusal = {
            let mut c = crate::util::lock_or_recover(&shared.counts);
            match account(&mut c, served) {
                Some(r) if shared.limiter.admit().is_some() => Some(r),
                Some(_) => {
                    c.refused_not_itemised += 1;
                    None
                }
                None => None,
            }
        };
        if let Some(r) = refusal {
            let _ = send(events, r);
        }
    }
}

/// Whether the broker sent something (or closed its end) within 10 s.
fn command_waiting(chan: &Channel) -> Result<bool, Stage> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(chan.fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(10_000u16)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(("poll", e.to_string())),
    }
}

/// Counts one served call; a refusal comes back as its event.
fn account(c: &mut IoctlCounts, served: Served) -> Option<GpuEvent> {
    match served {
        Served::Forwarded { what, result } => {
            if result.is_err() {
                c.driver_errors += 1;
            }
            let key = if c.forwarded.len() < MAX_KINDS || c.forwarded.contains_key(&what) {
                what
            } else {
                "other".to_string()
            };
            *c.forwarded.entry(key).or_insert(0) += 1;
            None
        }
        Served::Refused { reason, reply } => {
            c.refused += 1;
            let reply = match reply {
                Reply::Errno(e) => nix::errno::Errno::from_raw(e).to_string(),
                Reply::Status { status, .. } => format!("RM status {status:#x}"),
            };
            Some(GpuEvent::Refused { reason, reply })
        }
        Served::Fault { what } => {
            c.faults += 1;
            Some(GpuEvent::Refused {
                reason: format!("cannot read or write {what}"),
                reply: nix::errno::Errno::EFAULT.to_string(),
            })
        }
        Served::NotADevice { .. } => {
            c.not_a_device += 1;
            None
        }
        Served::Continued { .. } => {
            c.continued += 1;
            None
        }
        Served::Gone => None,
    }
}

/// Enters the sandbox's user namespace as its nobody with CAP_SYS_PTRACE
/// there and nothing in the host's, then rlimits, no_new_privs and the
/// seccomp allow-list.
fn confine(userns: &OwnedFd, run_as: (u32, u32), nofile: u64) -> Result<JailReport, String> {
    use nix::sys::resource::{Resource, setrlimit};
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    /// CAP_SYS_PTRACE (capability 19).
    const PTRACE: u64 = 1 << 19;
    let seccomp =
        airlock_shim::seccomp::compile_allow_list(DEVPROXY_SECCOMP).map_err(|e| e.to_string())?;
    // Host root's groups go before we leave the namespace they mean anything in.
    setgroups(&[]).map_err(|e| format!("drop groups: {e}"))?;
    nix::sched::setns(userns.as_fd(), nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("enter the sandbox's user namespace: {e}"))?;
    // Full capabilities now, in the sandbox's namespace only: keep the one
    // the proxy needs there.
    airlock_shim::caps::drop_bounding_and_ambient_except(PTRACE).map_err(|e| e.to_string())?;
    let (u, g) = (Uid::from_raw(run_as.0), Gid::from_raw(run_as.1));
    setresgid(g, g, g).map_err(|e| format!("become gid {} of the sandbox: {e}", run_as.1))?;
    setresuid(u, u, u).map_err(|e| format!("become uid {} of the sandbox: {e}", run_as.0))?;
    airlock_shim::caps::keep_only(PTRACE).map_err(|e| e.to_string())?;
    let _ = nix::sys::prctl::set_dumpable(false);
    setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile).map_err(|e| format!("nofile: {e}"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("core: {e}"))?;
    airlock_shim::caps::set_no_new_privs().map_err(|e| e.to_string())?;
    // No landlock domain: landlock lets a process reach (ptrace access,
    // which `process_vm_readv` and `pidfd_getfd` check) only processes
    // inside its own domain, and the sandbox's processes are in theirs.
    // File access is shut by the allow-list instead: it has no call that
    // opens a path (no open, openat, socket, execve...).
    airlock_shim::seccomp::install_on_current_thread(&seccomp).map_err(|e| e.to_string())?;
    Ok(JailReport {
        landlock: airlock_shim::landlock::LandlockStatus {
            abi: 0,
            enforced: airlock_shim::landlock::Enforcement::NotEnforced,
        },
        caps_kept: PTRACE,
    })
}
