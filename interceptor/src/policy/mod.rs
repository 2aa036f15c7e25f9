//! Policy files and decisions over classified statements.
//!
//! What each statement does (lexer, PostgreSQL's parser, kinds and risks) is the
//! `interceptor_sql` crate; this module decides on it.
//!
//! * [`model`]: the TOML policy file format; [`load`]: validation with `file:line:col`.
//! * [`rules`]: a validated policy, its rules, verdicts and decisions.
//! * [`set`]: the API the proxy calls (`PolicySet`: route, decide); [`decide`]: rule matching
//!   and combining verdicts; [`window`], [`glob`]: rule building blocks.
//! * [`reload`]: hot reload with audit events; [`session`]: SQL-level PREPARE/EXECUTE.
//! * [`cli`]: `interceptor policy check|explain|test`; [`testcases`]: `*.tests.toml`.
//!
//! The evaluation order is documented in `docs/policy.md`.

pub mod cli;
pub(crate) mod decide;
pub(crate) mod error;
pub(crate) mod glob;
pub(crate) mod load;
pub(crate) mod model;
pub(crate) mod reload;
pub(crate) mod rules;
pub(crate) mod session;
pub(crate) mod set;
pub(crate) mod testcases;
pub(crate) mod window;

pub(crate) use reload::{PolicyEvent, PolicyHandle};
pub(crate) use rules::{Decision, Verdict};
pub(crate) use session::SessionStatements;
pub(crate) use set::{PolicySet, Route};

#[cfg(test)]
mod decide_tests;
