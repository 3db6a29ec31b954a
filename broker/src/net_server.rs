//! The `__net` role: one sandbox's network gateway in a process of its own.
//!
//! The broker makes the sandbox's link (see [`crate::netlink`]) and hands
//! the gateway exactly one descriptor for it: the AF_PACKET socket of the
//! veth's host end, which lives in a network namespace of its own. The
//! gateway joins the sandbox's cgroup (its CPU, memory and sockets count
//! against the sandbox's limits), enters the uplink network namespace when
//! the operator named one, then gives up host root for good before it
//! reads a frame: every uid and gid becomes the sandbox range's nobody, no
//! capability is kept in any set, no_new_privs, landlock with no file
//! access at all, RLIMIT_NOFILE as the sandbox's, and the seccomp
//! allow-list `net/seccomp.json` (sockets only of the IPv4 and IPv6
//! families). Its events (flows, DNS questions, limits) come back over the
//! control channel and become `net` audit rows. If it dies, its sandbox is
//! torn down; if the broker dies, it exits.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

use airlock_net::gateway::{Gateway, GatewayConfig, NetEvent};
use airlock_net::policy::{NetworkSpec, Policy, Ranges};
use airlock_shim::channel::Channel;
use airlock_shim::jail::JailReport;
use serde::{Deserialize, Serialize};

use crate::component::{self, Report, Role};

/// The network gateway role.
#[derive(Debug)]
pub struct NetRole;

impl Role for NetRole {
    const ARG: &'static str = crate::NET_ROLE;
    const NAME: &'static str = "net";
    type Spec = NetServerSpec;
    type Ready = NetReady;
    type Event = NetEvent;
    type Command = NetCommand;
}

/// What the broker tells a running gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NetCommand {
    /// Judge new flows and questions by this policy from now on (flows
    /// already open go on).
    SetPolicy {
        /// The policy.
        policy: NetworkSpec,
    },
    /// Write the end rows of the flows still open and exit: the sandbox
    /// is going.
    Drain,
    /// Serve the listening socket sent beside (bound by the broker on the
    /// host) by connecting each accepted connection to this sandbox port.
    Forward {
        /// The sandbox's port.
        port: u16,
        /// Where the socket listens (the key to stop it by).
        host: SocketAddr,
    },
    /// Stop serving the listening socket bound at `host` (connections
    /// already accepted go on).
    Unforward {
        /// Where it listens.
        host: SocketAddr,
    },
}

/// What a gateway serves. One descriptor travels beside it: the link's
/// AF_PACKET socket; a second, the uplink network namespace, when
/// `uplink_netns` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetServerSpec {
    /// The sandbox, for messages.
    pub sandbox_id: String,
    /// The egress policy.
    pub policy: NetworkSpec,
    /// Always-denied ranges the operator made reachable by explicit rules.
    pub allowable: Vec<ipnet::IpNet>,
    /// The host's own addresses (always denied).
    pub host_addrs: Vec<IpAddr>,
    /// The upstream resolver.
    pub dns_upstream: SocketAddr,
    /// Link MTU.
    pub mtu: usize,
    /// Concurrent flows at most.
    pub max_flows: usize,
    /// New flows per second at most.
    pub flows_per_sec: u32,
    /// Bytes per second at most each way (0: no limit).
    pub bytes_per_sec: u64,
    /// Events sent to the broker per second at most (ten times that in a
    /// burst); past that they are counted.
    pub events_per_sec: f64,
    /// Whether the second descriptor is the uplink namespace to open host
    /// sockets in.
    pub uplink_netns: bool,
    /// Files to write "0" to, joining the sandbox's cgroup.
    pub cgroup_procs: Vec<std::path::PathBuf>,
    /// Open-files limit.
    pub nofile: u64,
    /// Host uid and gid the gateway runs as (the sandbox range's nobody).
    pub run_as: (u32, u32),
    /// Lowest landlock ABI accepted.
    pub landlock_floor: u8,
}

/// What a gateway reports once confined.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetReady {
    /// What the jail reached.
    pub jail: JailReport,
}

/// The gateway's seccomp allow-list, as data.
pub const NET_SECCOMP: &str = include_str!("../../net/seccomp.json");

/// Entry point of the `__net` role; returns the exit status.
pub fn main() -> i32 {
    crate::sys::map_large_allocations();
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("airlock net component: set_dumpable: {e}");
    }
    let Some((chan, spec, fds)) = component::accept_start::<NetRole>() else {
        return 1;
    };
    match serve(&chan, spec, fds) {
        Ok(()) => 0,
        Err((stage, error)) => {
            component::report_failed::<NetRole>(&chan, stage, error);
            1
        }
    }
}

type Stage = (&'static str, String);

fn serve(chan: &Channel, spec: NetServerSpec, fds: Vec<OwnedFd>) -> Result<(), Stage> {
    for f in &spec.cgroup_procs {
        std::fs::write(f, "0").map_err(|e| ("join cgroup", format!("{}: {e}", f.display())))?;
    }
    let want = if spec.uplink_netns { 2 } else { 1 };
    if fds.len() != want {
        return Err((
            "read spec",
            format!("{} descriptors, expected {want}", fds.len()),
        ));
    }
    let mut fds = fds.into_iter();
    let Some(packet) = fds.next() else {
        return Err(("read spec", "descriptors missing".into()));
    };
    if let Some(ns) = fds.next() {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| ("enter the uplink netns", e.to_string()))?;
    }
    let policy = Policy::from_spec(&spec.policy).map_err(|e| ("policy", e.to_string()))?;
    let ranges = Ranges::builtin()
        .with_host_addrs(spec.host_addrs.iter().copied())
        .with_allowable(spec.allowable.iter().copied());
    let events = chan_dup(chan).map_err(|e| ("control channel", e.to_string()))?;
    // A sandbox makes flows as fast as it can connect: beyond the budget
    // events are counted here, in its own process, and never sent.
    let limiter = crate::util::RateLimiter::new(spec.events_per_sec, 10.0 * spec.events_per_sec);
    let sink = Box::new(move |event: NetEvent| {
        let Some(dropped) = limiter.admit() else {
            return;
        };
        if dropped > 0 {
            let msg: Report<NetReady, NetEvent> = Report::Event {
                event: NetEvent::Dropped { count: dropped },
            };
            let _ = events.send(&msg, &[]);
        }
        let msg: Report<NetReady, NetEvent> = Report::Event { event };
        let _ = events.send(&msg, &[]);
    });
    let mut gateway = Gateway::new(
        packet,
        GatewayConfig {
            policy,
            ranges,
            dns_upstream: spec.dns_upstream,
            mtu: spec.mtu,
            max_flows: spec.max_flows,
            flows_per_sec: spec.flows_per_sec,
            bytes_per_sec: spec.bytes_per_sec,
        },
        sink,
    )
    .map_err(|e| ("start the gateway", e.to_string()))?;
    let jail = confine(spec.run_as, spec.landlock_floor, spec.nofile).map_err(|e| ("jail", e))?;
    let ready: Report<NetReady, NetEvent> = Report::Ready {
        version: component::PROTOCOL_VERSION,
        ready: NetReady { jail },
    };
    chan.send(&ready, &[])
        .map_err(|e| ("report ready", e.to_string()))?;
    // Commands from the broker; anything else (the broker closed its end:
    // it died, or it is stopping this gateway) ends the gateway.
    let control = chan.fd();
    gateway
        .run(control.as_fd(), |g| {
            match chan.recv::<component::Control<NetServerSpec, NetCommand>>() {
                Ok((
                    component::Control::Command {
                        command: NetCommand::Drain,
                    },
                    _,
                )) => {
                    g.end_all();
                    false
                }
                Ok((
                    component::Control::Command {
                        command: NetCommand::Forward { port, host },
                    },
                    fds,
                )) => {
                    if let Some(fd) = fds.into_iter().next() {
                        g.forward(std::net::TcpListener::from(fd), port, host);
                    }
                    true
                }
                Ok((
                    component::Control::Command {
                        command: NetCommand::Unforward { host },
                    },
                    _,
                )) => {
                    g.unforward(host);
                    true
                }
                Ok((
                    component::Control::Command {
                        command: NetCommand::SetPolicy { policy },
                    },
                    _,
                )) => {
                    // The broker validated it; a policy that does not parse
                    // here keeps the one in force.
                    if let Ok(p) = Policy::from_spec(&policy) {
                        g.set_policy(p);
                    }
                    true
                }
                _ => false,
            }
        })
        .map_err(|e| ("serve", e.to_string()))
}

/// Leaves host root for the sandbox range's nobody, with no capability in
/// any set (the bounding set emptied while still able to), then rlimits,
/// no_new_privs, landlock (no file access) and the seccomp allow-list.
fn confine(run_as: (u32, u32), landlock_floor: u8, nofile: u64) -> Result<JailReport, String> {
    use nix::sys::resource::{Resource, setrlimit};
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let seccomp =
        airlock_shim::seccomp::compile_allow_list(NET_SECCOMP).map_err(|e| e.to_string())?;
    airlock_shim::caps::drop_bounding_and_ambient().map_err(|e| e.to_string())?;
    let (u, g) = (Uid::from_raw(run_as.0), Gid::from_raw(run_as.1));
    setgroups(&[]).map_err(|e| format!("drop groups: {e}"))?;
    setresgid(g, g, g).map_err(|e| format!("become gid {}: {e}", run_as.1))?;
    setresuid(u, u, u).map_err(|e| format!("become uid {}: {e}", run_as.0))?;
    airlock_shim::caps::clear_all_capability_sets().map_err(|e| e.to_string())?;
    let _ = nix::sys::prctl::set_dumpable(false);
    setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile).map_err(|e| format!("nofile: {e}"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("core: {e}"))?;
    airlock_shim::caps::set_no_new_privs().map_err(|e| e.to_string())?;
    let landlock =
        airlock_shim::landlock::restrict_self_to(&[], landlock_floor).map_err(|e| e.to_string())?;
    airlock_shim::seccomp::install_on_current_thread(&seccomp).map_err(|e| e.to_string())?;
    Ok(JailReport {
        landlock,
        caps_kept: 0,
    })
}

fn chan_dup(chan: &Channel) -> std::io::Result<Channel> {
    Ok(Channel::from_fd(chan.fd().as_fd().try_clone_to_owned()?))
}
