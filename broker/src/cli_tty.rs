//! `airlock run|exec -i/-t`: this process's stdin streamed to a command
//! as it comes, on a terminal inside with `-t` (as `docker exec -it`).
//!
//! With `-t` and a terminal here, the local terminal is put in raw mode
//! (every key, Ctrl-C included, goes to the sandbox's terminal, whose line
//! discipline signals the foreground process group there) and restored
//! however the session ends; its size is sent at start and on every
//! SIGWINCH.

use std::io::{Read, Write};
use std::os::fd::AsFd;

use tokio::sync::mpsc;

use crate::api::types::{ExecEvent, ExecExit, TtySize};
use crate::broker::Input;

/// The size of the terminal on stdin, if it is one.
pub fn terminal_size() -> Option<TtySize> {
    crate::sys::winsize(std::io::stdin().as_fd()).map(|(rows, cols)| TtySize { rows, cols })
}

/// The local terminal in raw mode until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

/// Moves bytes until the command exits; its exit.
pub async fn interact(
    input: mpsc::Sender<Input>,
    mut events: mpsc::Receiver<ExecEvent>,
    tty: bool,
) -> Result<ExecExit, super::cli::CliError> {
    let raw = if tty && nix::unistd::isatty(std::io::stdin().as_fd()).unwrap_or(false) {
        RawMode::enter()
    } else {
        None
    };
    // Stdin is read on a thread of its own (a blocking read the process's
    // exit ends), and sent on as it comes; its end is the command's EOF.
    let feed = input.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = feed.blocking_send(Input::Eof);
                    return;
                }
                Ok(n) => {
                    let chunk =
                        hyper::body::Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                    if feed.blocking_send(Input::Data(chunk)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    use tokio::signal::unix::{SignalKind, signal};
    let sig = |k| signal(k).map_err(|e| super::cli::CliError::Usage(e.to_string()));
    let mut winch = sig(SignalKind::window_change())?;
    let mut term = sig(SignalKind::terminate())?;
    let mut hup = sig(SignalKind::hangup())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let exit = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ExecEvent::Stdout(c)) => {
                    let _ = out.write_all(&c.bytes());
                    let _ = out.flush();
                }
                Some(ExecEvent::Stderr(c)) => {
                    let _ = err.write_all(&c.bytes());
                    let _ = err.flush();
                }
                Some(ExecEvent::Exit(x)) => break Ok(x),
                Some(ExecEvent::Started { .. }) => {}
                None => break Err(super::cli::CliError::Usage(
                    "the broker ended the session without an exit status".into(),
                )),
            },
            _ = winch.recv() => {
                if let Some(s) = terminal_size() {
                    let _ = input.send(Input::Resize(s.rows, s.cols)).await;
                }
            }
            _ = term.recv() => { let _ = input.send(Input::Signal(libc::SIGTERM)).await; }
            _ = hup.recv() => { let _ = input.send(Input::Signal(libc::SIGHUP)).await; }
            _ = int.recv() => { let _ = input.send(Input::Signal(libc::SIGINT)).await; }
        }
    };
    drop(raw);
    exit
}
