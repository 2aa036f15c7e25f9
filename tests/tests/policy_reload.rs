//! Policy hot reload under a live session: an edit takes effect on the open connection without
//! dropping it, and a broken file keeps the previous policy.

use std::time::{Duration, Instant};

use interceptor_tests::{ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster};

fn policy(decision: &str) -> String {
    format!(
        r#"
[policy]
name = "reload"
[identities]
subjects = ["alice"]
[login]
upstream_role = "app_ro"
databases = ["*"]
[[rule]]
name = "reads"
decision = "{decision}"
kinds = ["read"]
"#
    )
}

/// Runs `SELECT 1` until its outcome (Ok / the SQLSTATE) is `want`, or fails after 10 s.
async fn until(client: &tokio_postgres::Client, want: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = match client.simple_query("SELECT 1").await {
            Ok(_) => None,
            Err(e) => Some(
                e.code()
                    .map(|c| c.code().to_owned())
                    .unwrap_or_else(|| panic!("the session broke: {e}")),
            ),
        };
        if got.as_deref() == want {
            return;
        }
        assert!(Instant::now() < deadline, "still {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn edits_apply_to_live_sessions_and_a_broken_file_keeps_the_old_policy() {
    let pg = PgCluster::start().unwrap();
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(ALICE, ALICE_PASSWORD, &[], None)
            .policy_file("reload", &policy("allow")),
    )
    .unwrap();
    let file = proxy.policy_dir().unwrap().join("reload.toml");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = proxy.params(ALICE).connect().await.unwrap();
        until(&client, None).await;
        std::fs::write(&file, policy("deny")).unwrap();
        until(&client, Some("42501")).await;
        // A broken edit is refused and logged; the last good policy (deny) stays in force.
        std::fs::write(&file, "[policy\nname = ").unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        until(&client, Some("42501")).await;
        std::fs::write(&file, policy("allow")).unwrap();
        until(&client, None).await;
    });
    let logs = proxy.logs();
    assert!(logs.contains("policy reload failed"), "{logs}");
}
