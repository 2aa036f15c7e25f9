//! Turning repeated measurements into medians, ratios to direct PostgreSQL, a printed table and
//! `target/bench/latest.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::scenario::{Scenario, Target, Unit};
use super::stats::median;

/// Every measurement of one benchmark run, in the order taken.
#[derive(Debug, Default)]
pub struct Measurements {
    values: BTreeMap<(Scenario, Target), Vec<f64>>,
    /// Interceptor's peak RSS (VmHWM) in KiB during each stream through it.
    peak_rss_kib: BTreeMap<Scenario, Vec<u64>>,
    /// Bytes of text one whole stream carries (see `measure::stream_bytes`).
    stream_bytes: Option<u64>,
    /// The proxy's CPU time (user + system) per pgbench transaction, microseconds.
    cpu_us: BTreeMap<(Scenario, Target), Vec<f64>>,
    /// `fdatasync` latencies measured on the audit store's filesystem, seconds.
    fdatasync_s: Vec<f64>,
    /// `fdatasync` latencies timed during the fsync interceptor's runs of a case (medians).
    fdatasync_during_s: BTreeMap<Scenario, Vec<f64>>,
    /// Allocations per transaction in interceptor's counting build.
    allocations: BTreeMap<Scenario, Vec<f64>>,
}

impl Measurements {
    /// `stream_bytes`: the bytes of text one whole stream carries, for MB/s.
    pub fn new(stream_bytes: Option<u64>) -> Measurements {
        Measurements {
            stream_bytes,
            ..Measurements::default()
        }
    }

    pub fn record(&mut self, scenario: Scenario, target: Target, value: f64) {
        self.values
            .entry((scenario, target))
            .or_default()
            .push(value);
    }

    /// Interceptor's peak RSS during one run of the stream `scenario`.
    pub fn record_peak_rss(&mut self, scenario: Scenario, kib: u64) {
        self.peak_rss_kib.entry(scenario).or_default().push(kib);
    }

    /// The CPU time a proxy spent per transaction during one pgbench run.
    pub fn record_cpu(&mut self, scenario: Scenario, target: Target, us: f64) {
        self.cpu_us.entry((scenario, target)).or_default().push(us);
    }

    /// Allocations per transaction of one run through the counting build.
    pub fn record_allocations(&mut self, scenario: Scenario, per_txn: f64) {
        self.allocations.entry(scenario).or_default().push(per_txn);
    }

    /// One measurement of the audit filesystem's `fdatasync` latency.
    pub fn record_fdatasync(&mut self, seconds: f64) {
        self.fdatasync_s.push(seconds);
    }

    /// The median `fdatasync` latency while the fsync interceptor ran `scenario` once.
    pub fn record_fdatasync_during(&mut self, scenario: Scenario, seconds: f64) {
        self.fdatasync_during_s
            .entry(scenario)
            .or_default()
            .push(seconds);
    }

    fn median_of(&self, scenario: Scenario, target: Target) -> Option<f64> {
        self.values.get(&(scenario, target)).and_then(|v| median(v))
    }
}

/// One line of `latest.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub scenario: String,
    pub target: String,
    pub unit: String,
    pub median: f64,
    /// `median / direct median`; `null` for direct-less rows (added latency, memory).
    pub ratio_to_direct: Option<f64>,
    /// Masking rows only: the row the next field compares with (`scenario/target`, the same
    /// case through interceptor without masking).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// Masking rows only: `median / baseline median`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_baseline: Option<f64>,
}

impl Row {
    fn new(scenario: &str, target: Target, unit: &str, median: f64) -> Row {
        Row {
            scenario: scenario.to_string(),
            target: target.name().to_string(),
            unit: unit.to_string(),
            median,
            ratio_to_direct: None,
            baseline: None,
            ratio_to_baseline: None,
        }
    }
}

/// The name of the row a masked scenario is compared with.
fn baseline_name(unmasked: Scenario) -> String {
    format!("{}/{}", unmasked.name(), unmasked.proxy().name())
}

/// Medians and ratios per scenario and target, then derived rows: the latency interceptor and
/// pgbouncer add to single-client queries, the latency masking adds to a 100-row result, the
/// MB/s of text each stream through interceptor carries, and interceptor's peak RSS during the
/// streams.
pub fn summarize(m: &Measurements) -> Vec<Row> {
    let mut rows = Vec::new();
    for scenario in Scenario::ALL {
        let unmasked = scenario.unmasked();
        let direct = m.median_of(unmasked.unwrap_or(scenario), Target::Direct);
        for target in Target::ALL {
            let Some(value) = m.median_of(scenario, target) else {
                continue;
            };
            let mut row = Row::new(scenario.name(), target, scenario.unit().name(), value);
            row.ratio_to_direct = direct.filter(|d| *d > 0.0).map(|d| value / d);
            if let Some(base) = unmasked {
                row.baseline = Some(baseline_name(base));
                row.ratio_to_baseline = m
                    .median_of(base, base.proxy())
                    .filter(|b| *b > 0.0)
                    .map(|b| value / b);
            }
            rows.push(row);
        }
    }
    for (latency, name) in [
        (
            Scenario::SelectOnlyOneClient,
            "select_only_c1_added_latency",
        ),
        (Scenario::Rows100OneClient, "rows100_c1_added_latency"),
    ] {
        let Some(direct) = m.median_of(latency, Target::Direct) else {
            continue;
        };
        for target in [latency.proxy(), Target::InterceptorWrite, Target::Pgbouncer] {
            if let Some(value) = m.median_of(latency, target) {
                rows.push(Row::new(name, target, Unit::Ms.name(), value - direct));
            }
        }
    }
    for (masked, name) in [
        (
            Scenario::Rows100MaskColumn,
            "rows100_c1_mask_column_added_latency",
        ),
        (
            Scenario::Rows100MaskDetectors,
            "rows100_c1_mask_detectors_added_latency",
        ),
    ] {
        let base = Scenario::Rows100OneClient;
        if let (Some(value), Some(unmasked)) = (
            m.median_of(masked, masked.proxy()),
            m.median_of(base, base.proxy()),
        ) {
            let mut row = Row::new(name, masked.proxy(), Unit::Ms.name(), value - unmasked);
            row.baseline = Some(baseline_name(base));
            rows.push(row);
        }
    }
    for scenario in Scenario::ALL.into_iter().filter(|s| s.is_stream()) {
        if let (Some(bytes), Some(seconds)) = (
            m.stream_bytes,
            m.median_of(scenario, Target::Interceptor)
                .filter(|s| *s > 0.0),
        ) {
            let name = format!("{}_text_rate", scenario.name());
            rows.push(Row::new(
                &name,
                Target::Interceptor,
                "MB/s",
                bytes as f64 / 1e6 / seconds,
            ));
        }
    }
    // CPU per transaction (one statement for select-only, seven for TPC-B-like).
    for scenario in Scenario::ALL {
        let pgbouncer = m
            .cpu_us
            .get(&(scenario, Target::Pgbouncer))
            .and_then(|v| median(v));
        for target in Target::ALL {
            let Some(us) = m.cpu_us.get(&(scenario, target)).and_then(|v| median(v)) else {
                continue;
            };
            let name = format!("{}_cpu_per_txn", scenario.name());
            let mut row = Row::new(&name, target, "us", us);
            if target != Target::Pgbouncer
                && let Some(b) = pgbouncer.filter(|b| *b > 0.0)
            {
                row.baseline = Some(format!("{name}/pgbouncer"));
                row.ratio_to_baseline = Some(us / b);
            }
            rows.push(row);
        }
    }
    for (scenario, values) in &m.allocations {
        if let Some(v) = median(values) {
            let name = format!("{}_allocs_per_txn", scenario.name());
            rows.push(Row::new(&name, Target::Interceptor, "alloc", v));
        }
    }
    // The fsync ceiling: N closed-loop clients that each wait for one fdatasync per
    // statement cannot exceed N / latency statements per second (N / (latency × statements
    // per transaction) transactions). The latency is the one timed while the fsync
    // interceptor ran that case, where known (the disk is shared); else the idle probes'.
    let idle = median(&m.fdatasync_s).filter(|l| *l > 0.0);
    if let Some(latency) = idle {
        rows.push(Row::new(
            "audit_fdatasync_latency",
            Target::Interceptor,
            Unit::Ms.name(),
            latency * 1e3,
        ));
    }
    for scenario in Scenario::ALL {
        let Some(case) = scenario.pgbench() else {
            continue;
        };
        let during = m
            .fdatasync_during_s
            .get(&scenario)
            .and_then(|v| median(v))
            .filter(|l| *l > 0.0);
        if let Some(l) = during {
            let name = format!("{}_fdatasync_during", scenario.name());
            rows.push(Row::new(
                &name,
                Target::Interceptor,
                Unit::Ms.name(),
                l * 1e3,
            ));
        }
        if scenario.unit() != Unit::Tps || !scenario.runs_on(Target::Interceptor) {
            continue;
        }
        let Some(latency) = during.or(idle) else {
            continue;
        };
        let ceiling = f64::from(case.clients)
            / (latency * f64::from(case.script.statements_per_transaction()));
        let name = format!("{}_fsync_ceiling", scenario.name());
        let mut row = Row::new(&name, Target::Interceptor, Unit::Tps.name(), ceiling);
        if let Some(tps) = m.median_of(scenario, Target::Interceptor) {
            // Here "vs unmasked" reads: interceptor (fsync) as a fraction of the ceiling.
            row.baseline = Some(format!("{}/interceptor", scenario.name()));
            row.ratio_to_baseline = Some(tps / ceiling);
        }
        rows.push(row);
    }
    for scenario in Scenario::ALL {
        let peaks: Vec<f64> = m
            .peak_rss_kib
            .get(&scenario)
            .into_iter()
            .flatten()
            .map(|kib| *kib as f64 / 1024.0)
            .collect();
        if let Some(peak) = median(&peaks) {
            let name = format!("{}_peak_rss", scenario.name());
            rows.push(Row::new(&name, Target::Interceptor, "MiB", peak));
        }
    }
    rows
}

/// A fixed-width table of the rows, one line per row.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<48} {:<18} {:>5} {:>12} {:>9} {:>11}\n",
        "scenario", "target", "unit", "median", "vs direct", "vs baseline"
    );
    let ratio = |r: Option<f64>| {
        r.map(|x| format!("{x:.3}"))
            .unwrap_or_else(|| "-".to_string())
    };
    for r in rows {
        out.push_str(&format!(
            "{:<48} {:<18} {:>5} {:>12.3} {:>9} {:>11}\n",
            r.scenario,
            r.target,
            r.unit,
            r.median,
            ratio(r.ratio_to_direct),
            ratio(r.ratio_to_baseline)
        ));
    }
    out
}

/// Writes the rows as a JSON array, creating the directory.
pub fn write_json(rows: &[Row], path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(rows).context("serialize results")?;
    std::fs::write(path, json + "\n").with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_ratios_and_derived_rows() {
        let mut m = Measurements::default();
        for (t, v) in [
            (Target::Direct, 1000.0),
            (Target::Direct, 1200.0),
            (Target::Direct, 1100.0),
        ] {
            m.record(Scenario::SelectOnlySimple, t, v);
        }
        for v in [800.0, 900.0, 700.0] {
            m.record(Scenario::SelectOnlySimple, Target::Interceptor, v);
        }
        m.record(Scenario::SelectOnlyOneClient, Target::Direct, 0.10);
        m.record(Scenario::SelectOnlyOneClient, Target::Interceptor, 0.16);
        m.record(
            Scenario::SelectOnlyOneClient,
            Target::InterceptorWrite,
            0.13,
        );
        for kib in [20480, 10240, 30720] {
            m.record_peak_rss(Scenario::StreamAccounts, kib);
        }

        let rows = summarize(&m);
        let find = |s: &str, t: &str| rows.iter().find(|r| r.scenario == s && r.target == t);

        let direct = find("select_only_c8_simple", "direct").unwrap();
        assert_eq!(direct.median, 1100.0);
        assert_eq!(direct.ratio_to_direct, Some(1.0));
        assert_eq!(direct.unit, "tps");
        let proxied = find("select_only_c8_simple", "interceptor").unwrap();
        assert_eq!(proxied.median, 800.0);
        assert!((proxied.ratio_to_direct.unwrap() - 800.0 / 1100.0).abs() < 1e-12);
        assert!(find("select_only_c8_simple", "pgbouncer").is_none());

        let added = find("select_only_c1_added_latency", "interceptor").unwrap();
        assert!((added.median - 0.06).abs() < 1e-12);
        assert_eq!(added.ratio_to_direct, None);
        let added_write = find("select_only_c1_added_latency", "interceptor_write").unwrap();
        assert!((added_write.median - 0.03).abs() < 1e-12);
        let rss = find("stream_pgbench_accounts_peak_rss", "interceptor").unwrap();
        assert!(find("audit_fdatasync_latency", "interceptor").is_none());
        assert_eq!((rss.median, rss.unit.as_str()), (20.0, "MiB"));
        // Unmasked rows carry no baseline.
        assert_eq!(proxied.baseline, None);
        assert_eq!(proxied.ratio_to_baseline, None);
    }

    #[test]
    fn masked_rows_compare_with_the_unmasked_case_through_interceptor() {
        let mut m = Measurements::new(Some(100_000_000));
        m.record(Scenario::StreamAccounts, Target::Direct, 0.5);
        m.record(Scenario::StreamAccounts, Target::Interceptor, 0.8);
        m.record(Scenario::StreamAccountsMaskColumn, Target::Interceptor, 1.0);
        m.record(
            Scenario::StreamAccountsMaskDetectors,
            Target::Interceptor,
            1.6,
        );
        m.record(Scenario::Rows100OneClient, Target::Direct, 0.3);
        m.record(Scenario::Rows100OneClient, Target::InterceptorTmpfs, 2.0);
        m.record(Scenario::Rows100MaskColumn, Target::InterceptorTmpfs, 2.25);

        let rows = summarize(&m);
        let find = |s: &str| {
            rows.iter()
                .find(|r| r.scenario == s && r.target.starts_with("interceptor"))
                .unwrap_or_else(|| panic!("no row {s}"))
        };
        let column = find("stream_pgbench_accounts_mask_column");
        assert_eq!(
            column.baseline.as_deref(),
            Some("stream_pgbench_accounts/interceptor")
        );
        assert!((column.ratio_to_baseline.unwrap() - 1.25).abs() < 1e-12);
        assert!((column.ratio_to_direct.unwrap() - 2.0).abs() < 1e-12);
        let detectors = find("stream_pgbench_accounts_mask_detectors");
        assert!((detectors.ratio_to_baseline.unwrap() - 2.0).abs() < 1e-12);

        let rate = find("stream_pgbench_accounts_mask_column_text_rate");
        assert_eq!((rate.median, rate.unit.as_str()), (100.0, "MB/s"));
        let rate = find("stream_pgbench_accounts_text_rate");
        assert!((rate.median - 125.0).abs() < 1e-9);

        let added = find("rows100_c1_mask_column_added_latency");
        assert!((added.median - 0.25).abs() < 1e-12);
        assert_eq!(added.unit, "ms");
        assert_eq!(added.target, "interceptor_tmpfs");
        assert_eq!(
            find("rows100_c1_latency_mask_column").baseline.as_deref(),
            Some("rows100_c1_latency/interceptor_tmpfs")
        );
        assert!((find("rows100_c1_added_latency").median - 1.7).abs() < 1e-12);
        // No detectors measurement for 100 rows: no derived row either.
        assert!(
            !rows
                .iter()
                .any(|r| r.scenario == "rows100_c1_mask_detectors_added_latency")
        );
        // A masked scenario never runs against direct PostgreSQL or pgbouncer.
        assert!(
            rows.iter()
                .filter(|r| r.scenario.contains("mask"))
                .all(|r| r.target.starts_with("interceptor"))
        );
    }

    #[test]
    fn cpu_per_transaction_and_the_fsync_ceiling() {
        let mut m = Measurements::default();
        m.record(Scenario::SelectOnlySimple, Target::Interceptor, 3000.0);
        for us in [40.0, 60.0, 50.0] {
            m.record_cpu(Scenario::SelectOnlySimple, Target::Interceptor, us);
        }
        m.record_cpu(Scenario::SelectOnlySimple, Target::Pgbouncer, 25.0);
        m.record_fdatasync(0.002);
        m.record_fdatasync(0.002);
        m.record_allocations(Scenario::TpcB, 70.0);
        let rows = summarize(&m);
        let find = |s: &str, t: &str| {
            rows.iter()
                .find(|r| r.scenario == s && r.target == t)
                .unwrap_or_else(|| panic!("no row {s}/{t}"))
        };
        let cpu = find("select_only_c8_simple_cpu_per_txn", "interceptor");
        assert_eq!((cpu.median, cpu.unit.as_str()), (50.0, "us"));
        assert_eq!(cpu.ratio_to_baseline, Some(2.0));
        let bouncer = find("select_only_c8_simple_cpu_per_txn", "pgbouncer");
        assert_eq!(bouncer.ratio_to_baseline, None);
        let allocs = find("tpcb_c8_allocs_per_txn", "interceptor");
        assert_eq!((allocs.median, allocs.unit.as_str()), (70.0, "alloc"));
        let latency = find("audit_fdatasync_latency", "interceptor");
        assert!((latency.median - 2.0).abs() < 1e-9);
        // 8 clients, 2 ms per sync: at most 4000 tps; 3000 measured is 0.75 of it.
        let ceiling = find("select_only_c8_simple_fsync_ceiling", "interceptor");
        assert!((ceiling.median - 4000.0).abs() < 1e-6);
        assert!((ceiling.ratio_to_baseline.unwrap() - 0.75).abs() < 1e-9);
        let c32 = find("select_only_c32_simple_fsync_ceiling", "interceptor");
        assert!((c32.median - 16000.0).abs() < 1e-6);
        assert_eq!(c32.ratio_to_baseline, None);
        // No ceiling for latency scenarios or the write-mode interceptor.
        assert!(
            !rows
                .iter()
                .any(|r| r.scenario == "select_only_c1_latency_fsync_ceiling")
        );

        // Timed during the case's own runs, the disk's latency then is the one that counts.
        m.record_fdatasync_during(Scenario::SelectOnlySimple, 0.004);
        m.record_fdatasync_during(Scenario::SelectOnlySimple, 0.006);
        m.record_fdatasync_during(Scenario::SelectOnlySimple, 0.005);
        let rows = summarize(&m);
        let find = |s: &str| {
            rows.iter()
                .find(|r| r.scenario == s && r.target == "interceptor")
                .unwrap_or_else(|| panic!("no row {s}"))
        };
        assert!((find("select_only_c8_simple_fdatasync_during").median - 5.0).abs() < 1e-9);
        let ceiling = find("select_only_c8_simple_fsync_ceiling");
        assert!((ceiling.median - 1600.0).abs() < 1e-6);
        assert!((ceiling.ratio_to_baseline.unwrap() - 3000.0 / 1600.0).abs() < 1e-9);
        // Cases without a timing of their own keep the idle probes' latency.
        assert!((find("select_only_c32_simple_fsync_ceiling").median - 16000.0).abs() < 1e-6);
        // A TPC-B-like transaction is 7 statements, each waiting for its own sync.
        assert!((find("tpcb_c8_fsync_ceiling").median - 8.0 / (0.002 * 7.0)).abs() < 1e-6);
    }

    #[test]
    fn json_is_an_array_of_the_five_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench/latest.json");
        let rows = vec![Row {
            scenario: "tpcb_c8".into(),
            target: "pgbouncer".into(),
            unit: "tps".into(),
            median: 412.5,
            ratio_to_direct: Some(0.97),
            baseline: None,
            ratio_to_baseline: None,
        }];
        write_json(&rows, &path).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            back,
            serde_json::json!([{"scenario": "tpcb_c8", "target": "pgbouncer", "unit": "tps",
                                "median": 412.5, "ratio_to_direct": 0.97}])
        );
    }
}
