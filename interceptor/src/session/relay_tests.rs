//! The relay and the gate driven by message sequences as clients send them, without a server:
//! the test plays the client on one pipe and PostgreSQL on the other, and checks byte for byte
//! what is forwarded, what is refused in place, what is withheld, what the client receives and
//! what the audit trail holds. The client sides are the sequences psql (simple Query), pgbench
//! -M prepared, tokio-postgres (prepare, then pipelined Bind/Execute/Sync) and JDBC batches
//! (several statements, one Sync) send; the server side answers as PostgreSQL does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::activity::Activity;
use super::cancel::CancelSignal;
use super::gate::{Gate, LexState, Recorder, SessionFacts, Verdict};
use super::masking::{SessionMask, SideLogin};
use super::relay::{self, End, RelayError, RowLimit, Shared};
use super::upstream::UpstreamTarget;
use crate::audit::config::AuditConfig;
use crate::audit::{AuditEvent, AuditLog, QueryProtocol, StatementOutcome, StatementRecord};
use crate::config::UpstreamConfig;
use crate::identity::{Identity, Proof};
use crate::mask::MaskRules;
use crate::net::reader::FrameReader;
use crate::policy::{PolicyHandle, PolicySet};
use interceptor_wire::message;

const POLICY: &str = r#"
[policy]
name = "relay"
[identities]
subjects = ["alice"]
[login]
upstream_role = "app"
databases = ["app"]
[[rule]]
name = "no-drops"
decision = "deny"
risks = ["drop"]
message = "no drops here"
[[rule]]
name = "work"
decision = "allow"
kinds = ["read", "write", "session", "transaction"]
# The sessions' rules are set by each test; a policy that masks keeps parse trees cached.
[[mask.column]]
name_pattern = "ssn"
strategy = "redact"
"#;

const MASK: &str = r#"
[[column]]
name_pattern = "ssn"
strategy = "redact"
"#;

// ------------------------------------------------------------------- frames

fn frame(tag: u8, body: &[u8]) -> Bytes {
    message::message(tag, body)
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn parse(name: &str, sql: &str) -> Bytes {
    let mut b = BytesMut::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.put_i16(0);
    frame(b'P', &b)
}

fn bind(portal: &str, statement: &str, params: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.put_i16(0);
    b.put_i16(params.len() as i16);
    for p in params {
        b.put_i32(p.len() as i32);
        b.put_slice(p.as_bytes());
    }
    b.put_i16(0);
    frame(b'B', &b)
}

fn describe(kind: u8, name: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    cstr(&mut b, name);
    frame(b'D', &b)
}

fn execute(portal: &str) -> Bytes {
    let mut b = BytesMut::new();
    cstr(&mut b, portal);
    b.put_i32(0);
    frame(b'E', &b)
}

fn sync() -> Bytes {
    frame(b'S', &[])
}

fn terminate() -> Bytes {
    frame(b'X', &[])
}

/// RowDescription of text columns that come from no table.
fn row_description(columns: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(columns.len() as i16);
    for c in columns {
        cstr(&mut b, c);
        b.put_i32(0); // table oid
        b.put_i16(0); // column number
        b.put_i32(25); // text
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0);
    }
    frame(b'T', &b)
}

fn data_row(values: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(values.len() as i16);
    for v in values {
        b.put_i32(v.len() as i32);
        b.put_slice(v.as_bytes());
    }
    frame(b'D', &b)
}

fn complete(tag: &str) -> Bytes {
    let mut b = BytesMut::new();
    cstr(&mut b, tag);
    frame(b'C', &b)
}

fn ready() -> Bytes {
    message::ready_for_query(b'I')
}

fn parse_complete() -> Bytes {
    frame(b'1', &[])
}

fn bind_complete() -> Bytes {
    frame(b'2', &[])
}

/// What PostgreSQL answers to the relay's stand-in for a refused statement.
fn syntax_error_at(word: &str) -> Bytes {
    let mut b = BytesMut::new();
    for (k, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', "42601"),
        (b'M', &format!("syntax error at or near \"{word}\"")),
        (b'P', "1"),
    ] {
        b.put_u8(k);
        cstr(&mut b, v);
    }
    b.put_u8(0);
    frame(b'E', &b)
}

fn cat(parts: &[Bytes]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// One message read off a pipe: its tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

impl Msg {
    fn raw(&self) -> Vec<u8> {
        frame(self.tag, &self.body).to_vec()
    }

    /// The `M` and `C` fields of an ErrorResponse.
    fn error(&self) -> (String, String) {
        assert_eq!(self.tag, b'E', "not an error: {self:?}");
        let (code, msg) = message::error_code_and_message(&self.body).expect("error fields");
        (code, msg)
    }
}

async fn read_msg(pipe: &mut DuplexStream) -> Msg {
    let read = async {
        let tag = pipe.read_u8().await.expect("tag");
        let len = pipe.read_i32().await.expect("length");
        let mut body = vec![0u8; (len - 4) as usize];
        pipe.read_exact(&mut body).await.expect("body");
        Msg { tag, body }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("a message within 10 s")
}

/// Messages up to and including the first with tag `last`.
async fn read_until(pipe: &mut DuplexStream, last: u8) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        let m = read_msg(pipe).await;
        let done = m.tag == last;
        out.push(m);
        if done {
            return out;
        }
    }
}

fn raw(msgs: &[Msg]) -> Vec<u8> {
    msgs.iter().flat_map(Msg::raw).collect()
}

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

// ------------------------------------------------------------------ harness

/// A relay between a test client and a test PostgreSQL, with a real policy set and a real
/// audit trail in a temporary directory.
struct Session {
    client: DuplexStream,
    server: DuplexStream,
    audit: AuditLog,
    relay: tokio::task::JoinHandle<Result<End, RelayError>>,
    _dir: tempfile::TempDir,
}

fn alice() -> Identity {
    Identity {
        subject: "alice".into(),
        display_name: "alice".into(),
        groups: Vec::new(),
        proof: Proof::ScramSha256,
        process: None,
    }
}

/// A gate for alice under the test policy, with its audit trail.
fn gate() -> (Gate, Recorder, AuditLog, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("policy dir");
    std::fs::write(policies.join("relay.toml"), POLICY).expect("policy");
    let policy = PolicyHandle::new(PolicySet::load_dir(&policies).expect("policies"));
    let audit_cfg: AuditConfig = toml::from_str(&format!(
        "dir = {:?}\ndurability = \"write\"",
        dir.path().join("audit")
    ))
    .expect("audit config");
    let audit = AuditLog::open(&audit_cfg).expect("audit trail");
    let facts = Arc::new(SessionFacts {
        session_id: audit.new_session_id(),
        identity: alice(),
        database: "app".into(),
        upstream_role: "app".into(),
        policy: "relay".into(),
        activity: Arc::new(Activity::default()),
    });
    let gate = Gate::new(facts.clone(), policy, audit.clone(), None);
    let recorder = Recorder::new(facts, audit.clone());
    (gate, recorder, audit, dir)
}

/// What the session is configured with besides the policy.
#[derive(Default)]
struct Options<'a> {
    /// `[mask]` rules (column rules make the relay rewrite statements).
    mask: Option<&'a str>,
    /// The policy's `max_rows`, with a flag raised when the relay asks to cancel.
    max_rows: Option<(u64, Arc<AtomicBool>)>,
    /// ParameterStatus values the session starts with.
    params: &'a [(&'a str, &'a str)],
}

fn start(mask: Option<&str>) -> Session {
    start_with(Options {
        mask,
        ..Options::default()
    })
}

fn start_with(options: Options<'_>) -> Session {
    let (gate, recorder, audit, dir) = gate();
    let params: Vec<(String, String)> = options
        .params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut shared = Shared::new(&params);
    if let Some(mask) = options.mask {
        let section: toml::Value = toml::from_str(mask).expect("mask toml");
        let rules = MaskRules::from_toml(&[section], None).expect("mask rules");
        // Never connected: the statements these tests mask name no relation to look up.
        let upstream: UpstreamConfig =
            toml::from_str("host = \"/nonexistent\"").expect("upstream config");
        let login = SideLogin {
            upstream: Arc::new(UpstreamTarget::new(&upstream, None, 1 << 20, None)),
            role: "app".into(),
            password: None,
            database: "app".into(),
        };
        shared = shared.with_mask(SessionMask::new(rules, login));
    }
    if let Some((max_rows, cancelled)) = options.max_rows {
        shared = shared.with_row_limit(Some(RowLimit {
            max_rows,
            policy: "relay".into(),
            cancel: Box::new(move || cancelled.store(true, Ordering::SeqCst)),
        }));
    }
    let (client, client_side) = tokio::io::duplex(1 << 16);
    let (server, server_side) = tokio::io::duplex(1 << 16);
    let relay = tokio::spawn(async move {
        let mut gate = gate;
        let (client_rd, client_wr) = tokio::io::split(client_side);
        let (up_rd, up_wr) = tokio::io::split(server_side);
        relay::run(
            Box::new(client_rd),
            Box::new(client_wr),
            FrameReader::new(1 << 20),
            Box::new(up_rd),
            Box::new(up_wr),
            FrameReader::new(1 << 20),
            &mut gate,
            &recorder,
            &shared,
            &CancelSignal::default(),
            std::future::pending(),
        )
        .await
    });
    Session {
        client,
        server,
        audit,
        relay,
        _dir: dir,
    }
}

impl Session {
    async fn send(&mut self, parts: &[Bytes]) {
        self.client
            .write_all(&cat(parts))
            .await
            .expect("client write");
    }

    async fn answer(&mut self, parts: &[Bytes]) {
        self.server
            .write_all(&cat(parts))
            .await
            .expect("server write");
    }

    /// Ends the session as a client does, and returns the audit trail's statement records
    /// with their outcomes, in order.
    async fn finish(mut self) -> Vec<(StatementRecord, Option<StatementOutcome>)> {
        self.send(&[terminate()]).await;
        let x = read_msg(&mut self.server).await;
        assert_eq!(x.tag, b'X', "Terminate is forwarded");
        let end = self.relay.await.expect("relay task").expect("relay");
        assert_eq!(end, End::ClientTerminated);
        self.audit.sync().await.expect("audit sync");
        self.audit.sync_index().await.expect("audit index");
        let records = self
            .audit
            .store()
            .records_after(None, 10_000)
            .expect("records");
        let mut out: Vec<(
            crate::audit::RecordId,
            StatementRecord,
            Option<StatementOutcome>,
        )> = Vec::new();
        for (_, r) in records {
            match r.event {
                AuditEvent::Statement(s) => out.push((r.seq, s, None)),
                AuditEvent::Outcome(o) => {
                    if let Some(e) = out.iter_mut().find(|e| e.0 == o.statement) {
                        e.2 = Some(o);
                    }
                }
                _ => {}
            }
        }
        out.into_iter().map(|(_, s, o)| (s, o)).collect()
    }
}

/// The stand-in the relay sent PostgreSQL for a refused statement.
fn nonce_of(sql: &str) -> &str {
    assert!(
        sql.starts_with("interceptor_refused_"),
        "not a refusal stand-in: {sql}"
    );
    sql
}

fn query_text(m: &Msg) -> String {
    assert_eq!(m.tag, b'Q');
    message::decode_query(&m.body).expect("query").to_owned()
}

fn parse_text(m: &Msg) -> String {
    assert_eq!(m.tag, b'P');
    message::decode_parse(&m.body)
        .expect("parse")
        .sql
        .to_owned()
}

// -------------------------------------------------------------------- tests

/// psql: one simple Query, answered with a row; everything passes through unchanged and the
/// statement is recorded with its outcome.
#[tokio::test]
async fn psql_simple_query_is_forwarded_verbatim_and_recorded() {
    let mut s = start(None);
    let q = message::query("SELECT 1 AS one;");
    s.send(std::slice::from_ref(&q)).await;
    let up = read_until(&mut s.server, b'Q').await;
    assert_eq!(raw(&up), q.to_vec(), "upstream gets the client's bytes");

    let answer = [
        row_description(&["one"]),
        data_row(&["1"]),
        complete("SELECT 1"),
        ready(),
    ];
    s.answer(&answer).await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(
        raw(&down),
        cat(&answer),
        "the client gets PostgreSQL's bytes"
    );

    let records = s.finish().await;
    assert_eq!(records.len(), 1, "{records:?}");
    let (st, outcome) = &records[0];
    assert_eq!(st.sql, "SELECT 1 AS one;");
    assert_eq!(st.protocol, QueryProtocol::Simple);
    assert_eq!(st.decision, "allow");
    let outcome = outcome.as_ref().expect("outcome recorded");
    assert_eq!(outcome.command_tags, vec!["SELECT 1".to_owned()]);
    assert_eq!(outcome.sqlstate, None);
}

/// psql: a refused statement never reaches PostgreSQL; the stand-in's syntax error becomes
/// interceptor's refusal, and the session goes on.
#[tokio::test]
async fn psql_refused_query_is_replaced_and_its_error_swapped() {
    let mut s = start(None);
    s.send(&[message::query("DROP TABLE accounts")]).await;
    let up = read_until(&mut s.server, b'Q').await;
    assert_eq!(up.len(), 1);
    let stand_in = query_text(&up[0]);
    let nonce = nonce_of(&stand_in);
    assert!(!stand_in.contains("DROP"), "{stand_in}");

    s.answer(&[syntax_error_at(nonce), ready()]).await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "EZ");
    let (code, msg) = down[0].error();
    assert_eq!(code, "42501");
    assert!(msg.contains("no drops here"), "{msg}");
    assert!(!msg.contains("interceptor_refused_"), "{msg}");

    // The next statement is served as usual.
    let q = message::query("SELECT 2");
    s.send(std::slice::from_ref(&q)).await;
    assert_eq!(raw(&read_until(&mut s.server, b'Q').await), q.to_vec());
    let answer = [
        row_description(&["?column?"]),
        data_row(&["2"]),
        complete("SELECT 1"),
        ready(),
    ];
    s.answer(&answer).await;
    assert_eq!(raw(&read_until(&mut s.client, b'Z').await), cat(&answer));

    let records = s.finish().await;
    let decisions: Vec<(&str, &str)> = records
        .iter()
        .map(|(r, _)| (r.sql.as_str(), r.decision.as_str()))
        .collect();
    assert_eq!(
        decisions,
        [("DROP TABLE accounts", "deny"), ("SELECT 2", "allow")]
    );
    assert_eq!(records[0].0.rule.as_deref(), Some("no-drops"));
}

/// pgbench -M prepared: Parse/Bind/Describe/Execute/Sync of a named statement, then
/// Bind/Execute/Sync reusing it; all forwarded verbatim, each Execute recorded.
#[tokio::test]
async fn pgbench_prepared_statements_are_forwarded_and_each_execute_recorded() {
    let mut s = start(None);
    let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    let first = [
        parse("P0_1", sql),
        bind("", "P0_1", &["17"]),
        describe(b'P', ""),
        execute(""),
        sync(),
    ];
    s.send(&first).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&first));
    let answer = [
        parse_complete(),
        bind_complete(),
        row_description(&["abalance"]),
        data_row(&["0"]),
        complete("SELECT 1"),
        ready(),
    ];
    s.answer(&answer).await;
    assert_eq!(raw(&read_until(&mut s.client, b'Z').await), cat(&answer));

    let again = [bind("", "P0_1", &["42"]), execute(""), sync()];
    s.send(&again).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&again));
    let answer = [
        bind_complete(),
        data_row(&["-5"]),
        complete("SELECT 1"),
        ready(),
    ];
    s.answer(&answer).await;
    assert_eq!(raw(&read_until(&mut s.client, b'Z').await), cat(&answer));

    let records = s.finish().await;
    assert_eq!(records.len(), 2, "one record per Execute: {records:?}");
    for ((r, o), param) in records.iter().zip(["17", "42"]) {
        assert_eq!(r.sql, sql);
        assert_eq!(r.protocol, QueryProtocol::Extended);
        assert_eq!(r.parameters, vec![Some(param.to_owned())]);
        assert_eq!(r.decision, "allow");
        let o = o.as_ref().expect("outcome");
        assert_eq!(o.command_tags, vec!["SELECT 1".to_owned()]);
    }
}

/// tokio-postgres: prepare (Parse/Describe/Sync), then several Bind/Execute/Sync groups sent
/// without waiting for answers (pipelining); answers map back to their statements in order.
#[tokio::test]
async fn tokio_postgres_pipeline_keeps_answers_in_order() {
    let mut s = start(None);
    let prepare = [
        parse("s0", "SELECT $1::int4 + 1"),
        describe(b'S', "s0"),
        sync(),
    ];
    s.send(&prepare).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&prepare));
    let mut pd = BytesMut::new();
    pd.put_i16(1);
    pd.put_u32(23);
    let answer = [
        parse_complete(),
        frame(b't', &pd),
        row_description(&["?column?"]),
        ready(),
    ];
    s.answer(&answer).await;
    assert_eq!(raw(&read_until(&mut s.client, b'Z').await), cat(&answer));

    let mut pipelined = Vec::new();
    for n in ["1", "2", "3"] {
        pipelined.extend([bind("", "s0", &[n]), execute(""), sync()]);
    }
    s.send(&pipelined).await;
    let mut up = Vec::new();
    for _ in 0..3 {
        up.extend(read_until(&mut s.server, b'S').await);
    }
    assert_eq!(raw(&up), cat(&pipelined));
    let mut answers = Vec::new();
    for n in ["2", "3", "4"] {
        answers.extend([
            bind_complete(),
            data_row(&[n]),
            complete("SELECT 1"),
            ready(),
        ]);
    }
    s.answer(&answers).await;
    let mut down = Vec::new();
    for _ in 0..3 {
        down.extend(read_until(&mut s.client, b'Z').await);
    }
    assert_eq!(raw(&down), cat(&answers));

    let records = s.finish().await;
    let params: Vec<_> = records.iter().map(|(r, _)| r.parameters.clone()).collect();
    assert_eq!(
        params,
        [
            vec![Some("1".to_owned())],
            vec![Some("2".to_owned())],
            vec![Some("3".to_owned())]
        ]
    );
    assert!(
        records
            .iter()
            .all(|(_, o)| o.as_ref().is_some_and(|o| o.sqlstate.is_none()))
    );
}

/// A JDBC-style batch: three statements in one pipeline ending in one Sync, the middle one
/// refused. The refused Parse is replaced in place; PostgreSQL fails it, skips the rest up to
/// Sync as it does after any error, and the client sees interceptor's refusal where that
/// statement's answer belongs.
#[tokio::test]
async fn jdbc_pipeline_with_a_refused_statement_in_the_middle() {
    let mut s = start(None);
    let first = [
        parse("", "INSERT INTO audit_log(note) VALUES ($1)"),
        bind("", "", &["a"]),
        describe(b'P', ""),
        execute(""),
    ];
    let refused = parse("", "DROP TABLE audit_log");
    let after_refused = [bind("", "", &[]), describe(b'P', ""), execute("")];
    let last = [
        parse("", "SELECT count(*) FROM audit_log"),
        bind("", "", &[]),
        describe(b'P', ""),
        execute(""),
        sync(),
    ];
    let mut batch = first.to_vec();
    batch.push(refused.clone());
    batch.extend(after_refused.iter().cloned());
    batch.extend(last.iter().cloned());
    s.send(&batch).await;

    let up = read_until(&mut s.server, b'S').await;
    // Forwarded: the first statement as sent, a stand-in Parse in place of the refused one,
    // then everything after it as sent (PostgreSQL skips it after the stand-in's error).
    // The Execute of the portal bound to the refused statement is refused too (PostgreSQL
    // skips both stand-ins after the first one's error).
    assert_eq!(tags(&up), "PBDEPBDPPBDES");
    assert_eq!(raw(&up[..4]), cat(&first));
    let stand_in = parse_text(&up[4]);
    let nonce = nonce_of(&stand_in).to_owned();
    assert_ne!(up[4].raw(), refused.to_vec());
    assert_eq!(raw(&up[5..7]), cat(&after_refused[..2]));
    nonce_of(&parse_text(&up[7]));
    assert_eq!(raw(&up[8..]), cat(&last));

    let answer = [
        parse_complete(),
        bind_complete(),
        frame(b'n', &[]),
        complete("INSERT 0 1"),
        syntax_error_at(&nonce),
        ready(),
    ];
    s.answer(&answer).await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "12nCEZ");
    assert_eq!(raw(&down[..4]), cat(&answer[..4]));
    let (code, msg) = down[4].error();
    assert_eq!(code, "42501");
    assert!(msg.contains("no drops here"), "{msg}");

    let records = s.finish().await;
    let seen: Vec<(&str, &str)> = records
        .iter()
        .map(|(r, _)| (r.sql.as_str(), r.decision.as_str()))
        .collect();
    // The refused Parse is evidence; the INSERT ran; the SELECT after the error was skipped.
    assert!(seen.contains(&("DROP TABLE audit_log", "deny")), "{seen:?}");
    let insert = records
        .iter()
        .find(|(r, _)| r.sql.starts_with("INSERT"))
        .expect("insert recorded");
    assert_eq!(
        insert.1.as_ref().map(|o| o.command_tags.clone()),
        Some(vec!["INSERT 0 1".to_owned()])
    );
    let select = records
        .iter()
        .find(|(r, _)| r.sql.starts_with("SELECT count"))
        .expect("the Execute after the refusal is decided and recorded");
    assert!(
        select.1.as_ref().is_some_and(|o| o.skipped),
        "PostgreSQL skipped it: {select:?}"
    );
}

/// PostgreSQL's parser runs once per statement text through classification and the masking
/// rewrite: the rewrite reuses the gate's tree, the classification cache keeps the tree of
/// the text it parsed, so a repeated statement is not parsed again, and a statement that
/// only shares the shape (other numbers) is parsed once, by the rewrite.
#[tokio::test]
async fn each_statement_is_parsed_once_through_classify_and_mask() {
    let mut s = start(Some(MASK));
    for (sql, expected) in [
        // Classified (one parse), the rewrite reuses the tree.
        ("SELECT 1 AS n", 1),
        // The same text again: the cache has its classification and its tree.
        ("SELECT 1 AS n", 0),
        // The same shape: the classification is cached, the tree is of another text.
        ("SELECT 2 AS n", 1),
        ("SELECT 1 AS n", 0),
    ] {
        let before = interceptor_sql::pgparse::parses();
        let (converted, scanned) = crate::mask::conversions_and_scans();
        let q = message::query(sql);
        s.send(std::slice::from_ref(&q)).await;
        let up = read_until(&mut s.server, b'Q').await;
        assert_eq!(raw(&up), q.to_vec(), "nothing to rewrite in {sql}");
        let parses = interceptor_sql::pgparse::parses() - before;
        assert_eq!(parses, expected, "`{sql}` parsed {parses} times");
        // The rewrite converts the tree once (for its catalog needs and its walk) and scans
        // the text only to edit it.
        let (c, sc) = crate::mask::conversions_and_scans();
        assert_eq!(
            (c - converted, sc - scanned),
            (1, 0),
            "`{sql}`: tree conversions and scans"
        );
        let answer = [
            row_description(&["n"]),
            data_row(&["1"]),
            complete("SELECT 1"),
            ready(),
        ];
        let decoded = crate::mask::row_descriptions_decoded();
        s.answer(&answer).await;
        read_until(&mut s.client, b'Z').await;
        // The relay task runs on this (current-thread) runtime: its decodes count here.
        assert_eq!(
            crate::mask::row_descriptions_decoded() - decoded,
            1,
            "the RowDescription is decoded once for origins, plan and recording"
        );
    }
    // Extended protocol: the Parse is classified and rewritten with one parse as well.
    let before = interceptor_sql::pgparse::parses();
    let batch = [
        parse("", "SELECT 'x' AS label"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ];
    s.send(&batch).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&batch));
    // Execute decides again from the cache, without parsing.
    assert_eq!(interceptor_sql::pgparse::parses() - before, 1);
    s.answer(&[
        parse_complete(),
        bind_complete(),
        data_row(&["x"]),
        complete("SELECT 1"),
        ready(),
    ])
    .await;
    read_until(&mut s.client, b'Z').await;
    s.finish().await;
}

/// A statement past the policy's `max_rows`: the rows beyond it are withheld from the client,
/// PostgreSQL is asked to cancel, and the statement ends with interceptor's error in place of
/// PostgreSQL's cancel error.
#[tokio::test]
async fn rows_past_max_rows_are_withheld_and_the_statement_cut() {
    let cancelled = Arc::new(AtomicBool::new(false));
    let mut s = start_with(Options {
        max_rows: Some((2, cancelled.clone())),
        ..Options::default()
    });
    let q = message::query("SELECT g FROM generate_series(1, 1000000) g");
    s.send(std::slice::from_ref(&q)).await;
    assert_eq!(raw(&read_until(&mut s.server, b'Q').await), q.to_vec());
    let mut canceled = BytesMut::new();
    for (k, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', "57014"),
        (b'M', "canceling statement due to user request"),
    ] {
        canceled.put_u8(k);
        cstr(&mut canceled, v);
    }
    canceled.put_u8(0);
    let answer = [
        row_description(&["g"]),
        data_row(&["1"]),
        data_row(&["2"]),
        data_row(&["3"]),
        data_row(&["4"]),
        frame(b'E', &canceled),
        ready(),
    ];
    s.answer(&answer).await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "TDDEZ", "rows 3 and 4 withheld");
    assert_eq!(raw(&down[..3]), cat(&answer[..3]));
    let (code, msg) = down[3].error();
    assert_eq!(code, "54000");
    assert!(msg.contains("more than 2 rows"), "{msg}");
    assert!(
        cancelled.load(Ordering::SeqCst),
        "PostgreSQL was asked to stop"
    );

    let records = s.finish().await;
    let outcome = records[0].1.as_ref().expect("outcome");
    assert_eq!(outcome.sqlstate.as_deref(), Some("54000"));
}

/// A client whose encoding is not UTF8 cannot be inspected: its statements are refused in
/// place, and PostgreSQL never sees them.
#[tokio::test]
async fn statements_in_another_client_encoding_are_refused() {
    let mut s = start_with(Options {
        params: &[("client_encoding", "LATIN1")],
        ..Options::default()
    });
    s.send(&[message::query("SELECT 1")]).await;
    let up = read_until(&mut s.server, b'Q').await;
    let stand_in = query_text(&up[0]);
    s.answer(&[syntax_error_at(nonce_of(&stand_in)), ready()])
        .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "EZ");
    assert_eq!(down[0].error().0, "0A000");
    s.finish().await;
}

// --------------------------------------------------------------- the gate alone

const UTF8_ON: LexState = LexState {
    standard_conforming_strings: true,
    client_encoding_utf8: true,
};

fn refused(v: Verdict) -> interceptor_wire::message::PgError {
    match v {
        Verdict::Refuse(e) => e,
        Verdict::Forward { .. } => panic!("forwarded, expected a refusal"),
        Verdict::Hold(h) => panic!("held ({h:?}), expected a refusal"),
    }
}

fn forwarded(v: Verdict) -> (bool, bool) {
    match v {
        Verdict::Forward { record, tree } => (record.is_some(), tree.is_some()),
        Verdict::Refuse(e) => panic!("refused: {}", e.message),
        Verdict::Hold(h) => panic!("held ({h:?})"),
    }
}

/// Allowed statements are recorded and carry the parse the decision was made on when the
/// text was parsed for it; a cached shape carries none.
#[tokio::test]
async fn gate_forwards_with_a_record_and_the_tree_of_a_fresh_parse() {
    let (mut gate, _recorder, _audit, _dir) = gate();
    assert_eq!(
        forwarded(gate.query("SELECT 10", UTF8_ON).await),
        (true, true)
    );
    assert_eq!(
        forwarded(gate.query("SELECT 11", UTF8_ON).await),
        (true, false),
        "same shape: classified from the cache, no tree"
    );
    gate.flush().await.expect("flush");
}

/// Refusals: by rule (with the rule named), at Parse (recorded as evidence), after the session
/// was asked to end, and for a portal the gate never allowed (PostgreSQL answers that one).
#[tokio::test]
async fn gate_refuses_by_rule_at_parse_and_when_stopping() {
    let (mut gate, _recorder, audit, _dir) = gate();
    let e = refused(gate.query("DROP TABLE t", UTF8_ON).await);
    assert_eq!(e.code, "42501");
    assert!(
        e.detail.as_deref().is_some_and(|d| d.contains("no-drops")),
        "{e:?}"
    );

    let e = refused(gate.parse("DROP TABLE t", UTF8_ON).await);
    assert_eq!(e.code, "42501");
    // A Bind/Execute of the refused statement is not the gate's to run: PostgreSQL fails it.
    assert_eq!(
        forwarded(gate.execute("nope", UTF8_ON).await),
        (false, false)
    );

    gate.facts().activity.stopping.store(true, Ordering::SeqCst);
    let e = refused(gate.query("SELECT 1", UTF8_ON).await);
    assert_eq!(e.code, "57P01");

    gate.flush().await.expect("flush");
    audit.sync_index().await.expect("index");
    let denied: Vec<(QueryProtocol, String)> = audit
        .store()
        .records_after(None, 100)
        .expect("records")
        .into_iter()
        .filter_map(|(_, r)| match r.event {
            AuditEvent::Statement(s) if s.decision == "deny" => Some((s.protocol, s.sql)),
            _ => None,
        })
        .collect();
    assert_eq!(
        denied,
        [
            (QueryProtocol::Simple, "DROP TABLE t".to_owned()),
            (QueryProtocol::Extended, "DROP TABLE t".to_owned())
        ]
    );
}

/// PostgreSQL gone between two messages of a result, without a FATAL of its own (a backend
/// ended while sending cannot send one): the client hears 08006, never a bare EOF.
#[tokio::test]
async fn upstream_closing_mid_result_without_a_word_ends_the_client_with_a_fatal() {
    let mut s = start(None);
    s.send(&[message::query("SELECT n FROM big")]).await;
    read_until(&mut s.server, b'Q').await;
    s.answer(&[row_description(&["n"]), data_row(&["1"])]).await;
    drop(s.server);
    let down = read_until(&mut s.client, b'E').await;
    assert_eq!(tags(&down), "TDE");
    let last = down.last().expect("error");
    assert_eq!(last.error().0, "08006");
    let fields = message::decode_error_fields(&last.body).expect("fields");
    assert!(fields.contains(&(b'S', "FATAL".to_owned())), "{fields:?}");
    assert_eq!(
        s.relay.await.expect("relay task").expect("relay"),
        End::UpstreamGone
    );
}

/// When PostgreSQL said FATAL itself before closing, that is the client's last word: no
/// second FATAL from interceptor.
#[tokio::test]
async fn upstream_fatal_before_closing_is_the_only_fatal() {
    let mut s = start(None);
    s.send(&[message::query("SELECT n FROM big")]).await;
    read_until(&mut s.server, b'Q').await;
    let mut shutdown = BytesMut::new();
    for (code, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "57P01"),
        (b'M', "terminating connection due to administrator command"),
    ] {
        shutdown.extend_from_slice(&[code]);
        cstr(&mut shutdown, value);
    }
    shutdown.extend_from_slice(&[0]);
    s.answer(&[
        row_description(&["n"]),
        data_row(&["1"]),
        frame(b'E', &shutdown),
    ])
    .await;
    drop(s.server);
    let down = read_until(&mut s.client, b'E').await;
    assert_eq!(down.last().expect("error").error().0, "57P01");
    assert_eq!(
        s.relay.await.expect("relay task").expect("relay"),
        End::UpstreamGone
    );
    let mut rest = Vec::new();
    s.client.read_to_end(&mut rest).await.expect("read to end");
    assert!(rest.is_empty(), "more after PostgreSQL's FATAL: {rest:?}");
}

fn parameter_description() -> Bytes {
    frame(b't', &0i16.to_be_bytes())
}

/// A Describe of a statement leaves its masking plan in the statement itself: the rows of a
/// later Execute of its portal, which come without a RowDescription, are masked by it. A
/// re-Parse of the name replaces the statement and its plan: rows of the new statement that
/// nobody described cannot be masked by column, so they are withheld rather than masked by
/// the old statement's plan.
#[tokio::test]
async fn a_statements_plan_lives_in_the_statement_and_goes_with_it() {
    let mut s = start(Some(MASK));
    let prepare = [
        parse("", "SELECT $1::text AS ssn"),
        describe(b'S', ""),
        sync(),
    ];
    s.send(&prepare).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&prepare));
    s.answer(&[
        parse_complete(),
        parameter_description(),
        row_description(&["ssn"]),
        ready(),
    ])
    .await;
    assert_eq!(tags(&read_until(&mut s.client, b'Z').await), "1tTZ");

    s.send(&[bind("", "", &[]), execute(""), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[
        bind_complete(),
        data_row(&["123-45-6789"]),
        complete("SELECT 1"),
        ready(),
    ])
    .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "2DCZ");
    let row = String::from_utf8_lossy(&down[1].body).into_owned();
    assert!(
        !row.contains("123-45-6789"),
        "masked by the described plan: {row}"
    );

    // The unnamed statement is parsed anew, not described: its rows have no plan.
    let again = [
        parse("", "SELECT $1::text AS ssn"),
        bind("", "", &[]),
        execute(""),
        sync(),
    ];
    s.send(&again).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&again));
    s.answer(&[
        parse_complete(),
        bind_complete(),
        data_row(&["123-45-6789"]),
        complete("SELECT 1"),
        ready(),
    ])
    .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "12EZ", "{down:?}");
    assert!(
        !down
            .iter()
            .any(|m| String::from_utf8_lossy(&m.body).contains("123-45-6789")),
        "{down:?}"
    );
    s.finish().await;
}

/// A refused Parse of a name PostgreSQL already has does not make the session forget it:
/// PostgreSQL keeps the statement (its own Parse of the name would fail as well), so the
/// next Execute of it must still be decided and recorded, not forwarded as unknown.
#[tokio::test]
async fn a_refused_reparse_of_a_name_keeps_the_statement_postgresql_has() {
    let mut s = start(None);
    s.send(&[parse("s1", "SELECT 1"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[parse_complete(), ready()]).await;
    read_until(&mut s.client, b'Z').await;

    s.send(&[parse("s1", "DROP TABLE t"), sync()]).await;
    let up = read_until(&mut s.server, b'S').await;
    let nonce = nonce_of(&parse_text(&up[0])).to_owned();
    s.answer(&[syntax_error_at(&nonce), ready()]).await;
    read_until(&mut s.client, b'Z').await;

    s.send(&[bind("p", "s1", &[]), execute("p"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[
        bind_complete(),
        data_row(&["1"]),
        complete("SELECT 1"),
        ready(),
    ])
    .await;
    read_until(&mut s.client, b'Z').await;
    let records = s.finish().await;
    let seen: Vec<(&str, &str)> = records
        .iter()
        .map(|(r, _)| (r.sql.as_str(), r.decision.as_str()))
        .collect();
    assert_eq!(
        seen,
        [("DROP TABLE t", "deny"), ("SELECT 1", "allow")],
        "the Execute of s1 is decided and recorded"
    );
}

/// Portals end with their transaction: after an idle ReadyForQuery the session forgets the
/// portals bound before it (an Execute of one is PostgreSQL's to refuse, and is not decided
/// on a statement PostgreSQL no longer has); inside a transaction block they stay.
#[tokio::test]
async fn portals_end_with_the_transaction_they_were_bound_in() {
    let mut s = start(None);
    s.send(&[parse("s1", "SELECT 1"), bind("p", "s1", &[]), sync()])
        .await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[
        parse_complete(),
        bind_complete(),
        message::ready_for_query(b'T'),
    ])
    .await;
    read_until(&mut s.client, b'Z').await;
    // Still in the transaction: the portal is there.
    s.send(&[execute("p"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[data_row(&["1"]), complete("SELECT 1"), ready()])
        .await;
    read_until(&mut s.client, b'Z').await;
    // That ReadyForQuery was idle: the portal is gone.
    s.send(&[execute("p"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[syntax_error_at("p"), ready()]).await;
    read_until(&mut s.client, b'Z').await;
    let records = s.finish().await;
    assert_eq!(
        records.len(),
        1,
        "only the Execute inside the transaction is decided: {records:?}"
    );
}

fn error_response(code: &str, message: &str) -> Bytes {
    let mut b = BytesMut::new();
    for (k, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
    ] {
        b.put_u8(k);
        cstr(&mut b, v);
    }
    b.put_u8(0);
    frame(b'E', &b)
}

/// The statements an Execute was decided on, in order.
fn decided(records: &[(StatementRecord, Option<StatementOutcome>)]) -> Vec<String> {
    records.iter().map(|(r, _)| r.sql.clone()).collect()
}

/// PostgreSQL refuses a Parse of a name it already has; the statement it keeps is the one
/// every later Execute of the name runs, so that is the one decided and recorded (not the
/// text of the refused Parse, which would let anything run under an allowed text).
#[tokio::test]
async fn a_parse_postgresql_refuses_leaves_the_statement_it_has() {
    let mut s = start(None);
    s.send(&[parse("s1", "DELETE FROM audit_log"), sync()])
        .await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[parse_complete(), ready()]).await;
    read_until(&mut s.client, b'Z').await;

    let dup = [parse("s1", "SELECT 1"), sync()];
    s.send(&dup).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&dup));
    s.answer(&[
        error_response("42P05", "prepared statement \"s1\" already exists"),
        ready(),
    ])
    .await;
    read_until(&mut s.client, b'Z').await;

    s.send(&[bind("p", "s1", &[]), execute("p"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[bind_complete(), complete("DELETE 3"), ready()])
        .await;
    read_until(&mut s.client, b'Z').await;
    let records = s.finish().await;
    assert_eq!(decided(&records), ["DELETE FROM audit_log"]);
}

/// After an error PostgreSQL skips the rest of the batch, a Parse of the unnamed statement
/// too, and keeps the unnamed statement it had: a Bind of it in the next batch binds that one.
#[tokio::test]
async fn a_skipped_parse_leaves_the_unnamed_statement_postgresql_has() {
    let mut s = start(None);
    s.send(&[parse("", "DELETE FROM audit_log"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[parse_complete(), ready()]).await;
    read_until(&mut s.client, b'Z').await;

    s.send(&[execute("missing"), parse("", "SELECT 1"), sync()])
        .await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[
        error_response("34000", "portal \"missing\" does not exist"),
        ready(),
    ])
    .await;
    read_until(&mut s.client, b'Z').await;

    s.send(&[bind("", "", &[]), execute(""), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[bind_complete(), complete("DELETE 3"), ready()])
        .await;
    read_until(&mut s.client, b'Z').await;
    let records = s.finish().await;
    assert_eq!(decided(&records), ["DELETE FROM audit_log"]);
}

/// Pipelined across a Sync (libpq's pipeline mode): a Bind of a statement whose Parse is not
/// answered yet waits for the answer, with everything before it already sent, and then binds
/// what PostgreSQL has.
#[tokio::test]
async fn a_bind_after_an_unanswered_parse_waits_for_its_answer() {
    let mut s = start(None);
    let first = [parse("s2", "SELECT 2"), sync()];
    let then = [bind("p", "s2", &[]), execute("p"), sync()];
    s.send(&[first.as_slice(), then.as_slice()].concat()).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&first));
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        read_msg(&mut s.server),
    );
    assert!(
        early.await.is_err(),
        "the Bind waits for the Parse's answer"
    );
    s.answer(&[parse_complete(), ready()]).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&then));
    s.answer(&[
        bind_complete(),
        data_row(&["2"]),
        complete("SELECT 1"),
        ready(),
    ])
    .await;
    read_until(&mut s.client, b'Z').await;
    read_until(&mut s.client, b'Z').await;
    let records = s.finish().await;
    assert_eq!(decided(&records), ["SELECT 2"]);
}

/// A portal bound to a statement the session never saw prepared (a name PREPAREd in SQL)
/// cannot be decided: its Execute is refused, not forwarded as unknown.
#[tokio::test]
async fn an_execute_of_a_portal_of_an_unknown_statement_is_refused() {
    let mut s = start(None);
    s.send(&[bind("p", "made_by_sql_prepare", &[]), execute("p"), sync()])
        .await;
    let up = read_until(&mut s.server, b'S').await;
    assert_eq!(tags(&up), "BPS");
    let nonce = nonce_of(&parse_text(&up[1])).to_owned();
    s.answer(&[bind_complete(), syntax_error_at(&nonce), ready()])
        .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "2EZ");
    let (code, msg) = down[1].error();
    assert_eq!(code, "42501");
    assert!(msg.contains("did not see prepared"), "{msg}");
    s.finish().await;
}

/// Under column rules with standard_conforming_strings off, a statement with a backslash is
/// refused (read with the other setting a string could hide a column from the rewrite); one
/// without reads the same either way and goes as it is.
#[tokio::test]
async fn backslashes_without_standard_strings_are_refused_under_column_rules() {
    let mut s = start_with(Options {
        mask: Some(MASK),
        params: &[("standard_conforming_strings", "off")],
        ..Options::default()
    });
    s.send(&[message::query(r"SELECT 'it\'s' AS n")]).await;
    let up = read_until(&mut s.server, b'Q').await;
    let stand_in = query_text(&up[0]);
    s.answer(&[syntax_error_at(nonce_of(&stand_in)), ready()])
        .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "EZ");
    let (code, msg) = down[0].error();
    assert_eq!(code, "0A000");
    assert!(msg.contains("standard_conforming_strings"), "{msg}");

    let plain = message::query("SELECT 'its' AS n");
    s.send(std::slice::from_ref(&plain)).await;
    assert_eq!(raw(&read_until(&mut s.server, b'Q').await), plain.to_vec());
    s.answer(&[
        row_description(&["n"]),
        data_row(&["its"]),
        complete("SELECT 1"),
        ready(),
    ])
    .await;
    assert_eq!(tags(&read_until(&mut s.client, b'Z').await), "TDCZ");
    s.finish().await;
}

/// DEALLOCATE drops protocol-level statements too (one namespace): a name PREPAREd in SQL
/// afterwards is not the statement the session saw parsed, so an Execute of a portal bound to
/// it is refused rather than decided on the old text.
#[tokio::test]
async fn a_deallocated_statement_is_not_decided_on_its_old_text() {
    let mut s = start(None);
    s.send(&[parse("s1", "SELECT 1"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[parse_complete(), ready()]).await;
    read_until(&mut s.client, b'Z').await;

    for sql in ["DEALLOCATE s1", "PREPARE s1 AS SELECT 2"] {
        s.send(&[message::query(sql)]).await;
        read_until(&mut s.server, b'Q').await;
        s.answer(&[complete(sql.split(' ').next().unwrap_or("")), ready()])
            .await;
        read_until(&mut s.client, b'Z').await;
    }

    s.send(&[bind("p", "s1", &[]), execute("p"), sync()]).await;
    let up = read_until(&mut s.server, b'S').await;
    assert_eq!(tags(&up), "BPS", "the Execute is replaced by a refusal");
    let nonce = nonce_of(&parse_text(&up[1])).to_owned();
    s.answer(&[bind_complete(), syntax_error_at(&nonce), ready()])
        .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(down[1].error().0, "42501");
    s.finish().await;
}

/// The RowDescription that answers a Describe of one portal masks the rows of that portal
/// only: an Execute of another portal right after it, whose rows come without a description,
/// is not masked by the described portal's plan (which would leave its masked column, at
/// another position, in the clear); with column rules those rows are withheld instead.
#[tokio::test]
async fn a_portals_description_masks_its_own_rows_only() {
    let mut s = start(Some(MASK));
    let prepare = [
        parse("sa", "SELECT 1 AS note, 2 AS ssn"),
        parse("sb", "SELECT 3 AS ssn, 4 AS note"),
        bind("a", "sa", &[]),
        bind("b", "sb", &[]),
        sync(),
    ];
    s.send(&prepare).await;
    assert_eq!(raw(&read_until(&mut s.server, b'S').await), cat(&prepare));
    s.answer(&[
        parse_complete(),
        parse_complete(),
        bind_complete(),
        bind_complete(),
        message::ready_for_query(b'T'),
    ])
    .await;
    read_until(&mut s.client, b'Z').await;

    // Describe a, Execute b: b's rows are not a's.
    s.send(&[describe(b'P', "a"), execute("b"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[
        row_description(&["note", "ssn"]),
        data_row(&["123-45-6789", "n"]),
        complete("SELECT 1"),
        message::ready_for_query(b'T'),
    ])
    .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "TEZ", "{down:?}");
    assert_eq!(down[1].error().0, "XX000");
    assert!(
        !down
            .iter()
            .any(|m| String::from_utf8_lossy(&m.body).contains("123-45-6789")),
        "{down:?}"
    );

    // Describe a, Execute a: a's rows are masked by a's description.
    s.send(&[describe(b'P', "a"), execute("a"), sync()]).await;
    read_until(&mut s.server, b'S').await;
    s.answer(&[
        row_description(&["note", "ssn"]),
        data_row(&["n", "123-45-6789"]),
        complete("SELECT 1"),
        ready(),
    ])
    .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "TDCZ", "{down:?}");
    let row = String::from_utf8_lossy(&down[1].body).into_owned();
    assert!(!row.contains("123-45-6789") && row.contains('n'), "{row}");
    s.finish().await;
}

/// Masking and a refusal in one pipeline, read from the one queue: the rows of the statement
/// before the refusal are masked by its own description, the refusal's stand-in error becomes
/// interceptor's, and the statement after it, which PostgreSQL skips, is recorded as skipped.
#[tokio::test]
async fn a_masked_result_and_a_refusal_share_one_pipeline() {
    let mut s = start(Some(MASK));
    let batch = [
        parse("", "SELECT 'x' AS ssn"),
        bind("", "", &[]),
        describe(b'P', ""),
        execute(""),
        parse("", "DROP TABLE audit_log"),
        bind("", "", &[]),
        execute(""),
        parse("", "SELECT 'y' AS ssn"),
        bind("", "", &[]),
        describe(b'P', ""),
        execute(""),
        sync(),
    ];
    s.send(&batch).await;
    let up = read_until(&mut s.server, b'S').await;
    assert_eq!(tags(&up), "PBDEPBPPBDES");
    let nonce = nonce_of(&parse_text(&up[4])).to_owned();
    s.answer(&[
        parse_complete(),
        bind_complete(),
        row_description(&["ssn"]),
        data_row(&["123-45-6789"]),
        complete("SELECT 1"),
        syntax_error_at(&nonce),
        ready(),
    ])
    .await;
    let down = read_until(&mut s.client, b'Z').await;
    assert_eq!(tags(&down), "12TDCEZ", "{down:?}");
    let row = String::from_utf8_lossy(&down[3].body).into_owned();
    assert!(!row.contains("123-45-6789"), "masked: {row}");
    let (code, msg) = down[5].error();
    assert_eq!(code, "42501");
    assert!(msg.contains("no drops here"), "{msg}");

    let records = s.finish().await;
    let outcome = |sql: &str| {
        records
            .iter()
            .find(|(r, _)| r.sql == sql)
            .and_then(|(_, o)| o.clone())
            .unwrap_or_else(|| panic!("no outcome for {sql}: {records:?}"))
    };
    let first = outcome("SELECT 'x' AS ssn");
    assert_eq!(first.command_tags, ["SELECT 1"]);
    assert!(!first.skipped && first.sqlstate.is_none(), "{first:?}");
    assert!(
        outcome("SELECT 'y' AS ssn").skipped,
        "PostgreSQL skipped it"
    );
}
