//! Policy as data: which names are valid, which host entries the base shows.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use crate::error::{OpError, OpResult};

/// A single, validated path component from a request: not empty, at most
/// 255 bytes, no `/`, no NUL, not `.` or `..`. Only values of this type are
/// ever handed to an `*at` call on a layer handle.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Name(OsString);

/// The longest name, in bytes (as on the host's filesystems).
pub(crate) const NAME_MAX: usize = 255;

impl Name {
    pub(crate) fn new(name: &OsStr) -> OpResult<Self> {
        let b = name.as_bytes();
        if b.len() > NAME_MAX {
            return Err(OpError::NameTooLong);
        }
        if b.is_empty() || b == b"." || b == b".." {
            return Err(OpError::Invalid);
        }
        if b.iter().any(|&c| c == b'/' || c == 0) {
            return Err(OpError::Invalid);
        }
        Ok(Self(name.to_os_string()))
    }

    pub(crate) fn as_os_str(&self) -> &OsStr {
        &self.0
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Top-level host entries shown by `BaseSpec::Host` (whichever exist).
/// `etc` is filtered further by [`ETC_DENY`].
pub(crate) const HOST_ROOT_ALLOW: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
];

/// How an [`ETC_DENY`] rule matches a path relative to the host's /etc.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Match {
    /// The path equals the pattern (and so everything under it is hidden too).
    Exact,
    /// The last component starts with the pattern's last component, in the
    /// directory the pattern names.
    Prefix,
}

/// Host /etc entries that a sandbox never sees: lookups answer ENOENT and
/// emit a `Denied` event, readdir leaves them out.
pub(crate) const ETC_DENY: &[(&str, Match, &str)] = &[
    ("shadow", Match::Exact, "password hashes"),
    ("shadow-", Match::Exact, "backup of password hashes"),
    ("gshadow", Match::Exact, "group password hashes"),
    ("gshadow-", Match::Exact, "backup of group password hashes"),
    (
        "passwd-",
        Match::Exact,
        "backup of the host's users (passwd is synthesized)",
    ),
    (
        "group-",
        Match::Exact,
        "backup of the host's groups (group is synthesized)",
    ),
    ("subuid", Match::Exact, "host id delegations"),
    ("subuid-", Match::Exact, "host id delegations"),
    ("subgid", Match::Exact, "host id delegations"),
    ("subgid-", Match::Exact, "host id delegations"),
    ("sudoers", Match::Exact, "host privilege policy"),
    ("sudoers.d", Match::Exact, "host privilege policy"),
    (
        "ssh/ssh_host_",
        Match::Prefix,
        "ssh host keys, private and public",
    ),
    ("ssl/private", Match::Exact, "tls private keys"),
    ("machine-id", Match::Exact, "stable host identifier"),
    ("security/opasswd", Match::Exact, "old password hashes"),
    ("krb5.keytab", Match::Exact, "kerberos service keys"),
    ("ipsec.secrets", Match::Exact, "vpn secrets"),
    ("ipsec.d/private", Match::Exact, "vpn private keys"),
    ("ppp/chap-secrets", Match::Exact, "ppp credentials"),
    ("ppp/pap-secrets", Match::Exact, "ppp credentials"),
    ("wireguard", Match::Exact, "vpn private keys"),
    ("openvpn", Match::Exact, "vpn keys"),
    (
        "NetworkManager/system-connections",
        Match::Exact,
        "wifi and vpn credentials",
    ),
    ("letsencrypt", Match::Exact, "tls private keys"),
    ("credstore", Match::Exact, "systemd credentials"),
    ("credstore.encrypted", Match::Exact, "systemd credentials"),
    ("docker/key.json", Match::Exact, "docker daemon key"),
    (
        "containerd",
        Match::Exact,
        "container runtime config with credentials",
    ),
    ("libvirt/secrets", Match::Exact, "hypervisor secrets"),
    ("airlock", Match::Exact, "our own host configuration"),
];

/// Whether a host path (components from the host root) is shown by the
/// `Host` base. `Err(reason)` when hidden.
pub(crate) fn host_visible(comps: &[&[u8]]) -> Result<(), &'static str> {
    let Some(first) = comps.first() else {
        return Ok(());
    };
    if !HOST_ROOT_ALLOW.iter().any(|a| a.as_bytes() == *first) {
        return Err("not part of the host base");
    }
    if *first != b"etc" || comps.len() < 2 {
        return Ok(());
    }
    let rel = &comps[1..];
    for (pattern, how, reason) in ETC_DENY {
        let pat: Vec<&[u8]> = pattern.as_bytes().split(|&c| c == b'/').collect();
        let hit = match how {
            Match::Exact => rel.len() >= pat.len() && rel[..pat.len()] == pat[..],
            Match::Prefix => {
                let n = pat.len();
                rel.len() >= n && rel[..n - 1] == pat[..n - 1] && rel[n - 1].starts_with(pat[n - 1])
            }
        };
        if hit {
            return Err(reason);
        }
    }
    Ok(())
}

/// Whether some [`ETC_DENY`] pattern hides an entry strictly below the
/// host path `comps` (components from the host root): such a directory
/// cannot be granted to a confined server whole.
pub(crate) fn hides_below(comps: &[&[u8]]) -> bool {
    if comps.first() != Some(&&b"etc"[..]) {
        return false;
    }
    let rel = &comps[1..];
    ETC_DENY.iter().any(|(pattern, _, _)| {
        let pat: Vec<&[u8]> = pattern.as_bytes().split(|&c| c == b'/').collect();
        pat.len() > rel.len() && pat[..rel.len()] == rel[..]
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn vis(p: &str) -> bool {
        let comps: Vec<&[u8]> = p.split('/').map(str::as_bytes).collect();
        host_visible(&comps).is_ok()
    }

    #[test]
    fn names_are_single_components() {
        for bad in ["", ".", "..", "a/b", "/", "a\0b"] {
            assert!(Name::new(OsStr::new(bad)).is_err(), "{bad:?}");
        }
        assert!(Name::new(OsStr::new(&"x".repeat(256))).is_err());
        assert!(Name::new(OsStr::new("...")).is_ok());
        assert!(Name::new(OsStr::new(".hidden")).is_ok());
    }

    #[test]
    fn host_filter() {
        assert!(vis("usr/bin/sh"));
        assert!(vis("etc/os-release"));
        assert!(!vis("root"));
        assert!(!vis("home"));
        assert!(!vis("etc/shadow"));
        assert!(!vis("etc/sudoers.d/x"));
        assert!(!vis("etc/ssh/ssh_host_ed25519_key"));
        assert!(!vis("etc/ssh/ssh_host_rsa_key.pub"));
        assert!(vis("etc/ssh/ssh_config"));
        assert!(!vis("etc/ssl/private"));
        assert!(vis("etc/ssl/certs"));
        assert!(vis("etc/shadowx"));
    }
}
