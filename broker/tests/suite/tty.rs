//! `airlock exec -it`: a real terminal inside, driven here through a
//! pseudo-terminal pair as a person's terminal would drive the CLI.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::harness::{Env, create};

/// Waits until the terminal has shown `want` (after `from`); where it ends.
fn wait_for(seen: &Mutex<String>, from: usize, want: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        {
            let s = seen.lock().unwrap();
            if let Some(at) = s.get(from..).and_then(|t| t.find(want)) {
                return from + at + want.len();
            }
            assert!(Instant::now() < deadline, "never saw {want:?} in:\n{}", &*s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_interactive_shell_gets_a_terminal_its_size_resizes_and_ctrl_c() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let id = create(&env, &[])["id"].as_str().unwrap().to_string();
    let size = nix::pty::Winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let slave_path = nix::unistd::ttyname(&pty.slave).unwrap();
    let mut cli = env
        .airlock()
        .arg("--socket")
        .arg(&env.socket)
        .args([
            "exec",
            "-it",
            &id,
            "--",
            "bash",
            "--norc",
            "--noprofile",
            "-i",
        ])
        .stdin(std::process::Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(std::process::Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(pty.slave))
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let seen = Arc::new(Mutex::new(String::new()));
    {
        let mut r = master.try_clone().unwrap();
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    return;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let mut at = wait_for(&seen, 0, "$ ");
    master.write_all(b"stty size\r").unwrap();
    at = wait_for(&seen, at, "30 100");
    // A resize of the terminal here reaches the one inside.
    let out = std::process::Command::new("stty")
        .arg("-F")
        .arg(&slave_path)
        .args(["rows", "40", "cols", "120"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cli.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    master.write_all(b"stty size\r").unwrap();
    at = wait_for(&seen, at, "40 120");
    // Ctrl-C interrupts the foreground command, not the shell.
    master.write_all(b"sleep 30\r").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    master.write_all(b"\x03").unwrap();
    master.write_all(b"echo alive $?\r").unwrap();
    at = wait_for(&seen, at, "alive 130");
    let _ = at;
    // The exit status passes through.
    master.write_all(b"exit 7\r").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = cli.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the CLI did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(7), "{}", seen.lock().unwrap());
    // Fed from a pipe with -i: stdin streams, EOF ends it.
    let mut piped = env
        .airlock()
        .arg("--socket")
        .arg(&env.socket)
        .args(["exec", "-i", &id, "--", "sh", "-c", "cat; echo end"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    piped
        .stdin
        .take()
        .unwrap()
        .write_all(b"streamed\n")
        .unwrap();
    let out = piped.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "streamed\nend\n");
}
