//! The process-wide metrics registry (Prometheus / OpenMetrics text). Other modules count
//! through the small functions here; values that already live elsewhere (audit queue, syncs,
//! kernel counters, pending approvals, live relay bytes) are handed to [`render`] at each scrape.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SessionLabels {
    pub identity: String,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatementLabels {
    // Static: counting a statement looks its series up without allocating.
    pub decision: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SqlstateLabels {
    pub sqlstate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MaskLabels {
    pub column: String,
    pub strategy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EventLabels {
    pub event: String,
}

pub(crate) struct Metrics {
    registry: Registry,
    pub sessions_open: Family<SessionLabels, Gauge>,
    pub sessions: Family<SessionLabels, Counter>,
    pub statements: Family<StatementLabels, Counter>,
    pub refusals: Family<SqlstateLabels, Counter>,
    pub masked_values: Family<MaskLabels, Counter>,
    pub audit_commit_seconds: Histogram,
    pub audit_queue_depth: Gauge,
    pub audit_syncs: Counter,
    pub audit_unwritable: Gauge,
    pub approvals_pending: Gauge,
    pub upstream_errors: Counter,
    pub upstream_login_seconds: Histogram,
    pub relay_bytes: Family<DirectionLabels, Counter>,
    pub kernel: Family<EventLabels, Counter>,
    pub reloads: Family<EventLabels, Counter>,
    /// Serialises scrapes: counters mirrored from elsewhere are advanced by differences.
    scrape: Mutex<()>,
}

/// The registry every module counts into.
pub(crate) static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn latency() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 17))
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("interceptor");
        let m = Metrics {
            registry: Registry::default(),
            sessions_open: Family::default(),
            sessions: Family::default(),
            statements: Family::default(),
            refusals: Family::default(),
            masked_values: Family::default(),
            audit_commit_seconds: latency(),
            audit_queue_depth: Gauge::default(),
            audit_syncs: Counter::default(),
            audit_unwritable: Gauge::default(),
            approvals_pending: Gauge::default(),
            upstream_errors: Counter::default(),
            upstream_login_seconds: latency(),
            relay_bytes: Family::default(),
            kernel: Family::default(),
            reloads: Family::default(),
            scrape: Mutex::new(()),
        };
        r.register(
            "sessions_open",
            "Client sessions open now",
            m.sessions_open.clone(),
        );
        r.register("sessions", "Client sessions started", m.sessions.clone());
        r.register(
            "statements",
            "Statements decided, by decision and statement kind",
            m.statements.clone(),
        );
        r.register(
            "refusals",
            "Errors interceptor itself sent to clients, by SQLSTATE",
            m.refusals.clone(),
        );
        r.register(
            "masked_values",
            "Values masked in results, by column and strategy",
            m.masked_values.clone(),
        );
        r.register(
            "audit_commit_seconds",
            "Time of one audit group commit (write, and fdatasync with durability = fsync)",
            m.audit_commit_seconds.clone(),
        );
        r.register(
            "audit_queue_depth",
            "Audit records queued and not yet committed",
            m.audit_queue_depth.clone(),
        );
        r.register(
            "audit_syncs",
            "Audit group commits completed",
            m.audit_syncs.clone(),
        );
        r.register(
            "audit_unwritable",
            "1 when the audit trail failed and every statement is refused",
            m.audit_unwritable.clone(),
        );
        r.register(
            "approvals_pending",
            "Held statements waiting for a decision",
            m.approvals_pending.clone(),
        );
        r.register(
            "upstream_errors",
            "Failed upstream logins to PostgreSQL",
            m.upstream_errors.clone(),
        );
        r.register(
            "upstream_login_seconds",
            "Time to open and authenticate an upstream session",
            m.upstream_login_seconds.clone(),
        );
        r.register(
            "relay_bytes",
            "Bytes relayed, by direction (from_client, to_client)",
            m.relay_bytes.clone(),
        );
        r.register(
            "kernel",
            "eBPF steering counters (steered, dropped, exempted, recorded, identified)",
            m.kernel.clone(),
        );
        r.register(
            "reloads",
            "Configuration and policy reloads, by outcome",
            m.reloads.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

/// A statement was decided (its audit record appended).
pub(crate) fn statement(
    decision: &'static str,
    kinds: impl Iterator<Item = &'static str>,
    refused: Option<&str>,
) {
    let mut any = false;
    for kind in kinds {
        any = true;
        METRICS
            .statements
            .get_or_create(&StatementLabels { decision, kind })
            .inc();
    }
    if !any {
        METRICS
            .statements
            .get_or_create(&StatementLabels {
                decision,
                kind: "none",
            })
            .inc();
    }
    if let Some(code) = refused {
        refusal(code);
    }
}

/// interceptor sent the client an error of its own with this SQLSTATE.
pub(crate) fn refusal(sqlstate: &str) {
    METRICS
        .refusals
        .get_or_create(&SqlstateLabels {
            sqlstate: sqlstate.to_owned(),
        })
        .inc();
}

/// The masked values of one finished statement.
pub(crate) fn masked(summary: &crate::mask::MaskSummary) {
    for c in summary.entries() {
        METRICS
            .masked_values
            .get_or_create(&MaskLabels {
                column: c.target.label(),
                strategy: c.strategy.as_str().to_owned(),
            })
            .inc_by(c.values);
    }
}

/// One audit group commit took `elapsed`.
pub(crate) fn audit_commit(elapsed: Duration) {
    METRICS.audit_commit_seconds.observe(elapsed.as_secs_f64());
}

/// Advances a mirrored counter to `now` (never backwards).
fn advance(c: &Counter, now: u64) {
    let seen = c.get();
    if now > seen {
        c.inc_by(now - seen);
    }
}

/// Values that live elsewhere (audit queue, syncs, pending approvals, relay bytes, kernel
/// counters), read from the running daemon at each scrape.
#[derive(Debug, Default)]
pub(crate) struct Scrape {
    pub audit_queued: usize,
    pub audit_failed: bool,
    pub audit_syncs: u64,
    /// `None` without `[approvals]`.
    pub approvals_pending: Option<usize>,
    pub from_client: u64,
    pub to_client: u64,
    /// `None` without kernel steering (or when its status cannot be read).
    pub kernel: Option<crate::ebpf::Counters>,
}

/// The text exposition, with the values read from the running daemon brought up to date.
pub(crate) fn render(now: &Scrape) -> String {
    let m = &*METRICS;
    let _one = m.scrape.lock().unwrap_or_else(|p| p.into_inner());
    m.audit_queue_depth.set(now.audit_queued as i64);
    m.audit_unwritable.set(i64::from(now.audit_failed));
    advance(&m.audit_syncs, now.audit_syncs);
    if let Some(pending) = now.approvals_pending {
        m.approvals_pending.set(pending as i64);
    }
    let dir = |d: &str| DirectionLabels {
        direction: d.to_owned(),
    };
    advance(
        &m.relay_bytes.get_or_create(&dir("from_client")),
        now.from_client,
    );
    advance(
        &m.relay_bytes.get_or_create(&dir("to_client")),
        now.to_client,
    );
    if let Some(c) = &now.kernel {
        for (event, v) in [
            ("steered", c.steered),
            ("dropped", c.dropped),
            ("exempted", c.exempted),
            ("recorded", c.recorded),
            ("identified", c.identified),
        ] {
            advance(
                &m.kernel.get_or_create(&EventLabels {
                    event: event.to_owned(),
                }),
                v,
            );
        }
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &m.registry).is_err() {
        tracing::error!("cannot encode the metrics");
    }
    out
}
