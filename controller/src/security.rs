//! Security metadata: users (salted password hashes only), ACLs and
//! client quotas, replicated with the rest of [`crate::ClusterMetadata`],
//! and the ACL matcher, a pure function of the ACL list and one request.
//!
//! Where it sits on the data path: beside it. The broker's auth layer
//! reads these from the current metadata on every request; changes arrive
//! as [`crate::MetadataCommand`]s (`UpsertUser`, `CreateAcl`, `SetQuota`,
//! ...) through the Raft log like topic changes.

use serde::{Deserialize, Serialize};

/// Principal name in an ACL that matches every principal.
pub const ANY_PRINCIPAL: &str = "*";

/// A stored password: PBKDF2-HMAC-SHA256 of the password with a random
/// salt. The password itself is never stored or replicated.
/// Its `Debug` leaves out the salt and hash: commands are logged (at
/// debug) as they are applied, and a logged hash can be cracked offline.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCredential {
    /// Always "PBKDF2-HMAC-SHA256" today; kept so the scheme can change.
    pub mechanism: String,
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// Random salt (16 bytes).
    pub salt: Vec<u8>,
    /// Derived key (32 bytes).
    pub hash: Vec<u8>,
}

impl std::fmt::Debug for UserCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCredential")
            .field("mechanism", &self.mechanism)
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// What kind of thing an ACL protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResourceType {
    /// The cluster as a whole (create topics, elect leaders, manage
    /// users, ACLs and quotas).
    Cluster,
    /// A topic.
    Topic,
    /// A consumer group.
    Group,
}

/// How an ACL's resource name matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PatternType {
    /// The name equals the ACL's name (`*` matches every name).
    Literal,
    /// The name starts with the ACL's name.
    Prefixed,
}

/// An operation on a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operation {
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
}

/// Whether an ACL allows or denies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    Allow,
    Deny,
}

/// One ACL: `principal` may (or may not) do `operation` on resources of
/// `resource_type` whose name matches `name` under `pattern`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Acl {
    /// A principal name (user name or certificate CN), or `*` for all.
    pub principal: String,
    /// What kind of resource.
    pub resource_type: ResourceType,
    /// Resource name, or prefix with [`PatternType::Prefixed`]; ignored
    /// for the cluster resource.
    pub name: String,
    /// Literal or prefix match.
    pub pattern: PatternType,
    /// The operation.
    pub operation: Operation,
    /// Allow or deny.
    pub permission: Permission,
}

/// Byte-rate quotas of one principal (or the default). `None` = no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Produce bytes per second.
    pub produce_bytes_per_sec: Option<u64>,
    /// Fetch bytes per second.
    pub fetch_bytes_per_sec: Option<u64>,
}

/// Principal key under which the default quota is stored.
pub const DEFAULT_QUOTA_KEY: &str = "<default>";

impl Acl {
    /// Whether this ACL speaks about `principal` doing `operation` on
    /// `resource_type`/`name`.
    pub fn matches(
        &self,
        principal: &str,
        resource_type: ResourceType,
        name: &str,
        operation: Operation,
    ) -> bool {
        if self.resource_type != resource_type || self.operation != operation {
            return false;
        }
        if self.principal != ANY_PRINCIPAL && self.principal != principal {
            return false;
        }
        if resource_type == ResourceType::Cluster {
            return true;
        }
        match self.pattern {
            PatternType::Literal => self.name == "*" || self.name == name,
            PatternType::Prefixed => name.starts_with(&self.name),
        }
    }
}

/// The ACL decision for one request: allowed only when some ACL allows it
/// and none denies it (deny wins). Describe is also allowed by an allowed
/// Read, Write, Delete or Alter on the same resource (as in Kafka), unless
/// Describe itself is denied.
pub fn authorize<'a>(
    acls: impl IntoIterator<Item = &'a Acl> + Clone,
    principal: &str,
    resource_type: ResourceType,
    name: &str,
    operation: Operation,
) -> bool {
    let decide = |op: Operation| -> Option<Permission> {
        let mut allowed = false;
        for acl in acls.clone() {
            if acl.matches(principal, resource_type, name, op) {
                match acl.permission {
                    Permission::Deny => return Some(Permission::Deny),
                    Permission::Allow => allowed = true,
                }
            }
        }
        allowed.then_some(Permission::Allow)
    };
    match decide(operation) {
        Some(Permission::Deny) => false,
        Some(Permission::Allow) => true,
        None if operation == Operation::Describe => [
            Operation::Read,
            Operation::Write,
            Operation::Delete,
            Operation::Alter,
        ]
        .into_iter()
        .any(|op| decide(op) == Some(Permission::Allow)),
        None => false,
    }
}

/// Whether `principal` may do `operation` on at least one resource of
/// `resource_type` (Kafka's authorize-by-resource-type, which lets
/// InitProducerId through for anyone who may write some topic): some ACL
/// allows it on a name or prefix that no deny ACL covers.
pub fn authorize_any<'a>(
    acls: impl IntoIterator<Item = &'a Acl> + Clone,
    principal: &str,
    resource_type: ResourceType,
    operation: Operation,
) -> bool {
    let speaks_about = |acl: &Acl| {
        acl.resource_type == resource_type
            && acl.operation == operation
            && (acl.principal == ANY_PRINCIPAL || acl.principal == principal)
    };
    // Whether `deny` covers every name `allow` speaks about.
    let covers = |deny: &Acl, allow: &Acl| {
        if resource_type == ResourceType::Cluster {
            return true;
        }
        match (deny.pattern, allow.pattern) {
            (PatternType::Literal, _) if deny.name == "*" => true,
            (PatternType::Literal, PatternType::Literal) => deny.name == allow.name,
            (PatternType::Literal, PatternType::Prefixed) => false,
            // A literal `*` allow speaks of every name: only a deny of
            // every prefix (the empty one) covers it.
            (PatternType::Prefixed, PatternType::Literal) if allow.name == "*" => {
                deny.name.is_empty()
            }
            // A prefixed allow of `*` is names starting with the
            // character `*`, no wildcard.
            (PatternType::Prefixed, _) => allow.name.starts_with(&deny.name),
        }
    };
    acls.clone().into_iter().any(|allow| {
        speaks_about(allow)
            && allow.permission == Permission::Allow
            && !acls.clone().into_iter().any(|deny| {
                speaks_about(deny) && deny.permission == Permission::Deny && covers(deny, allow)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_credentials_debug_shows_no_salt_or_hash() {
        let c = UserCredential {
            mechanism: "PBKDF2-HMAC-SHA256".into(),
            iterations: 4096,
            salt: vec![0xab; 16],
            hash: vec![0xcd; 32],
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("4096"), "{shown}");
        assert!(!shown.contains("171") && !shown.contains("205"), "{shown}");
    }

    #[test]
    fn any_resource_of_a_type() {
        use Operation::*;
        use PatternType::*;
        use Permission::*;
        use ResourceType::*;
        let any = |acls: &[Acl], who| authorize_any(acls, who, Topic, Write);
        let orders = acl("alice", Topic, "orders", Literal, Write, Allow);
        assert!(!any(&[], "alice"));
        assert!(any(std::slice::from_ref(&orders), "alice"));
        assert!(!any(std::slice::from_ref(&orders), "bob"));
        let read = acl("alice", Topic, "orders", Literal, Read, Allow);
        assert!(!any(std::slice::from_ref(&read), "alice"));
        for deny in [
            acl("alice", Topic, "orders", Literal, Write, Deny),
            acl("*", Topic, "*", Literal, Write, Deny),
            acl("alice", Topic, "ord", Prefixed, Write, Deny),
        ] {
            assert!(!any(&[orders.clone(), deny.clone()], "alice"), "{deny:?}");
        }
        // A deny of one name leaves a prefix allowed.
        let logs = acl("*", Topic, "logs-", Prefixed, Write, Allow);
        let secret = acl("alice", Topic, "logs-secret", Literal, Write, Deny);
        assert!(any(&[logs, secret], "alice"));
        // A deny of every prefix covers an allow of every name, and a
        // prefixed allow of names starting with `*`.
        let every = acl("alice", Topic, "", Prefixed, Write, Deny);
        for allow in [
            acl("alice", Topic, "*", Literal, Write, Allow),
            acl("alice", Topic, "*", Prefixed, Write, Allow),
        ] {
            assert!(!any(&[allow.clone(), every.clone()], "alice"), "{allow:?}");
        }
        let star = acl("alice", Topic, "*", Prefixed, Write, Deny);
        assert!(!any(
            &[
                acl("alice", Topic, "*x", Prefixed, Write, Allow),
                star.clone()
            ],
            "alice"
        ));
        // A prefixed deny of `*` is no wildcard: a literal `*` allow
        // still allows other names.
        assert!(any(
            &[acl("alice", Topic, "*", Literal, Write, Allow), star],
            "alice"
        ));
    }

    fn acl(
        principal: &str,
        rt: ResourceType,
        name: &str,
        pattern: PatternType,
        op: Operation,
        perm: Permission,
    ) -> Acl {
        Acl {
            principal: principal.into(),
            resource_type: rt,
            name: name.into(),
            pattern,
            operation: op,
            permission: perm,
        }
    }

    #[test]
    fn nothing_is_allowed_without_an_acl() {
        assert!(!authorize(
            &[],
            "alice",
            ResourceType::Topic,
            "t",
            Operation::Read
        ));
    }

    #[test]
    fn literal_prefix_and_wildcards() {
        use Operation::*;
        use PatternType::*;
        use ResourceType::*;
        let acls = vec![
            acl("alice", Topic, "orders", Literal, Write, Permission::Allow),
            acl("alice", Topic, "logs-", Prefixed, Read, Permission::Allow),
            acl("*", Topic, "public", Literal, Read, Permission::Allow),
            acl("bob", Topic, "*", Literal, Read, Permission::Allow),
            acl("ops", Cluster, "", Literal, Alter, Permission::Allow),
        ];
        let ok = |p: &str, rt, n: &str, op| authorize(&acls, p, rt, n, op);
        assert!(ok("alice", Topic, "orders", Write));
        assert!(!ok("alice", Topic, "orders", Read));
        assert!(!ok("alice", Topic, "orders2", Write));
        assert!(ok("alice", Topic, "logs-app", Read));
        assert!(ok("alice", Topic, "logs-", Read));
        assert!(!ok("alice", Topic, "logs", Read));
        assert!(ok("carol", Topic, "public", Read));
        assert!(ok("bob", Topic, "anything", Read));
        assert!(!ok("bob", Group, "anything", Read));
        assert!(ok("ops", Cluster, "", Alter));
        // Write implies Describe; nothing implies Write.
        assert!(ok("alice", Topic, "orders", Describe));
        assert!(!ok("carol", Topic, "orders", Describe));
    }

    #[test]
    fn deny_beats_allow_and_blocks_implied_describe() {
        use Operation::*;
        use ResourceType::*;
        let acls = vec![
            acl(
                "*",
                Topic,
                "",
                PatternType::Prefixed,
                Read,
                Permission::Allow,
            ),
            acl(
                "mallory",
                Topic,
                "secret",
                PatternType::Literal,
                Read,
                Permission::Deny,
            ),
            acl(
                "mallory",
                Topic,
                "secret",
                PatternType::Literal,
                Describe,
                Permission::Deny,
            ),
        ];
        assert!(authorize(&acls, "alice", Topic, "secret", Read));
        assert!(!authorize(&acls, "mallory", Topic, "secret", Read));
        assert!(authorize(&acls, "mallory", Topic, "other", Read));
        assert!(!authorize(&acls, "mallory", Topic, "secret", Describe));
    }

    fn arb_acl() -> impl Strategy<Value = Acl> {
        (
            prop_oneof![Just("*"), Just("a"), Just("b")],
            prop_oneof![
                Just(ResourceType::Cluster),
                Just(ResourceType::Topic),
                Just(ResourceType::Group)
            ],
            prop_oneof![Just("*".to_string()), "[xy]{0,3}"],
            prop_oneof![Just(PatternType::Literal), Just(PatternType::Prefixed)],
            arb_operation(),
            prop_oneof![Just(Permission::Allow), Just(Permission::Deny)],
        )
            .prop_map(|(p, rt, name, pattern, op, perm)| Acl {
                principal: p.to_string(),
                resource_type: rt,
                name,
                pattern,
                operation: op,
                permission: perm,
            })
    }

    fn arb_request() -> impl Strategy<Value = (String, ResourceType, String, Operation)> {
        (
            prop_oneof![Just("a"), Just("b"), Just("c")],
            prop_oneof![
                Just(ResourceType::Cluster),
                Just(ResourceType::Topic),
                Just(ResourceType::Group)
            ],
            "[xy]{0,4}",
            arb_operation(),
        )
            .prop_map(|(p, rt, n, op)| (p.to_string(), rt, n, op))
    }

    fn arb_operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            Just(Operation::Read),
            Just(Operation::Write),
            Just(Operation::Create),
            Just(Operation::Delete),
            Just(Operation::Alter),
            Just(Operation::Describe),
        ]
    }

    /// The rules written out again, matching included, without the
    /// implementation's code: what `authorize` must answer.
    fn expected(acls: &[Acl], p: &str, rt: ResourceType, n: &str, op: Operation) -> bool {
        let matching = |a: &Acl, o: Operation| {
            a.resource_type == rt
                && a.operation == o
                && (a.principal == "*" || a.principal == p)
                && (rt == ResourceType::Cluster
                    || match a.pattern {
                        PatternType::Literal => a.name == "*" || a.name == n,
                        PatternType::Prefixed => n.starts_with(a.name.as_str()),
                    })
        };
        let has = |perm: Permission, o: Operation| {
            acls.iter().any(|a| a.permission == perm && matching(a, o))
        };
        let granted = |o: Operation| has(Permission::Allow, o) && !has(Permission::Deny, o);
        if has(Permission::Deny, op) {
            return false;
        }
        granted(op)
            || (op == Operation::Describe
                && [
                    Operation::Read,
                    Operation::Write,
                    Operation::Delete,
                    Operation::Alter,
                ]
                .into_iter()
                .any(granted))
    }

    proptest! {
        /// A matching deny always wins, whatever allows exist.
        #[test]
        fn deny_always_beats_allow(
            acls in proptest::collection::vec(arb_acl(), 0..12),
            (p, rt, n, op) in arb_request(),
        ) {
            let denied = acls.iter().any(|a| a.permission == Permission::Deny && a.matches(&p, rt, &n, op));
            if denied {
                prop_assert!(!authorize(&acls, &p, rt, &n, op));
            }
            // Adding a matching deny always refuses.
            let mut with_deny = acls.clone();
            with_deny.push(Acl { principal: p.clone(), resource_type: rt, name: n.clone(),
                pattern: PatternType::Literal, operation: op, permission: Permission::Deny });
            prop_assert!(!authorize(&with_deny, &p, rt, &n, op));
        }

        /// Allowed exactly when the rules written out independently say so
        /// (a matching allow, no matching deny; Describe also through an
        /// allowed Read, Write, Delete or Alter); order and repeats never matter.
        #[test]
        fn authorize_answers_what_the_rules_say_in_any_order(
            acls in proptest::collection::vec(arb_acl(), 0..12),
            (p, rt, n, op) in arb_request(),
        ) {
            let result = authorize(&acls, &p, rt, &n, op);
            prop_assert_eq!(result, expected(&acls, &p, rt, &n, op));
            let mut reversed = acls.clone();
            reversed.reverse();
            prop_assert_eq!(result, authorize(&reversed, &p, rt, &n, op));
            // Nor does an ACL given twice (two allows are one allow).
            let twice: Vec<Acl> = acls.iter().chain(&acls).cloned().collect();
            prop_assert_eq!(result, authorize(&twice, &p, rt, &n, op));
        }

        /// A prefixed ACL matches exactly the names that start with it; a
        /// literal one exactly its own name (or every name for `*`).
        #[test]
        fn prefix_and_literal_semantics(prefix in "[xy]{0,3}", name in "[xy]{0,4}") {
            let pre = acl("a", ResourceType::Topic, &prefix, PatternType::Prefixed, Operation::Read, Permission::Allow);
            prop_assert_eq!(authorize([&pre], "a", ResourceType::Topic, &name, Operation::Read), name.starts_with(&prefix));
            let lit = acl("a", ResourceType::Topic, &prefix, PatternType::Literal, Operation::Read, Permission::Allow);
            prop_assert_eq!(authorize([&lit], "a", ResourceType::Topic, &name, Operation::Read), name == prefix);
            // Never for another principal.
            prop_assert!(!authorize([&pre, &lit], "b", ResourceType::Topic, &name, Operation::Read));
        }
    }
}
