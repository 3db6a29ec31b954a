//! Per-sandbox cgroups on whichever hierarchy the host really runs: cgroup v2
//! (unified) where memory and pids are there, else cgroup v1 with one
//! hierarchy per controller. Every sandbox gets `airlock/<name>` with memory,
//! pids and cpu limits; the launcher joins it before entering its namespaces,
//! so everything the sandbox ever runs is counted and can be killed as a unit.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The parent group every sandbox group lives under.
pub const PARENT: &str = "airlock";

/// Limits for one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// Memory limit in bytes (swap is not granted).
    pub memory_bytes: u64,
    /// Most tasks (processes and threads) at once.
    pub pids: u64,
    /// CPU time per wall-clock time, in thousandths of a CPU (1000 = one CPU).
    pub cpu_millis: u64,
}

/// Which cgroup version the host uses for our controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// Counters read back from a sandbox's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitCounters {
    /// Processes the kernel's OOM killer killed in this group.
    pub oom_kills: u64,
    /// Times a fork failed because the pids limit was reached.
    pub pids_max_hits: u64,
}

/// What a group uses now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResourceUse {
    /// Memory charged to it, bytes.
    pub memory_bytes: u64,
    /// Tasks in it.
    pub pids: u64,
    /// CPU time it used, microseconds; `None` where the group has no CPU
    /// accounting (v1 with `cpuacct` mounted apart from `cpu`).
    pub cpu_usec: Option<u64>,
}

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable memory+pids hierarchy was found.
    #[error("no cgroup hierarchy with the memory and pids controllers is mounted")]
    NotFound,
    /// Writing or reading a control file failed.
    #[error("cgroup {op} {path}")]
    Io {
        /// mkdir, write, read, rmdir.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The name is not a plain single component.
    #[error("invalid cgroup name {0:?}")]
    BadName(String),
    /// Processes survived repeated SIGKILL.
    #[error("cgroup {0} still has processes after kill")]
    Busy(PathBuf),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

/// Finds and drives the host's cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupManager {
    /// v1: mount points of the memory, pids and cpu hierarchies.
    V1 {
        /// memory controller hierarchy.
        memory: PathBuf,
        /// pids controller hierarchy.
        pids: PathBuf,
        /// cpu controller hierarchy, when mounted.
        cpu: Option<PathBuf>,
        /// devices controller hierarchy, when mounted.
        devices: Option<PathBuf>,
    },
    /// v2: the unified mount point.
    V2 {
        /// Mount point of cgroup2.
        root: PathBuf,
    },
}

/// Parses /proc/self/mountinfo text into (mount point, fstype, super options).
fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, String, String)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut l = left.split(' ');
        let Some(mp) = l.nth(4) else { continue };
        let mut r = right.split(' ');
        let (Some(fstype), Some(_src), Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        if fstype == "cgroup" || fstype == "cgroup2" {
            out.push((PathBuf::from(mp), fstype.to_string(), opts.to_string()));
        }
    }
    out
}

impl CgroupManager {
    /// Detects the hierarchy from /proc/self/mountinfo.
    pub fn detect() -> Result<CgroupManager, CgroupError> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
        Self::from_mountinfo(&text, |p| fs::read_to_string(p).ok())
    }

    /// Detection from mountinfo text; `read` reads a control file.
    pub fn from_mountinfo(
        text: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Result<CgroupManager, CgroupError> {
        let mounts = cgroup_mounts(text);
        for (mp, fstype, _) in &mounts {
            if fstype == "cgroup2" {
                let ctrls = read(&mp.join("cgroup.controllers")).unwrap_or_default();
                let has = |c: &str| ctrls.split_whitespace().any(|x| x == c);
                if has("memory") && has("pids") {
                    return Ok(CgroupManager::V2 { root: mp.clone() });
                }
            }
        }
        let find = |ctrl: &str| {
            mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == ctrl))
                .map(|(m, _, _)| m.clone())
        };
        match (find("memory"), find("pids")) {
            (Some(memory), Some(pids)) => Ok(CgroupManager::V1 {
                memory,
                pids,
                cpu: find("cpu"),
                devices: find("devices"),
            }),
            _ => Err(CgroupError::NotFound),
        }
    }

    /// The version in use.
    pub fn version(&self) -> CgroupVersion {
        match self {
            CgroupManager::V1 { .. } => CgroupVersion::V1,
            CgroupManager::V2 { .. } => CgroupVersion::V2,
        }
    }

    /// The parents of a sandbox's groups: `airlock/` in each hierarchy we
    /// use, the devices one (v1) included. A group in the devices
    /// hierarchy exists only for a sandbox whose devices are narrowed
    /// ([`Cgroup::restrict_devices`]); recovery and removal look there too.
    fn parents(&self) -> Vec<PathBuf> {
        match self {
            CgroupManager::V1 {
                memory,
                pids,
                cpu,
                devices,
            } => {
                let mut v = vec![memory.join(PARENT), pids.join(PARENT)];
                if let Some(c) = cpu {
                    v.push(c.join(PARENT));
                }
                if let Some(d) = devices {
                    v.push(d.join(PARENT));
                }
                v
            }
            CgroupManager::V2 { root } => vec![root.join(PARENT)],
        }
    }

    /// Creates `airlock/<name>` with the limits applied.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<Cgroup, CgroupError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(CgroupError::BadName(name.to_string()));
        }
        let devices = self.devices_parent();
        let cg = Cgroup {
            manager: self.clone(),
            dirs: self
                .parents()
                .into_iter()
                .filter(|p| Some(p) != devices.as_ref())
                .map(|p| p.join(name))
                .collect(),
        };
        match cg.setup(self, limits) {
            Ok(()) => Ok(cg),
            Err(e) => {
                let _ = cg.remove();
                Err(e)
            }
        }
    }

    /// `airlock/` in the v1 devices hierarchy, when it is mounted.
    fn devices_parent(&self) -> Option<PathBuf> {
        match self {
            CgroupManager::V1 {
                devices: Some(d), ..
            } => Some(d.join(PARENT)),
            _ => None,
        }
    }

    /// Groups left under `airlock/` (by a broker that crashed), by name.
    pub fn existing(&self) -> Vec<String> {
        let mut names = std::collections::BTreeSet::new();
        for p in self.parents() {
            if let Ok(rd) = fs::read_dir(&p) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        names.insert(e.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
        names.into_iter().collect()
    }

    /// A handle to an existing group (for recovery).
    pub fn open(&self, name: &str) -> Result<Cgroup, CgroupError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(CgroupError::BadName(name.to_string()));
        }
        Ok(Cgroup {
            manager: self.clone(),
            dirs: self.parents().into_iter().map(|p| p.join(name)).collect(),
        })
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io("write", path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("mkdir", path)(e)),
    }
}

/// Reads `key value` lines (memory.events, pids.events, memory.oom_control).
fn read_key(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

/// Exponential sleep from 100 µs up to 5 ms, for waits that are usually
/// over almost at once.
#[derive(Debug, Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = Duration::from_micros(100u64 << self.0.min(6)).min(Duration::from_millis(5));
        self.0 += 1;
        d
    }
}

/// One sandbox's cgroup (a directory per hierarchy on v1, one on v2).
#[derive(Debug)]
pub struct Cgroup {
    manager: CgroupManager,
    dirs: Vec<PathBuf>,
}

const CPU_PERIOD_US: u64 = 100_000;

impl Cgroup {
    fn setup(&self, m: &CgroupManager, l: &CgroupLimits) -> Result<(), CgroupError> {
        match m {
            CgroupManager::V1 { .. } => {
                for d in &self.dirs {
                    if let Some(p) = d.parent() {
                        mkdir(p)?;
                    }
                    mkdir(d)?;
                }
            }
            CgroupManager::V2 { root } => {
                let enable = "+memory +pids +cpu";
                let parent = root.join(PARENT);
                // cpu may be unavailable on some hosts; memory and pids are required.
                if write(&root.join("cgroup.subtree_control"), enable).is_err() {
                    write(&root.join("cgroup.subtree_control"), "+memory +pids")?;
                }
                mkdir(&parent)?;
                if write(&parent.join("cgroup.subtree_control"), enable).is_err() {
                    write(&parent.join("cgroup.subtree_control"), "+memory +pids")?;
                }
                mkdir(&parent.join(self.name()))?;
            }
        }
        self.set_limits(l)
    }

    /// Applies limits (at creation, or to a pre-started sandbox when it is
    /// handed out). Lowering memory below current usage makes the kernel
    /// reclaim, then OOM-kill, as it would for any limit.
    pub fn set_limits(&self, l: &CgroupLimits) -> Result<(), CgroupError> {
        let quota = (l.cpu_millis * CPU_PERIOD_US / 1000).max(1000);
        match &self.manager {
            CgroupManager::V1 {
                memory, pids, cpu, ..
            } => {
                let mem = memory.join(PARENT).join(self.name());
                let limit = mem.join("memory.limit_in_bytes");
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                let bytes = l.memory_bytes.to_string();
                // memory <= memory+swap must hold after every single write.
                if write(&limit, &bytes).is_err() && memsw.exists() {
                    write(&memsw, &bytes)?;
                    write(&limit, &bytes)?;
                } else if memsw.exists() {
                    write(&memsw, &bytes)?;
                } else {
                    write(&limit, &bytes)?;
                }
                let _ = fs::write(mem.join("memory.swappiness"), "0");
                write(
                    &pids.join(PARENT).join(self.name()).join("pids.max"),
                    &l.pids.to_string(),
                )?;
                if let Some(cpu) = cpu {
                    let d = cpu.join(PARENT).join(self.name());
                    write(&d.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&d.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
            CgroupManager::V2 { root } => {
                let d = root.join(PARENT).join(self.name());
                write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                let _ = fs::write(d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), &l.pids.to_string())?;
                if d.join("cpu.max").exists() {
                    write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
            }
        }
        Ok(())
    }

    /// Gives the group the least CPU weight the kernel allows (v1
    /// `cpu.shares` 2, v2 `cpu.weight` 1), or back the default (1024, 100).
    ///
    /// Pre-started sandboxes are built and wait at the least weight, so
    /// building them in the background yields the CPU to running sandboxes
    /// and callers; the weight is restored when one is handed out. Weight
    /// is per group: a process's nice value would only count against the
    /// other processes of its own group. Hosts without the cpu controller
    /// have no weight to set.
    pub fn set_background(&self, background: bool) -> Result<(), CgroupError> {
        match &self.manager {
            CgroupManager::V1 { cpu: Some(cpu), .. } => {
                let shares = if background { "2" } else { "1024" };
                write(
                    &cpu.join(PARENT).join(self.name()).join("cpu.shares"),
                    shares,
                )
            }
            CgroupManager::V1 { cpu: None, .. } => Ok(()),
            CgroupManager::V2 { root } => {
                let f = root.join(PARENT).join(self.name()).join("cpu.weight");
                if f.exists() {
                    write(&f, if background { "1" } else { "100" })
                } else {
                    Ok(())
                }
            }
        }
    }

    fn name(&self) -> String {
        self.dirs
            .first()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The `cgroup.procs` files (every process of the group is listed there).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The files a single-threaded process writes "0" to in order to move
    /// itself into the group. On v1 this is `tasks`: moving only the calling
    /// thread skips the global threadgroup rwsem that a `cgroup.procs` write
    /// takes (an RCU grace period per hierarchy, 3-8 ms each on a busy VM);
    /// for a process with one thread it is the same move. On v2 it is
    /// `cgroup.procs`.
    pub fn join_files(&self) -> Vec<PathBuf> {
        let file = match self.manager {
            CgroupManager::V1 { .. } => "tasks",
            CgroupManager::V2 { .. } => "cgroup.procs",
        };
        self.dirs.iter().map(|d| d.join(file)).collect()
    }

    /// Lets the group's processes open only the devices in `allow`
    /// (`"c MAJOR:MINOR"` or `"c MAJOR:*"`, read and write, never mknod):
    /// makes the group's directory in the v1 devices hierarchy (only
    /// sandboxes that need it pay for it) before any process joins, so
    /// [`Cgroup::join_files`] includes it from then on. Elsewhere nothing
    /// is done and false is returned (v2 needs a BPF program, not made
    /// yet).
    ///
    /// # Errors
    /// Making the directory, or a rule the kernel refuses (the group then
    /// allows nothing; [`Cgroup::remove`] removes it).
    pub fn restrict_devices(&mut self, allow: &[String]) -> Result<bool, CgroupError> {
        let Some(parent) = self.manager.devices_parent() else {
            return Ok(false);
        };
        mkdir(&parent)?;
        let dir = parent.join(self.name());
        mkdir(&dir)?;
        self.dirs.push(dir.clone());
        write(&dir.join("devices.deny"), "a")?;
        for rule in allow {
            write(&dir.join("devices.allow"), &format!("{rule} rw"))?;
        }
        Ok(true)
    }

    /// The directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// OOM kills and pids-limit hits so far.
    pub fn counters(&self) -> LimitCounters {
        match &self.manager {
            CgroupManager::V1 { memory, pids, .. } => {
                let n = self.name();
                LimitCounters {
                    oom_kills: read_key(
                        &memory.join(PARENT).join(&n).join("memory.oom_control"),
                        "oom_kill",
                    ),
                    pids_max_hits: read_key(&pids.join(PARENT).join(&n).join("pids.events"), "max"),
                }
            }
            CgroupManager::V2 { root } => {
                let d = root.join(PARENT).join(self.name());
                LimitCounters {
                    oom_kills: read_key(&d.join("memory.events"), "oom_kill"),
                    pids_max_hits: read_key(&d.join("pids.events"), "max"),
                }
            }
        }
    }

    /// Memory, tasks and CPU time the group uses now (each 0 when
    /// unreadable).
    pub fn usage(&self) -> ResourceUse {
        let read = |p: PathBuf| -> Option<u64> {
            fs::read_to_string(p)
                .ok()
                .and_then(|t| t.trim().parse().ok())
        };
        let num = |p: PathBuf| read(p).unwrap_or(0);
        let n = self.name();
        match &self.manager {
            CgroupManager::V1 {
                memory, pids, cpu, ..
            } => ResourceUse {
                memory_bytes: num(memory.join(PARENT).join(&n).join("memory.usage_in_bytes")),
                pids: num(pids.join(PARENT).join(&n).join("pids.current")),
                cpu_usec: cpu
                    .as_ref()
                    .and_then(|c| read(c.join(PARENT).join(&n).join("cpuacct.usage")))
                    .map(|ns| ns / 1000),
            },
            CgroupManager::V2 { root } => {
                let d = root.join(PARENT).join(&n);
                ResourceUse {
                    memory_bytes: num(d.join("memory.current")),
                    pids: num(d.join("pids.current")),
                    cpu_usec: Some(read_key(&d.join("cpu.stat"), "usage_usec")),
                }
            }
        }
    }

    /// Pids (host view) of every process in the group.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for f in self.procs_files() {
            if let Ok(t) = fs::read_to_string(&f) {
                out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILLs every process in the group until it is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if let (CgroupManager::V2 { .. }, Some(d)) = (&self.manager, self.dirs.first()) {
            let _ = fs::write(d.join("cgroup.kill"), "1");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut backoff = Backoff::default();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy(
                    self.dirs.first().cloned().unwrap_or_default(),
                ));
            }
            // Killed tasks leave the group within microseconds to a few ms.
            std::thread::sleep(backoff.next());
        }
    }

    /// Kills everything in the group and removes its directories.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.kill_all()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut backoff = Backoff::default();
        for d in &self.dirs {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    // Exiting tasks linger for a moment after SIGKILL.
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        let _ = self.kill_all();
                        std::thread::sleep(backoff.next());
                    }
                    Err(e) => return Err(io("rmdir", d)(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const V1: &str = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids
32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct
33 25 0:29 / /sys/fs/cgroup/unified rw,relatime shared:12 - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_is_found_when_unified_lacks_memory() {
        let m = CgroupManager::from_mountinfo(V1, |_| Some("hugetlb".into())).unwrap();
        assert_eq!(
            m,
            CgroupManager::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                cpu: Some("/sys/fs/cgroup/cpu,cpuacct".into()),
                devices: None,
            }
        );
    }

    #[test]
    fn v2_wins_when_it_has_the_controllers() {
        let text = "33 25 0:29 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let m = CgroupManager::from_mountinfo(text, |_| Some("cpu memory pids io".into())).unwrap();
        assert_eq!(
            m,
            CgroupManager::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
    }

    #[test]
    fn nothing_usable_is_an_error() {
        assert!(matches!(
            CgroupManager::from_mountinfo("", |_| None),
            Err(CgroupError::NotFound)
        ));
    }

    #[test]
    fn names_with_slashes_are_refused() {
        let m = CgroupManager::V2 {
            root: "/nonexistent".into(),
        };
        assert!(matches!(m.open("../x"), Err(CgroupError::BadName(_))));
    }

    /// Runs against the host's real hierarchy (CI and dev machines are root).
    #[test]
    fn real_group_limits_and_cleanup() {
        let m = CgroupManager::detect().unwrap();
        let name = format!("unit-{}", std::process::id());
        let cg = m
            .create(
                &name,
                &CgroupLimits {
                    memory_bytes: 64 << 20,
                    pids: 16,
                    cpu_millis: 500,
                },
            )
            .unwrap();
        for d in cg.dirs() {
            assert!(d.is_dir(), "{} missing", d.display());
        }
        assert_eq!(cg.counters(), LimitCounters::default());
        cg.remove().unwrap();
        for d in cg.dirs() {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }
}
