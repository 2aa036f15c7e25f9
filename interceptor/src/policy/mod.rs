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
pub mod decide;
pub mod error;
pub mod glob;
pub mod load;
pub mod model;
pub mod reload;
pub mod rules;
pub mod session;
pub mod set;
pub mod testcases;
pub mod window;

pub use error::PolicyError;
pub use model::Limits;
pub use reload::{PolicyEvent, PolicyHandle};
pub use rules::{Decision, Policy, Rule, Verdict};
pub use session::SessionStatements;
pub use set::{PolicySet, Refusal, Route};

#[cfg(test)]
mod decide_tests;
