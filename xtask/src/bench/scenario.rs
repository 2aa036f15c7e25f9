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
    /// A second interceptor, the same but for its audit store on tmpfs (`/dev/shm`), where
    /// fsync returns at once: for the 100-row latency cases only. The disk's group-commit wait
    /// (milliseconds, varying by milliseconds between runs on this shared machine) would drown
    /// the sub-millisecond cost of masking; every statement is still audited before it is
    /// forwarded.
    InterceptorTmpfs,
    /// A third interceptor with `[audit] durability = "write"`: each record is written to the
    /// kernel before its statement is forwarded and fdatasync'ed within 200 ms (survives a
    /// crash of interceptor, not a power loss). For the pgbench cases: what the proxy costs
    /// when the disk's sync latency is not paid per statement.
    InterceptorWrite,
}

impl Target {
    pub const ALL: [Target; 5] = [
        Target::Direct,
        Target::Interceptor,
        Target::Pgbouncer,
        Target::InterceptorTmpfs,
        Target::InterceptorWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Interceptor => "interceptor",
            Target::Pgbouncer => "pgbouncer",
            Target::InterceptorTmpfs => "interceptor_tmpfs",
            Target::InterceptorWrite => "interceptor_write",
        }
    }
}

/// Which masking rules the identity a scenario connects as is under (interceptor only; direct
/// PostgreSQL and pgbouncer cannot mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Masking {
    /// No `[mask]` section: the baseline of the masking ratios.
    None,
    /// One column rule: `pgbench_accounts.filler` pseudonymised.
    Column,
    /// Every built-in content detector, no column rule.
    Detectors,
}

/// One benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    SelectOnlySimple,
    SelectOnlyExtended,
    SelectOnlyPrepared,
    /// Select-only with 32 clients: the fsync ceiling's second point.
    SelectOnlyC32,
    TpcB,
    SelectOnlyOneClient,
    /// `SELECT * FROM pgbench_accounts` through psql, output discarded.
    StreamAccounts,
    /// The stream as an identity with one column rule.
    StreamAccountsMaskColumn,
    /// The stream as an identity with every content detector on.
    StreamAccountsMaskDetectors,
    /// A 100-row `SELECT` from `pgbench_accounts`, 1 client: latency per query.
    Rows100OneClient,
    /// The 100-row query as the column-rule identity.
    Rows100MaskColumn,
    /// The 100-row query as the all-detectors identity.
    Rows100MaskDetectors,
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
    pub script: Script,
}

impl PgbenchCase {
    /// The arguments every run of this case shares (duration, clients, threads, query mode).
    pub fn common_args(&self, duration: std::time::Duration) -> Vec<String> {
        vec![
            "-n".to_string(),
            "-T".to_string(),
            duration.as_secs().to_string(),
            "-c".to_string(),
            self.clients.to_string(),
            "-j".to_string(),
            self.threads.to_string(),
            "-M".to_string(),
            self.mode.to_string(),
        ]
    }
}

/// What a pgbench client runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Built-in TPC-B-like.
    TpcB,
    /// Built-in select-only (`-S`).
    SelectOnly,
    /// A custom script (`-f`): one `SELECT *` of 100 consecutive `pgbench_accounts` rows.
    Rows100,
}

impl Script {
    /// The statements one transaction sends, each with a record that must be durable before
    /// it runs (TPC-B-like: BEGIN, three UPDATEs, a SELECT, an INSERT, END).
    pub fn statements_per_transaction(self) -> u32 {
        match self {
            Script::TpcB => 7,
            Script::SelectOnly | Script::Rows100 => 1,
        }
    }
}

impl Scenario {
    pub const ALL: [Scenario; 12] = [
        Scenario::SelectOnlySimple,
        Scenario::SelectOnlyExtended,
        Scenario::SelectOnlyPrepared,
        Scenario::SelectOnlyC32,
        Scenario::TpcB,
        Scenario::SelectOnlyOneClient,
        Scenario::StreamAccounts,
        Scenario::StreamAccountsMaskColumn,
        Scenario::StreamAccountsMaskDetectors,
        Scenario::Rows100OneClient,
        Scenario::Rows100MaskColumn,
        Scenario::Rows100MaskDetectors,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::SelectOnlySimple => "select_only_c8_simple",
            Scenario::SelectOnlyExtended => "select_only_c8_extended",
            Scenario::SelectOnlyPrepared => "select_only_c8_prepared",
            Scenario::SelectOnlyC32 => "select_only_c32_simple",
            Scenario::TpcB => "tpcb_c8",
            Scenario::SelectOnlyOneClient => "select_only_c1_latency",
            Scenario::StreamAccounts => "stream_pgbench_accounts",
            Scenario::StreamAccountsMaskColumn => "stream_pgbench_accounts_mask_column",
            Scenario::StreamAccountsMaskDetectors => "stream_pgbench_accounts_mask_detectors",
            Scenario::Rows100OneClient => "rows100_c1_latency",
            Scenario::Rows100MaskColumn => "rows100_c1_latency_mask_column",
            Scenario::Rows100MaskDetectors => "rows100_c1_latency_mask_detectors",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Scenario::SelectOnlyOneClient
            | Scenario::Rows100OneClient
            | Scenario::Rows100MaskColumn
            | Scenario::Rows100MaskDetectors => Unit::Ms,
            Scenario::StreamAccounts
            | Scenario::StreamAccountsMaskColumn
            | Scenario::StreamAccountsMaskDetectors => Unit::Seconds,
            _ => Unit::Tps,
        }
    }

    /// The masking rules of the identity this scenario connects as.
    pub fn masking(self) -> Masking {
        match self {
            Scenario::StreamAccountsMaskColumn | Scenario::Rows100MaskColumn => Masking::Column,
            Scenario::StreamAccountsMaskDetectors | Scenario::Rows100MaskDetectors => {
                Masking::Detectors
            }
            _ => Masking::None,
        }
    }

    /// Whether the scenario is the psql stream of all of `pgbench_accounts`.
    pub fn is_stream(self) -> bool {
        self.pgbench().is_none()
    }

    /// The interceptor this scenario goes through: the one with its audit store on disk,
    /// except for the 100-row latency cases.
    pub fn proxy(self) -> Target {
        match self {
            Scenario::Rows100OneClient
            | Scenario::Rows100MaskColumn
            | Scenario::Rows100MaskDetectors => Target::InterceptorTmpfs,
            _ => Target::Interceptor,
        }
    }

    /// Whether `target` runs this scenario: masked scenarios only run through interceptor,
    /// every scenario through one of the two interceptors.
    pub fn runs_on(self, target: Target) -> bool {
        match target {
            Target::Interceptor | Target::InterceptorTmpfs => target == self.proxy(),
            Target::InterceptorWrite => {
                self.masking() == Masking::None
                    && !self.is_stream()
                    && self.proxy() == Target::Interceptor
            }
            Target::Direct | Target::Pgbouncer => self.masking() == Masking::None,
        }
    }

    /// For a masked scenario, the same case without masking through interceptor: the
    /// baseline of its ratio.
    pub fn unmasked(self) -> Option<Scenario> {
        match self {
            Scenario::StreamAccountsMaskColumn | Scenario::StreamAccountsMaskDetectors => {
                Some(Scenario::StreamAccounts)
            }
            Scenario::Rows100MaskColumn | Scenario::Rows100MaskDetectors => {
                Some(Scenario::Rows100OneClient)
            }
            _ => None,
        }
    }

    /// The pgbench settings, or `None` for the psql stream.
    pub fn pgbench(self) -> Option<PgbenchCase> {
        let c8 = |mode, script| PgbenchCase {
            clients: 8,
            threads: 2,
            mode,
            script,
        };
        let c1 = |script| PgbenchCase {
            clients: 1,
            threads: 1,
            mode: "simple",
            script,
        };
        match self {
            Scenario::SelectOnlySimple => Some(c8("simple", Script::SelectOnly)),
            Scenario::SelectOnlyExtended => Some(c8("extended", Script::SelectOnly)),
            Scenario::SelectOnlyPrepared => Some(c8("prepared", Script::SelectOnly)),
            Scenario::SelectOnlyC32 => Some(PgbenchCase {
                clients: 32,
                threads: 2,
                mode: "simple",
                script: Script::SelectOnly,
            }),
            Scenario::TpcB => Some(c8("simple", Script::TpcB)),
            Scenario::SelectOnlyOneClient => Some(c1(Script::SelectOnly)),
            Scenario::Rows100OneClient
            | Scenario::Rows100MaskColumn
            | Scenario::Rows100MaskDetectors => Some(c1(Script::Rows100)),
            Scenario::StreamAccounts
            | Scenario::StreamAccountsMaskColumn
            | Scenario::StreamAccountsMaskDetectors => None,
        }
    }
}
