//! The gateway loop: one thread owns the veth's host end (an AF_PACKET
//! socket), the smoltcp interface that terminates the sandbox's traffic,
//! and every host socket opened for it, and waits in one `poll`.
//!
//! - **TCP.** A SYN to an endpoint the gateway has no socket for is judged
//!   by the policy before smoltcp sees it. Allowed: a host socket starts
//!   connecting and a smoltcp socket listens on exactly that endpoint, so
//!   the handshake completes; if the host connect fails, the sandbox's
//!   connection is reset. Denied: no socket listens, so smoltcp answers
//!   the SYN with an RST at once (a refused connection never looks open).
//!   Data moves between the two sockets only as far as the other side has
//!   room (smoltcp's buffers are fixed; a full host socket stops reading
//!   from smoltcp and the window closes), so no buffer grows with traffic.
//! - **DNS.** UDP to port 53 of any address is answered by the gateway's
//!   resolver (see [`crate::dns`]), from the address asked; every allowed
//!   address it hands out is pinned to the name it was asked for, and a
//!   domain rule admits a flow only to a pinned address.
//! - **Other UDP.** The first datagram of a (source, destination) pair is
//!   judged like a SYN; an allowed pair is relayed through a host socket
//!   connected to the destination until it is idle for 60 s; a
//!   refused one reaches no socket and smoltcp answers ICMP unreachable.
//! - **IPv6** is served like IPv4 ([`GATEWAY_V6`], [`SANDBOX_V6`]), under
//!   the same policy and always-denied ranges.
//! - **Bandwidth.** With [`GatewayConfig::bytes_per_sec`], a token bucket
//!   per direction bounds what all flows move: TCP stops being read (its
//!   window closes), UDP over the budget is dropped.
//! - **ICMP.** Echo requests to the gateway's addresses are answered by
//!   smoltcp; nothing else is forwarded.
//! - **Port forwarding.** Listening host sockets the broker hands over
//!   ([`Gateway::forward`]): each accepted connection is connected to the
//!   sandbox's port through smoltcp and relayed like any flow.
//!
//! The loop polls for up to 50 µs (yielding the CPU) before it sleeps:
//! a wakeup across CPUs costs more than the next packet's wait.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant as StdInstant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

use crate::dns;
use crate::policy::{Decision, Policy, Proto, Ranges};

/// The gateway's address on the sandbox's link.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The resolver's address.
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The sandbox's address.
pub const SANDBOX_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the sandbox's link.
pub const PREFIX_V4: u8 = 24;
/// The gateway's IPv6 address on the sandbox's link (a ULA, the same in
/// every sandbox).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0, 0, 0, 0, 0, 2);
/// The resolver's IPv6 address.
pub const DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0, 0, 0, 0, 0, 3);
/// The sandbox's IPv6 address.
pub const SANDBOX_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa1, 0, 0, 0, 0, 0, 0x15);
/// Prefix length of the sandbox's IPv6 link.
pub const PREFIX_V6: u8 = 64;
/// Default MTU of the sandbox's link (both veth ends).
pub const DEFAULT_MTU: usize = 65520;
/// The gateway's MAC on the link (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x00, 0x0a, 0x00, 0x02, 0x02];

/// smoltcp buffer per direction per TCP flow.
const TCP_BUFFER: usize = 256 * 1024;
/// Frames read per wakeup at most before the stack runs.
const RX_BATCH: usize = 256;
/// How long the loop polls without sleeping before it waits (see `run`).
const SPIN: Duration = Duration::from_micros(50);
/// How long a flow may take to be connected on both sides.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an upstream DNS answer is waited for.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Pinned addresses kept at most (the oldest go first).
const MAX_PINS: usize = 4096;
/// DNS queries answered per second at most (and burst).
const DNS_PER_SEC: f64 = 50.0;
const DNS_BURST: f64 = 200.0;
/// Datagrams queued per UDP destination socket each way, and their bytes.
const UDP_PACKETS: usize = 32;
const UDP_BUFFER: usize = 128 * 1024;
/// A UDP flow with no datagram either way for this long ends.
const UDP_IDLE: Duration = Duration::from_secs(60);

/// How the gateway is set up.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The egress policy.
    pub policy: Policy,
    /// Always-denied ranges with the host's own addresses and the
    /// operator's exceptions.
    pub ranges: Ranges,
    /// The upstream resolver.
    pub dns_upstream: SocketAddr,
    /// Link MTU.
    pub mtu: usize,
    /// Concurrent TCP flows at most.
    pub max_flows: usize,
    /// New flows per second at most (bursts of twice that pass).
    pub flows_per_sec: u32,
    /// Bytes per second at most each way, over all flows (0: no limit).
    pub bytes_per_sec: u64,
}

/// Something to audit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NetEvent {
    /// A flow was refused, or an allowed one opened or ended.
    Flow {
        /// "refused", "open" (allowed, connecting) or "end" (with its
        /// bytes and duration).
        phase: FlowPhase,
        /// Protocol.
        proto: Proto,
        /// The sandbox's end.
        src: SocketAddr,
        /// Where it went.
        dst: SocketAddr,
        /// The name the destination was pinned to, if any.
        domain: Option<String>,
        /// Whether it was allowed.
        allowed: bool,
        /// The rule or reason that decided.
        reason: String,
        /// Bytes from the sandbox to the destination.
        bytes_out: u64,
        /// Bytes from the destination to the sandbox.
        bytes_in: u64,
        /// How long it lasted.
        duration_ms: u64,
        /// Why it failed after being allowed (connect refused...).
        error: Option<String>,
    },
    /// A DNS question.
    Dns {
        /// The name.
        name: String,
        /// The record type.
        qtype: String,
        /// Whether it was looked up.
        allowed: bool,
        /// The rule or reason that decided.
        reason: String,
        /// The addresses handed out.
        answers: Vec<IpAddr>,
        /// Addresses the upstream gave that were withheld, with why.
        withheld: Vec<(IpAddr, String)>,
    },
    /// A per-sandbox limit was hit.
    Limit {
        /// Which.
        what: String,
    },
    /// Events the gateway did not send over its budget (counted where
    /// they happen, in the sandbox's own process).
    Dropped {
        /// How many since the last report.
        count: u64,
    },
}

/// Where in its life a flow's row was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowPhase {
    /// The policy refused it; the sandbox got an RST.
    Refused,
    /// The policy allowed it; the host connection is under way.
    Open,
    /// It ended.
    End,
}

/// The veth's host end: frames in and out through an AF_PACKET socket.
struct PacketDevice {
    fd: OwnedFd,
    rx: VecDeque<Vec<u8>>,
    mtu: usize,
    /// Reused for every frame sent (no allocation per frame).
    tx_buf: Vec<u8>,
}

struct RxTok(Vec<u8>);
struct TxTok<'a> {
    fd: BorrowedFd<'a>,
    buf: &'a mut Vec<u8>,
}

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.buf.clear();
        self.buf.resize(len, 0);
        let r = f(self.buf);
        // A full socket buffer drops the frame, as a link would; TCP
        // retransmits.
        let _ = rustix::net::send(self.fd, self.buf, rustix::net::SendFlags::DONTWAIT);
        r
    }
}

impl Device for PacketDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(RxTok, TxTok<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((
            RxTok(frame),
            TxTok {
                fd: self.fd.as_fd(),
                buf: &mut self.tx_buf,
            },
        ))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxTok<'_>> {
        Some(TxTok {
            fd: self.fd.as_fd(),
            buf: &mut self.tx_buf,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        // Frames from the sandbox's kernel may carry partial checksums
        // (CHECKSUM_PARTIAL over veth): never verify, always compute.
        let mut cs = ChecksumCapabilities::default();
        cs.ipv4 = Checksum::Tx;
        cs.tcp = Checksum::Tx;
        cs.udp = Checksum::Tx;
        cs.icmpv4 = Checksum::Tx;
        cs.icmpv6 = Checksum::Tx;
        caps.checksum = cs;
        caps
    }
}

/// One TCP flow: the sandbox's side in smoltcp, the destination's on the
/// host.
struct Flow {
    src: SocketAddr,
    dst: SocketAddr,
    host: TcpStream,
    connecting: bool,
    /// The sandbox's handshake completed (so a closed receive side means
    /// the sandbox closed, not that it has not connected yet).
    established: bool,
    host_eof: bool,
    host_shut: bool,
    domain: Option<String>,
    reason: String,
    started: StdInstant,
    bytes_out: u64,
    bytes_in: u64,
    error: Option<String>,
    /// For a flow admitted by name on port 443 or 80: the name check to
    /// pass before any byte goes on, and the names the destination was
    /// resolved for in this sandbox.
    check: Option<(NameCheck, Vec<String>)>,
    /// The sandbox's first bytes, held during the check, then sent first.
    held: Vec<u8>,
    /// Why the name check refused the flow.
    refused: Option<String>,
}

impl Flow {
    /// A flow whose host side is `host` (connecting or not yet).
    fn new(
        src: SocketAddr,
        dst: SocketAddr,
        host: TcpStream,
        connecting: bool,
        domain: Option<String>,
        reason: String,
        check: Option<(NameCheck, Vec<String>)>,
    ) -> Flow {
        Flow {
            src,
            dst,
            host,
            connecting,
            established: false,
            host_eof: false,
            host_shut: false,
            domain,
            reason,
            started: StdInstant::now(),
            bytes_out: 0,
            bytes_in: 0,
            error: None,
            check,
            held: Vec::new(),
            refused: None,
        }
    }
}

/// Which name a flow's first bytes must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameCheck {
    /// TLS ClientHello SNI (TCP 443).
    Sni,
    /// HTTP Host header (TCP 80).
    Host,
}

/// A question waiting for the upstream.
struct PendingDns {
    q: dns::Question,
    client: IpEndpoint,
    /// The address the question was sent to (the answer comes from it).
    local: Option<IpAddress>,
    reason: String,
    sent: StdInstant,
}

/// A token bucket.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: StdInstant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: StdInstant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = StdInstant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Bucket {
    /// Whole tokens available now.
    fn available(&mut self) -> u64 {
        let now = StdInstant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        // Truncation is the point: whole tokens only.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let whole = self.tokens.max(0.0) as u64;
        whole
    }

    /// Takes `n` tokens (never below zero).
    #[allow(clippy::cast_precision_loss)]
    fn spend(&mut self, n: u64) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }
}

/// A direction of traffic, for the bandwidth limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// From the sandbox.
    Out = 0,
    /// To the sandbox.
    In = 1,
}

/// What one round of relaying may still move each way, and whether a
/// flow had more to move than that.
struct Budget {
    left: [u64; 2],
    starved: [bool; 2],
}

impl Budget {
    /// How many bytes may move in direction `i` now (0: none; the
    /// direction is marked starved).
    fn take(&mut self, i: usize) -> usize {
        let left = self.left.get(i).copied().unwrap_or(0);
        if left == 0 {
            if let Some(s) = self.starved.get_mut(i) {
                *s = true;
            }
            return 0;
        }
        usize::try_from(left).unwrap_or(usize::MAX)
    }

    /// `n` bytes moved in direction `i`.
    fn spent(&mut self, i: usize, n: usize) {
        if let Some(l) = self.left.get_mut(i) {
            *l = l.saturating_sub(n as u64);
        }
    }
}

/// One UDP flow: datagrams between a sandbox endpoint and a destination.
struct UdpFlow {
    /// The host socket, connected to the destination.
    host: UdpSocket,
    /// The smoltcp socket bound to the destination (shared by every flow
    /// to it).
    socket: SocketHandle,
    domain: Option<String>,
    reason: String,
    started: StdInstant,
    /// The last datagram either way.
    active: StdInstant,
    bytes_out: u64,
    bytes_in: u64,
}

/// A sandbox's gateway.
pub struct Gateway {
    cfg: GatewayConfig,
    dev: PacketDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    dns_socket: SocketHandle,
    upstream: UdpSocket,
    flows: HashMap<SocketHandle, Flow>,
    /// UDP flows by (sandbox end, destination).
    udp_flows: HashMap<(SocketAddr, SocketAddr), UdpFlow>,
    /// smoltcp sockets bound to UDP destinations, with how many flows use
    /// each.
    udp_ends: HashMap<SocketAddr, (SocketHandle, usize)>,
    /// UDP pairs refused lately (audited once a second at most).
    udp_refused: HashMap<(SocketAddr, SocketAddr), StdInstant>,
    /// Byte buckets out of and into the sandbox, when limited.
    bandwidth: [Option<Bucket>; 2],
    /// When each direction's limit hit was last audited.
    bandwidth_reported: [Option<StdInstant>; 2],
    /// Directions whose budget ran out with bytes waiting.
    throttled: [bool; 2],
    pending: HashMap<u16, PendingDns>,
    next_dns_id: u16,
    pins: HashMap<IpAddr, Vec<(String, StdInstant)>>,
    dns_bucket: Bucket,
    flow_bucket: Bucket,
    /// Reused for every frame read (no allocation per wakeup).
    rx_buf: Vec<u8>,
    /// Listening host sockets forwarded into the sandbox: (listener,
    /// sandbox port, where it listens).
    forwards: Vec<(std::net::TcpListener, u16, SocketAddr)>,
    /// The next local port of the gateway's own connections to the
    /// sandbox (forwarded connections).
    next_port: u16,
    epoch: StdInstant,
    /// How long the loop polls before it sleeps: [`SPIN`] where the
    /// gateway may run on more than one CPU, else nothing (on one CPU a
    /// spin only delays the process it waits for).
    spin: Duration,
    events: Box<dyn FnMut(NetEvent) + Send>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("flows", &self.flows.len())
            .field("pins", &self.pins.len())
            .finish_non_exhaustive()
    }
}

/// Why the gateway stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> GatewayError {
    move |source| GatewayError::Io { what, source }
}

impl Gateway {
    /// A gateway on `packet` (an AF_PACKET socket bound to the veth's host
    /// end, non-blocking) that reports to `events`.
    ///
    /// # Errors
    /// When the upstream resolver's socket cannot be made.
    pub fn new(
        packet: OwnedFd,
        cfg: GatewayConfig,
        events: Box<dyn FnMut(NetEvent) + Send>,
    ) -> Result<Gateway, GatewayError> {
        let mut dev = PacketDevice {
            fd: packet,
            rx: VecDeque::new(),
            mtu: cfg.mtu,
            tx_buf: Vec::with_capacity(cfg.mtu + 64),
        };
        let epoch = StdInstant::now();
        let flows_per_sec = cfg.flows_per_sec;
        // A burst of a quarter second's worth, and never less than one
        // full flow buffer, so a limit shapes rates without stalling.
        #[allow(clippy::cast_precision_loss)]
        let bandwidth = [(); 2].map(|()| {
            (cfg.bytes_per_sec > 0).then(|| {
                let rate = cfg.bytes_per_sec as f64;
                Bucket::new(rate, (rate / 4.0).max(TCP_BUFFER as f64))
            })
        });
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = seed();
        let mut iface = Interface::new(config, &mut dev, Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(GATEWAY_V4), PREFIX_V4));
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(DNS_V4), PREFIX_V4));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(GATEWAY_V6), PREFIX_V6));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(DNS_V6), PREFIX_V6));
        });
        // Accept traffic to any address: the sandbox's default route
        // points here, and every destination is judged by the policy.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY_V4);
        let _ = iface.routes_mut().add_default_ipv6_route(GATEWAY_V6);
        let mut sockets = SocketSet::new(Vec::new());
        let mut udp_sock = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; 64],
                vec![0u8; 64 * dns::MAX_MESSAGE],
            ),
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; 64],
                vec![0u8; 64 * dns::MAX_MESSAGE],
            ),
        );
        // DNS to any address is the resolver's: a program that asks a
        // resolver of its own choosing gets this one (answered from the
        // address it asked), so no query leaves unjudged.
        let _ = udp_sock.bind(IpListenEndpoint {
            addr: None,
            port: 53,
        });
        let dns_socket = sockets.add(udp_sock);
        let bind: SocketAddr = if cfg.dns_upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let upstream = UdpSocket::bind(bind).map_err(io("bind the resolver's socket"))?;
        upstream
            .connect(cfg.dns_upstream)
            .map_err(io("connect the resolver's socket"))?;
        upstream
            .set_nonblocking(true)
            .map_err(io("resolver socket non-blocking"))?;
        Ok(Gateway {
            cfg,
            dev,
            iface,
            sockets,
            dns_socket,
            upstream,
            flows: HashMap::new(),
            udp_flows: HashMap::new(),
            udp_ends: HashMap::new(),
            udp_refused: HashMap::new(),
            bandwidth,
            bandwidth_reported: [None; 2],
            throttled: [false; 2],
            pending: HashMap::new(),
            next_dns_id: u16::try_from(seed() & 0xffff).unwrap_or(1),
            pins: HashMap::new(),
            dns_bucket: Bucket::new(DNS_PER_SEC, DNS_BURST),
            flow_bucket: Bucket::new(f64::from(flows_per_sec), 2.0 * f64::from(flows_per_sec)),
            rx_buf: Vec::new(),
            forwards: Vec::new(),
            next_port: 49152,
            epoch,
            // Affinity, not the CPU quota: under a one-CPU quota the
            // gateway still runs beside the sandbox on another CPU.
            spin: match rustix::thread::sched_getaffinity(None) {
                Ok(set) if set.count() == 1 => Duration::ZERO,
                _ => SPIN,
            },
            events,
        })
    }

    /// Replaces the policy for new flows and questions (flows already open
    /// go on).
    pub fn set_policy(&mut self, policy: Policy) {
        self.cfg.policy = policy;
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.cfg.policy
    }

    /// Ends every open flow, writing each one's end row (bytes so far),
    /// before the gateway stops with its sandbox.
    pub fn end_all(&mut self) {
        let handles: Vec<SocketHandle> = self.flows.keys().copied().collect();
        for h in handles {
            if let Some(f) = self.flows.get_mut(&h)
                && f.error.is_none()
            {
                f.error = Some("the sandbox ended".into());
            }
            self.end_flow(h);
        }
        let keys: Vec<(SocketAddr, SocketAddr)> = self.udp_flows.keys().copied().collect();
        for key in keys {
            self.end_udp(key, Some("the sandbox ended".into()));
        }
    }

    /// Serves connections accepted on `listener` (a listening host socket
    /// the broker bound at `host`, already non-blocking) by connecting
    /// each to the sandbox's `port`.
    pub fn forward(&mut self, listener: std::net::TcpListener, port: u16, host: SocketAddr) {
        self.forwards.push((listener, port, host));
    }

    /// Closes the forwarded listener bound at `host`; connections already
    /// accepted through it go on.
    pub fn unforward(&mut self, host: SocketAddr) {
        self.forwards.retain(|(_, _, h)| *h != host);
    }

    /// Accepts waiting forwarded connections and starts each one's
    /// connection to the sandbox.
    fn accept_forwards(&mut self) {
        for i in 0..self.forwards.len() {
            let flags = rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC;
            while let Some((Ok(fd), port)) = self
                .forwards
                .get(i)
                .map(|(l, port, _)| (rustix::net::accept_with(l, flags), *port))
            {
                let host = TcpStream::from(fd);
                let Ok(peer) = host.peer_addr() else {
                    continue;
                };
                if self.flows.len() >= self.cfg.max_flows {
                    continue;
                }
                let _ = rustix::net::sockopt::set_tcp_nodelay(&host, true);
                let mut sock = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
                    tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
                );
                sock.set_nagle_enabled(false);
                sock.set_ack_delay(None);
                self.next_port = if self.next_port == u16::MAX {
                    49152
                } else {
                    self.next_port + 1
                };
                let local = IpEndpoint::new(IpAddress::Ipv4(GATEWAY_V4), self.next_port);
                let remote = IpEndpoint::new(IpAddress::Ipv4(SANDBOX_V4), port);
                if sock.connect(self.iface.context(), remote, local).is_err() {
                    continue;
                }
                let handle = self.sockets.add(sock);
                let dst = SocketAddr::new(IpAddr::V4(SANDBOX_V4), port);
                (self.events)(NetEvent::Flow {
                    phase: FlowPhase::Open,
                    proto: Proto::Tcp,
                    src: peer,
                    dst,
                    domain: None,
                    allowed: true,
                    reason: format!("port forward to {port}"),
                    bytes_out: 0,
                    bytes_in: 0,
                    duration_ms: 0,
                    error: None,
                });
                let src = peer;
                let reason = format!("port forward to {port}");
                self.flows
                    .insert(handle, Flow::new(src, dst, host, false, None, reason, None));
            }
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX))
    }

    /// Serves until `control` (polled beside the gateway's own sockets)
    /// makes `on_control` return false, or the link goes away.
    ///
    /// # Errors
    /// When polling fails.
    pub fn run(
        &mut self,
        control: BorrowedFd<'_>,
        mut on_control: impl FnMut(&mut Gateway) -> bool,
    ) -> Result<(), GatewayError> {
        loop {
            let delay = self
                .iface
                .poll_delay(self.now(), &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(Duration::from_secs(1))
                .min(if self.throttled.contains(&true) {
                    // Waiting for the bandwidth budget to refill.
                    Duration::from_millis(1)
                } else {
                    Duration::from_secs(1)
                });
            let handles: Vec<SocketHandle> = self.flows.keys().copied().collect();
            let (ready, link_gone) = {
                use rustix::event::{PollFd, PollFlags};
                let mut pfds = Vec::with_capacity(3 + handles.len());
                pfds.push(PollFd::new(&self.dev.fd, PollFlags::IN));
                pfds.push(PollFd::new(&control, PollFlags::IN));
                pfds.push(PollFd::new(&self.upstream, PollFlags::IN));
                for (l, _, _) in &self.forwards {
                    pfds.push(PollFd::new(l, PollFlags::IN));
                }
                for h in &handles {
                    let Some(flow) = self.flows.get(h) else {
                        continue;
                    };
                    let sock = self.sockets.get::<tcp::Socket>(*h);
                    let mut want = PollFlags::empty();
                    if flow.connecting || (sock.recv_queue() > 0 && !self.throttled[0]) {
                        want |= PollFlags::OUT;
                    }
                    if !flow.connecting && !flow.host_eof && sock.can_send() && !self.throttled[1] {
                        want |= PollFlags::IN;
                    }
                    pfds.push(PollFd::new(&flow.host, want));
                }
                for f in self.udp_flows.values() {
                    pfds.push(PollFd::new(&f.host, PollFlags::IN));
                }
                // A bounded spin before sleeping: on these machines a wakeup
                // across CPUs costs more than the next packet's wait, and
                // request/response traffic arrives within microseconds.
                let spin_until = StdInstant::now() + self.spin;
                let zero = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                let mut ready = 0;
                while StdInstant::now() < spin_until {
                    match rustix::event::poll(&mut pfds, Some(&zero)) {
                        Ok(n) if n > 0 => {
                            ready = n;
                            break;
                        }
                        Ok(_) | Err(rustix::io::Errno::INTR) => std::thread::yield_now(),
                        Err(e) => return Err(io("poll")(e.into())),
                    }
                }
                if ready == 0 {
                    let timeout = rustix::event::Timespec::try_from(delay).ok();
                    match rustix::event::poll(&mut pfds, timeout.as_ref()) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(io("poll")(e.into())),
                    }
                }
                let link = pfds.first().map_or(PollFlags::empty(), |p| p.revents());
                let ctl = pfds.get(1).map_or(PollFlags::empty(), |p| p.revents());
                (
                    !ctl.is_empty(),
                    link.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL),
                )
            };
            if link_gone {
                // The sandbox's end went (the sandbox is going): its open
                // flows end here.
                self.end_all();
                return Ok(());
            }
            if ready && !on_control(self) {
                return Ok(());
            }
            self.read_frames();
            self.read_upstream();
            self.accept_forwards();
            self.iface
                .poll(self.now(), &mut self.dev, &mut self.sockets);
            self.serve_dns();
            let done = self.service_flows();
            self.service_udp();
            self.expire_dns();
            self.iface
                .poll(self.now(), &mut self.dev, &mut self.sockets);
            for h in done {
                self.end_flow(h);
            }
        }
    }

    /// Reads waiting frames; new TCP flows and UDP destinations are judged
    /// on the way, before smoltcp sees them.
    fn read_frames(&mut self) {
        let mut buf = std::mem::take(&mut self.rx_buf);
        buf.resize(self.cfg.mtu + 64, 0);
        for _ in 0..RX_BATCH {
            match rustix::net::recv(&self.dev.fd, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _)) if n > 0 => {
                    let frame = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
                    match classify(&frame) {
                        Some(Intercept::TcpSyn { src, dst }) => self.tcp_syn(src, dst),
                        Some(Intercept::Udp { src, dst }) => self.udp_datagram(src, dst),
                        None => {}
                    }
                    self.dev.rx.push_back(frame);
                }
                _ => break,
            }
        }
        self.rx_buf = buf;
    }

    /// The policy's decision on a new flow, limits first: the number of
    /// flows open and the rate of new ones; with the names `dst` was
    /// resolved for in this sandbox.
    fn admit(&mut self, proto: Proto, dst: SocketAddr) -> (Option<String>, Decision, Vec<String>) {
        let names = self.pinned_names(dst.ip());
        let open = self.flows.len() + self.udp_flows.len();
        if open >= self.cfg.max_flows {
            (self.events)(NetEvent::Limit {
                what: format!("concurrent flows ({})", self.cfg.max_flows),
            });
            let d = Decision {
                allowed: false,
                reason: format!("limit: {} concurrent flows", self.cfg.max_flows),
            };
            return (names.first().cloned(), d, names);
        }
        if !self.flow_bucket.take() {
            (self.events)(NetEvent::Limit {
                what: format!("new flows ({}/s)", self.cfg.flows_per_sec),
            });
            let d = Decision {
                allowed: false,
                reason: format!("limit: {} new flows per second", self.cfg.flows_per_sec),
            };
            return (names.first().cloned(), d, names);
        }
        let (domain, d) = self.judge(proto, dst, &names);
        (domain, d, names)
    }

    /// A flow's row without bytes (refused, open, or failed at once).
    fn flow_row(
        &mut self,
        phase: FlowPhase,
        proto: Proto,
        (src, dst): (SocketAddr, SocketAddr),
        domain: Option<String>,
        decision: &Decision,
        error: Option<String>,
    ) {
        (self.events)(NetEvent::Flow {
            phase,
            proto,
            src,
            dst,
            domain,
            allowed: decision.allowed,
            reason: decision.reason.clone(),
            bytes_out: 0,
            bytes_in: 0,
            duration_ms: 0,
            error,
        });
    }

    /// A TCP SYN from the sandbox: unless it belongs to a flow already
    /// under way, judge it, and if allowed start the host connection and a
    /// listener on exactly that endpoint.
    fn tcp_syn(&mut self, src: SocketAddr, dst: SocketAddr) {
        if is_gateway_addr(dst.ip()) {
            // Nothing listens on the gateway itself: smoltcp resets it.
            return;
        }
        if self.flows.values().any(|f| f.src == src && f.dst == dst) {
            return; // a retransmitted SYN
        }
        let (domain, decision, names) = self.admit(Proto::Tcp, dst);
        if !decision.allowed {
            let row = (FlowPhase::Refused, Proto::Tcp, (src, dst));
            self.flow_row(row.0, row.1, row.2, domain, &decision, None);
            return;
        }
        let host = match connect_nonblocking(dst) {
            Ok(s) => s,
            Err(e) => {
                let error = Some(format!("connect: {e}"));
                self.flow_row(
                    FlowPhase::End,
                    Proto::Tcp,
                    (src, dst),
                    domain,
                    &decision,
                    error,
                );
                return;
            }
        };
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
        );
        sock.set_nagle_enabled(false);
        sock.set_ack_delay(None);
        if sock.listen(IpListenEndpoint::from(dst)).is_err() {
            return;
        }
        let handle = self.sockets.add(sock);
        // Admitted by a name: the first bytes must ask for one of the names
        // this address was resolved for (no fronting another name).
        let check = match (&domain, dst.port()) {
            (Some(_), 443) => Some((NameCheck::Sni, names)),
            (Some(_), 80) => Some((NameCheck::Host, names)),
            _ => None,
        };
        self.flow_row(
            FlowPhase::Open,
            Proto::Tcp,
            (src, dst),
            domain.clone(),
            &decision,
            None,
        );
        self.flows.insert(
            handle,
            Flow::new(src, dst, host, true, domain, decision.reason, check),
        );
    }

    /// A UDP datagram from the sandbox. DNS (port 53, to any address) is
    /// the resolver's; the first datagram of a new (source, destination)
    /// pair is judged, and if allowed a host socket connected to the
    /// destination and a smoltcp socket bound to it relay the pair's
    /// datagrams. A refused one reaches no socket, so smoltcp answers it
    /// with an ICMP port unreachable (the sender's next call fails with
    /// ECONNREFUSED at once).
    fn udp_datagram(&mut self, src: SocketAddr, dst: SocketAddr) {
        if dst.port() == 53 || is_gateway_addr(dst.ip()) {
            return;
        }
        if self.udp_flows.contains_key(&(src, dst)) {
            return;
        }
        // A sender that keeps trying a refused destination is audited once
        // a second, not once a datagram.
        if self
            .udp_refused
            .get(&(src, dst))
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let (domain, decision, _) = self.admit(Proto::Udp, dst);
        if !decision.allowed {
            if self.udp_refused.len() >= MAX_PINS {
                self.udp_refused.clear();
            }
            self.udp_refused.insert((src, dst), StdInstant::now());
            self.flow_row(
                FlowPhase::Refused,
                Proto::Udp,
                (src, dst),
                domain,
                &decision,
                None,
            );
            return;
        }
        let host = match udp_connect(dst) {
            Ok(s) => s,
            Err(e) => {
                let error = Some(format!("connect: {e}"));
                self.flow_row(
                    FlowPhase::End,
                    Proto::Udp,
                    (src, dst),
                    domain,
                    &decision,
                    error,
                );
                return;
            }
        };
        let handle = if let Some((h, n)) = self.udp_ends.get_mut(&dst) {
            *n += 1;
            *h
        } else {
            let mut sock = udp::Socket::new(
                udp::PacketBuffer::new(
                    vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                    vec![0u8; UDP_BUFFER],
                ),
                udp::PacketBuffer::new(
                    vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                    vec![0u8; UDP_BUFFER],
                ),
            );
            if sock.bind(IpListenEndpoint::from(dst)).is_err() {
                return;
            }
            let h = self.sockets.add(sock);
            self.udp_ends.insert(dst, (h, 1));
            h
        };
        self.flow_row(
            FlowPhase::Open,
            Proto::Udp,
            (src, dst),
            domain.clone(),
            &decision,
            None,
        );
        self.udp_flows.insert(
            (src, dst),
            UdpFlow {
                host,
                socket: handle,
                domain,
                reason: decision.reason,
                started: StdInstant::now(),
                active: StdInstant::now(),
                bytes_out: 0,
                bytes_in: 0,
            },
        );
    }

    /// Moves datagrams both ways for every UDP flow, and ends idle ones.
    /// Over the bandwidth limit, datagrams are dropped (as a policer
    /// would), in both directions.
    fn service_udp(&mut self) {
        if self.udp_flows.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut self.rx_buf);
        buf.resize(self.cfg.mtu + 64, 0);
        // Sandbox to destinations.
        let ends: Vec<(SocketAddr, SocketHandle)> =
            self.udp_ends.iter().map(|(d, (h, _))| (*d, *h)).collect();
        for (dst, h) in ends {
            loop {
                let (n, src) = {
                    let sock = self.sockets.get_mut::<udp::Socket>(h);
                    match sock.recv_slice(&mut buf) {
                        Ok((n, meta)) => (n, endpoint_addr(meta.endpoint)),
                        Err(_) => break,
                    }
                };
                let allowed = self.spend(Direction::Out, n);
                let Some(flow) = self.udp_flows.get_mut(&(src, dst)) else {
                    continue;
                };
                flow.active = StdInstant::now();
                if allowed && let Some(d) = buf.get(..n) {
                    // A full host socket drops the datagram, as a link would.
                    if flow.host.send(d).is_ok() {
                        flow.bytes_out += n as u64;
                    }
                }
            }
        }
        // Destinations to the sandbox.
        let keys: Vec<(SocketAddr, SocketAddr)> = self.udp_flows.keys().copied().collect();
        for key in keys {
            while let Some(flow) = self.udp_flows.get_mut(&key) {
                if !self.sockets.get::<udp::Socket>(flow.socket).can_send() {
                    break;
                }
                let n = match flow.host.recv(&mut buf) {
                    Ok(n) => n,
                    // Includes ICMP errors reported on the connected socket.
                    Err(_) => break,
                };
                flow.active = StdInstant::now();
                let socket = flow.socket;
                if !self.spend(Direction::In, n) {
                    continue;
                }
                let meta = udp::UdpMetadata {
                    endpoint: IpEndpoint::from(key.0),
                    local_address: Some(IpAddress::from(key.1.ip())),
                    meta: smoltcp::phy::PacketMeta::default(),
                };
                let sock = self.sockets.get_mut::<udp::Socket>(socket);
                if sock
                    .send_slice(buf.get(..n).unwrap_or_default(), meta)
                    .is_ok()
                    && let Some(flow) = self.udp_flows.get_mut(&key)
                {
                    flow.bytes_in += n as u64;
                }
            }
        }
        self.rx_buf = buf;
        let idle: Vec<(SocketAddr, SocketAddr)> = self
            .udp_flows
            .iter()
            .filter(|(_, f)| f.active.elapsed() > UDP_IDLE)
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            self.end_udp(key, None);
        }
    }

    /// Ends a UDP flow and writes its end row.
    fn end_udp(&mut self, key: (SocketAddr, SocketAddr), error: Option<String>) {
        let Some(f) = self.udp_flows.remove(&key) else {
            return;
        };
        if let Some((h, n)) = self.udp_ends.get_mut(&key.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                let h = *h;
                self.udp_ends.remove(&key.1);
                self.sockets.remove(h);
            }
        }
        (self.events)(NetEvent::Flow {
            phase: FlowPhase::End,
            proto: Proto::Udp,
            src: key.0,
            dst: key.1,
            domain: f.domain,
            allowed: true,
            reason: f.reason,
            bytes_out: f.bytes_out,
            bytes_in: f.bytes_in,
            duration_ms: u64::try_from(f.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error,
        });
    }

    /// Takes `n` bytes from the direction's bandwidth budget; false (and
    /// an audited limit hit, at most one per direction each 10 s) when it
    /// has not that much.
    fn spend(&mut self, dir: Direction, n: usize) -> bool {
        let i = dir as usize;
        let Some(bucket) = self.bandwidth[i].as_mut() else {
            return true;
        };
        if bucket.available() >= n as u64 {
            bucket.spend(n as u64);
            return true;
        }
        self.bandwidth_hit(dir);
        false
    }

    fn bandwidth_hit(&mut self, dir: Direction) {
        let i = dir as usize;
        if self.bandwidth_reported[i].is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return;
        }
        self.bandwidth_reported[i] = Some(StdInstant::now());
        let way = match dir {
            Direction::Out => "out",
            Direction::In => "in",
        };
        (self.events)(NetEvent::Limit {
            what: format!("bytes per second {way} ({})", self.cfg.bytes_per_sec),
        });
    }

    /// The policy's decision on a flow to `dst`, and the name that admits
    /// it: the first of `names` (those `dst` was resolved for) a rule
    /// allows, or the first one (or none) when none does.
    fn judge(&self, proto: Proto, dst: SocketAddr, names: &[String]) -> (Option<String>, Decision) {
        let decide = |name: Option<&str>| {
            self.cfg
                .policy
                .flow_decision(proto, dst.ip(), dst.port(), name, &self.cfg.ranges)
        };
        for n in names {
            let d = decide(Some(n));
            if d.allowed {
                return (Some(n.clone()), d);
            }
        }
        let first = names.first().cloned();
        let d = decide(first.as_deref());
        (first, d)
    }

    /// The names `addr` was handed out for in this sandbox (live pins).
    fn pinned_names(&mut self, addr: IpAddr) -> Vec<String> {
        let now = StdInstant::now();
        let Some(names) = self.pins.get_mut(&addr) else {
            return Vec::new();
        };
        names.retain(|(_, until)| *until > now);
        let out: Vec<String> = names.iter().map(|(n, _)| n.clone()).collect();
        if out.is_empty() {
            self.pins.remove(&addr);
        }
        out
    }

    /// Moves data between each flow's two sockets, as far as the
    /// bandwidth budget goes, and ends finished ones. Returns the flows
    /// that are over; their sockets stay in the set until the stack has
    /// run once more (an aborted one still owes the sandbox its RST).
    fn service_flows(&mut self) -> Vec<SocketHandle> {
        let handles: Vec<SocketHandle> = self.flows.keys().copied().collect();
        let mut budget = Budget {
            left: [u64::MAX; 2],
            starved: [false; 2],
        };
        for (i, b) in self.bandwidth.iter_mut().enumerate() {
            if let (Some(b), Some(slot)) = (b.as_mut(), budget.left.get_mut(i)) {
                *slot = b.available();
            }
        }
        let start = budget.left;
        let mut done = Vec::new();
        for h in handles {
            let Some(flow) = self.flows.get_mut(&h) else {
                continue;
            };
            let sock = self.sockets.get_mut::<tcp::Socket>(h);
            if service(flow, sock, &mut budget) {
                done.push(h);
            }
        }
        self.throttled = budget.starved;
        for dir in [Direction::Out, Direction::In] {
            let i = dir as usize;
            if let Some(b) = self.bandwidth[i].as_mut() {
                b.spend(start[i] - budget.left[i]);
                if budget.starved[i] {
                    self.bandwidth_hit(dir);
                }
            }
        }
        done
    }

    fn end_flow(&mut self, h: SocketHandle) {
        self.sockets.remove(h);
        if let Some(f) = self.flows.remove(&h) {
            let (phase, allowed, reason) = match f.refused {
                Some(why) => (FlowPhase::Refused, false, why),
                None => (FlowPhase::End, true, f.reason),
            };
            (self.events)(NetEvent::Flow {
                phase,
                proto: Proto::Tcp,
                src: f.src,
                dst: f.dst,
                domain: f.domain,
                allowed,
                reason,
                bytes_out: f.bytes_out,
                bytes_in: f.bytes_in,
                duration_ms: u64::try_from(f.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                error: f.error,
            });
        }
    }

    /// Questions from the sandbox: refused names get NXDOMAIN and never
    /// leave; allowed ones go upstream.
    fn serve_dns(&mut self) {
        loop {
            let (bytes, client) = {
                let sock = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
                match sock.recv() {
                    Ok((b, meta)) => (b.to_vec(), (meta.endpoint, meta.local_address)),
                    Err(_) => break,
                }
            };
            if !self.dns_bucket.take() {
                (self.events)(NetEvent::Limit {
                    what: format!("DNS queries ({DNS_PER_SEC}/s)"),
                });
                if let Ok(q) = dns::parse_question(&bytes) {
                    let reply = dns::empty_answer(&q, hickory_proto::op::ResponseCode::Refused);
                    self.reply_dns(&reply, client);
                }
                continue;
            }
            let q = match dns::parse_question(&bytes) {
                Ok(q) => q,
                Err(dns::QuestionError::Malformed) => continue,
                Err(
                    dns::QuestionError::NotAQuery { id } | dns::QuestionError::BadName { id, .. },
                ) => {
                    let reply = dns::error_answer(id, hickory_proto::op::ResponseCode::FormErr);
                    self.reply_dns(&reply, client);
                    continue;
                }
            };
            let decision = self.cfg.policy.name_decision(&q.name);
            if !decision.allowed {
                (self.events)(NetEvent::Dns {
                    name: q.name.clone(),
                    qtype: q.qtype_text(),
                    allowed: false,
                    reason: decision.reason,
                    answers: Vec::new(),
                    withheld: Vec::new(),
                });
                let reply = dns::empty_answer(&q, hickory_proto::op::ResponseCode::NXDomain);
                self.reply_dns(&reply, client);
                continue;
            }
            if !q.is_address() {
                let reply = dns::empty_answer(&q, hickory_proto::op::ResponseCode::NoError);
                self.reply_dns(&reply, client);
                continue;
            }
            self.next_dns_id = self.next_dns_id.wrapping_add(1);
            let id = self.next_dns_id;
            let Some(query) = dns::upstream_query(&q, id) else {
                continue;
            };
            if self.upstream.send(&query).is_err() {
                let reply = dns::empty_answer(&q, hickory_proto::op::ResponseCode::ServFail);
                self.reply_dns(&reply, client);
                continue;
            }
            self.pending.insert(
                id,
                PendingDns {
                    q,
                    client: client.0,
                    local: client.1,
                    reason: decision.reason,
                    sent: StdInstant::now(),
                },
            );
        }
    }

    /// Sends `reply` to `client` from `local`, the address it asked.
    fn reply_dns(&mut self, reply: &[u8], (client, local): (IpEndpoint, Option<IpAddress>)) {
        let meta = udp::UdpMetadata {
            endpoint: client,
            local_address: local,
            meta: smoltcp::phy::PacketMeta::default(),
        };
        let sock = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
        let _ = sock.send_slice(reply, meta);
    }

    /// Upstream answers: only addresses the policy accepts for the name
    /// reach the sandbox, and each is pinned to it.
    fn read_upstream(&mut self) {
        let mut buf = [0u8; dns::MAX_MESSAGE];
        while let Ok(n) = self.upstream.recv(&mut buf) {
            let bytes = buf.get(..n).unwrap_or_default();
            let Some(id) = bytes.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
                continue;
            };
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            let Some(up) = dns::parse_upstream(bytes, id) else {
                self.pending.insert(id, p);
                continue;
            };
            let mut kept = Vec::new();
            let mut withheld = Vec::new();
            for (addr, ttl) in &up.addresses {
                let d = self
                    .cfg
                    .policy
                    .answer_decision(&p.q.name, *addr, &self.cfg.ranges);
                if d.allowed {
                    let pin = (*ttl).clamp(dns::MIN_PIN_SECS, dns::MAX_PIN_SECS);
                    kept.push((*addr, pin.min(*ttl).max(1)));
                    self.pin(*addr, &p.q.name, pin);
                } else {
                    withheld.push((*addr, d.reason));
                }
            }
            let reply = if kept.is_empty() && !withheld.is_empty() {
                dns::empty_answer(&p.q, hickory_proto::op::ResponseCode::NXDomain)
            } else {
                dns::answer(&p.q, &up, &kept)
            };
            (self.events)(NetEvent::Dns {
                name: p.q.name.clone(),
                qtype: p.q.qtype_text(),
                allowed: true,
                reason: p.reason.clone(),
                answers: kept.iter().map(|(a, _)| *a).collect(),
                withheld,
            });
            self.reply_dns(&reply, (p.client, p.local));
        }
    }

    fn pin(&mut self, addr: IpAddr, name: &str, secs: u32) {
        /// Names kept per address at most (the oldest go first).
        const NAMES_PER_ADDR: usize = 16;
        let now = StdInstant::now();
        if self.pins.len() >= MAX_PINS && !self.pins.contains_key(&addr) {
            self.pins.retain(|_, names| {
                names.retain(|(_, until)| *until > now);
                !names.is_empty()
            });
            if self.pins.len() >= MAX_PINS {
                let oldest = self
                    .pins
                    .iter()
                    .min_by_key(|(_, names)| names.iter().map(|(_, u)| *u).max())
                    .map(|(a, _)| *a);
                if let Some(a) = oldest {
                    self.pins.remove(&a);
                }
            }
        }
        let until = now + Duration::from_secs(u64::from(secs));
        let names = self.pins.entry(addr).or_default();
        names.retain(|(n, _)| n != name);
        if names.len() >= NAMES_PER_ADDR {
            names.remove(0);
        }
        names.push((name.to_string(), until));
    }

    fn expire_dns(&mut self) {
        let expired: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.sent.elapsed() > DNS_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                let reply = dns::empty_answer(&p.q, hickory_proto::op::ResponseCode::ServFail);
                self.reply_dns(&reply, (p.client, p.local));
            }
        }
    }
}

/// What the gateway must judge before smoltcp sees a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intercept {
    /// A TCP SYN (no ACK): a new connection attempt.
    TcpSyn {
        /// The sandbox's end.
        src: SocketAddr,
        /// Where it goes.
        dst: SocketAddr,
    },
    /// A UDP datagram.
    Udp {
        /// The sandbox's end.
        src: SocketAddr,
        /// Where it goes.
        dst: SocketAddr,
    },
}

/// What `frame` asks of the gateway if it is an unfragmented IPv4 or IPv6
/// (no extension headers) TCP SYN or UDP datagram; any other frame,
/// malformed ones included, is `None` and goes to smoltcp as it is (which
/// answers what it serves itself and drops the rest).
pub fn classify(frame: &[u8]) -> Option<Intercept> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let (src, dst, proto, payload) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            let proto = ip.next_header();
            let (s, d) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
            (s, d, proto, ip.payload())
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            let proto = ip.next_header();
            let (s, d) = (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()));
            (s, d, proto, ip.payload())
        }
        _ => return None,
    };
    match proto {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(payload).ok()?;
            (tcp.syn() && !tcp.ack()).then(|| Intercept::TcpSyn {
                src: SocketAddr::new(src, tcp.src_port()),
                dst: SocketAddr::new(dst, tcp.dst_port()),
            })
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(payload).ok()?;
            Some(Intercept::Udp {
                src: SocketAddr::new(src, udp.src_port()),
                dst: SocketAddr::new(dst, udp.dst_port()),
            })
        }
        _ => None,
    }
}

/// One step of a flow; true when it is over.
fn service(flow: &mut Flow, sock: &mut tcp::Socket<'_>, budget: &mut Budget) -> bool {
    // A flow that never finishes setting up (a SYN never followed by the
    // handshake, a destination that never answers) would hold one of the
    // sandbox's flows for good.
    if (flow.connecting || !flow.established) && flow.started.elapsed() > SETUP_TIMEOUT {
        flow.error = Some(format!(
            "connection set-up took over {}s",
            SETUP_TIMEOUT.as_secs()
        ));
        sock.abort();
        return true;
    }
    if flow.connecting {
        match flow.host.take_error() {
            Ok(Some(e)) => {
                flow.error = Some(format!("connect: {e}"));
                sock.abort();
                return true;
            }
            Err(e) => {
                flow.error = Some(format!("connect: {e}"));
                sock.abort();
                return true;
            }
            Ok(None) => {}
        }
        if flow.host.peer_addr().is_ok() {
            flow.connecting = false;
        } else {
            return matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait);
        }
    }
    if !flow.established {
        if sock.may_recv() || sock.may_send() {
            flow.established = true;
        } else {
            return matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait);
        }
    }
    // A flow admitted by name: hold its first bytes until they name one of
    // the names its destination was resolved for.
    if let Some((kind, names)) = &flow.check {
        while sock.can_recv() && flow.held.len() < crate::inspect::MAX_HELD {
            let room = crate::inspect::MAX_HELD - flow.held.len();
            let held = &mut flow.held;
            let _ = sock.recv(|buf| {
                let n = buf.len().min(room);
                held.extend_from_slice(buf.get(..n).unwrap_or_default());
                (n, ())
            });
        }
        let seen = match kind {
            NameCheck::Sni => crate::inspect::tls_sni(&flow.held),
            NameCheck::Host => crate::inspect::http_host(&flow.held),
        };
        let what = match kind {
            NameCheck::Sni => "SNI",
            NameCheck::Host => "Host",
        };
        match seen {
            crate::inspect::Seen::Need if sock.may_recv() => return false,
            crate::inspect::Seen::Need => {
                flow.refused = Some(format!(
                    "{what}: the connection closed before naming a host"
                ));
                sock.abort();
                return true;
            }
            crate::inspect::Seen::Refuse(why) => {
                flow.refused = Some(format!("{what}: {why}"));
                sock.abort();
                return true;
            }
            crate::inspect::Seen::Name(n) if names.contains(&n) => {
                flow.check = None;
            }
            crate::inspect::Seen::Name(n) => {
                flow.refused = Some(format!(
                    "{what} {n:?} is not a name this sandbox resolved {} for",
                    flow.dst.ip()
                ));
                sock.abort();
                return true;
            }
        }
    }
    // Bytes held during the check go first.
    if !flow.held.is_empty() {
        match flow.host.write(&flow.held) {
            Ok(n) => {
                flow.bytes_out += n as u64;
                flow.held.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                flow.error = Some(format!("send: {e}"));
                sock.abort();
                return true;
            }
        }
        if !flow.held.is_empty() {
            return false;
        }
    }
    // Sandbox to destination, as far as the host socket takes it and the
    // budget allows.
    let out = Direction::Out as usize;
    while sock.can_recv() {
        let cap = budget.take(out);
        if cap == 0 {
            break;
        }
        let host = &mut flow.host;
        let r = sock.recv(|buf| {
            let buf = buf.get(..buf.len().min(cap)).unwrap_or_default();
            match host.write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            }
        });
        match r {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                flow.bytes_out += n as u64;
                budget.spent(out, n);
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Ok(Err(e)) => {
                flow.error = Some(format!("send: {e}"));
                sock.abort();
                return true;
            }
            Err(_) => break,
        }
    }
    if !sock.may_recv() && sock.recv_queue() == 0 && !flow.host_shut {
        let _ = flow.host.shutdown(std::net::Shutdown::Write);
        flow.host_shut = true;
    }
    // Destination to sandbox, as far as smoltcp has room and the budget
    // allows.
    let inn = Direction::In as usize;
    while !flow.host_eof && sock.can_send() {
        let cap = budget.take(inn);
        if cap == 0 {
            break;
        }
        let host = &mut flow.host;
        let r = sock.send(|buf| {
            let len = buf.len().min(cap);
            match host.read(buf.get_mut(..len).unwrap_or_default()) {
                Ok(0) => (0, Ok(0)),
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            }
        });
        match r {
            Ok(Ok(0)) => {
                flow.host_eof = true;
                sock.close();
            }
            Ok(Ok(n)) => {
                flow.bytes_in += n as u64;
                budget.spent(inn, n);
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Ok(Err(e)) => {
                flow.error = Some(format!("recv: {e}"));
                sock.abort();
                return true;
            }
            Err(_) => break,
        }
    }
    matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait)
        || (flow.host_eof && flow.host_shut && sock.state() == tcp::State::Closed)
}

/// Whether `addr` is one of the gateway's own addresses.
fn is_gateway_addr(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a == GATEWAY_V4 || a == DNS_V4,
        IpAddr::V6(a) => a == GATEWAY_V6 || a == DNS_V6,
    }
}

/// `e` as a socket address.
fn endpoint_addr(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(e.addr), e.port)
}

/// A non-blocking, close-on-exec socket of `dst`'s family.
fn socket_for(dst: SocketAddr, ty: rustix::net::SocketType) -> std::io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags};
    let family = if dst.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    Ok(rustix::net::socket_with(
        family,
        ty,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A non-blocking UDP socket connected to `dst` (so only `dst` can answer
/// through it). The connect binds it (the jail has no `bind`).
fn udp_connect(dst: SocketAddr) -> std::io::Result<UdpSocket> {
    let fd = socket_for(dst, rustix::net::SocketType::DGRAM)?;
    rustix::net::connect(&fd, &dst)?;
    Ok(UdpSocket::from(fd))
}

/// A non-blocking TCP connect to `dst`, under way.
fn connect_nonblocking(dst: SocketAddr) -> std::io::Result<TcpStream> {
    let fd = socket_for(dst, rustix::net::SocketType::STREAM)?;
    match rustix::net::connect(&fd, &dst) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
    Ok(TcpStream::from(fd))
}

/// A seed for smoltcp's sequence numbers and the resolver's query ids.
fn seed() -> u64 {
    let mut b = [0u8; 8];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return u64::try_from(t & u128::from(u64::MAX)).unwrap_or(1);
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::policy::NetworkSpec;

    /// A TCP SYN from the sandbox to `dst`:`port`, as raw Ethernet bytes.
    fn syn_frame(dst: [u8; 4], port: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&GATEWAY_MAC);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0f]);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&SANDBOX_V4.octets());
        f.extend_from_slice(&dst);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        f
    }

    /// A TCP SYN from the sandbox's IPv6 address to `dst`:`port`.
    fn syn6_frame(dst: Ipv6Addr, port: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&GATEWAY_MAC);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0f]);
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
        f.extend_from_slice(&SANDBOX_V6.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        f
    }

    #[test]
    fn frames_are_classified_by_family_and_protocol() {
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            classify(&syn6_frame(dst, 443)),
            Some(Intercept::TcpSyn {
                src: SocketAddr::new(IpAddr::V6(SANDBOX_V6), 40000),
                dst: SocketAddr::new(IpAddr::V6(dst), 443),
            })
        );
        // The same bytes with protocol UDP (an 8-byte header, length 20).
        let mut udp = syn6_frame(dst, 7);
        udp[20] = 17;
        udp[58..60].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(
            classify(&udp),
            Some(Intercept::Udp {
                src: SocketAddr::new(IpAddr::V6(SANDBOX_V6), 40000),
                dst: SocketAddr::new(IpAddr::V6(dst), 7),
            })
        );
        // A SYN-ACK is no new flow; a fragment is nobody's to judge.
        let mut synack = syn_frame([203, 0, 113, 9], 80);
        synack[47] = 0x12;
        assert_eq!(classify(&synack), None);
        let mut frag = syn_frame([203, 0, 113, 9], 80);
        frag[20] = 0x20;
        assert_eq!(classify(&frag), None);
        assert!(matches!(
            classify(&syn_frame([203, 0, 113, 9], 80)),
            Some(Intercept::TcpSyn { .. })
        ));
    }

    #[test]
    fn an_ipv6_syn_is_judged_by_the_ipv4_address_it_embeds() {
        let spec = NetworkSpec {
            mode: crate::policy::Mode::Open,
            allow: Vec::new(),
        };
        let (link, ctl, events, handle) = gateway(spec);
        let nat64: Ipv6Addr = "64:ff9b::a9fe:a9fe".parse().unwrap();
        rustix::net::send(
            &link,
            &syn6_frame(nat64, 80),
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        assert_refused(&events, 80, &["cloud metadata", "embeds 169.254.169.254"]);
        drop(ctl);
        handle.join().unwrap().unwrap();
    }

    type Events = Arc<Mutex<Vec<NetEvent>>>;

    /// A gateway on a datagram socket pair standing in for the link (no
    /// privilege needed); returns the test's end of the link, the control
    /// end that stops it when dropped, the events, and its thread.
    fn gateway(
        spec: NetworkSpec,
    ) -> (
        OwnedFd,
        OwnedFd,
        Events,
        std::thread::JoinHandle<Result<(), GatewayError>>,
    ) {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let (link_gw, link_test) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let (ctl_gw, ctl_test) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let events: Events = Arc::default();
        let sink = Arc::clone(&events);
        let cfg = GatewayConfig {
            policy: Policy::from_spec(&spec).unwrap(),
            ranges: Ranges::builtin(),
            dns_upstream: "127.0.0.1:9".parse().unwrap(),
            mtu: 1500,
            max_flows: 16,
            flows_per_sec: 1_000_000,
            bytes_per_sec: 0,
        };
        let handle = std::thread::spawn(move || {
            let mut g = Gateway::new(
                link_gw,
                cfg,
                Box::new(move |e| sink.lock().unwrap().push(e)),
            )?;
            g.run(ctl_gw.as_fd(), |_| false)
        });
        (link_test, ctl_test, events, handle)
    }

    fn wait_for(events: &Events, what: impl Fn(&NetEvent) -> bool) -> NetEvent {
        let deadline = StdInstant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = events.lock().unwrap().iter().find(|e| what(e)) {
                return e.clone();
            }
            assert!(StdInstant::now() < deadline, "no such event");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the refusal of a flow to `port` and checks its reason
    /// names each of `why`.
    fn assert_refused(events: &Events, port: u16, why: &[&str]) {
        match wait_for(events, refused_to(port)) {
            NetEvent::Flow {
                reason, allowed, ..
            } => {
                assert!(!allowed);
                for w in why {
                    assert!(reason.contains(w), "{reason}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

    fn refused_to(port: u16) -> impl Fn(&NetEvent) -> bool {
        move |e| matches!(e, NetEvent::Flow { phase: FlowPhase::Refused, dst, .. } if dst.port() == port)
    }

    #[test]
    fn a_syn_to_a_refused_destination_is_audited_with_the_reason() {
        let spec = NetworkSpec {
            mode: crate::policy::Mode::Open,
            allow: Vec::new(),
        };
        let (link, ctl, events, handle) = gateway(spec);
        rustix::net::send(
            &link,
            &syn_frame([169, 254, 169, 254], 80),
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        assert_refused(&events, 80, &["cloud metadata"]);
        drop(ctl);
        handle.join().unwrap().unwrap();
    }

    /// Frames of every shape (truncated, bad lengths and checksums,
    /// fragments, options, garbage) are dropped without harm: the gateway
    /// still judges a well-formed SYN after them.
    #[test]
    fn malformed_frames_are_dropped_without_harm() {
        let spec = NetworkSpec {
            mode: crate::policy::Mode::Allow,
            allow: Vec::new(),
        };
        let (link, ctl, events, handle) = gateway(spec);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = syn_frame([203, 0, 113, 9], 443);
        for i in 0..20_000 {
            let frame: Vec<u8> = if i % 2 == 0 {
                let len = usize::try_from(next() % 1600).unwrap();
                (0..len).map(|_| (next() & 0xff) as u8).collect()
            } else {
                let mut f = good.clone();
                for _ in 0..1 + next() % 4 {
                    let at = usize::try_from(next()).unwrap() % f.len();
                    f[at] = (next() & 0xff) as u8;
                }
                let cut = usize::try_from(next()).unwrap() % (f.len() + 1);
                f.truncate(cut.max(1));
                f
            };
            // A full link queue drops frames, as a real link would.
            let _ = rustix::net::send(&link, &frame, rustix::net::SendFlags::DONTWAIT);
            if i % 256 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        rustix::net::send(
            &link,
            &syn_frame([203, 0, 113, 9], 8443),
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        wait_for(&events, refused_to(8443));
        assert!(!handle.is_finished());
        drop(ctl);
        handle.join().unwrap().unwrap();
    }
}
