//! Scripted psql sessions through the proxy: multi-statement simple queries, implicit
//! transactions, `\copy` out and in.

use std::io::Write;

use interceptor_tests::fixtures::{self, ACCOUNT_ROWS};
use interceptor_tests::{ALICE, PgCommand, Stack, StackOptions};

fn stack() -> Stack {
    Stack::start(StackOptions::standard()).unwrap()
}

#[test]
fn multi_statement_simple_query() {
    let s = stack();
    // One -c string is one simple Query message with four statements; psql 15 prints every
    // result, so all four CommandComplete tags must come back in order.
    let out = PgCommand::psql(&s.params(ALICE))
        .args([
            "-A",
            "-t",
            "-c",
            "CREATE TEMP TABLE t (id int, v text); \
             INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'semi;colon'); \
             UPDATE t SET v = 'c' WHERE id = 2; \
             SELECT id, v FROM t ORDER BY id",
        ])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(
        out.stdout,
        "CREATE TABLE\nINSERT 0 3\nUPDATE 1\n1|a\n2|c\n3|semi;colon\n"
    );
}

#[test]
fn multi_statement_error_rolls_back_the_implicit_transaction() {
    let s = stack();
    let out = PgCommand::psql(&s.params(ALICE))
        .args([
            "-c",
            "INSERT INTO accounts (name, email, card_number) \
             VALUES ('Ghost', 'ghost@example.com', '4111111111111111'); SELECT 1/0; SELECT 3",
        ])
        .run()
        .unwrap();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("division by zero"), "{out:?}");
    // The whole simple query was one implicit transaction: the INSERT is gone.
    let n =
        s.pg.psql("SELECT count(*) FROM accounts WHERE email = 'ghost@example.com'")
            .unwrap();
    assert_eq!(n.trim(), "0");
    // And the session-level error did not poison the next connection.
    let out = PgCommand::psql(&s.params(ALICE))
        .args(["-A", "-t", "-c", "SELECT count(*) FROM accounts"])
        .run()
        .unwrap();
    assert_eq!(out.stdout.trim(), ACCOUNT_ROWS.to_string(), "{out:?}");
}

#[test]
fn scripted_session_with_copy_out_and_in() {
    let s = stack();
    let dir = tempfile::tempdir().unwrap();
    let out_csv = dir.path().join("accounts.csv");
    let big_csv = dir.path().join("big.csv");
    // 5,000 rows (~400 KiB): several CopyData messages from psql.
    let mut f = std::fs::File::create(&big_csv).unwrap();
    let mut expected_sum: i64 = 0;
    for i in 1..=5000i64 {
        writeln!(
            f,
            "{i},\"row {i}, with comma and \"\"quotes\"\"\",{}",
            i * 3
        )
        .unwrap();
        expected_sum += i * 3;
    }
    drop(f);

    let script = format!(
        "\\copy (SELECT id, name, email, card_number, balance FROM accounts ORDER BY id) TO '{out}' WITH (FORMAT csv)\n\
         CREATE TEMP TABLE acc_copy (id int, name text, email text, card_number text, balance numeric(12,2));\n\
         \\copy acc_copy FROM '{out}' WITH (FORMAT csv)\n\
         SELECT 'copied', count(*), sum(balance) FROM acc_copy;\n\
         CREATE TEMP TABLE big (id int, label text, n bigint);\n\
         \\copy big FROM '{big}' WITH (FORMAT csv)\n\
         SELECT 'big', count(*), sum(n), max(label) FILTER (WHERE id = 42) FROM big;\n\
         BEGIN;\n\
         DELETE FROM big WHERE id > 10;\n\
         ROLLBACK;\n\
         SELECT 'after rollback', count(*) FROM big;\n",
        out = out_csv.display(),
        big = big_csv.display()
    );
    let out = PgCommand::psql(&s.params(ALICE))
        .args(["-A", "-t", "-q", "-f", "-"])
        .stdin(script)
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");

    // COPY TO produced exactly the fixture.
    let csv = std::fs::read_to_string(&out_csv).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    let accounts = fixtures::accounts();
    assert_eq!(lines.len(), accounts.len());
    for (line, a) in lines.iter().zip(&accounts) {
        let want = format!(
            "{},{},{},{},{}",
            a.id,
            a.name,
            a.email,
            a.card_number,
            a.balance_text()
        );
        assert_eq!(*line, want);
    }

    let total: i64 = accounts.iter().map(|a| a.balance_cents).sum();
    let total_text = format!(
        "{}{}.{:02}",
        if total < 0 { "-" } else { "" },
        total.unsigned_abs() / 100,
        total.unsigned_abs() % 100
    );
    let expected = format!(
        "copied|{ACCOUNT_ROWS}|{total_text}\n\
         big|5000|{expected_sum}|row 42, with comma and \"quotes\"\n\
         after rollback|5000\n"
    );
    assert_eq!(out.stdout, expected, "{out:?}");
}

#[test]
fn copy_from_with_bad_row_fails_cleanly() {
    let s = stack();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "1,ok\n2,ok\nnot-a-number,bad\n4,ok\n").unwrap();
    let script = format!(
        "CREATE TEMP TABLE c (id int, v text);\n\
         \\copy c FROM '{}' WITH (FORMAT csv)\n",
        bad.display()
    );
    let out = PgCommand::psql(&s.params(ALICE))
        .args(["-f", "-"])
        .stdin(script)
        .run()
        .unwrap();
    assert_eq!(out.code(), Some(3), "ON_ERROR_STOP exit: {out:?}");
    assert!(
        out.stderr.contains("invalid input syntax for type integer"),
        "{out:?}"
    );
}

#[test]
fn psql_over_the_unix_socket_listener() {
    let s = stack();
    let Some(proxy) = &s.proxy else {
        eprintln!("direct mode: the proxy's unix listener does not exist; skipped");
        return;
    };
    let params = proxy.unix_params(ALICE).unwrap();
    let out = PgCommand::psql(&params)
        .args(["-A", "-t", "-c", "SELECT count(*) FROM accounts"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), ACCOUNT_ROWS.to_string());
}
