//! A sandbox's GPUs: its device proxy process (see
//! [`crate::gpu_server`]), started once pid 1 has sent the listener of
//! the proxy's filter and before the sandbox is handed to its caller. The
//! proxy is part of the sandbox's resources: stopped at teardown, and if
//! it dies the sandbox is torn down and audited (its calls would fail
//! with ENOSYS from then on).

use std::os::fd::AsFd;

use airlock_devproxy::forward::{DeviceKey, Devices};

use super::*;
use crate::gpu_server::{GpuEvent, GpuRole, GpuServerSpec};

/// Open files a proxy may hold at least (one duplicate per call in flight
/// and the fds a call names).
const GPU_MIN_NOFILE: u64 = 64;
/// Refusals itemised per sandbox per second (ten times that in a burst);
/// a sandbox can make refused calls as fast as it can issue ioctls.
const GPU_EVENTS_PER_SEC: f64 = 100.0;

impl Broker {
    /// A GPU is granted to a non-root caller only if that caller could
    /// open each of its nodes for reading and writing on the host itself
    /// (its uid, gid and groups, ACLs included): the root broker never
    /// opens a device for someone the host keeps from it.
    pub(super) fn caller_may_open(
        &self,
        p: &Principal,
        grant: &crate::gpu::GpuGrant,
    ) -> Result<(), BrokerError> {
        use nix::unistd::AccessFlags;
        let nodes: Vec<std::path::PathBuf> = grant.nodes().into_iter().map(|(h, _)| h).collect();
        let groups = super::host_dirs::caller_groups(p);
        let denied = crate::sys::as_caller(p.uid, p.gid, groups, move || {
            nodes.into_iter().find(|n| {
                nix::unistd::faccessat(
                    nix::fcntl::AT_FDCWD,
                    n.as_path(),
                    AccessFlags::R_OK | AccessFlags::W_OK,
                    nix::fcntl::AtFlags::AT_EACCESS,
                )
                .is_err()
            })
        })
        .map_err(internal("check the caller's access to the GPU nodes"))?;
        match denied {
            None => Ok(()),
            Some(node) => Err(BrokerError::Forbidden(AuthzError::NoDeviceAccess {
                uid: p.uid,
                node: node.display().to_string(),
            })),
        }
    }

    /// Starts `sb`'s device proxy on the listener its pid 1 sent; nothing
    /// for a sandbox without GPUs.
    pub(super) fn attach_gpus(&self, sb: &Arc<Sandbox>) -> Result<(), BrokerError> {
        let Some(grant) = sb.gpus.clone() else {
            return Ok(());
        };
        let Some(listener) = lock_or_recover(&sb.gpu_listener).take() else {
            return Err(BrokerError::Internal(
                "the sandbox's pid 1 sent no device listener".into(),
            ));
        };
        let Some(init) = sb.init_pid.get().copied() else {
            return Err(BrokerError::Internal("the sandbox has no pid 1 yet".into()));
        };
        let userns = std::fs::File::open(format!("/proc/{init}/ns/user"))
            .map_err(internal("open the sandbox's user namespace"))?;
        let key = |p: &Path| -> Result<DeviceKey, BrokerError> {
            let st = rustix::fs::stat(p)
                .map_err(|e| BrokerError::Unavailable(format!("GPU node {}: {e}", p.display())))?;
            Ok(DeviceKey::of(&st))
        };
        let nodes = grant.nodes();
        let mut devices = Devices::default();
        for (host, name) in &nodes {
            let k = key(host)?;
            match name.as_str() {
                "nvidiactl" => devices.ctl = Some(k),
                "nvidia-uvm" => devices.uvm = Some(k),
                _ => devices.gpus.push(k),
            }
        }
        let (join_files, nofile) = {
            let res = lock_or_recover(&sb.resources);
            let Some(r) = res.as_ref() else {
                return Err(BrokerError::NotRunning(sb.id.to_string()));
            };
            (r.cgroup.join_files(), lock_or_recover(&sb.limits).nofile)
        };
        let spec = GpuServerSpec {
            sandbox_id: sb.id.to_string(),
            driver: grant.driver.clone(),
            allow_newer_in_branch: self.cfg.gpu.allow_newer_in_branch,
            gpu_ids: grant.gpus.iter().map(|g| g.card.gpu_id).collect(),
            devices,
            events_per_sec: GPU_EVENTS_PER_SEC,
            cgroup_procs: join_files,
            nofile: nofile.max(GPU_MIN_NOFILE),
            run_as: (65534, 65534),
        };
        let fds = [listener.as_fd(), userns.as_fd()];
        let (component, ready, chan) = Component::start::<GpuRole>(&self.exe, &spec, &fds)
            .map_err(|e| BrokerError::Internal(format!("start the device proxy: {e}")))?;
        drop(listener);
        let ctl = chan
            .fd()
            .try_clone_to_owned()
            .map(Channel::from_fd)
            .map_err(internal("device proxy command channel"))?;
        self.audit.event(
            Some(sb.id.as_str()),
            Some(&sb.agent),
            AuditEvent::DeviceProxy {
                driver: grant.driver.clone(),
                tables: ready.tables,
                newer_in_branch: grant.newer_in_branch,
                jail: ready.jail,
            },
        );
        let audit = self.audit.clone();
        let (sid, sagent) = (sb.id.to_string(), sb.agent.clone());
        let weak = Arc::downgrade(sb);
        // The proxy budgets its own refusals (and counts the rest); this
        // looser bound holds even for a proxy a tenant subverted, and
        // never cuts into what a working proxy sends (whose clock runs a
        // little apart from ours).
        let limiter = RateLimiter::new(2.0 * GPU_EVENTS_PER_SEC, 20.0 * GPU_EVENTS_PER_SEC);
        component
            .supervise::<GpuRole>(
                chan,
                move |ev: GpuEvent| {
                    let event = match ev {
                        GpuEvent::Refused { reason, reply } => {
                            if limiter.admit().is_none() {
                                return;
                            }
                            AuditEvent::IoctlRefused { reason, reply }
                        }
                        GpuEvent::Summary(counts) => AuditEvent::DeviceIoctls(counts),
                    };
                    audit.event(Some(&sid), Some(&sagent), event);
                },
                move |ended| {
                    super::lifecycle::component_ended(&weak, "devproxy", "the device proxy", ended);
                },
            )
            .map_err(internal("device proxy supervisor thread"))?;
        let mut res = lock_or_recover(&sb.resources);
        match res.as_mut() {
            Some(r) => {
                r.gpu = Some(component);
                r.gpu_ctl = Some(ctl);
            }
            None => return Err(BrokerError::NotRunning(sb.id.to_string())),
        }
        Ok(())
    }
}
