//! A sandbox's network gateway.
//!
//! The sandbox's only link is the sandbox end of a veth pair; the gateway
//! reads and writes raw frames on the host end (AF_PACKET) and terminates
//! them in a user-space TCP/IP stack (smoltcp). Every connection the
//! sandbox opens is judged by an egress [`policy::Policy`] before the
//! gateway opens the matching host socket; names resolve only through the
//! gateway's own resolver, which answers only names the policy allows and
//! pins the addresses it hands out.

pub mod dns;
pub mod gateway;
pub mod inspect;
pub mod policy;
