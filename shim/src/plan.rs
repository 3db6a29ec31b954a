//! Pure planning: a [`SandboxSpec`] becomes the list of mount operations that
//! builds the sandbox's view, run later by `mount::apply`. Nothing here
//! touches the system, so the list is unit-tested as data.

use std::path::{Path, PathBuf};

use crate::spec::SandboxSpec;

/// Mount flags the plan uses, kept symbolic so the plan is readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    /// MS_NOSUID
    pub nosuid: bool,
    /// MS_NODEV
    pub nodev: bool,
    /// MS_NOEXEC
    pub noexec: bool,
}

impl Flags {
    const SAFE: Flags = Flags {
        nosuid: true,
        nodev: true,
        noexec: true,
    };
}

/// One setup step. Targets are absolute paths on the host before pivot_root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupOp {
    /// Stop mount events propagating back to the host (`MS_REC|MS_PRIVATE` on /).
    MakeRootPrivate,
    /// Bind the new root onto itself so it is a mount this namespace owns.
    BindSelf(PathBuf),
    /// Mount a fresh filesystem.
    Mount {
        /// Filesystem type (proc, tmpfs, devpts).
        fstype: &'static str,
        /// Where.
        target: PathBuf,
        /// Flags.
        flags: Flags,
        /// Filesystem options.
        data: String,
    },
    /// Create an empty regular file (a bind-mount target).
    Touch(PathBuf),
    /// Create a directory.
    Mkdir(PathBuf),
    /// Bind a host path (a device node) onto a target.
    BindDevice {
        /// Host device node.
        source: PathBuf,
        /// Target file.
        target: PathBuf,
    },
    /// Create a symlink `link -> target`.
    Symlink {
        /// Link contents.
        target: PathBuf,
        /// The link.
        link: PathBuf,
    },
    /// Remount a mount point read-only.
    RemountReadOnly(PathBuf),
    /// Cover `target` with a read-only bind of `source`, when `target`
    /// exists (the GPU driver's procfs directory is there only when the
    /// driver is loaded).
    CoverIfPresent {
        /// Host directory shown instead.
        source: PathBuf,
        /// What it covers.
        target: PathBuf,
    },
    /// pivot_root into the new root and detach the old one.
    PivotRoot(PathBuf),
}

/// Device nodes bound from the host into the sandbox's /dev.
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Builds the setup plan for a sandbox.
pub fn plan(spec: &SandboxSpec) -> Vec<SetupOp> {
    let root = spec.root.clone();
    let at = |p: &str| -> PathBuf { root.join(p) };
    let mut ops = vec![SetupOp::MakeRootPrivate, SetupOp::BindSelf(root.clone())];
    ops.push(SetupOp::Mount {
        fstype: "proc",
        target: at("proc"),
        flags: Flags::SAFE,
        data: String::new(),
    });
    // The driver's procfs directory names every GPU of the host: the
    // sandbox sees the broker's copy of its granted part instead.
    if let Some(view) = spec.gpu.as_ref().and_then(|g| g.proc_view.clone()) {
        ops.push(SetupOp::CoverIfPresent {
            source: view,
            target: at("proc/driver/nvidia"),
        });
    }
    let dev = at("dev");
    ops.push(SetupOp::Mount {
        fstype: "tmpfs",
        target: dev.clone(),
        flags: Flags {
            nosuid: true,
            nodev: false,
            noexec: true,
        },
        data: "mode=0755,size=64k,nr_inodes=64".to_string(),
    });
    for d in DEVICES {
        ops.push(SetupOp::Touch(dev.join(d)));
        ops.push(SetupOp::BindDevice {
            source: Path::new("/dev").join(d),
            target: dev.join(d),
        });
    }
    // Granted GPUs: the host's nodes (only the granted ones; their ioctls
    // reach the device proxy through the filter pid 1 installs).
    for (source, name) in spec.gpu.iter().flat_map(|g| g.nodes.iter()) {
        ops.push(SetupOp::Touch(dev.join(name)));
        ops.push(SetupOp::BindDevice {
            source: source.clone(),
            target: dev.join(name),
        });
    }
    ops.push(SetupOp::Mkdir(dev.join("pts")));
    ops.push(SetupOp::Mount {
        fstype: "devpts",
        target: dev.join("pts"),
        flags: Flags {
            nosuid: true,
            nodev: false,
            noexec: true,
        },
        data: "newinstance,ptmxmode=0666,mode=0620".to_string(),
    });
    ops.push(SetupOp::Symlink {
        target: PathBuf::from("pts/ptmx"),
        link: dev.join("ptmx"),
    });
    ops.push(SetupOp::Mkdir(dev.join("shm")));
    ops.push(SetupOp::Mount {
        fstype: "tmpfs",
        target: dev.join("shm"),
        flags: Flags {
            nosuid: true,
            nodev: true,
            noexec: false,
        },
        data: "mode=1777,size=64m".to_string(),
    });
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(SetupOp::Symlink {
            target: PathBuf::from(target),
            link: dev.join(name),
        });
    }
    ops.push(SetupOp::RemountReadOnly(dev));
    ops.push(SetupOp::PivotRoot(root));
    ops
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::spec::{IdRange, Rlimits};

    fn spec() -> SandboxSpec {
        SandboxSpec {
            id: "sb".into(),
            hostname: "h".into(),
            root: PathBuf::from("/run/airlock/x/root"),
            ids: IdRange {
                uid_base: 100_000,
                gid_base: 100_000,
                count: 65536,
            },
            cgroup_procs: vec![],
            rlimits: Rlimits {
                nofile: 1024,
                core: 0,
            },
            landlock_floor: 1,
            probe_user: (1000, 1000),
            gpu: None,
        }
    }

    #[test]
    fn plan_privatises_first_and_pivots_last() {
        let ops = plan(&spec());
        assert_eq!(ops.first(), Some(&SetupOp::MakeRootPrivate));
        assert_eq!(
            ops.last(),
            Some(&SetupOp::PivotRoot(PathBuf::from("/run/airlock/x/root")))
        );
    }

    #[test]
    fn every_target_is_inside_the_new_root() {
        let root = Path::new("/run/airlock/x/root");
        for op in plan(&spec()) {
            let t = match &op {
                SetupOp::Mount { target, .. }
                | SetupOp::Touch(target)
                | SetupOp::Mkdir(target)
                | SetupOp::BindDevice { target, .. }
                | SetupOp::CoverIfPresent { target, .. }
                | SetupOp::RemountReadOnly(target) => target.clone(),
                SetupOp::Symlink { link, .. } => link.clone(),
                SetupOp::BindSelf(p) | SetupOp::PivotRoot(p) => p.clone(),
                SetupOp::MakeRootPrivate => continue,
            };
            assert!(t.starts_with(root), "{op:?} escapes the new root");
        }
    }

    #[test]
    fn proc_is_mounted_without_exec_suid_or_devices() {
        let ops = plan(&spec());
        assert!(ops.iter().any(|o| matches!(o,
            SetupOp::Mount { fstype: "proc", flags, .. } if *flags == Flags::SAFE)));
    }

    #[test]
    fn only_the_listed_devices_are_bound() {
        let bound: Vec<_> = plan(&spec())
            .into_iter()
            .filter_map(|o| match o {
                SetupOp::BindDevice { source, .. } => Some(source),
                _ => None,
            })
            .collect();
        assert_eq!(bound.len(), DEVICES.len());
        assert!(bound.iter().all(|s| s.starts_with("/dev")));
        assert!(
            !bound
                .iter()
                .any(|s| s.ends_with("fuse") || s.ends_with("mem"))
        );
    }

    #[test]
    fn granted_gpu_nodes_are_bound_under_their_sandbox_names_before_dev_is_sealed() {
        let mut s = spec();
        s.gpu = Some(crate::spec::GpuSpec {
            nodes: vec![
                (PathBuf::from("/dev/nvidiactl"), "nvidiactl".into()),
                (PathBuf::from("/dev/nvidia3"), "nvidia0".into()),
            ],
            filter: vec![],
            proc_view: Some(PathBuf::from("/var/lib/airlock/sandboxes/x/gpu-proc")),
        });
        let ops = plan(&s);
        let at = |source: &str, name: &str| {
            ops.iter().position(|o| {
                *o == SetupOp::BindDevice {
                    source: PathBuf::from(source),
                    target: PathBuf::from("/run/airlock/x/root/dev").join(name),
                }
            })
        };
        let ro = ops
            .iter()
            .position(|o| matches!(o, SetupOp::RemountReadOnly(p) if p.ends_with("dev")))
            .unwrap();
        assert!(at("/dev/nvidiactl", "nvidiactl").unwrap() < ro);
        assert!(at("/dev/nvidia3", "nvidia0").unwrap() < ro);
        assert_eq!(at("/dev/nvidia3", "nvidia3"), None);
        let proc_at = ops
            .iter()
            .position(|o| matches!(o, SetupOp::Mount { fstype: "proc", .. }))
            .unwrap();
        let cover = ops
            .iter()
            .position(|o| {
                *o == SetupOp::CoverIfPresent {
                    source: PathBuf::from("/var/lib/airlock/sandboxes/x/gpu-proc"),
                    target: PathBuf::from("/run/airlock/x/root/proc/driver/nvidia"),
                }
            })
            .unwrap();
        assert!(proc_at < cover, "the cover goes on the sandbox's own /proc");
    }

    #[test]
    fn dev_is_read_only_after_setup() {
        let ops = plan(&spec());
        let ro = ops
            .iter()
            .position(|o| matches!(o, SetupOp::RemountReadOnly(p) if p.ends_with("dev")))
            .unwrap();
        let pivot = ops
            .iter()
            .position(|o| matches!(o, SetupOp::PivotRoot(_)))
            .unwrap();
        assert!(ro < pivot);
    }
}
