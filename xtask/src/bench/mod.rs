//! `cargo xtask bench`: direct PostgreSQL, interceptor and pgbouncer (session mode) measured in
//! one run with the targets interleaved, each case repeated; medians printed and written to
//! `target/bench/latest.json`.

mod measure;
mod pgbench;
mod pgbouncer;
mod report;
mod scenario;
mod stats;

use std::time::Duration;

use anyhow::{Context, Result};
use interceptor_tests::pg::{APP_DB, APP_RW, APP_RW_PASSWORD};
use interceptor_tests::{ConnParams, Interceptor, InterceptorSetup, PgCluster, PgOptions};

use crate::setup::{self, Requirement};
use crate::{cmd, harness_env, test};
use measure::Endpoints;
use report::Measurements;
use scenario::{Scenario, Target};

/// The identity the benchmark's clients present to interceptor.
const BENCH_IDENTITY: &str = "bench";
/// The policy interceptor decides the benchmark's statements with.
const BENCH_POLICY: &str = include_str!("policy.toml");

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// One repetition of 3 s per pgbench case (a smoke run, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every case (default 3, or 1 with --quick).
    #[arg(long)]
    pub reps: Option<u32>,
    /// Seconds per pgbench run (default 10, or 3 with --quick).
    #[arg(long)]
    pub duration: Option<u64>,
    /// pgbench scale factor; 10 gives the 1M-row `pgbench_accounts` the stream reads.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Leave a proxy out (repeatable); direct PostgreSQL, the baseline, always runs.
    #[arg(long, value_enum)]
    pub skip: Vec<Skip>,
}

/// A target that `--skip` can leave out.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    Interceptor,
    Pgbouncer,
}

impl BenchArgs {
    fn reps(&self) -> u32 {
        self.reps.unwrap_or(if self.quick { 1 } else { 3 }).max(1)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(
            self.duration
                .unwrap_or(if self.quick { 3 } else { 10 })
                .max(1),
        )
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    setup::ensure(&[
        Requirement::PostgresServer,
        Requirement::Psql,
        Requirement::Pgbouncer,
    ])?;
    let with_interceptor = !args.skip.contains(&Skip::Interceptor);
    let with_pgbouncer = !args.skip.contains(&Skip::Pgbouncer);
    let bin = if with_interceptor {
        Some(release_interceptor()?)
    } else {
        None
    };
    harness_env::point_at(bin.as_deref());

    println!("== PostgreSQL with pgbench tables at scale {}", args.scale);
    let pg = PgCluster::start_with(PgOptions::default().accounts_fixture(false))?;
    pg.pgbench_init(args.scale)?;
    let password = APP_RW_PASSWORD;

    let policies = tempfile::Builder::new()
        .prefix("bench-policies-")
        .tempdir()
        .context("create policy dir")?;
    std::fs::write(policies.path().join("bench.toml"), BENCH_POLICY).context("write policy")?;
    let proxy = match &bin {
        Some(bin) => {
            println!(
                "== interceptor {} (audit on, log level warn)",
                bin.display()
            );
            Some(Interceptor::start(
                InterceptorSetup::new(&pg)
                    .identity(BENCH_IDENTITY, password, &["bench"], None)
                    .policy_dir(policies.path())
                    .with_audit()
                    .env("RUST_LOG", "warn")
                    .env("INTERCEPTOR_LOG", "warn"),
            )?)
        }
        None => None,
    };
    let bouncer = if with_pgbouncer {
        println!("== pgbouncer (session mode)");
        Some(pgbouncer::Pgbouncer::start(
            &pgbouncer::Upstream {
                socket_dir: pg.socket_dir().to_path_buf(),
                port: pg.port(),
                user: APP_RW.to_string(),
                password: password.to_string(),
            },
            interceptor_tests::os::PG_OS_USER,
        )?)
    } else {
        None
    };

    let endpoints = Endpoints {
        direct: pg.tcp_params(APP_RW, Some(password)).dbname(APP_DB),
        interceptor: match &proxy {
            Some(p) => Some((
                p.params(BENCH_IDENTITY).dbname(APP_DB),
                p.pid().context("interceptor is not running")?,
            )),
            None => None,
        },
        pgbouncer: bouncer
            .as_ref()
            .map(|b| ConnParams::new("127.0.0.1", b.port(), APP_RW, Some(password)).dbname(APP_DB)),
    };

    // Warm the caches once so the first measured target is not the one paying for cold pages.
    measure::stream(&endpoints.direct).context("warm-up stream")?;

    let reps = args.reps();
    let mut results = Measurements::default();
    for rep in 0..reps {
        for scenario in Scenario::ALL {
            // Rotate the target order each repetition so no target always runs first.
            let mut targets = Target::ALL;
            targets.rotate_left(rep as usize % Target::ALL.len());
            for target in targets.into_iter().filter(|t| endpoints.has(*t)) {
                let value =
                    measure::one(scenario, target, &endpoints, args.duration(), &mut results)
                        .with_context(|| {
                            format!(
                                "{} against {} (rep {})",
                                scenario.name(),
                                target.name(),
                                rep + 1
                            )
                        })?;
                println!(
                    "   rep {}/{reps} {:<26} {:<12} {value:>12.3} {}",
                    rep + 1,
                    scenario.name(),
                    target.name(),
                    scenario.unit().name()
                );
                results.record(scenario, target, value);
            }
        }
    }

    let rows = report::summarize(&results);
    println!(
        "\n== results: median of {reps} run(s), {} s per pgbench run, scale {}",
        args.duration().as_secs(),
        args.scale
    );
    print!("{}", report::table(&rows));
    let json = cmd::workspace_root().join("target/bench/latest.json");
    report::write_json(&rows, &json)?;
    println!("written: {}", json.display());
    if let Some(p) = &proxy
        && !p.logs().is_empty()
    {
        println!(
            "interceptor logged: {}",
            p.dir().join("interceptor.log").display()
        );
    }
    Ok(())
}

/// `INTERCEPTOR_BIN` if set, else a release build: a debug proxy would measure the compiler.
fn release_interceptor() -> Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("INTERCEPTOR_BIN").map(std::path::PathBuf::from)
        && bin.is_file()
    {
        println!("using INTERCEPTOR_BIN={}", bin.display());
        return Ok(bin);
    }
    test::build_interceptor_profile(true)
}
