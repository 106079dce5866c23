//! `runnel server`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use runnel::config::ServerConfig;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TOML configuration file (see config/README.md).
    #[arg(long, env = "RUNNEL_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `node_id`.
    #[arg(long)]
    node_id: Option<i32>,
    /// Overrides `listen` (HOST:PORT; port 0 picks a free one).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `advertised_address`.
    #[arg(long)]
    advertised_address: Option<String>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `metrics_listen` (HOST:PORT of `/metrics`, `/health`,
    /// `/ready`; port 0 picks a free one).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log format: human-readable text, or one JSON object per line.
    /// `RUST_LOG` filters (default `info`), e.g. `RUST_LOG=info,openraft=warn`.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "RUNNEL_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A server whose configuration is read and validated, before any runtime
/// exists: the configuration says how many worker threads to start.
pub struct LoadedServer {
    config: ServerConfig,
    log_format: LogFormat,
}

/// Reads the file, the `RUNNEL_…` environment and the flags.
pub fn load(args: ServerArgs) -> anyhow::Result<LoadedServer> {
    // Precedence: flags over RUNNEL_… environment over the file. Flags are
    // applied as the last overrides so one validation sees the result.
    let mut overrides = runnel::config::env_overrides()?;
    let quoted = |s: String| toml::Value::String(s).to_string();
    if let Some(v) = args.node_id {
        overrides.push(("RUNNEL_NODE_ID".into(), v.to_string()));
    }
    if let Some(v) = args.listen {
        overrides.push(("RUNNEL_LISTEN".into(), quoted(v.to_string())));
    }
    if let Some(v) = args.advertised_address {
        overrides.push(("RUNNEL_ADVERTISED_ADDRESS".into(), quoted(v)));
    }
    if let Some(v) = args.metrics_listen {
        overrides.push(("RUNNEL_METRICS_LISTEN".into(), quoted(v.to_string())));
    }
    if let Some(v) = args.data_dir {
        overrides.push(("RUNNEL_DATA_DIR".into(), quoted(v.display().to_string())));
    }
    let config = ServerConfig::load(args.config.as_deref(), overrides)?;
    Ok(LoadedServer {
        config,
        log_format: args.log_format,
    })
}

impl LoadedServer {
    /// The runtime's worker threads, when the configuration sets them.
    pub fn worker_threads(&self) -> Option<usize> {
        (self.config.worker_threads > 0).then_some(self.config.worker_threads)
    }
}

pub async fn run(server: LoadedServer) -> anyhow::Result<()> {
    let LoadedServer { config, log_format } = server;
    init_tracing(log_format);

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        signal.cancel();
    });
    runnel::server::run(config, shutdown)
        .await
        .context("server failed")
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // SIGHUP too (the terminal or SSH session running the node went
        // away): its default action killed the node without a controlled
        // shutdown, its partitions offline until its session ran out. Not
        // when it is ignored (`nohup`): a handler would replace that, and
        // stop a node its operator meant to outlive the session.
        let mut hup = if sighup_ignored() {
            None
        } else {
            signal(SignalKind::hangup()).ok()
        };
        let hangup = async {
            match &mut hup {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                    () = hangup => {}
                }
            }
            Err(_) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    () = hangup => {}
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Whether SIGHUP is ignored (`nohup`), before any handler is installed.
#[cfg(unix)]
fn sighup_ignored() -> bool {
    // SAFETY: with no new action, sigaction only reads the current one
    // into `old`, a zeroed plain C struct.
    #[allow(unsafe_code)]
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}
