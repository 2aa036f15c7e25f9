//! `interceptor audit ...`: the auditor's commands. While the daemon runs they go through its
//! admin socket; otherwise the CLI opens the store itself.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;

use super::admin::{AdminClient, AdminRequest, Target};
use super::config::AuditConfig;
use super::export::{self, ExportFormat, ExportRecord};
use super::query::{ExportFilter, Replay, ReplayEntry, SessionDetail, SessionFilter, Stats};
use super::record::{RecordId, SessionId, Timestamp};
use super::retention::RetentionReport;
use super::store::{SessionSummary, Store};
use super::verify::VerifyReport;
use super::{AuditLog, signing};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AuditCommand {
    /// List sessions.
    Sessions {
        /// Identity subject or display name.
        #[arg(long)]
        identity: Option<String>,
        /// Only sessions on this database.
        #[arg(long)]
        database: Option<String>,
        /// Sessions started at or after: RFC 3339 time (2026-11-22T00:00:00Z) or an age such as
        /// `2h`, `7d`.
        #[arg(long)]
        since: Option<String>,
        /// Sessions started before: RFC 3339 time or an age, as for --since.
        #[arg(long)]
        until: Option<String>,
        /// Show only the N newest sessions (still listed oldest first).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one session: identity, proof, process, peer, TLS, database, role, times, bytes.
    Show {
        /// The session's id (from `audit sessions`).
        session: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replay a session: statements, decisions, approvals, outcomes, rows and timings.
    Replay {
        /// The session's id (from `audit sessions`).
        session: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Export records (schema: docs/audit-schema.md).
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only the records of this session.
        #[arg(long)]
        session: Option<u64>,
        /// Records at or after: RFC 3339 time or an age such as `2h`, `7d`.
        #[arg(long)]
        since: Option<String>,
        /// Records before: RFC 3339 time or an age, as for --since.
        #[arg(long)]
        until: Option<String>,
    },
    /// Verify the hash chain and signed checkpoints; exits non-zero on any problem.
    Verify {
        /// The auditor's copy of the public key (default: derived from the configured key).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Space used and log extent.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Apply the retention policy now.
    Prune,
    /// Generate an Ed25519 checkpoint signing key (FILE, mode 0600) and FILE.pub.
    Keygen {
        /// Where to write the private key (the public key goes to FILE.pub).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// Runs an audit command. Synchronous (no tokio runtime needed), so it may be called from
/// `main` before or outside any runtime; inside one, call it via `spawn_blocking`.
/// `admin_socket`: the running daemon's admin socket (`[admin] socket`), asked first.
pub fn run(
    cmd: AuditCommand,
    audit: &AuditConfig,
    admin_socket: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if let AuditCommand::Keygen { out } = &cmd {
        return keygen(out);
    }
    let mut backend = Backend::connect(audit, admin_socket)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cmd {
        AuditCommand::Keygen { .. } => Ok(()),
        AuditCommand::Sessions {
            identity,
            database,
            since,
            until,
            limit,
            json,
        } => {
            let filter = SessionFilter {
                identity,
                database,
                since: since.as_deref().map(parse_time).transpose()?,
                until: until.as_deref().map(parse_time).transpose()?,
                // The store counts from the oldest; the newest N are cut here.
                limit: None,
            };
            let mut sessions: Vec<SessionSummary> =
                backend.call(AdminRequest::Sessions { filter })?;
            if let Some(n) = limit {
                sessions = newest(sessions, n);
            }
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&sessions)?)?;
            } else {
                print_sessions(&mut out, &sessions)?;
            }
            Ok(())
        }
        AuditCommand::Show { session, json } => {
            let detail: Option<SessionDetail> = backend.call(AdminRequest::Show {
                session: SessionId(session),
            })?;
            let detail = detail.with_context(|| format!("no session {session}"))?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&detail)?)?;
            } else {
                print_session(&mut out, &detail)?;
            }
            Ok(())
        }
        AuditCommand::Replay { session, json } => {
            let replay: Option<Replay> = backend.call(AdminRequest::Replay {
                session: SessionId(session),
            })?;
            let replay = replay.with_context(|| format!("no session {session}"))?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&replay)?)?;
            } else {
                print_replay(&mut out, &replay)?;
            }
            Ok(())
        }
        AuditCommand::Export {
            format,
            out: path,
            session,
            since,
            until,
        } => {
            let filter = ExportFilter {
                session: session.map(SessionId),
                since: since.as_deref().map(parse_time).transpose()?,
                until: until.as_deref().map(parse_time).transpose()?,
            };
            let mut sink: Box<dyn Write> = match &path {
                // Exports hold session recordings: private to the auditor by default.
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(p)
                        .with_context(|| format!("create {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            let n = export_all(&mut backend, format, &filter, &mut sink)?;
            sink.flush()?;
            eprintln!("exported {n} records");
            Ok(())
        }
        AuditCommand::Verify { public_key, json } => {
            let public_key = match public_key {
                Some(p) => Some(
                    std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?,
                ),
                None => None,
            };
            let given = public_key
                .as_deref()
                .and_then(|k| super::signing::parse_verifying_key(k).ok());
            let mut report: VerifyReport = backend.call(AdminRequest::Verify { public_key })?;
            // A running daemon checked the head-mark file when it started and keeps it current;
            // offline, the CLI compares the log with it (a lost tail verifies otherwise).
            if let Backend::Direct { store, key } = &backend {
                super::integrity::compare_with_head_mark(
                    &mut report,
                    store,
                    &super::integrity::head_mark_path(audit),
                    given.as_ref().or(key.as_ref()),
                )?;
            }
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                print_verify(&mut out, &report)?;
            }
            if !report.ok {
                bail!(
                    "audit log verification failed ({} problems)",
                    report.problems.len()
                );
            }
            Ok(())
        }
        AuditCommand::Stats { json } => {
            let stats: Stats = backend.call(AdminRequest::Stats)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
            } else {
                print_stats(&mut out, &stats)?;
            }
            Ok(())
        }
        AuditCommand::Prune => {
            let report: RetentionReport = match &mut backend {
                Backend::Daemon(_) => backend.call(AdminRequest::Retention)?,
                Backend::Direct { .. } => {
                    drop(backend);
                    let log = AuditLog::open(audit)?;
                    log.run_retention()?
                }
            };
            writeln!(
                out,
                "removed {} records ({} sessions); record bytes {} -> {}",
                report.removed_records,
                report.removed_sessions,
                report.record_bytes_before,
                report.record_bytes_after
            )?;
            Ok(())
        }
    }
}

/// `interceptor audit keygen --out FILE`.
pub fn keygen(out: &Path) -> anyhow::Result<()> {
    let k = signing::generate_keypair(out)?;
    println!(
        "private key: {} (mode 0600; set [audit] signing_key)",
        k.private_key.display()
    );
    println!("public key:  {} (give to auditors)", k.public_key.display());
    println!("public key (hex): {}", k.public_key_hex);
    println!("key id: {}", k.key_id);
    Ok(())
}

enum Backend {
    Daemon(AdminClient),
    Direct {
        store: Box<Store>,
        key: Option<ed25519_dalek::VerifyingKey>,
    },
}

impl Backend {
    fn connect(
        audit: &AuditConfig,
        admin_socket: Option<&std::path::Path>,
    ) -> anyhow::Result<Backend> {
        if let Some(socket) = admin_socket {
            match AdminClient::connect(socket) {
                Ok(c) => return Ok(Backend::Daemon(c)),
                Err(e) => {
                    tracing::debug!(error = %e, "admin socket not reachable; opening the store")
                }
            }
        }
        let store = match Store::open(&audit.dir) {
            Ok(s) => s,
            // Only a held lock means another process (the daemon) has the store open; any other
            // failure is the store's own (a corrupt or unreadable file), not the admin socket's.
            Err(e) if e.to_string().contains("could not acquire lock") => {
                return Err(anyhow::Error::new(e).context(
                    "cannot open the audit store: another process (the daemon?) holds it; \
                     configure an [admin] socket to query a running daemon",
                ));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot open the audit store in {}",
                    audit.dir.display()
                )));
            }
        };
        let key = match &audit.signing_key {
            Some(p) => match signing::load_signing_key(p) {
                Ok(k) => Some(k.verifying_key()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the signing key; pass --public-key");
                    None
                }
            },
            None => None,
        };
        Ok(Backend::Direct {
            store: Box::new(store),
            key,
        })
    }

    fn call<T: DeserializeOwned>(&mut self, req: AdminRequest) -> anyhow::Result<T> {
        let value = match self {
            Backend::Daemon(c) => c.request(&req)?,
            Backend::Direct { store, key } => {
                super::admin::handle(&Target::Offline { store, key: *key }, req)?
            }
        };
        Ok(serde_json::from_value(value)?)
    }
}

fn export_all(
    backend: &mut Backend,
    format: ExportFormat,
    filter: &ExportFilter,
    sink: &mut dyn Write,
) -> anyhow::Result<u64> {
    #[derive(serde::Deserialize)]
    struct Page {
        records: Vec<ExportRecord>,
        next: Option<RecordId>,
    }
    if format == ExportFormat::Csv {
        export::write_csv_header(sink)?;
    }
    let mut after = None;
    let mut n = 0u64;
    loop {
        let page: Page = backend.call(AdminRequest::Export {
            after,
            limit: 1000,
            filter: filter.clone(),
        })?;
        for rec in &page.records {
            match format {
                ExportFormat::Jsonl => export::write_jsonl(sink, rec)?,
                ExportFormat::Csv => export::write_csv(sink, rec)?,
            }
            n += 1;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(n),
        }
    }
}

/// RFC 3339, or an age (`90m`, `2h`, `7d`) counted back from now.
pub(crate) fn parse_time(s: &str) -> anyhow::Result<Timestamp> {
    if let Ok(t) = Timestamp::parse_rfc3339(s) {
        return Ok(t);
    }
    let age = humantime::parse_duration(s)
        .with_context(|| format!("`{s}` is neither an RFC 3339 time nor an age like `2h`"))?;
    Ok(Timestamp::now().saturating_sub(age))
}

/// The `n` newest sessions (by start), oldest of them first.
fn newest(mut sessions: Vec<SessionSummary>, n: usize) -> Vec<SessionSummary> {
    // The start record's position in the log orders sessions even across clock steps.
    sessions.sort_by_key(|s| (s.start_seq, s.started_at, s.session));
    let skip = sessions.len().saturating_sub(n);
    sessions.split_off(skip)
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |x| x.to_string())
}

fn print_sessions(out: &mut dyn Write, sessions: &[SessionSummary]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>8}  {:<20}  {:<16}  {:<12}  {:<27}  {:<27}  {:>6}  {:>6}  PROCESS",
        "SESSION", "IDENTITY", "PROOF", "DATABASE", "STARTED", "ENDED", "STMTS", "DENIED"
    )?;
    for s in sessions {
        // Padding applies to strings; the id's own Display ignores width.
        writeln!(
            out,
            "{:>8}  {:<20}  {:<16}  {:<12}  {:<27}  {:<27}  {:>6}  {:>6}  {}",
            s.session.to_string(),
            opt(&s.subject),
            opt(&s.proof),
            opt(&s.database),
            opt(&s.started_at),
            opt(&s.ended_at),
            s.statements,
            s.denied,
            opt(&s.process)
        )?;
    }
    Ok(())
}

fn print_session(out: &mut dyn Write, d: &SessionDetail) -> std::io::Result<()> {
    let s = &d.summary;
    writeln!(out, "session      {}", s.session)?;
    if let Some(st) = &d.start {
        writeln!(
            out,
            "identity     {} ({})",
            st.identity.subject, st.identity.display_name
        )?;
        writeln!(out, "groups       {}", st.identity.groups.join(", "))?;
        writeln!(
            out,
            "proof        {}",
            serde_json::to_string(&st.identity.proof).unwrap_or_default()
        )?;
        if let Some(p) = &st.identity.process {
            writeln!(
                out,
                "process      pid {} uid {} gid {} comm {} exe {} cgroup {}",
                p.pid,
                p.uid,
                p.gid,
                p.comm,
                opt(&p.exe),
                opt(&p.cgroup_path)
            )?;
        }
        writeln!(
            out,
            "peer         {}",
            serde_json::to_string(&st.peer).unwrap_or_default()
        )?;
        match &st.tls {
            Some(t) => writeln!(out, "tls          {} {}", t.version, t.cipher_suite)?,
            None => writeln!(out, "tls          none")?,
        }
        writeln!(out, "database     {}", st.database)?;
        writeln!(out, "role         {}", st.upstream_role)?;
    }
    writeln!(out, "started      {}", opt(&s.started_at))?;
    writeln!(
        out,
        "ended        {} ({})",
        opt(&s.ended_at),
        opt(&s.end_reason)
    )?;
    writeln!(out, "statements   {} ({} denied)", s.statements, s.denied)?;
    writeln!(
        out,
        "bytes        {} from client, {} to client",
        s.bytes_from_client, s.bytes_to_client
    )
}

fn print_replay(out: &mut dyn Write, r: &Replay) -> std::io::Result<()> {
    writeln!(
        out,
        "session {} {} @ {}",
        r.session.session,
        opt(&r.session.subject),
        opt(&r.session.database)
    )?;
    for e in &r.entries {
        match e {
            ReplayEntry::Statement {
                seq,
                at,
                statement,
                outcome,
                rows,
                ..
            } => {
                writeln!(
                    out,
                    "{at} {seq} {} [{}] {}",
                    statement.decision.to_uppercase(),
                    statement.rule.as_deref().unwrap_or("default"),
                    statement.sql
                )?;
                if let Some(a) = &statement.approval {
                    writeln!(out, "    approval {a}")?;
                }
                if let Some(o) = outcome {
                    writeln!(
                        out,
                        "    -> {}{} rows={} sqlstate={} {}us masked={}",
                        if o.command_tags.is_empty() {
                            "-".to_string()
                        } else {
                            o.command_tags.join("; ")
                        },
                        if o.skipped { " (skipped)" } else { "" },
                        opt(&o.rows),
                        opt(&o.sqlstate),
                        o.duration_us,
                        o.masking.values_masked
                    )?;
                }
                if let Some(rows) = rows {
                    writeln!(out, "    | {}", rows.columns.join(" | "))?;
                    for row in &rows.rows {
                        let cells: Vec<&str> =
                            row.iter().map(|c| c.as_deref().unwrap_or("NULL")).collect();
                        writeln!(out, "    | {}", cells.join(" | "))?;
                    }
                    if rows.truncated {
                        writeln!(out, "    | ... (truncated)")?;
                    }
                }
            }
            ReplayEntry::Event { seq, at, event } => {
                writeln!(
                    out,
                    "{at} {seq} {} {}",
                    event.kind(),
                    serde_json::to_string(event).unwrap_or_default()
                )?;
            }
        }
    }
    Ok(())
}

fn print_verify(out: &mut dyn Write, r: &VerifyReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} records ({} .. {}), {} checkpoints, signatures {}",
        if r.ok { "OK" } else { "FAILED" },
        r.records,
        opt(&r.first),
        opt(&r.last),
        r.checkpoints,
        if r.signatures_checked {
            format!("checked (key {})", opt(&r.key_id))
        } else {
            "NOT checked".to_string()
        }
    )?;
    for w in &r.warnings {
        writeln!(out, "warning: {w}")?;
    }
    for p in &r.problems {
        writeln!(
            out,
            "problem at {} (key {}): {}",
            opt(&p.seq),
            p.key,
            p.message
        )?;
    }
    Ok(())
}

fn print_stats(out: &mut dyn Write, s: &Stats) -> std::io::Result<()> {
    writeln!(out, "store        {}", s.dir)?;
    writeln!(
        out,
        "records      {} ({} .. {})",
        s.space.records,
        opt(&s.first),
        opt(&s.last)
    )?;
    writeln!(out, "record bytes {}", s.space.record_bytes)?;
    writeln!(out, "disk bytes   {}", s.space.disk_bytes)?;
    writeln!(out, "sessions     {}", s.sessions)?;
    writeln!(out, "checkpoints  {}", s.checkpoints)?;
    if let Some(b) = &s.base {
        writeln!(
            out,
            "base         {} (older records removed by retention)",
            b.seq
        )?;
    }
    if let Some(n) = s.syncs {
        writeln!(out, "commits      {n} since start")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{RecordId, SessionId};

    #[test]
    fn the_sessions_table_lines_up_and_shows_the_process() {
        let mut s = SessionSummary {
            session: SessionId(7),
            subject: Some("alice".into()),
            display_name: None,
            proof: Some("scram_sha256".into()),
            database: Some("app".into()),
            upstream_role: None,
            peer: None,
            process: Some("uid 1000 pid 42 /usr/bin/psql".into()),
            started_at: None,
            start_seq: None,
            ended_at: None,
            end_seq: None,
            end_reason: None,
            statements: 3,
            denied: 1,
            bytes_from_client: 0,
            bytes_to_client: 0,
            first_seq: RecordId(0),
            last_seq: None,
            last_at: None,
        };
        let mut out = Vec::new();
        print_sessions(&mut out, &[s.clone()]).unwrap();
        s.session = SessionId(12345);
        s.process = None;
        print_sessions(&mut out, &[s]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // The id column is right-aligned under its header.
        assert_eq!(lines[0].find("SESSION"), Some(1));
        assert!(lines[1].starts_with("       7  alice"), "{text}");
        assert!(lines[3].starts_with("   12345  alice"), "{text}");
        assert!(
            lines[1].ends_with("uid 1000 pid 42 /usr/bin/psql"),
            "{text}"
        );
        assert!(lines[3].ends_with("  -"), "{text}");
    }
}
