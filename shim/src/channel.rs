//! The typed control channel between the broker and a sandbox's shim.
//!
//! One `SOCK_SEQPACKET` Unix socket pair per sandbox: each message is one
//! datagram of JSON, so message boundaries are kept by the kernel and two
//! senders (the launcher and pid 1) never interleave. File descriptors for an
//! exec's stdio travel beside the message as `SCM_RIGHTS`. Both ends are
//! blocking; the broker serves its end from a dedicated thread.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};

use crate::selftest::SelfTestReport;
use crate::spec::{ExecRequest, SandboxSpec};

/// Largest message either side accepts; a spec or exec request is a few KiB.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Most descriptors one message may carry (stdin, stdout, stderr).
const MAX_FDS: usize = 3;

/// Messages the broker sends to the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToShim {
    /// First message: what to build. Read by the launcher.
    Spec(Box<SandboxSpec>),
    /// Run a command; carries stdin, stdout and stderr as `SCM_RIGHTS`.
    Exec(ExecRequest),
    /// Deliver a signal to an exec's process group.
    Signal {
        /// The exec the signal is for.
        exec_id: u64,
        /// Signal number.
        signal: i32,
    },
    /// Kill every process in the sandbox and exit.
    Shutdown,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// Messages the shim sends to the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromShim {
    /// The launcher cloned pid 1 and wrote its id maps.
    Launched {
        /// Host pid of the sandbox's pid 1.
        init_pid: i32,
    },
    /// Setup finished; the jail self-test ran in a probe child.
    Ready {
        /// What the probe saw from inside.
        selftest: Box<SelfTestReport>,
        /// Landlock ABI the kernel gave.
        landlock_abi: u8,
        /// Version of the seccomp profile installed.
        seccomp_profile: String,
        /// How long each setup stage took inside the sandbox, µs.
        #[serde(default)]
        stages_us: Vec<(String, u64)>,
    },
    /// Setup failed; nothing will run.
    SetupFailed {
        /// The stage that failed (e.g. "mount /proc").
        stage: String,
        /// What went wrong.
        error: String,
    },
    /// An exec's process started (after its own jail self-test passed).
    Started {
        /// The exec.
        exec_id: u64,
        /// Its pid inside the sandbox.
        pid: i32,
    },
    /// An exec could not start: jail self-test failure, command not found...
    ExecFailed {
        /// The exec.
        exec_id: u64,
        /// Why.
        error: String,
        /// The status a shell would give (126, 127).
        code: i32,
    },
    /// An exec's process ended.
    Exited {
        /// The exec.
        exec_id: u64,
        /// How it ended.
        status: ExitStatus,
    },
}

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket call failed.
    #[error("control socket {op} failed")]
    Io {
        /// sendmsg, recvmsg, socketpair.
        op: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The peer closed its end.
    #[error("control socket closed by peer")]
    Closed,
    /// A message did not parse.
    #[error("malformed control message")]
    Malformed(#[source] serde_json::Error),
    /// A message was larger than [`MAX_MESSAGE`].
    #[error("control message of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// One end of the control channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair (close-on-exec: the broker hands one end to the shim
    /// explicitly as fd 3).
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|source| ChannelError::Io {
            op: "socketpair",
            source,
        })?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps an inherited descriptor.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// The descriptor, to pass to a child.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Consumes the channel, returning the descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends one message (no descriptors) unless the socket's buffer is
    /// full: then nothing is sent and `Ok(false)`.
    ///
    /// # Errors
    /// As [`Channel::send`].
    pub fn try_send<T: Serialize>(&self, msg: &T) -> Result<bool, ChannelError> {
        self.send_flags(msg, &[], MsgFlags::MSG_DONTWAIT)
    }

    /// Sends one message, with descriptors attached.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        self.send_flags(msg, fds, MsgFlags::empty()).map(drop)
    }

    /// One `sendmsg` of `msg` (never SIGPIPE); `Ok(false)` when a
    /// non-blocking send found the buffer full.
    fn send_flags<T: Serialize>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        flags: MsgFlags,
    ) -> Result<bool, ChannelError> {
        let bytes = serde_json::to_vec(msg).map_err(ChannelError::Malformed)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge(bytes.len()));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs = if raw.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        let iov = [IoSlice::new(&bytes)];
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL | flags,
                None,
            ) {
                Ok(_) => return Ok(true),
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) if flags.contains(MsgFlags::MSG_DONTWAIT) => {
                    return Ok(false);
                }
                Err(nix::Error::EPIPE) | Err(nix::Error::ECONNRESET) => {
                    return Err(ChannelError::Closed);
                }
                Err(source) => {
                    return Err(ChannelError::Io {
                        op: "sendmsg",
                        source,
                    });
                }
            }
        }
    }

    /// Receives one message and the descriptors that came with it.
    pub fn recv<T: for<'de> Deserialize<'de>>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (n, fds, truncated) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = c {
                                for r in raw {
                                    fds.push(crate::sys::own_received_fd(r));
                                }
                            }
                        }
                    }
                    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC)
                        || msg.flags.contains(MsgFlags::MSG_CTRUNC);
                    break (msg.bytes, fds, truncated);
                }
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::ECONNRESET) => return Err(ChannelError::Closed),
                Err(source) => {
                    return Err(ChannelError::Io {
                        op: "recvmsg",
                        source,
                    });
                }
            }
        };
        if n == 0 && fds.is_empty() {
            return Err(ChannelError::Closed);
        }
        if truncated {
            return Err(ChannelError::TooLarge(n));
        }
        let msg = serde_json::from_slice(&buf[..n]).map_err(ChannelError::Malformed)?;
        Ok((msg, fds))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn messages_and_fds_cross_intact() {
        let (a, b) = Channel::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        a.send(
            &ToShim::Signal {
                exec_id: 7,
                signal: 2,
            },
            &[w.as_fd()],
        )
        .unwrap();
        drop(w);
        let (msg, fds): (ToShim, _) = b.recv().unwrap();
        assert!(matches!(
            msg,
            ToShim::Signal {
                exec_id: 7,
                signal: 2
            }
        ));
        assert_eq!(fds.len(), 1);
        let mut wf = std::fs::File::from(fds.into_iter().next().unwrap());
        wf.write_all(b"hi").unwrap();
        drop(wf);
        let mut s = String::new();
        std::fs::File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "hi");
    }

    #[test]
    fn closed_peer_is_reported() {
        let (a, b) = Channel::pair().unwrap();
        drop(a);
        assert!(matches!(b.recv::<ToShim>(), Err(ChannelError::Closed)));
    }

    #[test]
    fn shell_code_follows_shell_convention() {
        let s = ExitStatus {
            code: None,
            signal: Some(9),
        };
        assert_eq!(s.shell_code(), 137);
    }
}
