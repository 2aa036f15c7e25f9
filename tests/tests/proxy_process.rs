//! The interceptor process as the harness drives it: traffic really goes through the proxy
//! (upstream role mapping), unix listener, upstream over TCP, kill -9 and restart, logs.

use interceptor_tests::pg::{APP_RO, APP_RW};
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, BOB, BOB_PASSWORD, Interceptor, InterceptorSetup, PgCluster,
};

fn setup(pg: &PgCluster) -> InterceptorSetup {
    InterceptorSetup::new(pg)
        .allow_all_policies()
        .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RW))
        .identity(BOB, BOB_PASSWORD, &["analyst"], Some(APP_RO))
}

async fn whoami(params: &interceptor_tests::ConnParams) -> (String, Option<String>) {
    let c = params.connect().await.unwrap();
    let row = c
        .query_one("SELECT current_user::text, inet_client_addr()::text", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn identities_map_to_upstream_roles_over_unix_socket() {
    let pg = PgCluster::start().unwrap();
    let proxy = Interceptor::start(setup(&pg)).unwrap();
    // PostgreSQL sees the upstream role, connected over its unix socket (no client address).
    assert_eq!(
        whoami(&proxy.params(ALICE)).await,
        (APP_RW.to_owned(), None)
    );
    assert_eq!(whoami(&proxy.params(BOB)).await, (APP_RO.to_owned(), None));
    // The proxy's own unix listener.
    let unix = proxy.unix_params(ALICE).unwrap();
    assert_eq!(whoami(&unix).await.0, APP_RW);
    // The identity's password is not the role's password: the role password does not log in.
    let err = proxy
        .params(APP_RW)
        .password(pg.password(APP_RW))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );
    assert!(!proxy.logs().is_empty());
}

#[tokio::test]
async fn upstream_over_tcp() {
    let pg = PgCluster::start().unwrap();
    let proxy = Interceptor::start(setup(&pg).upstream_tcp()).unwrap();
    let (user, addr) = whoami(&proxy.params(BOB)).await;
    assert_eq!(user, APP_RO);
    assert_eq!(addr.as_deref(), Some("127.0.0.1/32"));
}

#[tokio::test]
async fn kill9_and_restart_on_the_same_port() {
    let pg = PgCluster::start().unwrap();
    let mut proxy = Interceptor::start(setup(&pg)).unwrap();
    let port = proxy.port();
    let c = proxy.params(ALICE).connect().await.unwrap();
    c.query_one("SELECT 1", &[]).await.unwrap();
    proxy.kill9();
    assert!(!proxy.is_running());
    // The client's connection is gone with the process.
    assert!(c.query_one("SELECT 1", &[]).await.is_err());
    assert!(proxy.params(ALICE).connect().await.is_err());

    proxy.restart().unwrap();
    assert_eq!(proxy.port(), port);
    assert_eq!(whoami(&proxy.params(ALICE)).await.0, APP_RW);
    assert!(!proxy.logs().contains("panicked"));
}

#[test]
fn generated_config_is_accepted_by_check_config() {
    let pg = PgCluster::start_with(interceptor_tests::PgOptions::default().accounts_fixture(false))
        .unwrap();
    let proxy = Interceptor::start(
        setup(&pg)
            .extra_toml("[limits]\nmax_message_bytes = 1048576")
            .policy_file("analyst", include_str!("../../policies/analyst.toml"))
            .role_password("analyst_ro", "analyst-ro-pass"),
    )
    .unwrap();
    let policy = proxy.policy_dir().unwrap().join("analyst.toml");
    assert!(policy.is_file());
    let bin = interceptor_tests::proxy::interceptor_bin().unwrap();
    let out = std::process::Command::new(bin)
        .args(["check-config", "--config"])
        .arg(proxy.config_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The secrets file is private, and holds no identity passwords.
    use std::os::unix::fs::PermissionsExt;
    let secrets = proxy.dir().join("secrets.toml");
    let mode = std::fs::metadata(&secrets).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0);
    let config = std::fs::read_to_string(proxy.config_path()).unwrap();
    assert!(!config.contains(ALICE_PASSWORD));
    assert!(config.contains("SCRAM-SHA-256$4096:"));

    // A policy whose upstream role has no secret fails the check, naming policy and role.
    let text = std::fs::read_to_string(&secrets).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("analyst_ro"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&secrets, without).unwrap();
    let out = std::process::Command::new(interceptor_tests::proxy::interceptor_bin().unwrap())
        .args(["check-config", "--config"])
        .arg(proxy.config_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("policy \"analyst\"") && stderr.contains("\"analyst_ro\""),
        "{stderr}"
    );
}
