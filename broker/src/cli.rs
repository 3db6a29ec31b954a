//! The `airlock` command line. It talks to brokerd over its socket when one
//! is running and otherwise starts an embedded broker in-process (only
//! `run` and `audit` make sense without a daemon: an embedded broker lives
//! for one command).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::api::types::{CreateSandbox, ExecBody, ExecEvent, ExecExit, LimitsRequest, SandboxInfo};
use crate::audit::AuditRow;
use crate::authz::Principal;
use crate::broker::{Broker, BrokerError};
use crate::client::{ClientError, RemoteClient, enc};
use crate::config::{BrokerConfig, DEFAULT_CONFIG};
use crate::spec::{CreateSpec, ExecId, ExecSpec, SandboxId};
use crate::util::{parse_secs, parse_size};

/// Exit status for airlock's own errors (the command never ran).
pub const EXIT_AIRLOCK_ERROR: i32 = 125;

#[derive(Debug, Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run untrusted commands in airlock sandboxes"
)]
struct Cli {
    /// Talk to brokerd on this socket (error if it does not answer);
    /// also from `AIRLOCK_SOCKET`. `--embedded` wins over both.
    #[arg(long, global = true, env = "AIRLOCK_SOCKET")]
    socket: Option<PathBuf>,
    /// Use an in-process broker even if brokerd is running.
    #[arg(long, global = true)]
    embedded: bool,
    /// Broker config for embedded mode.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Args, Clone, Default)]
struct CreateOpts {
    /// Agent to act for (default: yours).
    #[arg(long)]
    agent: Option<String>,
    /// Host directory to show at /workspace (default: the agent's own).
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Host directory to use as the read-only base (default: the host's /usr, /etc...).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Start from a snapshot, `SANDBOX_ID:NAME` (see `airlock snapshot`):
    /// its files, in a workspace branch of this sandbox's own.
    #[arg(long, value_name = "ID:NAME", conflicts_with = "workspace")]
    from_snapshot: Option<String>,
    /// Default user inside: sandbox (uid 1000) or root (uid 0 inside, unprivileged outside).
    #[arg(long)]
    user: Option<String>,
    /// Environment for commands, KEY=VALUE (repeatable). Nothing else is passed.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Memory limit, e.g. 512M, 2G (default 1G).
    #[arg(long)]
    memory: Option<String>,
    /// Most processes and threads (default 512).
    #[arg(long)]
    pids: Option<u64>,
    /// Disk the sandbox may add across /tmp, every other write outside
    /// /workspace and /workspace itself, e.g. 500M, 20G (default 10G).
    #[arg(long)]
    disk: Option<String>,
    /// Files and directories it may add there (default 1048576).
    #[arg(long)]
    inodes: Option<u64>,
    /// CPUs, e.g. 0.5, 2 (default 1).
    #[arg(long)]
    cpus: Option<f64>,
    /// Kill the whole sandbox after this long, e.g. 30s, 5m.
    #[arg(long)]
    timeout: Option<String>,
    /// Network: none (loopback only), open (any public address), or allow
    /// (only --allow rules). Default: the broker's configured default.
    #[arg(long = "net")]
    net: Option<String>,
    /// Allow DOMAIN, *.DOMAIN, CIDR or IP, optionally :PORT or :LOW-HIGH
    /// (repeatable; implies --net allow).
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Host GPUs to grant, comma-separated: indices (0,2), UUIDs
    /// (GPU-8f2c...), CDI names (nvidia.com/gpu=0) or all; inside they are
    /// /dev/nvidia0... in this order.
    #[arg(long = "gpu", value_delimiter = ',')]
    gpu: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a sandbox, run one command in it, destroy it.
    Run {
        #[command(flatten)]
        opts: CreateOpts,
        /// Working directory inside (default /workspace).
        #[arg(long)]
        cwd: Option<String>,
        /// Pass this process's stdin to the command.
        #[arg(long)]
        stdin: bool,
        /// Keep stdin open and stream it to the command as it comes.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Run the command on a terminal (job control, Ctrl-C, resizes).
        #[arg(short = 't', long)]
        tty: bool,
        /// The command.
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// Create a sandbox and print its id.
    Create {
        #[command(flatten)]
        opts: CreateOpts,
    },
    /// Run a command in an existing sandbox.
    Exec {
        /// Sandbox id.
        id: String,
        /// Extra environment, KEY=VALUE.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Working directory inside.
        #[arg(long)]
        cwd: Option<String>,
        /// sandbox, root, or a uid inside.
        #[arg(long)]
        user: Option<String>,
        /// Kill the command after this long.
        #[arg(long)]
        timeout: Option<String>,
        /// Pass this process's stdin to the command.
        #[arg(long)]
        stdin: bool,
        /// Keep stdin open and stream it to the command as it comes.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Run the command on a terminal (job control, Ctrl-C, resizes).
        #[arg(short = 't', long)]
        tty: bool,
        /// The command.
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// List sandboxes.
    Ls,
    /// Show one sandbox.
    Inspect {
        /// Sandbox id.
        id: String,
    },
    /// Serve a host port (127.0.0.1 by default) by a sandbox port, e.g.
    /// an agent's dev server: `airlock port-forward ID 8000` or
    /// `ID 9000:8000`. The forward lasts as long as the sandbox, or until
    /// `--remove HOSTPORT`; with no port, lists the sandbox's forwards.
    PortForward {
        /// Sandbox id.
        id: String,
        /// `PORT` (any free host port) or `HOSTPORT:PORT`.
        #[arg(conflicts_with = "remove")]
        ports: Option<String>,
        /// Host address to listen on (default 127.0.0.1).
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Stop serving this host port (connections already made go on).
        #[arg(long, value_name = "HOSTPORT")]
        remove: Option<u16>,
    },
    /// Snapshot a sandbox's files (its copy-on-write layer and its
    /// agent's workspace) in O(1) and print the snapshot's name:
    /// `airlock snapshot ID [--name NAME]`; `airlock snapshot rm ID NAME`
    /// removes one. The sandbox must be idle.
    Snapshot {
        /// `ID`, or `rm ID NAME`.
        #[arg(required = true, num_args = 1..=3)]
        args: Vec<String>,
        /// The snapshot's name (default snap-N).
        #[arg(long)]
        name: Option<String>,
    },
    /// Kill every process in a sandbox but its init (running commands end
    /// with SIGKILL; background ones a command left, which later commands
    /// cannot signal, go too); the sandbox stays.
    Kill {
        /// Sandbox id.
        id: String,
    },
    /// List a sandbox's snapshots: name, time, size.
    Snapshots {
        /// Sandbox id.
        id: String,
    },
    /// Bring a sandbox's files back to a snapshot (it must be idle); later
    /// snapshots stay.
    Restore {
        /// Sandbox id.
        id: String,
        /// Snapshot name.
        name: String,
    },
    /// Destroy sandboxes.
    Rm {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Query the audit log.
    Audit {
        /// Only this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only these kinds (comma-separated): sandbox, exec, fs, denial, limit, jail, auth, net, device.
        #[arg(long)]
        kind: Option<String>,
        /// Only rows newer than this: 10m, 2h, 1d, or 2026-11-23T10:00:00Z.
        #[arg(long)]
        since: Option<String>,
        /// At most this many (newest) rows.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Copy files or directories between a sandbox and here, modes kept:
    /// `airlock cp ID:/workspace/out ./out` or `airlock cp ./src ID:/workspace`.
    /// Needs a running brokerd.
    Cp {
        /// `ID:/path` in a sandbox, or a local path.
        src: String,
        /// `ID:/path` in a sandbox, or a local path.
        dst: String,
    },
    /// Follow changes to files under a path in a sandbox (default
    /// /workspace) as they happen, one per line, until interrupted.
    Watch {
        /// The sandbox.
        id: String,
        /// Absolute path inside it.
        #[arg(default_value = "/workspace")]
        path: String,
    },
    /// Serve the Model Context Protocol on stdin/stdout, so an MCP-speaking
    /// agent can create sandboxes, run commands and move files with the
    /// rights of the user who started it. Needs a running brokerd.
    Mcp,
    /// Follow lifecycle events as they happen (sandboxes created and
    /// destroyed, commands started and ended, limits hit), one per line,
    /// until interrupted. Needs a running brokerd.
    Events {
        /// Only this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only these kinds (comma-separated): sandbox, exec, limit.
        #[arg(long)]
        kind: Option<String>,
    },
}

/// The embedded broker of this process, if one was started: its audit rows
/// are flushed before the process exits.
static EMBEDDED: std::sync::OnceLock<Arc<Broker>> = std::sync::OnceLock::new();

/// Where requests go.
enum Backend {
    Embedded(Arc<Broker>, Principal),
    Remote(RemoteClient),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
}

fn build_create(opts: &CreateOpts) -> Result<CreateSandbox, CliError> {
    let memory = opts
        .memory
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(|e| CliError::Usage(format!("--memory: {e}")))?;
    let cpu_millis = match opts.cpus {
        None => None,
        Some(c) if c.is_finite() && c > 0.0 && c <= 1024.0 => {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let m = (c * 1000.0).round() as u64;
            Some(m)
        }
        Some(c) => {
            return Err(CliError::Usage(format!(
                "--cpus {c}: expected e.g. 0.5 or 2"
            )));
        }
    };
    let timeout_secs = opts
        .timeout
        .as_deref()
        .map(parse_secs)
        .transpose()
        .map_err(|e| CliError::Usage(format!("--timeout: {e}")))?;
    let disk = opts
        .disk
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(|e| CliError::Usage(format!("--disk: {e}")))?;
    let limits = (memory.is_some()
        || opts.pids.is_some()
        || cpu_millis.is_some()
        || disk.is_some()
        || opts.inodes.is_some())
    .then_some(LimitsRequest {
        memory_bytes: memory,
        pids: opts.pids,
        cpu_millis,
        nofile: None,
        disk_bytes: disk,
        inodes: opts.inodes,
    });
    let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    use airlock_net::policy::{Mode, NetworkSpec};
    let mode = match opts.net.as_deref() {
        None if opts.allow.is_empty() => None,
        None | Some("allow") => Some(Mode::Allow),
        Some("none") => Some(Mode::None),
        Some("open") => Some(Mode::Open),
        Some(other) => {
            return Err(CliError::Usage(format!(
                "--net {other:?}: use none, open or allow"
            )));
        }
    };
    if !opts.allow.is_empty() && mode != Some(Mode::Allow) {
        return Err(CliError::Usage(
            "--allow rules need --net allow (or no --net)".into(),
        ));
    }
    let network = mode.map(|mode| NetworkSpec {
        mode,
        allow: opts.allow.clone(),
    });
    Ok(CreateSandbox {
        agent: opts.agent.clone(),
        rootfs: opts.rootfs.as_ref().map(abs),
        workspace: opts.workspace.as_ref().map(abs),
        user: opts.user.clone(),
        limits,
        timeout_secs,
        env: (!opts.env.is_empty()).then(|| opts.env.clone()),
        network,
        from_snapshot: opts.from_snapshot.clone(),
        gpus: opts.gpu.clone(),
    })
}

fn read_stdin(enabled: bool) -> Result<Option<String>, CliError> {
    if !enabled {
        return Ok(None);
    }
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
        .map_err(|e| CliError::Usage(format!("--stdin: cannot read stdin as UTF-8: {e}")))?;
    Ok(Some(s))
}

/// Entry point; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("airlock: cannot start runtime: {e}");
            return EXIT_AIRLOCK_ERROR;
        }
    };
    let json = cli.json;
    let code = rt.block_on(async move {
        match run_cli(cli).await {
            Ok(code) => code,
            Err(e) => {
                if json {
                    println!("{}", serde_json::json!({"error": e.to_string()}));
                } else {
                    eprintln!("airlock: {e}");
                }
                EXIT_AIRLOCK_ERROR
            }
        }
    });
    if let Some(b) = EMBEDDED.get() {
        b.audit_store().flush();
    }
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

async fn backend(cli: &Cli, needs_daemon: Option<&str>) -> Result<Backend, CliError> {
    let cfg =
        BrokerConfig::load_or_default(&cli.config).map_err(|e| CliError::Usage(format!("{e}")))?;
    if !cli.embedded {
        let sock = cli.socket.clone().unwrap_or_else(|| cfg.socket.clone());
        let client = RemoteClient::new(&sock);
        if client.reachable().await {
            return Ok(Backend::Remote(client));
        }
        if cli.socket.is_some() || needs_daemon.is_some() {
            let why = match needs_daemon {
                Some(cmd) => format!(
                    "; `airlock {cmd}` needs a running brokerd (an embedded broker lives for \
                     one command only): start brokerd (see examples/brokerd.service) or use \
                     `airlock run`"
                ),
                None => String::new(),
            };
            return Err(CliError::Usage(format!(
                "no brokerd answers at {}{why}",
                sock.display()
            )));
        }
    } else if let Some(cmd) = needs_daemon {
        return Err(CliError::Usage(format!(
            "`airlock {cmd}` needs a running brokerd: an embedded broker lives for one command only"
        )));
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Usage(format!("cannot locate own binary: {e}")))?;
    // An embedded broker lives for one command: nothing to pre-start.
    let mut cfg = cfg;
    cfg.pool_size = 0;
    let broker = tokio::task::spawn_blocking(move || Broker::start(cfg, exe))
        .await
        .map_err(|e| CliError::Usage(e.to_string()))??;
    let _ = EMBEDDED.set(Arc::clone(&broker));
    let p = Principal {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        pid: i32::try_from(std::process::id()).unwrap_or(0),
    };
    Ok(Backend::Embedded(broker, p))
}

impl Backend {
    async fn create(&self, req: CreateSandbox) -> Result<SandboxInfo, CliError> {
        match self {
            Backend::Embedded(b, p) => {
                let (b, p) = (Arc::clone(b), *p);
                let spec = CreateSpec::try_from(req).map_err(BrokerError::BadRequest)?;
                Ok(tokio::task::spawn_blocking(move || b.create(&p, spec))
                    .await
                    .map_err(|e| CliError::Usage(e.to_string()))??)
            }
            Backend::Remote(c) => Ok(c.create(&req).await?),
        }
    }

    async fn destroy(&self, id: &str) -> Result<(), CliError> {
        match self {
            Backend::Embedded(b, p) => {
                let (b, p, id) = (Arc::clone(b), *p, parse_id(id)?);
                Ok(tokio::task::spawn_blocking(move || b.destroy(&p, &id))
                    .await
                    .map_err(|e| CliError::Usage(e.to_string()))??)
            }
            Backend::Remote(c) => Ok(c.destroy(id).await?),
        }
    }

    /// Runs a command, streaming its output to ours; returns its exit.
    /// Runs `body` attached: this process's stdin streamed in (on a
    /// terminal with `tty`), its output out, until it exits.
    async fn attached(&self, id: &str, body: ExecBody) -> Result<ExecExit, CliError> {
        let tty = body.tty == Some(true);
        let (input, events) = match self {
            Backend::Embedded(b, p) => {
                let spec = ExecSpec::try_from(body).map_err(BrokerError::BadRequest)?;
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                let h = b
                    .exec_attached(p, &parse_id(id)?, spec, crate::broker::Stdin::Attached(rx))
                    .await?;
                (tx, h.events)
            }
            Backend::Remote(c) => c.attach(id, &body).await?,
        };
        crate::cli_tty::interact(input, events, tty).await
    }

    async fn exec(&self, id: &str, body: ExecBody, json: bool) -> Result<ExecExit, CliError> {
        let (mut rx, embedded) = match self {
            Backend::Embedded(b, p) => {
                let spec = ExecSpec::try_from(body).map_err(BrokerError::BadRequest)?;
                let h = b.exec(p, &parse_id(id)?, spec).await?;
                (h.events, Some(((), h.exec_id)))
            }
            Backend::Remote(c) => (c.exec(id, &body).await?, None),
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let mut out = std::io::stdout();
        let mut err = std::io::stderr();
        let mut exec_id = embedded.as_ref().map(|(_, e)| *e);
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = term.recv() => { self.forward(id, exec_id, libc::SIGTERM).await; continue; }
                _ = int.recv() => { self.forward(id, exec_id, libc::SIGINT).await; continue; }
                _ = hup.recv() => { self.forward(id, exec_id, libc::SIGHUP).await; continue; }
            };
            let Some(ev) = ev else {
                return Err(CliError::Usage(
                    "the broker ended the stream without an exit status".into(),
                ));
            };
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string(&ev).unwrap_or_default());
                let _ = out.flush();
            }
            match ev {
                ExecEvent::Started { exec_id: e } => exec_id = Some(e),
                ExecEvent::Stdout(c) if !json => {
                    let _ = out.write_all(&c.bytes());
                    let _ = out.flush();
                }
                ExecEvent::Stderr(c) if !json => {
                    let _ = err.write_all(&c.bytes());
                    let _ = err.flush();
                }
                ExecEvent::Exit(x) => return Ok(x),
                _ => {}
            }
        }
    }

    /// Forwards a signal we received to the running command.
    async fn forward(&self, id: &str, exec_id: Option<u64>, sig: i32) {
        let Some(exec_id) = exec_id else { return };
        match self {
            Backend::Embedded(b, p) => {
                if let Ok(id) = parse_id(id) {
                    let _ = b.signal_exec(p, &id, ExecId(exec_id), sig);
                }
            }
            Backend::Remote(c) => {
                let _ = c.signal(id, exec_id, sig).await;
            }
        }
    }
}

fn exit_note(x: &ExecExit) {
    if let Some(e) = &x.error {
        eprintln!("airlock: {e}");
    }
    if x.oom {
        eprintln!("airlock: the command was killed: out of memory (sandbox memory limit)");
    }
    if x.pids_limit_hit {
        eprintln!("airlock: the sandbox's process limit refused a fork");
    }
    if x.timed_out && x.error.is_none() {
        eprintln!("airlock: the command was killed: timeout");
    }
}

fn print_info(info: &SandboxInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(info).unwrap_or_default());
        return;
    }
    println!("id:          {}", info.id);
    println!("agent:       {}", info.agent);
    println!("state:       {}", info.state);
    println!("user:        {}", info.user);
    println!("workspace:   {}", info.workspace.display());
    println!(
        "limits:      memory {} MiB, pids {}, cpu {:.2}, nofile {}, timeout {}s",
        info.limits.memory_bytes >> 20,
        info.limits.pids,
        info.limits.cpu_millis as f64 / 1000.0,
        info.limits.nofile,
        info.limits.timeout_secs
    );
    println!(
        "host uids:   {}..{}",
        info.host_uid_base,
        info.host_uid_base + 65535
    );
    println!("cgroup:      {:?}", info.cgroup_version);
    println!(
        "counters:    oom kills {}, pids-limit hits {}",
        info.counters.oom_kills, info.counters.pids_max_hits
    );
    println!(
        "disk:        {} of {} MiB, {} of {} inodes",
        info.disk.used_bytes >> 20,
        info.disk.limit_bytes >> 20,
        info.disk.used_inodes,
        info.disk.limit_inodes
    );
    if let Some(w) = &info.workspace_disk {
        println!(
            "workspace:   {} of {} MiB, {} of {} inodes (the agent's, all its sandboxes and snapshots)",
            w.used_bytes >> 20,
            w.limit_bytes >> 20,
            w.used_inodes,
            w.limit_inodes
        );
    }
    println!("landlock:    ABI {}", info.landlock_abi);
    println!("seccomp:     profile {}", info.seccomp_profile);
    match &info.selftest {
        Some(s) if s.passed => println!("self-test:   passed"),
        Some(s) => println!("self-test:   FAILED: {}", s.failures.join("; ")),
        None => println!("self-test:   not run"),
    }
    println!("execs:       {} running", info.execs_running);
}

fn print_rows(rows: &[AuditRow], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
        return;
    }
    for r in rows {
        println!(
            "{} {:<7} {:<12} {:<12} {:<10} {}",
            r.ts_ms,
            r.kind.as_str(),
            r.action,
            r.sandbox_id.as_deref().unwrap_or("-"),
            r.agent.as_deref().unwrap_or("-"),
            r.detail
        );
    }
}

async fn run_cli(cli: Cli) -> Result<i32, CliError> {
    let json = cli.json;
    match &cli.cmd {
        Cmd::Run {
            opts,
            cwd,
            stdin,
            interactive,
            tty,
            argv,
        } => {
            let create = build_create(opts)?;
            let attached = *interactive || *tty;
            let stdin = if attached { None } else { read_stdin(*stdin)? };
            let be = backend(&cli, None).await?;
            let info = be.create(create).await?;
            let body = ExecBody {
                argv: argv.clone(),
                env: None,
                cwd: cwd.clone(),
                user: None,
                stdin,
                timeout_secs: None,
                tty: tty.then_some(true),
                size: tty.then(crate::cli_tty::terminal_size).flatten(),
            };
            let result = if attached {
                be.attached(&info.id, body).await
            } else {
                be.exec(&info.id, body, json).await
            };
            // brokerd owns the cleanup (and recovers it after a crash), so
            // `run` returns with the command's status and lets it finish
            // in the background; an embedded broker must finish first.
            let destroyed = match &be {
                Backend::Remote(c) => c.destroy_detached(&info.id).await.map_err(CliError::from),
                Backend::Embedded(..) => be.destroy(&info.id).await,
            };
            let x = result?;
            destroyed?;
            if !json {
                exit_note(&x);
            }
            Ok(x.shell_code())
        }
        Cmd::Create { opts } => {
            let create = build_create(opts)?;
            let be = backend(&cli, Some("create")).await?;
            let info = be.create(create).await?;
            if json {
                print_info(&info, true);
            } else {
                println!("{}", info.id);
            }
            Ok(0)
        }
        Cmd::Exec {
            id,
            env,
            cwd,
            user,
            timeout,
            stdin,
            interactive,
            tty,
            argv,
        } => {
            let attached = *interactive || *tty;
            let timeout_secs = timeout
                .as_deref()
                .map(parse_secs)
                .transpose()
                .map_err(|e| CliError::Usage(format!("--timeout: {e}")))?;
            let body = ExecBody {
                argv: argv.clone(),
                env: (!env.is_empty()).then(|| env.clone()),
                cwd: cwd.clone(),
                user: user.clone(),
                stdin: if attached { None } else { read_stdin(*stdin)? },
                timeout_secs,
                tty: tty.then_some(true),
                size: tty.then(crate::cli_tty::terminal_size).flatten(),
            };
            let be = backend(&cli, Some("exec")).await?;
            let x = if attached {
                be.attached(id, body).await?
            } else {
                be.exec(id, body, json).await?
            };
            if !json {
                exit_note(&x);
            }
            Ok(x.shell_code())
        }
        Cmd::Ls => {
            let Backend::Remote(c) = backend(&cli, Some("ls")).await? else {
                return Ok(0);
            };
            let list = c.list().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
            } else {
                println!(
                    "{:<14} {:<12} {:<8} {:<8} CREATED",
                    "ID", "AGENT", "STATE", "USER"
                );
                for s in list {
                    println!(
                        "{:<14} {:<12} {:<8} {:<8} {}",
                        s.id, s.agent, s.state, s.user, s.created_ms
                    );
                }
            }
            Ok(0)
        }
        Cmd::Inspect { id } => {
            let Backend::Remote(c) = backend(&cli, Some("inspect")).await? else {
                return Ok(0);
            };
            print_info(&c.inspect(id).await?, json);
            Ok(0)
        }
        Cmd::PortForward {
            id,
            ports: None,
            remove,
            ..
        } => {
            let Backend::Remote(c) = backend(&cli, Some("port-forward")).await? else {
                return Ok(0);
            };
            let list = match remove {
                Some(p) => c.unforward_port(id, *p).await?,
                None => c.ports(id).await?,
            };
            if json {
                println!("{}", serde_json::to_string(&list).unwrap_or_default());
            } else {
                for f in list {
                    let host = std::net::SocketAddr::new(f.host_addr, f.host_port);
                    println!("{host} -> {id}:{}", f.port);
                }
            }
            Ok(0)
        }
        Cmd::PortForward {
            id,
            ports: Some(ports),
            address,
            ..
        } => {
            let (host_port, port) = match ports.split_once(':') {
                Some((h, p)) => (Some(h), p),
                None => (None, ports.as_str()),
            };
            let parse = |what: &str, v: &str| {
                v.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0 || what == "HOSTPORT")
                    .ok_or_else(|| CliError::Usage(format!("{what} {v:?} is not a port")))
            };
            let req = crate::api::types::PortForward {
                port: parse("PORT", port)?,
                host_port: host_port.map(|h| parse("HOSTPORT", h)).transpose()?,
                host_addr: *address,
            };
            let Backend::Remote(c) = backend(&cli, Some("port-forward")).await? else {
                return Ok(0);
            };
            let out = c.forward_port(id, &req).await?;
            if json {
                println!("{out}");
            } else {
                println!(
                    "{}:{} -> {id}:{}",
                    out["host_addr"].as_str().unwrap_or("?"),
                    out["host_port"],
                    req.port
                );
            }
            Ok(0)
        }
        Cmd::Snapshot { args, name } => {
            let Backend::Remote(c) = backend(&cli, Some("snapshot")).await? else {
                return Ok(0);
            };
            match args.as_slice() {
                [rm, id, snap] if rm == "rm" => {
                    c.remove_snapshot(id, snap).await?;
                    if !json {
                        println!("{snap}");
                    }
                }
                [id] => {
                    let info = c.snapshot(id, name.as_deref()).await?;
                    if json {
                        println!("{}", serde_json::to_string(&info).unwrap_or_default());
                    } else {
                        println!("{}", info.name);
                    }
                }
                _ => {
                    return Err(CliError::Usage(
                        "usage: airlock snapshot ID [--name NAME] | airlock snapshot rm ID NAME"
                            .into(),
                    ));
                }
            }
            Ok(0)
        }
        Cmd::Kill { id } => {
            let Backend::Remote(c) = backend(&cli, Some("kill")).await? else {
                return Ok(0);
            };
            let n = c.kill(id).await?;
            if json {
                println!("{}", serde_json::json!({"killed": n}));
            } else {
                println!("{n}");
            }
            Ok(0)
        }
        Cmd::Snapshots { id } => {
            let Backend::Remote(c) = backend(&cli, Some("snapshots")).await? else {
                return Ok(0);
            };
            let list = c.snapshots(id).await?;
            if json {
                println!("{}", serde_json::to_string(&list).unwrap_or_default());
            } else {
                println!("{:<24} {:<24} {:>12}", "NAME", "TAKEN", "SIZE");
                for s in list {
                    println!(
                        "{:<24} {:<24} {:>12}",
                        s.name,
                        crate::util::format_time_ms(s.created_ms),
                        s.bytes.map(crate::util::format_bytes).unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        Cmd::Restore { id, name } => {
            let Backend::Remote(c) = backend(&cli, Some("restore")).await? else {
                return Ok(0);
            };
            let info = c.restore(id, name).await?;
            if json {
                println!("{}", serde_json::to_string(&info).unwrap_or_default());
            } else {
                println!("{}", info.name);
            }
            Ok(0)
        }
        Cmd::Rm { ids } => {
            let be = backend(&cli, Some("rm")).await?;
            let mut code = 0;
            for id in ids {
                match be.destroy(id).await {
                    Ok(()) => {
                        if !json {
                            println!("{id}");
                        }
                    }
                    Err(e) => {
                        eprintln!("airlock: {e}");
                        code = EXIT_AIRLOCK_ERROR;
                    }
                }
            }
            Ok(code)
        }
        Cmd::Audit {
            sandbox,
            agent,
            kind,
            since,
            limit,
        } => {
            let params = crate::api::server::AuditParams {
                sandbox: sandbox.clone(),
                agent: agent.clone(),
                kind: kind.clone(),
                since: since.clone(),
                limit: Some(*limit),
            };
            let rows = match backend(&cli, None).await? {
                Backend::Remote(c) => {
                    let mut q = vec![format!("limit={limit}")];
                    for (k, v) in [
                        ("sandbox", sandbox),
                        ("agent", agent),
                        ("kind", kind),
                        ("since", since),
                    ] {
                        if let Some(v) = v {
                            q.push(format!("{k}={}", enc(v)));
                        }
                    }
                    c.audit(&q.join("&")).await?
                }
                Backend::Embedded(b, p) => {
                    let q = crate::api::server::audit_query(&params)?;
                    let agent = agent.clone();
                    tokio::task::spawn_blocking(move || b.audit(&p, q, agent.as_deref()))
                        .await
                        .map_err(|e| CliError::Usage(e.to_string()))??
                }
            };
            print_rows(&rows, json);
            Ok(0)
        }
        Cmd::Mcp => {
            let Backend::Remote(c) = backend(&cli, Some("mcp")).await? else {
                return Err(CliError::Usage(
                    "`airlock mcp` needs a running brokerd".into(),
                ));
            };
            crate::mcp::serve(c)
                .await
                .map_err(|e| CliError::Usage(format!("mcp: {e}")))?;
            Ok(0)
        }
        Cmd::Cp { src, dst } => {
            let Backend::Remote(c) = backend(&cli, Some("cp")).await? else {
                return Err(CliError::Usage(
                    "`airlock cp` needs a running brokerd".into(),
                ));
            };
            let n = crate::cli_files::cp(&c, src, dst)
                .await
                .map_err(CliError::Usage)?;
            if json {
                println!("{}", serde_json::json!({ "copied": n }));
            }
            Ok(0)
        }
        Cmd::Watch { id, path } => {
            let Backend::Remote(c) = backend(&cli, Some("watch")).await? else {
                return Err(CliError::Usage(
                    "`airlock watch` needs a running brokerd".into(),
                ));
            };
            parse_id(id)?;
            let mut rx = c.watch(id, path).await?;
            let mut out = std::io::stdout().lock();
            while let Some(ev) = rx.recv().await {
                let line = if json {
                    ev.to_string()
                } else {
                    let f = |k: &str| ev[k].as_str().unwrap_or("").to_string();
                    match ev.get("to").and_then(|t| t.as_str()) {
                        Some(to) => format!("{:<8} {} -> {to}", f("event"), f("path")),
                        None => format!("{:<8} {}", f("event"), f("path")),
                    }
                };
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(0);
                }
            }
            Ok(0)
        }
        Cmd::Events {
            sandbox,
            agent,
            kind,
        } => {
            let Backend::Remote(c) = backend(&cli, Some("events")).await? else {
                return Err(CliError::Usage(
                    "`airlock events` needs a running brokerd".into(),
                ));
            };
            let mut q = Vec::new();
            for (k, v) in [("sandbox", sandbox), ("agent", agent), ("kind", kind)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", enc(v)));
                }
            }
            let mut rx = c.events(&q.join("&")).await?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            while let Some(ev) = rx.recv().await {
                let line = if json {
                    ev.to_string()
                } else {
                    let f = |k: &str| ev[k].as_str().unwrap_or("-").to_string();
                    format!(
                        "{} {:<7} {:<9} {:<12} {:<10} {}",
                        ev["ts_ms"],
                        f("kind"),
                        f("action"),
                        f("sandbox_id"),
                        f("agent"),
                        ev["detail"]
                    )
                };
                // A closed stdout (a pipe into `head`) ends the command.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(0);
                }
            }
            Err(CliError::Usage("brokerd closed the event stream".into()))
        }
    }
}

/// A sandbox id given on the command line.
fn parse_id(id: &str) -> Result<SandboxId, CliError> {
    SandboxId::try_from(id).map_err(CliError::Usage)
}
