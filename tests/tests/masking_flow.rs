//! Masking follows the value through a statement: through the real proxy and PostgreSQL, every
//! way of reading a masked column other than as a plain output column (functions, casts,
//! COLLATE, set operations, subqueries, CTEs, aggregates, JSON and whole-row forms, COPY of an
//! expression, temp objects, procedural code, notifications, RETURNING, error messages that
//! echo a value, comparisons used as an oracle, encodings) is either masked inside the
//! statement or refused with 42501. The assertion is on the bytes the client receives: no raw
//! value appears in any encoding the test knows (raw, reversed, base64, hex, translated
//! digits), in rows, COPY data, errors, notices or notifications.

use base64::Engine as _;
use interceptor_tests::proxy::allow_all_policy;
use interceptor_tests::raw::{RawClient, RawMessage};
use interceptor_tests::{IdentitySpec, Interceptor, InterceptorSetup, PgCluster};

const AGENT: &str = "agent";
const AGENT_PASSWORD: &str = "agent-Flow-Pass-1";
const ADMIN: &str = "admin";
const ADMIN_PASSWORD: &str = "admin-Flow-Pass-2";
const KEY: &str = "00112233445566778899aabbccddeeff";

/// The raw values (the second card fails Luhn: content detectors would not see it).
const CARDS: [&str; 2] = ["4539148803436467", "4539000011112229"];
const EMAILS: [&str; 2] = ["carol.white@example.net", "dave.brown@example.com"];

/// Column rules only, no content detectors: what is masked here is masked by the rewrite or
/// by the column rule on a plain output column, not caught afterwards by a detector.
const MASK: &str = r#"
[mask]
exempt_subjects = ["admin"]

[[mask.column]]
match = "public.ledger.card"
strategy = "partial"
keep_last = 4

[[mask.column]]
match = "public.ledger.email"
strategy = "pseudonym"
"#;

struct Flow {
    proxy: Interceptor,
    pg: PgCluster,
}

fn start() -> Flow {
    let pg = PgCluster::start().unwrap();
    pg.psql(&format!(
        "CREATE TABLE ledger (id int PRIMARY KEY, email text, card text, note text);\n\
         INSERT INTO ledger VALUES (1, '{}', '{}', 'first'), (2, '{}', '{}', 'second');\n\
         CREATE VIEW ledger_v AS SELECT id, card FROM ledger;\n\
         CREATE VIEW notes_v AS SELECT id, note FROM ledger;\n\
         CREATE FUNCTION first_card() RETURNS text LANGUAGE sql AS \
           'SELECT card FROM ledger ORDER BY id LIMIT 1';\n\
         GRANT ALL ON ledger, ledger_v, notes_v TO app_rw;\n\
         GRANT CREATE ON SCHEMA public TO app_rw;",
        EMAILS[0], CARDS[0], EMAILS[1], CARDS[1]
    ))
    .unwrap();
    let agent = IdentitySpec::new(AGENT, AGENT_PASSWORD, &["ai-agents"], Some("app_rw"));
    let admin = IdentitySpec::new(ADMIN, ADMIN_PASSWORD, &["dba"], Some("app_rw"));
    let setup = InterceptorSetup::new(&pg)
        .pseudonym_key(KEY)
        .identity_spec(agent.clone())
        .identity_spec(admin.clone())
        .policy_file("agent", &format!("{}{MASK}", allow_all_policy(&agent)))
        .policy_file("admin", &format!("{}{MASK}", allow_all_policy(&admin)));
    let proxy = Interceptor::start(setup).unwrap();
    Flow { proxy, pg }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every encoding of every raw value the test knows.
fn forbidden() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for v in CARDS.iter().chain(EMAILS.iter()) {
        let reversed: String = v.chars().rev().collect();
        let translated: String = v
            .chars()
            .map(|c| match c {
                '0'..='9' => (b'a' + (c as u8 - b'0')) as char,
                c => c,
            })
            .collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(v);
        for s in [
            v.to_string(),
            v.to_uppercase(),
            reversed,
            translated,
            b64.trim_end_matches('=').to_string(),
            hex(v.as_bytes()),
            hex(v.as_bytes()).to_uppercase(),
        ] {
            out.push(s.into_bytes());
        }
        // The masked part of a card: its first twelve digits.
        if v.starts_with("4539") {
            out.push(v.as_bytes()[..12].to_vec());
        }
    }
    out
}

fn assert_clean(what: &str, messages: &[RawMessage]) {
    let mut all = Vec::new();
    for m in messages {
        all.push(m.tag);
        all.extend_from_slice(&m.body);
    }
    for f in forbidden() {
        assert!(
            !all.windows(f.len()).any(|w| w == f.as_slice()),
            "{what}: raw value leaked as {:?} in {:?}",
            String::from_utf8_lossy(&f),
            String::from_utf8_lossy(&all)
        );
    }
}

fn error_of(messages: &[RawMessage]) -> Option<&RawMessage> {
    messages.iter().find(|m| m.tag == b'E')
}

fn text_rows(messages: &[RawMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let b = &m.body;
            let n = i16::from_be_bytes([b[0], b[1]]) as usize;
            let mut at = 2;
            let mut row = Vec::with_capacity(n);
            for _ in 0..n {
                let len = i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                at += 4;
                if len < 0 {
                    row.push(None);
                } else {
                    let l = len as usize;
                    row.push(Some(String::from_utf8_lossy(&b[at..at + l]).into_owned()));
                    at += l;
                }
            }
            row
        })
        .collect()
}

fn run(c: &mut RawClient, sql: &str) -> Vec<RawMessage> {
    let (msgs, closed) = c.simple_query(sql).unwrap();
    assert!(!closed, "{sql}: connection closed");
    assert_clean(sql, &msgs);
    msgs
}

fn masked_ok(c: &mut RawClient, sql: &str) -> Vec<RawMessage> {
    let msgs = run(c, sql);
    if let Some(e) = error_of(&msgs) {
        panic!("{sql}: unexpected error {:?}", e.error_field(b'M'));
    }
    msgs
}

fn refused(c: &mut RawClient, sql: &str, names: &str) {
    let msgs = run(c, sql);
    let e = error_of(&msgs).unwrap_or_else(|| panic!("{sql}: not refused"));
    assert_eq!(e.sqlstate().as_deref(), Some("42501"), "{sql}: {e:?}");
    let msg = e.error_field(b'M').unwrap_or_default();
    assert!(
        msg.contains(names),
        "{sql}: message {msg:?} does not name {names}"
    );
}

#[test]
fn expressions_over_masked_columns_see_the_masked_value() {
    let f = start();
    let mut c = RawClient::login(&f.proxy.params(AGENT)).unwrap();
    for sql in [
        "SELECT substr(card, 1, 12), left(card, 8), replace(card, '*', '') FROM ledger",
        "SELECT upper(card), card || '', lower(card), reverse(card) FROM ledger",
        "SELECT card::varchar(30), card COLLATE \"C\", CAST(card AS bytea) FROM ledger",
        "SELECT card FROM ledger UNION SELECT 'x'",
        "SELECT card FROM ledger INTERSECT SELECT card FROM ledger",
        "SELECT (SELECT card FROM ledger WHERE id = 1), (SELECT max(card) FROM ledger)",
        "SELECT min(card), max(card), string_agg(card, ','), array_agg(card)::text FROM ledger",
        "SELECT encode(convert_to(card, 'UTF8'), 'base64'), encode(convert_to(card, 'UTF8'), \
           'hex'), translate(card, '0123456789', 'abcdefghij') FROM ledger",
        "SELECT json_agg(card)::text, jsonb_build_object('c', min(card))::text FROM ledger",
        "WITH c AS (SELECT card FROM ledger) SELECT upper(card) FROM c",
        "SELECT s.card FROM (SELECT card FROM ledger) s",
        "SELECT * FROM (SELECT id, card, note FROM ledger) s",
        "SELECT upper(x) FROM ledger AS a(i, e, x)",
        "SELECT a.card FROM ledger a JOIN ledger b ON a.card = b.card",
        "SELECT public.ledger.card || '!' FROM public.ledger",
        "SELECT card FROM ledger ORDER BY card",
        "SELECT DISTINCT card FROM ledger",
        "SELECT card, count(*) FROM ledger GROUP BY card",
        "UPDATE ledger SET note = note WHERE id = 1 RETURNING card, upper(card)",
        "UPDATE ledger SET note = note WHERE id = 1 RETURNING email",
        "WITH u AS (UPDATE ledger SET note = note RETURNING card) SELECT upper(card) FROM u",
        "INSERT INTO ledger SELECT id + 10, NULL, card, note FROM ledger",
        "SELECT card FROM ledger WHERE id > 10",
        "COPY (SELECT upper(card), card FROM ledger) TO STDOUT",
        "COPY (SELECT card || ';' || note, email FROM ledger) TO STDOUT WITH (FORMAT csv)",
        "CREATE TEMP TABLE t AS SELECT card, upper(card) AS u FROM ledger",
        "SELECT * FROM t",
        "EXPLAIN ANALYZE SELECT * FROM ledger WHERE card LIKE '4539%'",
        "PREPARE p AS SELECT upper(card) FROM ledger; EXECUTE p",
        "DECLARE cur CURSOR WITH HOLD FOR SELECT card FROM ledger; FETCH ALL FROM cur; CLOSE cur",
    ] {
        let msgs = masked_ok(&mut c, sql);
        assert!(
            msgs.iter().any(|m| matches!(m.tag, b'D' | b'd' | b'C')),
            "{sql}: no answer"
        );
    }
    // The LIKE oracle: the comparison sees the masked value, so no row matches a raw prefix.
    for sql in [
        "SELECT count(*) FROM ledger WHERE card LIKE '4539%'",
        "SELECT count(*) FROM ledger WHERE substr(card, 1, 4) = '4539'",
        "SELECT count(*) FROM ledger a WHERE EXISTS (SELECT 1 FROM ledger b \
           WHERE b.id = a.id AND b.card LIKE '45%')",
        "SELECT count(*) FROM (SELECT card FROM ledger) s WHERE s.card LIKE '4539%'",
    ] {
        let msgs = masked_ok(&mut c, sql);
        assert_eq!(text_rows(&msgs), vec![vec![Some("0".to_string())]], "{sql}");
    }
    let msgs = masked_ok(
        &mut c,
        "SELECT upper(card) FROM ledger WHERE id < 10 ORDER BY id",
    );
    assert_eq!(
        text_rows(&msgs),
        vec![
            vec![Some("************6467".to_string())],
            vec![Some("************2229".to_string())],
        ]
    );
    // A plain output column keeps the proxy-side path: pseudonyms still work there.
    let msgs = masked_ok(
        &mut c,
        "SELECT email, card FROM ledger WHERE id < 10 ORDER BY id",
    );
    let rows = text_rows(&msgs);
    assert!(
        rows[0][0].as_deref().is_some_and(|e| e.starts_with("p_")),
        "{rows:?}"
    );
    assert_eq!(rows[0][1].as_deref(), Some("************6467"));
}

#[test]
fn messages_and_notifications_carry_only_masked_values() {
    let f = start();
    let mut c = RawClient::login(&f.proxy.params(AGENT)).unwrap();
    // Errors that echo their input: the input is the masked value.
    for sql in [
        "SELECT set_config(card, 'x', false) FROM ledger",
        "SELECT now() AT TIME ZONE card FROM ledger",
        "SELECT xmlparse(document card || '<') FROM ledger",
        "SELECT card::int FROM ledger",
        "SELECT (card || 'x')::numeric FROM ledger",
    ] {
        let msgs = run(&mut c, sql);
        assert!(error_of(&msgs).is_some(), "{sql}: expected an error");
    }
    // NOTIFY payloads built from the column.
    let msgs = masked_ok(
        &mut c,
        "LISTEN ch; SELECT pg_notify('ch', card || ' ' || upper(card)) FROM ledger",
    );
    let notes: Vec<&RawMessage> = msgs.iter().filter(|m| m.tag == b'A').collect();
    assert_eq!(notes.len(), 2, "notifications: {msgs:?}");
}

#[test]
fn what_cannot_be_rewritten_is_refused() {
    let f = start();
    let mut c = RawClient::login(&f.proxy.params(AGENT)).unwrap();
    for (sql, names) in [
        // The pseudonym needs the key, which must not reach the server.
        ("SELECT lower(email) FROM ledger", "public.ledger.email"),
        (
            "SELECT count(*) FROM ledger WHERE email LIKE 'carol%'",
            "pseudonym",
        ),
        (
            "SELECT email FROM ledger ORDER BY email",
            "public.ledger.email",
        ),
        (
            "SELECT * FROM (SELECT * FROM ledger) s",
            "public.ledger.email",
        ),
        // Whole-row forms.
        ("SELECT row_to_json(a) FROM ledger a", "whole-row"),
        ("SELECT a::text FROM ledger a", "whole-row"),
        ("SELECT to_jsonb(a.*) FROM ledger a", "whole-row"),
        ("SELECT ledger FROM ledger", "whole-row"),
        // Relations named in strings.
        (
            "SELECT query_to_xml('SELECT card FROM ledger', true, false, '')",
            "query_to_xml",
        ),
        (
            "SELECT table_to_xml('ledger', true, false, '')",
            "table_to_xml",
        ),
        // Procedural code, functions, views.
        (
            "DO $$ BEGIN RAISE NOTICE '%', (SELECT card FROM ledger LIMIT 1); END $$",
            "DO",
        ),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'SELECT card FROM ledger LIMIT 1'",
            "CREATE FUNCTION",
        ),
        ("SELECT first_card()", "first_card"),
        (
            "CREATE TEMP VIEW v AS SELECT card FROM ledger",
            "public.ledger.card",
        ),
        (
            "CREATE TEMP VIEW v2 AS SELECT * FROM ledger",
            "public.ledger",
        ),
        ("SELECT * FROM ledger_v", "public.ledger.card"),
        // Joins that compare the column unmasked.
        ("SELECT 1 FROM ledger a JOIN ledger b USING (card)", "card"),
    ] {
        refused(&mut c, sql, names);
    }
    // A view that does not read a masked column is fine.
    masked_ok(&mut c, "SELECT * FROM notes_v");
    // Nothing was created.
    let out =
        f.pg.psql("SELECT count(*) FROM pg_proc WHERE proname = 'f'")
            .unwrap();
    assert_eq!(out.trim(), "0");
}

#[test]
fn exempt_identity_statements_are_not_rewritten() {
    let f = start();
    let mut c = RawClient::login(&f.proxy.params(ADMIN)).unwrap();
    let (msgs, _) = c
        .simple_query("SELECT upper(card) FROM ledger WHERE id < 10 ORDER BY id")
        .unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some(CARDS[0]));
}

/// Any value in its raw wire form (text or binary).
struct Raw(Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

#[tokio::test(flavor = "current_thread")]
async fn binary_driver_prepared_statements_are_rewritten() {
    let f = start();
    let client = f.proxy.params(AGENT).connect().await.unwrap();
    let check = |what: &str, bytes: &[u8]| {
        for b in forbidden() {
            assert!(
                !bytes.windows(b.len()).any(|w| w == b.as_slice()),
                "{what}: leaked {:?}",
                String::from_utf8_lossy(&b)
            );
        }
    };
    // Describe lines up with the rewritten statement: same names and types.
    let stmt = client
        .prepare("SELECT card, upper(card) AS u, substr(card, 1, 8), length(card) FROM ledger WHERE card LIKE $1 OR id = $2")
        .await
        .unwrap();
    let names: Vec<&str> = stmt.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["card", "u", "substr", "length"]);
    assert_eq!(stmt.params().len(), 2);
    let rows = client.query(&stmt, &[&"4539%", &1i32]).await.unwrap();
    assert_eq!(
        rows.len(),
        1,
        "only id = 1 matches; the LIKE sees masked values"
    );
    for row in &rows {
        for i in 0..row.len() {
            let v: Option<Raw> = row.get(i);
            check("binary row", &v.map(|r| r.0).unwrap_or_default());
        }
    }
    let u: String = rows[0].get(1);
    assert_eq!(u, "************6467");
    // Expressions over a pseudonym column are refused before anything is sent.
    let err = client
        .prepare("SELECT lower(email) FROM ledger")
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert!(
        db.message().contains("public.ledger.email"),
        "{}",
        db.message()
    );
    // A whole-row value in binary format is refused too.
    let err = client
        .query("SELECT a FROM ledger a", &[])
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
}
