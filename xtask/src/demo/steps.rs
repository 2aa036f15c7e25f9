//! The scripted part of the demo: a list of steps, each one SQL statement sent through
//! interceptor with psql, shown with its output. Steps that need more than one client
//! (masking, approval, kernel interception) have modules of their own.

/// What a step must produce; anything else fails the demo (and the test that runs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// psql succeeds and its output contains this text.
    Output(&'static str),
    /// The statement is refused with this SQLSTATE (e.g. a policy denial).
    Rejected { sqlstate: &'static str },
}

#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub title: &'static str,
    /// One or two sentences for a newcomer: what this shows.
    pub explain: &'static str,
    pub sql: &'static str,
    pub expect: Expect,
}

/// The demo session, in order. The demo identity logs in upstream as `app_rw`; what it may do
/// is in `policy.toml` beside this file.
pub const STEPS: &[Step] = &[
    Step {
        title: "Who am I?",
        explain: "You authenticated to interceptor as `demo` (SCRAM-SHA-256); interceptor logged \
                  in to PostgreSQL as the upstream role configured for that identity.",
        sql: "SELECT current_user AS upstream_role, current_database() AS database",
        expect: Expect::Output("app_rw"),
    },
    Step {
        title: "Read sample data",
        explain: "An ordinary query; rows stream back through the proxy unchanged (no column \
                  here is masked; the masking step below shows one that is).",
        sql: "SELECT id, name, balance, created_at FROM accounts ORDER BY id LIMIT 5",
        expect: Expect::Output("(5 rows)"),
    },
    Step {
        title: "Several statements in one message",
        explain: "A whole transaction sent as one simple-protocol query message, relayed \
                  as PostgreSQL would receive it directly; each statement is decided on its own.",
        sql: "BEGIN; SELECT count(*) AS accounts FROM accounts; \
              SELECT max(balance) AS largest_balance FROM accounts; COMMIT",
        expect: Expect::Output("COMMIT"),
    },
    Step {
        title: "Blocked by policy",
        explain: "A DELETE without WHERE: PostgreSQL would run it (app_rw may delete), but the \
                  demo policy refuses mass changes, so it never reaches the database.",
        sql: "DELETE FROM accounts",
        expect: Expect::Rejected { sqlstate: "42501" },
    },
    Step {
        title: "Nothing was deleted",
        explain: "The refused statement was not sent: every account is still there.",
        sql: "SELECT count(*) AS accounts FROM accounts",
        expect: Expect::Output("36"),
    },
    Step {
        title: "Default deny",
        explain: "The policy allows no DDL; a statement no rule allows is refused.",
        sql: "CREATE TABLE demo_scratch (id int)",
        expect: Expect::Rejected { sqlstate: "42501" },
    },
];
