//! `cargo xtask soak --minutes N`: interceptor under sustained mixed load, then the books are
//! balanced.
//!
//! For N minutes, against a throwaway PostgreSQL (`log_statement = 'all'`) behind interceptor
//! (audit on, every statement allowed): pgbench with steady clients (TPC-B-like and select-only
//! transactions, simple protocol), pgbench reconnecting for every transaction (`-C`), a loop of
//! COPY out and COPY in, and a loop of `pg_sleep` statements that psql cancels (SIGINT makes it
//! send a CancelRequest). The daemon's RSS and open file descriptors are sampled every few
//! seconds. At the end:
//! - every statement PostgreSQL logged for the application role has an audit record, and the
//!   counts are equal (the audit trail records nothing PostgreSQL did not run but the cancelled
//!   and the refused, of which there are none here);
//! - no client saw an error the soak did not cause itself (cancels are its own);
//! - RSS and fds after warm-up (the first fifth) are flat: the last quarter's mean is within
//!   20 % (and 16 MiB) of the second fifth's, fds within 16.
//!
//! Not part of CI (it runs for minutes); `cargo xtask soak --minutes 3` is a quick check.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use interceptor_tests::pg::APP_RW;
use interceptor_tests::{
    ConnParams, Interceptor, InterceptorSetup, PgCluster, PgCommand, PgOptions,
};

use crate::setup::{self, Requirement};
use crate::{harness_env, test};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Steady pgbench clients.
    #[arg(long, default_value_t = 8)]
    pub clients: u32,
    /// Soak a release build (default: the debug build `cargo xtask test` uses).
    #[arg(long)]
    pub release: bool,
}

const IDENTITY: &str = "soak";
const PASSWORD: &str = "soak-Long-Run-7";
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
}

fn sample(pid: u32, started: Instant) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample {
        at: started.elapsed(),
        rss_kib,
        fds,
    })
}

/// Counters the load threads keep.
#[derive(Default)]
struct Tally {
    copies: AtomicU64,
    cancels: AtomicU64,
    /// Errors the soak did not cause (anything but its own cancels).
    unexpected: AtomicU64,
}

fn psql(params: &ConnParams) -> Command {
    let mut c = Command::new(interceptor_tests::os::pg_bin_dir().join("psql"));
    c.envs(params.libpq_env())
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn copy_loop(params: &ConnParams, stop: &AtomicBool, tally: &Tally) {
    let rows: String = (0..2000).map(|i| format!("{i}\tsoak row {i}\n")).collect();
    while !stop.load(Ordering::Relaxed) {
        let out = PgCommand::psql(params)
            .args([
                "-c",
                "COPY (SELECT aid, abalance, filler FROM pgbench_accounts WHERE aid <= 5000) TO STDOUT",
            ])
            .run();
        let inn = PgCommand::psql(params)
            .args(["-c", "COPY soak_copy FROM STDIN"])
            .stdin(rows.clone())
            .run();
        for r in [out, inn] {
            match r {
                Ok(o) if o.success() => {
                    tally.copies.fetch_add(1, Ordering::Relaxed);
                }
                Ok(o) => {
                    eprintln!("soak: COPY failed: {}", o.stderr.trim());
                    tally.unexpected.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("soak: COPY did not run: {e:#}");
                    tally.unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// psql runs a long sleep; SIGINT makes it send a CancelRequest (through interceptor).
fn cancel_loop(pg: &PgCluster, params: &ConnParams, stop: &AtomicBool, tally: &Tally) {
    while !stop.load(Ordering::Relaxed) {
        let child = psql(params).args(["-c", "SELECT pg_sleep(5.5)"]).spawn();
        let Ok(child) = child else {
            tally.unexpected.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // Cancel what runs (psql quits without a CancelRequest while it is still connecting).
        if pg
            .wait_for_active_query("pg_sleep(5.5)", Duration::from_secs(10))
            .is_err()
        {
            eprintln!("soak: the statement to cancel never started");
            tally.unexpected.fetch_add(1, Ordering::Relaxed);
        }
        interceptor_tests::os::signal(child.id(), libc::SIGINT);
        match child.wait_with_output() {
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("canceling statement") => {
                tally.cancels.fetch_add(1, Ordering::Relaxed);
            }
            Ok(o) => {
                eprintln!(
                    "soak: a cancel did not cancel: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                tally.unexpected.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                tally.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `pgbench` for `secs`; its errors (failed transactions, aborted clients) count as unexpected.
fn pgbench(params: &ConnParams, args: &[String], secs: u64, tally: &Tally) -> Result<u64> {
    let out = PgCommand::pgbench(params)
        .args(args.iter().cloned())
        .args(["-n", "-M", "simple", "-T", &secs.to_string()])
        .args(["-b", "tpcb-like@1", "-b", "select-only@4"])
        .timeout(Duration::from_secs(secs + 120))
        .run()?;
    if !out.success() {
        tally.unexpected.fetch_add(1, Ordering::Relaxed);
        eprintln!("soak: pgbench failed: {}", out.stderr.trim());
    }
    let tx = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split(['/', ' ']).next()?.parse().ok())
        .unwrap_or(0);
    let failed: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    tally.unexpected.fetch_add(failed, Ordering::Relaxed);
    Ok(tx)
}

pub fn run(args: &SoakArgs) -> Result<()> {
    setup::ensure(&[Requirement::PostgresServer, Requirement::Psql])?;
    let bin = if args.release {
        test::build_interceptor_profile(true)?
    } else {
        test::interceptor_bin()?
    };
    harness_env::point_at(Some(&bin));
    let secs = args.minutes.max(1) * 60;

    println!("== PostgreSQL (log_statement = 'all'), pgbench scale 2");
    let pg = PgCluster::start_with(
        PgOptions::default()
            .log_statement_all(true)
            .accounts_fixture(false)
            .extra_conf("max_connections = 100"),
    )?;
    pg.pgbench_init(2)?;
    pg.psql(&format!(
        "CREATE TABLE soak_copy (a int, b text); GRANT ALL ON soak_copy TO {APP_RW};"
    ))?;
    println!("== interceptor {} (audit on)", bin.display());
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(IDENTITY, PASSWORD, &["soak"], Some(APP_RW))
            .allow_all_policies()
            .with_audit()
            .env("INTERCEPTOR_LOG", "warn"),
    )?;
    let pid = proxy.pid().context("interceptor pid")?;
    let params = proxy.params(IDENTITY);
    let log_offset = pg.server_log().len();

    println!(
        "== {} min: pgbench {} clients + 2 reconnecting, COPY out/in loop, cancel loop",
        args.minutes, args.clients
    );
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut samples = Vec::new();
    let (steady_tx, reconnect_tx) = thread::scope(|s| -> Result<(u64, u64)> {
        let steady = s.spawn(|| {
            let a = [
                "-c".to_owned(),
                args.clients.to_string(),
                "-j".to_owned(),
                "2".to_owned(),
            ];
            pgbench(&params, &a, secs, &tally)
        });
        let reconnect = s.spawn(|| {
            let a = ["-c".to_owned(), "2".to_owned(), "-C".to_owned()];
            pgbench(&params, &a, secs, &tally)
        });
        s.spawn(|| copy_loop(&params, &stop, &tally));
        s.spawn(|| cancel_loop(&pg, &params, &stop, &tally));
        while started.elapsed() < Duration::from_secs(secs) {
            if let Some(x) = sample(pid, started) {
                samples.push(x);
            }
            thread::sleep(SAMPLE_EVERY);
        }
        stop.store(true, Ordering::Relaxed);
        let steady = steady
            .join()
            .map_err(|_| anyhow::anyhow!("pgbench thread"))??;
        let reconnect = reconnect
            .join()
            .map_err(|_| anyhow::anyhow!("pgbench thread"))??;
        Ok((steady, reconnect))
    })?;
    if let Some(x) = sample(pid, started) {
        samples.push(x);
    }
    let elapsed = started.elapsed();

    // The books: PostgreSQL's statements against the audit trail's.
    thread::sleep(Duration::from_millis(500));
    let marker = format!(" {APP_RW}@");
    let log = pg.server_log();
    let executed = log[log_offset.min(log.len())..]
        .lines()
        .filter(|l| l.contains(&marker) && l.contains("LOG:  statement: "))
        .count();
    let records = proxy.audit_records()?;
    let recorded = records
        .iter()
        .map(|r| r.get("event").unwrap_or(r))
        .filter(|e| e["type"] == "statement")
        .count();
    let sessions = records
        .iter()
        .map(|r| r.get("event").unwrap_or(r))
        .filter(|e| e["type"] == "session_start")
        .count();
    let logs = proxy.logs();
    let panics = logs.matches("panicked").count();

    let warm = samples.len() / 5;
    let mean = |xs: &[Sample], f: fn(&Sample) -> u64| -> u64 {
        if xs.is_empty() {
            0
        } else {
            xs.iter().map(f).sum::<u64>() / xs.len() as u64
        }
    };
    let early = &samples[warm.min(samples.len())..(2 * warm).min(samples.len())];
    let late = &samples[(samples.len() * 3 / 4).min(samples.len())..];
    let rss = |s: &Sample| s.rss_kib;
    let fds = |s: &Sample| s.fds as u64;
    let (rss_early, rss_late) = (mean(early, rss), mean(late, rss));
    let (fds_early, fds_late) = (mean(early, fds), mean(late, fds));
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);

    println!(
        "\n== soak summary ({:.0} s, {})",
        elapsed.as_secs_f64(),
        bin.display()
    );
    println!("pgbench transactions: {steady_tx} steady, {reconnect_tx} reconnecting");
    println!(
        "sessions started: {sessions}; COPY statements: {}; cancels: {}",
        tally.copies.load(Ordering::Relaxed),
        tally.cancels.load(Ordering::Relaxed)
    );
    println!("statements PostgreSQL logged: {executed}; statement records: {recorded}");
    println!(
        "RSS MiB: after warm-up {:.1}, last quarter {:.1}, peak {:.1}; fds: {fds_early} -> {fds_late}",
        rss_early as f64 / 1024.0,
        rss_late as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!(
        "samples (s, RSS MiB, fds): {}",
        samples
            .iter()
            .map(|s| format!(
                "{}:{:.0}/{}",
                s.at.as_secs(),
                s.rss_kib as f64 / 1024.0,
                s.fds
            ))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let mut problems = Vec::new();
    let unexpected = tally.unexpected.load(Ordering::Relaxed);
    if unexpected > 0 {
        problems.push(format!("{unexpected} client errors the soak did not cause"));
    }
    if executed != recorded {
        problems.push(format!(
            "PostgreSQL ran {executed} statements, the audit trail records {recorded}"
        ));
    }
    if panics > 0 {
        problems.push(format!("{panics} panics in the daemon's log"));
    }
    if rss_late > rss_early + (rss_early / 5).max(16 * 1024) {
        problems.push(format!(
            "RSS grew after warm-up: {rss_early} KiB -> {rss_late} KiB"
        ));
    }
    if fds_late > fds_early + 16 {
        problems.push(format!("fds grew after warm-up: {fds_early} -> {fds_late}"));
    }
    if steady_tx == 0 || tally.copies.load(Ordering::Relaxed) == 0 {
        problems.push("the load did not run".into());
    }
    if !problems.is_empty() {
        bail!("soak failed:\n  {}", problems.join("\n  "));
    }
    println!("soak passed");
    Ok(())
}
