#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! Differential test: what the policy classifier believes about a query against what a real
//! PostgreSQL 15 does with it (statement count and command tags from the simple-query
//! protocol, table state after).
//!
//! A throwaway cluster is started as the `postgres` user on a unix socket in a temp dir. The
//! test talks the wire protocol directly (postgres-protocol) to see every CommandComplete tag.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use interceptor_sql::classify::{Classified, classify};
use interceptor_sql::lexer::LexSettings;
use interceptor_sql::statement::StatementKind;
use postgres_protocol::message::{backend, frontend};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A cluster that is stopped and removed on drop.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("interceptor-policy-diff")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap_or_else(|e| panic!("chown: {e}"));
        assert!(status.success(), "chown failed");
        let data = dir.path().join("data");
        run_as_postgres(&[
            &format!("{BIN}/initdb"),
            "-D",
            path_str(&data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -c fsync=off",
            path_str(dir.path())
        );
        run_as_postgres(&[
            &format!("{BIN}/pg_ctl"),
            "-D",
            path_str(&data),
            "-o",
            &opts,
            "-l",
            path_str(&dir.path().join("log")),
            "-w",
            "start",
        ]);
        Cluster { dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join(".s.PGSQL.5432")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{BIN}/pg_ctl"))
            .args(["-D", path_str(&data), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_else(|| panic!("non-UTF-8 path {p:?}"))
}

fn run_as_postgres(args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the server did with one simple query.
#[derive(Debug, Default)]
struct Outcome {
    tags: Vec<String>,
    error: Option<String>,
    rows: Vec<Vec<Option<String>>>,
}

/// A minimal simple-query client.
struct Conn {
    stream: UnixStream,
    buf: BytesMut,
}

impl Conn {
    fn connect(socket: &Path) -> Conn {
        let stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect: {e}"));
        let mut conn = Conn {
            stream,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        frontend::startup_message([("user", "postgres"), ("database", "postgres")], &mut out)
            .unwrap_or_else(|e| panic!("{e}"));
        conn.send(&out);
        let o = conn.until_ready();
        assert!(o.error.is_none(), "startup: {o:?}");
        conn
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write: {e}"));
    }

    fn next(&mut self) -> backend::Message {
        loop {
            if let Some(m) =
                backend::Message::parse(&mut self.buf).unwrap_or_else(|e| panic!("{e}"))
            {
                return m;
            }
            let mut chunk = [0u8; 8192];
            let n = self
                .stream
                .read(&mut chunk)
                .unwrap_or_else(|e| panic!("read: {e}"));
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn until_ready(&mut self) -> Outcome {
        let mut o = Outcome::default();
        loop {
            match self.next() {
                backend::Message::ReadyForQuery(_) => return o,
                backend::Message::CommandComplete(c) => o
                    .tags
                    .push(c.tag().unwrap_or_else(|e| panic!("{e}")).to_owned()),
                backend::Message::ErrorResponse(e) => {
                    let msg: Vec<String> = e
                        .fields()
                        .filter_map(|f| {
                            Ok((f.type_() == b'M')
                                .then(|| String::from_utf8_lossy(f.value_bytes()).into_owned()))
                        })
                        .collect()
                        .unwrap_or_default();
                    o.error = Some(msg.join(" "));
                }
                backend::Message::CopyInResponse(_) => {
                    let mut out = BytesMut::new();
                    frontend::copy_done(&mut out);
                    self.send(&out);
                }
                backend::Message::DataRow(row) => {
                    let buf = row.buffer();
                    let values: Vec<Option<String>> = row
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                        .collect()
                        .unwrap_or_default();
                    o.rows.push(values);
                }
                _ => {}
            }
        }
    }

    fn query(&mut self, sql: &str) -> Outcome {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).unwrap_or_else(|e| panic!("{e}"));
        self.send(&out);
        self.until_ready()
    }

    fn ok(&mut self, sql: &str) -> Outcome {
        let o = self.query(sql);
        assert!(o.error.is_none(), "{sql}: {o:?}");
        o
    }

    /// Everything a statement could have changed, as one string.
    fn state(&mut self) -> String {
        let o = self.ok("SELECT concat_ws(' | ', \
               (SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM public.t), \
               (SELECT last_value || '/' || is_called FROM public.s), \
               (SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class \
                  WHERE relnamespace = 'public'::regnamespace))");
        o.rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_default()
    }

    fn reset(&mut self, scs: bool) {
        self.ok(
            "DEALLOCATE ALL; DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public; \
             CREATE TABLE public.t (id int PRIMARY KEY, v text); \
             INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 3) g; \
             CREATE SEQUENCE public.s",
        );
        self.ok(&format!(
            "SET standard_conforming_strings = {}; SET escape_string_warning = off",
            if scs { "on" } else { "off" }
        ));
    }
}

/// Can a statement the classifier put in `kind` produce this command tag?
fn tag_fits(tag: &str, c: &Classified) -> bool {
    use StatementKind::*;
    let verb = tag.split_whitespace().next().unwrap_or("");
    let k = c.kind;
    match verb {
        "SELECT" => matches!(k, Read | Session | Write | Utility | Ddl),
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" => k == Write,
        "COPY" => matches!(k, CopyTo | CopyFrom | Write),
        "EXPLAIN" => matches!(k, Read | Write),
        "SET" | "RESET" | "DISCARD" | "DEALLOCATE" => matches!(k, Session | Transaction),
        "SHOW" => k == Read,
        "DECLARE" | "FETCH" | "MOVE" | "CLOSE" => matches!(k, Read | Write),
        "BEGIN" | "COMMIT" | "ROLLBACK" | "START" | "SAVEPOINT" | "RELEASE" => k == Transaction,
        "DO" => k == Procedural,
        "CREATE" | "ALTER" | "DROP" | "TRUNCATE" | "COMMENT" => matches!(k, Ddl | Dcl),
        "GRANT" | "REVOKE" => k == Dcl,
        "VACUUM" | "ANALYZE" | "CHECKPOINT" => k == Utility,
        "PREPARE" => true,
        _ => false,
    }
}

/// `EXECUTE p` takes the classification of an earlier `PREPARE p` in the same query (what
/// the proxy does through `SessionStatements`).
fn resolve_executes(statements: &mut [Classified]) {
    for i in 0..statements.len() {
        let Some(name) = statements[i].executes.clone() else {
            continue;
        };
        if let Some(p) = statements[..i]
            .iter()
            .find(|s| s.prepares.as_deref() == Some(&name))
        {
            let (kind, risks) = (p.kind, p.risks.clone());
            statements[i].kind = kind;
            statements[i].risks = risks;
        }
    }
}

/// Kinds that must leave the database unchanged.
fn harmless(c: &Classified) -> bool {
    use StatementKind::*;
    matches!(c.kind, Read | Session | Transaction | CopyTo) && c.risks.is_empty()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// The classifier must classify it; its beliefs are checked against the server.
    Classified,
    /// The classifier must refuse it (a known differential or server error).
    Refused,
}

const BOTH: &[bool] = &[true, false];
const SCS_ON: &[bool] = &[true];
const SCS_OFF: &[bool] = &[false];

#[rustfmt::skip]
fn corpus() -> Vec<(&'static str, &'static [bool], Expect)> {
    use Expect::*;
    vec![
        // Nested comments.
        ("SELECT 1 /* /* */ ; DELETE FROM t; */", BOTH, Classified),
        ("SELECT 1 /* /* */ */; DELETE FROM t WHERE id = 1", BOTH, Classified),
        ("SELECT 'x' /* '; DELETE FROM t; */", BOTH, Classified),
        ("SELECT 2 */* x */ 3", BOTH, Classified),
        // Line comments end at \n and at \r.
        ("SELECT 'a' -- ; DELETE FROM t\n; SELECT 2", BOTH, Classified),
        ("SELECT 1 --\\\n; DELETE FROM t WHERE id = 2", BOTH, Classified),
        ("SELECT 1 -- ; DELETE FROM t\r; DELETE FROM t WHERE id = 1", BOTH, Classified),
        // Backslashes under both standard_conforming_strings settings.
        (r"SELECT '\'; DELETE FROM t WHERE id = 1; --'", BOTH, Classified),
        (r"SELECT 'a\'' , 'b'; DELETE FROM t WHERE id = 3", SCS_OFF, Classified),
        (r"SELECT 'a\\'; DELETE FROM t WHERE id = 2", BOTH, Classified),
        ("SELECT * FROM t WHERE v = 'x''; DELETE FROM t; --'", BOTH, Classified),
        // E'' strings always escape.
        (r"SELECT E'\''; DELETE FROM t WHERE id = 2", BOTH, Classified),
        (r"SELECT E'\'; DELETE FROM t; --'", BOTH, Classified),
        (r"SELECT e'\\'; DELETE FROM t WHERE id = 1", BOTH, Classified),
        // U&'' strings (an error with scs off, on both sides).
        (r"SELECT U&'\0041'; DELETE FROM t WHERE id = 3", SCS_ON, Classified),
        (r"SELECT U&'d\0061t\+000061'", SCS_ON, Classified),
        // UESCAPE, read by PostgreSQL's own scanner.
        (r"SELECT U&'d!0061t!+000061' UESCAPE '!'", SCS_ON, Classified),
        (r"SELECT U&'\0041'; DELETE FROM t WHERE id = 3", SCS_OFF, Refused),
        // Dollar quotes, parameters and identifiers with `$`.
        ("SELECT $$ ; DELETE FROM t; $$", BOTH, Classified),
        ("SELECT $a$ $$ ; $a$; DELETE FROM t WHERE id = 1", BOTH, Classified),
        ("SELECT 1 AS a$b$; DELETE FROM t WHERE id = 1; SELECT $b$x$b$", BOTH, Classified),
        ("SELECT $x$ '; DELETE FROM t; ' $x$", BOTH, Classified),
        // String continuation across a newline keeps E mode, as PostgreSQL's scanner says.
        ("SELECT E'a'\n'\\'; DELETE FROM t; --'", BOTH, Classified),
        // Statement splitting.
        ("select 1; select 2;;; select 3", BOTH, Classified),
        ("SET standard_conforming_strings = off; SELECT '\\'; DELETE FROM t WHERE id = 1; --'", SCS_ON, Classified),
        ("BEGIN; DELETE FROM t WHERE id = 1; ROLLBACK", BOTH, Classified),
        // Data-modifying CTEs, EXPLAIN ANALYZE, DO, side-effect functions.
        ("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT count(*) FROM d", BOTH, Classified),
        ("WITH i AS (INSERT INTO t VALUES (9, 'x') RETURNING id) SELECT * FROM i", BOTH, Classified),
        ("EXPLAIN ANALYZE DELETE FROM t WHERE id = 2", BOTH, Classified),
        ("EXPLAIN (ANALYZE, COSTS OFF) UPDATE t SET v = 'y' WHERE id = 1", BOTH, Classified),
        ("EXPLAIN DELETE FROM t", BOTH, Classified),
        ("DO $$BEGIN DELETE FROM t WHERE id = 3; END$$", BOTH, Classified),
        ("DO $$BEGIN EXECUTE 'DELETE FROM t'; END$$", BOTH, Classified),
        ("SELECT nextval('s')", BOTH, Classified),
        ("SELECT setval('s', 42)", BOTH, Classified),
        ("SELECT id FROM t WHERE id = (SELECT nextval('s'))", BOTH, Classified),
        ("SELECT set_config('application_name', 'x', false)", BOTH, Classified),
        ("SELECT pg_catalog.lower('A'), coalesce(null, 1), now()", BOTH, Classified),
        // Spellings a text-matching classifier did not know.
        ("EXPLAIN (ANALYSE) DELETE FROM t WHERE id = 1", BOTH, Classified),
        ("EXPLAIN (ANALYZE 'on') UPDATE t SET v = 'q' WHERE id = 2", BOTH, Classified),
        ("EXPLAIN (\"analyze\" 1) DELETE FROM t WHERE id = 3", BOTH, Classified),
        ("EXPLAIN (ANALYZE yes) DELETE FROM t WHERE id = 3", BOTH, Refused),
        ("TABLE t; SELECT * FROM ONLY t FOR NO KEY UPDATE", BOTH, Classified),
        ("BEGIN; DECLARE c SCROLL CURSOR FOR SELECT * FROM t; FETCH c; FETCH -1 FROM c; MOVE ABSOLUTE 2 c; FETCH ALL c; COMMIT", BOTH, Classified),
        // Writes, DDL, COPY.
        ("TRUNCATE t", BOTH, Classified),
        ("DELETE FROM t", BOTH, Classified),
        ("UPDATE t SET v = 'z'", BOTH, Classified),
        ("CREATE TABLE u AS SELECT * FROM t", BOTH, Classified),
        ("SELECT * INTO u2 FROM t", BOTH, Classified),
        ("COPY t TO STDOUT", BOTH, Classified),
        ("COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)", BOTH, Classified),
        ("COPY t FROM STDIN", BOTH, Classified),
        ("PREPARE p AS DELETE FROM t WHERE id = 1; EXECUTE p", BOTH, Classified),
        ("SHOW standard_conforming_strings; RESET ALL; SET extra_float_digits = 3", BOTH, Classified),
        ("DISCARD ALL", BOTH, Classified),
        ("SET ROLE postgres; RESET ROLE; SELECT set_config('role', 'none', false)", BOTH, Classified),
        ("SELECT lo_unlink(lo_create(0))", BOTH, Classified),
    ]
}

#[test]
fn classifier_agrees_with_postgresql() {
    if !Path::new(BIN).join("initdb").exists() {
        eprintln!(
            "\n\n*** SKIPPING policy_differential: {BIN}/initdb not found (install postgresql-15) ***\n"
        );
        return;
    }
    let cluster = Cluster::start();
    let mut conn = Conn::connect(&cluster.socket());
    let mut checked = 0;
    for (sql, settings, expect) in corpus() {
        for &scs in settings {
            conn.reset(scs);
            let before = conn.state();
            let lex = LexSettings {
                standard_conforming_strings: scs,
            };
            let belief = classify(sql, lex);
            let outcome = conn.query(sql);
            let after = conn.state();
            let ctx =
                format!("scs={scs} sql={sql:?}\n  classifier: {belief:?}\n  server: {outcome:?}");
            match (expect, &belief) {
                (Expect::Refused, Ok(_)) => panic!("expected the classifier to refuse\n{ctx}"),
                (Expect::Refused, Err(_)) => {
                    checked += 1;
                    continue;
                }
                (Expect::Classified, Err(e)) => panic!("classifier refused ({e})\n{ctx}"),
                (Expect::Classified, Ok(_)) => {}
            }
            let Ok(mut statements) = belief else { continue };
            resolve_executes(&mut statements);
            assert!(
                outcome.error.is_none(),
                "server error on a corpus query\n{ctx}"
            );
            // 1. Same statements: one CommandComplete per statement the classifier saw.
            assert_eq!(
                statements.len(),
                outcome.tags.len(),
                "statement count differs\n{ctx}"
            );
            // 2. Each command tag fits the kind the classifier gave that statement.
            for (c, tag) in statements.iter().zip(&outcome.tags) {
                assert!(
                    tag_fits(tag, c),
                    "tag {tag:?} does not fit {:?}\n{ctx}",
                    c.kind
                );
            }
            // 3. What the classifier called harmless left the database as it was.
            if statements.iter().all(harmless) {
                assert_eq!(
                    before, after,
                    "a 'harmless' query changed the database\n{ctx}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 70, "only {checked} checks ran");
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Random quoting/comment soup around a hidden DELETE: whatever the classifier accepts must
/// match what the server did.
fn generated_query(rng: &mut Rng) -> String {
    const BODY: &[&str] = &[
        "\\'",
        "''",
        "\\",
        "\\\\",
        ";",
        " DELETE FROM t WHERE id = 3; ",
        "*/",
        "/*",
        "$$",
        "'",
        "--",
        "\n",
        "x",
        "\r",
        "$a$",
        " ",
        "E'",
        "\"",
    ];
    const OPEN_CLOSE: &[(&str, &str)] = &[
        ("'", "'"),
        ("E'", "'"),
        ("e'", "'"),
        ("U&'", "'"),
        ("$$", "$$"),
        ("$a$", "$a$"),
        ("/*", "*/"),
        ("--", "\n"),
        ("\"", "\""),
        ("B'", "'"),
    ];
    let mut sql = String::from("SELECT 1");
    for _ in 0..(1 + rng.next() % 3) {
        let (open, close) = OPEN_CLOSE[(rng.next() % OPEN_CLOSE.len() as u64) as usize];
        sql.push(' ');
        if open == "'" || open.ends_with('\'') && !open.starts_with('B') {
            sql.push_str(", ");
        }
        sql.push_str(open);
        for _ in 0..(rng.next() % 4) {
            sql.push_str(rng.pick(BODY));
        }
        sql.push_str(close);
    }
    sql.push_str(rng.pick(&[
        "; DELETE FROM t WHERE id = 1",
        " ; DELETE FROM t WHERE id = 2; --'",
        "",
        "'; DELETE FROM t WHERE id = 1; --",
        "*/; DELETE FROM t WHERE id = 2",
    ]));
    sql
}

#[test]
fn generated_queries_agree_with_postgresql() {
    if !Path::new(BIN).join("initdb").exists() {
        eprintln!(
            "\n\n*** SKIPPING policy_differential: {BIN}/initdb not found (install postgresql-15) ***\n"
        );
        return;
    }
    let cluster = Cluster::start();
    let mut conn = Conn::connect(&cluster.socket());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut accepted, mut refused, mut server_errors, mut refused_but_ran) = (0, 0, 0, 0);
    for &scs in BOTH {
        conn.reset(scs);
        let mut before = conn.state();
        for _ in 0..250 {
            let sql = generated_query(&mut rng);
            let lex = LexSettings {
                standard_conforming_strings: scs,
            };
            let belief = classify(&sql, lex);
            let outcome = conn.query(&sql);
            let after = conn.state();
            let ctx =
                format!("scs={scs} sql={sql:?}\n  classifier: {belief:?}\n  server: {outcome:?}");
            match belief {
                Err(e) => {
                    refused += 1;
                    if outcome.error.is_none() {
                        refused_but_ran += 1;
                        if std::env::var_os("POLICY_DIFF_VERBOSE").is_some() {
                            eprintln!("refused but ran: {e}\n{ctx}");
                        }
                    }
                }
                Ok(statements) => {
                    accepted += 1;
                    if outcome.error.is_some() {
                        // The implicit transaction rolled everything back.
                        server_errors += 1;
                        assert_eq!(before, after, "failed query changed the database\n{ctx}");
                    } else {
                        assert_eq!(statements.len(), outcome.tags.len(), "count differs\n{ctx}");
                        for (c, tag) in statements.iter().zip(&outcome.tags) {
                            assert!(tag_fits(tag, c), "tag {tag:?} vs {:?}\n{ctx}", c.kind);
                        }
                        if statements.iter().all(harmless) {
                            assert_eq!(before, after, "'harmless' query changed data\n{ctx}");
                        }
                    }
                }
            }
            if before != after {
                conn.reset(scs);
                before = conn.state();
            }
        }
    }
    eprintln!(
        "generated: {accepted} accepted ({server_errors} server errors), {refused} refused \
         ({refused_but_ran} of which the server ran)"
    );
    // PostgreSQL's own parser classifies: nothing the server runs is refused.
    assert_eq!(refused_but_ran, 0, "over-blocked generated queries");
    // The generator must exercise both sides, or the test proves nothing (most of its soup is
    // a syntax error that the server rejects too).
    assert!(
        accepted >= 80,
        "only {accepted} generated queries were accepted"
    );
    assert!(
        refused >= 20,
        "only {refused} generated queries were refused"
    );
}
