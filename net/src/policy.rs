//! The egress policy: what a sandbox may reach, as data, with pure decisions.
//!
//! Deny by default. The gateway asks three questions, and each answer is a
//! [`Decision`] value (allowed or not, and why) for the audit log, never an
//! `Err`:
//!
//! 1. [`Policy::name_decision`]: may the gateway's resolver look a name up
//!    and answer it?
//! 2. [`Policy::answer_decision`]: may an address from the upstream answer
//!    be handed to the sandbox? This is where DNS rebinding stops: an
//!    allowed name that resolves into an always-denied range is refused.
//! 3. [`Policy::flow_decision`]: may a new TCP/UDP flow to an address and
//!    port be opened? A domain rule allows a flow only to an address that
//!    this sandbox's resolver handed out for a matching name (the address is
//!    "pinned" to that name); the gateway passes the pin in.
//!
//! Addresses in [`Ranges`] (loopback, cloud metadata, RFC 1918, the host's
//! own addresses, ...) are always denied, whatever the mode, unless the
//! operator made a range allowable *and* the sandbox's policy names the
//! address by an explicit CIDR/IP rule. An IPv6 address that embeds an IPv4
//! address ([`embedded_ipv4`]: mapped, compatible, NAT64, 6to4, Teredo) is
//! judged as that IPv4 address, so `::ffff:127.0.0.1` and
//! `64:ff9b::a9fe:a9fe` are loopback and cloud metadata.
//!
//! # Rule syntax
//!
//! `DOMAIN`, `*.DOMAIN`, `CIDR` or `IP`, each optionally followed by `:PORT`
//! or `:LOW-HIGH`. An IPv6 address or CIDR followed by a port is bracketed
//! (`[2001:db8::1]:443`, `[2001:db8::/32]:80-90`); without a port it may be
//! bare (`2001:db8::/32`). A rule without a port matches every port, over
//! TCP and UDP alike, with one exception: UDP port 443 (QUIC) is allowed
//! only by a rule whose port range names 443. See [`Rule`] for the details
//! and the canonical form.

use std::cmp::Reverse;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The most allow rules one policy may hold.
pub const MAX_RULES: usize = 256;

/// The longest rule text accepted, in bytes.
pub const MAX_RULE_LEN: usize = 300;

/// The UDP port that carries QUIC: it needs a rule that names it.
const QUIC_PORT: u16 = 443;

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP (including QUIC on port 443).
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// How much network a sandbox has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No network at all: every name and flow is refused.
    #[default]
    None,
    /// Any public address; always-denied ranges stay denied.
    Open,
    /// Only what the allow rules name.
    Allow,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Open => "open",
            Self::Allow => "allow",
        })
    }
}

/// The policy, as the API and config spell it:
/// `{"mode": "allow", "allow": ["pypi.org", "*.pythonhosted.org:443"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// How much network the sandbox has.
    pub mode: Mode,
    /// Allow rules, in [rule syntax](Rule); only in [`Mode::Allow`].
    #[serde(default)]
    pub allow: Vec<String>,
}

/// Why a policy or rule is refused. Each message names the rule (quoted, with
/// control characters escaped) and exactly what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The rule is empty or only whitespace.
    #[error("empty rule")]
    EmptyRule,
    /// The rule is longer than [`MAX_RULE_LEN`]; `start` is its beginning.
    #[error("rule {start:?}... is {len} bytes, more than the limit of 300")]
    RuleTooLong {
        /// The first characters of the rule.
        start: String,
        /// Its length in bytes.
        len: usize,
    },
    /// Nothing before the `:PORT`.
    #[error("rule {rule:?}: no domain or address before the port")]
    MissingHost {
        /// The rule as given.
        rule: String,
    },
    /// `*` alone, which would mean "everything".
    #[error("rule {rule:?}: a bare \"*\" would allow every name; use mode \"open\" for that")]
    BareWildcard {
        /// The rule as given.
        rule: String,
    },
    /// A `*` other than a whole first label.
    #[error("rule {rule:?}: \"*\" may only be the whole first label, as in \"*.example.com\"")]
    WildcardPosition {
        /// The rule as given.
        rule: String,
    },
    /// `*.` with nothing after it.
    #[error("rule {rule:?}: empty domain after \"*.\"")]
    EmptyWildcard {
        /// The rule as given.
        rule: String,
    },
    /// The domain is not a valid hostname (see [`normalize_name`]), or its
    /// last label is all digits.
    #[error("rule {rule:?}: {domain:?} is not a valid domain name")]
    InvalidDomain {
        /// The rule as given.
        rule: String,
        /// The domain part that failed.
        domain: String,
    },
    /// The address part looks like an IP address or CIDR but does not parse.
    #[error("rule {rule:?}: {addr:?} is not a valid IP address or CIDR")]
    InvalidAddress {
        /// The rule as given.
        rule: String,
        /// The address part that failed.
        addr: String,
    },
    /// A CIDR with bits set below its prefix, such as `10.0.0.1/8`: refused
    /// rather than guessed at.
    #[error("rule {rule:?}: {net} has host bits set; the network is {network}")]
    HostBitsSet {
        /// The rule as given.
        rule: String,
        /// The CIDR as written.
        net: IpNet,
        /// The network it lies in, which was probably meant.
        network: IpNet,
    },
    /// Something other than an IPv6 address or CIDR in brackets.
    #[error(
        "rule {rule:?}: brackets are only for IPv6 addresses and CIDRs, as in \"[2001:db8::1]:443\""
    )]
    BracketsNotIpv6 {
        /// The rule as given.
        rule: String,
    },
    /// `[` without `]`.
    #[error("rule {rule:?}: \"[\" without a matching \"]\"")]
    UnclosedBracket {
        /// The rule as given.
        rule: String,
    },
    /// Text after `]` that is not `:PORT`.
    #[error("rule {rule:?}: expected \":PORT\" after \"]\", found {rest:?}")]
    AfterBracket {
        /// The rule as given.
        rule: String,
        /// What follows the `]`.
        rest: String,
    },
    /// A `:` with nothing after it.
    #[error("rule {rule:?}: empty port after \":\"")]
    EmptyPort {
        /// The rule as given.
        rule: String,
    },
    /// A port that is not a decimal number.
    #[error("rule {rule:?}: port {port:?} is not a number")]
    PortNotNumber {
        /// The rule as given.
        rule: String,
        /// The port text.
        port: String,
    },
    /// A port of 0 or above 65535.
    #[error("rule {rule:?}: port {port} is not in 1..65535")]
    PortOutOfRange {
        /// The rule as given.
        rule: String,
        /// The port text (digits only).
        port: String,
    },
    /// `LOW-HIGH` with LOW above HIGH.
    #[error("rule {rule:?}: port range {low}-{high} runs backwards")]
    PortRangeBackwards {
        /// The rule as given.
        rule: String,
        /// The first port.
        low: u16,
        /// The second port.
        high: u16,
    },
    /// Allow rules given with mode `none` or `open`, where they would mean
    /// nothing (and were probably meant for mode `allow`).
    #[error("mode \"{mode}\" takes no allow rules (got {count})")]
    RulesInMode {
        /// The mode given.
        mode: Mode,
        /// How many rules came with it.
        count: usize,
    },
    /// More than [`MAX_RULES`] rules.
    #[error("{count} allow rules, more than the limit of 256")]
    TooManyRules {
        /// How many rules were given.
        count: usize,
    },
}

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Exactly this normalized name.
    Domain(String),
    /// Any name strictly below this normalized suffix (`*.` + suffix).
    Wildcard(String),
    /// Any address in this network (a host route for an IP rule).
    Net(IpNet),
}

/// An inclusive port range, `low <= high`, both at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    low: u16,
    high: u16,
}

impl Ports {
    fn contains(self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// One allow rule, parsed from text.
///
/// Accepted forms, each optionally followed by `:PORT` or `:LOW-HIGH`
/// (ports 1..=65535, LOW <= HIGH):
///
/// - `DOMAIN`: exactly that name (validated by [`normalize_name`]; a name
///   whose last label is all digits is refused, as it is no hostname).
/// - `*.DOMAIN`: any name strictly below DOMAIN (`*.example.com` matches
///   `a.example.com` and `a.b.example.com`, not `example.com`). `*` may
///   appear only as this whole first label.
/// - `CIDR` or `IP`: an address range, or one address (a /32 or /128).
///   A CIDR with host bits set (`10.0.0.1/8`) is refused. An IPv6 CIDR that
///   embeds IPv4 addresses (`64:ff9b::/96`) is kept as written and matches
///   the addresses it contains; the always-denied check still sees the
///   embedded IPv4 address first.
///
/// IPv6 with a port is bracketed: `[2001:db8::1]:443`. A rule applies to
/// TCP and UDP alike unless it ends in `/tcp` or `/udp` (as in
/// `dns.example:53/udp` or `203.0.113.0/24/tcp`). Surrounding whitespace
/// is ignored.
///
/// The canonical text ([`Rule::text`], `Display`) lowercases names, drops a
/// trailing dot, writes a one-address rule as the bare address
/// (`10.0.0.1/32` becomes `10.0.0.1`), a one-port range as the port
/// (`:80-80` becomes `:80`), brackets IPv6 only when a port follows, and
/// writes the protocol in lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    text: String,
    target: Target,
    ports: Option<Ports>,
    /// The one protocol the rule allows; `None`: both.
    proto: Option<Proto>,
}

impl Rule {
    fn new(target: Target, ports: Option<Ports>, proto: Option<Proto>) -> Self {
        let host = match &target {
            Target::Domain(name) => name.clone(),
            Target::Wildcard(suffix) => format!("*.{suffix}"),
            Target::Net(net) if net.prefix_len() == net.max_prefix_len() => net.addr().to_string(),
            Target::Net(net) => net.to_string(),
        };
        let text = match ports {
            None => host,
            Some(p) if matches!(target, Target::Net(IpNet::V6(_))) => format!("[{host}]:{p}"),
            Some(p) => format!("{host}:{p}"),
        };
        let text = match proto {
            Some(p) => format!("{text}/{p}"),
            None => text,
        };
        Self {
            text,
            target,
            ports,
            proto,
        }
    }

    /// The canonical text of the rule, as reasons and [`Policy::spec`] show it.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn is_domain(&self) -> bool {
        matches!(self.target, Target::Domain(_) | Target::Wildcard(_))
    }

    /// Whether this rule names `name` (already normalized), at any port.
    fn names(&self, name: &str) -> bool {
        match &self.target {
            Target::Domain(d) => d == name,
            Target::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            Target::Net(_) => false,
        }
    }

    /// Whether this is a CIDR/IP rule containing `addr` as given or the IPv4
    /// address it embeds.
    fn covers(&self, addr: IpAddr) -> bool {
        match &self.target {
            Target::Net(net) => net.contains(&addr) || net.contains(&unwrap_ipv4(addr)),
            Target::Domain(_) | Target::Wildcard(_) => false,
        }
    }

    /// Whether the rule's protocol and ports allow `port` over `proto`.
    /// UDP 443 (QUIC) needs a port range that names 443; a portless rule
    /// does not.
    fn allows_port(&self, proto: Proto, port: u16) -> bool {
        if self.proto.is_some_and(|p| p != proto) {
            return false;
        }
        match self.ports {
            Some(p) => p.contains(port),
            None => !(proto == Proto::Udp && port == QUIC_PORT),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Rule {
    type Err = PolicyError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.len() > MAX_RULE_LEN {
            return Err(PolicyError::RuleTooLong {
                start: input.chars().take(40).collect(),
                len: input.len(),
            });
        }
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PolicyError::EmptyRule);
        }
        let (rest, proto) = split_proto(trimmed);
        if rest.is_empty() {
            return Err(PolicyError::MissingHost { rule: input.into() });
        }
        let (host, ports, bracketed) = split_host_ports(input, rest)?;
        let ports = ports.map(|p| parse_ports(input, p)).transpose()?;
        let target = parse_target(input, host, bracketed)?;
        Ok(Self::new(target, ports, proto))
    }
}

/// Splits a trailing `/tcp` or `/udp` (any case) off `s`. A CIDR's `/N`
/// is digits, so it never reads as a protocol.
fn split_proto(s: &str) -> (&str, Option<Proto>) {
    for (suffix, proto) in [("/tcp", Proto::Tcp), ("/udp", Proto::Udp)] {
        if let Some(at) = s.len().checked_sub(suffix.len())
            && s.is_char_boundary(at)
            && s.get(at..).is_some_and(|t| t.eq_ignore_ascii_case(suffix))
        {
            return (s.get(..at).unwrap_or_default(), Some(proto));
        }
    }
    (s, None)
}

/// Splits `s` into its host part, its port part (if a `:` introduces one)
/// and whether the host was bracketed. A bare host with two or more colons
/// is an IPv6 address or CIDR without a port.
fn split_host_ports<'a>(
    rule: &str,
    s: &'a str,
) -> Result<(&'a str, Option<&'a str>, bool), PolicyError> {
    if let Some(rest) = s.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return Err(PolicyError::UnclosedBracket { rule: rule.into() });
        };
        if after.is_empty() {
            return Ok((inner, None, true));
        }
        let Some(ports) = after.strip_prefix(':') else {
            return Err(PolicyError::AfterBracket {
                rule: rule.into(),
                rest: after.into(),
            });
        };
        return Ok((inner, Some(ports), true));
    }
    match s.split_once(':') {
        Some((host, ports)) if !ports.contains(':') => Ok((host, Some(ports), false)),
        _ => Ok((s, None, false)),
    }
}

/// Parses `PORT` or `LOW-HIGH`.
fn parse_ports(rule: &str, s: &str) -> Result<Ports, PolicyError> {
    if s.is_empty() {
        return Err(PolicyError::EmptyPort { rule: rule.into() });
    }
    let (low, high) = match s.split_once('-') {
        Some((low, high)) => (parse_port(rule, low)?, parse_port(rule, high)?),
        None => {
            let port = parse_port(rule, s)?;
            (port, port)
        }
    };
    if low > high {
        return Err(PolicyError::PortRangeBackwards {
            rule: rule.into(),
            low,
            high,
        });
    }
    Ok(Ports { low, high })
}

fn parse_port(rule: &str, s: &str) -> Result<u16, PolicyError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PolicyError::PortNotNumber {
            rule: rule.into(),
            port: s.into(),
        });
    }
    match s.parse::<u16>() {
        Ok(port) if port >= 1 => Ok(port),
        // All digits, so the only failures are 0 and values above 65535.
        _ => Err(PolicyError::PortOutOfRange {
            rule: rule.into(),
            port: s.into(),
        }),
    }
}

/// Parses the host part: an address or CIDR, a wildcard or a domain.
fn parse_target(rule: &str, host: &str, bracketed: bool) -> Result<Target, PolicyError> {
    if host.is_empty() {
        return Err(PolicyError::MissingHost { rule: rule.into() });
    }
    let net = if host.contains('/') {
        let net = host
            .parse::<IpNet>()
            .map_err(|_| PolicyError::InvalidAddress {
                rule: rule.into(),
                addr: host.into(),
            })?;
        if net.trunc() != net {
            return Err(PolicyError::HostBitsSet {
                rule: rule.into(),
                net,
                network: net.trunc(),
            });
        }
        Some(net)
    } else {
        host.parse::<IpAddr>().ok().map(IpNet::from)
    };
    if let Some(net) = net {
        if bracketed && matches!(net, IpNet::V4(_)) {
            return Err(PolicyError::BracketsNotIpv6 { rule: rule.into() });
        }
        return Ok(Target::Net(net));
    }
    if host.contains(':') {
        return Err(PolicyError::InvalidAddress {
            rule: rule.into(),
            addr: host.into(),
        });
    }
    if bracketed {
        return Err(PolicyError::BracketsNotIpv6 { rule: rule.into() });
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // Such as "1.2.3.256" or "10.1": meant as an address, and no name.
        return Err(PolicyError::InvalidAddress {
            rule: rule.into(),
            addr: host.into(),
        });
    }
    if host == "*" {
        return Err(PolicyError::BareWildcard { rule: rule.into() });
    }
    let (domain, wildcard) = match host.strip_prefix("*.") {
        Some("") => return Err(PolicyError::EmptyWildcard { rule: rule.into() }),
        Some(rest) => (rest, true),
        None => (host, false),
    };
    if domain.contains('*') {
        return Err(PolicyError::WildcardPosition { rule: rule.into() });
    }
    let invalid = || PolicyError::InvalidDomain {
        rule: rule.into(),
        domain: domain.into(),
    };
    let name = normalize_name(domain).ok_or_else(invalid)?;
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    Ok(if wildcard {
        Target::Wildcard(name)
    } else {
        Target::Domain(name)
    })
}

/// A decision and what made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the name, answer or flow is allowed.
    pub allowed: bool,
    /// The text of the rule that allowed it, or a named reason such as
    /// `"default deny"`, `"network none"`,
    /// `"always denied: cloud metadata (169.254.0.0/16)"` or
    /// `"open: public address"`.
    pub reason: String,
}

impl Decision {
    fn allow(reason: impl Into<String>) -> Self {
        Self {
            allowed: true,
            reason: reason.into(),
        }
    }

    fn deny(reason: impl Into<String>) -> Self {
        Self {
            allowed: false,
            reason: reason.into(),
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    rules: Vec<Rule>,
}

impl Policy {
    /// Validates a spec. Refuses allow rules in modes `none` and `open`, more
    /// than [`MAX_RULES`] rules, and any rule that does not parse (the first
    /// such rule's error). Mode `allow` with no rules is valid: a network on
    /// which everything is denied. A rule equal to an earlier one (after
    /// canonicalization) is dropped.
    pub fn from_spec(spec: &NetworkSpec) -> Result<Self, PolicyError> {
        let count = spec.allow.len();
        if spec.mode != Mode::Allow && count > 0 {
            return Err(PolicyError::RulesInMode {
                mode: spec.mode,
                count,
            });
        }
        if count > MAX_RULES {
            return Err(PolicyError::TooManyRules { count });
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(count);
        for text in &spec.allow {
            let rule = text.parse::<Rule>()?;
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
        Ok(Self {
            mode: spec.mode,
            rules,
        })
    }

    /// The wire form, with canonical rule texts.
    pub fn spec(&self) -> NetworkSpec {
        NetworkSpec {
            mode: self.mode,
            allow: self.rules.iter().map(|r| r.text.clone()).collect(),
        }
    }

    /// How much network the sandbox has.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The allow rules, in the order given, without duplicates.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether the resolver may look `name` up and answer it: in mode
    /// `open`, any valid name; in mode `allow`, a name that a domain rule
    /// (exact or wildcard, any port) names. The reason is the deciding
    /// rule's text, `"open"`, or why not.
    pub fn name_decision(&self, name: &str) -> Decision {
        let name = match (self.mode, normalize_name(name)) {
            (Mode::None, _) => return Decision::deny("network none"),
            (_, None) => return Decision::deny("invalid name"),
            (Mode::Open, Some(_)) => return Decision::allow("open"),
            (Mode::Allow, Some(name)) => name,
        };
        match self.rules.iter().find(|r| r.names(&name)) {
            Some(rule) => Decision::allow(rule.text.clone()),
            None => Decision::deny(format!("default deny: no rule names {name}")),
        }
    }

    /// Whether `addr`, from an upstream answer for `name`, may be handed to
    /// the sandbox. The name must pass [`Policy::name_decision`] (else that
    /// decision is returned). An address in an always-denied range (judged
    /// as the IPv4 address it embeds, if any) is refused unless the operator
    /// made the range allowable and a CIDR/IP rule of this policy covers the
    /// address; an allowed name never makes a private address reachable.
    pub fn answer_decision(&self, name: &str, addr: IpAddr, ranges: &Ranges) -> Decision {
        let by_name = self.name_decision(name);
        if !by_name.allowed {
            return by_name;
        }
        let Some(label) = ranges.denied(addr) else {
            return by_name;
        };
        if self.mode == Mode::Allow
            && ranges.allowable(addr)
            && let Some(rule) = self.rules.iter().find(|r| r.covers(addr))
        {
            return Decision::allow(rule.text.clone());
        }
        Decision::deny(format!(
            "answer in always-denied range: {label}{}",
            embeds_note(addr)
        ))
    }

    /// Whether a new flow to `dst`:`port` over `proto` may be opened.
    /// `pinned` is the name this sandbox's resolver handed out `dst` for, if
    /// it ever did.
    ///
    /// In order: an IPv6 `dst` that embeds an IPv4 address is judged as
    /// that address (reasons say so); mode `none` denies; an always-denied
    /// address is allowed only if the operator made its range allowable and,
    /// in mode `allow`, a CIDR/IP rule covers it at this port; mode `open`
    /// allows any other address; mode `allow` allows a CIDR/IP rule covering
    /// `dst`, or a domain rule naming `pinned`, at this port and protocol.
    /// A rule's text is the reason when it allowed the flow.
    pub fn flow_decision(
        &self,
        proto: Proto,
        dst: IpAddr,
        port: u16,
        pinned: Option<&str>,
        ranges: &Ranges,
    ) -> Decision {
        if self.mode == Mode::None {
            return Decision::deny("network none");
        }
        let via = embeds_note(dst);
        if let Some(label) = ranges.denied(dst) {
            if self.mode == Mode::Allow
                && ranges.allowable(dst)
                && let Some(rule) = self.net_rule(proto, dst, port)
            {
                return Decision::allow(rule.text.clone());
            }
            return Decision::deny(format!("always denied: {label}{via}"));
        }
        if self.mode == Mode::Open {
            return Decision::allow(format!("open: public address{via}"));
        }
        if let Some(rule) = self.net_rule(proto, dst, port) {
            return Decision::allow(rule.text.clone());
        }
        let pinned = pinned.and_then(normalize_name);
        if let Some(name) = &pinned
            && let Some(rule) = self.domain_rule(proto, name, port)
        {
            return Decision::allow(rule.text.clone());
        }
        if pinned.is_none()
            && self
                .rules
                .iter()
                .any(|r| r.is_domain() && r.allows_port(proto, port))
        {
            return Decision::deny(format!(
                "not pinned: this sandbox never resolved an allowed name to {dst}{via}"
            ));
        }
        if proto == Proto::Udp && port == QUIC_PORT {
            // Would TCP to the same place have been allowed? Then say why UDP is not.
            let tcp_ok = self.net_rule(Proto::Tcp, dst, port).is_some()
                || pinned
                    .as_deref()
                    .is_some_and(|n| self.domain_rule(Proto::Tcp, n, port).is_some());
            if tcp_ok {
                return Decision::deny(format!(
                    "default deny: udp 443 (QUIC) needs a rule that names port 443{via}"
                ));
            }
        }
        Decision::deny(format!("default deny{via}"))
    }

    fn net_rule(&self, proto: Proto, addr: IpAddr, port: u16) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.covers(addr) && r.allows_port(proto, port))
    }

    fn domain_rule(&self, proto: Proto, name: &str, port: u16) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.names(name) && r.allows_port(proto, port))
    }
}

impl TryFrom<&NetworkSpec> for Policy {
    type Error = PolicyError;

    fn try_from(spec: &NetworkSpec) -> Result<Self, Self::Error> {
        Self::from_spec(spec)
    }
}

/// The built-in always-denied ranges, each with its label.
const BUILTIN: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("169.254.0.0/16", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("10.0.2.0/24", "sandbox network"),
    ("fd00:a1::/64", "sandbox network"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
    ("::/128", "unspecified"),
];

/// Address ranges that are always denied, and the operator's exceptions.
///
/// When an address falls in several ranges, the most specific one labels it
/// (`10.0.2.15` is "sandbox network", not "private (RFC 1918)").
#[derive(Debug, Clone)]
pub struct Ranges {
    denied: Vec<(IpNet, String)>,
    allowable: Vec<IpNet>,
}

impl Ranges {
    /// The built-in always-denied set: `0.0.0.0/8`; loopback `127.0.0.0/8`
    /// and `::1/128`; cloud metadata `169.254.0.0/16` (all of IPv4
    /// link-local) and `fd00:ec2::254/128`; RFC 1918 `10.0.0.0/8`,
    /// `172.16.0.0/12`, `192.168.0.0/16`; the gateway's sandbox-side network
    /// `10.0.2.0/24` and `fd00:a1::/64`; CGNAT `100.64.0.0/10`; ULA `fc00::/7`; link-local
    /// `fe80::/10`; deprecated site-local `fec0::/10`; multicast
    /// `224.0.0.0/4` and `ff00::/8`; reserved `240.0.0.0/4`; broadcast
    /// `255.255.255.255/32`; unspecified `::/128`.
    pub fn builtin() -> Self {
        let denied = BUILTIN
            .iter()
            .filter_map(|(net, label)| Some((net.parse::<IpNet>().ok()?, (*label).to_string())))
            .collect();
        Self {
            denied,
            allowable: Vec::new(),
        }
    }

    /// Adds the host's own interface addresses, always denied, labelled
    /// "host address".
    pub fn with_host_addrs(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.denied.extend(
            addrs
                .into_iter()
                .map(|a| (IpNet::from(a), "host address".to_string())),
        );
        self
    }

    /// Adds the operator's exceptions (from brokerd.toml): addresses in these
    /// networks may be reached, but only by a sandbox whose policy names
    /// them by a CIDR/IP rule. Host bits are ignored.
    pub fn with_allowable(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.allowable.extend(nets.into_iter().map(|n| n.trunc()));
        self
    }

    /// The label of the always-denied range `addr` falls in, with the range,
    /// such as `"cloud metadata (169.254.0.0/16)"`. An IPv6 address that
    /// embeds an IPv4 address is checked as that IPv4 address (and as
    /// itself, so a host's own 6to4 address stays denied).
    pub fn denied(&self, addr: IpAddr) -> Option<String> {
        let inner = unwrap_ipv4(addr);
        self.denied
            .iter()
            .filter(|(net, _)| net.contains(&inner) || net.contains(&addr))
            .min_by_key(|(net, _)| Reverse(net.prefix_len()))
            .map(|(net, label)| format!("{label} ({net})"))
    }

    /// Whether every form of `addr` that is denied (itself, the IPv4
    /// address it embeds) lies in an allowable network.
    fn allowable(&self, addr: IpAddr) -> bool {
        [unwrap_ipv4(addr), addr].into_iter().all(|a| {
            let denied = self.denied.iter().any(|(net, _)| net.contains(&a));
            !denied || self.allowable.iter().any(|net| net.contains(&a))
        })
    }
}

/// The IPv4 address an IPv6 address embeds, if it is of a form that reaches
/// IPv4: IPv4-mapped `::ffff:0:0/96`; IPv4-compatible `::/96` (except `::`
/// and `::1`); NAT64 `64:ff9b::/96` and `64:ff9b:1::/48` (the last 32 bits);
/// 6to4 `2002::/16` (bits 16..48); Teredo `2001::/32` (the client address:
/// the last 32 bits, inverted).
pub fn embedded_ipv4(addr: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = addr.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match addr.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(last),
        [0, 0, 0, 0, 0, 0, _, _] if !addr.is_unspecified() && !addr.is_loopback() => Some(last),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => Some(last),
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        [0x2001, 0, ..] => Some(Ipv4Addr::from(!u32::from(last))),
        _ => None,
    }
}

/// `addr`, or the IPv4 address it embeds.
fn unwrap_ipv4(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// `" (ADDR embeds IPV4)"` for reasons, or nothing.
fn embeds_note(addr: IpAddr) -> String {
    let inner = unwrap_ipv4(addr);
    if inner == addr {
        String::new()
    } else {
        format!(" ({addr} embeds {inner})")
    }
}

/// Normalizes a DNS name: ASCII lowercase, one trailing dot removed. `None`
/// if it is not a valid hostname: empty, longer than 253 bytes, a label
/// empty or longer than 63 bytes, a byte other than `[a-z0-9-_]` (after
/// lowercasing), or a label starting or ending with `-`.
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let name = name.to_ascii_lowercase();
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    name.split('.').all(valid_label).then_some(name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn rule_err(s: &str) -> String {
        match s.parse::<Rule>() {
            Ok(r) => panic!("{s} parsed as {r}"),
            Err(e) => e.to_string(),
        }
    }

    fn allow(rules: &[&str]) -> Policy {
        Policy::from_spec(&NetworkSpec {
            mode: Mode::Allow,
            allow: rules.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    fn mode(mode: Mode) -> Policy {
        Policy::from_spec(&NetworkSpec {
            mode,
            allow: vec![],
        })
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ranges() -> Ranges {
        Ranges::builtin()
    }

    fn tcp(p: &Policy, dst: &str, port: u16, pinned: Option<&str>) -> Decision {
        p.flow_decision(Proto::Tcp, ip(dst), port, pinned, &ranges())
    }

    fn udp(p: &Policy, dst: &str, port: u16, pinned: Option<&str>) -> Decision {
        p.flow_decision(Proto::Udp, ip(dst), port, pinned, &ranges())
    }

    #[test]
    fn rules_parse_to_canonical_text() {
        for (given, canonical) in [
            ("pypi.org", "pypi.org"),
            ("PyPI.Org.", "pypi.org"),
            ("  pypi.org  ", "pypi.org"),
            ("*.pythonhosted.org:443", "*.pythonhosted.org:443"),
            ("*.Example.COM.:80-90", "*.example.com:80-90"),
            ("example.com:80-80", "example.com:80"),
            ("_srv.example.com", "_srv.example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("203.0.113.7", "203.0.113.7"),
            ("203.0.113.7/32", "203.0.113.7"),
            ("203.0.113.7:443", "203.0.113.7:443"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.0.0.0/8:1-65535", "10.0.0.0/8:1-65535"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:DB8::1", "2001:db8::1"),
            ("2001:db8::1/128", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("[2001:db8::/32]:80-90", "[2001:db8::/32]:80-90"),
            ("64:ff9b::/96", "64:ff9b::/96"),
            ("::ffff:0:0/96", "::ffff:0.0.0.0/96"),
        ] {
            let r = rule(given);
            assert_eq!(r.text(), canonical, "{given}");
            assert_eq!(r.to_string(), canonical, "{given}");
            // The canonical text parses back to the same rule.
            assert_eq!(rule(canonical), r, "{given}");
        }
    }

    #[test]
    fn bad_rules_name_what_is_wrong() {
        assert_eq!(rule_err("*."), r#"rule "*.": empty domain after "*.""#);
        assert_eq!(
            rule_err("x:70000"),
            r#"rule "x:70000": port 70000 is not in 1..65535"#
        );
        assert_eq!(rule_err("x:0"), r#"rule "x:0": port 0 is not in 1..65535"#);
        assert_eq!(
            rule_err("x:99999999999999999999"),
            r#"rule "x:99999999999999999999": port 99999999999999999999 is not in 1..65535"#
        );
        assert_eq!(rule_err("x:"), r#"rule "x:": empty port after ":""#);
        assert_eq!(
            rule_err("x:https"),
            r#"rule "x:https": port "https" is not a number"#
        );
        assert_eq!(
            rule_err("x:+80"),
            r#"rule "x:+80": port "+80" is not a number"#
        );
        assert_eq!(
            rule_err("x:80-"),
            r#"rule "x:80-": port "" is not a number"#
        );
        assert_eq!(
            rule_err("x:90-80"),
            r#"rule "x:90-80": port range 90-80 runs backwards"#
        );
        assert_eq!(
            rule_err("*"),
            r#"rule "*": a bare "*" would allow every name; use mode "open" for that"#
        );
        assert_eq!(
            rule_err("10.0.0.1/8"),
            r#"rule "10.0.0.1/8": 10.0.0.1/8 has host bits set; the network is 10.0.0.0/8"#
        );
        assert_eq!(
            rule_err("[10.0.0.1]:443"),
            r#"rule "[10.0.0.1]:443": brackets are only for IPv6 addresses and CIDRs, as in "[2001:db8::1]:443""#
        );
        assert_eq!(rule_err(""), "empty rule");
        assert_eq!(rule_err("   "), "empty rule");
        assert_eq!(
            rule_err("bad host.com"),
            r#"rule "bad host.com": "bad host.com" is not a valid domain name"#
        );
        // Control characters are escaped, not written into logs raw.
        assert_eq!(
            rule_err("a\nb"),
            r#"rule "a\nb": "a\nb" is not a valid domain name"#
        );
        let long = "a".repeat(301);
        assert_eq!(
            rule_err(&long),
            format!(
                "rule {:?}... is 301 bytes, more than the limit of 300",
                "a".repeat(40)
            )
        );
    }

    #[test]
    fn bad_rules_are_refused() {
        for bad in [
            "*:443",
            "*.*.example.com",
            "a.*.example.com",
            "*example.com",
            "example.*",
            "**.example.com",
            ":443",
            "-example.com",
            "example-.com",
            "ex ample.com",
            "example..com",
            "bücher.example",
            "1.2.3.256",
            "1.2.3",
            "01.2.3.4",
            "foo.123",
            "10.0.0.0/33",
            "10.0.0.0/",
            "2001:db8::/129",
            "2001:db8::1:443:",
            "2001:zz::1",
            "[2001:db8::1",
            "[2001:db8::1]443",
            "[example.com]:443",
            "[]:443",
            "example.com:80:90",
            "example.com:1-2-3",
            "fe80::1%eth0",
            &format!("{}.com", "a".repeat(64)),
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?} parsed");
        }
        // 300 bytes is allowed; 301 is not.
        let name = format!(
            "{}.{}.{}.{}.com",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(56)
        );
        assert!(name.len() <= 253);
        let at_limit = format!("{name}:{}", "1".repeat(300 - name.len() - 1));
        assert_eq!(at_limit.len(), 300);
        assert!(matches!(
            at_limit.parse::<Rule>(),
            Err(PolicyError::PortOutOfRange { .. })
        ));
        assert!(matches!(
            format!("{at_limit}1").parse::<Rule>(),
            Err(PolicyError::RuleTooLong { len: 301, .. })
        ));
    }

    #[test]
    fn normalize_name_validates_hostnames() {
        assert_eq!(normalize_name("PyPI.org.").as_deref(), Some("pypi.org"));
        assert_eq!(
            normalize_name("a_b.example").as_deref(),
            Some("a_b.example")
        );
        assert_eq!(normalize_name("localhost").as_deref(), Some("localhost"));
        for bad in [
            "",
            ".",
            "..",
            "example.com..",
            ".example.com",
            "a..b",
            "-a.com",
            "a-.com",
            "a b.com",
            "a*.com",
            "é.com",
            "a/b",
        ] {
            assert_eq!(normalize_name(bad), None, "{bad:?}");
        }
        let label63 = "a".repeat(63);
        assert!(normalize_name(&format!("{label63}.com")).is_some());
        assert!(normalize_name(&format!("{}a.com", label63)).is_none());
        let long = [label63.as_str(); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(normalize_name(&long).is_none());
        let name253 = format!("{}.{}.{}.{}", label63, label63, label63, "a".repeat(61));
        assert_eq!(name253.len(), 253);
        assert!(normalize_name(&name253).is_some());
        assert!(normalize_name(&format!("{name253}.")).is_some());
    }

    #[test]
    fn wildcards_match_names_strictly_below() {
        let p = allow(&["*.example.com"]);
        assert!(p.name_decision("a.example.com").allowed);
        assert!(p.name_decision("a.b.example.com").allowed);
        assert!(p.name_decision("A.Example.COM.").allowed);
        assert!(!p.name_decision("example.com").allowed);
        assert!(!p.name_decision("badexample.com").allowed);
        assert!(!p.name_decision("a.example.com.evil").allowed);
        assert!(!p.name_decision("example.com.evil").allowed);

        let p = allow(&["example.com"]);
        assert!(p.name_decision("example.com").allowed);
        assert!(!p.name_decision("www.example.com").allowed);
    }

    #[test]
    fn name_decisions_by_mode() {
        let d = mode(Mode::None).name_decision("pypi.org");
        assert_eq!(d, Decision::deny("network none"));
        let d = mode(Mode::Open).name_decision("pypi.org");
        assert_eq!(d, Decision::allow("open"));
        let p = allow(&["PyPI.org:443", "*.pythonhosted.org"]);
        assert_eq!(p.name_decision("pypi.org"), Decision::allow("pypi.org:443"));
        assert_eq!(
            p.name_decision("files.pythonhosted.org"),
            Decision::allow("*.pythonhosted.org")
        );
        assert_eq!(
            p.name_decision("Evil.com."),
            Decision::deny("default deny: no rule names evil.com")
        );
        assert_eq!(p.name_decision("bad name"), Decision::deny("invalid name"));
        assert_eq!(
            mode(Mode::Open).name_decision(""),
            Decision::deny("invalid name")
        );
        // IP rules never make a name resolvable.
        let p = allow(&["203.0.113.0/24"]);
        assert!(!p.name_decision("example.com").allowed);
    }

    #[test]
    fn port_ranges() {
        let p = allow(&["203.0.113.7:80-90", "198.51.100.1:443", "192.0.2.1"]);
        assert!(tcp(&p, "203.0.113.7", 80, None).allowed);
        assert!(tcp(&p, "203.0.113.7", 85, None).allowed);
        assert!(tcp(&p, "203.0.113.7", 90, None).allowed);
        assert!(!tcp(&p, "203.0.113.7", 79, None).allowed);
        assert!(!tcp(&p, "203.0.113.7", 91, None).allowed);
        assert!(tcp(&p, "198.51.100.1", 443, None).allowed);
        assert!(!tcp(&p, "198.51.100.1", 444, None).allowed);
        assert!(tcp(&p, "192.0.2.1", 1, None).allowed);
        assert!(tcp(&p, "192.0.2.1", 65535, None).allowed);
        assert!(udp(&p, "192.0.2.1", 53, None).allowed);
        assert_eq!(
            tcp(&p, "203.0.113.7", 85, None),
            Decision::allow("203.0.113.7:80-90")
        );
    }

    #[test]
    fn udp_443_needs_a_rule_naming_port_443() {
        let p = allow(&["192.0.2.1", "198.51.100.1:443", "203.0.113.7:400-500"]);
        assert!(tcp(&p, "192.0.2.1", 443, None).allowed);
        assert_eq!(
            udp(&p, "192.0.2.1", 443, None),
            Decision::deny("default deny: udp 443 (QUIC) needs a rule that names port 443")
        );
        assert!(udp(&p, "192.0.2.1", 444, None).allowed);
        assert!(udp(&p, "198.51.100.1", 443, None).allowed);
        assert!(udp(&p, "203.0.113.7", 443, None).allowed);

        let p = allow(&["example.com", "quic.example:443"]);
        assert!(tcp(&p, "192.0.2.1", 443, Some("example.com")).allowed);
        assert!(!udp(&p, "192.0.2.1", 443, Some("example.com")).allowed);
        assert_eq!(
            udp(&p, "192.0.2.1", 443, Some("quic.example")),
            Decision::allow("quic.example:443")
        );
    }

    #[test]
    fn a_protocol_suffix_limits_a_rule_to_that_protocol() {
        assert_eq!(rule("DNS.example:53/UDP").text(), "dns.example:53/udp");
        assert_eq!(rule(" 203.0.113.0/24/tcp ").text(), "203.0.113.0/24/tcp");
        assert_eq!(
            rule("[2001:db8::1]:443/udp").text(),
            "[2001:db8::1]:443/udp"
        );
        assert_eq!(rule("192.0.2.0/24").text(), "192.0.2.0/24");
        assert!("/udp".parse::<Rule>().is_err());
        assert!("example.com/icmp".parse::<Rule>().is_err());
        let p = allow(&[
            "203.0.113.0/24/tcp",
            "198.51.100.1:53/udp",
            "quic.example:443/udp",
        ]);
        assert!(tcp(&p, "203.0.113.7", 22, None).allowed);
        assert!(!udp(&p, "203.0.113.7", 22, None).allowed);
        assert!(udp(&p, "198.51.100.1", 53, None).allowed);
        assert!(!tcp(&p, "198.51.100.1", 53, None).allowed);
        assert_eq!(
            udp(&p, "192.0.2.1", 443, Some("quic.example")),
            Decision::allow("quic.example:443/udp")
        );
        assert!(!tcp(&p, "192.0.2.1", 443, Some("quic.example")).allowed);
    }

    #[test]
    fn embedded_ipv4_forms() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let v4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(embedded_ipv4(v6("::ffff:127.0.0.1")), v4("127.0.0.1"));
        assert_eq!(embedded_ipv4(v6("::10.0.0.1")), v4("10.0.0.1"));
        assert_eq!(embedded_ipv4(v6("::2")), v4("0.0.0.2"));
        assert_eq!(embedded_ipv4(v6("::")), None);
        assert_eq!(embedded_ipv4(v6("::1")), None);
        assert_eq!(
            embedded_ipv4(v6("64:ff9b::a9fe:a9fe")),
            v4("169.254.169.254")
        );
        assert_eq!(embedded_ipv4(v6("64:ff9b:1::a00:1")), v4("10.0.0.1"));
        assert_eq!(
            embedded_ipv4(v6("64:ff9b:1:2:3:4:c000:201")),
            v4("192.0.2.1")
        );
        assert_eq!(embedded_ipv4(v6("64:ff9b:2::a00:1")), None);
        assert_eq!(embedded_ipv4(v6("64:ff9b:0:1::a00:1")), None);
        assert_eq!(embedded_ipv4(v6("2002:a9fe:a9fe::")), v4("169.254.169.254"));
        assert_eq!(embedded_ipv4(v6("2002:c000:201:1::5")), v4("192.0.2.1"));
        // Teredo: server 65.54.227.120, client 127.0.0.1 stored inverted.
        assert_eq!(
            embedded_ipv4(v6("2001:0:4136:e378:8000:63bf:80ff:fffe")),
            v4("127.0.0.1")
        );
        assert_eq!(embedded_ipv4(v6("2001:db8::1")), None);
        assert_eq!(embedded_ipv4(v6("2606:4700::1111")), None);
        assert_eq!(embedded_ipv4(v6("::ffff:0:a00:1")), None);
    }

    #[test]
    fn every_builtin_range_is_denied_even_in_open_mode() {
        let open = mode(Mode::Open);
        let r = ranges();
        for (addr, label) in [
            ("127.0.0.1", "loopback (127.0.0.0/8)"),
            ("127.255.255.254", "loopback (127.0.0.0/8)"),
            ("::1", "loopback (::1/128)"),
            ("0.0.0.0", "this network (0.0.0.0/8)"),
            ("0.1.2.3", "this network (0.0.0.0/8)"),
            ("169.254.169.254", "cloud metadata (169.254.0.0/16)"),
            ("169.254.1.1", "cloud metadata (169.254.0.0/16)"),
            ("fd00:ec2::254", "cloud metadata (fd00:ec2::254/128)"),
            ("fd00:ec2::253", "unique local (ULA) (fc00::/7)"),
            ("10.1.2.3", "private (RFC 1918) (10.0.0.0/8)"),
            ("172.16.0.1", "private (RFC 1918) (172.16.0.0/12)"),
            ("172.31.255.255", "private (RFC 1918) (172.16.0.0/12)"),
            ("192.168.1.1", "private (RFC 1918) (192.168.0.0/16)"),
            ("10.0.2.2", "sandbox network (10.0.2.0/24)"),
            ("100.64.0.1", "carrier-grade NAT (100.64.0.0/10)"),
            ("100.100.100.200", "carrier-grade NAT (100.64.0.0/10)"),
            ("fd12:3456::1", "unique local (ULA) (fc00::/7)"),
            ("fc00::1", "unique local (ULA) (fc00::/7)"),
            ("fe80::1", "link-local (fe80::/10)"),
            ("fec0::1", "site-local (deprecated) (fec0::/10)"),
            ("224.0.0.251", "multicast (224.0.0.0/4)"),
            ("239.255.255.250", "multicast (224.0.0.0/4)"),
            ("ff02::fb", "multicast (ff00::/8)"),
            ("240.0.0.1", "reserved (240.0.0.0/4)"),
            ("255.255.255.255", "broadcast (255.255.255.255/32)"),
            ("::", "unspecified (::/128)"),
        ] {
            assert_eq!(r.denied(ip(addr)).as_deref(), Some(label), "{addr}");
            assert_eq!(
                open.flow_decision(Proto::Tcp, ip(addr), 80, None, &r),
                Decision::deny(format!("always denied: {label}")),
                "{addr}"
            );
        }
        for public in [
            "1.1.1.1",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "169.253.255.255",
            "2606:4700::1111",
        ] {
            assert_eq!(r.denied(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn every_builtin_range_parses() {
        // A typo in BUILTIN must not silently drop a denied range.
        assert_eq!(Ranges::builtin().denied.len(), BUILTIN.len());
    }

    #[test]
    fn embedded_ipv4_is_judged_as_ipv4() {
        let open = mode(Mode::Open);
        let r = ranges();
        assert_eq!(
            open.flow_decision(Proto::Tcp, ip("64:ff9b::a9fe:a9fe"), 80, None, &r),
            Decision::deny(
                "always denied: cloud metadata (169.254.0.0/16) \
                 (64:ff9b::a9fe:a9fe embeds 169.254.169.254)"
            )
        );
        for addr in [
            "2002:a9fe:a9fe::",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "::ffff:10.0.2.2",
        ] {
            let d = open.flow_decision(Proto::Tcp, ip(addr), 443, None, &r);
            assert!(!d.allowed, "{addr}: {d:?}");
            assert!(d.reason.starts_with("always denied: "), "{addr}: {d:?}");
            assert!(d.reason.contains(" embeds "), "{addr}: {d:?}");
        }
        assert_eq!(
            open.flow_decision(Proto::Tcp, ip("::ffff:1.1.1.1"), 443, None, &r),
            Decision::allow("open: public address (::ffff:1.1.1.1 embeds 1.1.1.1)")
        );
        // An allow-mode IPv4 rule reaches its address through NAT64 too,
        // and an IPv6 rule written in embedding form matches as written.
        let p = allow(&["1.1.1.1:443"]);
        assert!(tcp(&p, "64:ff9b::101:101", 443, None).allowed);
        assert!(!tcp(&p, "64:ff9b::101:101", 80, None).allowed);
        let p = allow(&["[64:ff9b::/96]:53"]);
        assert!(udp(&p, "64:ff9b::808:808", 53, None).allowed);
        assert!(!udp(&p, "64:ff9b::a9fe:a9fe", 53, None).allowed);
    }

    #[test]
    fn host_addresses_are_denied() {
        let r = ranges().with_host_addrs([ip("203.0.113.5"), ip("10.0.2.1"), ip("2001:db8::5")]);
        assert_eq!(
            r.denied(ip("203.0.113.5")).as_deref(),
            Some("host address (203.0.113.5/32)")
        );
        // The most specific range labels the address.
        assert_eq!(
            r.denied(ip("10.0.2.1")).as_deref(),
            Some("host address (10.0.2.1/32)")
        );
        assert_eq!(
            r.denied(ip("::ffff:203.0.113.5")).as_deref(),
            Some("host address (203.0.113.5/32)")
        );
        assert_eq!(r.denied(ip("203.0.113.6")), None);
        let p = allow(&["203.0.113.0/24", "2001:db8::/32"]);
        assert!(
            !p.flow_decision(Proto::Tcp, ip("203.0.113.5"), 22, None, &r)
                .allowed
        );
        assert!(
            !p.flow_decision(Proto::Tcp, ip("2001:db8::5"), 22, None, &r)
                .allowed
        );
        assert!(
            p.flow_decision(Proto::Tcp, ip("203.0.113.6"), 22, None, &r)
                .allowed
        );
        assert!(
            !mode(Mode::Open)
                .flow_decision(Proto::Udp, ip("203.0.113.5"), 53, None, &r)
                .allowed
        );
        // A host's own 6to4 address stays denied as itself.
        let r = ranges().with_host_addrs([ip("2002:c000:201::1")]);
        assert!(r.denied(ip("2002:c000:201::1")).is_some());
    }

    #[test]
    fn operator_allowable_needs_an_explicit_rule() {
        let r = ranges().with_allowable([net("10.20.0.0/16"), net("127.0.0.1/32")]);
        let explicit = allow(&["10.20.30.0/24:5432", "example.com"]);
        assert_eq!(
            explicit.flow_decision(Proto::Tcp, ip("10.20.30.40"), 5432, None, &r),
            Decision::allow("10.20.30.0/24:5432")
        );
        // Wrong port: still denied, as always-denied.
        assert_eq!(
            explicit.flow_decision(Proto::Tcp, ip("10.20.30.40"), 22, None, &r),
            Decision::deny("always denied: private (RFC 1918) (10.0.0.0/8)")
        );
        // A domain rule never reaches an allowable range, even pinned.
        assert!(
            !explicit
                .flow_decision(Proto::Tcp, ip("10.20.30.40"), 443, Some("example.com"), &r)
                .allowed
        );
        // Not allowable: a rule alone is not enough.
        let p = allow(&["10.30.0.0/16", "192.168.0.0/16"]);
        assert!(
            !p.flow_decision(Proto::Tcp, ip("10.30.0.1"), 80, None, &r)
                .allowed
        );
        assert!(
            !p.flow_decision(Proto::Tcp, ip("192.168.1.1"), 80, None, &r)
                .allowed
        );
        // Open mode has no rules, so never reaches an allowable range.
        assert!(
            !mode(Mode::Open)
                .flow_decision(Proto::Tcp, ip("10.20.30.40"), 5432, None, &r)
                .allowed
        );
        // Loopback only when allowable and named.
        let lo = allow(&["127.0.0.1:8080"]);
        assert!(
            lo.flow_decision(Proto::Tcp, ip("127.0.0.1"), 8080, None, &r)
                .allowed
        );
        assert!(
            lo.flow_decision(Proto::Tcp, ip("::ffff:127.0.0.1"), 8080, None, &r)
                .allowed
        );
        assert!(
            !lo.flow_decision(Proto::Tcp, ip("127.0.0.2"), 8080, None, &ranges())
                .allowed
        );
        assert!(
            !lo.flow_decision(Proto::Tcp, ip("127.0.0.1"), 8080, None, &ranges())
                .allowed
        );
        // Host bits in an allowable network are ignored.
        let r = ranges().with_allowable([net("10.20.30.40/16")]);
        assert!(
            explicit
                .flow_decision(Proto::Tcp, ip("10.20.30.40"), 5432, None, &r)
                .allowed
        );
    }

    #[test]
    fn allowable_does_not_lift_host_address_unless_listed() {
        let r = ranges()
            .with_host_addrs([ip("10.20.0.1")])
            .with_allowable([net("10.20.0.0/16")]);
        let p = allow(&["10.20.0.0/16"]);
        // The host address lies in the allowable range, so it is reachable
        // by an explicit rule: the operator listed it.
        assert!(
            p.flow_decision(Proto::Tcp, ip("10.20.0.1"), 80, None, &r)
                .allowed
        );
        let r = ranges()
            .with_host_addrs([ip("2002:a14:1::1")])
            .with_allowable([net("10.20.0.0/16")]);
        let p = allow(&["10.20.0.0/16", "2002::/16"]);
        // The 6to4 form is itself a host address, not allowable.
        assert!(
            !p.flow_decision(Proto::Tcp, ip("2002:a14:1::1"), 80, None, &r)
                .allowed
        );
        assert!(
            p.flow_decision(Proto::Tcp, ip("2002:a14:1::2"), 80, None, &r)
                .allowed
        );
    }

    #[test]
    fn pinning() {
        let p = allow(&["pypi.org:443", "*.pythonhosted.org"]);
        // A domain rule allows an address the resolver handed out for its name.
        assert_eq!(
            tcp(&p, "151.101.0.223", 443, Some("pypi.org")),
            Decision::allow("pypi.org:443")
        );
        assert_eq!(
            tcp(&p, "151.101.0.223", 443, Some("files.pythonhosted.org.")),
            Decision::allow("*.pythonhosted.org")
        );
        // Never resolved: refused, and said so.
        assert_eq!(
            tcp(&p, "203.0.113.7", 443, None),
            Decision::deny(
                "not pinned: this sandbox never resolved an allowed name to 203.0.113.7"
            )
        );
        // Resolved for a name no rule matches (at this port).
        assert_eq!(
            tcp(&p, "203.0.113.7", 443, Some("evil.com")),
            Decision::deny("default deny")
        );
        assert_eq!(
            tcp(&p, "151.101.0.223", 80, Some("pypi.org")),
            Decision::deny("default deny")
        );
        assert!(!tcp(&p, "151.101.0.223", 443, Some("bad name")).allowed);
        // Only the pinned name counts, not the address.
        assert!(!tcp(&p, "151.101.0.223", 443, Some("pythonhosted.org")).allowed);
        // No domain rule covers port 80 over TCP: plain default deny.
        assert_eq!(
            allow(&["pypi.org:443"]).flow_decision(
                Proto::Tcp,
                ip("203.0.113.7"),
                80,
                None,
                &ranges()
            ),
            Decision::deny("default deny")
        );
        // A pinned name never reaches an always-denied address.
        assert_eq!(
            tcp(&p, "10.1.2.3", 443, Some("pypi.org")),
            Decision::deny("always denied: private (RFC 1918) (10.0.0.0/8)")
        );
    }

    #[test]
    fn open_and_none_modes() {
        let open = mode(Mode::Open);
        assert_eq!(
            tcp(&open, "1.1.1.1", 443, None),
            Decision::allow("open: public address")
        );
        assert!(udp(&open, "1.1.1.1", 443, None).allowed);
        assert!(udp(&open, "2606:4700::1111", 53, None).allowed);
        let none = mode(Mode::None);
        assert_eq!(
            tcp(&none, "1.1.1.1", 443, None),
            Decision::deny("network none")
        );
        assert_eq!(
            tcp(&none, "127.0.0.1", 80, None),
            Decision::deny("network none")
        );
        let r = ranges();
        assert_eq!(
            none.answer_decision("example.com", ip("1.1.1.1"), &r),
            Decision::deny("network none")
        );
        // Allow mode with no rules is a network that denies everything.
        let empty = allow(&[]);
        assert_eq!(empty.mode(), Mode::Allow);
        assert_eq!(
            tcp(&empty, "1.1.1.1", 443, None),
            Decision::deny("default deny")
        );
        assert!(!empty.name_decision("example.com").allowed);
    }

    #[test]
    fn answers_in_denied_ranges_are_refused() {
        let p = allow(&["example.com", "*.example.org"]);
        let r = ranges();
        // DNS rebinding: an allowed name answering with a private address.
        for addr in [
            "10.0.0.5",
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "fd00:ec2::254",
            "fd12::1",
        ] {
            let d = p.answer_decision("example.com", ip(addr), &r);
            assert!(!d.allowed, "{addr}");
            assert!(
                d.reason.starts_with("answer in always-denied range: "),
                "{d:?}"
            );
        }
        assert_eq!(
            p.answer_decision("example.com", ip("192.168.1.1"), &r),
            Decision::deny("answer in always-denied range: private (RFC 1918) (192.168.0.0/16)")
        );
        assert_eq!(
            p.answer_decision("example.com", ip("64:ff9b::a9fe:a9fe"), &r),
            Decision::deny(
                "answer in always-denied range: cloud metadata (169.254.0.0/16) \
                 (64:ff9b::a9fe:a9fe embeds 169.254.169.254)"
            )
        );
        assert_eq!(
            p.answer_decision("example.com", ip("93.184.216.34"), &r),
            Decision::allow("example.com")
        );
        assert_eq!(
            p.answer_decision("www.example.org", ip("2606:2800::1"), &r),
            Decision::allow("*.example.org")
        );
        // The name is judged first.
        assert_eq!(
            p.answer_decision("evil.com", ip("93.184.216.34"), &r),
            Decision::deny("default deny: no rule names evil.com")
        );
        // Open mode refuses private answers too.
        let open = mode(Mode::Open);
        assert!(
            !open
                .answer_decision("example.com", ip("10.0.0.5"), &r)
                .allowed
        );
        assert_eq!(
            open.answer_decision("example.com", ip("1.1.1.1"), &r),
            Decision::allow("open")
        );
        // Operator allowable plus an explicit rule lets a private answer through.
        let r = ranges().with_allowable([net("10.20.0.0/16")]);
        let p = allow(&["db.internal", "10.20.0.0/16:5432"]);
        assert_eq!(
            p.answer_decision("db.internal", ip("10.20.1.2"), &r),
            Decision::allow("10.20.0.0/16:5432")
        );
        assert!(
            !p.answer_decision("db.internal", ip("10.21.1.2"), &r)
                .allowed
        );
        assert!(
            !allow(&["db.internal"])
                .answer_decision("db.internal", ip("10.20.1.2"), &r)
                .allowed
        );
    }

    #[test]
    fn spec_round_trips_through_json() {
        let json = r#"{"mode":"allow","allow":["PyPI.org.","*.pythonhosted.org:443","[2001:db8::/32]:80-90","10.0.0.0/8","pypi.org"]}"#;
        let spec: NetworkSpec = serde_json::from_str(json).unwrap();
        let policy = Policy::from_spec(&spec).unwrap();
        let canonical = policy.spec();
        assert_eq!(
            canonical.allow,
            [
                "pypi.org",
                "*.pythonhosted.org:443",
                "[2001:db8::/32]:80-90",
                "10.0.0.0/8"
            ]
        );
        let text = serde_json::to_string(&canonical).unwrap();
        assert_eq!(
            text,
            r#"{"mode":"allow","allow":["pypi.org","*.pythonhosted.org:443","[2001:db8::/32]:80-90","10.0.0.0/8"]}"#
        );
        let back: NetworkSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, canonical);
        let again = Policy::try_from(&back).unwrap();
        assert_eq!(again.rules(), policy.rules());
        assert_eq!(again.mode(), Mode::Allow);

        let spec: NetworkSpec = serde_json::from_str(r#"{"mode":"open"}"#).unwrap();
        assert_eq!(
            spec,
            NetworkSpec {
                mode: Mode::Open,
                allow: vec![]
            }
        );
        assert_eq!(NetworkSpec::default().mode, Mode::None);
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"mode":"allow","allwo":[]}"#).is_err());
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"mode":"all"}"#).is_err());
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"allow":[]}"#).is_err());
        assert_eq!(serde_json::to_string(&Proto::Udp).unwrap(), r#""udp""#);
        assert_eq!(
            serde_json::to_string(&Decision::allow("pypi.org")).unwrap(),
            r#"{"allowed":true,"reason":"pypi.org"}"#
        );
    }

    #[test]
    fn from_spec_errors() {
        let spec = |mode, allow: &[&str]| NetworkSpec {
            mode,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        };
        let err = |s: NetworkSpec| Policy::from_spec(&s).unwrap_err().to_string();
        assert_eq!(
            err(spec(Mode::None, &["a.com", "b.com"])),
            r#"mode "none" takes no allow rules (got 2)"#
        );
        assert_eq!(
            err(spec(Mode::Open, &["a.com"])),
            r#"mode "open" takes no allow rules (got 1)"#
        );
        assert_eq!(
            err(spec(Mode::Allow, &["a.com", "*.", "b.com"])),
            r#"rule "*.": empty domain after "*.""#
        );
        let many: Vec<String> = (0..257).map(|i| format!("h{i}.example")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            err(spec(Mode::Allow, &refs)),
            "257 allow rules, more than the limit of 256"
        );
        assert_eq!(
            Policy::from_spec(&spec(Mode::Allow, &refs[..256]))
                .unwrap()
                .rules()
                .len(),
            256
        );
        // Duplicates keep the first.
        let p = Policy::from_spec(&spec(
            Mode::Allow,
            &["b.com", "a.com", "B.com.", "a.com:1-65535"],
        ))
        .unwrap();
        let texts: Vec<&str> = p.rules().iter().map(Rule::text).collect();
        assert_eq!(texts, ["b.com", "a.com", "a.com:1-65535"]);
    }

    #[test]
    fn first_matching_rule_decides() {
        let p = allow(&["203.0.113.0/24:443", "203.0.113.7", "example.com"]);
        assert_eq!(
            tcp(&p, "203.0.113.7", 443, None),
            Decision::allow("203.0.113.0/24:443")
        );
        assert_eq!(
            tcp(&p, "203.0.113.7", 80, None),
            Decision::allow("203.0.113.7")
        );
        // A CIDR rule decides before a pinned domain rule.
        assert_eq!(
            tcp(&p, "203.0.113.7", 443, Some("example.com")),
            Decision::allow("203.0.113.0/24:443")
        );
    }
}
