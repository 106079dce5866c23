//! Test fixtures: real `runnel` server processes on free loopback ports,
//! and the CLI run as a child process.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of the `runnel` binary cargo built for these tests.
pub fn runnel_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_runnel"))
}

/// A running `runnel server` child process.
pub struct ServerProcess {
    child: Child,
    /// Client address, HOST:PORT.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The metrics endpoint, HOST:PORT, when `metrics_listen` is set.
    pub metrics_addr: Option<String>,
}

impl ServerProcess {
    /// Starts a single-node server on a free port and waits until it
    /// accepts connections (it prints `runnel listening on ADDR`).
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        let mut args: Vec<String> = [
            "server",
            "--node-id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(data_dir.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(&args, data_dir).wait()
    }

    /// [`ServerProcess::start`] with `toml` as its config file
    /// (`dir/node.toml`) and its data in `dir/data`.
    pub fn start_with_toml(dir: &Path, toml: &str) -> ServerProcess {
        let config = dir.join("node.toml");
        std::fs::write(&config, toml).expect("write the node's config");
        Self::start(
            &dir.join("data"),
            &["--config", config.to_str().expect("utf-8 path")],
        )
    }

    /// Starts `runnel ARGS` without waiting for it to be ready.
    pub fn spawn(args: &[String], data_dir: &Path) -> Starting {
        let mut command = Command::new(runnel_bin());
        // Hermetic: no RUNNEL_… overrides leak in from the caller.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("RUNNEL_")) {
            command.env_remove(key);
        }
        let mut child = command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,openraft=off".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn runnel server");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(addr) = line.strip_prefix("runnel listening on ") {
                    let _ = tx.send((false, addr.to_string()));
                } else if let Some(addr) = line.strip_prefix("runnel metrics listening on ") {
                    let _ = tx.send((true, addr.to_string()));
                }
            }
        });
        Starting {
            child: Some(child),
            rx,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. "STOP", "CONT") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        self.child.kill().expect("kill server");
        self.child.wait().expect("reap server");
    }

    /// Asks for a graceful stop (SIGTERM) and waits for the exit status,
    /// at most a minute: a stop that hangs fails the test (killed), not
    /// the whole run.
    pub fn stop(self) -> std::process::ExitStatus {
        self.stop_with("TERM")
    }

    /// [`ServerProcess::stop`] with another signal (e.g. "HUP").
    pub fn stop_with(mut self, signal: &str) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("send the signal");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("reap server") {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the server did not stop within 60 s of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A server process that has not reported ready yet.
pub struct Starting {
    child: Option<Child>,
    /// (is the metrics endpoint, address) as the server prints them.
    rx: mpsc::Receiver<(bool, String)>,
    data_dir: PathBuf,
}

impl Starting {
    /// Waits until the server prints its address (at most 120 s).
    pub fn wait(mut self) -> ServerProcess {
        let mut child = self.child.take().expect("not waited yet");
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut metrics_addr = None;
        let addr = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((true, addr)) => metrics_addr = Some(addr),
                Ok((false, addr)) => break addr,
                Err(_) => {
                    let _ = child.kill();
                    panic!("server did not report its address: {:?}", child.wait());
                }
            }
        };
        ServerProcess {
            child,
            addr,
            data_dir: self.data_dir.clone(),
            metrics_addr,
        }
    }
}

impl Starting {
    /// Asks the still-starting server to stop (SIGTERM) and waits up to
    /// `within` for it to exit: None if it did not (it is then killed).
    pub fn terminate(mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take().expect("not waited yet");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("send SIGTERM");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("poll the server") {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Free loopback ports (bound, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    // Not from the ephemeral range (where bind(0) and every outgoing
    // connection of the running servers and clients take theirs, so a
    // port released here could be taken before its server binds it), and
    // never the same port twice in one test process.
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = 20_000 + (std::process::id() * 7919) % 10_000;
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(offset < 10_000, "ran out of test ports");
        let port = (start + offset) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// A cluster of `runnel server` processes on loopback, every node a
/// broker and a controller voter.
pub struct Cluster {
    /// Running nodes by index (node id = index + 1); None while stopped.
    pub nodes: Vec<Option<ServerProcess>>,
    configs: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    /// Client addresses by index.
    pub addrs: Vec<String>,
}

impl Cluster {
    /// Writes one config per node (with `broker_toml` added under
    /// `[broker]`, `controller_toml` under `[controller]`) and starts them.
    pub fn start(n: usize, base: &Path, broker_toml: &str, controller_toml: &str) -> Cluster {
        let ports = free_ports(n);
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let voters: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("\"{}@{a}\"", i + 1))
            .collect();
        let mut configs = Vec::new();
        let mut dirs = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let dir = base.join(format!("node-{}", i + 1));
            let config = base.join(format!("node-{}.toml", i + 1));
            std::fs::write(
                &config,
                format!(
                    "node_id = {id}\nlisten = \"{addr}\"\ndata_dir = \"{dir}\"\n\
                     metrics_listen = \"127.0.0.1:0\"\n\
                     roles = [\"broker\", \"controller\"]\n\
                     [broker]\nmaintenance_interval_ms = 100\n{broker_toml}\n\
                     [controller]\nvoters = [{voters}]\nelection_timeout_min_ms = 300\n\
                     election_timeout_max_ms = 600\nheartbeat_interval_ms = 50\n{controller_toml}\n",
                    id = i + 1,
                    dir = dir.display(),
                    voters = voters.join(", "),
                ),
            )
            .unwrap();
            configs.push(config);
            dirs.push(dir);
        }
        let starting: Vec<Starting> = (0..n)
            .map(|i| {
                ServerProcess::spawn(
                    &[
                        "server".into(),
                        "--config".into(),
                        configs[i].display().to_string(),
                    ],
                    &dirs[i],
                )
            })
            .collect();
        let nodes = starting.into_iter().map(|s| Some(s.wait())).collect();
        Cluster {
            nodes,
            configs,
            dirs,
            addrs,
        }
    }

    /// Every node's address, comma-separated.
    pub fn bootstrap(&self) -> String {
        self.addrs.join(",")
    }

    /// The node with this broker id.
    pub fn node(&self, id: i32) -> &ServerProcess {
        self.nodes[(id - 1) as usize]
            .as_ref()
            .expect("node is running")
    }

    /// SIGKILLs node `id`.
    pub fn kill(&mut self, id: i32) {
        self.nodes[(id - 1) as usize]
            .take()
            .expect("node is running")
            .kill();
    }

    /// Stops node `id` gracefully (SIGTERM) and returns its exit status.
    pub fn stop(&mut self, id: i32) -> std::process::ExitStatus {
        self.nodes[(id - 1) as usize]
            .take()
            .expect("node is running")
            .stop()
    }

    /// Restarts node `id` from its data directory and waits until ready.
    pub fn restart(&mut self, id: i32) {
        let p = self.spawn(id).wait();
        self.nodes[(id - 1) as usize] = Some(p);
    }

    /// Starts stopped node `id` again without waiting for it to be ready
    /// (its client port, `addrs[id - 1]`, opens before it is).
    pub fn spawn(&self, id: i32) -> Starting {
        let i = (id - 1) as usize;
        assert!(self.nodes[i].is_none(), "node {id} is still running");
        ServerProcess::spawn(
            &[
                "server".into(),
                "--config".into(),
                self.configs[i].display().to_string(),
            ],
            &self.dirs[i],
        )
    }

    /// Node `id`'s metrics endpoint, HOST:PORT.
    pub fn metrics_addr(&self, id: i32) -> String {
        self.node(id)
            .metrics_addr
            .clone()
            .expect("the cluster's nodes serve metrics")
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: i32) -> &Path {
        &self.dirs[(id - 1) as usize]
    }
}

/// The concatenated bytes of every `.log` segment of a partition directory.
pub fn log_bytes(partition_dir: &Path) -> Vec<u8> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(partition_dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "log"));
    files.sort();
    files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap_or_default())
        .collect()
}

/// Polls `check` every 100 ms until it returns Some or `timeout` passes.
/// Waits (up to 60 s) until a list a background task appends to (e.g.
/// acknowledged records) holds at least `at_least` entries.
pub async fn await_len<T>(list: &std::sync::Arc<tokio::sync::Mutex<Vec<T>>>, at_least: usize) {
    eventually(
        &format!("{at_least} entries"),
        Duration::from_secs(60),
        || async { (list.lock().await.len() >= at_least).then_some(()) },
    )
    .await
}

pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed and reaped however the test ends, so a failed
/// assertion leaves no process behind (holding ports and CPU while the
/// next tests run, its data directory deleted under it).
pub struct Reaped {
    child: Option<Child>,
    /// Whether the child leads a process group of its own
    /// (`process_group(0)`) that is killed with it.
    group: bool,
}

impl Reaped {
    pub fn new(child: Child) -> Self {
        Self {
            child: Some(child),
            group: false,
        }
    }

    /// A child spawned with `process_group(0)`: its whole group (the
    /// processes it started) is killed with it.
    pub fn group(child: Child) -> Self {
        Self {
            child: Some(child),
            group: true,
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("not waited for yet")
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("not waited for yet").id()
    }

    /// Waits at most `timeout` for the child to exit and returns its
    /// output; past that, kills it and panics with what it printed.
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().expect("waited for once");
        let pipe = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = pipe(child.stdout.take().map(|p| Box::new(p) as _));
        let err = pipe(child.stderr.take().map(|p| Box::new(p) as _));
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the child") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                self.child = Some(child);
                self.kill();
                let (out, err) = (out.join().unwrap(), err.join().unwrap());
                panic!(
                    "still running after {timeout:?}; killed\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.group {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How long a CLI command may run before the test gives up on it.
pub const CLI_WAIT: Duration = Duration::from_secs(120);

/// Runs the CLI against `addr` with `stdin` as input (killed, and the
/// test failed, after [`CLI_WAIT`]).
pub fn cli(addr: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(runnel_bin())
        .arg("--bootstrap")
        .arg(addr)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn runnel cli");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin piped");
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    Reaped::new(child).wait_output(CLI_WAIT)
}

/// Runs the CLI and insists it succeeds; returns stdout.
pub fn cli_ok(addr: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = cli(addr, args, stdin);
    assert!(
        out.status.success(),
        "runnel {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs the CLI and insists it fails; returns stderr.
pub fn cli_err(addr: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = cli(addr, args, stdin);
    assert!(
        !out.status.success(),
        "runnel {args:?} unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

/// The Runnel error code a refused call carries (`runnel-error-code`),
/// empty when it has none.
pub fn error_code(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("runnel-error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
