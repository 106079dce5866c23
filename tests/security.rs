//! Security end to end: TLS and mutual TLS on the client listener,
//! username/password authentication, ACLs, quotas, and the internal
//! listener that only the cluster's own brokers may reach. Every
//! certificate is generated here with rcgen: two CAs (the cluster's and a
//! foreign one), leaf certificates whose CN is the principal, and an
//! expired one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, free_ports, ServerProcess};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use runnel::client::{
    Client, ClientError, ClientOptions, ClientTls, Credentials, ProducerConfig, ProducerRecord,
};
use runnel_proto::v1 as pb;

/// A certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem_path: PathBuf,
}

/// Files of one leaf certificate.
#[derive(Clone)]
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

fn ca(dir: &Path, name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem_path = dir.join(format!("{name}.pem"));
    std::fs::write(&pem_path, cert.pem()).unwrap();
    Ca {
        cert,
        key,
        pem_path,
    }
}

/// A certificate for `cn` (also valid for 127.0.0.1 and localhost)
/// issued by `ca`; already expired when `expired`.
fn leaf(dir: &Path, ca: &Ca, cn: &str, expired: bool) -> Leaf {
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let tag = if expired { "-expired" } else { "" };
    let issuer = ca.pem_path.file_stem().unwrap().to_string_lossy();
    let leaf = Leaf {
        cert: dir.join(format!("{cn}{tag}-{issuer}.crt")),
        key: dir.join(format!("{cn}{tag}-{issuer}.key")),
    };
    std::fs::write(&leaf.cert, cert.pem()).unwrap();
    std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
    leaf
}

fn options(ca: &Ca, cert: Option<&Leaf>, user: Option<(&str, &str)>) -> ClientOptions {
    ClientOptions {
        tls: Some(ClientTls {
            ca_file: Some(ca.pem_path.clone()),
            cert_file: cert.map(|c| c.cert.clone()),
            key_file: cert.map(|c| c.key.clone()),
        }),
        credentials: match user {
            Some((u, p)) => Credentials::new(u, p).unwrap(),
            None => Credentials::none(),
        },
    }
}

/// Sends one record and waits for its answer.
async fn send_one(
    producer: &runnel::client::Producer,
    topic: &str,
    value: &'static str,
) -> Result<(), ClientError> {
    producer
        .send(topic, ProducerRecord::value(value))
        .await?
        .await
        .map(|_| ())
}

fn code(e: &ClientError) -> pb::ErrorCode {
    e.code()
}

/// Starts one node with `extra_toml` appended to its config.
fn start_node(dir: &Path, extra_toml: &str) -> ServerProcess {
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = 1\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{extra_toml}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    ServerProcess::start(
        &dir.join("data"),
        &["--config", &config.display().to_string()],
    )
}

/// A raw gRPC producer to `addr` (plaintext).
async fn raw_producer(
    addr: &str,
) -> runnel_proto::v1::producer_client::ProducerClient<tonic::transport::Channel> {
    runnel_proto::v1::producer_client::ProducerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A produce of one record of `size` bytes to partition 0 of `topic`,
/// acks=leader.
fn one_record(topic: &str, size: usize) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: topic.into(),
        partition: Some(0),
        records: vec![pb::Record {
            value: Some(vec![7u8; size].into()),
            ..Default::default()
        }],
        acks: pb::Acks::Leader as i32,
        ..Default::default()
    }
}

fn fetch_req(topic: &str) -> pb::FetchRequest {
    pb::FetchRequest {
        topic: topic.into(),
        partition: 0,
        offset: 0,
        max_bytes: 1 << 20,
        max_wait_ms: 0,
        raw: false,
        topic_id: String::new(),
    }
}

/// The CLI with TLS options and credentials from the environment.
fn cli_env(addr: &str, envs: &[(&str, &str)], args: &[&str], stdin: &[u8]) -> (bool, String) {
    use std::io::Write;
    let mut command = Command::new(common::runnel_bin());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("RUNNEL_")) {
        command.env_remove(key);
    }
    let child = command
        .arg("--bootstrap")
        .arg(addr)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = common::Reaped::new(child);
    child
        .child()
        .stdin
        .take()
        .unwrap()
        .write_all(stdin)
        .unwrap();
    let out = child.wait_output(common::CLI_WAIT);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mtls_authentication_and_acls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = ca(d, "cluster-ca");
    let foreign = ca(d, "foreign-ca");
    let server_cert = leaf(d, &good, "broker-1", false);
    let admin = leaf(d, &good, "admin", false);
    let carol = leaf(d, &good, "carol", false);
    let expired = leaf(d, &good, "admin", true);
    let intruder = leaf(d, &foreign, "admin", false);
    let server = start_node(
        d,
        &format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\nclient_auth = \"optional\"\n\
             [security]\nauthentication = true\nauthorization = true\nsuper_users = [\"admin\"]\n\
             broker_principals = [\"broker-1\"]\n",
            server_cert.cert.display(),
            server_cert.key.display(),
            good.pem_path.display()
        ),
    );
    let addr = server.addr.clone();

    // The internal services share this listener: only the broker's own
    // certificate reaches them, not a client's (not even a super user's).
    for who in [None, Some(&carol), Some(&admin)] {
        let err = internal_call(&addr, &good, who).await.unwrap_err();
        assert!(err.contains("broker certificates"), "{err}");
    }
    internal_call(&addr, &good, Some(&server_cert))
        .await
        .unwrap();

    // A plaintext client gets nowhere with a TLS listener.
    let plain = match Client::connect(&addr).await {
        Ok(c) => c.list_topics(false).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(plain.is_err(), "plaintext client was served");

    // Certificates from another CA, or expired ones, fail the handshake.
    for (what, cert) in [("foreign CA", &intruder), ("expired", &expired)] {
        let r = match Client::connect_with(&addr, options(&good, Some(cert), None)).await {
            Ok(c) => c.list_topics(false).await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(r.is_err(), "{what} certificate was accepted");
    }

    // TLS without any identity: UNAUTHENTICATED.
    let anonymous = Client::connect_with(&addr, options(&good, None, None))
        .await
        .unwrap();
    let err = anonymous.list_topics(false).await.unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::AuthenticationFailed, "{err}");

    // mTLS: the certificate's CN is the principal. "admin" is a
    // super-user; "carol" has no ACL and is refused by name.
    let admin = Client::connect_with(&addr, options(&good, Some(&admin), None))
        .await
        .unwrap();
    for t in ["orders", "logs-app", "logs-secret", "other"] {
        admin
            .create_topic(t, 1, 1, Default::default())
            .await
            .unwrap();
    }
    let carol = Client::connect_with(&addr, options(&good, Some(&carol), None))
        .await
        .unwrap();
    let err = carol
        .create_topic("carols", 1, 1, Default::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");
    assert!(err.to_string().contains("'carol'"), "{err}");
    assert!(carol.list_topics(false).await.unwrap().is_empty());
    let err = carol
        .init_producer_id(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");
    let err = carol
        .reassign_partitions("orders", vec![(0, vec![1])])
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");
    let err = carol
        .elect_leaders("orders", vec![], false)
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");

    // Users: passwords are checked; a wrong password and an unknown user
    // get the same answer.
    admin.upsert_user("alice", "correct horse").await.unwrap();
    // A name no login header can carry is refused, not stored.
    let err = admin.upsert_user("josé", "pw").await.unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::InvalidRequest, "{err}");
    assert!(err.to_string().contains("visible ASCII"), "{err}");
    let users = admin.list_users().await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].name, "alice");
    let mut messages = Vec::new();
    for (user, password) in [("alice", "wrong"), ("nobody", "correct horse")] {
        let c = Client::connect_with(&addr, options(&good, None, Some((user, password))))
            .await
            .unwrap();
        let err = c.list_topics(false).await.unwrap_err();
        assert_eq!(code(&err), pb::ErrorCode::AuthenticationFailed, "{err}");
        messages.push(err.to_string());
    }
    assert_eq!(
        messages[0], messages[1],
        "the answer hints which part was wrong"
    );

    // Repeated failures are rate limited, even with the right password
    // afterwards.
    admin.upsert_user("mallory", "guessme").await.unwrap();
    let guesser = Client::connect_with(&addr, options(&good, None, Some(("mallory", "x"))))
        .await
        .unwrap();
    for _ in 0..5 {
        let err = guesser.list_topics(false).await.unwrap_err();
        assert!(!err.to_string().contains("too many"), "{err}");
    }
    let err = guesser.list_topics(false).await.unwrap_err();
    assert!(err.to_string().contains("too many"), "{err}");
    let right = Client::connect_with(&addr, options(&good, None, Some(("mallory", "guessme"))))
        .await
        .unwrap();
    let err = right.list_topics(false).await.unwrap_err();
    assert!(err.to_string().contains("too many"), "{err}");

    // ACLs through the CLI (TLS options and credentials from the
    // environment): alice may write "orders" but not read it; she may read
    // topics prefixed "logs-" except "logs-secret" (deny wins).
    let ca_path = good.pem_path.display().to_string();
    let admin_cert = leaf(d, &good, "admin", false);
    let (cert_path, key_path) = (
        admin_cert.cert.display().to_string(),
        admin_cert.key.display().to_string(),
    );
    let admin_env = [
        ("RUNNEL_TLS_CA", ca_path.as_str()),
        ("RUNNEL_TLS_CERT", cert_path.as_str()),
        ("RUNNEL_TLS_KEY", key_path.as_str()),
    ];
    for args in [
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--topic",
            "orders",
            "--operation",
            "write",
        ][..],
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--topic",
            "logs-",
            "--prefixed",
            "--operation",
            "read",
        ],
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--topic",
            "logs-",
            "--prefixed",
            "--operation",
            "describe",
        ],
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--topic",
            "logs-secret",
            "--operation",
            "read",
            "--deny",
        ],
    ] {
        let (ok, out) = cli_env(&addr, &admin_env, args, b"");
        assert!(ok, "{args:?}: {out}");
    }
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &["acl", "list", "--principal", "alice"],
        b"",
    );
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("alice")).count(),
        4,
        "{out}"
    );
    assert!(out.contains("prefixed") && out.contains("deny"), "{out}");
    // A user created from the CLI (password on stdin) logs in from the
    // CLI (password from the environment), and is not echoed.
    let (ok, out) = cli_env(&addr, &admin_env, &["user", "add", "bob"], b"hunter2\n");
    assert!(ok && !out.contains("hunter2"), "{out}");
    let bob_env = [
        ("RUNNEL_TLS_CA", ca_path.as_str()),
        ("RUNNEL_USER", "bob"),
        ("RUNNEL_PASSWORD", "hunter2"),
    ];
    let (ok, out) = cli_env(&addr, &bob_env, &["topic", "list"], b"");
    assert!(ok, "bob cannot log in: {out}");
    let (ok, out) = cli_env(&addr, &bob_env, &["topic", "create", "bobs"], b"");
    assert!(!ok && out.contains("AuthorizationFailed"), "{out}");
    // Without Describe on the cluster, bob's health summary says the
    // groups' lag is unavailable, and why: not that there are no groups.
    let (_, out) = cli_env(&addr, &bob_env, &["cluster", "health"], b"");
    assert!(out.contains("group lag:   unavailable ("), "{out}");
    // Groups: bob may not join a group without READ on it (and on the
    // topic); with both, he consumes as a member and commits.
    let (ok, out) = cli_env(&addr, &admin_env, &["produce", "logs-app"], b"line one\n");
    assert!(ok, "{out}");
    // runnel perf takes the same TLS options and credentials.
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "perf",
            "produce",
            "--topic",
            "perf-tls",
            "--records",
            "200",
            "--record-size",
            "64",
        ],
        b"",
    );
    assert!(ok && out.contains("200 records"), "{out}");
    let consume = [
        "consume",
        "logs-app",
        "--group",
        "g-bob",
        "--from",
        "earliest",
        "--max-records",
        "1",
    ];
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "acl",
            "add",
            "--principal",
            "bob",
            "--topic",
            "logs-app",
            "--operation",
            "read",
        ],
        b"",
    );
    assert!(ok, "{out}");
    let (ok, out) = cli_env(&addr, &bob_env, &consume, b"");
    assert!(!ok && out.contains("AuthorizationFailed"), "{out}");
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "acl",
            "add",
            "--principal",
            "bob",
            "--group",
            "g-",
            "--prefixed",
            "--operation",
            "read",
        ],
        b"",
    );
    assert!(ok, "{out}");
    let (ok, out) = cli_env(&addr, &bob_env, &consume, b"");
    assert!(ok && out.contains("line one"), "{out}");
    // A join naming a topic bob may not see is refused: the coordinator
    // would assign him its partitions (telling him it exists, and how
    // many partitions it has).
    let bob = Client::connect_with(&addr, options(&good, None, Some(("bob", "hunter2"))))
        .await
        .unwrap();
    let mut mixed = bob
        .group_consumer(runnel::client::GroupConfig::new(
            "g-mixed",
            &["logs-app", "orders"],
        ))
        .unwrap();
    let polled = mixed.poll().await;
    assert!(
        matches!(&polled, Err(e) if code(e) == pb::ErrorCode::AuthorizationFailed),
        "{polled:?}"
    );
    drop(mixed);
    if let Ok(d) = admin.describe_group("g-mixed").await {
        assert!(
            d.members
                .iter()
                .flat_map(|m| &m.assignment)
                .all(|tp| tp.topic != "orders"),
            "{d:?}"
        );
    }
    // Resetting a group's offsets of a topic needs READ on the topic too,
    // as committing does: bob may not learn "orders"' offsets this way.
    let (ok, out) = cli_env(
        &addr,
        &bob_env,
        &[
            "group",
            "reset-offsets",
            "g-bob",
            "--topic",
            "orders",
            "--to-earliest",
            "--dry-run",
        ],
        b"",
    );
    assert!(!ok && out.contains("AuthorizationFailed"), "{out}");
    // Topics bob may not describe look the same whether they exist or
    // not: both refused, neither "unknown".
    for topic in ["orders", "no-such-topic"] {
        let (ok, out) = cli_env(&addr, &bob_env, &["produce", topic], b"x\n");
        assert!(!ok && out.contains("AuthorizationFailed"), "{topic}: {out}");
        assert!(!out.contains("unknown topic"), "{topic}: {out}");
    }
    // Offsets of topics bob may not see stay hidden in his own group:
    // the admin resets g-bob's offsets of "orders" (the group is empty
    // now); bob's describe and offset fetch show "logs-app" only.
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "group",
            "reset-offsets",
            "g-bob",
            "--topic",
            "orders",
            "--to-earliest",
            "--execute",
        ],
        b"",
    );
    assert!(ok && out.contains("orders"), "{out}");
    let (ok, out) = cli_env(&addr, &admin_env, &["group", "describe", "g-bob"], b"");
    assert!(ok && out.contains("orders"), "{out}");
    let (ok, out) = cli_env(&addr, &bob_env, &["group", "describe", "g-bob"], b"");
    assert!(
        ok && out.contains("logs-app") && !out.contains("orders"),
        "{out}"
    );
    // Another group name is still refused.
    let (ok, out) = cli_env(
        &addr,
        &bob_env,
        &[
            "consume",
            "logs-app",
            "--group",
            "other",
            "--max-records",
            "1",
        ],
        b"",
    );
    assert!(!ok && out.contains("AuthorizationFailed"), "{out}");

    // Credentials are never sent in the clear.
    let (ok, out) = cli_env(
        &addr,
        &[("RUNNEL_USER", "bob"), ("RUNNEL_PASSWORD", "hunter2")],
        &["topic", "list"],
        b"",
    );
    assert!(!ok && out.contains("only sent over TLS"), "{out}");
    // Without a password the CLI refuses before connecting.
    let (ok, out) = cli_env(
        &addr,
        &[("RUNNEL_TLS_CA", ca_path.as_str()), ("RUNNEL_USER", "bob")],
        &["topic", "list"],
        b"",
    );
    assert!(!ok && out.contains("RUNNEL_PASSWORD"), "{out}");

    let alice = Client::connect_with(
        &addr,
        options(&good, None, Some(("alice", "correct horse"))),
    )
    .await
    .unwrap();
    // Write on a topic lets her be an idempotent producer.
    alice
        .init_producer_id(Duration::from_secs(5))
        .await
        .unwrap();
    // Write implies describe: alice sees "orders" and the logs topics.
    let mut visible: Vec<String> = alice
        .list_topics(false)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    visible.sort();
    assert_eq!(visible, ["logs-app", "logs-secret", "orders"]);
    let producer = alice.producer(ProducerConfig::default());
    let at = producer
        .send("orders", ProducerRecord::value("first order"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(at.offset, 0);
    // Her password changes while her produce stream is open: the stream
    // is not served on (it was, for as long as it stayed open).
    admin.upsert_user("alice", "battery staple").await.unwrap();
    let r = send_one(&producer, "orders", "after the change").await;
    let err = r.expect_err("an open stream outlived its password");
    assert_eq!(code(&err), pb::ErrorCode::AuthenticationFailed, "{err}");
    drop(producer);
    admin.upsert_user("alice", "correct horse").await.unwrap();
    // Saving the password she has already changes nothing: her streams go
    // on (a new salt changed the stored hash and ended them).
    let producer = alice.producer(ProducerConfig::default());
    for value in ["before the re-save", "after the re-save"] {
        producer
            .send("orders", ProducerRecord::value(value))
            .await
            .unwrap()
            .await
            .unwrap();
        admin.upsert_user("alice", "correct horse").await.unwrap();
    }
    producer.close().await.unwrap();
    let err = alice.fetch(fetch_req("orders")).await.unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");
    // Prefix: "logs-app" readable; deny beats the prefixed allow.
    alice.fetch(fetch_req("logs-app")).await.unwrap();
    let err = alice.fetch(fetch_req("logs-secret")).await.unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");
    // Removing the write ACL takes effect at once (describe stays, so the
    // producer still finds the topic and is refused).
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--topic",
            "orders",
            "--operation",
            "describe",
        ],
        b"",
    );
    assert!(ok, "{out}");
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "acl",
            "remove",
            "--principal",
            "alice",
            "--topic",
            "orders",
            "--operation",
            "write",
        ],
        b"",
    );
    assert!(ok, "{out}");
    let producer = alice.producer(ProducerConfig::default());
    let r = send_one(&producer, "orders", "second order").await;
    let err = r.expect_err("write allowed after the ACL was removed");
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");

    // A member whose group READ is removed while it reads: its heartbeats
    // are refused, and its poll says so (it went on reading partitions
    // the coordinator had given to others, the refusals retried quietly).
    let group_acl = |verb: &'static str| {
        [
            "acl",
            verb,
            "--principal",
            "alice",
            "--group",
            "g-beat",
            "--operation",
            "read",
        ]
    };
    let (ok, out) = cli_env(&addr, &admin_env, &group_acl("add"), b"");
    assert!(ok, "{out}");
    let mut member = alice
        .group_consumer(runnel::client::GroupConfig::new("g-beat", &["logs-app"]))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while member.assignment().is_empty() {
        assert!(Instant::now() < deadline, "never assigned");
        member.poll().await.unwrap();
    }
    let (ok, out) = cli_env(&addr, &admin_env, &group_acl("remove"), b"");
    assert!(ok, "{out}");
    let err = first_poll_error(
        &mut member,
        "a member refused its heartbeats kept polling without an error",
    )
    .await;
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");
    drop(member);

    // A subscription is checked chunk by chunk: a deny added while it
    // runs ends it.
    let mut sub = alice
        .partition_consumer("logs-app", 0, runnel::client::StartFrom::Earliest)
        .await
        .unwrap();
    sub.streaming = true;
    sub.max_wait_ms = 100;
    while sub.poll().await.unwrap().is_empty() {}
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--topic",
            "logs-app",
            "--operation",
            "read",
            "--deny",
        ],
        b"",
    );
    assert!(ok, "{out}");
    let (ok, out) = cli_env(&addr, &admin_env, &["produce", "logs-app"], b"line two\n");
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        assert!(Instant::now() < deadline, "the subscription went on");
        match sub.poll().await {
            Ok(records) => assert!(
                records
                    .iter()
                    .all(|r| r.value.as_deref() != Some(&b"line two"[..])),
                "read after the deny"
            ),
            Err(e) => break e,
        }
    };
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");
    // A group member is told too: its poll fails with the refusal
    // instead of answering nothing forever.
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--group",
            "g-alice",
            "--operation",
            "read",
        ],
        b"",
    );
    assert!(ok, "{out}");
    let mut member = alice
        .group_consumer(runnel::client::GroupConfig::new("g-alice", &["logs-app"]))
        .unwrap();
    let err = first_poll_error(
        &mut member,
        "a member denied READ kept polling without an error",
    )
    .await;
    assert_eq!(code(&err), pb::ErrorCode::AuthorizationFailed, "{err}");
    assert!(member.generation() >= 1, "refused before it joined: {err}");
    drop(member);

    // A producer whose credentials stop working: its next call is refused,
    // and the batch fails with that error at once instead of being retried
    // until its delivery timeout (as Kafka's producer does).
    admin
        .create_topic("payments", 2, 1, Default::default())
        .await
        .unwrap();
    let (ok, out) = cli_env(
        &addr,
        &admin_env,
        &[
            "acl",
            "add",
            "--principal",
            "alice",
            "--topic",
            "payments",
            "--operation",
            "write",
        ],
        b"",
    );
    assert!(ok, "{out}");
    let producer = alice.producer(ProducerConfig {
        idempotence: false,
        delivery_timeout: Duration::from_secs(600),
        ..ProducerConfig::default()
    });
    let to = |partition| {
        let mut r = ProducerRecord::value("payment");
        r.partition = Some(partition);
        r
    };
    producer
        .send("payments", to(0))
        .await
        .unwrap()
        .await
        .unwrap();
    admin.delete_user("alice").await.unwrap();
    // Partition 1's stream is opened only now, with the topic's metadata
    // cached from partition 0's send.
    let r = match producer.send("payments", to(1)).await {
        Ok(delivery) => tokio::time::timeout(Duration::from_secs(60), delivery)
            .await
            .expect("the refused batch was retried")
            .map(|_| ()),
        Err(e) => Err(e),
    };
    let err = r.expect_err("produced after the user was removed");
    assert_eq!(code(&err), pb::ErrorCode::AuthenticationFailed, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_slows_a_producer_to_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_node(dir.path(), "");
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("q", 1, 1, Default::default())
        .await
        .unwrap();
    const RATE: u64 = 200_000;
    // Through the CLI: anonymous clients get the default quota.
    let out = common::cli_ok(
        &server.addr,
        &["quota", "set", "--produce-bytes-per-sec", &RATE.to_string()],
        None,
    );
    assert!(out.contains("<default>"), "{out}");
    let out = common::cli_ok(&server.addr, &["quota", "describe"], None);
    assert!(out.contains("200000"), "{out}");

    let mut producer = raw_producer(&server.addr).await;
    let request = one_record("q", 10_000);
    let size = prost::Message::encoded_len(&request) as u64;
    // 50 requests of ~10 kB at 200 kB/s: about 2.5 s. Each answer waits
    // for the bytes before it, so the last arrives after 49 requests'
    // worth of time.
    let count = 50u64;
    let started = Instant::now();
    for _ in 0..count {
        let r = producer
            .produce(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.error_code, pb::ErrorCode::None as i32);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = ((count - 1) * size) as f64 / elapsed;
    eprintln!("quota {RATE} B/s: measured {rate:.0} B/s over {elapsed:.2} s");
    // Never faster than the quota. A stalled machine only makes it slower
    // (the throttle never makes up lost time), so the lower bound is loose:
    // it catches a quota held to a fraction of its rate, not noise.
    assert!(
        rate <= RATE as f64 * 1.10 && rate >= RATE as f64 * 0.25,
        "measured {rate:.0} B/s against a quota of {RATE} B/s ({elapsed:.2} s)"
    );

    // Concurrent calls are held to the rate too: their appends are
    // spread out (before, every call was appended at once and only the
    // answers waited).
    let end = || async {
        client
            .list_offsets("q", 0, pb::OffsetSpec::Latest, 0)
            .await
            .unwrap()
            .offset
    };
    let before = end().await;
    let started = Instant::now();
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let (mut p, r) = (producer.clone(), request.clone());
            tokio::spawn(async move { p.produce(r).await })
        })
        .collect();
    // A look while they run: 40 calls of ~10 kB are 2 s of quota. What
    // is appended by then is at most what the quota allowed in the time
    // since they started (measured after the look), plus a few.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let appended = end().await - before;
    let allowed = (started.elapsed().as_secs_f64() * RATE as f64 / size as f64) as i64 + 5;
    assert!(
        appended <= allowed,
        "{appended} of 40 appended within {:?} (the quota allows {allowed})",
        started.elapsed()
    );
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(end().await - before, 40);

    // A fetch quota delays fetch answers the same way.
    const FETCH_RATE: u64 = 200_000;
    common::cli_ok(
        &server.addr,
        &[
            "quota",
            "set",
            "--fetch-bytes-per-sec",
            &FETCH_RATE.to_string(),
        ],
        None,
    );
    let mut consumer = runnel_proto::v1::consumer_client::ConsumerClient::connect(format!(
        "http://{}",
        server.addr
    ))
    .await
    .unwrap();
    let fetch = pb::FetchRequest {
        max_bytes: 20_000,
        ..fetch_req("q")
    };
    let (mut fetched, mut last) = (0u64, 0u64);
    let started = Instant::now();
    for i in 0..30 {
        let r = consumer
            .fetch(pb::FetchRequest {
                offset: i,
                ..fetch.clone()
            })
            .await
            .unwrap()
            .into_inner();
        last = prost::Message::encoded_len(&r) as u64;
        assert!(last > 10_000, "fetched only {last} bytes");
        fetched += last;
    }
    let elapsed_fetch = started.elapsed().as_secs_f64();
    let fetch_rate = (fetched - last) as f64 / elapsed_fetch;
    eprintln!(
        "fetch quota {FETCH_RATE} B/s: measured {fetch_rate:.0} B/s over {elapsed_fetch:.2} s"
    );
    assert!(
        fetch_rate <= FETCH_RATE as f64 * 1.10 && fetch_rate >= FETCH_RATE as f64 * 0.25,
        "measured {fetch_rate:.0} B/s against a fetch quota of {FETCH_RATE} B/s"
    );

    // A fetch asking for more than the quota allows in the longest hold
    // (10 s) is cut to that, so the next answer is held no longer than a
    // client waits for it. Asking for all of the ~1 MB here at 20 kB/s
    // used to put the clock 50 s ahead: every later fetch was held 30 s,
    // past the Rust client's 15 s, and the consumer never got another
    // answer.
    const SLOW_RATE: u64 = 20_000;
    common::cli_ok(
        &server.addr,
        &[
            "quota",
            "set",
            "--fetch-bytes-per-sec",
            &SLOW_RATE.to_string(),
        ],
        None,
    );
    let whole = pb::FetchRequest {
        max_bytes: 4 << 20,
        ..fetch_req("q")
    };
    let first = client.fetch(whole.clone()).await.unwrap();
    let size = prost::Message::encoded_len(&first) as u64;
    assert!(size <= SLOW_RATE * 10 + 11_000, "an answer of {size} bytes");
    let second = client
        .fetch(pb::FetchRequest {
            offset: first.next_offset,
            ..whole
        })
        .await
        .expect("the fetch after a large answer is answered in time");
    assert!(second.next_offset > first.next_offset);

    // Without the quota the same requests go at full speed.
    common::cli_ok(&server.addr, &["quota", "set"], None);
    let started = Instant::now();
    for _ in 0..count {
        producer.produce(request.clone()).await.unwrap();
    }
    let unthrottled = started.elapsed().as_secs_f64();
    // 50 local requests take milliseconds; the throttled run took at
    // least 2.45 s by construction.
    assert!(
        unthrottled < elapsed / 2.0,
        "{unthrottled:.2} s unthrottled vs {elapsed:.2} s"
    );
}

/// A subscription's first chunk waits for the principal's fetch quota
/// as its later chunks do: subscribing again and again for one chunk each
/// read at full speed (no chunk was ever a later one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_holds_a_subscription_s_first_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_node(dir.path(), "");
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("sub", 1, 1, Default::default())
        .await
        .unwrap();
    let producer = client.producer(ProducerConfig::default());
    for _ in 0..40 {
        producer
            .send("sub", ProducerRecord::value(vec![1u8; 1_000]))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    // 10 s of quota may be taken ahead (the throttle's longest hold):
    // 15 chunks of ~18 kB at 20 kB/s are about 13 s, so the last ones
    // wait.
    const RATE: u64 = 20_000;
    common::cli_ok(
        &server.addr,
        &["quota", "set", "--fetch-bytes-per-sec", &RATE.to_string()],
        None,
    );
    let mut consumer = runnel_proto::v1::consumer_client::ConsumerClient::connect(format!(
        "http://{}",
        server.addr
    ))
    .await
    .unwrap();
    let started = Instant::now();
    let mut read = 0u64;
    for _ in 0..15 {
        let mut stream = consumer
            .subscribe(pb::SubscribeRequest {
                topic: "sub".into(),
                partition: 0,
                offset: 0,
                max_bytes: 20_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let chunk = stream.message().await.unwrap().expect("a first chunk");
        read += prost::Message::encoded_len(&chunk) as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let floor = read as f64 / RATE as f64 - 10.0;
    eprintln!("{read} bytes in first chunks took {elapsed:.2} s (at least {floor:.2} s)");
    assert!(floor > 1.0, "{read} bytes read: too few to wait");
    // A lower bound only: a busy machine makes it slower, never faster.
    assert!(
        elapsed >= floor * 0.5,
        "{read} bytes in {elapsed:.2} s, faster than {RATE} B/s allows"
    );
}

/// TLS connection to the internal listener at `addr` with `cert`,
/// calling the broker-lifecycle heartbeat.
async fn internal_call(addr: &str, ca: &Ca, cert: Option<&Leaf>) -> Result<(), String> {
    use runnel_proto::v1::internal::broker_lifecycle_client::BrokerLifecycleClient;
    let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(&ca.pem_path).unwrap()),
    );
    if let Some(c) = cert {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(&c.cert).unwrap(),
            std::fs::read(&c.key).unwrap(),
        ));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    BrokerLifecycleClient::new(channel)
        .broker_heartbeat(runnel_proto::v1::internal::BrokerHeartbeatRequest {
            broker_id: 99,
            broker_epoch: 1,
            metadata_offset: 0,
            want_shutdown: false,
        })
        .await
        .map(|_| ())
        .map_err(|s| s.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_listener_admits_only_the_clusters_brokers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = ca(d, "cluster-ca");
    let foreign = ca(d, "foreign-ca");
    let ports = free_ports(6);
    let client_addr = |i: usize| format!("127.0.0.1:{}", ports[2 * i]);
    let internal_addr = |i: usize| format!("127.0.0.1:{}", ports[2 * i + 1]);
    let voter = format!("1@{}", internal_addr(0));
    let config = |i: usize, cert: &Leaf, ca: &Ca| {
        let id = i + 1;
        let roles = if id == 1 {
            "[\"broker\", \"controller\"]"
        } else {
            "[\"broker\"]"
        };
        let path = d.join(format!("node-{id}.toml"));
        std::fs::write(
            &path,
            format!(
                "node_id = {id}\nlisten = \"{}\"\ninternal_listen = \"{}\"\n\
                 data_dir = \"{}\"\nroles = {roles}\n\
                 [internal_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n\
                 [security]\nbroker_principals = [\"broker-1\", \"broker-2\", \"broker-3\"]\n\
                 [broker]\nreplica_lag_time_max_ms = 2000\n\
                 [controller]\nvoters = [\"{voter}\"]\nelection_timeout_min_ms = 300\n\
                 election_timeout_max_ms = 600\nheartbeat_interval_ms = 50\n\
                 broker_heartbeat_interval_ms = 200\nbroker_session_timeout_ms = 3000\n",
                client_addr(i),
                internal_addr(i),
                d.join(format!("data-{id}")).display(),
                cert.cert.display(),
                cert.key.display(),
                ca.pem_path.display(),
            ),
        )
        .unwrap();
        path
    };
    let spawn = |i: usize, path: &Path| {
        ServerProcess::spawn(
            &[
                "server".into(),
                "--config".into(),
                path.display().to_string(),
            ],
            &d.join(format!("data-{}", i + 1)),
        )
    };
    let c1 = config(0, &leaf(d, &good, "broker-1", false), &good);
    let node1 = spawn(0, &c1).wait();
    // Broker 2's certificate (and its trust) come from another CA: it
    // keeps trying to register while broker 3, with the cluster's CA,
    // joins and replicates.
    let c2 = config(1, &leaf(d, &foreign, "broker-2", false), &foreign);
    let node2 = spawn(1, &c2);
    let c3 = config(2, &leaf(d, &good, "broker-3", false), &good);
    let node3 = spawn(2, &c3).wait();

    let client = Client::connect(&node1.addr).await.unwrap();
    eventually("broker 3 to register", Duration::from_secs(30), || async {
        let c = client.describe_cluster().await.ok()?;
        c.brokers
            .iter()
            .any(|b| b.id == 3 && !b.fenced)
            .then_some(())
    })
    .await;
    client
        .create_topic("replicated", 1, 2, Default::default())
        .await
        .unwrap();
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("replicated", ProducerRecord::value("over mutual TLS"))
        .await
        .unwrap()
        .await
        .unwrap();
    producer.close().await.unwrap();
    eventually("both replicas in sync", Duration::from_secs(20), || async {
        let t = client.describe_topic("replicated").await.ok()?;
        let p = t.partitions.first()?;
        let mut isr = p.isr.clone();
        isr.sort();
        (isr == [1, 3] && p.high_watermark == 1).then_some(())
    })
    .await;
    // Broker 2 never got in.
    let c = client.describe_cluster().await.unwrap();
    assert!(
        !c.brokers.iter().any(|b| b.id == 2),
        "the foreign broker registered: {:?}",
        c.brokers
    );
    drop(node2);

    // The internal listener itself: no certificate, a foreign one, or a
    // cluster certificate whose CN is not a broker's are all refused; a
    // broker's is served.
    let internal = internal_addr(0);
    assert!(internal_call(&internal, &good, None).await.is_err());
    let foreign_broker = leaf(d, &foreign, "broker-3", false);
    assert!(internal_call(&internal, &good, Some(&foreign_broker))
        .await
        .is_err());
    let stranger = leaf(d, &good, "stranger", false);
    let err = internal_call(&internal, &good, Some(&stranger))
        .await
        .unwrap_err();
    assert!(err.contains("broker certificates"), "{err}");
    internal_call(&internal, &good, Some(&leaf(d, &good, "broker-3", false)))
        .await
        .unwrap();
    // And the client port does not serve the internal services.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", node1.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err =
        runnel_proto::v1::internal::broker_lifecycle_client::BrokerLifecycleClient::new(plain)
            .broker_heartbeat(runnel_proto::v1::internal::BrokerHeartbeatRequest::default())
            .await
            .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unimplemented | tonic::Code::PermissionDenied
        ),
        "{err}"
    );
    drop(node3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_served_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old_ca = ca(d, "old-ca");
    let new_ca = ca(d, "new-ca");
    let old = leaf(d, &old_ca, "broker-1", false);
    let live = Leaf {
        cert: d.join("live.crt"),
        key: d.join("live.key"),
    };
    std::fs::copy(&old.cert, &live.cert).unwrap();
    std::fs::copy(&old.key, &live.key).unwrap();
    let server = start_node(
        d,
        &format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            live.cert.display(),
            live.key.display()
        ),
    );
    let addr = server.addr.clone();
    let works = |ca: &Ca| {
        let opts = options(ca, None, None);
        let addr = addr.clone();
        async move {
            match Client::connect_with(&addr, opts).await {
                Ok(c) => c.list_topics(false).await.is_ok(),
                Err(_) => false,
            }
        }
    };
    assert!(works(&old_ca).await);
    assert!(!works(&new_ca).await);
    let new = leaf(d, &new_ca, "broker-1", false);
    // Key first, then certificate: a reload in between keeps the old pair.
    std::fs::copy(&new.key, &live.key).unwrap();
    std::fs::copy(&new.cert, &live.cert).unwrap();
    eventually(
        "the new certificate to be served",
        Duration::from_secs(10),
        || {
            let check = works(&new_ca);
            async move { check.await.then_some(()) }
        },
    )
    .await;
    assert!(!works(&old_ca).await);
}

#[test]
fn secure_example_config_turns_everything_on() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secure.toml");
    let c = runnel::config::ServerConfig::from_file(&path).unwrap();
    assert!(c.tls.is_some() && c.internal_tls.is_some() && c.internal_listen.is_some());
    assert!(c.security.authentication && c.security.authorization);
    // Authentication without TLS is refused: credentials would travel in
    // the clear.
    let err =
        runnel::config::ServerConfig::from_toml("[security]\nauthentication = true\n").unwrap_err();
    assert!(err.to_string().contains("security.authentication"), "{err}");
    // With the internal services on the client listener, authentication
    // or authorization needs the brokers' certificate names: without
    // them any client could call Raft and replication.
    let tls = "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\n";
    for on in ["authentication", "authorization"] {
        let err =
            runnel::config::ServerConfig::from_toml(&format!("{tls}[security]\n{on} = true\n"))
                .unwrap_err();
        assert!(
            err.to_string().contains("security.broker_principals"),
            "{on}: {err}"
        );
    }
    let err = runnel::config::ServerConfig::from_toml(
        "[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nclient_auth = \"required\"\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("ca_file"), "{err}");
}

/// A produce held by its principal's quota ends at the call's deadline
/// (grpc-timeout) with DEADLINE_EXCEEDED, appending nothing: served by
/// the raw framing, the call ran on past any deadline the client set.
/// And it is not charged: its retries, each with the same short
/// deadline, get through once the quota's clock has come down to it.
/// Charged, each retry pushed the clock further ahead, and none did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_produce_ends_at_the_call_s_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_node(dir.path(), "");
    let client = Client::connect(&server.addr).await.unwrap();
    client
        .create_topic("late", 1, 1, Default::default())
        .await
        .unwrap();
    common::cli_ok(
        &server.addr,
        &["quota", "set", "--produce-bytes-per-sec", "50000"],
        None,
    );
    let mut producer = raw_producer(&server.addr).await;
    // The first passes and puts the quota's clock 4.5 s ahead: each
    // retry (every second) is then held 3.5, 2.5, 1.5 and 0.5 s, half a
    // second from the 1 s deadline either way (delays on a busy machine
    // eat into it), never close to it, where a hold ending just inside it
    // would append a record whose answer still came too late.
    let request = one_record("late", 225_000);
    producer.produce(request.clone()).await.unwrap();
    let mut held = tonic::Request::new(request.clone());
    held.set_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let status = producer.produce(held).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let end = client
        .list_offsets("late", 0, pb::OffsetSpec::Latest, 0)
        .await
        .unwrap()
        .offset;
    assert_eq!(end, 1, "the held request was appended");
    let retrying = Instant::now();
    loop {
        let mut retry = tonic::Request::new(request.clone());
        retry.set_timeout(Duration::from_secs(1));
        match producer.produce(retry).await {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}"),
        }
        assert!(
            retrying.elapsed() < Duration::from_secs(20),
            "no retry got through: each was charged"
        );
    }
    let end = client
        .list_offsets("late", 0, pb::OffsetSpec::Latest, 0)
        .await
        .unwrap()
        .offset;
    assert_eq!(end, 2, "only the retry that got through was appended");
}

/// The first error `member`'s polls return, within a minute; `what`
/// names the failure if none comes.
async fn first_poll_error(
    member: &mut runnel::client::GroupConsumer,
    what: &str,
) -> runnel::client::ClientError {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Err(e) = member.poll().await {
                break e;
            }
        }
    })
    .await
    .expect(what)
}
