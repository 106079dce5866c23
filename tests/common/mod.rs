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
}

impl ServerProcess {
    /// Starts a server on a free port and waits until it accepts
    /// connections (it prints `runnel listening on ADDR`).
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        let mut child = Command::new(runnel_bin())
            .args([
                "server",
                "--node-id",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
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
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not report its address: {:?}", child.wait());
            }
        };
        ServerProcess {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        self.child.kill().expect("kill server");
        self.child.wait().expect("reap server");
    }

    /// Asks for a graceful stop (SIGTERM) and waits for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("send SIGTERM");
        self.child.wait().expect("reap server")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI against `addr` with `stdin` as input.
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
    child.wait_with_output().expect("cli output")
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
