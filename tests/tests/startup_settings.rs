//! Startup settings through interceptor: forwarded or refused by name as the policy decides
//! (pins, forbidden names, identity changes), also in `options`/PGOPTIONS; and the message size
//! limit per policy, reported as 54000 with how to raise it.

use interceptor_tests::proxy::allow_all_policy;
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, IdentitySpec, Interceptor, InterceptorSetup, PgCluster, PgCommand,
};

/// alice under an allow-all policy with extra `[limits]` TOML appended.
fn proxy(pg: &PgCluster, limits: &str) -> Interceptor {
    let id = IdentitySpec::new(ALICE, ALICE_PASSWORD, &["dev"], Some("app_rw"));
    let policy = format!("{}\n{limits}\n", allow_all_policy(&id));
    Interceptor::start(
        InterceptorSetup::new(pg)
            .identity_spec(id)
            .policy_file("startup", &policy),
    )
    .unwrap()
}

fn psql(p: &Interceptor, pgoptions: &str, sql: &str) -> interceptor_tests::CmdOutput {
    PgCommand::psql(&p.params(ALICE))
        .env("PGOPTIONS", pgoptions)
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "VERBOSITY=verbose",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
        ])
        .stdin(sql)
        .run()
        .unwrap()
}

#[test]
fn settings_are_forwarded_or_refused_by_name() {
    let pg = PgCluster::start().unwrap();
    let p = proxy(
        &pg,
        "[limits.startup]\npin = { work_mem = \"8MB\" }\nforbid = [\"lock_timeout\"]",
    );
    // Harmless settings arrive; the pin applies even when the client does not ask.
    let out = psql(
        &p,
        "-c search_path=public -c statement_timeout=7s",
        "SELECT current_setting('search_path'), current_setting('statement_timeout'), current_setting('work_mem')",
    );
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "public|7s|8MB");

    // Each refusal is a FATAL naming the setting.
    for (opts, needle) in [
        ("-c role=postgres", "\"role\" is not allowed"),
        (
            "-c session_authorization=postgres",
            "\"session_authorization\" is not allowed",
        ),
        ("-c work_mem=1GB", "\"work_mem\" is pinned to \"8MB\""),
        ("-c lock_timeout=1s", "\"lock_timeout\" is forbidden"),
        ("-D /tmp", "startup option \"-D\" is not allowed"),
    ] {
        let out = psql(&p, opts, "SELECT 1");
        assert!(!out.success(), "{opts}: {out:?}");
        assert!(
            out.stderr.contains("FATAL") && out.stderr.contains(needle),
            "{opts}: {out:?}"
        );
    }
    // PostgreSQL's own verdict on an unknown setting reaches the client as PostgreSQL said it.
    let out = psql(&p, "-c no_such_setting=1", "SELECT 1");
    assert!(
        out.stderr.contains("unrecognized configuration parameter"),
        "{out:?}"
    );
}

#[test]
fn a_large_value_is_refused_with_54000_naming_the_limit() {
    let pg = PgCluster::start().unwrap();
    let p = proxy(&pg, "[limits]\nmax_message_bytes = 1048576");
    // A 2 MB row from the server.
    let out = psql(&p, "", "SELECT repeat('x', 2 * 1024 * 1024)");
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains("54000")
            && out.stderr.contains("exceeds the limit of 1048576 bytes")
            && out.stderr.contains("max_message_bytes"),
        "{out:?}"
    );
    // A 2 MB parameter (query text here) from the client: the same error, not a bare close.
    let big = format!("SELECT length('{}')", "y".repeat(2 * 1024 * 1024));
    let out = psql(&p, "", &big);
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains("54000") && out.stderr.contains("exceeds the limit of 1048576 bytes"),
        "{out:?}"
    );
    // Below the limit everything passes.
    let out = psql(&p, "", "SELECT length(repeat('x', 512 * 1024))");
    assert_eq!(out.stdout.trim(), "524288", "{out:?}");
}
