//! The `__fs` role: one sandbox's FUSE server in a process of its own.
//!
//! The broker mounts the sandbox's root (opening /dev/fuse and mounting
//! need CAP_SYS_ADMIN in the host's namespaces) and opens the caller's
//! workspace and rootfs with the caller's rights; the component gets
//! exactly those descriptors, joins the sandbox's cgroup (its CPU, memory,
//! threads and open files count against the sandbox's limits), forks its
//! registrar, moves into a private mount namespace that holds only what
//! it serves with its layers attached idmapped (`private_root`), opens its
//! layer roots, answers the kernel's INIT, leaves host root for a user
//! namespace of the sandbox's ids (see [`identity`]), then confines itself
//! before the first request: the sandbox's open-files
//! limit, only the capabilities in [`airlock_fs::SERVER_CAPABILITIES`],
//! no_new_privs, landlock limited to its own layers
//! ([`airlock_fs::MountSpec::host_paths`]) and the seccomp allow-list
//! [`airlock_fs::SERVER_SECCOMP`]. Its events
//! (file changes in /workspace, denials) come back over the control
//! channel; the broker audits them. If it dies, its sandbox is torn down;
//! if the broker dies, it exits.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use airlock_fs::{BaseSpec, FsEvent, HostAccess, IdMap, MountOptions, MountSpec};
use airlock_shim::channel::Channel;
use airlock_shim::jail::{ComponentJail, JailReport};
use airlock_shim::landlock::{Grant, PolicyRule};
use serde::{Deserialize, Serialize};

use crate::component::{self, Control, Report, Role};

mod identity;

/// The filesystem server role.
#[derive(Debug)]
pub struct FsRole;

impl Role for FsRole {
    const ARG: &'static str = crate::FS_ROLE;
    const NAME: &'static str = "fs";
    type Spec = FsServerSpec;
    type Ready = FsReady;
    type Event = FsServerEvent;
    type Command = FsCommand;
}

/// What the broker asks of a serving filesystem server: snapshot work,
/// answered by one [`FsServerEvent::Snapshot`] with the same `id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FsCommand {
    /// Freeze both live trees into new layers named `layer`.
    Freeze {
        /// Request id.
        id: u64,
        /// The new layers' name.
        layer: String,
    },
    /// Serve `chain` under emptied live trees.
    Restore {
        /// Request id.
        id: u64,
        /// The frozen layers to serve.
        chain: airlock_fs::LayerChain,
    },
    /// Delete frozen layers nothing serves.
    Remove {
        /// Request id.
        id: u64,
        /// The layers.
        layers: airlock_fs::LayerChain,
    },
    /// Another sandbox changed these workspace paths (or, with `all`,
    /// more than were counted): refresh what the kernel cached of them.
    /// Not answered.
    Invalidate {
        /// Sandbox paths, `/workspace/...`.
        paths: Vec<String>,
        /// Anything may have changed.
        all: bool,
    },
}

/// What a filesystem server reports while it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FsServerEvent {
    /// A file change in /workspace, or a denial.
    Fs {
        /// The event.
        event: FsEvent,
    },
    /// Events the server dropped over its budget since the last one it
    /// sent (they are counted where they happen, in the sandbox's own
    /// process, and never reach the broker).
    RateLimited {
        /// How many.
        dropped: u64,
    },
    /// Workspace paths this sandbox changed since the last report (`all`:
    /// more than [`CHANGED_BATCH`], or reports were lost), for the other
    /// sandboxes serving the same workspace. Sent as changes happen,
    /// coalesced while more are queued; never rate-limited or audited.
    WorkspaceChanged {
        /// Sandbox paths.
        paths: Vec<String>,
        /// Anything may have changed.
        all: bool,
    },
    /// The answer to the [`FsCommand`] `id`: the chain now served, or why
    /// it failed.
    Snapshot {
        /// The command's id.
        id: u64,
        /// The outcome.
        result: Result<airlock_fs::LayerChain, String>,
    },
}

/// What a filesystem server serves. Descriptors travel beside it, in this
/// order: /dev/fuse (mounted), the workspace directory, the rootfs
/// directory when `rootfs` is set, and the agent's workspace counters
/// when `workspace_quota` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsServerSpec {
    /// The sandbox, for messages.
    pub sandbox_id: String,
    /// Whether the base is a rootfs (its descriptor is the third one)
    /// rather than the host's system directories.
    pub rootfs: bool,
    /// The upper layer directory (created by the broker).
    pub upper: PathBuf,
    /// The sandbox's id map.
    pub ids: IdMap,
    /// Sandbox user (uid, gid) inside.
    pub user_ids: (u32, u32),
    /// Its name.
    pub user: String,
    /// Hostname for /etc/hostname and /etc/hosts.
    pub hostname: String,
    /// Files to write "0" to, joining the sandbox's cgroup.
    pub cgroup_procs: Vec<PathBuf>,
    /// Open-files limit of the server (the sandbox's).
    pub nofile: u64,
    /// What the sandbox may add to its layers and workspace.
    #[serde(default)]
    pub quota: airlock_fs::DiskQuota,
    /// The agent's limits on its persistent workspace, counted in the
    /// shared counters passed last; `None` for the caller's own directory.
    #[serde(default)]
    pub workspace_quota: Option<airlock_fs::DiskQuota>,
    /// Snapshots: the frozen layers to serve (see
    /// [`airlock_fs::MountSpec::snapshots`]); `None` for none.
    #[serde(default)]
    pub snapshots: Option<airlock_fs::LayerChain>,
    /// Host directories of frozen copy-on-write layers a fork serves, by
    /// the host uid base their files are owned in (attached through an
    /// idmap onto this sandbox's range).
    #[serde(default)]
    pub frozen_upper: Vec<(u32, PathBuf)>,
    /// The host directory of the agent's frozen workspace layers, for a
    /// fork (attached through the workspace's idmap).
    #[serde(default)]
    pub frozen_workspace: Option<PathBuf>,
    /// Lowest landlock ABI accepted.
    pub landlock_floor: u8,
    /// Events sent to the broker per second at most (and burst); past
    /// that they are counted.
    pub events_per_sec: f64,
    /// Burst of events sent at once.
    pub events_burst: f64,
}

/// What a server reports once confined.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsReady {
    /// Whether reads of base files go straight to the host files.
    pub passthrough: bool,
    /// What the jail reached.
    pub jail: JailReport,
    /// How long each start-up stage took, µs.
    #[serde(default)]
    pub stages_us: Vec<(String, u64)>,
}

/// Events queued for the broker before new ones are dropped (the broker
/// rate-limits its audit rows far below this anyway).
const EVENT_QUEUE: usize = 4096;

/// Most changed workspace paths one report names; past that it says
/// "anything".
pub const CHANGED_BATCH: usize = 256;

/// Most bytes of paths one report carries (far below the channel's
/// message limit, whatever the paths' lengths); past that it says
/// "anything".
const CHANGED_BYTES: usize = 64 * 1024;

/// Entry point of the `__fs` role; returns the exit status.
pub fn main() -> i32 {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("airlock fs component: set_dumpable: {e}");
    }
    let Some((chan, spec, fds)) = component::accept_start::<FsRole>() else {
        return 1;
    };
    match serve(&chan, spec, fds) {
        Ok(()) => 0,
        Err((stage, error)) => {
            component::report_failed::<FsRole>(&chan, stage, error);
            1
        }
    }
}

type Stage = (&'static str, String);

fn serve(chan: &Channel, spec: FsServerSpec, fds: Vec<OwnedFd>) -> Result<(), Stage> {
    let fail = |stage: &'static str| move |e: &dyn std::fmt::Display| (stage, e.to_string());
    let mut stages_us: Vec<(String, u64)> = Vec::new();
    let mut last = std::time::Instant::now();
    let mut mark = |name: &str| {
        let now = std::time::Instant::now();
        let us = u64::try_from(now.duration_since(last).as_micros()).unwrap_or(u64::MAX);
        stages_us.push((name.to_string(), us));
        last = now;
    };
    // Everything after this is charged to the sandbox. Single-threaded
    // here, so "0" moves the whole process (v1 `tasks` moves one thread).
    for f in &spec.cgroup_procs {
        std::fs::write(f, "0").map_err(|e| ("join cgroup", format!("{}: {e}", f.display())))?;
    }
    let want = 2 + usize::from(spec.rootfs) + usize::from(spec.workspace_quota.is_some());
    if fds.len() != want {
        return Err((
            "read spec",
            format!("{} descriptors, expected {want}", fds.len()),
        ));
    }
    let mut fds = fds.into_iter();
    let (Some(dev), Some(ws)) = (fds.next(), fds.next()) else {
        return Err(("read spec", "descriptors missing".into()));
    };
    let rootfs = if spec.rootfs { fds.next() } else { None };
    let workspace_usage = match (spec.workspace_quota, fds.next()) {
        (Some(limit), Some(fd)) => Some(airlock_fs::WorkspaceUsage {
            counters: std::sync::Arc::new(
                airlock_fs::SharedUsage::map(fd).map_err(|e| ("workspace quota", e.to_string()))?,
            ),
            limit,
        }),
        _ => None,
    };
    // Forked first, while this process holds nothing else.
    let registrar = identity::Registrar::start(
        dev.as_fd(),
        rootfs.as_ref().map(|r| r.as_fd()),
        registrar_rules(rootfs.as_ref()),
        spec.landlock_floor,
    )
    .map_err(|e| ("registrar", e))?;
    mark("join cgroup");
    let origins: Vec<u32> = spec.frozen_upper.iter().map(|(b, _)| *b).collect();
    let idmaps = Idmaps::new(&spec.ids, &ws, &origins).map_err(|e| ("idmap namespaces", e))?;
    mark("idmaps");
    let frozen = FrozenTrees {
        upper: &spec.frozen_upper,
        workspace: spec.frozen_workspace.as_deref(),
    };
    private_root(
        &spec.upper,
        &ws,
        rootfs.as_ref(),
        &frozen,
        &idmaps,
        &spec.ids,
    )
    .map_err(|e| ("private root", e))?;
    drop(idmaps);
    let mount_spec = MountSpec {
        base: match &rootfs {
            Some(_) => BaseSpec::Rootfs(PathBuf::from(ROOTFS_AT)),
            None => BaseSpec::Host,
        },
        upper: PathBuf::from(UPPER_AT),
        workspace: PathBuf::from(WORKSPACE_AT),
        ids: spec.ids,
        base_idmapped: true,
        sandbox_uid: spec.user_ids.0,
        sandbox_gid: spec.user_ids.1,
        sandbox_user: spec.user.clone(),
        hostname: spec.hostname.clone(),
        quota: spec.quota,
        workspace_usage,
        snapshots: spec.snapshots.clone(),
        frozen: airlock_fs::FrozenDirs {
            upper: spec
                .frozen_upper
                .iter()
                .map(|(b, _)| PathBuf::from(format!("{FROZEN_AT}/{b}")))
                .collect(),
            workspace: spec
                .frozen_workspace
                .as_ref()
                .map(|_| PathBuf::from(FROZEN_WS_AT)),
        },
    };
    mark("private root");
    let (tx, rx) = sync_channel::<FsEvent>(EVENT_QUEUE);
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = airlock_fs::Server::new(
        &mount_spec,
        sink(tx, std::sync::Arc::clone(&lost)),
        &MountOptions::default(),
    )
    .map_err(|e| ("open layers", error_chain(&e)))?;
    mark("open layers");
    let serving = server
        .handshake(dev)
        .map_err(|e| ("fuse handshake", error_chain(&e)))?;
    mark("handshake");
    identity::enter_userns(&registrar, &spec.ids).map_err(|e| ("user namespace", e))?;
    serving.delegate_backing(std::sync::Arc::new(registrar));
    mark("user namespace");
    let jail = confine(&mount_spec, spec.landlock_floor, spec.nofile)
        .map_err(|e| fail("jail")(&error_chain(&e)))?;
    mark("jail");
    let (events_per_sec, events_burst) = (spec.events_per_sec, spec.events_burst);
    let ready: Report<FsReady, FsServerEvent> = Report::Ready {
        version: component::PROTOCOL_VERSION,
        ready: FsReady {
            passthrough: serving.passthrough_enabled(),
            jail,
            stages_us,
        },
    };
    chan.send(&ready, &[])
        .map_err(|e| fail("report ready")(&e))?;
    // Events to the broker, and the broker's end watched: when it closes
    // (the broker died), this process exits and the kernel ends the mount.
    let events = chan_dup(chan).map_err(|e| fail("control channel")(&e))?;
    let watch = chan_dup(chan).map_err(|e| fail("control channel")(&e))?;
    let forwarder = std::thread::Builder::new()
        .name("fs-events".into())
        .spawn(move || {
            let limiter = crate::util::RateLimiter::new(events_per_sec, events_burst);
            // False once the broker's end is gone. A message too large for
            // the channel (never expected: paths are cut to fit) is
            // skipped, not the end of every later event.
            let send = |event: FsServerEvent| {
                let msg: Report<FsReady, FsServerEvent> = Report::Event { event };
                match events.send(&msg, &[]) {
                    Ok(()) => true,
                    Err(airlock_shim::channel::ChannelError::TooLarge(n)) => {
                        tracing::warn!(
                            bytes = n,
                            "an fs event too large for the channel was skipped"
                        );
                        true
                    }
                    Err(_) => false,
                }
            };
            let mut changed = Changed::default();
            loop {
                // Events already queued are taken at once; when none is,
                // the workspace changes gathered so far go out before
                // waiting for the next.
                let event = match rx.try_recv() {
                    Ok(e) => e,
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        if let Some(report) = changed.take(&lost)
                            && !send(report)
                        {
                            return;
                        }
                        match rx.recv() {
                            Ok(e) => e,
                            Err(_) => break,
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                };
                if let FsEvent::Mutation { path, to, .. } = &event {
                    changed.add(path, to.as_deref());
                }
                // Usage reports (once a second at most) and the quota's
                // first hits are state, not a flood: never dropped.
                if matches!(event, FsEvent::Usage { .. } | FsEvent::QuotaHit { .. }) {
                    if !send(FsServerEvent::Fs { event }) {
                        return;
                    }
                    continue;
                }
                let Some(dropped) = limiter.admit() else {
                    continue;
                };
                if dropped > 0 && !send(FsServerEvent::RateLimited { dropped }) {
                    return;
                }
                if !send(FsServerEvent::Fs { event }) {
                    return;
                }
            }
            // The stream ended (the sandbox is going): the last count too.
            let dropped = limiter.take_dropped();
            if dropped > 0 {
                send(FsServerEvent::RateLimited { dropped });
            }
        })
        .map_err(|e| fail("start event thread")(&e))?;
    let replies = chan_dup(chan).map_err(|e| fail("control channel")(&e))?;
    let snapshots = serving.snapshots();
    std::thread::Builder::new()
        .name("fs-watch".into())
        .spawn(move || {
            // Commands until the channel closes (the broker's end): then
            // the process exits and the kernel ends the mount.
            while let Ok((msg, _fds)) = watch.recv::<Control<FsServerSpec, FsCommand>>() {
                let Control::Command { command } = msg else {
                    break;
                };
                let Some((id, result)) = run_command(&snapshots, command) else {
                    continue;
                };
                let msg: Report<FsReady, FsServerEvent> = Report::Event {
                    event: FsServerEvent::Snapshot { id, result },
                };
                if replies.send(&msg, &[]).is_err() {
                    break;
                }
            }
            std::process::exit(0);
        })
        .map_err(|e| fail("start watch thread")(&e))?;
    let served = serving.run();
    // The session is over (unmounted) and the filesystem with its event
    // sink dropped: the forwarder sends what is queued, then ends.
    if forwarder.join().is_err() {
        return Err(("forward events", "the event thread panicked".into()));
    }
    served.map_err(|e| fail("serve")(&e))
}

/// Runs one command; returns the answer due (its id and outcome), if any.
fn run_command(
    snapshots: &airlock_fs::Snapshots,
    command: FsCommand,
) -> Option<(u64, Result<airlock_fs::LayerChain, String>)> {
    let text = |e: airlock_fs::SnapshotError| e.to_string();
    Some(match command {
        FsCommand::Freeze { id, layer } => (id, snapshots.freeze(&layer).map_err(text)),
        FsCommand::Restore { id, chain } => {
            (id, snapshots.restore(&chain).map(|()| chain).map_err(text))
        }
        FsCommand::Remove { id, layers } => (
            id,
            snapshots
                .remove(&layers)
                .map(|()| snapshots.chain())
                .map_err(text),
        ),
        FsCommand::Invalidate { paths, all } => {
            snapshots.workspace_changed(&paths, all);
            return None;
        }
    })
}

/// The jail of a server of `mount_spec`: landlock limited to its own
/// layers, only [`airlock_fs::SERVER_CAPABILITIES`], no_new_privs, the
/// sandbox's open-files limit, and the seccomp allow-list
/// [`airlock_fs::SERVER_SECCOMP`]. Applies to the calling thread and the
/// threads it starts afterwards.
pub fn confine(
    mount_spec: &MountSpec,
    landlock_floor: u8,
    nofile: u64,
) -> Result<JailReport, airlock_shim::jail::JailError> {
    let rules = landlock_rules(mount_spec.host_paths());
    let seccomp = airlock_shim::seccomp::compile_allow_list(airlock_fs::SERVER_SECCOMP)?;
    airlock_shim::jail::apply(&ComponentJail {
        landlock: &rules,
        landlock_floor,
        keep_caps: airlock_fs::SERVER_CAPABILITIES,
        nofile,
        seccomp: Some(&seccomp),
    })
}

/// Landlock rules granting each of `paths` its access.
fn landlock_rules(paths: Vec<airlock_fs::HostPath>) -> Vec<PolicyRule> {
    paths
        .into_iter()
        .map(|h| PolicyRule {
            path: h.path,
            grant: match h.access {
                HostAccess::Read => Grant::Read,
                HostAccess::ReadDir => Grant::ReadDir,
                HostAccess::ReadWrite => Grant::AllButDeviceIoctl,
                _ => Grant::All,
            },
            required: false,
            comment: h.why,
        })
        .collect()
}

/// The landlock rules of a server's registrar: read access to the base
/// only. The kernel reopens each registered backing file with the
/// registrar's credentials (landlock domain included) and reads it with
/// them, so these rules bound what passthrough can ever read. `rootfs` is
/// the rootfs descriptor, which the registrar keeps until it has applied
/// them.
fn registrar_rules(rootfs: Option<&OwnedFd>) -> Vec<PolicyRule> {
    use std::os::fd::AsRawFd;
    let paths = match rootfs {
        Some(r) => vec![airlock_fs::HostPath {
            path: PathBuf::from(format!("/proc/self/fd/{}", r.as_raw_fd())),
            access: HostAccess::Read,
            why: "the read-only base (a rootfs)",
        }],
        // The host's top-level base directories, whole: the registrar
        // only ever reopens a file its server opened, and the server's own
        // landlock rules already keep hidden /etc entries out of its reach.
        None => airlock_fs::HOST_BASE_NAMES
            .iter()
            .map(|name| airlock_fs::HostPath {
                path: PathBuf::from(format!("/{name}")),
                access: HostAccess::Read,
                why: "the read-only base (the host's system directories)",
            })
            .collect(),
    };
    landlock_rules(paths)
}

/// Where the server's private root shows its own layers.
const UPPER_AT: &str = "/layers/upper";
const WORKSPACE_AT: &str = "/layers/workspace";
const ROOTFS_AT: &str = "/layers/rootfs";
/// Where frozen copy-on-write layers of another uid base are attached,
/// one directory per base.
const FROZEN_AT: &str = "/layers/frozen";
/// Where the agent's frozen workspace layers are attached, for a fork.
const FROZEN_WS_AT: &str = "/layers/workspace-layers";

/// The frozen layers' host directories a server attaches.
struct FrozenTrees<'a> {
    upper: &'a [(u32, PathBuf)],
    workspace: Option<&'a std::path::Path>,
}

/// Moves the server into a mount namespace of its own whose root holds
/// only what it serves: the host base directories bound read-only
/// (symlinks among them recreated as symlinks), its upper layer and
/// workspace bound read-write, and a rootfs read-only. The
/// host's root is detached. Landlock confines opening files but not
/// changing metadata by name (chown, chmod, utimes): here no host path
/// outside the server's own layers resolves at all, the base is a
/// read-only mount (EROFS), and `..` from a layer's handle stops at that
/// layer's bind mount.
fn private_root(
    upper: &std::path::Path,
    ws: &OwnedFd,
    rootfs: Option<&OwnedFd>,
    frozen: &FrozenTrees<'_>,
    idmaps: &Idmaps,
    ids: &IdMap,
) -> Result<(), String> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    use rustix::mount::{MoveMountFlags, OpenTreeFlags, move_mount, open_tree};
    let none: Option<&str> = None;
    let e = |what: &str| {
        let what = what.to_string();
        move |err: nix::Error| format!("{what}: {err}")
    };
    let cwd = rustix::fs::CWD;
    let clone = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    let by_fd = clone | OpenTreeFlags::AT_EMPTY_PATH;
    let tree = |what: &str, r: rustix::io::Result<OwnedFd>| {
        r.map_err(|err| format!("clone the mount of {what}: {err}"))
    };
    let idmapped = |what: &str, t: OwnedFd, userns: &OwnedFd| -> Result<OwnedFd, String> {
        crate::sys::idmap_mount(t.as_fd(), userns.as_fd()).map_err(|err| {
            format!(
                "idmap the mount of {what} (its filesystem must support idmapped mounts): {err}"
            )
        })?;
        Ok(t)
    };
    // Detached copies of exactly what the server serves, taken while this
    // process still shares the broker's mount namespace (a mount of
    // another namespace cannot be bound into a new one).
    let mut trees: Vec<(String, OwnedFd, bool)> = vec![
        (
            UPPER_AT.into(),
            tree("the upper layer", open_tree(cwd, upper, clone))?,
            false,
        ),
        (
            WORKSPACE_AT.into(),
            idmapped(
                "the workspace",
                tree("the workspace", open_tree(ws, "", by_fd))?,
                &idmaps.workspace,
            )?,
            false,
        ),
    ];
    // Frozen layers lie in trees sandboxes shaped: reached without
    // following a symlink on the way.
    let nofollow = |what: &str, dir: &std::path::Path| {
        crate::tree::open_dir_nofollow(dir).map_err(|err| format!("open {what}: {err}"))
    };
    for ((base, dir), userns) in frozen.upper.iter().zip(&idmaps.origins) {
        let what = format!("the frozen layers of uid base {base}");
        let fd = nofollow(&what, dir)?;
        trees.push((
            format!("{FROZEN_AT}/{base}"),
            idmapped(&what, tree(&what, open_tree(&fd, "", by_fd))?, userns)?,
            false,
        ));
    }
    if let Some(dir) = frozen.workspace {
        let what = "the agent's frozen workspace layers";
        let fd = nofollow(what, dir)?;
        trees.push((
            FROZEN_WS_AT.into(),
            idmapped(
                what,
                tree(what, open_tree(&fd, "", by_fd))?,
                &idmaps.workspace,
            )?,
            false,
        ));
    }
    let mut links = Vec::new();
    if let Some(r) = rootfs {
        trees.push((
            ROOTFS_AT.into(),
            idmapped(
                "the rootfs",
                tree("the rootfs", open_tree(r, "", by_fd))?,
                &idmaps.base,
            )?,
            true,
        ));
    } else {
        for name in airlock_fs::HOST_BASE_NAMES {
            let host = format!("/{name}");
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(&host)
                        .map_err(|err| format!("readlink {host}: {err}"))?;
                    links.push((host, target));
                }
                Ok(m) if m.is_dir() => {
                    let t = tree(&host, open_tree(cwd, host.as_str(), clone))?;
                    let t = idmapped(&host, t, &idmaps.base)?;
                    trees.push((host, t, true));
                }
                _ => {}
            }
        }
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(e("unshare mount namespace"))?;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(e("make mounts private"))?;
    let new = "/tmp";
    mount(
        Some("tmpfs"),
        new,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        // Owned by sandbox root's host ids: it is the host base's root
        // directory, shown to the sandbox as `/`, and read through no
        // idmap.
        Some(
            format!(
                "mode=0755,size=64k,uid={},gid={}",
                ids.host_uid_base, ids.host_gid_base
            )
            .as_str(),
        ),
    )
    .map_err(e("mount the private root"))?;
    let dir = |p: &str| {
        std::fs::create_dir_all(format!("{new}{p}")).map_err(|err| format!("mkdir {p}: {err}"))
    };
    dir("/oldroot")?;
    for (host, target) in &links {
        std::os::unix::fs::symlink(target, format!("{new}{host}"))
            .map_err(|err| format!("symlink {host}: {err}"))?;
    }
    for (at, t, read_only) in &trees {
        let target = format!("{new}{at}");
        dir(at)?;
        move_mount(
            t,
            "",
            cwd,
            target.as_str(),
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|err| format!("attach {at}: {err}"))?;
        let mut flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if *read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(none, target.as_str(), none, flags, none).map_err(e(&format!("remount {at}")))?;
    }
    drop(trees);
    nix::unistd::chdir(new).map_err(e("chdir to the private root"))?;
    nix::unistd::pivot_root(".", "oldroot").map_err(e("pivot_root"))?;
    umount2("/oldroot", MntFlags::MNT_DETACH).map_err(e("detach the host root"))?;
    std::fs::remove_dir("/oldroot").map_err(|err| format!("rmdir /oldroot: {err}"))?;
    nix::unistd::chdir("/").map_err(e("chdir /"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(e("remount the private root read-only"))
}

/// The user namespaces whose maps the server's layers are attached
/// through (see [`identity`]).
struct Idmaps {
    /// Ids `0..count` to the sandbox's host range: the base and rootfs.
    base: OwnedFd,
    /// The workspace's owner to [`identity::workspace_ids`].
    workspace: OwnedFd,
    /// Per frozen uid base (in order): that base's range onto the
    /// sandbox's.
    origins: Vec<OwnedFd>,
}

impl Idmaps {
    fn new(ids: &IdMap, ws: &OwnedFd, origins: &[u32]) -> Result<Idmaps, String> {
        let st = rustix::fs::fstat(ws).map_err(|e| format!("stat the workspace: {e}"))?;
        let (wu, wg) = identity::workspace_ids(ids);
        let mut maps = vec![
            (
                format!("0 {} {}\n", ids.host_uid_base, ids.count),
                format!("0 {} {}\n", ids.host_gid_base, ids.count),
            ),
            (
                format!("{} {wu} 1\n", st.st_uid),
                format!("{} {wg} 1\n", st.st_gid),
            ),
        ];
        for o in origins {
            maps.push((
                format!("{o} {} {}\n", ids.host_uid_base, ids.count),
                format!("{o} {} {}\n", ids.host_gid_base, ids.count),
            ));
        }
        let mut fds = identity::idmap_userns(&maps)?.into_iter();
        match (fds.next(), fds.next()) {
            (Some(base), Some(workspace)) => Ok(Idmaps {
                base,
                workspace,
                origins: fds.collect(),
            }),
            _ => Err("idmap namespaces missing".into()),
        }
    }
}

/// The server's event sink: never blocks a FUSE thread; drops when the
/// queue to the broker is full.
fn sink(
    tx: SyncSender<FsEvent>,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> airlock_fs::EventSink {
    std::sync::Arc::new(move |ev| match tx.try_send(ev) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        // A dropped change must still reach the other sandboxes: the next
        // report says "anything".
        Err(TrySendError::Full(_)) => lost.store(true, std::sync::atomic::Ordering::Relaxed),
    })
}

/// Workspace paths changed since the last report, at most
/// [`CHANGED_BATCH`].
#[derive(Default)]
struct Changed {
    paths: std::collections::BTreeSet<String>,
    bytes: usize,
    all: bool,
}

impl Changed {
    fn add(&mut self, path: &str, to: Option<&str>) {
        for p in std::iter::once(path).chain(to) {
            if self.all {
                return;
            }
            if self.paths.len() >= CHANGED_BATCH || self.bytes + p.len() > CHANGED_BYTES {
                self.all = true;
                self.paths.clear();
                self.bytes = 0;
                return;
            }
            if self.paths.insert(p.to_string()) {
                self.bytes += p.len();
            }
        }
    }

    /// The report due, if anything changed (or changes were lost).
    fn take(&mut self, lost: &std::sync::atomic::AtomicBool) -> Option<FsServerEvent> {
        let all = self.all || lost.swap(false, std::sync::atomic::Ordering::Relaxed);
        if self.paths.is_empty() && !all {
            return None;
        }
        let paths = std::mem::take(&mut self.paths).into_iter().collect();
        self.all = false;
        self.bytes = 0;
        Some(FsServerEvent::WorkspaceChanged {
            paths: if all { Vec::new() } else { paths },
            all,
        })
    }
}

fn chan_dup(chan: &Channel) -> std::io::Result<Channel> {
    Ok(Channel::from_fd(chan.fd().as_fd().try_clone_to_owned()?))
}

/// An error with its causes, for a one-line report.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use super::*;

    #[test]
    fn workspace_changes_are_coalesced_and_bounded() {
        let lost = std::sync::atomic::AtomicBool::new(false);
        let mut c = Changed::default();
        assert!(c.take(&lost).is_none(), "nothing changed, nothing said");
        c.add("/workspace/a", None);
        c.add("/workspace/a", Some("/workspace/b"));
        match c.take(&lost) {
            Some(FsServerEvent::WorkspaceChanged { paths, all: false }) => {
                assert_eq!(paths, ["/workspace/a", "/workspace/b"]);
            }
            other => panic!("{other:?}"),
        }
        for i in 0..=CHANGED_BATCH {
            c.add(&format!("/workspace/f{i}"), None);
        }
        assert!(matches!(
            c.take(&lost),
            Some(FsServerEvent::WorkspaceChanged { all: true, ref paths }) if paths.is_empty()
        ));
        // Long paths (a deep tree) never make a report the channel refuses.
        let long = format!("/workspace/{}", "d/".repeat(40_000));
        c.add(&long, None);
        assert!(matches!(
            c.take(&lost),
            Some(FsServerEvent::WorkspaceChanged { all: true, .. })
        ));
        // A change the queue dropped makes the next report "anything".
        lost.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(
            c.take(&lost),
            Some(FsServerEvent::WorkspaceChanged { all: true, .. })
        ));
        assert!(c.take(&lost).is_none());
    }

    const PROBE_ENV: &str = "AIRLOCK_TEST_FS_JAIL_PROBE";
    /// Host uid (and gid) of the probe's sandbox root.
    const PROBE_BASE: u32 = 0x3000_0000;

    fn try_read(p: &Path) -> &'static str {
        match std::fs::File::open(p) {
            Ok(_) => "open",
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => "denied",
            Err(_) => "error",
        }
    }

    /// The probe itself: runs only in the re-executed test process that
    /// [`a_confined_server_reaches_only_its_own_layers`] starts, confines
    /// that process exactly as a server confines itself, and reports what
    /// it could still open.
    #[test]
    fn jail_probe_child() {
        let Ok(dir) = std::env::var(PROBE_ENV) else {
            return;
        };
        let dir = Path::new(&dir);
        let spec = MountSpec {
            base: BaseSpec::Host,
            upper: dir.join("upper"),
            workspace: dir.join("workspace"),
            ids: IdMap {
                host_uid_base: PROBE_BASE,
                host_gid_base: PROBE_BASE,
                count: 65536,
            },
            base_idmapped: false,
            sandbox_uid: 1000,
            sandbox_gid: 1000,
            sandbox_user: "sandbox".into(),
            hostname: "probe".into(),
            quota: airlock_fs::DiskQuota::default(),
            snapshots: None,
            workspace_usage: None,
            frozen: airlock_fs::FrozenDirs::default(),
        };
        // libtest runs this test on a thread of its own, and a process
        // creates a user namespace only while single-threaded: the probe
        // runs in a forked child, which has this thread only (libtest's
        // main thread, blocked waiting for the test, holds no lock the
        // probe takes).
        match airlock_shim::sys::clone_fork(0).unwrap() {
            airlock_shim::sys::Forked::Child => {
                probe(dir, &spec);
                airlock_shim::sys::exit_now(0)
            }
            airlock_shim::sys::Forked::Parent(child) => {
                nix::sys::wait::waitpid(child, None).unwrap();
            }
        }
    }

    fn probe(dir: &Path, spec: &MountSpec) {
        // The server's identity first, as in `serve`: its own user
        // namespace mapping only the sandbox's range, then the jail.
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let registrar = identity::Registrar::start(devnull.as_fd(), None, Vec::new(), 0).unwrap();
        identity::enter_userns(&registrar, &spec.ids).unwrap();
        confine(spec, 0, 256).unwrap();
        let own = std::fs::write(dir.join("upper/new"), b"x").is_ok();
        let ws = std::fs::write(dir.join("workspace/new"), b"x").is_ok();
        let tmp = match std::fs::write(dir.join("elsewhere"), b"x") {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => "denied",
            Ok(()) => "open",
            Err(_) => "error",
        };
        let chown_to_root = std::os::unix::fs::chown(dir.join("upper/mine"), Some(0), Some(0));
        println!(
            "PROBE own_upper={own} workspace={ws} other_layer={} elsewhere={tmp} \
             shadow={} root={} proc={} usr={} sandbox_owned={} host_root_owned={} \
             chown_to_host_root={} uid={}",
            try_read(&dir.join("other/upper/secret")),
            try_read(Path::new("/etc/shadow")),
            try_read(Path::new("/root")),
            try_read(Path::new("/proc/1/environ")),
            try_read(Path::new("/usr/bin/env")),
            try_read(&dir.join("upper/mine")),
            try_read(&dir.join("upper/foreign")),
            if chown_to_root.is_ok() {
                "done"
            } else {
                "refused"
            },
            nix::unistd::getuid(),
        );
    }

    /// From inside a server's jail, nothing but its own layers (and the
    /// visible base) can be opened: not another sandbox's layer, not a
    /// hidden /etc file, not any other host path. Its rights over files
    /// are those of the sandbox's host id range only: it runs as sandbox
    /// root's host uid, reads a 0600 file owned within the range, and
    /// neither reads a 0600 file of host root's nor gives a file to host
    /// root.
    #[test]
    fn a_confined_server_reaches_only_its_own_layers() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        for d in ["upper", "workspace", "other/upper"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("other/upper/secret"), b"s").unwrap();
        // As the broker lays them out: the layers owned by sandbox root's
        // host ids, reachable through a searchable directory.
        let base = PROBE_BASE;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(dir.path().join("upper"), Some(base), Some(base)).unwrap();
        // The workspace as the server sees it through its idmap.
        let w = base + 65535;
        std::os::unix::fs::chown(dir.path().join("workspace"), Some(w), Some(w)).unwrap();
        // Mode 0600 files, one owned within the sandbox's range, one by
        // host root: only the first is within the server's rights.
        for (f, owner) in [("upper/mine", base + 5), ("upper/foreign", 0)] {
            let p = dir.path().join(f);
            std::fs::write(&p, b"s").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&p, Some(owner), Some(owner)).unwrap();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "fs_server::tests::jail_probe_child",
                "--nocapture",
            ])
            .env(PROBE_ENV, dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("PROBE"))
            .unwrap_or_else(|| panic!("no probe output: {text} {:?}", out.stderr));
        assert_eq!(
            line,
            format!(
                "PROBE own_upper=true workspace=true other_layer=denied elsewhere=denied \
                 shadow=denied root=denied proc=denied usr=open sandbox_owned=open \
                 host_root_owned=denied chown_to_host_root=refused uid={}",
                PROBE_BASE + 65535
            ),
        );
    }
}
