//! `airlock run` on the embedded broker: output, exit status, environment.

use super::harness::{Env, ok, text};

#[test]
fn stdout_and_stderr_stay_separate_and_exit_status_passes_through() {
    let env = Env::new();
    let out = env.run(&["--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-out\n");
    assert!(text(&out.stderr).contains("to-err\n"));
}

#[test]
fn death_by_signal_is_128_plus_signal() {
    let env = Env::new();
    let out = env.run(&["--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn python_runs_as_an_unprivileged_user_in_a_private_root() {
    let env = Env::new();
    let out = env.run(&[
        "--",
        "python3",
        "-c",
        "import os; print(os.getuid(), sorted(os.listdir('/')))",
    ]);
    let s = ok(&out);
    assert!(s.starts_with("1000 "), "{s}");
    assert!(s.contains("'workspace'") && s.contains("'usr'"), "{s}");
    assert!(!s.contains("'work'") && !s.contains("'root_host'"), "{s}");
}

#[test]
fn missing_command_is_127_with_a_message() {
    let env = Env::new();
    let out = env.run(&["--", "no-such-program-xyz"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("no-such-program-xyz"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn only_the_passed_environment_and_a_private_hostname_cross() {
    let env = Env::new();
    let out = env.run(&["--env", "FOO=bar", "--", "/usr/bin/env"]);
    assert_eq!(ok(&out), "FOO=bar\n");
    let out = env.run(&["--", "cat", "/proc/sys/kernel/hostname"]);
    let h = ok(&out);
    assert!(h.starts_with("airlock-"), "{h}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(h, host);
}

#[test]
fn no_descriptor_beyond_stdio_crosses_in() {
    let env = Env::new();
    // ls opens the directory itself (one more fd); nothing else may be there.
    let out = env.run(&["--", "sh", "-c", "ls /proc/$$/fd"]);
    let fds: Vec<String> = ok(&out).split_whitespace().map(String::from).collect();
    assert!(
        fds.iter()
            .all(|f| ["0", "1", "2", "10", "255"].contains(&f.as_str())),
        "unexpected descriptors {fds:?}"
    );
}

#[test]
fn bad_input_is_named() {
    let env = Env::new();
    let out = env.run(&["--memory", "lots", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("lots"), "{}", text(&out.stderr));
    let out = env.run(&["--env", "NOEQUALS", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("NOEQUALS"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["--workspace", "/nonexistent/dir", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("/nonexistent/dir"),
        "{}",
        text(&out.stderr)
    );
}
