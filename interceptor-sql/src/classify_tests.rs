//! Classification corpus: tricky statements and what they must classify as.

use super::classify::{Classified, Unclassifiable, classify};
use super::lexer::LexSettings;
use super::statement::{Risk, StatementKind};

const ON: LexSettings = LexSettings {
    standard_conforming_strings: true,
};
const OFF: LexSettings = LexSettings {
    standard_conforming_strings: false,
};

fn one(sql: &str) -> Classified {
    match classify(sql, ON) {
        Ok(mut v) if v.len() == 1 => v.remove(0),
        other => panic!("{sql}: expected one statement, got {other:?}"),
    }
}

fn kinds(sql: &str, lex: LexSettings) -> Vec<StatementKind> {
    match classify(sql, lex) {
        Ok(v) => v.into_iter().map(|c| c.kind).collect(),
        Err(e) => panic!("{sql}: {e}"),
    }
}

fn has(sql: &str, risk: Risk) -> bool {
    one(sql).risks.contains(&risk)
}

#[test]
fn plain_reads() {
    for sql in [
        "SELECT 1",
        "select * from orders where id = 1",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SHOW search_path",
        "SHOW ALL",
        "EXPLAIN SELECT * FROM orders",
        "EXPLAIN DELETE FROM orders",
        "VALUES (1), (2)",
        "SELECT count(*), lower(name), coalesce(a, b), now() FROM t GROUP BY 2, 3",
        "SELECT random() FROM t",
        "SELECT currval('s')",
    ] {
        let c = one(sql);
        assert_eq!(c.kind, StatementKind::Read, "{sql}: {c:?}");
        assert!(c.risks.is_empty(), "{sql}: {c:?}");
    }
}

#[test]
fn psql_catalog_queries_are_reads() {
    let corpus = include_str!("testdata/psql15_catalog_queries.sql");
    let mut n = 0;
    for sql in corpus.split("\n----\n").map(str::trim) {
        if sql.is_empty() || sql.starts_with("--") {
            continue;
        }
        n += 1;
        let all = classify(sql, ON).unwrap_or_else(|e| panic!("{e}: {sql}"));
        for c in all {
            assert_eq!(c.kind, StatementKind::Read, "{sql}: {c:?}");
            assert!(c.risks.is_empty(), "{sql}: {c:?}");
            assert!(
                c.functions.iter().all(|f| f.starts_with("pg_catalog.")),
                "{sql}: {c:?}"
            );
        }
    }
    assert!(n >= 15, "corpus too small: {n}");
}

#[test]
fn driver_session_statements() {
    for (sql, kind) in [
        ("SET extra_float_digits = 3", StatementKind::Session),
        (
            "SET application_name = 'PostgreSQL JDBC Driver'",
            StatementKind::Session,
        ),
        ("SET datestyle TO ISO", StatementKind::Session),
        ("SET TIME ZONE 'UTC'", StatementKind::Session),
        ("RESET ALL", StatementKind::Session),
        ("DISCARD ALL", StatementKind::Session),
        ("DEALLOCATE ALL", StatementKind::Session),
        ("BEGIN", StatementKind::Transaction),
        (
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            StatementKind::Transaction,
        ),
        ("START TRANSACTION READ ONLY", StatementKind::Transaction),
        ("COMMIT", StatementKind::Transaction),
        ("END", StatementKind::Transaction),
        ("ROLLBACK", StatementKind::Transaction),
        ("SAVEPOINT a", StatementKind::Transaction),
        ("RELEASE SAVEPOINT a", StatementKind::Transaction),
        ("ROLLBACK TO SAVEPOINT a", StatementKind::Transaction),
        (
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            StatementKind::Transaction,
        ),
    ] {
        let c = one(sql);
        assert_eq!(c.kind, kind, "{sql}: {c:?}");
        assert!(c.risks.is_empty(), "{sql}: {c:?}");
    }
}

#[test]
fn pgbench_statements() {
    let script = "BEGIN;\
        UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 7;\
        SELECT abalance FROM pgbench_accounts WHERE aid = 7;\
        UPDATE pgbench_tellers SET tbalance = tbalance + 5 WHERE tid = 3;\
        UPDATE pgbench_branches SET bbalance = bbalance + 5 WHERE bid = 1;\
        INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 7, 5, CURRENT_TIMESTAMP);\
        END;";
    use StatementKind::*;
    assert_eq!(
        kinds(script, ON),
        vec![Transaction, Write, Read, Write, Write, Write, Transaction]
    );
    let c = one("select count(*) from pgbench_branches");
    assert_eq!(c.tables, vec!["public.pgbench_branches"]);
    assert_eq!(
        one("copy pgbench_accounts from stdin with (freeze on)").kind,
        CopyFrom
    );
    assert_eq!(one("vacuum analyze pgbench_branches").kind, Utility);
    assert!(has(
        "truncate table pgbench_accounts, pgbench_branches",
        Risk::Truncate
    ));
    assert!(has(
        "drop table if exists pgbench_accounts, pgbench_branches",
        Risk::Drop
    ));
}

#[test]
fn writes_and_risks() {
    assert!(has("DELETE FROM t", Risk::DeleteWithoutWhere));
    assert!(!has("DELETE FROM t WHERE id = 1", Risk::DeleteWithoutWhere));
    assert!(has("UPDATE t SET a = 1", Risk::UpdateWithoutWhere));
    assert!(!has(
        "UPDATE t SET a = 1 WHERE true",
        Risk::UpdateWithoutWhere
    ));
    assert_eq!(
        one("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE").kind,
        StatementKind::Write
    );
    assert_eq!(one("SELECT * FROM t FOR UPDATE").kind, StatementKind::Write);
    assert_eq!(one("SELECT * INTO newt FROM t").kind, StatementKind::Ddl);
    assert_eq!(one("LOCK TABLE t").kind, StatementKind::Write);
}

#[test]
fn data_modifying_cte_is_a_write() {
    let c = one("WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d");
    assert_eq!(c.kind, StatementKind::Write);
    assert!(c.risks.contains(&Risk::DeleteWithoutWhere));
    assert!(c.tables.contains(&"public.orders".to_owned()));
    let c = one("WITH i AS (INSERT INTO audit_log VALUES (1) RETURNING id) SELECT * FROM i");
    assert_eq!(c.kind, StatementKind::Write);
}

#[test]
fn explain_analyze_executes() {
    let c = one("EXPLAIN ANALYZE DELETE FROM orders");
    assert_eq!(c.kind, StatementKind::Write);
    assert!(c.risks.contains(&Risk::DeleteWithoutWhere));
    let c = one("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1 WHERE id = 2");
    assert_eq!(c.kind, StatementKind::Write);
    assert_eq!(
        one("EXPLAIN (ANALYZE TRUE) DELETE FROM t WHERE id = 1").kind,
        StatementKind::Write
    );
    assert_eq!(
        one("EXPLAIN (ANALYZE off) DELETE FROM t WHERE id = 1").kind,
        StatementKind::Read
    );
    // Without ANALYZE nothing runs.
    let c = one("EXPLAIN SELECT nextval('s')");
    assert_eq!(c.kind, StatementKind::Read);
    assert!(c.risks.is_empty());
}

#[test]
fn side_effect_functions() {
    for (sql, risk, kind) in [
        (
            "SELECT nextval('s')",
            Risk::SideEffectFunction,
            StatementKind::Write,
        ),
        (
            "SELECT pg_terminate_backend(123)",
            Risk::AdminFunction,
            StatementKind::Utility,
        ),
        (
            "SELECT pg_catalog.pg_reload_conf()",
            Risk::AdminFunction,
            StatementKind::Utility,
        ),
        (
            "SELECT pg_read_file('/etc/passwd')",
            Risk::ServerFile,
            StatementKind::Utility,
        ),
        (
            "SELECT * FROM pg_ls_dir('.')",
            Risk::ServerFile,
            StatementKind::Utility,
        ),
        (
            "SELECT lo_import('/etc/passwd')",
            Risk::ServerFile,
            StatementKind::Write,
        ),
        (
            "SELECT lo_export(1234, '/tmp/x')",
            Risk::LargeObject,
            StatementKind::Write,
        ),
        (
            "SELECT lo_unlink(1234)",
            Risk::LargeObject,
            StatementKind::Write,
        ),
        (
            "SELECT * FROM dblink('dbname=x', 'delete from t') AS r(a int)",
            Risk::Dblink,
            StatementKind::Write,
        ),
        (
            "SELECT dblink_exec('dbname=x', 'drop table t')",
            Risk::Dblink,
            StatementKind::Write,
        ),
        (
            "SELECT query_to_xml('select 1', true, true, '')",
            Risk::DynamicSql,
            StatementKind::Write,
        ),
        (
            "SELECT pg_advisory_lock(1)",
            Risk::SideEffectFunction,
            StatementKind::Write,
        ),
        (
            "SELECT id FROM t WHERE x = (SELECT setval('s', 1))",
            Risk::SideEffectFunction,
            StatementKind::Write,
        ),
    ] {
        let c = one(sql);
        assert!(c.risks.contains(&risk), "{sql}: {c:?}");
        assert_eq!(c.kind, kind, "{sql}: {c:?}");
    }
    // Table functions are functions, not tables.
    let c = one("SELECT * FROM generate_series(1, 3)");
    assert!(c.tables.is_empty(), "{c:?}");
    assert_eq!(c.functions, vec!["pg_catalog.generate_series"]);
    // Unknown functions are user functions.
    let c = one("SELECT my_func(1)");
    assert_eq!(c.functions, vec!["public.my_func"]);
    assert!(c.risks.contains(&Risk::UserFunction));
}

#[test]
fn session_identity_changes() {
    for (sql, risk) in [
        ("SET ROLE admin", Risk::SetRole),
        ("SET LOCAL ROLE admin", Risk::SetRole),
        ("SET role = 'admin'", Risk::SetRole),
        ("SET \"role\" TO admin", Risk::SetRole),
        ("RESET ROLE", Risk::SetRole),
        (
            "SET SESSION AUTHORIZATION admin",
            Risk::SessionAuthorization,
        ),
        ("RESET SESSION AUTHORIZATION", Risk::SessionAuthorization),
        ("SET search_path = evil, public", Risk::SearchPath),
        ("SELECT set_config('role', 'admin', false)", Risk::SetRole),
        ("SELECT set_config('ROLE', 'admin', false)", Risk::SetRole),
        ("SELECT set_config(E'role', 'admin', false)", Risk::SetRole),
        (
            "SELECT set_config($$session_authorization$$, 'admin', false)",
            Risk::SessionAuthorization,
        ),
        (
            "SELECT set_config(current_setting('x'), 'admin', false)",
            Risk::SetRole,
        ),
        (
            "SELECT pg_catalog.set_config('search_path', 'evil', false)",
            Risk::SearchPath,
        ),
    ] {
        assert!(has(sql, risk), "{sql}: {:?}", one(sql));
    }
    assert!(
        one("SELECT set_config('application_name', 'x', false)")
            .risks
            .is_empty()
    );
}

#[test]
fn copy_variants() {
    let c = one("COPY t TO STDOUT");
    assert_eq!(
        (c.kind, c.tables.clone()),
        (StatementKind::CopyTo, vec!["public.t".to_owned()])
    );
    assert_eq!(
        one("COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)").kind,
        StatementKind::CopyTo
    );
    assert_eq!(one("COPY t FROM STDIN").kind, StatementKind::CopyFrom);
    assert!(has("COPY t TO '/tmp/t.csv'", Risk::CopyFile));
    assert!(has("COPY t FROM '/etc/passwd'", Risk::CopyFile));
    assert!(has("COPY t TO PROGRAM 'rm -rf /'", Risk::CopyProgram));
    assert!(has("COPY t FROM PROGRAM 'curl evil'", Risk::CopyProgram));
    // COPY … WHERE runs expressions: their functions count.
    assert!(has(
        "COPY t FROM STDIN WITH (FREEZE ON) WHERE pg_read_file('x') > ''",
        Risk::ServerFile
    ));
    assert!(has(
        "COPY t TO PROGRAM 'gzip' WITH (FREEZE ON)",
        Risk::CopyProgram
    ));
    // A data-modifying query inside COPY is a write.
    assert_eq!(
        one("COPY (DELETE FROM t RETURNING *) TO STDOUT").kind,
        StatementKind::Write
    );
}

#[test]
fn ddl_dcl_and_keyword_fallbacks() {
    assert_eq!(one("CREATE TABLE x (a int)").kind, StatementKind::Ddl);
    assert_eq!(
        one("ALTER TABLE x ADD COLUMN b int").kind,
        StatementKind::Ddl
    );
    assert_eq!(one("CREATE INDEX ON x (a)").kind, StatementKind::Ddl);
    assert_eq!(one("GRANT SELECT ON t TO bob").kind, StatementKind::Dcl);
    assert!(has("ALTER ROLE bob SUPERUSER", Risk::AlterRole));
    assert!(has("DROP ROLE bob", Risk::AlterRole));
    assert!(has("ALTER SYSTEM SET work_mem = '1GB'", Risk::AlterSystem));
    let c = one("GRANT admin TO bob");
    assert_eq!(c.kind, StatementKind::Dcl);
    assert!(!c.names_known);
    let c = one("DO $$BEGIN EXECUTE 'DROP TABLE t'; END$$");
    assert_eq!(c.kind, StatementKind::Procedural);
    assert!(c.risks.contains(&Risk::AnonymousCode) && c.risks.contains(&Risk::DynamicSql));
    let c = one("DO LANGUAGE plpgsql $x$ BEGIN PERFORM 1; END $x$");
    assert!(c.risks.contains(&Risk::AnonymousCode) && !c.risks.contains(&Risk::DynamicSql));
    assert_eq!(
        one("VACUUM (ANALYZE, VERBOSE) t").kind,
        StatementKind::Utility
    );
    assert_eq!(
        one("REFRESH MATERIALIZED VIEW mv").kind,
        StatementKind::Write
    );
    assert_eq!(one("CHECKPOINT").kind, StatementKind::Utility);
    let c = one(
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'drop table t'; END$$",
    );
    assert_eq!(c.kind, StatementKind::Ddl);
    assert!(c.risks.contains(&Risk::DynamicSql), "{c:?}");
    let c = one("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'");
    assert!(c.risks.is_empty(), "{c:?}");
    assert!(has(
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'return 1'",
        Risk::DynamicSql
    ));
    assert!(has("LOAD 'evil.so'", Risk::ServerFile));
}

#[test]
fn prepare_classifies_inner_statement() {
    let c = one("PREPARE p(int) AS DELETE FROM t WHERE id = $1");
    assert_eq!(c.kind, StatementKind::Write);
    assert_eq!(c.prepares.as_deref(), Some("p"));
    let c = one("PREPARE q AS SELECT * FROM t");
    assert_eq!(c.kind, StatementKind::Read);
    let c = one("EXECUTE p(1)");
    assert_eq!(c.executes.as_deref(), Some("p"));
    assert_eq!(c.kind, StatementKind::Procedural);
    assert_eq!(one("DEALLOCATE p").deallocates.as_deref(), Some("p"));
    assert_eq!(one("DEALLOCATE ALL").deallocates.as_deref(), Some(""));
    assert_eq!(one("DISCARD ALL").deallocates.as_deref(), Some(""));
    // Cached plans only: PostgreSQL keeps the prepared statements.
    assert_eq!(one("DISCARD PLANS").deallocates, None);
}

#[test]
fn multi_statement_and_hiding_attempts() {
    use StatementKind::*;
    assert_eq!(
        kinds("SELECT 1; DELETE FROM t WHERE a = 1", ON),
        vec![Read, Write]
    );
    // Everything after a nested comment that does not close is not a statement to PostgreSQL…
    assert_eq!(
        kinds("SELECT 1 /* /* */ ; DROP TABLE t; */", ON),
        vec![Read]
    );
    // …and where PostgreSQL does see a statement, so do we.
    assert_eq!(
        kinds("SELECT 1 /* /* */ */; DROP TABLE t", ON),
        vec![Read, Ddl]
    );
    // Backslash in a plain string: one string with scs off, a string then DROP with scs on.
    let sql = r"SELECT '\'; DROP TABLE t; SELECT '";
    assert!(
        classify(sql, ON).is_err(),
        "unterminated trailing quote under scs=on"
    );
    assert_eq!(kinds(r"SELECT '\'; DROP TABLE t; --'", ON), vec![Read, Ddl]);
    assert_eq!(kinds(r"SELECT '\'; DROP TABLE t; --'", OFF), vec![Read]);
    assert_eq!(kinds(r"SELECT E'\''; DROP TABLE t", ON), vec![Read, Ddl]);
    assert_eq!(kinds(r"SELECT E'\'; DROP TABLE t; --'", ON), vec![Read]);
    assert_eq!(
        kinds(r"SELECT 'a\'' , 'b'; DROP TABLE t", OFF),
        vec![Read, Ddl]
    );
    assert_eq!(
        kinds("SELECT U&'\\0041'; DROP TABLE t", ON),
        vec![Read, Ddl]
    );
    assert_eq!(kinds("SELECT $$ ; DROP TABLE t; $$", ON), vec![Read]);
    assert_eq!(
        kinds("SELECT $a$ $$ ; $a$; DROP TABLE t", ON),
        vec![Read, Ddl]
    );
    // A continued E string keeps its escapes, as PostgreSQL's scanner says.
    assert_eq!(
        kinds("SELECT E'a'\n'\\'; DROP TABLE t; --'", ON),
        vec![Read]
    );
}

#[test]
fn unparseable_is_an_error() {
    assert_eq!(
        classify("SELEC 1", ON),
        Err(Unclassifiable::Syntax {
            message: "syntax error at or near \"SELEC\"".to_owned(),
            position: 1
        })
    );
    assert!(matches!(classify("", ON), Err(Unclassifiable::Empty)));
    assert!(matches!(
        classify(" ; -- nothing", ON),
        Err(Unclassifiable::Empty)
    ));
    assert!(matches!(
        classify("SELECT 'x", ON),
        Err(Unclassifiable::Syntax { .. })
    ));
    assert!(classify("SELECT 1; FROBNICATE", ON).is_err());
    assert_eq!(Unclassifiable::Empty.sqlstate(), "42501");
}

#[test]
fn tables_are_normalized() {
    let c = one(
        "SELECT * FROM Orders o JOIN \"Mixed\".\"Case\" m ON true JOIN app.public.items i ON true, pg_class",
    );
    assert_eq!(
        c.tables,
        vec![
            "Mixed.Case",
            "pg_catalog.pg_class",
            "public.items",
            "public.orders"
        ]
    );
}

/// An allow rule with `tables` is only as good as table discovery: every way of naming a table
/// must report it.
#[test]
fn every_table_reference_is_found() {
    let mut refused = Vec::new();
    for sql in [
        "TABLE s",
        "SELECT * FROM ONLY s",
        "SELECT * FROM s TABLESAMPLE SYSTEM (10)",
        "SELECT (SELECT max(x) FROM s)",
        "SELECT * FROM t, LATERAL (SELECT * FROM s) x",
        "SELECT * FROM (t JOIN s USING (id))",
        "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM s)",
        "SELECT * FROM t WHERE id IN (SELECT id FROM s)",
        "SELECT * FROM t UNION SELECT * FROM s",
        "WITH x AS (SELECT * FROM s) SELECT * FROM x",
        "WITH s AS (SELECT * FROM s) SELECT * FROM s",
        "INSERT INTO t SELECT * FROM s",
        "INSERT INTO s VALUES (1)",
        "UPDATE t SET a = s.a FROM s WHERE t.id = s.id",
        "UPDATE s SET a = 1 WHERE id = 1",
        "DELETE FROM t USING s WHERE t.id = s.id",
        "DELETE FROM s WHERE id = 1",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "MERGE INTO s USING t ON t.id = s.id WHEN MATCHED THEN DELETE",
        "LOCK TABLE s",
        "TRUNCATE s",
        "CREATE VIEW v AS SELECT * FROM s",
        "CREATE TABLE c AS SELECT * FROM s",
        "DECLARE c CURSOR FOR SELECT * FROM s",
        "EXPLAIN SELECT * FROM s",
        "COPY (SELECT * FROM s) TO STDOUT",
        "COPY s TO STDOUT",
        "SELECT * FROM t JOIN s ON true FOR UPDATE OF s",
        "PREPARE p AS SELECT * FROM s",
        "SELECT * FROM t WHERE a = ANY (ARRAY(SELECT a FROM s))",
        "SELECT count(*) FILTER (WHERE a IN (SELECT a FROM s)) FROM t",
        "SELECT * FROM generate_series(1, 2) g JOIN s ON true",
        "ALTER TABLE s ADD COLUMN z int",
        "DROP TABLE s",
        "CREATE INDEX ON s (a)",
        "GRANT SELECT ON s TO bob",
        "VACUUM s",
        "ANALYZE s",
    ] {
        // Refusing to classify would also be safe, but PostgreSQL's parser reads all of these.
        let Ok(c) = classify(sql, ON) else {
            refused.push(sql);
            continue;
        };
        let found = c
            .iter()
            .any(|c| !c.names_known || c.tables.iter().any(|t| t == "public.s"));
        assert!(found, "{sql}: public.s not reported: {c:?}");
    }
    assert_eq!(refused, Vec::<&str>::new());
}

/// Side-effect detection is only as good as function discovery: every place a function can be
/// called must report it.
#[test]
fn every_function_call_is_found() {
    let mut refused = Vec::new();
    for sql in [
        "SELECT pg_read_file('x')",
        "SELECT * FROM pg_read_file('x')",
        "SELECT * FROM pg_read_file('x') AS f(c)",
        "SELECT * FROM t JOIN LATERAL pg_read_file(t.a) x ON true",
        "SELECT * FROM ROWS FROM (pg_read_file('x'))",
        "SELECT * FROM t WHERE pg_read_file(a) > ''",
        "SELECT a FROM t ORDER BY pg_read_file(a)",
        "SELECT a FROM t GROUP BY pg_read_file(a)",
        "SELECT count(*) FROM t HAVING max(pg_read_file('x')) > ''",
        "VALUES (pg_read_file('x'))",
        "INSERT INTO t VALUES (pg_read_file('x'))",
        "INSERT INTO t SELECT pg_read_file('x')",
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = pg_read_file('x')",
        "UPDATE t SET a = pg_read_file('x') WHERE id = 1",
        "DELETE FROM t WHERE id = 1 RETURNING pg_read_file('x')",
        "SELECT (pg_read_file('x'))",
        "SELECT length(pg_read_file('x')) OVER ()",
        "SELECT ARRAY[pg_read_file('x')]",
        "SELECT CASE WHEN true THEN pg_read_file('x') END",
        "SELECT 1 LIMIT length(pg_read_file('x'))",
        "SELECT 1 OFFSET length(pg_read_file('x'))",
        "SELECT count(*) FILTER (WHERE pg_read_file('x') > '') FROM t",
        "SELECT string_agg(a, ',' ORDER BY pg_read_file(a)) FROM t",
        "SELECT pg_read_file('x') COLLATE \"C\"",
        "SELECT (SELECT pg_read_file('x'))",
        "WITH x AS (SELECT pg_read_file('x')) SELECT 1",
        "SELECT * FROM t WHERE a = ANY(pg_read_file('x'))",
        "SELECT pg_read_file('x')::int",
        "SELECT CAST(pg_read_file('x') AS int)",
        "SELECT coalesce(NULL, pg_read_file('x'))",
        "SELECT pg_read_file(VARIADIC ARRAY['x'])",
        "SELECT ROW(pg_read_file('x'))",
        "SELECT EXISTS (SELECT pg_read_file('x'))",
        "COPY (SELECT pg_read_file('x')) TO STDOUT",
        "EXPLAIN ANALYZE SELECT pg_read_file('x')",
        "PREPARE p AS SELECT pg_read_file('x')",
        "DECLARE c CURSOR FOR SELECT pg_read_file('x')",
        "CALL pg_read_file('x')",
        "SELECT * FROM t WHERE a IN (pg_read_file('x'))",
        "SELECT * FROM t WHERE a BETWEEN pg_read_file('x') AND 'z'",
        "SELECT * FROM t WHERE a LIKE pg_read_file('x')",
        "SELECT pg_read_file('x') IS NULL",
        "SELECT 1 WHERE pg_read_file('x') IS DISTINCT FROM 'x'",
        "SELECT * FROM t JOIN s ON s.a = pg_read_file('x')",
        "SELECT * FROM t JOIN s USING (a) WHERE pg_read_file('x') = ''",
        "SELECT substring(pg_read_file('x') FROM 1 FOR 2)",
        "SELECT trim(BOTH FROM pg_read_file('x'))",
        "SELECT position('a' IN pg_read_file('x'))",
        "SELECT extract(year FROM pg_read_file('x')::date)",
        "SELECT pg_read_file('x') AT TIME ZONE 'UTC'",
        "SELECT DISTINCT ON (pg_read_file('x')) a FROM t",
        "SELECT * FROM t WINDOW w AS (ORDER BY pg_read_file('x'))",
        "SELECT a FROM t UNION SELECT pg_read_file('x')",
        "SELECT pg_catalog.pg_read_file('x')",
        "SELECT \"pg_read_file\"('x')",
        "SELECT PG_READ_FILE('x')",
    ] {
        let Ok(c) = classify(sql, ON) else {
            refused.push(sql);
            continue;
        };
        let found = c.iter().any(|c| {
            !c.names_known
                || (c.functions.iter().any(|f| f == "pg_catalog.pg_read_file")
                    && (c.risks.contains(&Risk::ServerFile)
                        || c.prepares.is_some()
                        || c.command == "EXPLAIN"
                        || c.command.starts_with("DECLARE")))
        });
        assert!(found, "{sql}: pg_read_file not reported: {c:?}");
    }
    eprintln!("refused: {refused:?}");
    assert!(refused.len() <= 5, "too many refused: {refused:?}");
}

#[test]
fn long_identifiers_are_truncated_like_postgresql() {
    let long = format!("{}_and_more", "s".repeat(63));
    let c = one(&format!("SELECT * FROM {long}"));
    assert_eq!(c.tables, vec![format!("public.{}", "s".repeat(63))]);
}

/// Text from the network must never panic the classifier, whatever it is.
#[test]
fn arbitrary_text_never_panics() {
    const PIECES: &[&str] = &[
        "'", "\"", "$", "$$", "$a$", "E'", "U&'", "U&\"", "/*", "*/", "--", "\n", "\r", "\\", ";",
        "(", ")", "SELECT", "DELETE", "FROM", " ", "é", "€", "𝄞", "1", ".", "e", "::", "B'", "X'",
        "N'", "\t", "DO", "COPY", "t", "WITH", "EXPLAIN", "ANALYZE", ",",
    ];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for _ in 0..20_000 {
        let n = next() % 12;
        let sql: String = (0..n)
            .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
            .collect();
        for lex in [ON, OFF] {
            let _ = classify(&sql, lex);
        }
    }
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    let sql = format!("SELECT {}1{}", "(".repeat(20_000), ")".repeat(20_000));
    assert!(classify(&sql, ON).is_err());
    let sql = format!("SELECT 1 {}", "/*".repeat(50_000));
    assert!(classify(&sql, ON).is_err());
}

#[test]
fn ddl_reports_its_tables() {
    for sql in [
        "CREATE TABLE s (a int)",
        "CREATE TABLE s AS SELECT 1",
        "ALTER TABLE s ADD COLUMN b int",
        "CREATE INDEX i ON s (a)",
        "DROP TABLE s",
        "TRUNCATE s",
        "CREATE VIEW s AS SELECT 1",
        "COMMENT ON TABLE s IS 'x'",
    ] {
        let c = one(sql);
        assert!(
            c.names_known && c.tables.contains(&"public.s".to_owned()),
            "{sql}: {c:?}"
        );
    }
}

/// Valid PostgreSQL that drivers, ORMs and pg_dump send: classified, not refused.
#[test]
fn statements_postgresql_accepts_are_classified() {
    use StatementKind::*;
    for (sql, kind) in [
        ("MOVE NEXT FROM c", Read),
        ("MOVE FORWARD 5 IN c", Read),
        ("MOVE ABSOLUTE -1 c", Read),
        ("MOVE BACKWARD ALL FROM c", Read),
        ("FETCH c", Read),
        ("FETCH -3 FROM c", Read),
        ("FETCH ALL c", Read),
        ("FETCH BACKWARD 2 c", Read),
        ("FETCH FORWARD 10 FROM \"c\"", Read),
        ("TABLE s", Read),
        ("TABLE ONLY s", Read),
        ("SELECT * FROM ONLY s", Read),
        ("SELECT * FROM s FOR NO KEY UPDATE SKIP LOCKED", Write),
        ("SELECT * FROM s FOR KEY SHARE", Write),
        ("SELECT * FROM s FOR SHARE NOWAIT", Write),
        (
            "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
            Transaction,
        ),
        ("BEGIN NOT DEFERRABLE", Transaction),
        (
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
            Transaction,
        ),
        ("SET TRANSACTION NOT DEFERRABLE", Transaction),
        ("SET CONSTRAINTS ALL DEFERRED", Transaction),
        ("SET CONSTRAINTS s_fk IMMEDIATE", Transaction),
        ("INSERT INTO s OVERRIDING SYSTEM VALUE VALUES (1)", Write),
        ("INSERT INTO s OVERRIDING USER VALUE SELECT 1", Write),
        ("UPDATE s SET a = 1 WHERE CURRENT OF c", Write),
        ("DELETE FROM s WHERE CURRENT OF c", Write),
        ("CREATE TABLE c2 (LIKE s INCLUDING ALL)", Ddl),
        (
            "SELECT * FROM s WHERE a OPERATOR(pg_catalog.=) ANY (ARRAY[1, 2])",
            Read,
        ),
        ("SELECT TRIM(BOTH FROM ' x ')", Read),
        ("SELECT TRIM(LEADING 'x' FROM a) FROM s", Read),
        (
            "SELECT * FROM ROWS FROM (generate_series(1, 2), generate_series(1, 3)) AS g(a, b)",
            Read,
        ),
        (
            "SELECT xmlelement(name foo, xmlattributes('x' AS bar), 'baz')",
            Read,
        ),
        ("SELECT * FROM U&\"\\0073\"", Read),
        ("SELECT U&'d!0061t!+000061' UESCAPE '!'", Read),
        (
            "DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT * FROM s",
            Read,
        ),
        ("CLOSE ALL", Read),
        (
            "SELECT 1 FROM s WHERE a IS DISTINCT FROM 1 AND b SIMILAR TO 'x%'",
            Read,
        ),
        ("SELECT a FROM s GROUP BY GROUPING SETS ((a), ())", Read),
        (
            "SELECT * FROM s TABLESAMPLE BERNOULLI (10) REPEATABLE (1)",
            Read,
        ),
        (
            "SELECT * FROM XMLTABLE('/r' PASSING ('<r/>'::xml) COLUMNS a int PATH 'a')",
            Read,
        ),
        (
            "SELECT a FROM s ORDER BY a FETCH FIRST 3 ROWS WITH TIES",
            Read,
        ),
    ] {
        let c = one(sql);
        assert_eq!(c.kind, kind, "{sql}: {c:?}");
    }
    // The table of `TABLE s`, `ONLY s` and U&"" identifiers is known.
    for sql in [
        "TABLE s",
        "SELECT * FROM ONLY s",
        "SELECT * FROM U&\"\\0073\"",
    ] {
        assert_eq!(one(sql).tables, vec!["public.s"], "{sql}");
    }
    assert_eq!(
        one("SELECT * FROM s FOR NO KEY UPDATE").tables,
        vec!["public.s"]
    );
}

/// Every spelling of EXPLAIN's options that PostgreSQL 15 accepts; an ANALYZE that is on runs
/// the statement, so the statement is what it explains.
#[test]
fn explain_option_spellings() {
    use StatementKind::*;
    for sql in [
        "EXPLAIN ANALYZE DELETE FROM s",
        "EXPLAIN ANALYSE DELETE FROM s",
        "EXPLAIN ANALYZE VERBOSE DELETE FROM s",
        "EXPLAIN (ANALYSE) DELETE FROM s",
        "EXPLAIN (analyse true) DELETE FROM s",
        "EXPLAIN (ANALYZE on) DELETE FROM s",
        "EXPLAIN (ANALYZE 'on') DELETE FROM s",
        "EXPLAIN (ANALYZE \"on\") DELETE FROM s",
        "EXPLAIN (ANALYZE 'TRUE') DELETE FROM s",
        "EXPLAIN (ANALYZE 1) DELETE FROM s",
        "EXPLAIN (\"analyze\") DELETE FROM s",
        "EXPLAIN (COSTS false, ANALYZE, FORMAT JSON) DELETE FROM s",
        "EXPLAIN (ANALYZE off, ANALYZE on) DELETE FROM s",
        "explain (format 'yaml', analyze) delete from s",
    ] {
        let c = one(sql);
        assert_eq!(c.kind, Write, "{sql}: {c:?}");
        assert!(c.risks.contains(&Risk::DeleteWithoutWhere), "{sql}: {c:?}");
        assert_eq!(c.command, "EXPLAIN", "{sql}");
    }
    for (sql, kind) in [
        ("EXPLAIN ANALYZE CREATE TABLE c2 AS SELECT 1", Ddl),
        ("EXPLAIN ANALYZE SELECT nextval('q')", Write),
        (
            "EXPLAIN (ANALYZE) WITH d AS (DELETE FROM s RETURNING 1) SELECT 1",
            Write,
        ),
        ("EXPLAIN (ANALYZE) SELECT * FROM s FOR UPDATE", Write),
        ("EXPLAIN (ANALYZE) INSERT INTO s VALUES (1)", Write),
        (
            "EXPLAIN (ANALYZE) MERGE INTO s USING t ON true WHEN MATCHED THEN DELETE",
            Write,
        ),
    ] {
        assert_eq!(one(sql).kind, kind, "{sql}");
    }
    let c = one("EXPLAIN ANALYZE EXECUTE p(1)");
    assert_eq!(c.executes.as_deref(), Some("p"));
    for sql in [
        "EXPLAIN DELETE FROM s",
        "EXPLAIN (ANALYZE off) DELETE FROM s",
        "EXPLAIN (ANALYZE 0) DELETE FROM s",
        "EXPLAIN (ANALYZE 'false') DELETE FROM s",
        "EXPLAIN (VERBOSE, COSTS OFF, SETTINGS, BUFFERS false, WAL off, TIMING 0, SUMMARY) DELETE FROM s",
        "EXPLAIN VERBOSE SELECT nextval('q')",
    ] {
        let c = one(sql);
        assert_eq!(c.kind, Read, "{sql}: {c:?}");
        assert!(c.risks.is_empty(), "{sql}: {c:?}");
        assert!(c.tables.contains(&"public.s".to_owned()) || sql.contains("nextval"));
    }
    // What PostgreSQL 15 would reject is refused, not guessed.
    for sql in [
        "EXPLAIN (ANALYZE yes) DELETE FROM s",
        "EXPLAIN (ANALYZE 2) DELETE FROM s",
        "EXPLAIN (ANALYZE 1.0) DELETE FROM s",
        "EXPLAIN (ANALYZE 't') DELETE FROM s",
        "EXPLAIN (FROBNICATE) DELETE FROM s",
        "EXPLAIN (GENERIC_PLAN) SELECT 1",
        "EXPLAIN (SERIALIZE) SELECT 1",
        "EXPLAIN (FORMAT csv) SELECT 1",
    ] {
        assert!(
            matches!(classify(sql, ON), Err(Unclassifiable::Parse { .. })),
            "{sql}: {:?}",
            classify(sql, ON)
        );
    }
}

/// Functions that read the relations their arguments name (from pg_proc).
#[test]
fn relation_naming_functions() {
    let c = one("SELECT table_to_xml('pg_authid', true, true, '')");
    assert!(c.names_known);
    assert_eq!(c.tables, vec!["pg_catalog.pg_authid"]);
    let c = one(
        "SELECT table_to_xml(tbl => 'Secret.\"T\"', nulls => true, tableforest => true, targetns => '')",
    );
    assert_eq!(c.tables, vec!["secret.T"]);
    let c =
        one("SELECT pg_catalog.table_to_xml_and_xmlschema('accounts'::regclass, true, true, '')");
    assert_eq!(c.tables, vec!["public.accounts"]);
    for sql in [
        "SELECT table_to_xml('1260', true, true, '')",
        "SELECT table_to_xml(1260::oid::regclass, true, true, '')",
        "SELECT table_to_xml(relname::regclass, true, true, '') FROM pg_class",
        "SELECT schema_to_xml('pg_catalog', true, true, '')",
        "SELECT database_to_xml(true, true, '')",
        "SELECT query_to_xml(current_setting('x'), true, true, '')",
    ] {
        assert!(!one(sql).names_known, "{sql}: {:?}", one(sql));
    }
    // Query text in a literal is classified as the statement it is.
    let c = one("SELECT query_to_xml('select * from pg_authid', true, true, '')");
    assert!(
        c.tables.contains(&"pg_catalog.pg_authid".to_owned()),
        "{c:?}"
    );
    let c = one("SELECT query_to_xml('DELETE FROM s RETURNING 1', true, true, '')");
    assert!(c.risks.contains(&Risk::DeleteWithoutWhere), "{c:?}");
    // Metadata functions: a named relation is reported, an OID is a catalog lookup.
    assert_eq!(one("SELECT pg_relation_size('s')").tables, vec!["public.s"]);
    assert!(one("SELECT pg_catalog.pg_relation_is_publishable('16388')").names_known);
}

#[test]
fn syntax_errors_are_postgresqls() {
    let e = classify("SELECT 1;\nSELECT * FROMM s", ON).unwrap_err();
    assert_eq!(e.sqlstate(), "42601");
    assert_eq!(e.to_string(), "syntax error at or near \"FROMM\"");
    assert_eq!(e.position(), Some(20));
}
