//! Policy files, statement classification and decisions.
//!
//! * [`lexer`]: PostgreSQL-faithful splitting of query text (the anti-bypass layer).
//! * [`statement`]: the words rules use for what a statement is (kind, risks).
//! * [`mod@classify`]: what each statement does (kind, risks, tables, functions), from
//!   PostgreSQL's own parser ([`pgparse`], tree walk in `pgwalk`), with [`functions`] (side
//!   effects), [`relfuncs`] (functions whose arguments name relations, from pg_proc), and the
//!   sqlparser reading ([`walk`], [`names`]) as a second opinion that can only refuse.
//! * [`model`]: the TOML policy file format; [`load`]: validation with `file:line:col`.
//! * [`rules`]: a validated policy, its rules, verdicts and decisions.
//! * [`set`]: the API the proxy calls (`PolicySet`: route, decide); [`decide`]: rule matching
//!   and combining verdicts; [`window`], [`glob`]: rule building blocks.
//! * [`reload`]: hot reload with audit events; [`session`]: SQL-level PREPARE/EXECUTE.
//! * [`cli`]: `interceptor policy check|explain|test`; [`testcases`]: `*.tests.toml`.
//!
//! The evaluation order is documented in `docs/policy.md`.

pub mod classify;
pub mod cli;
pub mod decide;
pub mod error;
pub mod functions;
pub mod glob;
pub mod lexer;
pub mod load;
pub mod model;
pub mod names;
pub mod pgparse;
pub(crate) mod pgwalk;
pub mod relfuncs;
pub mod reload;
pub mod rules;
pub mod secrets;
pub mod session;
pub mod set;
pub mod statement;
pub mod testcases;
pub mod walk;
pub mod window;

pub use classify::{Classified, Unclassifiable, classify};
pub use error::PolicyError;
pub use lexer::LexSettings;
pub use model::Limits;
pub use reload::{PolicyEvent, PolicyHandle};
pub use rules::{Decision, Policy, Rule, Verdict};
pub use session::SessionStatements;
pub use set::{PolicySet, Refusal, Route};
pub use statement::{Risk, StatementKind};

#[cfg(test)]
mod classify_tests;
#[cfg(test)]
mod decide_tests;
