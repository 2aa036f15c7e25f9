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
    /// Interceptor's peak RSS (VmHWM) in KiB during each 1M-row stream.
    pub interceptor_stream_peak_rss_kib: Vec<u64>,
}

impl Measurements {
    pub fn record(&mut self, scenario: Scenario, target: Target, value: f64) {
        self.values
            .entry((scenario, target))
            .or_default()
            .push(value);
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
}

/// Medians and ratios per scenario and target, then derived rows: the latency interceptor and
/// pgbouncer add to a single-client query, and interceptor's peak RSS during the stream.
pub fn summarize(m: &Measurements) -> Vec<Row> {
    let mut rows = Vec::new();
    for scenario in Scenario::ALL {
        let direct = m.median_of(scenario, Target::Direct);
        for target in Target::ALL {
            let Some(value) = m.median_of(scenario, target) else {
                continue;
            };
            rows.push(Row {
                scenario: scenario.name().to_string(),
                target: target.name().to_string(),
                unit: scenario.unit().name().to_string(),
                median: value,
                ratio_to_direct: direct.filter(|d| *d > 0.0).map(|d| value / d),
            });
        }
    }
    let latency = Scenario::SelectOnlyOneClient;
    if let Some(direct) = m.median_of(latency, Target::Direct) {
        for target in [Target::Interceptor, Target::Pgbouncer] {
            if let Some(value) = m.median_of(latency, target) {
                rows.push(Row {
                    scenario: "select_only_c1_added_latency".to_string(),
                    target: target.name().to_string(),
                    unit: Unit::Ms.name().to_string(),
                    median: value - direct,
                    ratio_to_direct: None,
                });
            }
        }
    }
    let peaks: Vec<f64> = m
        .interceptor_stream_peak_rss_kib
        .iter()
        .map(|kib| *kib as f64 / 1024.0)
        .collect();
    if let Some(peak) = median(&peaks) {
        rows.push(Row {
            scenario: "stream_pgbench_accounts_peak_rss".to_string(),
            target: Target::Interceptor.name().to_string(),
            unit: "MiB".to_string(),
            median: peak,
            ratio_to_direct: None,
        });
    }
    rows
}

/// A fixed-width table of the rows, one line per row.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<36} {:<12} {:>5} {:>12} {:>9}\n",
        "scenario", "target", "unit", "median", "vs direct"
    );
    for r in rows {
        let ratio = r
            .ratio_to_direct
            .map(|x| format!("{x:.3}"))
            .unwrap_or_else(|| "-".to_string());
        out.push_str(&format!(
            "{:<36} {:<12} {:>5} {:>12.3} {:>9}\n",
            r.scenario, r.target, r.unit, r.median, ratio
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
        m.interceptor_stream_peak_rss_kib = vec![20480, 10240, 30720];

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
        let rss = find("stream_pgbench_accounts_peak_rss", "interceptor").unwrap();
        assert_eq!((rss.median, rss.unit.as_str()), (20.0, "MiB"));
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
