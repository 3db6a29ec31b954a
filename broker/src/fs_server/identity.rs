//! The filesystem server's host identity.
//!
//! A server starts as host root (only root may join the sandbox's cgroup,
//! clone the mounts it serves and answer the FUSE handshake) and then
//! leaves host root for good, before it reads a request:
//!
//! - **Idmapped layers.** The base (or rootfs) is attached through the id
//!   maps of a user namespace mapping ids `0..count` to the sandbox's
//!   host range, exactly as the sandbox's own user namespace does: a file
//!   host root owns reads as owned by sandbox root's host uid. The
//!   workspace is attached through a map of one id: its owner (whoever
//!   the caller is, host root included) reads as [`workspace_ids`], the
//!   last id of the sandbox's range, and what the server creates there as
//!   that id is stored as the owner's. No owner outside the sandbox's
//!   range needs to be mapped into the server for it to serve its layers.
//! - **A user namespace of its own** ([`enter_userns`]), created while the
//!   server's effective uid is sandbox root's host uid (so it and every
//!   per-user count made through it belong to the sandbox), mapping only
//!   the sandbox's host id range, each id to itself. The server then sets
//!   every uid and gid to [`workspace_ids`] and drops its supplementary
//!   groups: its capabilities now reach only inodes whose owners are in
//!   the sandbox's range, and as a plain host user it is no owner and no
//!   group member of anything else.
//! - **A registrar** ([`Registrar`]): a process forked before any of this
//!   that keeps, of host root's powers, only CAP_SYS_ADMIN, which the
//!   kernel requires for FUSE passthrough backing ids. It writes the
//!   server's id maps (only a holder of CAP_SETUID in the host's user
//!   namespace may map a range), then confines itself (landlock: read
//!   access to the base only; its own seccomp allow-list: receive a
//!   descriptor, register or release a backing id on its own connection,
//!   reply — no open of any kind) and registers backing files on request.
//!   The kernel reopens and reads each backing file with the registrar's
//!   credentials, landlock domain included, so passthrough reads stay
//!   within the base whatever a compromised server asks for.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;

use airlock_fs::IdMap;
use airlock_shim::channel::Channel;
use airlock_shim::jail::ComponentJail;
use airlock_shim::landlock::PolicyRule;
use airlock_shim::sys::Forked;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// The host (uid, gid) the workspace's owner reads as in the server: the
/// last ids of the sandbox's range.
pub(crate) fn workspace_ids(ids: &IdMap) -> (u32, u32) {
    let last = ids.count.saturating_sub(1);
    (
        ids.host_uid_base.saturating_add(last),
        ids.host_gid_base.saturating_add(last),
    )
}

/// User namespaces whose uid and gid maps are the given pairs
/// (`/proc/PID/uid_map` format), as descriptors to idmap mounts with. A
/// throwaway child holds each while its maps are written (all children
/// start first, so their set-up overlaps); they are gone when this returns.
///
/// Call while single-threaded (it forks).
pub(crate) fn idmap_userns(maps: &[(String, String)]) -> Result<Vec<OwnedFd>, String> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("pipe for idmap namespaces: {e}"))?;
    let mut children = Vec::with_capacity(maps.len());
    let mut failed = None;
    for _ in maps {
        match airlock_shim::sys::clone_fork(libc::CLONE_NEWUSER) {
            Ok(Forked::Child) => {
                drop(w);
                // Wait for the parent to take the namespace (or die).
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(&r, &mut b);
                airlock_shim::sys::exit_now(0)
            }
            Ok(Forked::Parent(child)) => children.push(child),
            Err(e) => {
                failed = Some(format!("create an idmap user namespace: {e}"));
                break;
            }
        }
    }
    drop(r);
    let taken = match failed {
        Some(e) => Err(e),
        None => children
            .iter()
            .zip(maps)
            .map(|(child, (uid_map, gid_map))| {
                (|| -> std::io::Result<OwnedFd> {
                    std::fs::write(format!("/proc/{child}/uid_map"), uid_map)?;
                    std::fs::write(format!("/proc/{child}/gid_map"), gid_map)?;
                    Ok(std::fs::File::open(format!("/proc/{child}/ns/user"))?.into())
                })()
                .map_err(|e| format!("map an idmap user namespace ({uid_map:?}): {e}"))
            })
            .collect(),
    };
    // Every child reads EOF and exits.
    drop(w);
    for child in children {
        reap(child);
    }
    taken
}

fn reap(child: Pid) {
    loop {
        match nix::sys::wait::waitpid(child, None) {
            Err(nix::Error::EINTR) => continue,
            _ => return,
        }
    }
}

/// What the server asks of its registrar.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Write the server's id maps (it has just created its user namespace).
    MapIds { uid_map: String, gid_map: String },
    /// Register the descriptor sent beside as a backing file.
    Open,
    /// Release a backing id.
    Close { id: u32 },
}

/// The registrar's answer.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Done,
    Id { id: u32 },
    Failed { errno: i32, what: String },
}

/// The server's end of its registrar.
#[derive(Debug)]
pub(crate) struct Registrar {
    chan: Mutex<Channel>,
}

/// The registrar's only capability, with why.
const REGISTRAR_CAPABILITIES: &[(u32, &str)] = &[(
    21,
    "CAP_SYS_ADMIN (host user namespace): the kernel registers and releases FUSE passthrough backing ids only for its holder",
)];

/// The registrar's seccomp allow-list, as data.
const REGISTRAR_SECCOMP: &str = include_str!("registrar-seccomp.json");

impl Registrar {
    /// Forks the registrar of the FUSE connection `dev`. Call while
    /// single-threaded and still host root, before anything else is
    /// opened that the registrar should not inherit (it closes every
    /// descriptor but its two anyway).
    pub(crate) fn start(
        dev: BorrowedFd<'_>,
        rootfs: Option<BorrowedFd<'_>>,
        rules: Vec<PolicyRule>,
        landlock_floor: u8,
    ) -> Result<Registrar, String> {
        let (ours, theirs) = Channel::pair().map_err(|e| format!("registrar channel: {e}"))?;
        let dev = dev
            .try_clone_to_owned()
            .map_err(|e| format!("registrar device: {e}"))?;
        let server = nix::unistd::getpid();
        match airlock_shim::sys::fork_single_threaded() {
            Ok(Forked::Child) => {
                drop(ours);
                let rootfs = rootfs.map(|r| r.as_raw_fd());
                let code = registrar_main(server, theirs, dev, rootfs, &rules, landlock_floor);
                airlock_shim::sys::exit_now(code)
            }
            Ok(Forked::Parent(_)) => Ok(Registrar {
                chan: Mutex::new(ours),
            }),
            Err(e) => Err(format!("fork the registrar: {e}")),
        }
    }

    fn ask(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> std::io::Result<Reply> {
        let chan = match self.chan.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        chan.send(req, fds).map_err(std::io::Error::other)?;
        let (reply, _) = chan.recv::<Reply>().map_err(std::io::Error::other)?;
        match reply {
            Reply::Failed { errno, what } => Err(std::io::Error::new(
                std::io::Error::from_raw_os_error(errno).kind(),
                format!("{what}: {}", std::io::Error::from_raw_os_error(errno)),
            )),
            r => Ok(r),
        }
    }
}

impl airlock_fs::BackingFiles for Registrar {
    fn open(&self, file: BorrowedFd<'_>) -> std::io::Result<u32> {
        match self.ask(&Request::Open, &[file])? {
            Reply::Id { id } => Ok(id),
            other => Err(std::io::Error::other(format!(
                "registrar answered {other:?}"
            ))),
        }
    }

    fn close(&self, id: u32) -> std::io::Result<()> {
        self.ask(&Request::Close { id }, &[]).map(|_| ())
    }
}

/// Moves the calling process (the server, single-threaded) into a user
/// namespace of its own that maps exactly the sandbox's host id range to
/// itself, then becomes [`workspace_ids`] (uid and gid) with no
/// supplementary groups. The capabilities it holds from here on are the
/// new namespace's: they reach only inodes owned within that range.
pub(crate) fn enter_userns(registrar: &Registrar, ids: &IdMap) -> Result<(), String> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let (u, g) = (ids.host_uid_base, ids.host_gid_base);
    let keep_u = Uid::from_raw(u32::MAX);
    let keep_g = Gid::from_raw(u32::MAX);
    // The namespace is owned by the effective uid that creates it, and
    // every per-user count made through it is charged to that owner:
    // sandbox root's host uid, as for the sandbox's own namespace.
    setresgid(keep_g, Gid::from_raw(g), keep_g).map_err(|e| format!("setresgid: {e}"))?;
    setresuid(keep_u, Uid::from_raw(u), keep_u).map_err(|e| format!("setresuid: {e}"))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("unshare the user namespace: {e}"))?;
    let maps = Request::MapIds {
        uid_map: format!("{u} {u} {}\n", ids.count),
        gid_map: format!("{g} {g} {}\n", ids.count),
    };
    registrar
        .ask(&maps, &[])
        .map_err(|e| format!("write the id maps: {e}"))?;
    setgroups(&[]).map_err(|e| format!("drop supplementary groups: {e}"))?;
    // The server acts as the workspace owner's ids (see `workspace_ids`):
    // what it makes in the workspace is stored as the owner's, and the
    // kernel refuses creating there as any id the workspace's idmap does
    // not map. Upper-layer files get their owners by explicit chown.
    let (wu, wg) = workspace_ids(ids);
    let (gid, uid) = (Gid::from_raw(wg), Uid::from_raw(wu));
    setresgid(gid, gid, gid).map_err(|e| format!("become gid {wg}: {e}"))?;
    setresuid(uid, uid, uid).map_err(|e| format!("become uid {wu}: {e}"))?;
    // A change of credentials resets these; set them again.
    let _ = nix::sys::prctl::set_dumpable(false);
    Ok(())
}

/// The registrar process: write the server's maps once, confine, then
/// register and release backing ids until the server goes.
fn registrar_main(
    server: Pid,
    chan: Channel,
    dev: OwnedFd,
    rootfs: Option<RawFd>,
    rules: &[PolicyRule],
    landlock_floor: u8,
) -> i32 {
    // Named apart from its server in `ps`.
    let _ = nix::sys::prctl::set_name(c"fs-registrar");
    // Die with the server; if it is already gone, stop here.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if nix::unistd::getppid() != server {
        return 1;
    }
    // Keep only the channel and the device (and stdio).
    let mut keep = vec![chan.fd().as_raw_fd(), dev.as_raw_fd()];
    keep.extend(rootfs);
    if crate::sys::close_all_but(&keep).is_err() {
        return 1;
    }
    let failed = |e: std::io::Error, what: &str| Reply::Failed {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
        what: what.to_string(),
    };
    // First: the server's maps.
    let reply = match chan.recv::<Request>() {
        Ok((Request::MapIds { uid_map, gid_map }, _)) => {
            match std::fs::write(format!("/proc/{server}/uid_map"), &uid_map)
                .and_then(|()| std::fs::write(format!("/proc/{server}/gid_map"), &gid_map))
            {
                Ok(()) => Reply::Done,
                Err(e) => failed(e, "write the server's id maps"),
            }
        }
        _ => return 1,
    };
    let mapped = matches!(reply, Reply::Done);
    if chan.send(&reply, &[]).is_err() || !mapped {
        return 1;
    }
    let jailed = airlock_shim::seccomp::compile_allow_list(REGISTRAR_SECCOMP)
        .map_err(airlock_shim::jail::JailError::from)
        .and_then(|seccomp| {
            airlock_shim::jail::apply(&ComponentJail {
                landlock: rules,
                landlock_floor,
                keep_caps: REGISTRAR_CAPABILITIES,
                nofile: 8,
                seccomp: Some(&seccomp),
            })
        });
    if jailed.is_err() {
        return 1;
    }
    if let Some(fd) = rootfs {
        // Its rule is in place; the descriptor itself is not needed.
        drop(airlock_shim::sys::own_received_fd(fd));
    }
    loop {
        let reply = match chan.recv::<Request>() {
            Ok((Request::Open, fds)) => match fds.first() {
                Some(file) => match airlock_fs::open_backing(dev.as_fd(), file.as_fd()) {
                    Ok(id) => Reply::Id { id },
                    Err(e) => failed(e, "register a backing file"),
                },
                None => failed(
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                    "no descriptor sent",
                ),
            },
            Ok((Request::Close { id }, _)) => match airlock_fs::close_backing(dev.as_fd(), id) {
                Ok(()) => Reply::Done,
                Err(e) => failed(e, "release a backing id"),
            },
            Ok((Request::MapIds { .. }, _)) => failed(
                std::io::Error::from_raw_os_error(libc::EPERM),
                "the maps are written once",
            ),
            // The server closed its end (or sent garbage): done.
            Err(_) => return 0,
        };
        if chan.send(&reply, &[]).is_err() {
            return 0;
        }
    }
}
