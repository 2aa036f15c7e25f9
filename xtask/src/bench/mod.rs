//! `cargo xtask bench`: direct PostgreSQL, interceptor and pgbouncer (session mode) measured in
//! one run with the targets interleaved, each case repeated; medians printed and written to
//! `target/bench/latest.json`. Masking cases run through interceptor only, as identities whose
//! policies differ from the unmasked one by their `[mask]` section alone.

mod allocs;
mod measure;
mod pgbench;
mod pgbouncer;
mod profile;
mod report;
mod scenario;
mod stats;

use std::time::Duration;

use anyhow::{Context, Result};
use interceptor_tests::pg::{APP_DB, APP_RW, APP_RW_PASSWORD};
use interceptor_tests::{ConnParams, Interceptor, InterceptorSetup, PgCluster, PgOptions};

use crate::setup::{self, Requirement};
use crate::{cmd, harness_env, test};
use measure::{Endpoints, ProxyEndpoint};
use report::Measurements;
use scenario::{Masking, Scenario, Target};

/// The identity the benchmark's clients present to interceptor.
const BENCH_IDENTITY: &str = "bench";
/// The identities of the masking cases (same policy rules, one `[mask]` section each).
const MASK_COLUMN_IDENTITY: &str = "bench-mask-column";
const MASK_DETECTORS_IDENTITY: &str = "bench-mask-detectors";
/// The policy interceptor decides the benchmark's statements with.
const BENCH_POLICY: &str = include_str!("policy.toml");
const MASK_COLUMN: &str = include_str!("mask_column.toml");
const MASK_DETECTORS: &str = include_str!("mask_detectors.toml");
/// The pseudonym key of this throwaway benchmark (a secret only in a real deployment).
const BENCH_PSEUDONYM_KEY: &str = "bench-pseudonym-key-not-a-secret";

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
    /// After the measurements, `perf record` each proxy (interceptor fsync and write, pgbouncer)
    /// during select-only, 8 clients, simple; summaries go to target/bench/profile-*.txt.
    #[arg(long)]
    pub profile: bool,
}

/// A target that `--skip` can leave out.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    Interceptor,
    Pgbouncer,
    /// The allocation count (saves building `interceptor-alloc-count`).
    Allocations,
}

impl BenchArgs {
    fn reps(&self) -> u32 {
        self.reps.unwrap_or(if self.quick { 1 } else { 3 }).max(1)
    }

    /// Rounds of the stream family per repetition (3, or 1 with --quick).
    fn stream_rounds(&self) -> u32 {
        if self.quick { 1 } else { 3 }
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
    let alloc_bin = if with_interceptor && !args.skip.contains(&Skip::Allocations) {
        Some(allocs::build()?)
    } else {
        None
    };
    harness_env::point_at(bin.as_deref());

    println!("== PostgreSQL with pgbench tables at scale {}", args.scale);
    // pgbouncer keeps its 32 server connections of the 32-client case open while interceptor
    // opens its own 32: more than the harness default allows.
    let pg = PgCluster::start_with(
        PgOptions::default()
            .accounts_fixture(false)
            .extra_conf("max_connections = 200"),
    )?;
    pg.pgbench_init(args.scale)?;
    let password = APP_RW_PASSWORD;

    let policies = tempfile::Builder::new()
        .prefix("bench-policies-")
        .tempdir()
        .context("create policy dir")?;
    std::fs::write(policies.path().join("bench.toml"), BENCH_POLICY).context("write policy")?;
    for (identity, mask) in [
        (MASK_COLUMN_IDENTITY, MASK_COLUMN),
        (MASK_DETECTORS_IDENTITY, MASK_DETECTORS),
    ] {
        std::fs::write(
            policies.path().join(format!("{identity}.toml")),
            masked_policy(identity, mask)?,
        )
        .context("write masking policy")?;
    }
    let rows100_script = policies.path().join("rows100.sql");
    std::fs::write(&rows100_script, measure::rows100_script(args.scale))
        .context("write pgbench script")?;
    // fsync on tmpfs returns at once (see `Target::InterceptorTmpfs`).
    let shm_audit = tempfile::Builder::new()
        .prefix("bench-audit-")
        .tempdir_in("/dev/shm")
        .context("create an audit dir on /dev/shm")?;
    let proxies = match &bin {
        Some(bin) => {
            println!(
                "== interceptor {} (audit on, log level warn), a second one with its audit store \
                 on tmpfs for the 100-row latency cases, a third with [audit] durability = \"write\"",
                bin.display()
            );
            let start = |audit_on_tmpfs: Option<&std::path::Path>, durability: &str| {
                let setup = InterceptorSetup::new(&pg)
                    .identity(BENCH_IDENTITY, password, &["bench"], None)
                    .identity(
                        MASK_COLUMN_IDENTITY,
                        password,
                        &[MASK_COLUMN_IDENTITY],
                        None,
                    )
                    .identity(
                        MASK_DETECTORS_IDENTITY,
                        password,
                        &[MASK_DETECTORS_IDENTITY],
                        None,
                    )
                    .pseudonym_key(BENCH_PSEUDONYM_KEY)
                    .policy_dir(policies.path())
                    .env("RUST_LOG", "warn")
                    .env("INTERCEPTOR_LOG", "warn")
                    .audit_durability(durability);
                Interceptor::start(match audit_on_tmpfs {
                    Some(dir) => setup.audit_dir(dir.join("audit")),
                    None => setup.with_audit(),
                })
            };
            Some((
                start(None, "fsync")?,
                start(Some(shm_audit.path()), "fsync")?,
                start(None, "write")?,
            ))
        }
        None => None,
    };
    // A fourth interceptor, the allocation-counting build (durability = "write": allocations
    // do not depend on the disk), for one run per case.
    let alloc_count_file = policies.path().join("allocations");
    let counting = match &alloc_bin {
        Some(bin) => {
            println!("== {} (allocations per statement)", bin.display());
            Some(Interceptor::start(
                InterceptorSetup::new(&pg)
                    .binary(bin)
                    .identity(BENCH_IDENTITY, password, &["bench"], None)
                    .policy_dir(policies.path())
                    .env("RUST_LOG", "warn")
                    .env("INTERCEPTOR_LOG", "warn")
                    .env(
                        allocs::COUNT_FILE_ENV,
                        &alloc_count_file.display().to_string(),
                    )
                    .audit_durability("write")
                    .with_audit(),
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
        interceptor: match &proxies {
            Some((p, _, _)) => Some(proxy_endpoint(p)?),
            None => None,
        },
        interceptor_tmpfs: match &proxies {
            Some((_, p, _)) => Some(proxy_endpoint(p)?),
            None => None,
        },
        interceptor_write: match &proxies {
            Some((_, _, p)) => Some(proxy_endpoint(p)?),
            None => None,
        },
        pgbouncer: bouncer
            .as_ref()
            .map(|b| ConnParams::new("127.0.0.1", b.port(), APP_RW, Some(password)).dbname(APP_DB)),
        pgbouncer_pid: bouncer.as_ref().map(|b| b.pid()),
        rows100_script,
        fsync_audit_dir: proxies
            .as_ref()
            .and_then(|(p, _, _)| p.audit_dir())
            .filter(|d| d.is_dir()),
    };

    // Warm the caches once so the first measured target is not the one paying for cold pages;
    // the same pass counts the bytes of text a stream carries.
    let stream_bytes = measure::stream_bytes(&endpoints.direct).context("warm-up stream")?;
    let mut results = Measurements::new(Some(stream_bytes));
    for p in [&endpoints.interceptor, &endpoints.interceptor_tmpfs]
        .into_iter()
        .flatten()
    {
        check_masking(p)?;
    }

    // The fsync ceiling's latency, on the filesystem of the fsync interceptor's audit store,
    // before and after the runs (a shared disk's latency drifts).
    let audit_fs = proxies
        .as_ref()
        .and_then(|(p, _, _)| p.audit_dir())
        .filter(|d| d.is_dir());
    let probe_fdatasync = |results: &mut Measurements| -> Result<()> {
        if let Some(dir) = &audit_fs {
            let latency = measure::fdatasync_latency(dir, 200)?;
            println!(
                "   fdatasync on the audit filesystem ({}): {:.3} ms",
                dir.display(),
                latency.as_secs_f64() * 1e3
            );
            results.record_fdatasync(latency.as_secs_f64());
        }
        Ok(())
    };
    probe_fdatasync(&mut results)?;

    let reps = args.reps();
    for rep in 0..reps {
        for (scenario, target) in schedule(rep, args.stream_rounds(), &|s, t| endpoints.has(s, t)) {
            let value = measure::one(scenario, target, &endpoints, args.duration(), &mut results)
                .with_context(|| {
                format!(
                    "{} against {} (rep {})",
                    scenario.name(),
                    target.name(),
                    rep + 1
                )
            })?;
            println!(
                "   rep {}/{reps} {:<40} {:<18} {value:>10.3} {}",
                rep + 1,
                scenario.name(),
                target.name(),
                scenario.unit().name()
            );
            results.record(scenario, target, value);
        }
    }

    probe_fdatasync(&mut results)?;
    if let Some(p) = &counting {
        let params = p.params(BENCH_IDENTITY).dbname(APP_DB);
        for scenario in allocs::SCENARIOS {
            let per_txn =
                allocs::per_transaction(scenario, &params, &alloc_count_file, args.duration())
                    .with_context(|| format!("allocations of {}", scenario.name()))?;
            println!(
                "   allocations {:<40} {per_txn:>10.1} per transaction",
                scenario.name()
            );
            results.record_allocations(scenario, per_txn);
        }
    }
    if args.profile {
        let proxies = [
            ("interceptor-fsync", Target::Interceptor),
            ("interceptor-write", Target::InterceptorWrite),
            ("pgbouncer", Target::Pgbouncer),
        ];
        for (label, target) in proxies {
            let (Some(pid), Some(params)) = (
                endpoints.proxy_pid(target),
                endpoints.params(target, Masking::None),
            ) else {
                continue;
            };
            let path = profile::run(label, pid, params, args.duration())
                .with_context(|| format!("profile of {label}"))?;
            println!("== profile of {label}: {}", path.display());
            print!("{}", std::fs::read_to_string(&path).unwrap_or_default());
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
    for p in proxies.iter().flat_map(|(a, b, c)| [a, b, c]) {
        if !p.logs().is_empty() {
            println!(
                "interceptor logged: {}",
                p.dir().join("interceptor.log").display()
            );
        }
    }
    Ok(())
}

/// The measurements of repetition `rep`, in order. Targets rotate each repetition so none
/// always runs first; every other repetition runs the scenarios backwards, so a masked case
/// does not always follow its baseline (load on a shared machine drifts). The streams, short
/// and the most sensitive to drift, run as one family: `stream_rounds` rounds of every stream
/// against every target, each round rotated.
fn schedule(
    rep: u32,
    stream_rounds: u32,
    runs: &dyn Fn(Scenario, Target) -> bool,
) -> Vec<(Scenario, Target)> {
    let mut scenarios = Scenario::ALL;
    if rep % 2 == 1 {
        scenarios.reverse();
    }
    let mut targets = Target::ALL;
    targets.rotate_left(rep as usize % Target::ALL.len());
    let cases = |s: Scenario| {
        targets
            .into_iter()
            .filter(move |t| runs(s, *t))
            .map(move |t| (s, t))
    };
    let mut steps = Vec::new();
    let mut streams_scheduled = false;
    for scenario in scenarios {
        if !scenario.is_stream() {
            steps.extend(cases(scenario));
            continue;
        }
        if std::mem::replace(&mut streams_scheduled, true) {
            continue;
        }
        let family: Vec<(Scenario, Target)> = scenarios
            .into_iter()
            .filter(|s| s.is_stream())
            .flat_map(cases)
            .collect();
        for round in 0..stream_rounds as usize {
            let mut order = family.clone();
            let n = order.len();
            if n > 0 {
                order.rotate_left(round % n);
            }
            steps.extend(order);
        }
    }
    steps
}

/// The identities of one interceptor instance.
fn proxy_endpoint(p: &Interceptor) -> Result<ProxyEndpoint> {
    Ok(ProxyEndpoint {
        unmasked: p.params(BENCH_IDENTITY).dbname(APP_DB),
        mask_column: p.params(MASK_COLUMN_IDENTITY).dbname(APP_DB),
        mask_detectors: p.params(MASK_DETECTORS_IDENTITY).dbname(APP_DB),
        pid: p.pid().context("interceptor is not running")?,
    })
}

/// `policy.toml` for another identity, with a `[mask]` section appended.
fn masked_policy(identity: &str, mask: &str) -> Result<String> {
    let replace_once = |text: &str, from: &str, to: &str| -> Result<String> {
        anyhow::ensure!(
            text.matches(from).count() == 1,
            "bench policy.toml must hold `{from}` exactly once"
        );
        Ok(text.replacen(from, to, 1))
    };
    let policy = replace_once(
        BENCH_POLICY,
        "name = \"bench\"",
        &format!("name = \"{identity}\""),
    )?;
    let policy = replace_once(
        &policy,
        "groups = [\"bench\"]",
        &format!("groups = [\"{identity}\"]"),
    )?;
    Ok(format!("{policy}\n{mask}"))
}

/// Fails unless each masking identity really masks: a value its rule covers (column) or a
/// card number (detectors) must not come back in clear, and the unmasked identity must see
/// it in clear. Otherwise the masking rows would time an unmasked stream.
fn check_masking(p: &ProxyEndpoint) -> Result<()> {
    const FILLER: &str = "SELECT filler FROM pgbench_accounts WHERE aid = 1";
    const CARD: &str = "SELECT '4111 1111 1111 1111'::text";
    let unmasked = p.params(Masking::None);
    let filler = measure::psql_output(unmasked, FILLER)?;
    anyhow::ensure!(
        filler.trim_end_matches('\n').len() == 84,
        "unmasked filler is not 84 characters: {filler:?}"
    );
    let masked = measure::psql_output(p.params(Masking::Column), FILLER)?;
    anyhow::ensure!(
        masked.starts_with("p_") && masked != filler,
        "the column rule did not pseudonymise filler: {masked:?}"
    );
    let card = measure::psql_output(unmasked, CARD)?;
    anyhow::ensure!(card.contains("4111 1111"), "unmasked card: {card:?}");
    let redacted = measure::psql_output(p.params(Masking::Detectors), CARD)?;
    anyhow::ensure!(
        redacted.contains("[REDACTED:card]"),
        "the detectors did not redact a card number: {redacted:?}"
    );
    println!("== masking identities checked: filler pseudonymised, card numbers redacted");
    Ok(())
}

/// `INTERCEPTOR_BIN` if set, else a release build: a debug proxy would measure the compiler.
fn release_interceptor() -> Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("INTERCEPTOR_BIN").map(std::path::PathBuf::from)
        && bin.is_file()
    {
        // Absolute: the harness starts it from other working directories.
        let bin = std::path::absolute(&bin)?;
        println!("using INTERCEPTOR_BIN={}", bin.display());
        return Ok(bin);
    }
    test::build_interceptor_profile(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_policies_differ_from_the_bench_policy_only_by_name_group_and_mask() {
        let p = masked_policy(MASK_COLUMN_IDENTITY, MASK_COLUMN).unwrap();
        assert!(p.contains("name = \"bench-mask-column\""));
        assert!(p.contains("groups = [\"bench-mask-column\"]"));
        assert!(!p.contains("groups = [\"bench\"]"));
        assert!(p.ends_with(MASK_COLUMN));
        assert_eq!(
            p.replace("bench-mask-column", "bench")
                .strip_suffix(MASK_COLUMN)
                .map(|base| base.trim_end().to_string()),
            Some(BENCH_POLICY.trim_end().to_string())
        );
        let d = masked_policy(MASK_DETECTORS_IDENTITY, MASK_DETECTORS).unwrap();
        assert!(d.contains("all = true"));
    }

    #[test]
    fn schedule_interleaves_stream_rounds_and_runs_every_case() {
        let all = |_: Scenario, _: Target| true;
        let proxy_only = |s: Scenario, t: Target| s.runs_on(t);
        let steps = schedule(0, 3, &proxy_only);
        let streams: Vec<_> = steps.iter().filter(|(s, _)| s.is_stream()).collect();
        // direct, interceptor, pgbouncer for the plain stream; interceptor for each masked one.
        assert_eq!(streams.len(), 3 * 5);
        // Consecutive streams: each round starts at a different case.
        assert_ne!(streams[0], streams[5]);
        assert_ne!(streams[5], streams[10]);
        for rep in 0..4 {
            let steps = schedule(rep, 1, &proxy_only);
            for scenario in Scenario::ALL {
                let n = steps.iter().filter(|(s, _)| *s == scenario).count();
                let expected = Target::ALL.iter().filter(|t| scenario.runs_on(**t)).count();
                assert_eq!(n, expected, "{scenario:?} in rep {rep}");
            }
            assert!(steps.iter().all(|(s, t)| s.runs_on(*t)));
        }
        // Odd repetitions run backwards: the masked 100-row case before its baseline.
        let pos = |steps: &[(Scenario, Target)], s: Scenario| {
            steps.iter().position(|(x, _)| *x == s).unwrap()
        };
        let even = schedule(0, 1, &all);
        let odd = schedule(1, 1, &all);
        assert!(pos(&even, Scenario::Rows100OneClient) < pos(&even, Scenario::Rows100MaskColumn));
        assert!(pos(&odd, Scenario::Rows100OneClient) > pos(&odd, Scenario::Rows100MaskColumn));
    }

    #[test]
    fn rows100_script_stays_inside_the_table() {
        let script = measure::rows100_script(10);
        assert!(
            script.starts_with("\\set aid random(1, 999901)\n"),
            "{script}"
        );
        assert!(script.contains("BETWEEN :aid AND :aid + 99;"));
    }
}
