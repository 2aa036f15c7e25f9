//! Decisions, loading errors, reload, and the example policies in `policies/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cli::{self, PolicyCommand};
use super::reload::{PolicyEvent, PolicyHandle};
use super::rules::Verdict;
use super::session::SessionStatements;
use super::set::PolicySet;
use super::testcases;
use crate::identity::{Identity, Proof};
use interceptor_sql::lexer::LexSettings;

fn who(subject: &str, groups: &[&str]) -> Identity {
    Identity {
        subject: subject.to_owned(),
        display_name: subject.to_owned(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        proof: Proof::ScramSha256,
        process: None,
    }
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap_or_else(|e| panic!("{e}"));
    }
    dir
}

fn load(dir: &Path) -> PolicySet {
    PolicySet::load_dir(dir).unwrap_or_else(|e| panic!("{e}"))
}

const BASIC: &str = r#"
[policy]
name = "basic"
[identities]
groups = ["devs"]
[login]
upstream_role = "dev_role"
databases = ["app"]
[limits]
max_rows = 10
[[rule]]
name = "deny-drop"
decision = "deny"
risks = ["drop"]
message = "no drops"
[[rule]]
name = "approve-writes"
decision = "approve"
kinds = ["write"]
approvers = ["leads"]
approvals = 2
timeout_secs = 60
[[rule]]
name = "reads"
decision = "allow"
kinds = ["read", "session", "transaction"]
[mask]
table = "public.t"
"#;

const ON: LexSettings = LexSettings {
    standard_conforming_strings: true,
};

#[test]
fn route_and_limits() {
    let d = dir_with(&[("basic.toml", BASIC)]);
    let set = load(d.path());
    let r = set
        .route(&who("alice", &["devs"]), "app")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.upstream_role, "dev_role");
    assert_eq!(r.limits.max_rows, Some(10));
    assert_eq!(r.mask.len(), 1);
    assert_eq!(set.mask_rules_for(&who("alice", &["devs"]), "app").len(), 1);
    let refused = set.route(&who("alice", &["devs"]), "other");
    assert_eq!(
        refused.map_err(|r| r.sqlstate).err().as_deref(),
        Some("28000")
    );
    assert!(set.route(&who("mallory", &["ops"]), "app").is_err());
}

/// A repeated text without numbers is decided from the cache without lexing it; a text with
/// numbers is lexed for its cache key, and shares the classification of its shape.
#[test]
fn repeated_texts_are_decided_from_the_cache_with_as_little_lexing_as_possible() {
    let d = dir_with(&[("basic.toml", BASIC)]);
    let set = load(d.path());
    let alice = who("alice", &["devs"]);
    let lexes = |sql: &str| {
        let before = interceptor_sql::lexer::lexes();
        let verdict = set.decide(&alice, "app", sql, &ON).verdict;
        (interceptor_sql::lexer::lexes() - before, verdict)
    };
    let bound = "SELECT name FROM users WHERE id = $1";
    let (first, verdict) = lexes(bound);
    assert!(first >= 1, "a new text is lexed");
    assert_eq!(verdict, Verdict::Allow);
    assert_eq!(lexes(bound), (0, Verdict::Allow), "a repeat is not lexed");
    // The other standard_conforming_strings setting is a cache of its own.
    let before = interceptor_sql::lexer::lexes();
    let off = LexSettings {
        standard_conforming_strings: false,
    };
    set.decide(&alice, "app", bound, &off);
    assert!(interceptor_sql::lexer::lexes() > before);
    // With numbers: lexed once for the key, then found by its shape.
    let (first, _) = lexes("SELECT name FROM users WHERE id = 1");
    assert!(first >= 2, "key and classification: {first}");
    assert_eq!(
        lexes("SELECT name FROM users WHERE id = 2"),
        (1, Verdict::Allow)
    );
    // A text equal to another's key cannot exist (keys hold NUL), so a write is never found
    // as a read's entry: each is decided on its own.
    let (_, write) = lexes("DELETE FROM users WHERE id = $1");
    assert!(matches!(write, Verdict::Approve { .. }), "{write:?}");
    assert_eq!(lexes(bound), (0, Verdict::Allow));
}

#[test]
fn decisions() {
    let d = dir_with(&[("basic.toml", BASIC)]);
    let set = load(d.path());
    let alice = who("alice", &["devs"]);
    let dec = set.decide(&alice, "app", "SELECT 1", &ON);
    assert_eq!(
        (dec.verdict, dec.rule.as_deref()),
        (Verdict::Allow, Some("reads"))
    );

    let dec = set.decide(&alice, "app", "SELECT 1; DROP TABLE t", &ON);
    match &dec.verdict {
        Verdict::Deny { sqlstate, message } => {
            assert_eq!(sqlstate, "42501");
            assert!(
                message.contains("deny-drop") && message.contains("no drops"),
                "{message}"
            );
        }
        v => panic!("{v:?}"),
    }
    assert_eq!(dec.statements.len(), 2);

    let dec = set.decide(
        &alice,
        "app",
        "UPDATE t SET a = 1 WHERE id = 1; SELECT 1",
        &ON,
    );
    assert_eq!(
        dec.verdict,
        Verdict::Approve {
            rule: "approve-writes".into(),
            approver_groups: vec!["leads".into()],
            approvals_required: 2,
            timeout_secs: 60
        }
    );

    // Default deny names the kind and the policy.
    let dec = set.decide(&alice, "app", "CREATE TABLE x (a int)", &ON);
    assert!(dec.rule.is_none());
    assert!(
        matches!(&dec.verdict, Verdict::Deny { message, .. } if message.contains("default is deny"))
    );

    // Unparseable: 42601.
    let dec = set.decide(&alice, "app", "SELEC 1", &ON);
    assert!(matches!(&dec.verdict, Verdict::Deny { sqlstate, .. } if sqlstate == "42601"));

    // Nobody's policy: deny.
    let dec = set.decide(&who("mallory", &[]), "app", "SELECT 1", &ON);
    assert!(matches!(dec.verdict, Verdict::Deny { .. }));
}

#[test]
fn execute_is_decided_by_what_was_prepared() {
    let d = dir_with(&[("basic.toml", BASIC)]);
    let set = load(d.path());
    let alice = who("alice", &["devs"]);
    let mut session = SessionStatements::new();
    // Unknown prepared statement: refused.
    let dec = set.decide_in_session(&alice, "app", "EXECUTE p(1)", &ON, &session);
    assert!(matches!(&dec.verdict, Verdict::Deny { sqlstate, .. } if sqlstate == "26000"));

    let prep = set.decide_in_session(
        &alice,
        "app",
        "PREPARE p(int) AS UPDATE t SET a = $1 WHERE id = 1",
        &ON,
        &session,
    );
    assert!(matches!(prep.verdict, Verdict::Approve { .. }));
    session.observe(&prep.statements);
    let dec = set.decide_in_session(&alice, "app", "EXECUTE p(1)", &ON, &session);
    assert!(matches!(dec.verdict, Verdict::Approve { .. }), "{dec:?}");

    let prep = set.decide_in_session(&alice, "app", "PREPARE q AS SELECT 1", &ON, &session);
    session.observe(&prep.statements);
    let dec = set.decide_in_session(&alice, "app", "EXECUTE q", &ON, &session);
    assert_eq!(dec.verdict, Verdict::Allow);

    // Same query: PREPARE then EXECUTE.
    let dec = set.decide(&alice, "app", "PREPARE r AS DROP TABLE t; EXECUTE r", &ON);
    assert!(matches!(dec.verdict, Verdict::Deny { .. }));

    let dealloc = set.decide_in_session(&alice, "app", "DEALLOCATE q", &ON, &session);
    session.observe(&dealloc.statements);
    assert!(session.get("q").is_none() && session.get("p").is_some());
    let discard = set.decide_in_session(&alice, "app", "DISCARD ALL", &ON, &session);
    session.observe(&discard.statements);
    assert!(session.is_empty());
}

#[test]
fn kernel_attributes_must_match() {
    let policy = r#"
[policy]
name = "k"
[identities]
subjects = ["svc-*"]
[identities.process]
uids = [990]
cgroups = ["/system.slice/etl*.service"]
[login]
upstream_role = "r"
databases = ["*"]
[[rule]]
name = "all"
decision = "allow"
"#;
    let d = dir_with(&[("k.toml", policy)]);
    let set = load(d.path());
    let mut id = who("svc-etl", &[]);
    assert!(set.route(&id, "db").is_err(), "no attested process");
    id.process = Some(crate::identity::ProcessIdentity {
        pid: 1,
        uid: 990,
        gid: 990,
        comm: "etl".into(),
        exe: Some("/opt/etl".into()),
        cgroup_id: 7,
        cgroup_path: Some("/system.slice/etl-nightly.service".into()),
    });
    assert!(set.route(&id, "db").is_ok());
    if let Some(p) = id.process.as_mut() {
        p.uid = 0;
    }
    assert!(set.route(&id, "db").is_err(), "wrong uid");
}

fn load_err(text: &str) -> String {
    let d = dir_with(&[("p.toml", text)]);
    match PolicySet::load_dir(d.path()) {
        Ok(_) => panic!("loaded: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loading_errors_have_line_and_column() {
    let bad_risk = BASIC.replace("risks = [\"drop\"]", "risks = [\"dorp\"]");
    let e = load_err(&bad_risk);
    assert!(e.contains("p.toml:14:"), "{e}");
    assert!(e.contains("dorp"), "{e}");

    let e = load_err(&BASIC.replace("max_rows = 10", "max_rows = 10\nmax_rowz = 1"));
    assert!(e.contains("p.toml:11:1"), "{e}");

    let e = load_err(&BASIC.replace(
        "[[rule]]\nname = \"reads\"",
        "[[rule]]\nname = \"reads\"\nwindow = \"nope\"",
    ));
    assert!(e.contains(":") && e.contains("nope"), "{e}");

    let e = load_err(&BASIC.replace("name = \"reads\"", "name = \"deny-drop\""));
    assert!(e.contains("duplicate rule name"), "{e}");
    assert!(e.contains("p.toml:24:8"), "{e}");

    let e = load_err(&BASIC.replace("approvers = [\"leads\"]\n", ""));
    assert!(e.contains("needs `approvers`"), "{e}");

    let e = load_err("[policy\nname = 1");
    assert!(e.contains("p.toml:1:"), "{e}");

    let e = load_err(&format!("{BASIC}\n[unparseable]\ndecision = \"allow\"\n"));
    assert!(e.contains("never allowed"), "{e}");
}

#[test]
fn tests_toml_files_are_not_policies() {
    let d = dir_with(&[
        ("basic.toml", BASIC),
        (
            "basic.tests.toml",
            "[[case]]\nidentity = \"alice\"\ngroups = [\"devs\"]\ndatabase = \"app\"\nsql = \"SELECT 1\"\nexpect = \"allow\"\n",
        ),
    ]);
    let set = load(d.path());
    assert_eq!(set.policies().len(), 1);
    let results = testcases::run_dir(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(results.len(), 1);
    assert!(results[0].failure.is_none(), "{results:?}");
}

#[test]
fn failing_policy_test_is_reported() {
    let d = dir_with(&[
        ("basic.toml", BASIC),
        (
            "basic.tests.toml",
            "[[case]]\nidentity = \"alice\"\ngroups = [\"devs\"]\ndatabase = \"app\"\nsql = \"DROP TABLE t\"\nexpect = \"allow\"\n",
        ),
    ]);
    let mut out = Vec::new();
    let ok = cli::run(
        &PolicyCommand::Test {
            dir: d.path().to_owned(),
        },
        &mut out,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out);
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL") && text.contains("basic.tests.toml:1:1"),
        "{text}"
    );
}

#[test]
fn lint_finds_dead_and_shadowed_rules() {
    let extra = r#"
[[rule]]
name = "reads-again"
decision = "allow"
kinds = ["read"]
[[rule]]
name = "impossible"
decision = "deny"
kinds = ["read"]
risks = ["drop"]
"#;
    let d = dir_with(&[(
        "basic.toml",
        &format!(
            "{}{extra}",
            BASIC.replace("[mask]\ntable = \"public.t\"\n", "")
        ),
    )]);
    let report = cli::check_dir(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let msgs: Vec<String> = report
        .warnings
        .iter()
        .map(|w| format!("{}: {}", w.location, w.message))
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("reads-again") && m.contains("shadowed by rule \"reads\"")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("impossible") && m.contains("can never match")),
        "{msgs:?}"
    );
    assert!(
        !msgs.iter().any(|m| m.contains("\"approve-writes\"")),
        "{msgs:?}"
    );
}

#[test]
fn explain_prints_decision_rule_and_classification() {
    let d = dir_with(&[("basic.toml", BASIC)]);
    let mut out = Vec::new();
    let cmd = PolicyCommand::Explain {
        dir: d.path().to_owned(),
        identity: "alice".into(),
        groups: vec!["devs".into()],
        database: "app".into(),
        sql: "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x".into(),
        no_standard_conforming_strings: false,
        uid: None,
        exe: None,
        cgroup: None,
    };
    assert!(cli::run(&cmd, &mut out).unwrap_or_else(|e| panic!("{e}")));
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("decision: approve"), "{text}");
    assert!(text.contains("rule: approve-writes"), "{text}");
    assert!(
        text.contains("\"kind\":\"write\"") && text.contains("delete_without_where"),
        "{text}"
    );
}

/// CI runs the example policies' own tests.
#[test]
fn example_policies_pass_their_tests() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let report = cli::check_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(report.policies, 4);
    let results = testcases::run_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let failures: Vec<_> = results.iter().filter(|r| r.failure.is_some()).collect();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(results.len() >= 30, "{}", results.len());
}

#[tokio::test]
async fn hot_reload_swaps_and_keeps_old_on_error() {
    let d = dir_with(&[("basic.toml", BASIC)]);
    let handle = PolicyHandle::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let v1 = handle.current().version();
    let mut events = handle.spawn_watcher(d.path().to_owned());

    // A broken file: the old policy stays, an error event names file:line:col.
    std::fs::write(
        d.path().join("basic.toml"),
        BASIC.replace("decision = \"deny\"", "decision = \"nope\""),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    match ev {
        Ok(Ok(PolicyEvent::ReloadFailed { version, error })) => {
            assert_eq!(version, v1);
            assert!(
                error.contains("basic.toml:") && error.contains("nope"),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(handle.current().version(), v1);

    // A fixed file with a new rule: swapped in.
    std::fs::write(
        d.path().join("basic.toml"),
        BASIC.replace("\"read\", \"session\"", "\"read\", \"ddl\", \"session\""),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    match ev {
        Ok(Ok(PolicyEvent::Reloaded { version, policies })) => {
            assert!(version > v1);
            assert_eq!(policies, vec!["basic".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    let set = handle.current();
    assert!(set.version() > v1);
    let dec = set.decide(
        &who("alice", &["devs"]),
        "app",
        "CREATE TABLE x (a int)",
        &ON,
    );
    assert_eq!(dec.verdict, Verdict::Allow);
}

#[test]
fn check_reports_every_broken_file_with_position() {
    let d = dir_with(&[
        ("a.toml", BASIC),
        (
            "b.toml",
            "[policy]\nname = \"b\"\n[identities]\ngroups = [\"x\"]\n[login]\nupstream_role = \"r\"\ndatabases = [\"*\"]\n[[rule]]\nname = \"r1\"\ndecision = \"alow\"\n",
        ),
        (
            "c.toml",
            "[policy]\nname = \"c\"\n[identities]\ngroups = [\"x\"]\n[login]\nupstream_role = \"r\"\ndatabases = [\"*\"]\n[windows.w]\nfrom = \"8:00\"\nto = \"18:00\"\n",
        ),
    ]);
    let mut out = Vec::new();
    let ok = cli::run(
        &PolicyCommand::Check {
            dir: d.path().to_owned(),
        },
        &mut out,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out);
    assert!(!ok, "{text}");
    assert!(text.contains("b.toml:10:12"), "{text}");
    assert!(text.contains("c.toml:9:8"), "{text}");
    assert!(text.contains("2 errors"), "{text}");
}

#[tokio::test]
async fn reload_picks_up_a_new_file() {
    let d = dir_with(&[("basic.toml", BASIC)]);
    let handle = PolicyHandle::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let mut events = handle.spawn_watcher(d.path().to_owned());
    let ops = BASIC
        .replace("name = \"basic\"", "name = \"ops\"")
        .replace("groups = [\"devs\"]", "groups = [\"ops\"]");
    std::fs::write(d.path().join("ops.toml"), ops).unwrap_or_else(|e| panic!("{e}"));
    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert!(
        matches!(ev, Ok(Ok(PolicyEvent::Reloaded { ref policies, .. })) if policies.len() == 2),
        "{ev:?}"
    );
    assert!(
        handle
            .current()
            .route(&who("olga", &["ops"]), "app")
            .is_ok()
    );
}

/// psql's catalog queries and drivers' housekeeping must pass a read-only policy.
#[test]
fn read_only_example_policies_allow_psql_and_drivers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let set = load(&dir);
    let corpus = include_str!("../../../interceptor-sql/src/testdata/psql15_catalog_queries.sql");
    let mut queries: Vec<&str> = corpus
        .split("\n----\n")
        .map(str::trim)
        .filter(|q| !q.is_empty() && !q.starts_with("--"))
        .collect();
    queries.extend([
        "SET extra_float_digits = 3",
        "SET application_name = 'PostgreSQL JDBC Driver'",
        "SET DateStyle = 'ISO'; SET TIME ZONE 'UTC'",
        "SHOW transaction_isolation",
        "SHOW ALL",
        "BEGIN; SELECT 1; COMMIT",
        "BEGIN READ ONLY",
        "ROLLBACK",
        "DISCARD ALL",
        "RESET ALL",
        "DEALLOCATE ALL",
        "SELECT version()",
        "SELECT current_schema(), current_database(), session_user",
        "SELECT typname, oid FROM pg_type WHERE typname = 'hstore'",
        "SELECT t.oid, typarray FROM pg_type t JOIN pg_namespace ns ON typnamespace = ns.oid WHERE typname = 'hstore'",
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
        "select count(*) from pgbench_branches",
    ]);
    assert!(queries.len() > 30);
    for (subject, group) in [("agent-7", "ai-agents"), ("ana", "analysts")] {
        let id = who(subject, &[group]);
        let database = "app";
        for q in &queries {
            let d = set.decide(&id, database, q, &ON);
            assert_eq!(d.verdict, Verdict::Allow, "{subject}: {q}\n{d:?}");
        }
    }
}
