//! The harness itself against a real PostgreSQL (no proxy): clusters, roles, fixtures,
//! pg_hba methods, logs, TLS files and teardown.

use std::time::Duration;

use interceptor_tests::fixtures::{self, ACCOUNT_ROWS};
use interceptor_tests::pg::{APP_DB, APP_RO, APP_RO_PASSWORD, APP_RW, APP_RW_PASSWORD};
use interceptor_tests::{HbaAuth, PgCluster, PgCommand, PgOptions, SslMode, TestCerts};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn cluster_roles_and_fixture() {
    let pg = PgCluster::start().unwrap();
    assert!(
        pg.socket_dir()
            .join(format!(".s.PGSQL.{}", pg.port()))
            .exists()
    );

    // The fixture as the superuser sees it.
    let out = pg
        .psql("SELECT count(*), count(DISTINCT email) FROM accounts")
        .unwrap();
    assert_eq!(out.trim(), format!("{ACCOUNT_ROWS}|{ACCOUNT_ROWS}"));

    // app_ro: reads, cannot write.
    let ro = pg.connect(APP_RO, APP_RO_PASSWORD, APP_DB).await.unwrap();
    let rows = ro
        .query(
            "SELECT id, name, email, card_number, balance::text FROM accounts ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let expected = fixtures::accounts();
    assert_eq!(rows.len(), expected.len());
    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(row.get::<_, i32>(0), want.id);
        assert_eq!(row.get::<_, &str>(1), want.name);
        assert_eq!(row.get::<_, &str>(2), want.email);
        assert_eq!(row.get::<_, &str>(3), want.card_number);
        assert_eq!(row.get::<_, &str>(4), want.balance_text());
        assert!(fixtures::luhn_valid(row.get::<_, &str>(3)));
    }
    let err = ro
        .execute("DELETE FROM accounts WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    let err = ro
        .execute("CREATE TABLE t_ro (x int)", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // app_rw: DML yes, DDL in public no, not a superuser.
    let rw = pg.connect(APP_RW, APP_RW_PASSWORD, APP_DB).await.unwrap();
    let n = rw
        .execute(
            "INSERT INTO accounts (name, email, card_number, balance) \
             VALUES ('New Person', 'new.person@example.com', '4111111111111111', 1.5)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let super_: bool = rw
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!super_);
    let err = rw
        .execute("CREATE TABLE t_rw (x int)", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // Wrong password is refused with 28P01: SCRAM is really enforced.
    let err = pg.connect(APP_RO, "wrong", APP_DB).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    let method = pg
        .psql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app_ro'")
        .unwrap();
    assert_eq!(method.trim(), "t");
}

#[tokio::test]
async fn tcp_and_logging_options() {
    let pg = PgCluster::start_with(
        PgOptions::default()
            .log_statement_all(true)
            .log_connections(true),
    )
    .unwrap();
    let client = pg
        .tcp_params(APP_RO, Some(APP_RO_PASSWORD))
        .connect()
        .await
        .unwrap();
    let v: i32 = client
        .query_one("SELECT 40 + 2 AS harness_marker", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
    drop(client);
    let log = pg.server_log();
    assert!(log.contains("harness_marker"), "{log}");
    assert!(log.contains("connection authorized: user=app_ro"), "{log}");
}

#[tokio::test]
async fn md5_trust_and_no_tcp() {
    let md5 = PgCluster::start_with(PgOptions::default().auth(HbaAuth::Md5).tcp(false)).unwrap();
    let out = md5
        .psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'app_rw'")
        .unwrap();
    assert_eq!(out.trim(), "md5");
    md5.connect(APP_RW, APP_RW_PASSWORD, APP_DB).await.unwrap();
    let err = md5.connect(APP_RW, "nope", APP_DB).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    // TCP off: nothing listens on the port.
    assert!(std::net::TcpStream::connect(("127.0.0.1", md5.port())).is_err());

    let trust = PgCluster::start_with(PgOptions::default().auth(HbaAuth::Trust)).unwrap();
    trust
        .socket_params(APP_RO, None)
        .connect()
        .await
        .expect("trust needs no password");
}

#[test]
fn pgbench_init_and_teardown() {
    let pg = PgCluster::start_with(PgOptions::default().accounts_fixture(false)).unwrap();
    pg.pgbench_init(1).unwrap();
    assert_eq!(
        pg.psql("SELECT count(*) FROM pgbench_accounts")
            .unwrap()
            .trim(),
        "100000"
    );
    let out = PgCommand::pgbench(&pg.socket_params(APP_RW, Some(APP_RW_PASSWORD)))
        .args(["-n", "-t", "20", "-c", "2", "-M", "prepared"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM pgbench_history")
            .unwrap()
            .trim(),
        "40"
    );

    let dir = pg.socket_dir().to_path_buf();
    let pid_file = pg.data_dir().join("postmaster.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    drop(pg);
    assert!(!dir.exists(), "cluster dir must be removed on drop");
    // The postmaster is gone (a zombie waiting for init to reap it counts as gone).
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                let state = s.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z')
            })
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!running(), "postmaster {pid} outlived the cluster");
}

#[test]
fn teardown_on_panic() {
    let dir = std::sync::Arc::new(std::sync::Mutex::new(None));
    let d2 = dir.clone();
    let res = std::panic::catch_unwind(move || {
        let pg = PgCluster::start_with(PgOptions::default().accounts_fixture(false)).unwrap();
        *d2.lock().unwrap() = Some(pg.socket_dir().to_path_buf());
        panic!("test failure inside a test");
    });
    assert!(res.is_err());
    let dir = dir.lock().unwrap().clone().unwrap();
    assert!(!dir.exists(), "cluster dir left behind after a panic");
}

#[test]
fn stop_and_restart() {
    let pg = PgCluster::start_with(PgOptions::default().accounts_fixture(false)).unwrap();
    pg.stop().unwrap();
    assert!(pg.psql("SELECT 1").is_err());
    pg.restart().unwrap();
    assert_eq!(pg.psql("SELECT 1").unwrap().trim(), "1");
}

#[test]
fn server_tls_with_test_ca() {
    let certs = TestCerts::generate().unwrap();
    let pg = PgCluster::start_with(
        PgOptions::default()
            .accounts_fixture(false)
            .ssl(&certs.server.cert, &certs.server.key)
            .ssl_only(true),
    )
    .unwrap();
    let params = pg
        .tcp_params(APP_RO, Some(APP_RO_PASSWORD))
        .host("localhost")
        .sslmode(SslMode::VerifyFull)
        .sslrootcert(&certs.ca_cert);
    let out = PgCommand::psql(&params)
        .args(["-c", "\\conninfo"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("SSL connection"), "{out:?}");

    // Another CA: verification must fail.
    let other = TestCerts::generate().unwrap();
    let out = PgCommand::psql(&params.clone().sslrootcert(&other.ca_cert))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(!out.success());
    assert!(out.stderr.contains("certificate verify failed"), "{out:?}");

    // hostssl only: plaintext gets a FATAL.
    let out = PgCommand::psql(&params.clone().sslmode(SslMode::Disable))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(!out.success());
    assert!(out.stderr.contains("FATAL"), "{out:?}");

    // A client certificate chains to the CA (checked with openssl's view through PostgreSQL
    // is out of scope here; just check the files are well-formed PEM).
    let client = certs.client("alice").unwrap();
    let pem = std::fs::read_to_string(&client.cert).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
}

#[test]
fn orphaned_cluster_is_reaped() {
    let pg = PgCluster::start_with(PgOptions::default().accounts_fixture(false)).unwrap();
    let dir = pg.socket_dir().to_path_buf();
    // Pretend the owner died without running destructors: a pid that has exited.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    std::fs::write(
        dir.join(interceptor_tests::reaper::OWNER_FILE),
        dead_pid.to_string(),
    )
    .unwrap();
    std::mem::forget(pg);
    interceptor_tests::reaper::reap_orphans();
    assert!(!dir.exists(), "orphaned cluster dir still there");
    let still_running = std::process::Command::new("pgrep")
        .args(["-f", &format!("postgres -D {}", dir.display())])
        .output()
        .unwrap();
    assert!(
        !still_running.status.success(),
        "orphaned postmaster still running"
    );
}
