//! `runnel user|acl|quota ...`, and the client's TLS and credential
//! options.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use runnel::client::{Client, ClientOptions, ClientTls, Credentials};
use runnel_proto::v1 as pb;

use super::{print_table, Output};

/// TLS and credentials of the CLI (global options).
#[derive(Debug, Args, Default)]
pub struct ClientSecurityArgs {
    /// PEM CA bundle to verify the brokers' certificates; turns TLS on.
    #[arg(long, global = true, env = "RUNNEL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key).
    #[arg(long, global = true, env = "RUNNEL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, global = true, env = "RUNNEL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// User name to authenticate as; the password comes from
    /// RUNNEL_PASSWORD or --password-file, never from the command line.
    #[arg(long, global = true, env = "RUNNEL_USER")]
    pub user: Option<String>,
    /// File whose first line is the password of --user.
    #[arg(long, global = true, env = "RUNNEL_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
}

/// First line of a file, without its line ending.
fn first_line(path: &PathBuf) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read password file {}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

impl ClientSecurityArgs {
    /// The client options these arguments ask for.
    pub fn options(&self) -> anyhow::Result<ClientOptions> {
        let tls = (self.tls_ca.is_some() || self.tls_cert.is_some()).then(|| ClientTls {
            ca_file: self.tls_ca.clone(),
            cert_file: self.tls_cert.clone(),
            key_file: self.tls_key.clone(),
        });
        let credentials = match &self.user {
            None => Credentials::none(),
            Some(user) => {
                let password = match (&self.password_file, std::env::var("RUNNEL_PASSWORD")) {
                    (Some(file), _) => first_line(file)?,
                    (None, Ok(p)) => p,
                    (None, Err(_)) => {
                        bail!("--user needs a password: set RUNNEL_PASSWORD or --password-file")
                    }
                };
                Credentials::new(user, &password)?
            }
        };
        Ok(ClientOptions { tls, credentials })
    }
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user or change its password. The password is read from
    /// --new-password-file, else from the first line of stdin (never
    /// from the command line).
    Add {
        /// The user name.
        name: String,
        /// File whose first line is the new password.
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// Delete a user.
    Remove { name: String },
    /// List users.
    List,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OperationArg {
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
}

/// One ACL on the command line.
#[derive(Debug, Args)]
pub struct AclArgs {
    /// The principal (user name or certificate CN), or '*' for all.
    #[arg(long)]
    principal: String,
    /// A topic name (or prefix with --prefixed).
    #[arg(long, conflicts_with_all = ["group", "cluster"])]
    topic: Option<String>,
    /// A group name (or prefix with --prefixed).
    #[arg(long, conflicts_with = "cluster")]
    group: Option<String>,
    /// The cluster resource.
    #[arg(long)]
    cluster: bool,
    /// Match names starting with the given one.
    #[arg(long)]
    prefixed: bool,
    /// The operation.
    #[arg(long, value_enum)]
    operation: OperationArg,
    /// Deny instead of allow (a deny always wins).
    #[arg(long)]
    deny: bool,
}

impl AclArgs {
    fn to_pb(&self) -> anyhow::Result<pb::Acl> {
        let (resource_type, name) = match (&self.topic, &self.group, self.cluster) {
            (Some(t), None, false) => (pb::AclResourceType::Topic, t.clone()),
            (None, Some(g), false) => (pb::AclResourceType::Group, g.clone()),
            (None, None, true) => (pb::AclResourceType::Cluster, String::new()),
            _ => bail!("name exactly one of --topic, --group or --cluster"),
        };
        Ok(pb::Acl {
            principal: self.principal.clone(),
            resource_type: resource_type as i32,
            resource_name: name,
            pattern_type: if self.prefixed {
                pb::AclPatternType::Prefixed
            } else {
                pb::AclPatternType::Literal
            } as i32,
            operation: match self.operation {
                OperationArg::Read => pb::AclOperation::Read,
                OperationArg::Write => pb::AclOperation::Write,
                OperationArg::Create => pb::AclOperation::Create,
                OperationArg::Delete => pb::AclOperation::Delete,
                OperationArg::Alter => pb::AclOperation::Alter,
                OperationArg::Describe => pb::AclOperation::Describe,
            } as i32,
            permission: if self.deny {
                pb::AclPermission::Deny
            } else {
                pb::AclPermission::Allow
            } as i32,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Add an ACL.
    Add(AclArgs),
    /// Remove an ACL (every field must match).
    Remove(AclArgs),
    /// List ACLs.
    List {
        /// Only this principal's.
        #[arg(long)]
        principal: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Set a principal's (or the default) byte-rate quotas; a limit left
    /// out is removed.
    Set {
        /// The principal; without it, the default quota.
        #[arg(long)]
        principal: Option<String>,
        /// Produce bytes per second.
        #[arg(long)]
        produce_bytes_per_sec: Option<u64>,
        /// Fetch bytes per second.
        #[arg(long)]
        fetch_bytes_per_sec: Option<u64>,
    },
    /// Show every quota.
    Describe,
}

pub async fn run_user(client: &Client, cmd: UserCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add {
            name,
            new_password_file,
        } => {
            let password = match new_password_file {
                Some(f) => first_line(&f)?,
                None => {
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            if password.is_empty() {
                bail!("empty password");
            }
            client.upsert_user(&name, &password).await?;
            super::done(
                output,
                serde_json::json!({"saved_user": name}),
                format_args!("user '{name}' saved"),
            );
        }
        UserCommand::Remove { name } => {
            client.delete_user(&name).await?;
            super::done(
                output,
                serde_json::json!({"removed_user": name}),
                format_args!("user '{name}' removed"),
            );
        }
        UserCommand::List => {
            let users = client.list_users().await?;
            if output == Output::Json {
                let v: Vec<_> = users
                    .iter()
                    .map(|u| serde_json::json!({"name": u.name, "mechanism": u.mechanism, "iterations": u.iterations}))
                    .collect();
                outln!("{}", serde_json::Value::Array(v));
            } else {
                let mut rows = vec![vec!["NAME".to_string(), "MECHANISM".into()]];
                for u in users {
                    rows.push(vec![u.name, format!("{} ({})", u.mechanism, u.iterations)]);
                }
                print_table(&rows);
            }
        }
    }
    Ok(())
}

fn enum_name(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase()
}

pub async fn run_acl(client: &Client, cmd: AclCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        AclCommand::Add(args) => {
            client.create_acl(args.to_pb()?).await?;
            super::done(output, serde_json::json!({"acl": "added"}), "ACL added");
        }
        AclCommand::Remove(args) => {
            client.delete_acl(args.to_pb()?).await?;
            super::done(output, serde_json::json!({"acl": "removed"}), "ACL removed");
        }
        AclCommand::List { principal } => {
            let acls = client
                .list_acls(principal.as_deref().unwrap_or_default())
                .await?;
            let rows: Vec<Vec<String>> = acls
                .iter()
                .map(|a| {
                    vec![
                        a.principal.clone(),
                        enum_name(a.resource_type().as_str_name(), "ACL_RESOURCE_TYPE_"),
                        a.resource_name.clone(),
                        enum_name(a.pattern_type().as_str_name(), "ACL_PATTERN_TYPE_"),
                        enum_name(a.operation().as_str_name(), "ACL_OPERATION_"),
                        enum_name(a.permission().as_str_name(), "ACL_PERMISSION_"),
                    ]
                })
                .collect();
            if output == Output::Json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| serde_json::json!({"principal": r[0], "resource_type": r[1], "name": r[2], "pattern": r[3], "operation": r[4], "permission": r[5]}))
                    .collect();
                outln!("{}", serde_json::Value::Array(v));
            } else {
                let mut table = vec![[
                    "PRINCIPAL",
                    "RESOURCE",
                    "NAME",
                    "PATTERN",
                    "OPERATION",
                    "PERMISSION",
                ]
                .map(String::from)
                .to_vec()];
                table.extend(rows);
                print_table(&table);
            }
        }
    }
    Ok(())
}

pub async fn run_quota(client: &Client, cmd: QuotaCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        QuotaCommand::Set {
            principal,
            produce_bytes_per_sec,
            fetch_bytes_per_sec,
        } => {
            let p = principal.unwrap_or_default();
            client
                .set_quota(&p, produce_bytes_per_sec, fetch_bytes_per_sec)
                .await?;
            let who = if p.is_empty() { "<default>" } else { &p };
            let show = |v: Option<u64>| v.map_or("no limit".to_string(), |v| format!("{v} B/s"));
            let text = if produce_bytes_per_sec.is_none() && fetch_bytes_per_sec.is_none() {
                format!("quota of {who} removed (no limits)")
            } else {
                format!(
                    "quota of {who} set: produce {}, fetch {}",
                    show(produce_bytes_per_sec),
                    show(fetch_bytes_per_sec)
                )
            };
            super::done(
                output,
                serde_json::json!({
                    "principal": who,
                    "produce_bytes_per_sec": produce_bytes_per_sec,
                    "fetch_bytes_per_sec": fetch_bytes_per_sec,
                }),
                text,
            );
        }
        QuotaCommand::Describe => {
            let quotas = client.describe_quotas().await?;
            let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            if output == Output::Json {
                let v: Vec<_> = quotas
                    .iter()
                    .map(|q| serde_json::json!({"principal": q.principal, "produce_bytes_per_sec": q.produce_bytes_per_sec, "fetch_bytes_per_sec": q.fetch_bytes_per_sec}))
                    .collect();
                outln!("{}", serde_json::Value::Array(v));
            } else {
                let mut rows = vec![vec![
                    "PRINCIPAL".to_string(),
                    "PRODUCE_BYTES_PER_SEC".into(),
                    "FETCH_BYTES_PER_SEC".into(),
                ]];
                for q in quotas {
                    rows.push(vec![
                        if q.principal.is_empty() {
                            "<default>".into()
                        } else {
                            q.principal
                        },
                        show(q.produce_bytes_per_sec),
                        show(q.fetch_bytes_per_sec),
                    ]);
                }
                print_table(&rows);
            }
        }
    }
    Ok(())
}
