//! Running commands: environment, identity and limits of an exec, the
//! streams between the caller and the command, and the count of commands
//! in flight that pool refills wait on.

use super::*;

/// A running exec: its events, and a way to signal it.
#[derive(Debug)]
pub struct ExecHandle {
    /// Exec id.
    pub exec_id: u64,
    /// Output and the final exit.
    pub events: mpsc::Receiver<ExecEvent>,
    /// The sandbox, to forward signals.
    pub sandbox: Arc<Sandbox>,
}

impl ExecHandle {
    /// Forwards a signal to the command's process group.
    pub fn signal(&self, sig: i32) {
        self.sandbox.signal(self.exec_id, sig);
    }
}

/// The sandbox's environment with an exec's entries on top: an entry of
/// `extra` replaces the one with the same key (the last one wins), in
/// time linear in the number of entries.
pub(super) fn merge_env(base: &[String], extra: Vec<String>) -> Vec<String> {
    pub(super) fn key(e: &str) -> &str {
        e.split_once('=').map_or(e, |(k, _)| k)
    }
    let mut slot: HashMap<String, usize> = HashMap::with_capacity(base.len() + extra.len());
    let mut out: Vec<Option<String>> = Vec::with_capacity(base.len() + extra.len());
    for e in base.iter().cloned().chain(extra) {
        if let Some(old) = slot.insert(key(&e).to_string(), out.len())
            && let Some(o) = out.get_mut(old)
        {
            *o = None;
        }
        out.push(Some(e));
    }
    out.into_iter().flatten().collect()
}

/// What a command's stdin reads, then EOF.
#[derive(Debug)]
pub enum Stdin {
    /// These bytes.
    Bytes(Vec<u8>),
    /// Chunks as they arrive (an upload), until the sender goes.
    Stream(mpsc::Receiver<hyper::body::Bytes>),
    /// An attached client's input: bytes, resizes, signals.
    Attached(mpsc::Receiver<Input>),
}

/// The broker's ends of a command's stdio.
enum Ours {
    /// stdin's writing end, stdout's and stderr's reading ends.
    Pipes(OwnedFd, OwnedFd, OwnedFd),
    /// The terminal's master side.
    Tty(OwnedFd),
}

/// An attached client's input.
#[derive(Debug)]
pub enum Input {
    /// Bytes for stdin (or the terminal).
    Data(hyper::body::Bytes),
    /// The terminal's new size (rows, columns).
    Resize(u16, u16),
    /// A signal for the command's process group.
    Signal(i32),
    /// No more stdin.
    Eof,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn pump(
    sb: &Arc<Sandbox>,
    exec_id: u64,
    stdin_w: OwnedFd,
    out_r: OwnedFd,
    err_r: OwnedFd,
    stdin: Stdin,
    outcome: tokio::sync::oneshot::Receiver<ExecOutcome>,
    tx: &mpsc::Sender<ExecEvent>,
    started: Instant,
    timeout: Option<Duration>,
) -> ExecExit {
    use tokio::net::unix::pipe;
    // stdin: write what was given, then EOF.
    if let Ok(mut w) = pipe::Sender::from_owned_fd(stdin_w) {
        let sb_sig = Arc::clone(sb);
        tokio::spawn(async move {
            match stdin {
                Stdin::Bytes(b) => {
                    let _ = w.write_all(&b).await;
                }
                Stdin::Stream(mut rx) => {
                    while let Some(chunk) = rx.recv().await {
                        if w.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                }
                Stdin::Attached(mut rx) => {
                    let mut w = Some(w);
                    while let Some(input) = rx.recv().await {
                        match input {
                            Input::Data(b) => {
                                if let Some(pipe) = w.as_mut()
                                    && pipe.write_all(&b).await.is_err()
                                {
                                    w = None;
                                }
                            }
                            // Closing the pipe is the EOF.
                            Input::Eof => w = None,
                            Input::Signal(n) => sb_sig.signal(exec_id, n),
                            Input::Resize(..) => {}
                        }
                    }
                }
            }
        });
    }
    let mut readers = Vec::new();
    for (fd, is_err) in [(out_r, false), (err_r, true)] {
        let tx = tx.clone();
        let sb = Arc::clone(sb);
        readers.push(tokio::spawn(async move {
            let Ok(mut r) = pipe::Receiver::from_owned_fd(fd) else {
                return;
            };
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let chunk = Chunk::new(buf[..n].to_vec());
                        let ev = if is_err {
                            ExecEvent::Stderr(chunk)
                        } else {
                            ExecEvent::Stdout(chunk)
                        };
                        if tx.send(ev).await.is_err() {
                            // Nobody listens any more: stop the command.
                            sb.signal(exec_id, libc::SIGKILL);
                            return;
                        }
                    }
                }
            }
        }));
    }
    let (outcome, timed_out) = await_outcome(sb, exec_id, outcome, tx, timeout).await;
    // Output written just before exit is still in the pipes: drain it, but
    // do not wait forever on a background process that kept them open.
    for mut r in readers {
        if tokio::time::timeout(Duration::from_millis(500), &mut r)
            .await
            .is_err()
        {
            r.abort();
        }
    }
    sb.exit_of(outcome, started, timed_out)
}

/// Waits for the command's end: killed at `timeout`, or as soon as nobody
/// listens to `tx` any more.
async fn await_outcome(
    sb: &Arc<Sandbox>,
    exec_id: u64,
    outcome: tokio::sync::oneshot::Receiver<ExecOutcome>,
    tx: &mpsc::Sender<ExecEvent>,
    timeout: Option<Duration>,
) -> (ExecOutcome, bool) {
    let mut timed_out = false;
    let outcome = {
        let closed = tx.clone();
        let wait = async {
            tokio::select! {
                o = outcome => o.unwrap_or(ExecOutcome::SandboxGone),
                _ = closed.closed() => {
                    sb.signal(exec_id, libc::SIGKILL);
                    ExecOutcome::SandboxGone
                }
            }
        };
        match timeout {
            Some(t) => {
                tokio::pin!(wait);
                tokio::select! {
                    o = &mut wait => o,
                    _ = tokio::time::sleep(t) => {
                        timed_out = true;
                        sb.signal(exec_id, libc::SIGKILL);
                        wait.await
                    }
                }
            }
            None => wait.await,
        }
    };
    (outcome, timed_out)
}

/// Moves a terminal's bytes: what the command writes on it becomes
/// stdout events; an attached client's input is typed into it, resizes
/// and signals applied. Ends with the command.
#[allow(clippy::too_many_arguments)]
pub(super) async fn pump_tty(
    sb: &Arc<Sandbox>,
    exec_id: u64,
    master: OwnedFd,
    stdin: Stdin,
    outcome: tokio::sync::oneshot::Receiver<ExecOutcome>,
    tx: &mpsc::Sender<ExecEvent>,
    started: Instant,
    timeout: Option<Duration>,
) -> ExecExit {
    let nonblocking = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL)
        .map(nix::fcntl::OFlag::from_bits_truncate)
        .and_then(|f| {
            nix::fcntl::fcntl(
                &master,
                nix::fcntl::FcntlArg::F_SETFL(f | nix::fcntl::OFlag::O_NONBLOCK),
            )
        });
    let master = match nonblocking
        .map_err(std::io::Error::from)
        .and_then(|_| crate::sys::async_fd(master))
    {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::warn!(error = %e, "terminal not pollable");
            sb.signal(exec_id, libc::SIGKILL);
            let (o, t) = await_outcome(sb, exec_id, outcome, tx, timeout).await;
            return sb.exit_of(o, started, t);
        }
    };
    let input = {
        let m = Arc::clone(&master);
        let sb = Arc::clone(sb);
        tokio::spawn(async move {
            match stdin {
                Stdin::Bytes(b) => {
                    let _ = tty_write(&m, &b).await;
                }
                Stdin::Stream(mut rx) => {
                    while let Some(chunk) = rx.recv().await {
                        if tty_write(&m, &chunk).await.is_err() {
                            return;
                        }
                    }
                }
                Stdin::Attached(mut rx) => {
                    while let Some(input) = rx.recv().await {
                        match input {
                            Input::Data(b) => {
                                if tty_write(&m, &b).await.is_err() {
                                    return;
                                }
                            }
                            Input::Resize(rows, cols) => {
                                let _ = crate::sys::set_winsize(m.get_ref().as_fd(), rows, cols);
                            }
                            Input::Signal(n) => sb.signal(exec_id, n),
                            // End of input on a terminal is its EOF character.
                            Input::Eof => {
                                let _ = tty_write(&m, b"\x04").await;
                            }
                        }
                    }
                }
            }
        })
    };
    let reader = {
        let m = Arc::clone(&master);
        let tx = tx.clone();
        let sb = Arc::clone(sb);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let Ok(mut guard) = m.readable().await else {
                    return;
                };
                match guard.try_io(|fd| {
                    nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)
                }) {
                    // EIO: every end of the terminal inside is closed.
                    Ok(Ok(0) | Err(_)) => return,
                    Ok(Ok(n)) => {
                        let chunk = Chunk::new(buf.get(..n).unwrap_or_default().to_vec());
                        if tx.send(ExecEvent::Stdout(chunk)).await.is_err() {
                            sb.signal(exec_id, libc::SIGKILL);
                            return;
                        }
                    }
                    Err(_would_block) => {}
                }
            }
        })
    };
    let (outcome, timed_out) = await_outcome(sb, exec_id, outcome, tx, timeout).await;
    let mut reader = reader;
    if tokio::time::timeout(Duration::from_millis(500), &mut reader)
        .await
        .is_err()
    {
        reader.abort();
    }
    input.abort();
    sb.exit_of(outcome, started, timed_out)
}

/// Writes all of `data` to a non-blocking terminal.
async fn tty_write(m: &tokio::io::unix::AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = m.writable().await?;
        match guard
            .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => data = data.get(n..).unwrap_or_default(),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Counts one running command while alive.
pub(super) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub(super) fn enter(n: &Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(n))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Broker {
    /// Starts a command; output and the exit arrive on the handle.
    pub async fn exec(
        &self,
        p: &Principal,
        id: &SandboxId,
        body: ExecSpec,
    ) -> Result<ExecHandle, BrokerError> {
        let stdin = Stdin::Bytes(body.stdin.clone());
        self.exec_with(p, id, body, None, stdin).await
    }

    /// Starts a command whose stdin (or terminal) is fed as `stdin` says:
    /// an attached client's input, streamed.
    pub async fn exec_attached(
        &self,
        p: &Principal,
        id: &SandboxId,
        body: ExecSpec,
        stdin: Stdin,
    ) -> Result<ExecHandle, BrokerError> {
        self.exec_with(p, id, body, None, stdin).await
    }

    /// Runs a file operation in the sandbox, jailed as a command of its
    /// default user would be (see [`airlock_shim::files`]); its data moves
    /// on the handle's stdout and on `stdin`.
    pub async fn file_op(
        &self,
        p: &Principal,
        id: &SandboxId,
        op: airlock_shim::files::FileOp,
        stdin: Stdin,
    ) -> Result<ExecHandle, BrokerError> {
        for path in op.paths() {
            if !path.starts_with('/') || path.contains('\0') {
                return Err(BrokerError::BadRequest(format!(
                    "path {:?} must be absolute (a path inside the sandbox)",
                    path.chars().take(200).collect::<String>()
                )));
            }
            if path.len() > 4096 {
                return Err(BrokerError::BadRequest(format!(
                    "path of {} bytes is over the limit of 4096",
                    path.len()
                )));
            }
        }
        let name = match &op {
            airlock_shim::files::FileOp::Read { .. } => "read",
            airlock_shim::files::FileOp::Write { .. } => "write",
            airlock_shim::files::FileOp::List { .. } => "list",
            airlock_shim::files::FileOp::Stat { .. } => "stat",
            airlock_shim::files::FileOp::Mkdir { .. } => "mkdir",
            airlock_shim::files::FileOp::Remove { .. } => "remove",
            airlock_shim::files::FileOp::Rename { .. } => "rename",
            airlock_shim::files::FileOp::Symlink { .. } => "symlink",
        };
        let mut argv = vec![format!("airlock-files:{name}")];
        argv.extend(op.paths().iter().map(|s| (*s).to_string()));
        let spec = ExecSpec {
            argv,
            env: Vec::new(),
            cwd: "/".into(),
            user: crate::spec::ExecUser::Default,
            stdin: Vec::new(),
            timeout: None,
            tty: None,
        };
        self.exec_with(p, id, spec, Some(op), stdin).await
    }

    async fn exec_with(
        &self,
        p: &Principal,
        id: &SandboxId,
        body: ExecSpec,
        file_op: Option<airlock_shim::files::FileOp>,
        stdin: Stdin,
    ) -> Result<ExecHandle, BrokerError> {
        let sb = self.get(p, id)?;
        if !sb.is_running() {
            return Err(BrokerError::NotRunning(id.to_string()));
        }
        let env = merge_env(&lock_or_recover(&sb.env), body.env.clone());
        let (uid, gid, user) = match body.user {
            ExecUser::Default => (sb.user_ids.0, sb.user_ids.1, sb.user.clone()),
            ExecUser::Named(u) => (u.ids().0, u.ids().1, u.name().to_string()),
            ExecUser::Uid(u) => (u, u, u.to_string()),
        };
        let cwd = body.cwd.clone();
        let pipe = || -> Result<(OwnedFd, OwnedFd), BrokerError> {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| BrokerError::Internal(format!("pipe: {e}")))
        };
        // The command's stdio: three pipes, or one terminal whose other
        // end the broker keeps.
        let (theirs, ours) = match body.tty {
            None => {
                let (in_r, in_w) = pipe()?;
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                ([in_r, out_w, err_w], Ours::Pipes(in_w, out_r, err_r))
            }
            Some((rows, cols)) => {
                let size = nix::pty::Winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                let pty = nix::pty::openpty(Some(&size), None)
                    .map_err(|e| BrokerError::Internal(format!("openpty: {e}")))?;
                let dup = |fd: &OwnedFd| {
                    fd.try_clone()
                        .map_err(|e| BrokerError::Internal(format!("dup terminal: {e}")))
                };
                let (a, b) = (dup(&pty.slave)?, dup(&pty.slave)?);
                ([a, b, pty.slave], Ours::Tty(pty.master))
            }
        };
        let req = ExecRequest {
            exec_id: 0,
            argv: body.argv.clone(),
            env,
            cwd: cwd.clone(),
            uid,
            gid,
            file_op,
            tty: body.tty.is_some(),
        };
        let encoded = crate::spec::encoded_len(&req);
        if encoded > crate::spec::MAX_EXEC_MESSAGE_BYTES {
            return Err(BrokerError::BadRequest(format!(
                "argv and env (with the sandbox's env) encode to {encoded} bytes; at most {} \
                 reach the sandbox",
                crate::spec::MAX_EXEC_MESSAGE_BYTES
            )));
        }
        let before = sb.current_counters();
        let started = Instant::now();
        let in_flight = InFlight::enter(&self.execs_in_flight);
        let (exec_id, outcome_rx) = {
            // No command starts while a snapshot or restore runs.
            let _gate = sb.layer_gate.try_read().map_err(|_| {
                BrokerError::Conflict(format!(
                    "sandbox {id}: a snapshot or restore is under way; try again"
                ))
            })?;
            match sb.send_exec(req, theirs) {
                Ok(x) => x,
                Err(e) => {
                    self.metrics
                        .exec_done(false, started.elapsed().as_secs_f64());
                    return Err(BrokerError::Internal(e));
                }
            }
        };
        sb.audit.publish(
            &AuditEvent::ExecStarted {
                exec_id,
                argv: body.argv.clone(),
                cwd: cwd.clone(),
                user: (user.clone(), uid),
            }
            .into_record(Some(sb.id.as_str()), Some(&sb.agent)),
        );
        let metrics = Arc::clone(&self.metrics);
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.try_send(ExecEvent::Started { exec_id });
        let sb2 = Arc::clone(&sb);
        let timeout = body.timeout;
        let argv = body.argv.clone();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let exit = match ours {
                Ours::Pipes(in_w, out_r, err_r) => {
                    pump(
                        &sb2, exec_id, in_w, out_r, err_r, stdin, outcome_rx, &tx, started, timeout,
                    )
                    .await
                }
                Ours::Tty(master) => {
                    pump_tty(
                        &sb2, exec_id, master, stdin, outcome_rx, &tx, started, timeout,
                    )
                    .await
                }
            };
            let after = sb2.current_counters();
            let mut exit = exit;
            if after.oom_kills > before.oom_kills && exit.signal == Some(libc::SIGKILL) {
                exit.oom = true;
            }
            if after.pids_max_hits > before.pids_max_hits {
                exit.pids_limit_hit = true;
            }
            sb2.audit_limit_hits(before, after, Some(exec_id));
            sb2.audit.event(
                Some(sb2.id.as_str()),
                Some(&sb2.agent),
                AuditEvent::ExecExit {
                    exec_id,
                    argv,
                    cwd,
                    user: (user, uid),
                    exit: exit.clone(),
                },
            );
            metrics.exec_done(true, started.elapsed().as_secs_f64());
            let _ = tx.send(ExecEvent::Exit(exit)).await;
        });
        Ok(ExecHandle {
            exec_id,
            events: rx,
            sandbox: sb,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn merged_env_replaces_by_key_and_keeps_order() {
        let base = vec!["A=1".to_string(), "B=2".to_string(), "C=3".to_string()];
        let extra = vec!["B=x".to_string(), "D=4".to_string(), "B=y".to_string()];
        assert_eq!(merge_env(&base, extra), ["A=1", "C=3", "D=4", "B=y"]);
        // Linear: 200,000 entries merge at once.
        let many: Vec<String> = (0..200_000).map(|i| format!("K{i}=v")).collect();
        assert_eq!(merge_env(&many, many.clone()).len(), 200_000);
    }
}
