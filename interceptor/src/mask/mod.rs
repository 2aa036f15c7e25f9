//! Inline masking of result values.
//!
//! Rules come from the `[mask]` sections of the policies that apply to an identity
//! ([`MaskRules::from_toml`], then [`MaskRules::for_identity`]). The relay asks for a
//! [`MaskPlan`] when a RowDescription arrives and runs every DataRow through it; COPY TO STDOUT
//! data goes through a [`CopyMasker`]; NotificationResponse and Error/NoticeResponse bodies have
//! their own entry points. Nothing here panics on malformed input: it returns a [`MaskError`] and
//! the relay refuses the result (fail closed).
//!
//! Module map: `config` (TOML shape), `rules` (compiled rules, public entry points), `detect`
//! (content detectors behind one RegexSet prefilter), `strategy` (what a masked value becomes),
//! `value` (type-aware rewriting of one value), `plan` (DataRow), `copy` (COPY data),
//! `notice` (error fields), `wire` (message parsing), `catalog` (column origins), `summary`,
//! and for masking inside statements: `rewrite` (the statement rewrite on pg_query's parse
//! tree), `sqlmask` (strategies as SQL), `relcat` (the catalog facts the rewrite needs).

mod catalog;
mod config;
mod copy;
mod copystmt;
mod detect;
mod notice;
mod plan;
mod relcat;
mod rewrite;
mod rules;
mod sqlmask;
mod strategy;
mod summary;
mod value;
mod wire;

#[cfg(test)]
mod tests;

pub(crate) use catalog::table_oids_of;
pub use catalog::{CatalogResolver, ColumnOrigin, OriginCache, catalog_query, table_oids};
pub(crate) use copy::CopyMasker;
pub use copy::{CopyColumn, CopyFormat, CopyOptions};
pub(crate) use copystmt::{CopyTarget, copies_to_client};
pub use plan::MaskPlan;
#[cfg(test)]
pub(crate) use wire::row_descriptions_decoded;
pub(crate) use wire::{FieldDescription, parse_row_description};

/// A RowDescription decoded once: masking (origins, plan) and the recording read it.
pub(crate) type RowFields = Result<Vec<FieldDescription>, MaskError>;
pub(crate) use relcat::RelationCache;
#[cfg(test)]
pub(crate) use rewrite::conversions_and_scans;
pub(crate) use rewrite::{needs, rewrite};
pub use rules::MaskRules;
pub use strategy::StrategyKind;
pub use summary::{MaskSummary, MaskTarget};

/// Why masking could not proceed. The relay must not forward the affected message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MaskError {
    /// The `[mask]` section of a policy is invalid.
    #[error("invalid mask rules: {0}")]
    Config(String),
    /// A protocol message could not be parsed.
    #[error("malformed {message} message: {reason}")]
    Malformed {
        message: &'static str,
        reason: &'static str,
    },
    /// A DataRow's field count differs from its RowDescription.
    #[error("DataRow has {got} fields, RowDescription announced {expected}")]
    ColumnCount { expected: usize, got: usize },
    /// A column came from a table whose origin the catalog lookup did not resolve, while
    /// origin rules exist: masking cannot be decided.
    #[error("origin of column {attnum} of table oid {table_oid} is unknown")]
    UnresolvedOrigin { table_oid: u32, attnum: i16 },
    /// Column rules exist but the result's columns are unknown (COPY without a column list,
    /// DataRows without a RowDescription).
    #[error("column rules apply but the columns of this result are unknown")]
    ColumnsUnknown,
    /// The COPY options given disagree with the CopyOutResponse.
    #[error("COPY format mismatch: {0}")]
    CopyFormat(&'static str),
    /// A COPY row grew beyond the buffering limit.
    #[error("COPY row longer than {limit} bytes")]
    CopyRowTooLong { limit: usize },
}

impl MaskError {
    fn malformed(message: &'static str, reason: &'static str) -> MaskError {
        MaskError::Malformed { message, reason }
    }
}
