//! Tests against a real sled store in a temp dir and real Ed25519 keys.

use std::path::{Path, PathBuf};

use super::chain::{self, ChainHash};
use super::export::{self, ExportRecord};
use super::query::{self, ExportFilter, ReplayEntry, SessionFilter};
use super::record::{Record, ResultRows};
use super::store::SessionSummary;
use super::verify::VerifyReport;
use super::verify::{VerifyMode, verify};
use super::*;
use crate::audit::config::AuditConfig;
use crate::identity::{Identity, ProcessIdentity, Proof};

fn config(dir: &Path, key: Option<PathBuf>) -> AuditConfig {
    AuditConfig {
        dir: dir.join("store"),
        signing_key: key,
        record_rows: 100,
        retention_days: 0,
        max_size_mib: 0,
        durability: crate::audit::config::Durability::Fsync,
        sync_interval_ms: 200,
        head_mark: None,
        accept_gap: false,
    }
}

/// A temp dir with a freshly generated key pair.
fn setup() -> (tempfile::TempDir, AuditConfig, ed25519_dalek::VerifyingKey) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key_path = tmp.path().join("audit.key");
    let generated = signing::generate_keypair(&key_path).expect("keygen");
    let public = signing::load_verifying_key(&generated.public_key).expect("public key");
    let cfg = config(tmp.path(), Some(key_path));
    (tmp, cfg, public)
}

fn identity(subject: &str) -> Identity {
    Identity {
        subject: subject.into(),
        display_name: format!("{subject} (test)"),
        groups: vec!["dev".into()],
        proof: Proof::ScramSha256,
        process: Some(ProcessIdentity {
            pid: 4242,
            uid: 1000,
            gid: 1000,
            comm: "psql".into(),
            exe: Some("/usr/bin/psql".into()),
            cgroup_id: 7,
            cgroup_path: Some("/user.slice".into()),
        }),
    }
}

fn start(session: SessionId, subject: &str, database: &str) -> AuditEvent {
    AuditEvent::SessionStart(SessionStart {
        session,
        identity: identity(subject),
        peer: Peer::Tcp {
            addr: "127.0.0.1:50000".into(),
        },
        tls: Some(TlsInfo {
            version: "TLSv1.3".into(),
            cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
            client_cert_sha256: None,
        }),
        database: database.into(),
        upstream_role: "app".into(),
        application_name: Some("psql".into()),
    })
}

fn statement(session: SessionId, sql: &str, decision: &str) -> AuditEvent {
    AuditEvent::Statement(StatementRecord {
        session,
        protocol: QueryProtocol::Simple,
        sql: sql.into(),
        parameters: vec![Some("42".into()), None],
        statement_kinds: vec!["select".into()],
        tables: vec!["public.users".into()],
        decision: decision.into(),
        rule: Some("read-only".into()),
        deny_sqlstate: (decision == "deny").then(|| "42501".into()),
        reason: None,
        approval: None,
    })
}

fn outcome(session: SessionId, stmt: RecordId) -> AuditEvent {
    AuditEvent::Outcome(StatementOutcome {
        session,
        statement: stmt,
        command_tags: vec!["SELECT 1".into()],
        rows: Some(1),
        skipped: false,
        sqlstate: None,
        error_message: None,
        duration_us: 1234,
        masking: MaskingSummary {
            columns: vec![MaskedColumn {
                column: "users.email".into(),
                rule: "hash".into(),
            }],
            values_masked: 1,
        },
        result: None,
    })
}

fn end(session: SessionId) -> AuditEvent {
    AuditEvent::SessionEnd(SessionEnd {
        session,
        bytes_from_client: 100,
        bytes_to_client: 2000,
        statements: 1,
        reason: "client_terminate".into(),
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Writes `sessions` complete sessions (start, statement, rows, outcome, end) durably.
fn populate(log: &AuditLog, sessions: usize) -> Vec<SessionId> {
    rt().block_on(async {
        let mut ids = Vec::new();
        for i in 0..sessions {
            let sid = log.new_session_id();
            ids.push(sid);
            log.append_durable(start(sid, &format!("user{}", i % 3), "shop"))
                .await
                .expect("start");
            let st = log
                .append_durable(statement(sid, &format!("SELECT {i} FROM users"), "allow"))
                .await
                .expect("statement");
            log.append(AuditEvent::ResultRows(ResultRows {
                session: sid,
                statement: st,
                columns: vec!["id".into(), "email".into()],
                rows: vec![vec![Some(i.to_string()), Some("h:ab12".into())]],
                truncated: false,
            }))
            .expect("rows");
            log.append(outcome(sid, st)).expect("outcome");
            log.append(end(sid)).expect("end");
        }
        log.sync_index().await.expect("sync");
        ids
    })
}

fn open_store(cfg: &AuditConfig) -> Store {
    Store::open(&cfg.dir).expect("store")
}

fn verify_offline(cfg: &AuditConfig, key: &ed25519_dalek::VerifyingKey) -> VerifyReport {
    let store = open_store(cfg);
    verify(&store, Some(key), VerifyMode::Offline).expect("verify runs")
}

fn raw_log(cfg: &AuditConfig) -> (sled::Db, RawLog) {
    let db = store::open_db(&cfg.dir).expect("sled");
    let tree = db.open_tree("log").expect("log tree");
    (db, RawLog(tree))
}

/// The `log` tree as an attacker holding sled's files sees it, with records addressed by
/// their old per-record keys: reads and edits of such a key act on the record's entry inside
/// its block (rewritten in place, entries kept in the block's order), every other key passes
/// through. Lets the tamper tests edit single records whatever the block layout.
struct RawLog(sled::Tree);

/// A block's key and its entries `(seq, stored record)`.
type RawBlock = (sled::IVec, Vec<(u64, Vec<u8>)>);

impl RawLog {
    fn record_seq(key: &[u8]) -> Option<u64> {
        (key.len() == 9 && key[0] == chain::RECORD_PREFIX)
            .then(|| chain::seq_of_key(key).map(|s| s.0))
            .flatten()
    }

    /// All blocks, decoded.
    fn blocks(&self) -> Vec<RawBlock> {
        self.0
            .range(block::block_key(RecordId(0))..=block::block_key(RecordId(u64::MAX)))
            .map(|item| {
                let (k, v) = item.expect("block");
                let entries = block::entries(&v)
                    .map(|e| e.map(|(s, b)| (s.0, b.to_vec())).expect("entry"))
                    .collect();
                (k, entries)
            })
            .collect()
    }

    fn write_block(&self, key: &[u8], entries: &[(u64, Vec<u8>)]) {
        let mut b = block::BlockBuilder::default();
        for (s, v) in entries {
            b.push(RecordId(*s), v);
        }
        match b.take() {
            Some((_, v)) => self.0.insert(key, v).map(drop),
            None => self.0.remove(key).map(drop),
        }
        .expect("write block");
    }

    fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<sled::IVec>> {
        let key = key.as_ref();
        let Some(seq) = Self::record_seq(key) else {
            return self.0.get(key);
        };
        Ok(self
            .blocks()
            .into_iter()
            .flat_map(|(_, e)| e)
            .find(|(s, _)| *s == seq)
            .map(|(_, v)| sled::IVec::from(v)))
    }

    fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> sled::Result<()> {
        let (key, value) = (key.as_ref(), value.as_ref().to_vec());
        let Some(seq) = Self::record_seq(key) else {
            return self.0.insert(key, value).map(drop);
        };
        let blocks = self.blocks();
        for (k, mut entries) in blocks.clone() {
            if let Some(e) = entries.iter_mut().find(|(s, _)| *s == seq) {
                e.1 = value;
                self.write_block(&k, &entries);
                return Ok(());
            }
        }
        // A new record goes into the last block starting at or before it, in seq order.
        let (k, mut entries) = blocks
            .into_iter()
            .rev()
            .find(|(k, _)| chain::seq_of_key(k).is_some_and(|f| f.0 <= seq))
            .unwrap_or_else(|| (block::block_key(RecordId(seq)).to_vec().into(), Vec::new()));
        let at = entries.partition_point(|(s, _)| *s < seq);
        entries.insert(at, (seq, value));
        self.write_block(&k, &entries);
        Ok(())
    }

    fn remove(&self, key: impl AsRef<[u8]>) -> sled::Result<()> {
        let key = key.as_ref();
        let Some(seq) = Self::record_seq(key) else {
            return self.0.remove(key).map(drop);
        };
        for (k, mut entries) in self.blocks() {
            let before = entries.len();
            entries.retain(|(s, _)| *s != seq);
            if entries.len() != before {
                self.write_block(&k, &entries);
            }
        }
        Ok(())
    }

    fn flush(&self) -> sled::Result<usize> {
        self.0.flush()
    }

    /// The highest record sequence number in the blocks.
    fn last_seq(&self) -> u64 {
        self.blocks()
            .into_iter()
            .flat_map(|(_, e)| e)
            .map(|(s, _)| s)
            .max()
            .expect("records")
    }
}

fn last_seq(cfg: &AuditConfig) -> RecordId {
    open_store(cfg)
        .last_record()
        .expect("read")
        .expect("records")
        .1
        .seq
}

#[test]
fn group_commit_batches_concurrent_appends() {
    let (_tmp, cfg, key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    const N: usize = 400;
    let seqs = rt().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..N {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let sid = SessionId(i as u64 + 1);
                log.append_durable(statement(sid, "SELECT 1", "allow"))
                    .await
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.expect("join").expect("append_durable"));
        }
        seqs
    });
    let syncs = log.sync_count();
    let mut sorted: Vec<u64> = seqs.iter().map(|s| s.0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, (0..N as u64).collect::<Vec<_>>());
    // Every append waited for a sync, yet far fewer syncs than appends happened.
    assert!(syncs >= 1, "no sync happened");
    assert!(
        syncs <= (N / 4) as u64,
        "{syncs} syncs for {N} concurrent appends: not batched"
    );
    // Each acknowledged record is in the store and the head covers all of them.
    let head = log.committed_head().expect("head");
    assert_eq!(head.seq, RecordId(N as u64 - 1));
    drop(log);
    let report = verify_offline(&cfg, &key);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, N as u64);
}

#[test]
fn durable_across_reopen_and_chain_continues() {
    let (_tmp, cfg, key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    let first = populate(&log, 3);
    drop(log);

    let log = AuditLog::open(&cfg).expect("reopen");
    let sid = log.new_session_id();
    assert!(sid > *first.last().expect("sessions"), "session ids reused");
    let seq = rt()
        .block_on(log.append_durable(start(sid, "alice", "shop")))
        .expect("append after reopen");
    assert_eq!(seq, RecordId(15), "sequence continues after reopen");
    let s = query::show_session(log.store(), first[0])
        .expect("show")
        .expect("session persisted");
    assert_eq!(s.summary.statements, 1);
    assert_eq!(s.end.expect("end").bytes_to_client, 2000);
    drop(log);
    let report = verify_offline(&cfg, &key);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 16);
}

#[test]
fn verify_accepts_untouched_log_and_rejects_wrong_key() {
    let (tmp, cfg, key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    populate(&log, 2);
    drop(log);
    assert!(verify_offline(&cfg, &key).ok);
    let other = signing::generate_keypair(&tmp.path().join("other.key")).expect("keygen");
    let other = signing::load_verifying_key(&other.public_key).expect("pub");
    let report = verify_offline(&cfg, &other);
    assert!(!report.ok);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("bad signature")),
        "{report:?}"
    );
}

fn tamper_setup() -> (tempfile::TempDir, AuditConfig, ed25519_dalek::VerifyingKey) {
    let (tmp, cfg, key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    populate(&log, 4); // records #0..#19
    drop(log);
    (tmp, cfg, key)
}

fn problem_seqs(r: &VerifyReport) -> Vec<u64> {
    r.problems
        .iter()
        .filter_map(|p| p.seq.map(|s| s.0))
        .collect()
}

#[test]
fn tamper_modified_record_is_named() {
    let (_tmp, cfg, key) = tamper_setup();
    {
        let (_db, log) = raw_log(&cfg);
        let k = chain::record_key(RecordId(6));
        let v = log.get(k).expect("get").expect("record 6");
        // The same length, so a compact body still decodes and only the hash can tell.
        let (from, to) = (b"SELECT 1 FROM users", b"SELECT 1 FROM usurp");
        let at = v
            .windows(from.len())
            .position(|w| w == from)
            .expect("record 6 holds its SQL");
        let mut nv = v.to_vec();
        nv[at..at + to.len()].copy_from_slice(to);
        assert!(
            body::decode(&nv[32..]).is_some(),
            "still a well-formed record"
        );
        log.insert(k, nv).expect("edit");
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    assert_eq!(problem_seqs(&report), vec![6], "{report:?}");
    assert_eq!(
        report.problems[0].key,
        hex::encode(chain::record_key(RecordId(6)))
    );
}

#[test]
fn tamper_modified_record_with_recomputed_hash_breaks_next_link() {
    let (_tmp, cfg, key) = tamper_setup();
    {
        let (_db, log) = raw_log(&cfg);
        let prev = chain::split_stored(
            &log.get(chain::record_key(RecordId(5)))
                .expect("g")
                .expect("5"),
        )
        .expect("split")
        .hash;
        let v = log
            .get(chain::record_key(RecordId(6)))
            .expect("g")
            .expect("6");
        let (_, mut rec) = chain::decode_record(&v).expect("record");
        if let AuditEvent::Statement(s) = &mut rec.event {
            s.decision = "allow".into();
            s.sql = "DROP TABLE users".into();
        }
        let (stored, _) = chain::seal(&prev, &rec).expect("seal");
        log.insert(chain::record_key(RecordId(6)), stored)
            .expect("edit");
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    // Record 6 itself is self-consistent now; its successor no longer chains to it.
    assert_eq!(problem_seqs(&report), vec![7], "{report:?}");
}

#[test]
fn tamper_deleted_record_is_named() {
    let (_tmp, cfg, key) = tamper_setup();
    {
        let (_db, log) = raw_log(&cfg);
        log.remove(chain::record_key(RecordId(9))).expect("remove");
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    assert_eq!(problem_seqs(&report), vec![9], "{report:?}");
    assert!(report.problems[0].message.contains("missing"));
}

#[test]
fn tamper_reordered_records_are_named() {
    let (_tmp, cfg, key) = tamper_setup();
    {
        let (_db, log) = raw_log(&cfg);
        let a = log
            .get(chain::record_key(RecordId(3)))
            .expect("g")
            .expect("3");
        let b = log
            .get(chain::record_key(RecordId(4)))
            .expect("g")
            .expect("4");
        log.insert(chain::record_key(RecordId(3)), b).expect("swap");
        log.insert(chain::record_key(RecordId(4)), a).expect("swap");
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    let seqs = problem_seqs(&report);
    assert!(seqs.contains(&3) && seqs.contains(&4), "{report:?}");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("reordered"))
    );
}

#[test]
fn tamper_inserted_records_are_named() {
    // Appended after the head, correctly chained (the attacker knows the hash function).
    let (_tmp, cfg, key) = tamper_setup();
    let last = last_seq(&cfg);
    {
        let (_db, log) = raw_log(&cfg);
        let prev =
            chain::split_stored(&log.get(chain::record_key(last)).expect("g").expect("last"))
                .expect("split")
                .hash;
        let forged = Record {
            seq: RecordId(last.0 + 1),
            at: Timestamp::now(),
            event: statement(SessionId(1), "SELECT 'alibi'", "allow"),
        };
        let (stored, _) = chain::seal(&prev, &forged).expect("seal");
        log.insert(chain::record_key(forged.seq), stored)
            .expect("insert");
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    assert_eq!(problem_seqs(&report), vec![last.0 + 1], "{report:?}");
    // The daemon refuses to extend a chain whose tail does not match its head.
    assert!(matches!(
        AuditLog::open(&cfg),
        Err(AuditError::Inconsistent(_))
    ));

    // Inserted in the middle: records shifted up by one to make room.
    let (_tmp, cfg, key) = tamper_setup();
    let last = last_seq(&cfg);
    {
        let (_db, log) = raw_log(&cfg);
        for s in (8..=last.0).rev() {
            let v = log
                .get(chain::record_key(RecordId(s)))
                .expect("g")
                .expect("r");
            log.insert(chain::record_key(RecordId(s + 1)), v)
                .expect("shift");
        }
        let forged = Record {
            seq: RecordId(8),
            at: Timestamp::now(),
            event: statement(SessionId(1), "SELECT 'alibi'", "allow"),
        };
        let (stored, _) = chain::seal(&ChainHash::GENESIS, &forged).expect("seal");
        log.insert(chain::record_key(RecordId(8)), stored)
            .expect("insert");
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    assert_eq!(problem_seqs(&report).first(), Some(&8), "{report:?}");
}

#[test]
fn tamper_truncation_is_detected() {
    // Tail cut after the last checkpoint: the signed head still covers the removed records.
    let (_tmp, cfg, key) = tamper_setup();
    let last = last_seq(&cfg);
    {
        let (_db, log) = raw_log(&cfg);
        for s in last.0 - 2..=last.0 {
            log.remove(chain::record_key(RecordId(s))).expect("remove");
        }
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("truncated") && p.seq == Some(RecordId(last.0 - 2))),
        "{report:?}"
    );

    // The head deleted as well: a checkpoint still covers removed records, or the missing
    // head is reported.
    let (_tmp, cfg, key) = tamper_setup();
    let store = open_store(&cfg);
    let cps = store.checkpoints().expect("checkpoints");
    drop(store);
    assert!(!cps.is_empty(), "the first commit writes a checkpoint");
    let cp = cps.last().expect("cp").seq;
    {
        let (_db, log) = raw_log(&cfg);
        log.remove(chain::HEAD_KEY).expect("remove head");
        for s in cp.0..=last_seq_raw(&log) {
            log.remove(chain::record_key(RecordId(s))).expect("remove");
        }
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("truncated") && p.seq == Some(cp)),
        "{report:?}"
    );
}

fn last_seq_raw(log: &RawLog) -> u64 {
    log.last_seq()
}

#[test]
fn tamper_forged_head_fails_signature() {
    let (_tmp, cfg, key) = tamper_setup();
    {
        let (_db, log) = raw_log(&cfg);
        let last = last_seq_raw(&log);
        log.remove(chain::record_key(RecordId(last)))
            .expect("remove");
        let v = log
            .get(chain::record_key(RecordId(last - 1)))
            .expect("g")
            .expect("r");
        let new_last = chain::split_stored(&v).expect("split");
        let mut head: Mark =
            serde_json::from_slice(&log.get(chain::HEAD_KEY).expect("g").expect("head"))
                .expect("m");
        head.seq = RecordId(last - 1);
        head.hash = new_last.hash.to_hex();
        log.insert(chain::HEAD_KEY, serde_json::to_vec(&head).expect("enc"))
            .expect("forge");
        log.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert!(!report.ok);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("head mark") && p.message.contains("bad signature")),
        "{report:?}"
    );
}

#[test]
fn export_round_trips_with_documented_schema() {
    let (_tmp, cfg, _key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    let ids = populate(&log, 2);
    let (records, next) =
        query::export_page(log.store(), None, 1000, &ExportFilter::default()).expect("export");
    assert_eq!(records.len(), 10);
    assert_eq!(next, None);
    let mut buf = Vec::new();
    for r in &records {
        export::write_jsonl(&mut buf, r).expect("write");
    }
    let text = String::from_utf8(buf).expect("utf8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), records.len());
    for (line, original) in lines.iter().zip(&records) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        // Field names promised by docs/audit-schema.md.
        assert_eq!(v["v"], 1);
        assert!(v["seq"].is_u64());
        assert!(v["at"].as_str().is_some_and(|s| s.ends_with('Z')));
        assert_eq!(v["hash"].as_str().map(str::len), Some(64));
        assert!(v["event"]["type"].is_string());
        let back: ExportRecord = serde_json::from_str(line).expect("parse back");
        assert_eq!(&back, original);
    }
    let first: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
    assert_eq!(first["event"]["type"], "session_start");
    assert_eq!(
        first["event"]["identity"]["proof"]["method"],
        "scram_sha256"
    );
    assert_eq!(first["event"]["identity"]["process"]["comm"], "psql");
    let stmt: serde_json::Value = serde_json::from_str(lines[1]).expect("json");
    assert_eq!(stmt["event"]["type"], "statement");
    assert_eq!(stmt["event"]["decision"], "allow");
    assert_eq!(stmt["event"]["rule"], "read-only");

    // Filtered by session.
    let (only, _) = query::export_page(
        log.store(),
        None,
        1000,
        &ExportFilter {
            session: Some(ids[1]),
            ..Default::default()
        },
    )
    .expect("export");
    assert_eq!(only.len(), 5);

    // CSV: header, quoting, and the lossless `event` column.
    let mut csv = Vec::new();
    export::write_csv_header(&mut csv).expect("header");
    for r in &records {
        export::write_csv(&mut csv, r).expect("csv");
    }
    let csv = String::from_utf8(csv).expect("utf8");
    assert_eq!(
        csv.lines().next(),
        Some(export::CSV_COLUMNS.join(",").as_str())
    );
    assert!(csv.contains(",allow,read-only,SELECT 0 FROM users,"));
    assert_eq!(export::csv_field("a,\"b\"\nc"), "\"a,\"\"b\"\"\nc\"");
    assert_eq!(export::csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
}

#[test]
fn queries_list_show_replay() {
    let (_tmp, cfg, _key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    let ids = populate(&log, 3);
    let store = log.store();
    let all = query::list_sessions(store, &SessionFilter::default()).expect("list");
    assert_eq!(all.len(), 3);
    // The kernel-attested process is part of the summary the sessions list prints.
    assert_eq!(
        all[0].process.as_deref(),
        Some("uid 1000 pid 4242 /usr/bin/psql")
    );
    let user1 = query::list_sessions(
        store,
        &SessionFilter {
            identity: Some("user1".into()),
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(user1.len(), 1);
    assert_eq!(user1[0].session, ids[1]);
    let none = query::list_sessions(
        store,
        &SessionFilter {
            database: Some("other".into()),
            ..Default::default()
        },
    )
    .expect("list");
    assert!(none.is_empty());
    let future = query::list_sessions(
        store,
        &SessionFilter {
            since: Some(Timestamp::from_unix_micros(
                Timestamp::now().unix_micros() + 3_600_000_000,
            )),
            ..Default::default()
        },
    )
    .expect("list");
    assert!(future.is_empty());

    let replay = query::replay(store, ids[2])
        .expect("replay")
        .expect("session");
    assert_eq!(replay.entries.len(), 3, "{replay:?}"); // start, statement (+outcome+rows), end
    match &replay.entries[1] {
        ReplayEntry::Statement {
            statement,
            outcome,
            rows,
            ..
        } => {
            assert_eq!(statement.sql, "SELECT 2 FROM users");
            assert_eq!(outcome.as_ref().map(|o| o.duration_us), Some(1234));
            assert_eq!(rows.as_ref().map(|r| r.rows.len()), Some(1));
        }
        other => panic!("expected a statement, got {other:?}"),
    }
    assert!(
        query::replay(store, SessionId(999))
            .expect("replay")
            .is_none()
    );
}

#[test]
fn recorded_rows_are_capped() {
    let (_tmp, mut cfg, _key) = setup();
    cfg.record_rows = 10;
    let log = AuditLog::open(&cfg).expect("open");
    let rows: Vec<Vec<Option<String>>> = (0..50).map(|i| vec![Some(i.to_string())]).collect();
    let seq = rt()
        .block_on(log.append_durable(AuditEvent::ResultRows(ResultRows {
            session: SessionId(1),
            statement: RecordId(0),
            columns: vec!["n".into()],
            rows,
            truncated: false,
        })))
        .expect("append");
    // Durable in the write-ahead segment; sled follows (the admin socket waits like this).
    rt().block_on(log.sync_index()).expect("sync index");
    match log
        .store()
        .record(seq)
        .expect("read")
        .expect("record")
        .event
    {
        AuditEvent::ResultRows(r) => {
            assert_eq!(r.rows.len(), 10);
            assert!(r.truncated);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn rows_recorded_with_the_outcome_are_capped_and_replayed_as_the_statement_rows() {
    let (_tmp, mut cfg, _key) = setup();
    cfg.record_rows = 10;
    let log = AuditLog::open(&cfg).expect("open");
    let sid = log.new_session_id();
    let rows: Vec<Vec<Option<String>>> = (0..50).map(|i| vec![Some(i.to_string())]).collect();
    let seq = rt().block_on(async {
        log.append_durable(start(sid, "alice", "shop"))
            .await
            .expect("start");
        let st = log
            .append_durable(statement(sid, "SELECT n FROM t", "allow"))
            .await
            .expect("statement");
        let AuditEvent::Outcome(mut o) = outcome(sid, st) else {
            unreachable!()
        };
        o.result = Some(RecordedRows {
            columns: vec!["n".into()],
            rows,
            truncated: false,
        });
        let seq = log.append(AuditEvent::Outcome(o)).expect("outcome");
        log.sync_index().await.expect("sync index");
        seq
    });
    match log
        .store()
        .record(seq)
        .expect("read")
        .expect("record")
        .event
    {
        AuditEvent::Outcome(o) => {
            let r = o.result.expect("rows recorded with the outcome");
            assert_eq!(r.rows.len(), 10);
            assert!(r.truncated);
        }
        other => panic!("unexpected {other:?}"),
    }
    let replay = query::replay(log.store(), sid)
        .expect("replay")
        .expect("session");
    let shown = replay
        .entries
        .iter()
        .find_map(|e| match e {
            query::ReplayEntry::Statement { rows, outcome, .. } => {
                assert!(outcome.as_ref().is_some_and(|o| o.result.is_none()));
                rows.clone()
            }
            _ => None,
        })
        .expect("the statement shows its rows");
    assert_eq!(shown.columns, vec!["n".to_string()]);
    assert_eq!(shown.rows.len(), 10);
    assert_eq!(shown.rows[3], vec![Some("3".to_string())]);
}

#[test]
fn retention_removes_old_sessions_and_verify_stays_green() {
    let (_tmp, cfg, key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    let old = populate(&log, 3);
    // A session that started early but is still active must be kept whole.
    let live = log.new_session_id();
    rt().block_on(log.append_durable(start(live, "bob", "shop")))
        .expect("live start");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let boundary = Timestamp::now();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let recent = populate(&log, 2);
    rt().block_on(log.append_durable(statement(live, "SELECT 'still here'", "allow")))
        .expect("live statement");
    drop(log);

    // Age-based retention as of "now", with an age that puts the boundary at the cut.
    let store = open_store(&cfg);
    let signing = signing::load_signing_key(cfg.signing_key.as_deref().expect("key")).expect("key");
    let head = store.head().expect("head").expect("head");
    let now = Timestamp::now();
    let age = std::time::Duration::from_micros(now.unix_micros() - boundary.unix_micros());
    let report = retention::apply(
        &store,
        Some(&signing),
        &retention::RetentionPolicy {
            max_age: Some(age),
            max_bytes: None,
        },
        Some(head.seq),
        now,
        &mut Default::default(),
    )
    .expect("retention");
    assert_eq!(report.removed_sessions, 3, "{report:?}");
    assert_eq!(report.removed_records, 15, "{report:?}");
    assert!(report.record_bytes_after < report.record_bytes_before);
    for s in &old {
        assert!(store.session_summary(*s).expect("read").is_none());
    }
    for s in recent.iter().chain([&live]) {
        assert!(store.session_summary(*s).expect("read").is_some());
    }
    let replay = query::replay(&store, live)
        .expect("replay")
        .expect("live kept");
    assert_eq!(replay.entries.len(), 2, "live session kept whole");
    let report = verify(&store, Some(&key), VerifyMode::Offline).expect("verify");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.first, Some(RecordId(15)));
    drop(store);

    // The daemon continues the chain after retention, and a deleted first record is still
    // detected (the signed base says where the log starts).
    let log = AuditLog::open(&cfg).expect("reopen");
    populate(&log, 1);
    drop(log);
    assert!(verify_offline(&cfg, &key).ok);
    {
        let (_db, tree) = raw_log(&cfg);
        tree.remove(chain::record_key(RecordId(15)))
            .expect("remove");
        tree.flush().expect("flush");
    }
    let report = verify_offline(&cfg, &key);
    assert_eq!(problem_seqs(&report), vec![15], "{report:?}");
}

#[test]
fn size_bound_retention_through_the_writer() {
    let (_tmp, mut cfg, key) = setup();
    cfg.max_size_mib = 1;
    let log = AuditLog::open(&cfg).expect("open");
    let big = "x".repeat(8 * 1024);
    rt().block_on(async {
        for i in 0..200u64 {
            log.append(AuditEvent::Statement(StatementRecord {
                sql: format!("SELECT '{big}' -- {i}"),
                ..match statement(SessionId(i + 1), "", "allow") {
                    AuditEvent::Statement(s) => s,
                    _ => unreachable!(),
                }
            }))
            .expect("append");
        }
        log.sync_index().await.expect("sync");
    });
    let before = log.store().space().expect("space").record_bytes;
    assert!(before > 1 << 20);
    // The writer may already have pruned on its own (it runs retention at start-up and
    // hourly); either way the bound holds afterwards and the oldest records are gone.
    let report = log.run_retention().expect("retention");
    assert!(report.record_bytes_after <= 1 << 20, "{report:?}");
    let stats = query::stats(log.store(), Some(log.sync_count())).expect("stats");
    assert!(stats.first > Some(RecordId(0)), "{stats:?}");
    assert_eq!(stats.base.map(|b| b.seq), stats.first);
    assert!(stats.space.disk_bytes > 0);
    let report = verify(
        log.store(),
        Some(&key),
        VerifyMode::Live {
            head: log.committed_head(),
        },
    )
    .expect("verify");
    assert!(report.ok, "{report:?}");
}

#[test]
fn append_fails_closed_when_the_store_cannot_be_synced() {
    let (_tmp, cfg, _key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    rt().block_on(log.append_durable(statement(SessionId(1), "SELECT 1", "allow")))
        .expect("first append");
    // Writes to the removed write-ahead file would go nowhere: the commit fails, so the
    // statement must not be acknowledged.
    for (_, path) in super::wal::segments(&cfg.dir).expect("segments") {
        std::fs::remove_file(path).expect("remove wal");
    }
    let r = rt().block_on(log.append_durable(statement(SessionId(1), "SELECT 2", "allow")));
    assert!(r.is_err(), "append acknowledged without durability");
    assert!(matches!(
        log.append(statement(SessionId(1), "SELECT 3", "allow")),
        Err(AuditError::Failed(_))
    ));
}

#[test]
fn appends_stop_when_sleds_files_cannot_be_synced_in_the_background() {
    let (_tmp, cfg, _key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    rt().block_on(log.append_durable(statement(SessionId(1), "SELECT 1", "allow")))
        .expect("first append");
    // sled keeps writing to its open descriptor, but the sync of `db` cannot find the file:
    // the background store sync fails and from then on nothing is acknowledged.
    std::fs::remove_file(cfg.dir.join("db")).expect("remove db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = rt().block_on(log.append_durable(statement(SessionId(1), "SELECT 2", "allow")));
        if r.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "appends still acknowledged long after sled's file was removed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(matches!(
        log.append(statement(SessionId(1), "SELECT 3", "allow")),
        Err(AuditError::Failed(_))
    ));
}

/// A commit that reached the write-ahead file but not sled's files (the process died between
/// them) is back after a reopen, with an intact chain, in both durability modes.
#[test]
fn commits_only_in_the_write_ahead_file_survive_a_crash() {
    for durability in [
        crate::audit::config::Durability::Fsync,
        crate::audit::config::Durability::Write,
    ] {
        let (tmp, mut cfg, key) = setup();
        cfg.durability = durability;
        let wal_copy = tmp.path().join("wal.copy");
        std::fs::create_dir_all(&wal_copy).expect("mkdir");
        {
            let log = AuditLog::open(&cfg).expect("open");
            for i in 0..5 {
                rt().block_on(log.append_durable(statement(
                    SessionId(1),
                    &format!("SELECT {i}"),
                    "allow",
                )))
                .expect("append");
            }
            // What a crash leaves: the frames, before the background sync deletes them.
            for (_, path) in super::wal::segments(&cfg.dir).expect("segments") {
                let name = path.file_name().expect("name");
                std::fs::copy(&path, wal_copy.join(name)).expect("copy wal");
            }
        }
        // Simulate the crash: sled's files without the last commits, the frames with them.
        let fresh = tempfile::tempdir().expect("tempdir");
        let crashed = fresh.path().join("store");
        {
            let cfg2 = AuditConfig {
                dir: crashed.clone(),
                ..cfg.clone()
            };
            let log = AuditLog::open(&cfg2).expect("open fresh");
            drop(log);
        }
        for (_, path) in super::wal::segments(&wal_copy).expect("segments") {
            let name = path.file_name().expect("name");
            std::fs::copy(&path, crashed.join(name)).expect("plant wal");
        }
        let frames = super::wal::recover(&crashed).expect("recover").frames;
        assert!(!frames.is_empty(), "the copy holds the commits");
        let cfg2 = AuditConfig {
            dir: crashed.clone(),
            ..cfg.clone()
        };
        let log = AuditLog::open(&cfg2).expect("reopen after crash");
        let stats = query::stats(log.store(), Some(log.sync_count())).expect("stats");
        assert_eq!(stats.last, Some(RecordId(4)), "{durability:?}: {stats:?}");
        let report = verify(
            log.store(),
            Some(&key),
            VerifyMode::Live {
                head: log.committed_head(),
            },
        )
        .expect("verify");
        assert!(report.ok, "{durability:?}: {report:?}");
        // Replayed frames are not replayed again.
        assert!(
            super::wal::recover(&crashed)
                .expect("recover")
                .frames
                .is_empty()
        );
        rt().block_on(log.append_durable(statement(SessionId(2), "SELECT 9", "allow")))
            .expect("append after recovery");
    }
}

#[test]
fn signing_key_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("k");
    let g = signing::generate_keypair(&path).expect("keygen");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        signing::generate_keypair(&path).is_err(),
        "never overwrites a key"
    );
    let sk = signing::load_signing_key(&path).expect("load");
    assert_eq!(hex::encode(sk.verifying_key().as_bytes()), g.public_key_hex);
    assert_eq!(
        signing::parse_verifying_key(&g.public_key_hex).expect("hex"),
        sk.verifying_key()
    );
    // Hex private key form, and refusal of a world-readable key.
    let hex_path = tmp.path().join("hex.key");
    std::fs::write(&hex_path, hex::encode(sk.to_bytes())).expect("write");
    std::fs::set_permissions(&hex_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(matches!(
        signing::load_signing_key(&hex_path),
        Err(AuditError::Key { .. })
    ));
    std::fs::set_permissions(&hex_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(
        signing::load_signing_key(&hex_path)
            .expect("hex key")
            .verifying_key(),
        sk.verifying_key()
    );
}

#[test]
fn admin_socket_serves_queries_while_the_store_is_open() {
    let (tmp, cfg, _key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    let ids = populate(&log, 2);
    let socket = tmp.path().join("admin.sock");
    let config_text = format!(
        "[listen]\ntcp = [\"127.0.0.1:6432\"]\n[upstream]\nhost = \"/tmp\"\n\
         [audit]\ndir = \"{}\"\nsigning_key = \"{}\"\n[admin]\nsocket = \"{}\"\n",
        cfg.dir.display(),
        cfg.signing_key.as_deref().expect("key").display(),
        socket.display()
    );
    let config = crate::config::Config::parse(&config_text).expect("config");
    let runtime = rt();
    let server_log = log.clone();
    let server_socket = socket.clone();
    // Another module's request (e.g. approvals) answered on the same socket.
    let extension: admin::Extension = std::sync::Arc::new(|req: serde_json::Value| {
        Box::pin(async move {
            match req["op"].as_str() {
                Some("approve") => Ok(serde_json::json!({ "approved": req["id"] })),
                _ => Err("unknown op".to_string()),
            }
        }) as admin::ExtensionFuture
    });
    let server = runtime
        .spawn(async move { admin::serve_with(&server_socket, server_log, Some(extension)).await });
    runtime.block_on(async {
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
    // The store is locked by this process: a direct open would fail, the socket works.
    let mut client = admin::AdminClient::connect(&socket).expect("connect");
    let sessions: Vec<SessionSummary> = serde_json::from_value(
        client
            .request(&admin::AdminRequest::Sessions {
                filter: SessionFilter::default(),
            })
            .expect("sessions"),
    )
    .expect("decode");
    assert_eq!(sessions.len(), 2);
    // Checked after a served request: the chmod follows the bind.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let report: VerifyReport = serde_json::from_value(
        client
            .request(&admin::AdminRequest::Verify { public_key: None })
            .expect("verify"),
    )
    .expect("decode");
    assert!(report.ok && report.signatures_checked, "{report:?}");
    let err = client
        .request(&admin::AdminRequest::Show {
            session: SessionId(999_999),
        })
        .expect("show");
    assert!(err.is_null());

    let approved = client
        .request_value(&serde_json::json!({ "op": "approve", "id": "a-1" }))
        .expect("extension op");
    assert_eq!(approved["approved"], "a-1");

    // Malformed request lines get an error response, not a dropped connection.
    {
        use std::io::{BufRead, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        raw.write_all(b"{\"op\":\"drop_tables\"}\n").expect("write");
        let mut line = String::new();
        std::io::BufReader::new(&raw)
            .read_line(&mut line)
            .expect("read");
        assert!(line.contains("\"ok\":false"), "{line}");
    }

    // The CLI goes through the socket while the daemon holds the store.
    cli::run(
        cli::AuditCommand::Show {
            session: ids[0].0,
            json: true,
        },
        &config.audit,
        config.admin.as_ref().map(|a| a.socket.as_path()),
    )
    .expect("cli show via socket");
    cli::run(
        cli::AuditCommand::Verify {
            public_key: None,
            json: false,
        },
        &config.audit,
        config.admin.as_ref().map(|a| a.socket.as_path()),
    )
    .expect("cli verify via socket");
    server.abort();
    drop(runtime);
    drop(log);
}

#[test]
fn cli_opens_the_store_directly_when_no_daemon_runs() {
    let (tmp, cfg, _key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    populate(&log, 1);
    drop(log);
    let out = tmp.path().join("export.csv");
    let config_text = format!(
        "[listen]\ntcp = [\"127.0.0.1:6432\"]\n[upstream]\nhost = \"/tmp\"\n\
         [audit]\ndir = \"{}\"\nsigning_key = \"{}\"\n[admin]\nsocket = \"{}\"\n",
        cfg.dir.display(),
        cfg.signing_key.as_deref().expect("key").display(),
        tmp.path().join("absent.sock").display()
    );
    let config = crate::config::Config::parse(&config_text).expect("config");
    cli::run(
        cli::AuditCommand::Export {
            format: export::ExportFormat::Csv,
            out: Some(out.clone()),
            session: None,
            since: Some("1h".into()),
            until: None,
        },
        &config.audit,
        config.admin.as_ref().map(|a| a.socket.as_path()),
    )
    .expect("export");
    let text = std::fs::read_to_string(&out).expect("read export");
    assert_eq!(text.lines().count(), 6, "{text}");
    cli::run(
        cli::AuditCommand::Verify {
            public_key: None,
            json: true,
        },
        &config.audit,
        config.admin.as_ref().map(|a| a.socket.as_path()),
    )
    .expect("verify");
    cli::run(
        cli::AuditCommand::Prune,
        &config.audit,
        config.admin.as_ref().map(|a| a.socket.as_path()),
    )
    .expect("prune");
}

/// A short throughput probe (run by hand: `cargo test ... throughput_probe -- --ignored
/// --nocapture`): 8 sessions each waiting for durability per statement, like pgbench -c 8.
#[test]
#[ignore]
fn throughput_probe() {
    let (_tmp, mut cfg, _key) = setup();
    if std::env::var("PROBE_DURABILITY").as_deref() == Ok("write") {
        cfg.durability = crate::audit::config::Durability::Write;
    }
    let log = AuditLog::open(&cfg).expect("open");
    let secs = 3;
    let total = rt().block_on(async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for c in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while tokio::time::Instant::now() < deadline {
                    let st = log
                        .append_durable(statement(
                            SessionId(c),
                            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                            "allow",
                        ))
                        .await
                        .expect("append");
                    log.append(outcome(SessionId(c), st)).expect("outcome");
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("join");
        }
        total
    });
    let syncs = log.sync_count();
    println!(
        "{} statements/s, {} commits/s, {:.1} records per commit",
        total / secs,
        syncs / secs,
        (2 * total) as f64 / syncs as f64
    );
}

#[test]
#[ignore]
fn flush_cost_probe() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(tmp.path())
        .flush_every_ms(None)
        .open()
        .expect("open");
    let f = std::fs::File::open(tmp.path().join("db")).expect("db file");
    let n = 100;
    let mut flush = std::time::Duration::ZERO;
    let mut sync = std::time::Duration::ZERO;
    for i in 0..n {
        db.insert(format!("k{i}"), vec![0u8; 300]).expect("insert");
        let t = std::time::Instant::now();
        db.flush().expect("flush");
        flush += t.elapsed();
        let t = std::time::Instant::now();
        f.sync_data().expect("sync");
        sync += t.elapsed();
    }
    println!(
        "sled flush {:?} / fdatasync {:?} per commit",
        flush / n,
        sync / n
    );
}

/// Child half of `acknowledged_records_survive_kill`: appends durably, reports each
/// acknowledged seq on stdout, and dies abruptly mid-stream (no destructors, no final flush).
#[test]
#[ignore]
fn crash_child() {
    let Some(dir) = std::env::var_os("AUDIT_CRASH_DIR") else {
        return; // only meaningful when spawned by the parent test
    };
    let cfg = config(Path::new(&dir), None);
    let log = AuditLog::open(&cfg).expect("open");
    rt().block_on(async {
        use std::io::Write;
        let mut tasks = Vec::new();
        for c in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let seq = log
                        .append_durable(statement(SessionId(c), &format!("SELECT {i}"), "allow"))
                        .await
                        .expect("append");
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "ACK {}", seq.0);
                    let _ = out.flush();
                    // Outcomes are not awaited; they may or may not survive.
                    let _ = log.append(outcome(SessionId(c), seq));
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        std::process::abort();
    });
}

#[test]
fn acknowledged_records_survive_kill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "audit::tests::crash_child",
            "--ignored",
            "--nocapture",
        ])
        .env("AUDIT_CRASH_DIR", tmp.path())
        .output()
        .expect("spawn child");
    assert!(!out.status.success(), "child should have aborted");
    let acked: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("ACK ").and_then(|n| n.trim().parse().ok()))
        .collect();
    assert!(
        acked.len() > 10,
        "child acknowledged too little: {}",
        acked.len()
    );
    let cfg = config(tmp.path(), None);
    let log = AuditLog::open(&cfg).expect("reopen after crash");
    for seq in &acked {
        assert!(
            log.store().record(RecordId(*seq)).expect("read").is_some(),
            "acknowledged record {seq} lost"
        );
    }
    let report = verify(
        log.store(),
        None,
        VerifyMode::Live {
            head: log.committed_head(),
        },
    )
    .expect("verify");
    assert!(report.ok, "{report:?}");
    // The chain continues after the crash.
    rt().block_on(log.append_durable(statement(SessionId(99), "SELECT 'after'", "allow")))
        .expect("append after crash");
}

#[test]
fn lost_index_is_rebuilt_at_open() {
    let (_tmp, cfg, key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    let ids = populate(&log, 3);
    drop(log);
    {
        let db = store::open_db(&cfg.dir).expect("sled");
        for t in ["sessions", "session_records", "meta"] {
            db.open_tree(t).expect("tree").clear().expect("clear");
        }
        db.flush().expect("flush");
    }
    let log = AuditLog::open(&cfg).expect("reopen");
    let all = query::list_sessions(log.store(), &SessionFilter::default()).expect("list");
    assert_eq!(all.len(), 3);
    let replay = query::replay(log.store(), ids[0])
        .expect("replay")
        .expect("session");
    assert_eq!(replay.entries.len(), 3);
    assert!(
        log.new_session_id() > ids[2],
        "session ids must not be reused"
    );
    drop(log);
    assert!(verify_offline(&cfg, &key).ok);
}

/// What one sled `apply_batch` costs without any flush (run by hand, like the probes above).
#[test]
#[ignore]
fn apply_batch_cost_probe() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(tmp.path())
        .flush_every_ms(None)
        .cache_capacity(16 * 1024 * 1024)
        .open()
        .expect("open");
    let n = 2000u32;
    let t = std::time::Instant::now();
    for i in 0..n {
        let mut b = sled::Batch::default();
        b.insert(&i.to_be_bytes(), vec![0u8; 400]);
        b.insert(b"head", vec![1u8; 120]);
        db.apply_batch(b).expect("batch");
    }
    let batch = t.elapsed() / n;
    let t = std::time::Instant::now();
    for i in n..2 * n {
        db.insert(i.to_be_bytes(), vec![0u8; 400]).expect("insert");
        db.insert(b"head", vec![1u8; 120]).expect("insert");
    }
    let plain = t.elapsed() / n;
    println!("apply_batch {batch:?} / two plain inserts {plain:?} per commit");
}

/// The relay's pattern: the statement's record without a waiter, then a durability barrier,
/// then the outcome without one. Each barrier must come back at once (no lazy wait), and
/// everything must be committed and then visible after an index barrier.
#[test]
fn statement_barrier_outcome_loop_never_waits_for_the_lazy_timer() {
    let (_tmp, mut cfg, key) = setup();
    // No disk sync per barrier: what is timed is the hand-off to the writer and back.
    cfg.durability = crate::audit::config::Durability::Write;
    let log = AuditLog::open(&cfg).expect("open");
    const N: u64 = 300;
    let started = std::time::Instant::now();
    rt().block_on(async {
        for i in 0..N {
            let st = log
                .append(statement(SessionId(1), &format!("SELECT {i}"), "allow"))
                .expect("append");
            tokio::time::timeout(std::time::Duration::from_secs(5), log.sync())
                .await
                .expect("barrier not released")
                .expect("sync");
            log.append(outcome(SessionId(1), st)).expect("outcome");
        }
        log.sync_index().await.expect("sync index");
    });
    let elapsed = started.elapsed();
    eprintln!("{N} statements in {elapsed:?}");
    let seqs = log.store().session_seqs(SessionId(1)).expect("seqs");
    assert_eq!(seqs.len() as u64, 2 * N);
    drop(log);
    let report = verify_offline(&cfg, &key);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 2 * N);
    // Never a lazy-commit sleep (10 ms) per statement: 300 of them would be 3 s.
    assert!(
        elapsed < std::time::Duration::from_millis(5 * N),
        "{N} statements took {elapsed:?}"
    );
}

#[test]
fn records_under_keys_of_their_own_move_into_blocks_and_still_verify() {
    // A store written before records were kept in blocks: every record under its own key.
    let (_tmp, cfg, key) = tamper_setup();
    let before = open_store(&cfg)
        .records_after(None, usize::MAX)
        .expect("read");
    {
        let (_db, log) = raw_log(&cfg);
        for (k, entries) in log.blocks() {
            for (seq, stored) in entries {
                log.0
                    .insert(chain::record_key(RecordId(seq)), stored)
                    .expect("unfold");
            }
            log.0.remove(k).expect("unfold");
        }
        log.flush().expect("flush");
        assert!(log.blocks().is_empty());
    }
    let report = verify_offline(&cfg, &key);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, before.len() as u64);
    let store = open_store(&cfg);
    let after = store.records_after(None, usize::MAX).expect("read");
    assert_eq!(
        after.iter().map(|(h, r)| (h.0, r.seq)).collect::<Vec<_>>(),
        before.iter().map(|(h, r)| (h.0, r.seq)).collect::<Vec<_>>()
    );
    assert_eq!(
        store.log.scan_prefix([chain::RECORD_PREFIX]).count(),
        0,
        "no record left under a key of its own"
    );
    // Fewer sled entries than records: that is the point of blocks.
    let blocks = store.log.scan_prefix([block::BLOCK_PREFIX]).count();
    assert!(blocks > 0 && blocks < after.len() / 4, "{blocks} blocks");
    drop(store);
    // The daemon continues the chain on the moved records.
    let log = AuditLog::open(&cfg).expect("reopen");
    populate(&log, 1);
    drop(log);
    assert!(verify_offline(&cfg, &key).ok);
}

#[test]
fn a_session_index_entry_lists_a_batch_of_records() {
    let (_tmp, cfg, _key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    let ids = populate(&log, 2);
    rt().block_on(log.sync_index()).expect("visible");
    let store = log.store();
    for sid in ids {
        let seqs = store.session_seqs(sid).expect("seqs");
        let entries = store.session_ref_entries(sid).expect("entries");
        assert!(!seqs.is_empty());
        assert_eq!(
            entries.iter().map(|(_, s)| s.len()).sum::<usize>(),
            seqs.len()
        );
        for s in &seqs {
            let rec = store
                .record(*s)
                .expect("read")
                .expect("listed record exists");
            assert_eq!(rec.event.session(), Some(sid));
        }
    }
}

#[test]
fn callers_committing_their_own_records_keep_the_chain_whole_under_concurrency() {
    // durability = "write": sessions commit on their own threads while the writer thread
    // commits records nobody waits for; the chain must hold every record once, in order.
    let (_tmp, mut cfg, key) = setup();
    cfg.durability = crate::audit::config::Durability::Write;
    let log = AuditLog::open(&cfg).expect("open");
    const TASKS: u64 = 8;
    const EACH: u64 = 200;
    let statements = rt().block_on(async {
        let mut tasks = Vec::new();
        for c in 0..TASKS {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..EACH {
                    let st = log
                        .append(statement(
                            SessionId(c),
                            &format!("SELECT {c}, {i}"),
                            "allow",
                        ))
                        .expect("append");
                    log.sync().await.expect("durable");
                    // Durable means in the write-ahead file: the head has reached it.
                    assert!(log.committed_head().is_some_and(|h| h.seq >= st));
                    log.append(outcome(SessionId(c), st)).expect("outcome");
                    if i % 50 == 0 {
                        log.sync_index().await.expect("index barrier");
                    }
                    mine.push(st);
                }
                mine
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("join"));
        }
        log.sync_index().await.expect("sync index");
        all
    });
    assert_eq!(statements.len() as u64, TASKS * EACH);
    drop(log);
    let report = verify_offline(&cfg, &key);
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.records, 2 * TASKS * EACH);
    let store = open_store(&cfg);
    for st in statements {
        match store.record(st).expect("read").expect("record").event {
            AuditEvent::Statement(_) => {}
            other => panic!("{st} is not a statement: {other:?}"),
        }
    }
}

/// Files under sled's `blobs/` directory: page images too large for its log, one file each.
fn sled_blobs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.parent().and_then(|x| x.file_name()) == Some("blobs".as_ref()) {
                found.push(p);
            }
        }
    }
    found
}

/// A steady trail keeps sled's pages inside its log: a leaf holds up to 17 blocks, and a page
/// image over a quarter of sled's segment becomes a file of its own (created, written and
/// later unlinked, on every consolidation of that page), which cost a busy proxy more than
/// the records themselves.
#[test]
fn the_store_writes_no_blob_files_under_a_steady_trail() {
    let (_tmp, cfg, _key) = setup();
    let log = AuditLog::open(&cfg).expect("open");
    rt().block_on(async {
        for i in 0..6000u64 {
            let sid = SessionId(i % 8 + 1);
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i} /* padding to a typical statement record */");
            log.append(statement(sid, &sql, "allow")).expect("append");
            if i % 500 == 0 {
                log.sync_index().await.expect("sync");
            }
        }
        log.sync_index().await.expect("sync");
    });
    drop(log);
    let blobs = sled_blobs(&cfg.dir);
    assert!(
        blobs.is_empty(),
        "sled wrote {} blob files: {:?}",
        blobs.len(),
        &blobs[..blobs.len().min(3)]
    );
}

/// The head-mark file is written by the writer thread shortly after commits, not by them:
/// while the daemon runs it reaches every commit's head within moments, in both durabilities.
#[test]
fn the_head_mark_file_follows_commits_while_running() {
    for durability in [
        crate::audit::config::Durability::Write,
        crate::audit::config::Durability::Fsync,
    ] {
        let (_tmp, mut cfg, _key) = setup();
        cfg.durability = durability;
        let log = AuditLog::open(&cfg).expect("open");
        let path = integrity::head_mark_path(&cfg);
        rt().block_on(async {
            for round in 0..3u64 {
                let sid = SessionId(round + 1);
                for i in 0..20 {
                    log.append_durable(statement(sid, &format!("SELECT {i}"), "allow"))
                        .await
                        .expect("append");
                }
                let head = log.committed_head().expect("head");
                // Not held open or rewritten by a commit; the writer thread catches up.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                loop {
                    match headmark::read(&path).expect("read mark") {
                        headmark::Read::Mark(m) if m == head => break,
                        other => assert!(
                            std::time::Instant::now() < deadline,
                            "{durability:?}: head-mark file {other:?}, committed {head:?}"
                        ),
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        });
    }
}
