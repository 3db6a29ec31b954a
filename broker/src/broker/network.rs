//! A sandbox's network: its link (see [`crate::netlink`]) and its gateway
//! process (see [`crate::net_server`]), attached once the sandbox runs and
//! before it is handed to its caller. The gateway is part of the sandbox's
//! resources: it is stopped first at teardown, and if it dies the sandbox
//! is torn down and audited.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

use airlock_net::gateway::{
    DEFAULT_MTU, GATEWAY_V4, GATEWAY_V6, NetEvent, PREFIX_V4, PREFIX_V6, SANDBOX_V4, SANDBOX_V6,
};
use airlock_net::policy::{Mode, Policy};

use super::*;
use crate::api::types::ForwardedPort;

/// Host ports one sandbox may have forwarded at once.
const MAX_FORWARDS: usize = 64;
use crate::net_server::{NetRole, NetServerSpec};

/// Open files a gateway may hold at least (its sockets count against it).
const NET_MIN_NOFILE: u64 = 256;
/// Network events audited per sandbox per second (and burst), beyond
/// which they are counted instead: a sandbox can make refused flows as
/// fast as it can send SYNs.
const NET_EVENTS_PER_SEC: f64 = 500.0;
const NET_EVENTS_BURST: f64 = 5000.0;

impl Broker {
    /// Gives `sb` a link and a gateway serving `policy`; nothing for mode
    /// none (the sandbox keeps loopback only).
    pub(super) fn attach_network(
        &self,
        sb: &Arc<Sandbox>,
        policy: &Policy,
    ) -> Result<(), BrokerError> {
        if policy.mode() == Mode::None {
            return Ok(());
        }
        let net = &self.cfg.net;
        let Some(init) = sb.init_pid.get().copied() else {
            return Err(BrokerError::Internal("the sandbox has no pid 1 yet".into()));
        };
        let ns = std::fs::File::open(format!("/proc/{init}/ns/net"))
            .map_err(internal("open the sandbox's network namespace"))?;
        let mtu = if net.mtu == 0 {
            DEFAULT_MTU as u32
        } else {
            net.mtu
        };
        let packet = crate::netlink::make_link(
            ns.as_fd(),
            crate::netlink::LinkSpec {
                addr: SANDBOX_V4,
                prefix: PREFIX_V4,
                gateway: GATEWAY_V4,
                addr6: SANDBOX_V6,
                prefix6: PREFIX_V6,
                gateway6: GATEWAY_V6,
                mtu,
            },
        )
        .map_err(|e| BrokerError::Internal(format!("make the sandbox's link: {e}")))?;
        let uplink = match &net.uplink_netns {
            Some(p) => Some(std::fs::File::open(p).map_err(|e| {
                BrokerError::Internal(format!("open uplink netns {}: {e}", p.display()))
            })?),
            None => None,
        };
        let dns_upstream = dns_upstream(net.dns_upstream.as_deref())?;
        let (join_files, nofile) = {
            let res = lock_or_recover(&sb.resources);
            let Some(r) = res.as_ref() else {
                return Err(BrokerError::NotRunning(sb.id.to_string()));
            };
            (r.cgroup.join_files(), lock_or_recover(&sb.limits).nofile)
        };
        let nobody = sb.host_uid_base.saturating_add(65534);
        let spec = NetServerSpec {
            sandbox_id: sb.id.to_string(),
            policy: policy.spec(),
            allowable: net.allow_ranges.clone(),
            host_addrs: host_addrs(),
            dns_upstream,
            mtu: mtu as usize,
            max_flows: net.max_flows,
            flows_per_sec: net.max_new_flows_per_sec.max(1),
            bytes_per_sec: net.max_bytes_per_sec,
            events_per_sec: NET_EVENTS_PER_SEC,
            uplink_netns: uplink.is_some(),
            cgroup_procs: join_files,
            nofile: nofile.max(NET_MIN_NOFILE),
            run_as: (nobody, nobody),
            landlock_floor: self.cfg.landlock_floor,
        };
        let mut fds = vec![packet.as_fd()];
        if let Some(u) = &uplink {
            fds.push(u.as_fd());
        }
        let (component, _ready, chan) = Component::start::<NetRole>(&self.exe, &spec, &fds)
            .map_err(|e| BrokerError::Internal(format!("start the network gateway: {e}")))?;
        drop(packet);
        let ctl = chan
            .fd()
            .try_clone_to_owned()
            .map(Channel::from_fd)
            .map_err(internal("network gateway command channel"))?;
        let audit = self.audit.clone();
        let (sid, sagent) = (sb.id.to_string(), sb.agent.clone());
        let weak = Arc::downgrade(sb);
        let limiter = crate::util::RateLimiter::new(NET_EVENTS_PER_SEC, NET_EVENTS_BURST);
        component
            .supervise::<NetRole>(
                chan,
                move |ev: NetEvent| {
                    if let NetEvent::Dropped { count } = ev {
                        audit.event(
                            Some(&sid),
                            Some(&sagent),
                            AuditEvent::NetEventsDropped {
                                dropped: count,
                                events_per_sec: NET_EVENTS_PER_SEC,
                            },
                        );
                        return;
                    }
                    let Some(dropped) = limiter.admit() else {
                        return;
                    };
                    if dropped > 0 {
                        audit.event(
                            Some(&sid),
                            Some(&sagent),
                            AuditEvent::NetEventsDropped {
                                dropped,
                                events_per_sec: NET_EVENTS_PER_SEC,
                            },
                        );
                    }
                    audit.event(Some(&sid), Some(&sagent), AuditEvent::Net(ev));
                },
                move |ended| {
                    super::lifecycle::component_ended(&weak, "net", "the network gateway", ended);
                },
            )
            .map_err(internal("network supervisor thread"))?;
        let mut res = lock_or_recover(&sb.resources);
        match res.as_mut() {
            Some(r) => {
                r.net = Some(component);
                r.net_ctl = Some(ctl);
            }
            None => return Err(BrokerError::NotRunning(sb.id.to_string())),
        }
        drop(res);
        *lock_or_recover(&sb.network) = policy.spec();
        Ok(())
    }
}

impl Broker {
    /// Changes a running sandbox's network policy for new flows and
    /// questions (flows already open go on). A sandbox created without a
    /// network gets its link and gateway now; one whose policy becomes
    /// none keeps its link, and its gateway refuses everything.
    pub fn set_network(
        &self,
        p: &Principal,
        id: &SandboxId,
        spec: &airlock_net::policy::NetworkSpec,
    ) -> Result<SandboxInfo, BrokerError> {
        let sb = self.get(p, id)?;
        if !sb.is_running() {
            return Err(BrokerError::NotRunning(id.to_string()));
        }
        let policy = Policy::from_spec(spec)
            .map_err(|e| BrokerError::BadRequest(format!("network: {e}")))?;
        let sent = {
            let res = lock_or_recover(&sb.resources);
            res.as_ref().and_then(|r| r.net_ctl.as_ref()).map(|ctl| {
                crate::component::send_command::<NetRole>(
                    ctl,
                    crate::net_server::NetCommand::SetPolicy {
                        policy: policy.spec(),
                    },
                )
                .map_err(|e| BrokerError::Internal(format!("tell the gateway: {e}")))
            })
        };
        match sent {
            Some(r) => r?,
            None => self.attach_network(&sb, &policy)?,
        }
        *lock_or_recover(&sb.network) = policy.spec();
        self.audit.event(
            Some(id.as_str()),
            Some(&sb.agent),
            AuditEvent::NetPolicy {
                caller: (p.uid, p.pid),
                policy: policy.spec(),
            },
        );
        Ok(sb.info())
    }
}

impl Broker {
    /// Serves `req.host_addr:req.host_port` on the host by the sandbox's
    /// `req.port`: the broker binds the listening socket (with the
    /// caller's say over which address and port) and hands it to the
    /// sandbox's gateway, which connects each accepted connection into
    /// the sandbox. Returns the address bound.
    pub fn forward_port(
        &self,
        p: &Principal,
        id: &SandboxId,
        req: &crate::api::types::PortForward,
    ) -> Result<std::net::SocketAddr, BrokerError> {
        let sb = self.get(p, id)?;
        if !sb.is_running() {
            return Err(BrokerError::NotRunning(id.to_string()));
        }
        if req.port == 0 {
            return Err(BrokerError::BadRequest("port: 0 is not a port".into()));
        }
        let addr = req
            .host_addr
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let host_port = req.host_port.unwrap_or(0);
        // Each forward is a listening socket held by the sandbox's gateway
        // and a row in its info: a caller may not pile them up without end.
        if lock_or_recover(&sb.ports).len() >= MAX_FORWARDS {
            return Err(BrokerError::BadRequest(format!(
                "sandbox {id} already forwards {MAX_FORWARDS} ports, the most: remove one first"
            )));
        }
        if p.uid != 0 {
            if !addr.is_loopback() {
                return Err(BrokerError::BadRequest(format!(
                    "host_addr {addr}: only root may forward on a non-loopback address"
                )));
            }
            if host_port != 0 && host_port < 1024 {
                return Err(BrokerError::BadRequest(format!(
                    "host_port {host_port}: only root may forward a port below 1024"
                )));
            }
        }
        let listener = std::net::TcpListener::bind(SocketAddr::new(addr, host_port))
            .map_err(|e| BrokerError::BadRequest(format!("bind {addr}:{host_port}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(internal("forwarded socket address"))?;
        // The gateway's seccomp list has no ioctl: the flag travels with
        // the descriptor.
        listener
            .set_nonblocking(true)
            .map_err(internal("forwarded socket non-blocking"))?;
        let res = lock_or_recover(&sb.resources);
        let Some(ctl) = res.as_ref().and_then(|r| r.net_ctl.as_ref()) else {
            return Err(BrokerError::BadRequest(format!(
                "sandbox {id} has no network: create it with --net or --allow (or PUT a policy) to forward a port"
            )));
        };
        crate::component::send_command_with::<NetRole>(
            ctl,
            crate::net_server::NetCommand::Forward {
                port: req.port,
                host: bound,
            },
            &[listener.as_fd()],
        )
        .map_err(|e| BrokerError::Internal(format!("tell the gateway: {e}")))?;
        drop(res);
        lock_or_recover(&sb.ports).push(ForwardedPort {
            host_addr: bound.ip(),
            host_port: bound.port(),
            port: req.port,
        });
        self.audit.event(
            Some(id.as_str()),
            Some(&sb.agent),
            AuditEvent::PortForward {
                caller: (p.uid, p.pid),
                host: bound,
                port: req.port,
            },
        );
        Ok(bound)
    }

    /// Stops serving host port `host_port` (on every address it was bound
    /// at) for sandbox `id`; connections already made go on. Returns the
    /// forwards removed.
    pub fn unforward_port(
        &self,
        p: &Principal,
        id: &SandboxId,
        host_port: u16,
    ) -> Result<Vec<ForwardedPort>, BrokerError> {
        let sb = self.get(p, id)?;
        let gone: Vec<ForwardedPort> = {
            let mut ports = lock_or_recover(&sb.ports);
            let (gone, kept) = ports.drain(..).partition(|f| f.host_port == host_port);
            *ports = kept;
            gone
        };
        if gone.is_empty() {
            return Err(BrokerError::NoSuchForward {
                id: id.to_string(),
                port: host_port,
            });
        }
        let res = lock_or_recover(&sb.resources);
        if let Some(ctl) = res.as_ref().and_then(|r| r.net_ctl.as_ref()) {
            for f in &gone {
                let host = SocketAddr::new(f.host_addr, f.host_port);
                crate::component::send_command::<NetRole>(
                    ctl,
                    crate::net_server::NetCommand::Unforward { host },
                )
                .map_err(|e| BrokerError::Internal(format!("tell the gateway: {e}")))?;
            }
        }
        drop(res);
        for f in &gone {
            self.audit.event(
                Some(id.as_str()),
                Some(&sb.agent),
                AuditEvent::PortForwardRemoved {
                    caller: (p.uid, p.pid),
                    host: SocketAddr::new(f.host_addr, f.host_port),
                    port: f.port,
                },
            );
        }
        Ok(gone)
    }
}

/// The upstream resolver: the configured one, or the host's first.
fn dns_upstream(configured: Option<&str>) -> Result<SocketAddr, BrokerError> {
    let parse = |s: &str| -> Option<SocketAddr> {
        s.parse::<SocketAddr>()
            .ok()
            .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
    };
    if let Some(s) = configured {
        return parse(s).ok_or_else(|| {
            BrokerError::Internal(format!("[net] dns_upstream {s:?} is not an IP or IP:PORT"))
        });
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|ns| parse(ns.trim()))
        .ok_or_else(|| {
            BrokerError::Internal(
                "no upstream resolver: set [net] dns_upstream (the host's /etc/resolv.conf names none)"
                    .into(),
            )
        })
}

/// The host's own addresses (always denied to sandboxes).
fn host_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect()
}
