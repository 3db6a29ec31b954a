//! Per-sandbox components: one supervised, jailed process per job.
//!
//! A component role (the filesystem server today; the network gateway and
//! the device proxy next) is started the same way and speaks the same
//! shape of protocol:
//!
//! 1. the broker does the privileged set-up (mounts, opens devices and
//!    layer roots) and starts `exe ROLE` with [`spawn_role`]: posix_spawn
//!    of its own binary, an empty environment, a control channel on fd 3,
//!    no code of ours between fork and exec; the binary dispatches the
//!    role before any runtime or thread exists;
//! 2. it sends [`Control::Start`] with the protocol version, the role's
//!    typed spec and exactly the descriptors the role may hold
//!    (`SCM_RIGHTS`);
//! 3. the component joins the sandbox's cgroup, confines itself
//!    ([`airlock_shim::jail`]) and answers [`Report::Ready`], or
//!    [`Report::Failed`] naming the stage;
//! 4. from then on it sends typed [`Report::Event`]s, which one thread of
//!    the broker turns into audit rows through one callback; a message
//!    that does not parse is a failure of that sandbox (audited), never
//!    skipped;
//! 5. [`Component`] owns the process: dropping it kills and reaps it. When
//!    the process dies on its own (or its channel closes), the supervisor
//!    reports it once, and the broker tears that sandbox down. When the
//!    broker dies, the channel closes and the component exits.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use airlock_shim::channel::{Channel, ChannelError};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the component protocol; a component refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;

/// How long a component may take to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A role: the argv\[1\] that selects it and the types it speaks.
pub trait Role {
    /// argv\[1\] of the hidden entry point, e.g. `__fs`.
    const ARG: &'static str;
    /// Short name for messages and audit rows, e.g. `fs`.
    const NAME: &'static str;
    /// What to serve; sent once, with the descriptors.
    type Spec: Serialize + DeserializeOwned;
    /// What the component reports once it is confined and serving.
    type Ready: Serialize + DeserializeOwned + std::fmt::Debug;
    /// What it reports while serving (audited).
    type Event: Serialize + DeserializeOwned + std::fmt::Debug;
    /// What the broker may tell it while it serves (after the start).
    type Command: Serialize + DeserializeOwned + std::fmt::Debug;
}

/// The command type of a role the broker never commands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum NoCommand {}

/// Broker to component.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control<S, C> {
    /// The first message: protocol version and what to serve.
    Start {
        /// [`PROTOCOL_VERSION`] of the broker.
        version: u32,
        /// The role's spec.
        spec: S,
    },
    /// A role's command, while it serves.
    Command {
        /// The command.
        command: C,
    },
}

/// Sends `command` to a running component of role `R` on `chan` (the
/// broker's end, or a duplicate of it).
///
/// # Errors
/// When the channel is closed or the message too large.
pub fn send_command<R: Role>(chan: &Channel, command: R::Command) -> Result<(), ChannelError> {
    send_command_with::<R>(chan, command, &[])
}

/// [`send_command`] without waiting: when the channel is full (the
/// component is not reading), the command is dropped and `Ok(false)`.
///
/// # Errors
/// When the channel is closed or the message too large.
pub fn try_send_command<R: Role>(
    chan: &Channel,
    command: R::Command,
) -> Result<bool, ChannelError> {
    let msg: Control<R::Spec, R::Command> = Control::Command { command };
    chan.try_send(&msg)
}

/// [`send_command`] with descriptors beside it.
///
/// # Errors
/// As [`send_command`].
pub fn send_command_with<R: Role>(
    chan: &Channel,
    command: R::Command,
    fds: &[BorrowedFd<'_>],
) -> Result<(), ChannelError> {
    let msg: Control<R::Spec, R::Command> = Control::Command { command };
    chan.send(&msg, fds)
}

/// Component to broker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report<R, E> {
    /// Confined and serving.
    Ready {
        /// [`PROTOCOL_VERSION`] of the component.
        version: u32,
        /// The role's facts.
        ready: R,
    },
    /// Something to audit.
    Event {
        /// The role's event.
        event: E,
    },
    /// Set-up failed; the component exits.
    Failed {
        /// What failed.
        failure: Failure,
    },
}

/// A stage of a component's set-up that failed, with its cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{stage}: {error}")]
pub struct Failure {
    /// The stage, e.g. "join cgroup", "landlock".
    pub stage: String,
    /// What went wrong.
    pub error: String,
}

/// Why a component could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// posix_spawn failed.
    #[error("cannot start the {role} component from {exe}")]
    Spawn {
        /// The role.
        role: &'static str,
        /// The binary.
        exe: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The control channel failed.
    #[error("{role} component: control channel")]
    Channel {
        /// The role.
        role: &'static str,
        /// The cause.
        #[source]
        source: ChannelError,
    },
    /// The component reported a failed set-up stage.
    #[error("{role} component failed at {failure}")]
    Failed {
        /// The role.
        role: &'static str,
        /// What failed.
        failure: Failure,
    },
    /// It did not report ready in time.
    #[error("{role} component did not report ready within {}s", READY_TIMEOUT.as_secs())]
    Timeout {
        /// The role.
        role: &'static str,
    },
    /// It spoke another protocol version, or out of order.
    #[error("{role} component: {what}")]
    Protocol {
        /// The role.
        role: &'static str,
        /// What was wrong.
        what: String,
    },
}

/// How a supervised component ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The broker stopped it (its owner was dropped).
    Stopped,
    /// It closed its channel or died on its own.
    Died,
    /// It sent a message that does not parse, or one out of protocol.
    Malformed(String),
    /// It reported a failure and stopped serving.
    Failed(Failure),
}

/// A running component process; dropping it kills and reaps it.
#[derive(Debug)]
pub struct Component {
    role: &'static str,
    pid: Pid,
    stopping: Arc<AtomicBool>,
    /// The supervisor thread, joined on stop so that every event the
    /// component sent before it ended is audited before the stop returns.
    supervisor: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    reaped: bool,
}

impl Component {
    /// Starts `exe R::ARG` and sends it `spec` with `fds`, without waiting
    /// for it: the caller may start other work and then
    /// [`Component::await_ready`].
    ///
    /// # Errors
    /// When the process cannot be started or the spec cannot be sent (it is
    /// then killed and reaped).
    pub fn launch<R: Role>(
        exe: &Path,
        spec: &R::Spec,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Component, Channel), ComponentError> {
        let role = R::NAME;
        let chan = |source| ComponentError::Channel { role, source };
        let (mine, theirs) = Channel::pair().map_err(chan)?;
        let pid =
            spawn_role(exe, R::ARG, theirs.into_fd()).map_err(|source| ComponentError::Spawn {
                role,
                exe: exe.display().to_string(),
                source,
            })?;
        let owner = Component {
            role,
            pid,
            stopping: Arc::new(AtomicBool::new(false)),
            supervisor: std::sync::Mutex::new(None),
            reaped: false,
        };
        let start: Control<&R::Spec, R::Command> = Control::Start {
            version: PROTOCOL_VERSION,
            spec,
        };
        mine.send(&start, fds).map_err(chan)?;
        Ok((owner, mine))
    }

    /// Waits until the component launched on `chan` reports ready (or
    /// fails, or [`READY_TIMEOUT`] passes).
    ///
    /// # Errors
    /// A failed stage, a timeout, or a protocol mismatch.
    pub fn await_ready<R: Role>(chan: &Channel) -> Result<R::Ready, ComponentError> {
        let role = R::NAME;
        if !wait_readable(chan, READY_TIMEOUT) {
            return Err(ComponentError::Timeout { role });
        }
        match chan.recv::<Report<R::Ready, R::Event>>() {
            Ok((Report::Ready { version, ready }, _)) if version == PROTOCOL_VERSION => Ok(ready),
            Ok((Report::Ready { version, .. }, _)) => Err(ComponentError::Protocol {
                role,
                what: format!("protocol version {version}, broker speaks {PROTOCOL_VERSION}"),
            }),
            Ok((Report::Failed { failure }, _)) => Err(ComponentError::Failed { role, failure }),
            Ok((Report::Event { .. }, _)) => Err(ComponentError::Protocol {
                role,
                what: "an event before ready".into(),
            }),
            Err(source) => Err(ComponentError::Channel { role, source }),
        }
    }

    /// [`Component::launch`], then [`Component::await_ready`]. Returns the
    /// owner, the ready report and the broker's end of the channel, to
    /// [`Component::supervise`].
    ///
    /// # Errors
    /// As those two.
    pub fn start<R: Role>(
        exe: &Path,
        spec: &R::Spec,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Component, R::Ready, Channel), ComponentError> {
        let (owner, chan) = Self::launch::<R>(exe, spec, fds)?;
        let ready = Self::await_ready::<R>(&chan)?;
        Ok((owner, ready, chan))
    }

    /// Host pid of the process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Serves the component's reports on a thread of its own: each event
    /// goes to `on_event`; when the channel closes or carries something
    /// malformed, `on_end` runs once with why (`Stopped` when this owner
    /// was dropped first).
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn supervise<R: Role>(
        &self,
        chan: Channel,
        mut on_event: impl FnMut(R::Event) + Send + 'static,
        on_end: impl FnOnce(Ended) + Send + 'static,
    ) -> std::io::Result<()>
    where
        R::Event: Send,
    {
        let stopping = Arc::clone(&self.stopping);
        let handle = std::thread::Builder::new()
            .name(format!("{}-{}", R::NAME, self.pid))
            .spawn(move || {
                let ended = loop {
                    match chan.recv::<Report<R::Ready, R::Event>>() {
                        Ok((Report::Event { event }, _)) => on_event(event),
                        Ok((Report::Failed { failure }, _)) => break Ended::Failed(failure),
                        Ok((other, _)) => {
                            break Ended::Malformed(format!("unexpected report {other:?}"));
                        }
                        Err(ChannelError::Malformed(e)) => break Ended::Malformed(e.to_string()),
                        Err(e @ ChannelError::TooLarge(_)) => {
                            break Ended::Malformed(e.to_string());
                        }
                        Err(_) => break Ended::Died,
                    }
                };
                if stopping.load(Ordering::SeqCst) {
                    on_end(Ended::Stopped);
                } else {
                    on_end(ended);
                }
            })?;
        *crate::util::lock_or_recover(&self.supervisor) = Some(handle);
        Ok(())
    }

    /// Stops the component: gives it `grace` to exit by itself (it does
    /// once what it serves is gone, after sending its last events), then
    /// kills it; reaps it, and waits until its supervisor has handled
    /// everything it sent. Returns whether it exited by itself.
    pub fn stop(mut self, grace: Duration) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            match nix::sys::wait::waitpid(self.pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(nix::Error::EINTR) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => {
                    self.reaped = true;
                    break;
                }
            }
        }
        let exited = self.reaped;
        self.kill_and_reap();
        let handle = crate::util::lock_or_recover(&self.supervisor).take();
        if let Some(h) = handle
            && h.thread().id() != std::thread::current().id()
            && h.join().is_err()
        {
            tracing::warn!(role = self.role, "component supervisor panicked");
        }
        exited
    }

    fn kill_and_reap(&mut self) {
        if self.reaped {
            return;
        }
        self.reaped = true;
        if let Err(e) = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL)
            && e != nix::Error::ESRCH
        {
            tracing::warn!(role = self.role, pid = %self.pid, error = %e, "kill component");
        }
        loop {
            match nix::sys::wait::waitpid(self.pid, None) {
                Err(nix::Error::EINTR) => continue,
                Ok(nix::sys::wait::WaitStatus::StillAlive) => continue,
                _ => break,
            }
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.kill_and_reap();
    }
}

/// Whether `chan` has something to read within `timeout`.
fn wait_readable(chan: &Channel, timeout: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(chan.fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => return n > 0,
            Err(nix::Error::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Starts `exe ROLE` with `ctrl` as fd 3, stdin on /dev/null, an empty
/// environment and default signal state, without running any code of ours
/// between fork and exec (posix_spawn).
///
/// # Errors
/// When posix_spawn fails.
pub fn spawn_role(exe: &Path, role: &str, ctrl: OwnedFd) -> Result<Pid, nix::Error> {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_dup2(ctrl.as_raw_fd(), 3)?;
    let devnull = CString::new("/dev/null").map_err(|_| nix::Error::EINVAL)?;
    actions.add_open(
        0,
        devnull.as_c_str(),
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_sigmask(&nix::sys::signal::SigSet::empty())?;
    attr.set_sigdefault(&nix::sys::signal::SigSet::all())?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;
    let path = CString::new(exe.as_os_str().as_encoded_bytes()).map_err(|_| nix::Error::EINVAL)?;
    let args = [
        CString::new(format!("airlock-{}", role.trim_start_matches('_')))
            .map_err(|_| nix::Error::EINVAL)?,
        CString::new(role).map_err(|_| nix::Error::EINVAL)?,
    ];
    let env: [CString; 0] = [];
    let pid = posix_spawn(path.as_c_str(), &actions, &attr, &args, &env)?;
    drop(ctrl);
    Ok(pid)
}

/// The component side of the start: takes the channel on fd 3 and reads
/// [`Control::Start`]. `None` when that failed: the reason has been
/// reported (when the channel exists) and the process should exit with
/// status 1.
pub fn accept_start<R: Role>() -> Option<(Channel, R::Spec, Vec<OwnedFd>)> {
    let Some(fd) = airlock_shim::sys::own_inherited_fd(3) else {
        eprintln!(
            "airlock {} component: fd 3 (control channel) is not open",
            R::NAME
        );
        return None;
    };
    let chan = Channel::from_fd(fd);
    match chan.recv::<Control<R::Spec, R::Command>>() {
        Ok((Control::Start { version, spec }, fds)) if version == PROTOCOL_VERSION => {
            Some((chan, spec, fds))
        }
        Ok((Control::Start { version, .. }, _)) => {
            report_failed::<R>(
                &chan,
                "start",
                format!("protocol version {version}, component speaks {PROTOCOL_VERSION}"),
            );
            None
        }
        Ok((Control::Command { .. }, _)) => {
            report_failed::<R>(&chan, "start", "a command before the start");
            None
        }
        Err(e) => {
            report_failed::<R>(&chan, "read spec", e);
            None
        }
    }
}

/// Reports a failed set-up stage to the broker.
pub fn report_failed<R: Role>(chan: &Channel, stage: &str, error: impl std::fmt::Display) {
    let msg: Report<R::Ready, R::Event> = Report::Failed {
        failure: Failure {
            stage: stage.to_string(),
            error: error.to_string(),
        },
    };
    if let Err(e) = chan.send(&msg, &[]) {
        eprintln!(
            "airlock {} component: {stage}: {error} (not reported: {e})",
            R::NAME
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::PermissionsExt;
    use std::sync::mpsc;

    use super::*;

    /// A role for stand-in components: any JSON.
    struct Scripted;

    impl Role for Scripted {
        const ARG: &'static str = "__scripted";
        const NAME: &'static str = "scripted";
        type Spec = serde_json::Value;
        type Ready = serde_json::Value;
        type Event = serde_json::Value;
        type Command = NoCommand;
    }

    /// A stand-in component: a Python script speaking the wire format (one
    /// JSON message per SOCK_SEQPACKET datagram on fd 3) that reads the
    /// start message, sends each of `sends` as raw bytes, and exits.
    fn scripted(dir: &Path, sends: &[&[u8]]) -> std::path::PathBuf {
        let sends: Vec<String> = sends
            .iter()
            .map(|b| format!("bytes.fromhex('{}')", hex(b)))
            .collect();
        let script = format!(
            "#!/usr/bin/python3\nimport socket\ns = socket.socket(fileno=3)\ns.recv(1 << 20)\n\
             for m in [{}]:\n    s.send(m)\n",
            sends.join(", ")
        );
        let path = dir.join("component");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|c| format!("{c:02x}")).collect()
    }

    fn ready() -> Vec<u8> {
        format!(r#"{{"type":"ready","version":{PROTOCOL_VERSION},"ready":{{}}}}"#).into_bytes()
    }

    /// Starts the scripted component and supervises it; returns the events
    /// it delivered and how it ended.
    fn run(sends: &[&[u8]]) -> Result<(Vec<serde_json::Value>, Ended), ComponentError> {
        let dir = tempfile::tempdir().unwrap();
        let exe = scripted(dir.path(), sends);
        // Another test's fork can briefly hold the script's write
        // descriptor (until its exec closes it): exec then fails with
        // ETXTBSY. A real component binary is never being written.
        let mut tries = 0;
        let (owner, _ready, chan) = loop {
            match Component::start::<Scripted>(&exe, &serde_json::json!({}), &[]) {
                Err(ComponentError::Spawn { source, .. })
                    if source == nix::errno::Errno::ETXTBSY && tries < 50 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r?,
            }
        };
        let (ev_tx, ev_rx) = mpsc::channel();
        let (end_tx, end_rx) = mpsc::channel();
        owner
            .supervise::<Scripted>(
                chan,
                move |e| {
                    let _ = ev_tx.send(e);
                },
                move |end| {
                    let _ = end_tx.send(end);
                },
            )
            .unwrap();
        let ended = end_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        drop(owner);
        Ok((ev_rx.try_iter().collect(), ended))
    }

    #[test]
    fn events_are_delivered_in_order_until_the_component_ends() {
        let (events, ended) = run(&[
            &ready(),
            br#"{"type":"event","event":{"n":1}}"#,
            br#"{"type":"event","event":{"n":2}}"#,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            events,
            [serde_json::json!({"n": 1}), serde_json::json!({"n": 2})]
        );
        assert_eq!(ended, Ended::Died);
    }

    /// A message that does not parse is a malformed end, never skipped:
    /// nothing after it is delivered.
    #[test]
    fn a_message_that_does_not_parse_ends_the_component_as_malformed() {
        let (events, ended) = run(&[
            &ready(),
            br#"{"type":"event","event":{"n":1}}"#,
            b"\xff not json",
            br#"{"type":"event","event":{"n":2}}"#,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(events, [serde_json::json!({"n": 1})]);
        assert!(matches!(ended, Ended::Malformed(_)), "{ended:?}");
    }

    /// A well-formed message out of protocol (a second ready) is malformed
    /// too.
    #[test]
    fn a_message_out_of_protocol_ends_the_component_as_malformed() {
        let (_, ended) = run(&[&ready(), &ready()]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(ended, Ended::Malformed(_)), "{ended:?}");
    }

    /// Before ready: an event, another protocol version or garbage is a
    /// start-up error naming what was wrong.
    #[test]
    fn start_up_refuses_anything_but_a_ready_of_its_version() {
        let cases: [(&[u8], &str); 3] = [
            (br#"{"type":"event","event":{}}"#, "an event before ready"),
            (
                br#"{"type":"ready","version":999,"ready":{}}"#,
                "protocol version 999",
            ),
            (b"garbage", "scripted"),
        ];
        for (first, want) in cases {
            let err = run(&[first])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    /// A failure reported while serving ends it with that failure.
    #[test]
    fn a_reported_failure_ends_the_component_with_its_stage() {
        let (_, ended) = run(&[
            &ready(),
            br#"{"type":"failed","failure":{"stage":"serve","error":"boom"}}"#,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        match ended {
            Ended::Failed(f) => assert_eq!((f.stage.as_str(), f.error.as_str()), ("serve", "boom")),
            other => panic!("{other:?}"),
        }
    }
}
