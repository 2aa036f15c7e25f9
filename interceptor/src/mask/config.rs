//! The TOML shape of a policy's `[mask]` section (documented in docs/masking.md). Unknown keys
//! are errors: a misspelt rule must not silently mask nothing.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MaskSection {
    /// Identities in any of these groups are not masked by this section.
    #[serde(default)]
    pub exempt_groups: Vec<String>,
    /// Identities with one of these subjects are not masked by this section.
    #[serde(default)]
    pub exempt_subjects: Vec<String>,
    #[serde(default)]
    pub column: Vec<ColumnRuleConfig>,
    #[serde(default)]
    pub detector: Vec<DetectorConfig>,
    /// Opt-ins for what the statement rewrite otherwise refuses around this section's
    /// column rules (docs/masking.md, "Masking inside statements").
    #[serde(default)]
    pub allow_whole_row: bool,
    #[serde(default)]
    pub allow_relation_functions: bool,
    #[serde(default)]
    pub allow_user_functions: bool,
    #[serde(default)]
    pub allow_masked_views: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StrategyName {
    Redact,
    Partial,
    /// `hash` is accepted as a name: a keyed hash is what a pseudonym is.
    #[serde(alias = "hash")]
    Pseudonym,
    Null,
    FormatPreserving,
}

/// Parameters shared by every rule; which apply depends on the strategy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ColumnRuleConfig {
    /// `schema.table.column`, `*` matching any one segment.
    #[serde(rename = "match")]
    pub origin: Option<String>,
    /// A regex over the result column's name and its origin column's name.
    pub name_pattern: Option<String>,
    pub strategy: StrategyName,
    pub replacement: Option<String>,
    pub keep_first: Option<usize>,
    pub keep_last: Option<usize>,
    pub keep_domain: Option<bool>,
    #[serde(default)]
    pub exempt_groups: Vec<String>,
    #[serde(default)]
    pub exempt_subjects: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DetectorConfig {
    /// A built-in detector, or `secrets` for aws_key, jwt, private_key and bearer_token.
    pub kind: Option<String>,
    /// Every built-in detector.
    pub all: Option<bool>,
    /// Name of a custom detector (with `regex`).
    pub name: Option<String>,
    pub regex: Option<String>,
    pub strategy: StrategyName,
    pub replacement: Option<String>,
    pub keep_first: Option<usize>,
    pub keep_last: Option<usize>,
    pub keep_domain: Option<bool>,
    #[serde(default)]
    pub exempt_groups: Vec<String>,
    #[serde(default)]
    pub exempt_subjects: Vec<String>,
}

/// One rule on its own, as an item of a policy's `[[mask]]` array:
/// `{ table = "public.customers", column = "email", method = "partial" }`, or any column or
/// detector rule with its `strategy` (`method` is a synonym).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleItem {
    /// `schema.table` or `table` (any schema).
    pub table: Option<String>,
    /// A column name (with `table`, or alone for that column in any table).
    pub column: Option<String>,
    #[serde(rename = "match")]
    pub origin: Option<String>,
    pub name_pattern: Option<String>,
    pub kind: Option<String>,
    pub all: Option<bool>,
    pub name: Option<String>,
    pub regex: Option<String>,
    pub strategy: Option<StrategyName>,
    pub method: Option<StrategyName>,
    pub replacement: Option<String>,
    pub keep_first: Option<usize>,
    pub keep_last: Option<usize>,
    pub keep_domain: Option<bool>,
    #[serde(default)]
    pub exempt_groups: Vec<String>,
    #[serde(default)]
    pub exempt_subjects: Vec<String>,
}
