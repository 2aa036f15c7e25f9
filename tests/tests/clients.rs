//! Client compatibility: real drivers nobody here wrote (psycopg 3 and asyncpg from PyPI,
//! node-postgres from npm, libpq's psql, pg_dump/pg_restore), each running one workload against
//! PostgreSQL directly (as `app_rw`) and through interceptor (as `alice`, who logs in as
//! `app_rw` under an allow-all policy). The results must be the same, and the ones that say
//! something about transparency (startup settings, backend pid, notifications) are checked too.
//!
//! The drivers are installed once into `target/compat-clients/` (a Python venv, an npm dir).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use interceptor_tests::pg::{APP_RW, APP_RW_PASSWORD, SUPERUSER};
use interceptor_tests::{ALICE, ConnParams, PgCommand, Stack, StackOptions};
use serde_json::Value;

/// One install at a time (the tests of this file run in parallel).
static INSTALL: Mutex<()> = Mutex::new(());

fn clients_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("compat-clients")
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

fn run(cmd: &mut std::process::Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A venv with psycopg 3 and asyncpg; its python.
fn python() -> Result<PathBuf> {
    let _g = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let venv = clients_dir().join("venv");
    let py = venv.join("bin/python");
    let marker = venv.join(".installed");
    if !marker.exists() {
        std::fs::create_dir_all(clients_dir())?;
        run(std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv))?;
        run(std::process::Command::new(&py).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "psycopg[binary]>=3.1,<4",
            "asyncpg>=0.29,<1",
        ]))?;
        std::fs::write(&marker, "")?;
    }
    Ok(py)
}

/// An npm dir with node-postgres; the dir to run node in.
fn node_dir() -> Result<PathBuf> {
    let _g = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = clients_dir().join("node");
    let marker = dir.join(".installed");
    if !marker.exists() {
        std::fs::create_dir_all(&dir)?;
        run(std::process::Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg("pg@8"))?;
        std::fs::write(&marker, "")?;
    }
    Ok(dir)
}

struct Pair {
    stack: Stack,
}

impl Pair {
    fn start() -> Pair {
        let stack = Stack::start(StackOptions::standard()).unwrap();
        assert!(
            !stack.is_direct(),
            "this suite compares both paths itself; run it without INTERCEPTOR_E2E_DIRECT"
        );
        Pair { stack }
    }
    fn direct(&self) -> ConnParams {
        self.stack.pg.tcp_params(APP_RW, Some(APP_RW_PASSWORD))
    }
    fn proxied(&self) -> ConnParams {
        self.stack.params(ALICE)
    }
    /// Runs `program args` against both; returns (direct, proxied) stdout as JSON.
    fn both_json(&self, program: &Path, args: &[&str], cwd: Option<&Path>) -> (Value, Value) {
        let go = |p: &ConnParams| -> Value {
            let mut cmd = PgCommand::new(&program.to_string_lossy(), p)
                .args(args.iter().copied())
                .timeout(Duration::from_secs(90));
            if let Some(d) = cwd {
                cmd = cmd
                    .current_dir(d)
                    .env("NODE_PATH", &d.join("node_modules").to_string_lossy());
            }
            let out = cmd.run().unwrap();
            assert!(
                out.success(),
                "{program:?} {args:?} via {}:{}: {out:?}\n{}",
                p.host,
                p.port,
                self.stack.logs()
            );
            serde_json::from_str(out.stdout.trim())
                .unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
        };
        (go(&self.direct()), go(&self.proxied()))
    }
}

/// What every workload must show through interceptor, beyond matching PostgreSQL.
fn assert_transparent(v: &Value, app: &str) {
    assert_eq!(
        v["settings"],
        serde_json::json!(["43210ms", "public", app, APP_RW]),
        "startup settings reach PostgreSQL: {v}"
    );
    assert_eq!(
        v["pid_in_pg_stat_activity"]
            .to_string()
            .trim_matches(|c| c == '[' || c == ']' || c == '"'),
        "1",
        "{v}"
    );
    assert_eq!(
        v["notify"][2],
        Value::Bool(true),
        "notifications carry the pid the client was told: {v}"
    );
    assert_eq!(v["error"][0], "22012", "{v}");
}

#[test]
fn psycopg3_sees_the_same_as_directly() {
    let py = python().unwrap();
    let p = Pair::start();
    let script = scripts().join("psycopg_suite.py");
    let (direct, proxied) = p.both_json(&py, &[&script.to_string_lossy()], None);
    assert_eq!(direct, proxied);
    assert_transparent(&proxied, "compat-psycopg");
    assert_eq!(proxied["big_param"], serde_json::json!([2 * 1024 * 1024]));
}

#[test]
fn asyncpg_sees_the_same_as_directly() {
    let py = python().unwrap();
    let p = Pair::start();
    let script = scripts().join("asyncpg_suite.py");
    let (direct, proxied) = p.both_json(&py, &[&script.to_string_lossy()], None);
    assert_eq!(direct, proxied);
    assert_transparent(&proxied, "compat-asyncpg");
    assert_eq!(proxied["prepared"], serde_json::json!([1, 2, 3, 4, 5]));
}

#[test]
fn node_postgres_sees_the_same_as_directly() {
    let dir = node_dir().unwrap();
    let p = Pair::start();
    let script = scripts().join("node_pg_suite.js");
    let (direct, proxied) =
        p.both_json(Path::new("node"), &[&script.to_string_lossy()], Some(&dir));
    assert_eq!(direct, proxied);
    assert_transparent(&proxied, "compat-node-pg");
}

#[test]
fn psql_with_pgoptions_sees_the_same_as_directly() {
    let p = Pair::start();
    let sql = "SELECT current_setting('statement_timeout'), current_setting('search_path'), current_user;\n\
               \\echo :SERVER_VERSION_NAME\n\
               CREATE TEMP TABLE t AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 500) g;\n\
               \\copy t TO STDOUT\n\
               SELECT count(*), sum(id) FROM t;\n\
               SELECT 1/0;\n\
               SELECT pid = pg_backend_pid() FROM pg_stat_activity WHERE pid = pg_backend_pid();\n";
    let go = |params: &ConnParams| {
        let out = PgCommand::psql(params)
            .env(
                "PGOPTIONS",
                "-c statement_timeout=43210 -c search_path=public",
            )
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-f", "-"])
            .stdin(sql)
            .run()
            .unwrap();
        assert!(out.success(), "{out:?}");
        (out.stdout, out.stderr)
    };
    let direct = go(&p.direct());
    let proxied = go(&p.proxied());
    assert_eq!(direct, proxied);
    assert!(
        proxied.0.starts_with("43210ms|public|app_rw\n"),
        "{proxied:?}"
    );
    assert!(proxied.1.contains("division by zero"), "{proxied:?}");
}

#[test]
#[ignore = "the classifier cannot parse pg_dump's catalog queries (OPERATOR(pg_catalog.=)); \
            run with --ignored once it can"]
fn pg_dump_and_pg_restore_round_trip() {
    let p = Pair::start();
    let bin = interceptor_tests::os::pg_bin_dir();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let dump = |params: &ConnParams, args: &[&str]| {
        let out = PgCommand::new(&bin.join("pg_dump").to_string_lossy(), params)
            .args(args.iter().copied())
            .arg("--table=accounts")
            .timeout(Duration::from_secs(60))
            .run()
            .unwrap();
        assert!(out.success(), "{out:?}");
        out.stdout
    };
    let direct = dump(&p.direct(), &[]);
    let proxied = dump(&p.proxied(), &[]);
    assert_eq!(direct, proxied, "plain dumps differ");
    assert!(proxied.contains("COPY public.accounts"), "{proxied}");

    // A custom-format dump through interceptor restores into a fresh database.
    let archive = dir.path().join("app.dump");
    let archive_s = archive.to_string_lossy().into_owned();
    dump(&p.proxied(), &["--format=custom", "--file", &archive_s]);
    p.stack
        .pg
        .psql_db("postgres", "CREATE DATABASE restored")
        .unwrap();
    let su = p.stack.pg.superuser_params().dbname("restored");
    let out = PgCommand::new(&bin.join("pg_restore").to_string_lossy(), &su)
        .args([
            "--no-owner",
            "--no-privileges",
            "--dbname",
            "restored",
            &archive_s,
        ])
        .timeout(Duration::from_secs(60))
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    let restored = dump(&su, &["--no-owner", "--no-privileges"]);
    let original = dump(
        &p.stack.pg.superuser_params(),
        &["--no-owner", "--no-privileges"],
    );
    assert_eq!(
        restored, original,
        "the restored table differs from the original"
    );
    let _ = SUPERUSER;
}
