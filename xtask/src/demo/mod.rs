//! `cargo xtask demo`: a throwaway PostgreSQL with sample data, interceptor in front of it, a
//! short scripted psql session through the proxy, then connection instructions and a wait for
//! Ctrl-C. Everything is torn down on the way out, also after an error.

mod steps;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use interceptor_tests::pg::APP_DB;
use interceptor_tests::{
    ConnParams, Interceptor, InterceptorSetup, PgCluster, PgCommand, PgOptions,
};

use crate::setup::{self, Requirement};
use crate::{cmd, harness_env, test};
use steps::{Expect, STEPS, Step};

const DEMO_IDENTITY: &str = "demo";
/// The policy the demo runs with (shown to the user by path).
const DEMO_POLICY: &str = include_str!("policy.toml");

pub fn run(no_wait: bool) -> Result<()> {
    // Ctrl-C only raises a flag, so every resource below is released by its Drop.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("install signal handler")?;
    }

    setup::ensure(&[Requirement::PostgresServer, Requirement::Psql])?;
    let bin = test::interceptor_bin()?;
    harness_env::point_at(Some(&bin));
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
    let policies = tempfile::Builder::new()
        .prefix("demo-policies-")
        .tempdir()
        .context("create policy dir")?;
    std::fs::write(policies.path().join("demo.toml"), DEMO_POLICY).context("write policy")?;
    println!("== starting interceptor ({}) in front of it", bin.display());
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(DEMO_IDENTITY, &password, &["demo"], None)
            .policy_dir(policies.path())
            .with_audit(),
    )?;
    println!(
        "   interceptor listens on 127.0.0.1:{}; its config: {}",
        proxy.port(),
        proxy.config_path().display()
    );
    println!(
        "   policy: {} (from xtask/src/demo/policy.toml)",
        policies.path().join("demo.toml").display()
    );
    let params = proxy.params(DEMO_IDENTITY).dbname(APP_DB);

    for (n, step) in STEPS.iter().enumerate() {
        interrupted(&stop)?;
        run_step(n + 1, step, &params, proxy.port()).with_context(|| {
            format!(
                "demo step {} failed; interceptor's log:\n{}",
                n + 1,
                proxy.logs()
            )
        })?;
    }

    show_audit(&bin, proxy.config_path())?;

    println!("\n== connect by hand (password of the demo identity `{DEMO_IDENTITY}` included):");
    println!(
        "   PGPASSWORD={} psql {}",
        cmd::quote(&password),
        cmd::quote(&format!(
            "host=127.0.0.1 port={} user={DEMO_IDENTITY} dbname={APP_DB} sslmode=disable",
            proxy.port()
        ))
    );
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
    drop(proxy);
    drop(pg);
    drop(policies);
    println!("   stopped");
    Ok(())
}

/// The audit trail of the steps above, as an auditor reads it: the sessions, the replay of the
/// session whose statement was refused, and the tamper check.
fn show_audit(bin: &std::path::Path, config: &std::path::Path) -> Result<()> {
    let audit = |args: &[&str]| -> Result<String> {
        println!(
            "$ interceptor audit -c {} {}",
            config.display(),
            args.join(" ")
        );
        let out = std::process::Command::new(bin)
            .arg("audit")
            .arg("-c")
            .arg(config)
            .args(args)
            .output()
            .context("run interceptor audit")?;
        if !out.status.success() {
            bail!(
                "interceptor audit {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    println!("\n== the audit trail of this demo (every statement was on disk before it ran)");
    print!("{}", audit(&["sessions"])?);
    let sessions: Vec<serde_json::Value> =
        serde_json::from_str(&audit(&["sessions", "--json"])?).context("parse sessions")?;
    if let Some(refused) = sessions
        .iter()
        .find(|s| s["denied"].as_u64().unwrap_or(0) > 0)
        .and_then(|s| s["session"].as_u64())
    {
        print!("{}", audit(&["replay", &refused.to_string()])?);
    }
    let verify = audit(&["verify"])?;
    print!("{verify}");
    if !verify.starts_with("OK") {
        bail!("audit verify did not report OK");
    }
    Ok(())
}

/// Shows one step (title, explanation, the command and its output) and checks its expectation.
fn run_step(n: usize, step: &Step, params: &ConnParams, port: u16) -> Result<()> {
    println!("\n-- {n}. {}", step.title);
    println!("   {}", step.explain);
    println!(
        "$ psql -h 127.0.0.1 -p {} -U {} -d {} -c {}",
        port,
        DEMO_IDENTITY,
        APP_DB,
        cmd::quote(step.sql)
    );
    let out = PgCommand::psql(params)
        .args(["-v", "VERBOSITY=verbose", "-c", step.sql])
        .timeout(Duration::from_secs(30))
        .run()?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
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

fn interrupted(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A fresh password for the demo identity (hex of 12 bytes from the kernel's CSPRNG).
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
            run_step(n + 1, step, &params, pg.port())
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
        assert!(run_step(1, &wrong_output, &params, pg.port()).is_err());
        let succeeded_instead = Step {
            expect: Expect::Rejected { sqlstate: "42501" },
            ..wrong_output
        };
        assert!(run_step(1, &succeeded_instead, &params, pg.port()).is_err());
        let other_sqlstate = Step {
            sql: "SELECT * FROM no_such_table",
            expect: Expect::Rejected { sqlstate: "42501" },
            ..wrong_output
        };
        let err = run_step(1, &other_sqlstate, &params, pg.port()).unwrap_err();
        assert!(format!("{err:#}").contains("42P01"), "{err:#}");
    }
}
