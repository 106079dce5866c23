//! The README's first command: `runnel dev` starts a local three-node
//! cluster that replicates, ignores exported config overrides (each node
//! has its own generated config), and stops every node on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{cli_ok, free_ports, runnel_bin, Reaped};

/// `n` consecutive free ports (`runnel dev` puts node N on BASE + N - 1).
fn consecutive_ports(n: usize) -> u16 {
    loop {
        let ports = free_ports(n);
        if ports.windows(2).all(|w| w[1] == w[0] + 1) {
            return ports[0];
        }
    }
}

/// Starts `runnel dev` with three nodes in `dir` (with `env` set and
/// `extra` arguments), in a process group of its own: however the test
/// ends, it and the nodes it started are killed together (SIGKILL to
/// `runnel dev` alone would orphan them). Returns it once up, its
/// bootstrap addresses, and the thread collecting its stdout.
fn start_dev(
    dir: &std::path::Path,
    base: u16,
    metrics: u16,
    env: &[(&str, &str)],
    extra: &[&str],
) -> (Reaped, String, std::thread::JoinHandle<String>) {
    let mut dev = Reaped::group(
        Command::new(runnel_bin())
            .args(["dev", "--nodes", "3"])
            .args(["--base-port", &base.to_string()])
            .args(["--metrics-base-port", &metrics.to_string()])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = dev.child().stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(b) = line.strip_prefix("bootstrap: ") {
                let _ = tx.send(b.trim().to_string());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let bootstrap = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("runnel dev did not come up");
    (dev, bootstrap, reader)
}

/// No node listens on the three client ports from `base` any more.
fn assert_nothing_listens(base: u16) {
    for port in base..base + 3 {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "a node still listens on {port}"
        );
    }
}

#[test]
fn runnel_dev_runs_a_replicated_cluster_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let base = consecutive_ports(3);
    let metrics = consecutive_ports(3);
    let (dev, bootstrap, reader) = start_dev(
        dir.path(),
        base,
        metrics,
        // Would give every node id 7 if the nodes inherited it.
        &[("RUNNEL_NODE_ID", "7")],
        // A key for every node's config.
        &["--set", "broker.writeback_interval_ms=0"],
    );
    assert_eq!(bootstrap.split(',').count(), 3, "{bootstrap}");

    cli_ok(
        &bootstrap,
        &["topic", "create", "demo", "--partitions", "3"],
        None,
    );
    // Without --replication-factor, `runnel dev`'s nodes keep three copies.
    let described = cli_ok(
        &bootstrap,
        &["--output", "json", "topic", "describe", "demo"],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&described).expect("JSON");
    assert_eq!(v["replication_factor"], 3, "{described}");
    let described = cli_ok(
        &bootstrap,
        &["--output", "json", "cluster", "describe"],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&described).expect("JSON");
    let mut ids: Vec<i64> = v["brokers"]
        .as_array()
        .expect("brokers")
        .iter()
        .map(|b| b["id"].as_i64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 3], "{described}");
    cli_ok(&bootstrap, &["produce", "demo"], Some(b"one\ntwo\nthree\n"));
    let out = cli_ok(
        &bootstrap,
        &[
            "consume",
            "demo",
            "--from",
            "earliest",
            "--max-records",
            "3",
        ],
        None,
    );
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, ["one", "three", "two"], "{out}");

    // SIGTERM stops every node before `runnel dev` exits.
    let status = Command::new("kill")
        .args(["-TERM", &dev.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = dev.wait_output(Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ignoring RUNNEL_NODE_ID"), "{stderr}");
    for id in 1..=3 {
        let path = dir.path().join(format!("node-{id}.toml"));
        let c = runnel::config::ServerConfig::from_file(&path).unwrap();
        assert_eq!(c.broker.writeback_interval_ms, 0, "node {id}");
        assert_eq!(c.node_id, id);
    }
    let stdout = reader.join().unwrap();
    assert!(stdout.contains("runnel dev: stopped"), "{stdout}");
    assert_nothing_listens(base);

    // Its directory holds a three-node quorum: started again as another
    // cluster, it says so at once instead of waiting for a quorum that
    // cannot form.
    let refused_as_another_cluster = |nodes: u16, port: u16| {
        // Bounded: a regression would wait for good for its quorum.
        let out = common::Reaped::group(
            Command::new(runnel_bin())
                .args(["dev", "--nodes", &nodes.to_string()])
                .args(["--base-port", &port.to_string()])
                .arg("--data-dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .process_group(0)
                .spawn()
                .unwrap(),
        )
        .wait_output(Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("--nodes 3 --base-port {base}")),
            "{stderr}"
        );
    };
    refused_as_another_cluster(1, base);
    refused_as_another_cluster(3, base + 10);
    // So does a directory from before the layout file: its node configs
    // tell.
    std::fs::remove_file(dir.path().join("dev.toml")).unwrap();
    refused_as_another_cluster(1, base);

    // A node that dies makes `runnel dev` name it, stop the others (not
    // kill them: they had no controlled shutdown) and exit non-zero.
    let (dev, _, reader) = start_dev(dir.path(), base, metrics, &[], &[]);
    let node_2 = dir.path().join("node-2.toml");
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(node_2.to_str().unwrap()))
        })
        .expect("node 2's process");
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = dev.wait_output(Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("node 2 exited unexpectedly"), "{stderr}");
    assert!(reader.join().unwrap().contains("runnel dev: stopped"));
    assert_nothing_listens(base);

    // `runnel dev` killed outright (no chance to stop its nodes): the
    // nodes are told by the kernel and stop. Left running, they held the
    // ports and the data directory, and the next `runnel dev` failed.
    let (mut dev, _, _reader) = start_dev(dir.path(), base, metrics, &[], &[]);
    // Drained, so that nodes logging to the stderr they share with it
    // never block on a full pipe.
    let mut stderr = dev.child().stderr.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let status = Command::new("kill")
        .args(["-KILL", &dev.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Its output is not read to the end: nodes left running would hold
    // its pipes open for good. Dropped, `dev` kills its process group,
    // nodes included, however this ends.
    assert!(!dev.child().wait().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (base..base + 3).any(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the nodes of a killed runnel dev still listen"
        );
        // A polling interval, not a wait for something to happen.
        std::thread::sleep(Duration::from_millis(200));
    }
}
