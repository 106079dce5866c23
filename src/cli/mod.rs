//! Command-line definitions (clap) and dispatch.

/// `println!` for a command's output, which ends the process normally
/// (exit 0, nothing more printed) when the reader has gone (`runnel group
/// describe big | head -1`), as other Unix tools do; `println!` panicked
/// there with exit code 101.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        match writeln!(out, $($arg)*) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            Err(e) => panic!("failed printing to stdout: {e}"),
            Ok(()) => {}
        }
    }};
}

mod consume;
mod dev;
mod group;
mod health;
mod partition;
mod perf;
mod perf_metadata;
mod produce;
mod security;
mod server;
mod topic;

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use runnel::client::Client;

/// Runnel: a Kafka-style partitioned log broker.
#[derive(Debug, Parser)]
#[command(name = "runnel", version, about)]
pub struct Cli {
    /// Brokers to contact first, HOST:PORT[,HOST:PORT...].
    #[arg(
        long,
        global = true,
        env = "RUNNEL_BOOTSTRAP",
        default_value = "127.0.0.1:9092"
    )]
    pub bootstrap: String,
    /// Output format for results.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// TLS and credentials.
    #[command(flatten)]
    pub security: security::ClientSecurityArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables (for `consume`: one value per line).
    Table,
    /// JSON (for `consume`: one JSON object per line).
    Json,
}

/// Reports what a command did: `json` with `--output json`, else `text`
/// (every client command honours `--output`).
fn done(output: Output, json: serde_json::Value, text: impl std::fmt::Display) {
    match output {
        Output::Json => outln!("{json}"),
        Output::Table => outln!("{text}"),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a broker.
    Server(server::ServerArgs),
    /// Run a local cluster of --nodes nodes (default 3) on 127.0.0.1 until
    /// Ctrl-C or SIGTERM.
    Dev(dev::DevArgs),
    /// Create, list, describe, alter and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Produce one record per line of stdin (or --file).
    Produce(produce::ProduceArgs),
    /// Consume records and print them, one per line.
    Consume(consume::ConsumeArgs),
    /// Inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Partitions: describe, elect leaders, reassign replicas.
    #[command(subcommand)]
    Partition(partition::PartitionCommand),
    /// List, describe, reset and delete consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Measure throughput and latency.
    ///
    /// The tools run on one thread (`perf e2e`: the main thread and one
    /// runtime worker), leaving the other cores to the brokers on the same
    /// machine; `TOKIO_WORKER_THREADS=N` gives them N runtime workers.
    #[command(subcommand)]
    Perf(perf::PerfCommand),
    /// Users and their passwords (stored as salted hashes).
    #[command(subcommand)]
    User(security::UserCommand),
    /// ACLs: who may do what on the cluster, topics and groups.
    #[command(subcommand)]
    Acl(security::AclCommand),
    /// Produce and fetch byte-rate quotas.
    #[command(subcommand)]
    Quota(security::QuotaCommand),
}

/// What `main` runs. A server's configuration is read before the runtime
/// starts, because it says how many worker threads to give it.
pub enum Job {
    Server(Box<server::LoadedServer>),
    Command(Box<Cli>),
}

impl Job {
    /// Reads a server's configuration; any other command as parsed.
    pub fn new(cli: Cli) -> anyhow::Result<Self> {
        Ok(match cli {
            Cli {
                command: Command::Server(args),
                ..
            } => Job::Server(Box::new(server::load(args)?)),
            cli => Job::Command(Box::new(cli)),
        })
    }

    /// The runtime's worker threads, when not one per core; `Some(0)`
    /// asks for no worker at all: everything runs on the calling thread.
    /// `TOKIO_WORKER_THREADS` overrides the perf tools' choice; a server's
    /// `worker_threads` sets its count.
    pub fn worker_threads(&self) -> Option<usize> {
        match self {
            Job::Server(server) => server.worker_threads(),
            Job::Command(_) if std::env::var_os("TOKIO_WORKER_THREADS").is_some() => None,
            Job::Command(cli) => cli.command.worker_threads(),
        }
    }

    /// Whether the runtime may be dropped without waiting for its
    /// blocking threads once `run` returns: yes for the client commands,
    /// whose blocking reads of stdin (`produce`) would otherwise keep the
    /// process until the next line, which may never come; not for the
    /// server, whose blocking-pool work (log writes) must end first.
    pub fn may_abandon_blocking(&self) -> bool {
        matches!(self, Job::Command(_))
    }

    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Job::Server(server) => server::run(*server).await,
            Job::Command(cli) => run(*cli).await,
        }
    }
}

impl Command {
    /// The perf tools' threads (`benches/RESULTS.md`, rows 14 and 23).
    /// Other commands keep a worker per core: `consume` writes to stdout
    /// with blocking writes (a slow pipe must not stall a group member's
    /// heartbeats), `user add` reads stdin, and `server`/`dev` are brokers.
    ///
    /// - `perf produce`, `consume` and the rest run on the main thread
    ///   alone (`Some(0)`). With the driver on the main thread and the
    ///   streams on a worker, each batch cost a cross-thread wake-up and
    ///   two busy client threads contended with the broker for two cores:
    ///   1 KiB produce ran 14 % slower. Small records are the exception,
    ///   where the client itself is the bottleneck: 100 B produce runs
    ///   about 20 % faster with `TOKIO_WORKER_THREADS=1`.
    /// - `perf e2e` runs a producer and a consumer: the driver on the main
    ///   thread and one worker (`Some(1)`), so that receipts are not
    ///   queued behind the producer's batches (p99 8-15 ms with the worker
    ///   against 8-30 ms on one thread, at 450,000 records/s).
    pub fn worker_threads(&self) -> Option<usize> {
        match self {
            Command::Perf(perf::PerfCommand::E2e(_)) => Some(1),
            Command::Perf(_) => Some(0),
            _ => None,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Brokers and the active controller.
    Describe,
    /// One-screen cluster summary (brokers, controller, offline and
    /// under-replicated partitions, largest group lags); exits non-zero
    /// when the cluster is unhealthy. `--node`: only whether the
    /// --bootstrap node serves (container health checks).
    Health(health::HealthArgs),
}

/// `--config key=value`, repeatable.
#[derive(Debug, Args, Default)]
pub struct ConfigPairs {
    /// A topic config, key=value (repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub pairs: Vec<String>,
}

impl ConfigPairs {
    fn to_map(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut map = BTreeMap::new();
        for pair in &self.pairs {
            let Some((k, v)) = pair.split_once('=') else {
                bail!("--config expects KEY=VALUE, got '{pair}'");
            };
            map.insert(k.trim().to_string(), v.trim().to_string());
        }
        Ok(map)
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Cluster(ClusterCommand::Health(args)) => {
            init_client_tracing();
            health::run(&cli.bootstrap, cli.security.options()?, args, cli.output).await
        }
        Command::Perf(cmd) => {
            init_client_tracing();
            perf::run(&cli.bootstrap, cli.security.options()?, cmd, cli.output).await
        }
        command => {
            init_client_tracing();
            let client = Client::connect_with(&cli.bootstrap, cli.security.options()?)
                .await
                .with_context(|| format!("cannot reach the cluster at {}", cli.bootstrap))?;
            match command {
                Command::Topic(cmd) => topic::run(&client, cmd, cli.output).await,
                Command::Partition(cmd) => partition::run(&client, cmd, cli.output).await,
                Command::Produce(args) => produce::run(&client, args, cli.output).await,
                Command::Consume(args) => consume::run(&client, args, cli.output).await,
                Command::Group(cmd) => group::run(&client, cmd, cli.output).await,
                Command::User(cmd) => security::run_user(&client, cmd, cli.output).await,
                Command::Acl(cmd) => security::run_acl(&client, cmd, cli.output).await,
                Command::Quota(cmd) => security::run_quota(&client, cmd, cli.output).await,
                Command::Cluster(ClusterCommand::Describe) => {
                    cluster_describe(&client, cli.output).await
                }
                Command::Server(_)
                | Command::Dev(_)
                | Command::Perf(_)
                | Command::Cluster(ClusterCommand::Health(_)) => {
                    unreachable!("handled above, or by Job::run (server)")
                }
            }
        }
    }
}

fn init_client_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn cluster_describe(client: &Client, output: Output) -> anyhow::Result<()> {
    let c = client.describe_cluster().await?;
    if output == Output::Json {
        let brokers: Vec<_> = c
            .brokers
            .iter()
            .map(|b| {
                serde_json::json!({
                    "id": b.id, "address": b.address, "rack": b.rack,
                    "fenced": b.fenced, "roles": b.roles,
                })
            })
            .collect();
        let q = c.quorum.clone().unwrap_or_default();
        let lag: std::collections::BTreeMap<String, i64> =
            q.lag.iter().map(|(id, l)| (id.to_string(), *l)).collect();
        outln!(
            "{}",
            serde_json::json!({
                "cluster_id": c.cluster_id, "controller_id": c.controller_id, "brokers": brokers,
                "quorum": {
                    "term": q.term, "voters": q.voters, "learners": q.learners,
                    "last_log_index": q.last_log_index, "applied_index": q.applied_index, "lag": lag,
                },
            })
        );
        return Ok(());
    }
    outln!("cluster id:  {}", c.cluster_id);
    outln!("controller:  {}", c.controller_id);
    if let Some(q) = &c.quorum {
        let ids = |v: &[i32]| v.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
        outln!(
            "quorum:      term {}, voters [{}], learners [{}], log index {}, applied {}",
            q.term,
            ids(&q.voters),
            ids(&q.learners),
            q.last_log_index,
            q.applied_index
        );
        if !q.lag.is_empty() {
            let mut lag: Vec<String> = q.lag.iter().map(|(id, l)| format!("{id}: {l}")).collect();
            lag.sort();
            outln!("replication lag (entries): {}", lag.join(", "));
        }
    }
    let mut rows = vec![vec![
        "ID".to_string(),
        "ADDRESS".into(),
        "RACK".into(),
        "ROLES".into(),
        "STATUS".into(),
    ]];
    for b in &c.brokers {
        rows.push(vec![
            b.id.to_string(),
            b.address.clone(),
            b.rack.clone(),
            b.roles.join(","),
            if b.fenced { "fenced" } else { "up" }.to_string(),
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// Prints rows as left-aligned columns.
pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        outln!("{}", line.join("  ").trim_end());
    }
}

/// An ISO-8601 time as milliseconds since the Unix epoch:
/// `2026-01-01T10:00:00Z`, with fractional seconds, a space for the `T`,
/// and a zone: `Z`, an offset (`+01:00`, `-0530`, `+02`), or none for UTC.
/// Times before 1970 are the epoch.
pub(crate) fn parse_time_ms(s: &str) -> anyhow::Result<i64> {
    let bad = || {
        anyhow::anyhow!("'{s}' is not an ISO-8601 time (2026-01-01T10:00:00Z, or with an offset such as +01:00)")
    };
    // The offset follows the seconds: past "YYYY-MM-DDTHH:MM:SS".
    let (base, offset_s) = match s.get(19..).and_then(|t| t.rfind(['+', '-'])) {
        Some(i) => {
            let at = 19 + i;
            let sign = if s.as_bytes()[at] == b'-' { -1 } else { 1 };
            let digits: String = s[at + 1..].chars().filter(|c| *c != ':').collect();
            if !digits.chars().all(|c| c.is_ascii_digit()) || !matches!(digits.len(), 2 | 4) {
                return Err(bad());
            }
            let hours: i64 = digits[..2].parse().map_err(|_| bad())?;
            let minutes: i64 = if digits.len() == 4 {
                digits[2..].parse().map_err(|_| bad())?
            } else {
                0
            };
            if hours > 23 || minutes > 59 {
                return Err(bad());
            }
            (&s[..at], sign * (hours * 3600 + minutes * 60))
        }
        None => (s, 0),
    };
    let time = humantime::parse_rfc3339_weak(base).map_err(|_| bad())?;
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Ok((ms - offset_s * 1000).max(0))
}

#[cfg(test)]
mod time_tests {
    use super::parse_time_ms;

    #[test]
    fn iso_times_take_zones_and_offsets() {
        let utc = 1_767_261_600_000; // 2026-01-01T10:00:00Z
        for s in [
            "2026-01-01T10:00:00Z",
            "2026-01-01T10:00:00",
            "2026-01-01 10:00:00Z",
            "2026-01-01T11:00:00+01:00",
            "2026-01-01T11:00:00+0100",
            "2026-01-01T12:00:00+02",
            "2026-01-01T04:30:00-05:30",
        ] {
            assert_eq!(parse_time_ms(s).unwrap(), utc, "{s}");
        }
        assert_eq!(
            parse_time_ms("2026-01-01T10:00:00.250Z").unwrap(),
            utc + 250
        );
        assert_eq!(
            parse_time_ms("2026-01-01T11:00:00.250+01:00").unwrap(),
            utc + 250
        );
        for bad in [
            "yesterday",
            "2026-01-01T10:00:00+1",
            "2026-01-01T10:00:00+25:00",
            "2026-01-01T10:00:00+ab:cd",
        ] {
            assert!(parse_time_ms(bad).is_err(), "{bad}");
        }
    }
}
