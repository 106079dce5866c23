//! The deployment files agree with each other: `docker-compose.yml`, the
//! `Dockerfile` (entrypoint, configs it copies, port, health check, data
//! volume) and the node configs in `config/` (ports, node ids, voter lists).
//! Static checks only; `tests/compose/run.sh` runs the cluster for real.
//!
//! The compose file is read by a small parser for the YAML subset it is
//! written in (block mappings and sequences, JSON-style quoted scalars and
//! flow lists); `docker compose config -q` validates it as real YAML.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use runnel::config::ServerConfig;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn toml_file(rel: &str) -> toml::Table {
    toml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Loads a config file the way `runnel server --config` does, with
/// `RUNNEL_…` environment overrides.
fn load(rel: &str, env: &[(&str, &str)]) -> ServerConfig {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    ServerConfig::load(Some(&root().join(rel)), env).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn port_of(addr: &str) -> u16 {
    let (_, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("'{addr}' has no port"));
    port.parse()
        .unwrap_or_else(|_| panic!("'{addr}': bad port '{port}'"))
}

fn voter_set(config: &toml::Table) -> BTreeSet<String> {
    config["controller"]["voters"]
        .as_array()
        .expect("[controller] voters is a list")
        .iter()
        .map(|v| v.as_str().expect("voters are strings").to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// A YAML-subset reader, enough for docker-compose.yml.

struct Line {
    indent: usize,
    text: String,
}

fn yaml(text: &str) -> Value {
    let mut lines: Vec<Line> = text
        .lines()
        .filter(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
        .map(|l| {
            assert!(!l.contains('\t'), "tab in compose file: {l:?}");
            assert!(
                !l.contains(" #") && !l.contains(" &") && !l.contains(" *") && !l.contains("<<"),
                "the compose file must stay in the simple subset (no inline comments, anchors \
                 or merges): {l:?}"
            );
            Line {
                indent: l.len() - l.trim_start().len(),
                text: l.trim().to_string(),
            }
        })
        .collect();
    let mut i = 0;
    let value = block(&mut lines, &mut i, 0);
    assert_eq!(i, lines.len(), "unparsed compose line: {:?}", lines[i].text);
    value
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// `key: value` or `key:`, unless the text is a quoted or flow scalar.
fn split_key(text: &str) -> Option<(String, &str)> {
    if text.starts_with('"') || text.starts_with('[') || text.starts_with('{') {
        return None;
    }
    let (key, rest) = if let Some(k) = text.strip_suffix(':') {
        (k, "")
    } else {
        let (k, r) = text.split_once(": ")?;
        (k, r.trim())
    };
    Some((key.trim_matches('"').to_string(), rest))
}

fn scalar(text: &str) -> Value {
    if text.starts_with('"') || text.starts_with('[') || text.starts_with('{') {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("bad scalar {text:?}: {e}"))
    } else {
        Value::String(text.to_string())
    }
}

fn block(lines: &mut [Line], i: &mut usize, indent: usize) -> Value {
    if *i < lines.len() && is_item(&lines[*i].text) {
        let mut items = Vec::new();
        while *i < lines.len() && lines[*i].indent == indent && is_item(&lines[*i].text) {
            let rest = lines[*i].text[1..].trim_start().to_string();
            if split_key(&rest).is_some() {
                // `- key: value` opens a mapping whose keys sit two columns in.
                lines[*i] = Line {
                    indent: indent + 2,
                    text: rest,
                };
                items.push(block(lines, i, indent + 2));
            } else {
                items.push(scalar(&rest));
                *i += 1;
            }
        }
        return Value::Array(items);
    }
    let mut map = serde_json::Map::new();
    while *i < lines.len() && lines[*i].indent == indent && !is_item(&lines[*i].text) {
        let text = lines[*i].text.clone();
        let (key, rest) = split_key(&text).unwrap_or_else(|| panic!("expected `key:` in {text:?}"));
        *i += 1;
        let value = if !rest.is_empty() {
            scalar(rest)
        } else if *i < lines.len() && lines[*i].indent > indent {
            let child = lines[*i].indent;
            block(lines, i, child)
        } else if *i < lines.len() && lines[*i].indent == indent && is_item(&lines[*i].text) {
            block(lines, i, indent)
        } else {
            Value::Null
        };
        assert!(
            map.insert(key.clone(), value).is_none(),
            "duplicate key {key}"
        );
    }
    assert!(
        *i >= lines.len() || lines[*i].indent < indent,
        "bad indentation at {:?}",
        lines[*i].text
    );
    Value::Object(map)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("expected a string, got {s}"))
                .to_string()
        })
        .collect()
}

/// `${VAR:-default}` → (VAR, default).
fn variable(text: &str) -> (String, String) {
    let inner = text
        .strip_prefix("${")
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or_else(|| panic!("expected ${{VAR:-default}}, got {text}"));
    let (name, default) = inner
        .split_once(":-")
        .unwrap_or_else(|| panic!("{text} needs a default"));
    (name.to_string(), default.to_string())
}

// ---------------------------------------------------------------------------
// The Dockerfile: instructions with continuation lines joined.

fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((op.to_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

/// The instructions of stage `stage` (`FROM … AS stage`).
fn stage(all: &[(String, String)], stage: &str) -> Vec<(String, String)> {
    let suffix = format!(" AS {stage}");
    let start = all
        .iter()
        .position(|(op, args)| op == "FROM" && args.ends_with(&suffix))
        .unwrap_or_else(|| panic!("Dockerfile has no stage {stage}"));
    all[start + 1..]
        .iter()
        .take_while(|(op, _)| op != "FROM")
        .cloned()
        .collect()
}

fn json_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not an exec-form list {args}: {e}"))
}

// ---------------------------------------------------------------------------

const NODES: [i32; 3] = [1, 2, 3];

#[test]
fn local_node_files_form_one_cluster() {
    let mut voter_lists = BTreeSet::new();
    let mut expected_voters = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for n in NODES {
        let rel = format!("config/node-{n}.toml");
        let config = load(&rel, &[]);
        assert_eq!(config.node_id, n, "{rel}: node_id");
        assert_eq!(
            config.listen.ip().to_string(),
            "127.0.0.1",
            "{rel}: loopback only"
        );
        assert_eq!(
            config.listen.port(),
            9091 + n as u16,
            "{rel}: node N on 909(1+N)"
        );
        assert_eq!(config.advertised(), config.listen.to_string(), "{rel}");
        assert_eq!(
            config.data_dir,
            Path::new(&format!("data/node-{n}")),
            "{rel}"
        );
        assert!(config.is_voter(), "{rel}: controller role");
        assert!(ports.insert(config.listen.port()), "{rel}: port used twice");
        let metrics = config.metrics_listen.expect("node files serve metrics");
        assert_eq!(
            metrics.ip().to_string(),
            "127.0.0.1",
            "{rel}: metrics on loopback only"
        );
        assert!(
            ports.insert(metrics.port()),
            "{rel}: metrics port used twice"
        );
        expected_voters.insert(format!("{n}@{}", config.advertised()));
        voter_lists.insert(voter_set(&toml_file(&rel)).into_iter().collect::<Vec<_>>());
        assert_eq!(config.voters().unwrap().len(), 3, "{rel}");
    }
    assert_eq!(
        voter_lists.len(),
        1,
        "node files disagree on voters: {voter_lists:?}"
    );
    let voters: BTreeSet<String> = voter_lists
        .into_iter()
        .next()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        voters, expected_voters,
        "voters are the nodes' advertised addresses"
    );
}

#[test]
fn dockerfile_image_defaults_agree_with_its_config() {
    let all = dockerfile();
    let base = stage(&all, "runtime-base");
    let get = |op: &str| -> Vec<String> {
        base.iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.clone())
            .collect()
    };

    assert_eq!(
        get("ENTRYPOINT"),
        [r#"["runnel"]"#],
        "entrypoint is the runnel binary"
    );
    let cmd = json_form(&get("CMD")[0]);
    assert_eq!(cmd[..2], ["server", "--config"], "default command: {cmd:?}");
    let default_config = &cmd[2];

    // Both docker configs are copied to /etc/runnel/.
    let copies = get("COPY");
    let copied: BTreeMap<String, String> = copies
        .iter()
        .flat_map(|args| {
            let words: Vec<&str> = args.split_whitespace().collect();
            let (dest, sources) = words.split_last().expect("COPY has a destination");
            sources
                .iter()
                .map(|s| {
                    let name = Path::new(s).file_name().unwrap().to_string_lossy();
                    (format!("{dest}{name}"), s.to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let source_of = |in_image: &str| -> String {
        copied
            .get(in_image)
            .unwrap_or_else(|| panic!("the image has no {in_image} (COPY: {copies:?})"))
            .clone()
    };
    let single_rel = source_of(default_config);
    assert_eq!(single_rel, "config/docker/runnel.toml");
    source_of("/etc/runnel/cluster.toml");

    let single = load(&single_rel, &[]);
    let port = single.listen.port();
    let metrics_port = single
        .metrics_listen
        .expect("the image serves metrics")
        .port();
    assert_eq!(
        get("EXPOSE"),
        [format!("{port} {metrics_port}")],
        "EXPOSE is the listen port and the metrics port"
    );
    assert_eq!(
        port_of(&single.advertised()),
        port,
        "runnel.toml advertises the port it listens on (docker run -p {port}:{port})"
    );
    assert_eq!(
        single.voters().unwrap().len(),
        1,
        "the image default is one node"
    );
    // One node has no replicas: it fsyncs, as config/single.toml does.
    assert_eq!(
        single.topic_defaults().get("flush.ms").map(String::as_str),
        Some("1000"),
        "the image's single node fsyncs at least every second"
    );

    let health = get("HEALTHCHECK");
    assert_eq!(health.len(), 1);
    let cmd_at = health[0].find("CMD ").expect("HEALTHCHECK … CMD [...]");
    let check = json_form(&health[0][cmd_at + 4..]);
    assert_eq!(
        check,
        [
            "runnel",
            "--bootstrap",
            &format!("127.0.0.1:{port}"),
            "cluster",
            "health",
            "--node"
        ],
        "the health check asks this node's gRPC health service"
    );

    let volume = json_form(&get("VOLUME")[0]);
    assert_eq!(
        volume,
        [single.data_dir.display().to_string()],
        "VOLUME is data_dir"
    );
    let user = &get("USER")[0];
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "the image runs as a non-root user, not {user}"
    );

    // Both final images are built on runtime-base.
    for (op, args) in &all {
        if op == "FROM" && (args.ends_with(" AS prebuilt") || args.ends_with(" AS runtime")) {
            assert!(args.starts_with("runtime-base "), "{args}");
        }
    }
    let prebuilt = stage(&all, "prebuilt");
    assert!(
        prebuilt
            .iter()
            .any(|(op, a)| op == "COPY" && a.ends_with(" /usr/local/bin/runnel")),
        "the prebuilt stage installs the binary"
    );
}

#[test]
fn compose_file_agrees_with_dockerfile_and_cluster_config() {
    let compose = yaml(&read("docker-compose.yml"));
    let services = compose["services"].as_object().expect("services");
    // Services with a profile (monitoring) are not started by a plain
    // `docker compose up`, so the cluster never needs their images.
    let names: BTreeSet<&str> = services
        .iter()
        .filter(|(_, s)| s.get("profiles").is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["runnel-1", "runnel-2", "runnel-3"]));
    for (name, s) in services.iter().filter(|(_, s)| s.get("profiles").is_some()) {
        assert_eq!(strings(&s["profiles"]), ["monitoring"], "{name}: profile");
        assert!(
            s.get("build").is_none(),
            "{name}: monitoring images are not built"
        );
    }

    let cluster_rel = "config/docker/cluster.toml";
    let cluster = toml_file(cluster_rel);
    // As a container loads it: its advertised address comes from its
    // environment (the file listens on every interface).
    let base = load(
        cluster_rel,
        &[
            ("RUNNEL_ADVERTISED_ADDRESS", "runnel-1:9092"),
            ("RUNNEL_INTERNAL_ADVERTISED_ADDRESS", "runnel-1:9192"),
        ],
    );
    let internal_port = base
        .internal_listen
        .expect("the nodes talk on their own port")
        .port();
    assert_ne!(internal_port, base.listen.port());
    let listen_port = base.listen.port();
    let data_dir = base.data_dir.display().to_string();

    // The compose network: the host's address on it (the gateway) is what
    // the nodes advertise and where their ports are published.
    let network = &compose["networks"]["runnel"]["ipam"]["config"][0];
    let (ip_var, host_ip) = variable(network["gateway"].as_str().expect("gateway"));
    let (_, subnet) = variable(network["subnet"].as_str().expect("subnet"));
    let (net, bits) = subnet.split_once('/').expect("subnet is CIDR");
    let mask = u32::MAX << (32 - bits.parse::<u32>().unwrap());
    let net: u32 = net.parse::<std::net::Ipv4Addr>().unwrap().into();
    let gw: u32 = host_ip.parse::<std::net::Ipv4Addr>().unwrap().into();
    assert_eq!(gw & mask, net, "gateway {host_ip} lies outside {subnet}");
    // Link-local by default: never a private range the host may route.
    assert_eq!(
        gw >> 16,
        u32::from(std::net::Ipv4Addr::new(169, 254, 0, 0)) >> 16,
        "default network {subnet} is not link-local"
    );
    let host_ip_expr = format!("${{{ip_var}:-{host_ip}}}");

    let declared_volumes: BTreeSet<String> = compose["volumes"]
        .as_object()
        .expect("volumes")
        .keys()
        .cloned()
        .collect();
    let mut published = BTreeSet::new();
    let mut used_volumes = BTreeSet::new();
    let mut expected_voters = BTreeSet::new();
    for n in NODES {
        let name = format!("runnel-{n}");
        let s = &services[&name];
        let ctx = |what: &str| format!("{name}: {what}");

        assert_eq!(s["hostname"], name.as_str(), "{}", ctx("hostname"));
        assert_eq!(
            strings(&s["command"]),
            ["server", "--config", "/etc/runnel/cluster.toml"],
            "{}",
            ctx("command")
        );
        assert!(s["image"].as_str().is_some(), "{}", ctx("image"));
        assert!(s["build"]["context"].as_str().is_some(), "{}", ctx("build"));
        assert!(s["restart"].as_str().is_some(), "{}", ctx("restart policy"));
        assert_eq!(strings(&s["networks"]), ["runnel"], "{}", ctx("networks"));

        // Ports: the container's listen port, on one host port, at
        // 127.0.0.1 and at the host's compose-network address.
        let ports = strings(&s["ports"]);
        let mut host_ports = BTreeSet::new();
        let mut host_ips = BTreeSet::new();
        for p in &ports {
            let (rest, container) = p.rsplit_once(':').unwrap();
            let (ip, host_port) = rest.rsplit_once(':').expect("HOST_IP:HOST_PORT:PORT");
            assert_eq!(container.parse::<u16>().unwrap(), listen_port, "{}", ctx(p));
            host_ports.insert(host_port.parse::<u16>().unwrap());
            host_ips.insert(ip.to_string());
        }
        assert_eq!(host_ports.len(), 1, "{}", ctx("one host port per node"));
        let host_port = *host_ports.iter().next().unwrap();
        assert!(
            published.insert(host_port),
            "{}",
            ctx("host port used twice")
        );
        assert_eq!(
            host_ips,
            BTreeSet::from(["127.0.0.1".to_string(), host_ip_expr.clone()]),
            "{}",
            ctx("published on loopback and the compose gateway only")
        );

        // Node id and advertised address from the environment, as the
        // container's server reads them.
        let env = &s["environment"];
        assert_eq!(
            env["RUNNEL_NODE_ID"],
            n.to_string().as_str(),
            "{}",
            ctx("node id")
        );
        let advertised = env["RUNNEL_ADVERTISED_ADDRESS"]
            .as_str()
            .expect("advertised");
        assert_eq!(
            advertised,
            format!("{host_ip_expr}:{host_port}"),
            "{}",
            ctx("advertises its published port at the gateway address")
        );
        let resolved = advertised.replace(&host_ip_expr, &host_ip);
        // The other nodes reach it container to container, by service
        // name, on the internal port.
        let internal = env["RUNNEL_INTERNAL_ADVERTISED_ADDRESS"]
            .as_str()
            .expect("internal advertised address");
        assert_eq!(
            internal,
            format!("{name}:{internal_port}"),
            "{}",
            ctx("internal address by service name")
        );
        let config = load(
            cluster_rel,
            &[
                ("RUNNEL_NODE_ID", &n.to_string()),
                ("RUNNEL_ADVERTISED_ADDRESS", &resolved),
                ("RUNNEL_INTERNAL_ADVERTISED_ADDRESS", internal),
            ],
        );
        assert_eq!(config.node_id, n);
        assert_eq!(config.advertised(), resolved);
        assert_eq!(config.internal_advertised(), internal);
        expected_voters.insert(format!("{n}@{name}:{internal_port}"));

        // Data on a named volume at data_dir.
        let volumes = strings(&s["volumes"]);
        assert_eq!(volumes.len(), 1, "{}", ctx("volumes"));
        let (volume, target) = volumes[0].split_once(':').unwrap();
        assert_eq!(target, data_dir, "{}", ctx("volume at data_dir"));
        assert!(declared_volumes.contains(volume), "{}", ctx("named volume"));
        assert!(
            used_volumes.insert(volume.to_string()),
            "{}",
            ctx("shared volume")
        );

        // The same health check as the image's, on the listen port.
        assert_eq!(
            strings(&s["healthcheck"]["test"]),
            [
                "CMD",
                "runnel",
                "--bootstrap",
                &format!("127.0.0.1:{listen_port}"),
                "cluster",
                "health",
                "--node"
            ],
            "{}",
            ctx("healthcheck")
        );

        // A stop gives the node time for its own shutdown budget: the
        // leadership handover (fence, then wait: two submit timeouts),
        // leaving the quorum (5 s), the open requests' and the metrics
        // endpoint's grace periods, and the final flush. Past it, the
        // container is SIGKILLed and the restart recovers the logs.
        let grace = s["stop_grace_period"].as_str().expect("stop_grace_period");
        let grace_ms: u64 = grace
            .strip_suffix('s')
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n * 1000)
            .unwrap_or_else(|| panic!("{}", ctx("stop_grace_period in seconds")));
        let budget_ms = 2 * base.controller.submit_timeout_ms
            + 5_000
            + 2 * base.broker.shutdown_grace_ms
            + 5_000;
        assert!(
            grace_ms >= budget_ms,
            "{}: {grace_ms} ms < {budget_ms} ms",
            ctx("stop_grace_period")
        );

        // No node waits for another to be healthy: health may need the
        // quorum, and the quorum needs every node started.
        if let Some(deps) = s.get("depends_on").and_then(Value::as_object) {
            for (dep, cond) in deps {
                assert!(services.contains_key(dep), "{}", ctx(dep));
                assert_ne!(
                    cond["condition"],
                    "service_healthy",
                    "{}",
                    ctx("service_healthy would deadlock quorum formation")
                );
            }
        }
    }
    assert_eq!(published, BTreeSet::from([9092, 9093, 9094]));
    assert_eq!(
        voter_set(&cluster),
        expected_voters,
        "{cluster_rel}: voters"
    );
    assert!(
        cluster.get("advertised_address").is_none(),
        "set per container"
    );
}

#[test]
fn every_config_file_is_documented() {
    let doc = read("config/README.md");
    for dir in ["config", "config/docker"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let rel = path.strip_prefix(root().join("config")).unwrap();
                let rel = rel.display().to_string();
                assert!(
                    doc.contains(&format!("`{rel}`")),
                    "config/README.md does not list `{rel}`"
                );
            }
        }
    }
}

#[test]
fn yaml_subset_reader() {
    let v = yaml(
        "a:\n  b: \"x\"\n  c:\n    - \"1\"\n    - two\n  d: [\"p\", \"q\"]\nlist:\n  - k: v\n    m: w\n  - z\ne:\n",
    );
    assert_eq!(v["a"]["b"], "x");
    assert_eq!(strings(&v["a"]["c"]), ["1", "two"]);
    assert_eq!(strings(&v["a"]["d"]), ["p", "q"]);
    assert_eq!(v["list"][0]["m"], "w");
    assert_eq!(v["list"][1], "z");
    assert_eq!(v["e"], Value::Null);
}

#[test]
fn prometheus_scrapes_every_compose_node_on_its_metrics_port() {
    let compose = yaml(&read("docker-compose.yml"));
    let services = compose["services"].as_object().expect("services");
    let cluster = load(
        "config/docker/cluster.toml",
        &[
            ("RUNNEL_ADVERTISED_ADDRESS", "runnel-1:9092"),
            ("RUNNEL_INTERNAL_ADVERTISED_ADDRESS", "runnel-1:9192"),
        ],
    );
    let metrics = cluster.metrics_listen.expect("cluster.toml serves metrics");
    assert_eq!(
        metrics.ip().to_string(),
        "0.0.0.0",
        "reachable on the compose network"
    );
    let prometheus = yaml(&read("deploy/prometheus/prometheus.yml"));
    let targets: BTreeSet<String> =
        strings(&prometheus["scrape_configs"][0]["static_configs"][0]["targets"])
            .into_iter()
            .collect();
    let expected: BTreeSet<String> = NODES
        .iter()
        .map(|n| format!("runnel-{n}:{}", metrics.port()))
        .collect();
    assert_eq!(targets, expected);
    for n in NODES {
        assert!(services.contains_key(&format!("runnel-{n}")));
    }
    // The monitoring services mount the files this repository ships.
    for (service, file) in [
        ("prometheus", "deploy/prometheus/prometheus.yml"),
        ("grafana", "deploy/grafana/runnel.json"),
    ] {
        let mounts = strings(&services[service]["volumes"]);
        assert!(
            mounts.iter().any(|m| m.starts_with(&format!("./{file}:"))),
            "{service} mounts {file}: {mounts:?}"
        );
        assert!(root().join(file).exists(), "{file}");
    }
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/runnel.json")).expect("dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 10));
    // Cluster-wide figures come from the active controller's view: every
    // node reports its own copy of the metadata, and one cut off from the
    // quorum keeps a stale one (a max over the nodes showed four brokers
    // of three).
    let text = read("deploy/grafana/runnel.json");
    for line in text.lines().filter(|l| l.contains("\"expr\"")) {
        if line.contains("runnel_cluster_") || line.contains("runnel_controller_leader_id") {
            assert!(
                line.contains("runnel_controller_active == 1"),
                "not from the active controller: {line}"
            );
        }
    }
}
