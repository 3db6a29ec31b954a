use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use airlock_fs::{BaseSpec, FsEvent, IdMap, Mount, MountOptions, MountSpec};
use tempfile::TempDir;

pub const BASE_UID: u32 = 100_000;

pub struct Fixture {
    pub _tmp: TempDir,
    pub base: PathBuf,
    pub upper: PathBuf,
    pub ws: PathBuf,
    pub mnt: PathBuf,
    pub events: Arc<Mutex<Vec<FsEvent>>>,
    pub mount: Option<Mount>,
}

impl Fixture {
    pub fn m(&self, p: &str) -> PathBuf {
        self.mnt.join(p.trim_start_matches('/'))
    }

    pub fn events(&self) -> Vec<FsEvent> {
        self.events.lock().unwrap().clone()
    }
}

pub fn rootfs() -> Fixture {
    rootfs_opts(&MountOptions::default())
}

pub fn rootfs_opts(opts: &MountOptions) -> Fixture {
    rootfs_with(opts, true)
}

/// A rootfs whose workspace is the caller's own directory (edited on the
/// host, no snapshots), as `--workspace DIR` gives.
pub fn rootfs_callers_workspace() -> Fixture {
    rootfs_with(&MountOptions::default(), false)
}

fn rootfs_with(opts: &MountOptions, agents_workspace: bool) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir_all(base.join("dir/sub")).unwrap();
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::write(base.join("hello.txt"), b"hello from base\n").unwrap();
    std::fs::write(base.join("dir/a.txt"), b"a").unwrap();
    std::fs::write(base.join("dir/sub/b.txt"), b"b").unwrap();
    std::fs::write(base.join("etc/os-release"), b"ID=test\n").unwrap();
    std::fs::write(base.join("etc/passwd"), b"hostuser:x:0:0::/:/bin/sh\n").unwrap();
    symlink("../../../../etc/passwd", base.join("escape")).unwrap();
    mount_with(
        tmp,
        base.clone(),
        BaseSpec::Rootfs(base),
        opts,
        agents_workspace,
    )
}

pub fn host() -> Fixture {
    host_opts(&MountOptions::default())
}

pub fn host_opts(opts: &MountOptions) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    mount_with(tmp, PathBuf::from("/"), BaseSpec::Host, opts, true)
}

fn mount_with(
    tmp: TempDir,
    base: PathBuf,
    spec_base: BaseSpec,
    opts: &MountOptions,
    agents_workspace: bool,
) -> Fixture {
    let upper = tmp.path().join("upper");
    let ws = tmp.path().join("ws");
    let mnt = tmp.path().join("mnt");
    for d in [&upper, &ws, &mnt] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&ws, Some(4242), Some(4242)).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = Arc::clone(&events);
    let spec = MountSpec {
        base: spec_base,
        upper: upper.clone(),
        workspace: ws.clone(),
        ids: IdMap {
            host_uid_base: BASE_UID,
            host_gid_base: BASE_UID,
            count: 65536,
        },
        base_idmapped: false,
        sandbox_uid: 1000,
        sandbox_gid: 1000,
        sandbox_user: "sandbox".into(),
        hostname: "testbox".into(),
        quota: airlock_fs::DiskQuota::default(),
        snapshots: agents_workspace.then(airlock_fs::LayerChain::default),
        workspace_usage: None,
        frozen: airlock_fs::FrozenDirs::default(),
    };
    let mount = airlock_fs::mount_with(
        spec,
        &mnt,
        Arc::new(move |e| sink_events.lock().unwrap().push(e)),
        opts,
    )
    .unwrap();
    Fixture {
        _tmp: tmp,
        base,
        upper,
        ws,
        mnt,
        events,
        mount: Some(mount),
    }
}

pub fn is_mounted(p: &Path) -> bool {
    let s = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let want = p.to_str().unwrap();
    s.lines().any(|l| l.split(' ').nth(1) == Some(want))
}

pub fn errno(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}
