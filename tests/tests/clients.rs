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
use interceptor_tests::pg::{APP_RW, APP_RW_PASSWORD};
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

/// A temp dir every cluster user can write (pg_dump and psql run as this user, the cluster as
/// `postgres`).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    dir
}

/// Bytes no text encoding would pass through unchanged, several lo_write chunks long.
fn binary_payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x2545_f491;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The OID psql printed for `\lo_import` ("lo_import 16412").
fn imported_oid(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("lo_import "))
        .unwrap_or_else(|| panic!("no lo_import line in {stdout:?}"))
        .trim()
        .to_owned()
}

#[test]
fn large_objects_through_psql_match_directly() {
    // libpq's large-object API is the fast path (FunctionCall): lo_creat, lo_open, lowrite,
    // loread, lo_close, lo_unlink, each called by OID.
    let p = Pair::start();
    let dir = open_tempdir();
    let input = dir.path().join("in.bin");
    let payload = binary_payload(300 * 1024 + 17);
    std::fs::write(&input, &payload).unwrap();
    let go = |params: &ConnParams, tag: &str| {
        let out = PgCommand::psql(params)
            .args(["-A", "-t", "-c"])
            .arg(format!("\\lo_import '{}'", input.display()))
            .run()
            .unwrap();
        assert!(out.success(), "{tag}: {out:?}");
        let oid = imported_oid(&out.stdout);
        let output = dir.path().join(format!("out-{tag}.bin"));
        let out = PgCommand::psql(params)
            .args(["-A", "-t", "-c"])
            .arg(format!("\\lo_export {oid} '{}'", output.display()))
            .args(["-c", &format!("SELECT length(lo_get({oid}))")])
            .args(["-c", &format!("\\lo_unlink {oid}")])
            .run()
            .unwrap();
        assert!(out.success(), "{tag}: {out:?}");
        let exported = std::fs::read(&output).unwrap();
        assert!(exported == payload, "{tag}: the exported object differs");
        (out.stdout.replace(&oid, "<oid>"), out.stderr)
    };
    let direct = go(&p.direct(), "direct");
    let proxied = go(&p.proxied(), "proxied");
    assert_eq!(direct, proxied);
    assert!(
        proxied.0.contains(&format!("{}\n", payload.len())),
        "{proxied:?}"
    );

    // Audited as the SQL each call stands for, the arguments as parameters.
    let records = p.stack.proxy.as_ref().unwrap().audit_records().unwrap();
    let calls: Vec<&Value> = records
        .iter()
        .map(|r| r.get("event").unwrap_or(r))
        .filter(|e| e["type"] == "statement" && e["protocol"] == "function_call")
        .collect();
    let sqls: Vec<&str> = calls.iter().filter_map(|e| e["sql"].as_str()).collect();
    for f in [
        "lo_creat",
        "lo_open",
        "lowrite",
        "loread",
        "lo_close",
        "lo_unlink",
    ] {
        assert!(
            sqls.iter()
                .any(|s| s.starts_with(&format!("SELECT \"pg_catalog\".\"{f}\"("))),
            "no audited call of {f}: {sqls:?}"
        );
    }
    assert!(calls.iter().all(|e| e["decision"] == "allow"), "{calls:?}");
}

#[test]
fn large_objects_are_refused_where_policy_does_not_allow_them() {
    let pg = interceptor_tests::PgCluster::start().unwrap();
    let policy = format!(
        "[policy]\nname = \"no-large-objects\"\n\n[identities]\nsubjects = [\"{ALICE}\"]\n\n\
         [login]\nupstream_role = \"{APP_RW}\"\ndatabases = [\"*\"]\n\n\
         [[rule]]\nname = \"plain sql\"\ndecision = \"allow\"\nkinds = [\"any\"]\n"
    );
    let proxy = interceptor_tests::Interceptor::start(
        interceptor_tests::InterceptorSetup::new(&pg)
            .identity(
                ALICE,
                interceptor_tests::ALICE_PASSWORD,
                &["dev"],
                Some(APP_RW),
            )
            .policy_file("no-large-objects", &policy),
    )
    .unwrap();
    let dir = open_tempdir();
    let input = dir.path().join("in.bin");
    std::fs::write(&input, binary_payload(1000)).unwrap();
    let out = PgCommand::psql(&proxy.params(ALICE))
        .args(["-c"])
        .arg(format!("\\lo_import '{}'", input.display()))
        .run()
        .unwrap();
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("large_object"), "{out:?}");
    // Nothing was created.
    let n = pg
        .psql_db(
            interceptor_tests::pg::APP_DB,
            "SELECT count(*) FROM pg_largeobject_metadata",
        )
        .unwrap();
    assert_eq!(n.trim(), "0", "{n}");
    // The session is still usable, and the same call as SQL is refused the same way.
    let out = PgCommand::psql(&proxy.params(ALICE))
        .args(["-A", "-t", "-c", "SELECT 1"])
        .args(["-c", "SELECT lo_creat(-1)"])
        .run()
        .unwrap();
    assert!(out.stdout.starts_with("1\n"), "{out:?}");
    assert!(out.stderr.contains("large_object"), "{out:?}");
    let records = proxy.audit_records().unwrap();
    let refused = records
        .iter()
        .map(|r| r.get("event").unwrap_or(r))
        .find(|e| e["type"] == "statement" && e["protocol"] == "function_call")
        .unwrap_or_else(|| panic!("no function_call record: {records:?}"));
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert_eq!(
        refused["sql"], "SELECT \"pg_catalog\".\"lo_creat\"($1)",
        "{refused}"
    );
}

/// A plain dump without its `\\restrict` / `\\unrestrict` key lines (pg_dump makes a random key
/// for each dump, so two dumps of the same data differ only there).
fn without_restrict_key(dump: &str) -> String {
    dump.lines()
        .map(|l| {
            if l.starts_with("\\restrict ") || l.starts_with("\\unrestrict ") {
                l.split(' ').next().unwrap_or(l)
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn pg_dump_and_pg_restore_round_trip() {
    // A database with a table and a large object: pg_dump reads the object and pg_restore
    // writes it back through libpq's large-object API (fast-path calls).
    let p = Pair::start();
    let bin = interceptor_tests::os::pg_bin_dir();
    let dir = open_tempdir();
    let payload: String = binary_payload(40 * 1024)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    PgCommand::psql(&p.direct())
        .args(["-c"])
        .arg(format!("SELECT lo_from_bytea(0, '\\x{payload}'::bytea)"))
        .run()
        .unwrap()
        .ok()
        .unwrap();
    let dump = |params: &ConnParams, args: &[&str]| {
        let out = PgCommand::new(&bin.join("pg_dump").to_string_lossy(), params)
            .args(args.iter().copied())
            .args(["--table=accounts", "--blobs"])
            .timeout(Duration::from_secs(60))
            .run()
            .unwrap();
        assert!(out.success(), "{out:?}\n{}", p.stack.logs());
        without_restrict_key(&out.stdout)
    };
    let direct = dump(&p.direct(), &[]);
    let proxied = dump(&p.proxied(), &[]);
    assert_eq!(direct, proxied, "plain dumps differ");
    assert!(proxied.contains("COPY public.accounts"), "{proxied}");
    assert!(proxied.contains("lo_create"), "{proxied}");
    assert!(
        proxied.contains(&payload[..64]),
        "the large object's data is missing"
    );

    // Custom-format dumps, each restored the same way it was made (directly, or through
    // interceptor) into a fresh database.
    let restore = |params: &ConnParams, tag: &str| {
        let archive = dir.path().join(format!("{tag}.dump"));
        let archive_s = archive.to_string_lossy().into_owned();
        dump(params, &["--format=custom", "--file", &archive_s]);
        let db = format!("restored_{tag}");
        p.stack
            .pg
            .psql_db("postgres", &format!("CREATE DATABASE {db} OWNER {APP_RW}"))
            .unwrap();
        let out = PgCommand::new(
            &bin.join("pg_restore").to_string_lossy(),
            &params.clone().dbname(&db),
        )
        .args(["--no-owner", "--no-privileges", "--dbname", &db, &archive_s])
        .timeout(Duration::from_secs(60))
        .run()
        .unwrap();
        assert!(out.success(), "{tag}: {out:?}\n{}", p.stack.logs());
        let su = p.stack.pg.superuser_params().dbname(&db);
        let out = PgCommand::new(&bin.join("pg_dump").to_string_lossy(), &su)
            .args(["--no-owner", "--no-privileges", "--blobs"])
            .timeout(Duration::from_secs(60))
            .run()
            .unwrap();
        assert!(out.success(), "{out:?}");
        without_restrict_key(&out.stdout)
    };
    let restored_direct = restore(&p.direct(), "direct");
    let restored_proxied = restore(&p.proxied(), "proxied");
    assert_eq!(
        restored_direct, restored_proxied,
        "what was restored through interceptor differs from what was restored directly"
    );
    assert!(
        restored_proxied.contains(&payload[..64]),
        "{restored_proxied}"
    );
    assert!(
        restored_proxied.contains("COPY public.accounts"),
        "{restored_proxied}"
    );
}
