//! `cargo xtask demo`: a throwaway PostgreSQL with sample data, interceptor in front of it, a
//! short scripted psql session through the proxy (policy decisions, masking, a held statement
//! approved from "a second terminal", kernel interception where the host allows it), the audit
//! trail, then connection instructions and a wait for Ctrl-C. Everything is torn down on the way
//! out, also after an error.

mod approval;
mod binary;
mod cli;
mod kernel;
mod masking;
mod psql;
mod steps;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use interceptor_tests::pg::APP_DB;
use interceptor_tests::{ConnParams, Interceptor, InterceptorSetup, PgCluster, PgOptions};

use crate::setup::{self, Requirement};
use crate::{cmd, harness_env};
use cli::InterceptorCli;
use masking::{AGENT, EXEMPT, EXEMPT_GROUP};
use steps::{Expect, STEPS, Step};

/// The policy the demo runs with (shown to the user by path).
const DEMO_POLICY: &str = include_str!("policy.toml");

pub fn run(no_wait: bool) -> Result<()> {
    // A signal only raises a flag, so every resource below is released by its Drop (the kernel
    // step's programs included). SIGHUP: the terminal running the demo was closed.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("install signal handler")?;
    }

    setup::ensure(&[Requirement::PostgresServer, Requirement::Psql])?;
    let bin = binary::interceptor()?;
    harness_env::point_at(Some(&bin));
    println!("   `interceptor` below is {}", bin.display());
    interrupted(&stop)?;

    println!("\n== starting a throwaway PostgreSQL with sample data (table `accounts`)");
    let pg = PgCluster::start_with(PgOptions::default())?;
    println!(
        "   PostgreSQL listens on 127.0.0.1:{} and {}",
        pg.port(),
        pg.socket_dir().display()
    );
    interrupted(&stop)?;

    let password = random_password()?;
    let auditor_password = random_password()?;
    println!("== starting interceptor in front of it");
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(AGENT, &password, &["demo"], None)
            .identity(EXEMPT, &auditor_password, &[EXEMPT_GROUP], None)
            .policy_file("demo", DEMO_POLICY)
            .with_audit()
            .extra_toml(&approval::config_toml(current_uid())?),
    )?;
    println!(
        "   interceptor listens on 127.0.0.1:{}; its config: {}",
        proxy.port(),
        proxy.config_path().display()
    );
    if let Some(dir) = proxy.policy_dir() {
        println!(
            "   policy: {} (from xtask/src/demo/policy.toml)",
            dir.join("demo.toml").display()
        );
    }
    println!(
        "   identities: `{AGENT}` (the agent, group demo) and `{EXEMPT}` (group {EXEMPT_GROUP})"
    );
    let params = proxy.params(AGENT).dbname(APP_DB);
    let failed = |n: usize| format!("demo step {n} failed; interceptor's log:\n{}", proxy.logs());

    let mut n = 0;
    for step in STEPS {
        n += 1;
        interrupted(&stop)?;
        run_step(n, step, &params).with_context(|| failed(n))?;
    }
    n += 1;
    interrupted(&stop)?;
    masking::run(n, &proxy).with_context(|| failed(n))?;
    n += 1;
    interrupted(&stop)?;
    approval::run(n, &bin, &proxy, &stop).with_context(|| failed(n))?;

    show_audit(&InterceptorCli::new(&bin).with_config(proxy.config_path()))?;

    n += 1;
    interrupted(&stop)?;
    let kernel = kernel::run(n, &bin, &pg, &password, &stop)
        .with_context(|| format!("demo step {n} (kernel interception) failed"))?;

    println!("\n== connect by hand (passwords included):");
    for (who, pw) in [(AGENT, &password), (EXEMPT, &auditor_password)] {
        println!(
            "   PGPASSWORD={} psql {}",
            cmd::quote(pw),
            cmd::quote(&format!(
                "host=127.0.0.1 port={} user={who} dbname={APP_DB} sslmode=disable",
                proxy.port()
            ))
        );
    }
    if let Some(k) = &kernel {
        println!(
            "   PostgreSQL's own port, steered into the second interceptor by the kernel \
             (programs pinned under {}):",
            k.pin_dir().display()
        );
        println!("   {}", k.connect_line());
    }
    println!(
        "   interceptor's log: {}",
        proxy.dir().join("interceptor.log").display()
    );
    if no_wait {
        println!("\n== --no-wait: stopping interceptor and PostgreSQL");
        return Ok(());
    }
    println!("\n== running; press Ctrl-C to stop interceptor and PostgreSQL");
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("\n== stopping interceptor and PostgreSQL");
    drop(kernel);
    drop(proxy);
    drop(pg);
    println!("   stopped");
    Ok(())
}

/// The audit trail of the steps above, as an auditor reads it: the sessions, the replay of the
/// session whose statement was refused, and the tamper check.
fn show_audit(audit: &InterceptorCli) -> Result<()> {
    println!("\n== the audit trail of this demo (every statement was on disk before it ran)");
    audit.shown("audit", &["sessions"])?;
    let sessions = audit.json("audit", &["sessions", "--json"])?;
    if let Some(refused) = sessions
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["denied"].as_u64().unwrap_or(0) > 0)
        .and_then(|s| s["session"].as_u64())
    {
        audit.shown("audit", &["replay", &refused.to_string()])?;
    }
    let verify = audit.shown("audit", &["verify"])?;
    if !verify.starts_with("OK") {
        bail!("audit verify did not report OK");
    }
    Ok(())
}

/// Shows one step (title, explanation, the command and its output) and checks its expectation.
fn run_step(n: usize, step: &Step, params: &ConnParams) -> Result<()> {
    println!("\n-- {n}. {}", step.title);
    println!("   {}", step.explain);
    let out = psql::run_shown(params, step.sql)?;
    match step.expect {
        Expect::Output(text) => {
            if !out.success() {
                bail!("psql failed ({}): {}", out.status, out.stderr.trim());
            }
            if !out.stdout.contains(text) {
                bail!("expected the output to contain {text:?}");
            }
        }
        Expect::Rejected { sqlstate } => {
            if out.success() {
                bail!("expected SQLSTATE {sqlstate}, but the statement succeeded");
            }
            // VERBOSITY=verbose makes psql print `ERROR:  <SQLSTATE>: <message>`.
            if !out.stderr.contains(&format!("ERROR:  {sqlstate}:")) {
                bail!("expected SQLSTATE {sqlstate}, got: {}", out.stderr.trim());
            }
        }
    }
    Ok(())
}

/// Fails once Ctrl-C (or SIGTERM/SIGHUP) arrived, so the demo unwinds and cleans up.
fn interrupted(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// A fresh password for a demo identity (hex of 12 bytes from the kernel's CSPRNG).
fn random_password() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_tests::pg::{APP_RW, APP_RW_PASSWORD};

    /// The steps that pass through the proxy encode PostgreSQL's own behaviour: run against
    /// PostgreSQL directly as the demo's upstream role, each of them meets its expectation.
    /// (Refusals are the policy's, so they are left out here.)
    #[test]
    fn allowed_steps_hold_against_postgresql_itself() {
        let pg = PgCluster::start_with(PgOptions::default()).unwrap();
        let params = pg.tcp_params(APP_RW, Some(APP_RW_PASSWORD)).dbname(APP_DB);
        let allowed = STEPS
            .iter()
            .filter(|s| matches!(s.expect, Expect::Output(_)));
        for (n, step) in allowed.enumerate() {
            run_step(n + 1, step, &params)
                .unwrap_or_else(|e| panic!("step {} ({}): {e:#}", n + 1, step.title));
        }
    }

    /// The checker really checks: wrong expectations fail in both directions.
    #[test]
    fn unmet_expectations_fail_the_step() {
        let pg = PgCluster::start_with(PgOptions::default()).unwrap();
        let params = pg.tcp_params(APP_RW, Some(APP_RW_PASSWORD)).dbname(APP_DB);
        let wrong_output = Step {
            title: "t",
            explain: "e",
            sql: "SELECT 1 AS one",
            expect: Expect::Output("two"),
        };
        assert!(run_step(1, &wrong_output, &params).is_err());
        let succeeded_instead = Step {
            expect: Expect::Rejected { sqlstate: "42501" },
            ..wrong_output
        };
        assert!(run_step(1, &succeeded_instead, &params).is_err());
        let other_sqlstate = Step {
            sql: "SELECT * FROM no_such_table",
            expect: Expect::Rejected { sqlstate: "42501" },
            ..wrong_output
        };
        let err = run_step(1, &other_sqlstate, &params).unwrap_err();
        assert!(format!("{err:#}").contains("42P01"), "{err:#}");
    }
}
