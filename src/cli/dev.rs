//! `runnel dev`: a local cluster of broker+controller processes on
//! 127.0.0.1, for trying Runnel with no Docker and no configuration.
//! Ctrl-C or SIGTERM stops every node before `runnel dev` exits.

/// `println!` that ignores a closed output (`runnel dev | head -1`): the
/// cluster goes on until Ctrl-C, and its nodes are stopped on the way
/// out (`outln!` would exit at once, skipping that, and leave them
/// running).
macro_rules! sayln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Number of nodes (each a broker and a controller voter).
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Client port of node 1; node N listens on BASE_PORT + N - 1.
    #[arg(long, default_value_t = 9092)]
    base_port: u16,
    /// Metrics port of node 1 (`/metrics`, `/health`, `/ready`); node N
    /// serves them on METRICS_BASE_PORT + N - 1.
    #[arg(long, default_value_t = 9644)]
    metrics_base_port: u16,
    /// Where the nodes keep their data (node-N/ below it, and dev.toml:
    /// the cluster it holds, which a restart must match).
    #[arg(long, default_value = "data/dev")]
    data_dir: PathBuf,
    /// A config key for every node, as `SECTION.KEY=VALUE` or `KEY=VALUE`
    /// (say `broker.writeback_interval_ms=0`); repeatable. The value is
    /// read as TOML (a number, `true`, `["a"]`), else taken as a string.
    /// The nodes' ids, addresses, data directories and voters are
    /// `runnel dev`'s. (`RUNNEL_…` variables are ignored: they would give
    /// every node the same id and address.)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// Keys `runnel dev` sets itself, per node.
const DEV_KEYS: &[&str] = &[
    "node_id",
    "listen",
    "metrics_listen",
    "data_dir",
    "roles",
    "controller.voters",
];

/// `text` (a node config) with each `KEY=VALUE` of `set` applied.
fn with_settings(text: &str, set: &[String]) -> anyhow::Result<String> {
    if set.is_empty() {
        return Ok(text.to_string());
    }
    let mut table: toml::Table = toml::from_str(text).context("the generated node config")?;
    for item in set {
        let Some((key, value)) = item.split_once('=') else {
            bail!("--set {item}: expected KEY=VALUE");
        };
        let key = key.trim();
        if DEV_KEYS.contains(&key) {
            bail!("--set {key}: runnel dev sets it for each node");
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().filter(|k| !k.is_empty());
        let Some(last) = last else {
            bail!("--set {item}: empty key");
        };
        let mut at = &mut table;
        for part in parts {
            at = at
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("--set {key}: {part} is not a section"))?;
        }
        at.insert(last.to_string(), value);
    }
    let text = format!(
        "# Written by `runnel dev`.\n{}",
        toml::to_string(&table).context("encoding the node config")?
    );
    runnel::config::ServerConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("--set: {e}"))?;
    Ok(text)
}

/// The config file of node `id` in a local cluster.
pub fn node_config(
    id: u16,
    nodes: u16,
    base_port: u16,
    metrics_base_port: u16,
    data_dir: &std::path::Path,
) -> String {
    let voters: Vec<String> = (1..=nodes)
        .map(|n| format!("\"{n}@127.0.0.1:{}\"", base_port + n - 1))
        .collect();
    let dir = toml::Value::String(data_dir.join(format!("node-{id}")).display().to_string());
    format!(
        "# Written by `runnel dev`.\n\
         node_id = {id}\n\
         listen = \"127.0.0.1:{port}\"\n\
         metrics_listen = \"127.0.0.1:{metrics_port}\"\n\
         data_dir = {dir}\n\
         roles = [\"broker\", \"controller\"]\n\n\
         [controller]\n\
         voters = [{voters}]\n\n\
         [broker]\n\
         default_replication_factor = {rf}\n",
        rf = nodes.min(3),
        port = base_port + id - 1,
        metrics_port = metrics_base_port + id - 1,
        voters = voters.join(", "),
    )
}

/// The shape of the cluster a dev data directory holds, in `dev.toml`.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Layout {
    nodes: u16,
    base_port: u16,
}

/// A data directory keeps its quorum's membership (node ids at their
/// ports): started again with other `--nodes` or `--base-port`, no
/// quorum could form and nothing would say why. Refused, by name.
fn check_layout(args: &DevArgs) -> anyhow::Result<()> {
    let path = args.data_dir.join("dev.toml");
    let wanted = Layout {
        nodes: args.nodes,
        base_port: args.base_port,
    };
    // A directory an older `runnel dev` made has node configs but no
    // layout file: its layout is read from them rather than taken from
    // the flags.
    let held = match std::fs::read_to_string(&path) {
        Ok(text) => Some(
            toml::from_str::<Layout>(&text)
                .with_context(|| format!("{} is not a `runnel dev` layout", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            layout_of_node_configs(&args.data_dir)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    match held {
        Some(held) if held != wanted => bail!(
            "{} holds a cluster of {} node(s) on ports from {}: start it with --nodes {} --base-port {}, or give another --data-dir (or remove this one) for a new cluster",
            args.data_dir.display(),
            held.nodes,
            held.base_port,
            held.nodes,
            held.base_port
        ),
        Some(_) if path.exists() => Ok(()),
        _ => {
            let text = format!(
                "# Written by `runnel dev`: the cluster this directory holds.\n{}",
                toml::to_string(&wanted).context("encoding the layout")?
            );
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
        }
    }
}

/// The layout of the node configs an earlier `runnel dev` wrote in `dir`:
/// how many `node-N.toml`, and node 1's port.
fn layout_of_node_configs(dir: &std::path::Path) -> Option<Layout> {
    let first: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("node-1.toml")).ok()?).ok()?;
    let listen: std::net::SocketAddr = first.get("listen")?.as_str()?.parse().ok()?;
    let nodes = (1..=9u16)
        .take_while(|n| dir.join(format!("node-{n}.toml")).exists())
        .count() as u16;
    Some(Layout {
        nodes,
        base_port: listen.port(),
    })
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        bail!("--nodes must be between 1 and 9, got {}", args.nodes);
    }
    if u32::from(args.base_port) + u32::from(args.nodes) > 65_536 {
        bail!(
            "--base-port {} leaves no room for {} nodes",
            args.base_port,
            args.nodes
        );
    }
    let (first, last) = (
        u32::from(args.metrics_base_port),
        u32::from(args.metrics_base_port) + u32::from(args.nodes) - 1,
    );
    let (client_first, client_last) = (
        u32::from(args.base_port),
        u32::from(args.base_port) + u32::from(args.nodes) - 1,
    );
    if last > 65_535 || (first <= client_last && last >= client_first) {
        bail!(
            "--metrics-base-port {} collides with the client ports or leaves no room",
            args.metrics_base_port
        );
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    check_layout(&args)?;
    // Listened to from here on: a signal between two waits is kept, and
    // a second one during the stop is seen (each wait used to install
    // listeners of its own, and once tokio had, a signal no one was
    // waiting for did nothing).
    let mut signals = Signals::new()?;
    let exe = std::env::current_exe().context("cannot find the runnel binary")?;
    // Each node's config is generated: an exported override (say
    // RUNNEL_NODE_ID) would give every node the same value.
    let inherited: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| name.to_str().is_some_and(runnel::config::is_config_env))
        .collect();
    if !inherited.is_empty() {
        eprintln!(
            "runnel dev: ignoring {} for the generated node configs",
            inherited
                .iter()
                .map(|n| n.to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut children: Vec<Child> = Vec::new();
    let mut ready = Vec::new();
    for id in 1..=args.nodes {
        let path = args.data_dir.join(format!("node-{id}.toml"));
        let text = with_settings(
            &node_config(
                id,
                args.nodes,
                args.base_port,
                args.metrics_base_port,
                &args.data_dir,
            ),
            &args.set,
        )?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        let mut command = Command::new(&exe);
        for name in &inherited {
            command.env_remove(name);
        }
        stop_with_parent(&mut command);
        let mut child = command
            .arg("server")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a node")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("runnel listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.to_string());
                    }
                }
            }
        });
        children.push(child);
        ready.push(rx);
    }
    let mut addrs = Vec::new();
    for (i, rx) in ready.into_iter().enumerate() {
        let addr = tokio::select! {
            a = tokio::time::timeout(Duration::from_secs(120), rx) => match a {
                Ok(Ok(addr)) => addr,
                _ => {
                    // The node that exited, if one did (another may have
                    // failed first and taken this one's quorum with it).
                    let exited = children
                        .iter_mut()
                        .position(|c| matches!(c.try_wait(), Ok(Some(_))))
                        .unwrap_or(i);
                    // The others stop as on Ctrl-C (they were killed
                    // outright when dropped).
                    stop(children, &mut signals).await?;
                    bail!("node {} did not start (see its log above)", exited + 1)
                }
            },
            _ = signals.next() => return stop(children, &mut signals).await,
        };
        addrs.push(addr);
    }
    let bootstrap = addrs.join(",");
    sayln!(
        "runnel dev: {} nodes up, data in {}",
        args.nodes,
        args.data_dir.display()
    );
    sayln!("bootstrap: {bootstrap}");
    let metrics: Vec<String> = (0..args.nodes)
        .map(|i| format!("http://127.0.0.1:{}/metrics", args.metrics_base_port + i))
        .collect();
    sayln!("metrics:   {}", metrics.join(" "));
    sayln!("try:       runnel --bootstrap {bootstrap} topic create demo --partitions 3 --replication-factor {}", args.nodes.min(3));
    sayln!("Ctrl-C stops the cluster.");
    let exited = tokio::select! {
        _ = signals.next() => None,
        exited = wait_any(&mut children) => Some(exited),
    };
    if let Some((id, status)) = exited {
        // The others are stopped as on Ctrl-C, not killed.
        eprintln!("runnel dev: node {id} exited unexpectedly ({status}); stopping the others");
        stop(children, &mut signals).await?;
        bail!("node {id} exited unexpectedly ({status})");
    }
    stop(children, &mut signals).await
}

/// Ctrl-C (SIGINT) and SIGTERM, listened to for the whole run.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    /// The next Ctrl-C or SIGTERM.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// The first node to exit, by id (index + 1), with its exit status.
async fn wait_any(children: &mut [Child]) -> (usize, std::process::ExitStatus) {
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                return (i + 1, status);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sends SIGTERM to process `pid`.
#[allow(unsafe_code)]
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours;
    // `pid` is a child of this process that has not been reaped (tokio
    // reaps it only in `wait`), so the id cannot name another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// SIGTERM every node and wait for it (they also got Ctrl-C's SIGINT if
/// they share the terminal), up to 30 s each; a second Ctrl-C or SIGTERM
/// kills the ones left at once.
/// Linux: the node gets SIGTERM when `runnel dev` dies without stopping
/// it (killed outright, the OOM killer): left running, it held its ports
/// and data directory, and the next `runnel dev` could not start.
fn stop_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl and getppid are async-signal-safe, and the closure
    // touches nothing else (allocates nothing) between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        let parent = libc::getpid();
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Died between the fork and the prctl: no signal will come.
            // (No allocation here, after a fork: a raw error code.)
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

async fn stop(mut children: Vec<Child>, signals: &mut Signals) -> anyhow::Result<()> {
    for c in &children {
        if let Some(pid) = c.id() {
            terminate(pid);
        }
    }
    let mut hurry = false;
    for c in &mut children {
        if !hurry {
            tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(30), c.wait()) => {
                    if r.is_ok() {
                        continue;
                    }
                }
                _ = signals.next() => {
                    eprintln!("runnel dev: stopping now");
                    hurry = true;
                }
            }
        }
        let _ = c.kill().await;
    }
    sayln!("runnel dev: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_apply_to_the_node_configs() {
        let dir = std::path::Path::new("/tmp/runnel-dev");
        let text = node_config(2, 3, 9092, 9644, dir);
        let set = |items: &[&str]| {
            with_settings(
                &text,
                &items.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        let c = runnel::config::ServerConfig::from_toml(
            &set(&["broker.writeback_interval_ms=0", "rack=r1"]).unwrap(),
        )
        .unwrap();
        assert_eq!(c.broker.writeback_interval_ms, 0);
        assert_eq!(c.rack, "r1");
        assert_eq!(c.node_id, 2, "the rest is kept");
        for (bad, why) in [
            (&["node_id=1"][..], "runnel dev sets it"),
            (&["broker.no_such_key=1"], "no_such_key"),
            (&["broker.writeback_interval_ms"], "KEY=VALUE"),
            (
                &["broker.writeback_interval_ms=soon"],
                "writeback_interval_ms",
            ),
        ] {
            let err = set(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn node_configs_parse_and_agree() {
        let dir = std::path::Path::new("/tmp/runnel-dev");
        for id in 1..=3 {
            let text = node_config(id, 3, 9092, 9644, dir);
            let c = runnel::config::ServerConfig::from_toml(&text).unwrap();
            assert_eq!(c.node_id, i32::from(id));
            assert_eq!(c.listen.port(), 9091 + id);
            assert_eq!(c.metrics_listen.unwrap().port(), 9643 + id);
            assert_eq!(c.voters().unwrap().len(), 3);
            assert_eq!(c.voters().unwrap()[&i32::from(id)], c.listen.to_string());
        }
    }
}
