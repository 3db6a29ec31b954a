//! brokerd: the airlock system service.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "brokerd",
    version,
    about = "airlock broker: owns and serves sandboxes"
)]
struct Args {
    /// Config file (TOML).
    #[arg(long, default_value = airlock_broker::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Override the socket path from the config.
    #[arg(long)]
    socket: Option<PathBuf>,
}

fn main() {
    airlock_broker::dispatch_internal_role();
    airlock_broker::harden_process();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
        // fuser warns on every unimplemented request a sandbox makes: keep
        // sandboxes from flooding the operator's log.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(args) {
        eprintln!("brokerd: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = airlock_broker::config::BrokerConfig::load_or_default(&args.config)?;
    if let Some(s) = args.socket {
        cfg.socket = s;
    }
    let exe = std::env::current_exe().context("locate own binary")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    let broker = airlock_broker::broker::Broker::start(cfg.clone(), exe)?;
    rt.block_on(async {
        if let Some(dir) = cfg.socket.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("create socket directory {}", dir.display()))?;
        }
        match std::fs::remove_file(&cfg.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("remove stale {}", cfg.socket.display()));
            }
        }
        let listener = tokio::net::UnixListener::bind(&cfg.socket)
            .with_context(|| format!("bind {}", cfg.socket.display()))?;
        // The socket file this broker made, to remove only that one at
        // shutdown (a broker started meanwhile may have bound the path).
        let bound = std::fs::symlink_metadata(&cfg.socket)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            })
            .ok();
        std::fs::set_permissions(
            &cfg.socket,
            std::fs::Permissions::from_mode(cfg.socket_mode_bits()?),
        )
        .with_context(|| format!("chmod {}", cfg.socket.display()))?;
        if let Some(gid) = cfg.socket_gid {
            std::os::unix::fs::chown(&cfg.socket, None, Some(gid))
                .with_context(|| format!("chown {}", cfg.socket.display()))?;
        }
        tracing::info!(socket = %cfg.socket.display(), "brokerd listening");
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        airlock_broker::api::server::serve(broker.clone(), listener, shutdown).await?;
        tracing::info!("brokerd shutting down");
        let b = broker.clone();
        tokio::task::spawn_blocking(move || b.shutdown()).await?;
        let still_ours = std::fs::symlink_metadata(&cfg.socket)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                Some((m.dev(), m.ino())) == bound
            })
            .unwrap_or(false);
        if still_ours {
            let _ = std::fs::remove_file(&cfg.socket);
        }
        anyhow::Ok(())
    })
}
