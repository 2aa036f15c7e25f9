//! Policy files, statement classification and decisions.
//!
//! * [`lexer`]: PostgreSQL-faithful splitting of query text (the anti-bypass layer).
//! * [`classify`]: what each statement does (kind, risks, tables, functions).
//! * [`model`]: the TOML policy file format; [`set`]: loading, routing and deciding.
//! * [`reload`]: hot reload with audit events; [`session`]: SQL-level PREPARE/EXECUTE.
//! * [`cli`]: `interceptor policy check|explain|test`.
//!
//! The evaluation order is documented in `docs/policy.md`.

pub mod classify;
pub mod cli;
pub mod error;
pub mod functions;
pub mod glob;
pub mod lexer;
pub mod model;
pub mod reload;
pub mod session;
pub mod set;
pub mod testcases;
pub mod window;

pub use classify::{Classified, Risk, StatementKind, Unclassifiable, classify};
pub use error::PolicyError;
pub use lexer::LexSettings;
pub use model::Limits;
pub use reload::{PolicyEvent, PolicyHandle};
pub use session::SessionStatements;
pub use set::{Decision, Policy, PolicySet, Refusal, Route, Rule, Verdict};

#[cfg(test)]
mod classify_tests;
#[cfg(test)]
mod decide_tests;
