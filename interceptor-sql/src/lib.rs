//! What a PostgreSQL statement does, read the way the server reads it.
//!
//! * [`lexer`]: PostgreSQL-faithful splitting of query text (the anti-bypass layer).
//! * [`statement`]: the words rules use for what a statement is (kind, risks).
//! * [`mod@classify`]: what each statement does (kind, risks, tables, functions), from
//!   PostgreSQL's own parser ([`pgparse`], tree walk in `pgwalk`), with `functions` (side
//!   effects), [`relfuncs`] (functions whose arguments name relations, from pg_proc), and the
//!   sqlparser reading (`walk`, `names`) as a second opinion that can only refuse; `secrets`
//!   finds the spans of secrets (passwords) a classified statement carries.
//!
//! The public face: [`classify::classify`] (and [`classify::classify_tree`] for a tree already
//! parsed) with what it returns, the lexer's statement splitting and tokens, the parse tree
//! ([`pgparse::parse_tree`]), the statement kinds and risks, and the pg_proc data behind
//! [`relfuncs`] for the test that checks it against a live server.

pub mod classify;
pub(crate) mod functions;
pub mod lexer;
pub(crate) mod names;
pub mod pgparse;
pub(crate) mod pgwalk;
pub mod relfuncs;
pub(crate) mod secrets;
pub mod statement;
pub(crate) mod walk;

#[cfg(test)]
mod classify_tests;
