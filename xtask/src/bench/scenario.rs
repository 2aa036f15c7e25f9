//! What the benchmark measures and against what.

/// Where the client connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// PostgreSQL itself over TCP: the baseline.
    Direct,
    /// interceptor over TCP, connecting upstream over the unix socket.
    Interceptor,
    /// pgbouncer in session mode over TCP, upstream over the unix socket: a reference proxy.
    Pgbouncer,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Direct, Target::Interceptor, Target::Pgbouncer];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Interceptor => "interceptor",
            Target::Pgbouncer => "pgbouncer",
        }
    }
}

/// One benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    SelectOnlySimple,
    SelectOnlyExtended,
    SelectOnlyPrepared,
    TpcB,
    SelectOnlyOneClient,
    /// `SELECT * FROM pgbench_accounts` through psql, output discarded.
    StreamAccounts,
}

/// How a scenario's figure reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Transactions per second (higher is better).
    Tps,
    /// Milliseconds per query (lower is better).
    Ms,
    /// Seconds of wall-clock time (lower is better).
    Seconds,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Tps => "tps",
            Unit::Ms => "ms",
            Unit::Seconds => "s",
        }
    }
}

/// pgbench settings of a pgbench scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgbenchCase {
    pub clients: u32,
    pub threads: u32,
    /// `-M` query mode.
    pub mode: &'static str,
    /// `-S` (built-in select-only) instead of the TPC-B-like default.
    pub select_only: bool,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::SelectOnlySimple,
        Scenario::SelectOnlyExtended,
        Scenario::SelectOnlyPrepared,
        Scenario::TpcB,
        Scenario::SelectOnlyOneClient,
        Scenario::StreamAccounts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::SelectOnlySimple => "select_only_c8_simple",
            Scenario::SelectOnlyExtended => "select_only_c8_extended",
            Scenario::SelectOnlyPrepared => "select_only_c8_prepared",
            Scenario::TpcB => "tpcb_c8",
            Scenario::SelectOnlyOneClient => "select_only_c1_latency",
            Scenario::StreamAccounts => "stream_pgbench_accounts",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Scenario::SelectOnlyOneClient => Unit::Ms,
            Scenario::StreamAccounts => Unit::Seconds,
            _ => Unit::Tps,
        }
    }

    /// The pgbench settings, or `None` for the psql stream.
    pub fn pgbench(self) -> Option<PgbenchCase> {
        let c8 = |mode, select_only| PgbenchCase {
            clients: 8,
            threads: 2,
            mode,
            select_only,
        };
        match self {
            Scenario::SelectOnlySimple => Some(c8("simple", true)),
            Scenario::SelectOnlyExtended => Some(c8("extended", true)),
            Scenario::SelectOnlyPrepared => Some(c8("prepared", true)),
            Scenario::TpcB => Some(c8("simple", false)),
            Scenario::SelectOnlyOneClient => Some(PgbenchCase {
                clients: 1,
                threads: 1,
                mode: "simple",
                select_only: true,
            }),
            Scenario::StreamAccounts => None,
        }
    }
}
