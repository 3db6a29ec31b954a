//! Synthesized entries: layered above the base and below the upper layer.

use std::collections::BTreeMap;

/// One synthesized entry.
#[derive(Debug, Clone)]
pub(crate) enum SynthEntry {
    /// A directory with these permission bits.
    Dir { mode: u32 },
    /// A read-only-until-copied-up regular file.
    File { content: Vec<u8> },
}

/// The synthesized tree, keyed by path relative to the sandbox root
/// ("" is the root, "etc/hosts" a file).
#[derive(Debug)]
pub(crate) struct Synth {
    entries: BTreeMap<String, SynthEntry>,
}

/// What the synthesized passwd/group files contain.
#[derive(Debug)]
pub(crate) struct SynthSpec<'a> {
    pub hostname: &'a str,
    pub user: &'a str,
    pub uid: u32,
    pub gid: u32,
}

/// Directories that exist even when the base lacks them, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("etc", 0o755),
    ("tmp", 0o1777),
    ("workspace", 0o755),
    ("proc", 0o555),
    ("dev", 0o755),
    ("root", 0o700),
    ("home", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("run", 0o755),
    ("opt", 0o755),
];

impl Synth {
    /// No entries at all (a workspace's stack).
    pub(crate) fn empty() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }

    pub(crate) fn new(spec: &SynthSpec<'_>) -> Self {
        let mut entries = BTreeMap::new();
        entries.insert(String::new(), SynthEntry::Dir { mode: 0o755 });
        for (path, mode) in DIRS {
            entries.insert((*path).to_owned(), SynthEntry::Dir { mode: *mode });
        }
        let h = spec.hostname;
        let files = [
            ("etc/hostname", format!("{h}\n")),
            (
                "etc/hosts",
                format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{h}\n"),
            ),
            (
                "etc/resolv.conf",
                // The sandbox's gateway resolves the names its policy
                // allows; without a network there is no route to it and
                // lookups fail at once.
                "nameserver 10.0.2.3\noptions edns0\n".to_owned(),
            ),
            ("etc/passwd", passwd(spec)),
            ("etc/group", group(spec)),
        ];
        for (path, content) in files {
            entries.insert(
                path.to_owned(),
                SynthEntry::File {
                    content: content.into_bytes(),
                },
            );
        }
        Self { entries }
    }

    pub(crate) fn get(&self, path: &str) -> Option<&SynthEntry> {
        self.entries.get(path)
    }

    /// Names of the direct children of directory `dir`.
    pub(crate) fn children(&self, dir: &str) -> Vec<(&str, &SynthEntry)> {
        self.entries
            .iter()
            .filter_map(|(p, e)| {
                let rest = if dir.is_empty() {
                    p.as_str()
                } else {
                    p.strip_prefix(dir)?.strip_prefix('/')?
                };
                (!rest.is_empty() && !rest.contains('/')).then_some((rest, e))
            })
            .collect()
    }
}

fn passwd(s: &SynthSpec<'_>) -> String {
    let mut out = String::from("root:x:0:0:root:/root:/bin/sh\n");
    if s.uid != 0 {
        out.push_str(&format!(
            "{}:x:{}:{}:{}:/workspace:/bin/sh\n",
            s.user, s.uid, s.gid, s.user
        ));
    }
    out.push_str("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n");
    out
}

fn group(s: &SynthSpec<'_>) -> String {
    let mut out = String::from("root:x:0:\n");
    if s.gid != 0 {
        out.push_str(&format!("{}:x:{}:\n", s.user, s.gid));
    }
    out.push_str("nogroup:x:65534:\n");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tree() {
        let s = Synth::new(&SynthSpec {
            hostname: "box",
            user: "sandbox",
            uid: 1000,
            gid: 1000,
        });
        let root: Vec<&str> = s.children("").into_iter().map(|(n, _)| n).collect();
        assert!(root.contains(&"tmp") && root.contains(&"etc") && !root.contains(&"var/tmp"));
        let var: Vec<&str> = s.children("var").into_iter().map(|(n, _)| n).collect();
        assert_eq!(var, ["tmp"]);
        let Some(SynthEntry::File { content }) = s.get("etc/passwd") else {
            panic!("no passwd")
        };
        let text = String::from_utf8(content.clone()).unwrap();
        assert!(text.contains("sandbox:x:1000:1000:sandbox:/workspace:/bin/sh"));
        assert_eq!(text.lines().count(), 3);
    }
}
