//! Root inside is root over the sandbox's own files, and over nothing else.

use super::harness::{Env, ok, text};

/// Runs `script` with sh as sandbox root; its stdout.
fn as_root(env: &Env, script: &str) -> String {
    ok(&env.run(&["--user", "root", "--", "sh", "-c", script]))
}

#[test]
fn root_chowns_and_chmods_its_own_files_on_the_copy_on_write_root() {
    let env = Env::new();
    let out = as_root(
        &env,
        "set -e\n\
         touch /tmp/f && chown 1234:4321 /tmp/f && stat -c %u:%g /tmp/f\n\
         chown root:root /tmp/f && chmod 4755 /tmp/f && stat -c %u:%g:%a /tmp/f\n\
         mkdir /tmp/d && chown 1000:1000 /tmp/d && chmod 700 /tmp/d\n\
         echo secret > /tmp/d/x && chown 1000 /tmp/d/x && chmod 600 /tmp/d/x\n\
         cat /tmp/d/x\n\
         chown 2000 /etc/debian_version && stat -c %u /etc/debian_version",
    );
    assert_eq!(out, "1234:4321\n0:0:4755\nsecret\n2000\n");
}

#[test]
fn root_keeps_owners_when_it_unpacks_an_archive_and_drops_to_another_user() {
    let env = Env::new();
    // The archive is made inside (owners 1234 and 2345), then unpacked
    // with owners kept, as package managers and `tar -p` as root do.
    let out = as_root(
        &env,
        "set -e\n\
         mkdir -p /tmp/src/d && echo a > /tmp/src/d/a && echo b > /tmp/src/b\n\
         chown -R 1234:1234 /tmp/src/d && chown 2345:2345 /tmp/src/b\n\
         tar -C /tmp/src -cf /tmp/t.tar . && mkdir /tmp/dst\n\
         tar -C /tmp/dst -xpf /tmp/t.tar\n\
         stat -c '%n %u:%g' /tmp/dst/d /tmp/dst/d/a /tmp/dst/b\n\
         python3 -c 'import os; os.setgroups([]); os.setgid(1234); os.setuid(1234); \
         print(os.getuid(), [l for l in open(\"/proc/self/status\") if l.startswith(\"CapEff\")][0].split()[1]); \
         open(\"/tmp/dst/d/a\", \"a\").write(\"x\")\n\
         try:\n    open(\"/tmp/dst/b\", \"a\")\nexcept PermissionError: print(\"not 1234s\")'",
    );
    assert_eq!(
        out,
        "/tmp/dst/d 1234:1234\n/tmp/dst/d/a 1234:1234\n/tmp/dst/b 2345:2345\n1234 0000000000000000\nnot 1234s\n"
    );
}

#[test]
fn roots_capabilities_stop_at_the_sandbox() {
    let env = Env::new();
    // No device nodes, no raw sockets, no mounts, the hidden host files
    // stay hidden, and the base under the copy-on-write root stays as it
    // was for the next sandbox.
    let out = env.run(&[
        "--user",
        "root",
        "--",
        "sh",
        "-c",
        "mknod /tmp/null c 1 3 2>&1 | grep -o 'Operation not permitted'\n\
         python3 -c 'import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)\nexcept OSError as e: print(\"raw\", e.errno)'\n\
         mount -t tmpfs none /tmp 2>&1 | grep -qi 'permission denied\\|not permitted\\|must be superuser' && echo no-mount\n\
         cat /etc/shadow 2>&1 | grep -o 'No such file or directory'\n\
         echo changed >> /etc/debian_version && echo wrote",
    ]);
    let s = ok(&out);
    assert_eq!(
        s,
        "Operation not permitted\nraw 1\nno-mount\nNo such file or directory\nwrote\n",
        "{}",
        text(&out.stderr)
    );
    let next = ok(&env.run(&["--", "cat", "/etc/debian_version"]));
    assert!(!next.contains("changed"), "{next}");
    // The default user keeps no capability at all.
    let s = ok(&env.run(&[
        "--",
        "sh",
        "-c",
        "touch /tmp/f; chown 0 /tmp/f 2>&1 | grep -o 'Operation not permitted'",
    ]));
    assert_eq!(s, "Operation not permitted\n");
}

#[test]
fn workspace_files_keep_the_workspace_owner_even_for_root() {
    let env = Env::new();
    let out = as_root(
        &env,
        "cd /workspace && touch w && chmod 640 w && stat -c %a w\n\
         chown 1234 w 2>&1 | grep -o 'Operation not permitted'",
    );
    assert_eq!(out, "640\nOperation not permitted\n");
}
