//! A sandbox's link, made with rtnetlink: a veth pair whose sandbox end is
//! `eth0` in the sandbox's network namespace and whose host end lives in a
//! network namespace of its own that holds nothing else (no address, no
//! route: nothing the sandbox sends there can reach any host stack). The
//! gateway reads and writes the host end through an AF_PACKET socket; that
//! socket is the only reference to the link's namespace, so when the
//! gateway (or the sandbox) goes, the kernel deletes the pair with it and
//! nothing is left to clean up.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The link's addresses and MTU, as the sandbox sees them.
#[derive(Debug, Clone, Copy)]
pub struct LinkSpec {
    /// The sandbox's address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// The sandbox's IPv6 address.
    pub addr6: Ipv6Addr,
    /// Its prefix length.
    pub prefix6: u8,
    /// The default IPv6 gateway.
    pub gateway6: Ipv6Addr,
    /// MTU of both ends.
    pub mtu: u32,
}

/// Name of the host end inside its own namespace.
const HOST_END: &str = "gw0";
/// Name of the sandbox end.
const SANDBOX_END: &str = "eth0";

/// Makes the link of the sandbox whose network namespace is `sandbox_ns`
/// and returns the AF_PACKET socket bound to its host end (non-blocking,
/// close-on-exec, ignoring its own transmissions).
///
/// Runs on a thread of its own: it unshares a fresh network namespace for
/// the host end and enters the sandbox's to configure `eth0`, which only
/// ever changes that thread's namespaces.
pub fn make_link(sandbox_ns: BorrowedFd<'_>, spec: LinkSpec) -> Result<OwnedFd, String> {
    let ns = sandbox_ns
        .try_clone_to_owned()
        .map_err(|e| format!("dup the sandbox's netns: {e}"))?;
    std::thread::Builder::new()
        .name("net-link".into())
        .spawn(move || link_on_this_thread(ns, spec))
        .map_err(|e| format!("link thread: {e}"))?
        .join()
        .map_err(|_| "the link thread panicked".to_string())?
}

fn link_on_this_thread(sandbox_ns: OwnedFd, spec: LinkSpec) -> Result<OwnedFd, String> {
    use nix::sched::{CloneFlags, setns, unshare};
    // This thread's namespace from here on: the link's own.
    unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("new netns for the link: {e}"))?;
    let nl = Netlink::open()?;
    nl.new_veth(spec.mtu, sandbox_ns.as_fd())?;
    let host = nl.index_of(HOST_END)?;
    nl.set_up(host)?;
    let packet = packet_socket(host)?;
    // Now the sandbox's side.
    setns(&sandbox_ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("enter the sandbox's netns: {e}"))?;
    let nl = Netlink::open()?;
    let eth0 = nl.index_of(SANDBOX_END)?;
    nl.add_addr(eth0, IpAddr::V4(spec.addr), spec.prefix)?;
    nl.set_up(eth0)?;
    nl.add_default_route(eth0, IpAddr::V4(spec.gateway))?;
    // IPv6 where the kernel has it (a host booted without it keeps its
    // sandboxes IPv4-only). No duplicate-address detection: nothing else
    // is on the link, and the address must be usable at once.
    let v6 = nl
        .add_addr(eth0, IpAddr::V6(spec.addr6), spec.prefix6)
        .and_then(|()| nl.add_default_route(eth0, IpAddr::V6(spec.gateway6)));
    if let Err(e) = v6 {
        tracing::warn!("the sandbox's link stays IPv4-only: {e}");
    }
    Ok(packet)
}

/// An AF_PACKET socket bound to interface `index` of the calling thread's
/// namespace.
fn packet_socket(index: u32) -> Result<OwnedFd, String> {
    use rustix::net::{AddressFamily as Af, SocketFlags, SocketType};
    let proto = rustix::net::Protocol::from_raw(
        std::num::NonZeroU32::new(u32::from((libc::ETH_P_ALL as u16).to_be()))
            .ok_or("ETH_P_ALL")?,
    );
    let fd = rustix::net::socket_with(
        Af::PACKET,
        SocketType::RAW,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        Some(proto),
    )
    .map_err(|e| format!("AF_PACKET socket: {e}"))?;
    crate::sys::bind_packet(fd.as_fd(), index).map_err(|e| format!("bind to the link: {e}"))?;
    crate::sys::packet_ignore_outgoing(fd.as_fd())
        .map_err(|e| format!("PACKET_IGNORE_OUTGOING: {e}"))?;
    Ok(fd)
}

/// A NETLINK_ROUTE socket of the calling thread's namespace.
struct Netlink {
    sock: Socket,
    seq: std::cell::Cell<u32>,
}

impl Netlink {
    fn open() -> Result<Netlink, String> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| format!("netlink socket: {e}"))?;
        sock.bind_auto().map_err(|e| format!("netlink bind: {e}"))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| format!("netlink connect: {e}"))?;
        Ok(Netlink {
            sock,
            seq: std::cell::Cell::new(1),
        })
    }

    /// Sends `msg` and waits for its acknowledgement (or reply).
    fn call(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, String> {
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | flags;
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        hdr.sequence_number = seq;
        let mut m = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.sock
            .send(&buf, 0)
            .map_err(|e| format!("netlink send: {e}"))?;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .sock
                .recv(&mut &mut rx[..], 0)
                .map_err(|e| format!("netlink recv: {e}"))?;
            let mut off = 0;
            while off < n {
                let bytes = rx.get(off..n).ok_or("netlink: short read")?;
                let msg = <NetlinkMessage<RouteNetlinkMessage>>::deserialize(bytes)
                    .map_err(|e| format!("netlink: {e}"))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => {
                                Err(std::io::Error::from_raw_os_error(-code.get()).to_string())
                            }
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    fn new_veth(&self, mtu: u32, peer_ns: BorrowedFd<'_>) -> Result<(), String> {
        let mut peer = LinkMessage::default();
        peer.attributes = vec![
            LinkAttribute::IfName(SANDBOX_END.into()),
            LinkAttribute::Mtu(mtu),
            LinkAttribute::NetNsFd(peer_ns.as_raw_fd()),
        ];
        let mut link = LinkMessage::default();
        link.attributes = vec![
            LinkAttribute::IfName(HOST_END.into()),
            LinkAttribute::Mtu(mtu),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        self.call(
            RouteNetlinkMessage::NewLink(link),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
        .map_err(|e| format!("create the veth pair: {e}"))
    }

    fn index_of(&self, name: &str) -> Result<u32, String> {
        let mut m = LinkMessage::default();
        m.attributes = vec![LinkAttribute::IfName(name.into())];
        let replies = self
            .call(RouteNetlinkMessage::GetLink(m), NLM_F_ACK)
            .map_err(|e| format!("find {name}: {e}"))?;
        replies
            .into_iter()
            .find_map(|r| match r {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })
            .ok_or_else(|| format!("find {name}: no such link"))
    }

    fn set_up(&self, index: u32) -> Result<(), String> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.call(RouteNetlinkMessage::SetLink(m), NLM_F_ACK)
            .map(|_| ())
            .map_err(|e| format!("set link {index} up: {e}"))
    }

    fn add_addr(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<(), String> {
        let mut m = AddressMessage::default();
        m.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.attributes = match addr {
            IpAddr::V4(_) => vec![
                AddressAttribute::Local(addr),
                AddressAttribute::Address(addr),
            ],
            IpAddr::V6(_) => vec![
                AddressAttribute::Address(addr),
                AddressAttribute::Flags(AddressFlags::Nodad),
            ],
        };
        self.call(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
        .map_err(|e| format!("add address {addr}/{prefix}: {e}"))
    }

    fn add_default_route(&self, index: u32, gateway: IpAddr) -> Result<(), String> {
        let mut m = RouteMessage::default();
        m.header.address_family = match gateway {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes = vec![
            RouteAttribute::Gateway(RouteAddress::from(gateway)),
            RouteAttribute::Oif(index),
        ];
        self.call(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
        .map_err(|e| format!("add the default route via {gateway}: {e}"))
    }
}
