//! Compiled masking rules: parsing the `[mask]` sections, choosing the rules of one identity,
//! and matching columns. Cheap to clone (shared behind an `Arc`).

use std::collections::BTreeMap;
use std::sync::Arc;

use regex::Regex;

use super::MaskError;
use super::catalog::ColumnOrigin;
use super::config::{ColumnRuleConfig, DetectorConfig, MaskSection, RuleItem, StrategyName};
use super::detect::{Detector, DetectorKind, Scanner};
use super::strategy::{MaskKey, Strategy};
use super::summary::MaskTarget;
use crate::identity::Identity;

/// Who a rule does not apply to.
#[derive(Debug, Clone, Default)]
pub(crate) struct Exemption {
    groups: Vec<String>,
    subjects: Vec<String>,
}

impl Exemption {
    fn new(section: &MaskSection, groups: &[String], subjects: &[String]) -> Exemption {
        Exemption {
            groups: section
                .exempt_groups
                .iter()
                .chain(groups)
                .cloned()
                .collect(),
            subjects: section
                .exempt_subjects
                .iter()
                .chain(subjects)
                .cloned()
                .collect(),
        }
    }

    fn exempts(&self, identity: &Identity) -> bool {
        self.subjects.contains(&identity.subject)
            || self.groups.iter().any(|g| identity.in_group(g))
    }
}

/// One segment of a `schema.table.column` pattern.
#[derive(Debug, Clone)]
enum Segment {
    Any,
    /// Compared case-insensitively: a rule written in lower case must also catch a quoted
    /// mixed-case identifier (masking more, never less).
    Name(String),
}

impl Segment {
    fn matches(&self, name: &str) -> bool {
        match self {
            Segment::Any => true,
            Segment::Name(n) => n.eq_ignore_ascii_case(name),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct OriginPattern {
    schema: Segment,
    table: Segment,
    column: Segment,
}

impl OriginPattern {
    fn parse(text: &str) -> Result<OriginPattern, MaskError> {
        let mut segments = Vec::new();
        let mut current = String::new();
        let mut quoted = false;
        let mut was_quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    current.push('"');
                }
                '"' => {
                    quoted = !quoted;
                    was_quoted = true;
                }
                '.' if !quoted => {
                    segments.push((std::mem::take(&mut current), was_quoted));
                    was_quoted = false;
                }
                c => current.push(c),
            }
        }
        segments.push((current, was_quoted));
        let bad = || {
            MaskError::Config(format!(
                "column match `{text}` must be schema.table.column (`*` for any segment)"
            ))
        };
        if quoted || segments.len() != 3 || segments.iter().any(|(s, _)| s.is_empty()) {
            return Err(bad());
        }
        let mut segs = segments.into_iter().map(|(s, q)| {
            if s == "*" && !q {
                Segment::Any
            } else {
                Segment::Name(s)
            }
        });
        match (segs.next(), segs.next(), segs.next()) {
            (Some(schema), Some(table), Some(column)) => Ok(OriginPattern {
                schema,
                table,
                column,
            }),
            _ => Err(bad()),
        }
    }

    fn matches(&self, origin: &ColumnOrigin) -> bool {
        self.schema.matches(&origin.schema)
            && self.table.matches(&origin.table)
            && self.column.matches(&origin.column)
    }

    /// For error fields: schema/table may be unknown (then they match).
    pub(crate) fn matches_parts(
        &self,
        schema: Option<&str>,
        table: Option<&str>,
        column: &str,
    ) -> bool {
        schema.is_none_or(|s| self.schema.matches(s))
            && table.is_none_or(|t| self.table.matches(t))
            && self.column.matches(column)
    }

    pub(crate) fn matches_table(&self, schema: Option<&str>, table: Option<&str>) -> bool {
        schema.is_none_or(|s| self.schema.matches(s)) && table.is_none_or(|t| self.table.matches(t))
    }
}

#[derive(Debug, Clone)]
pub(crate) enum ColumnMatcher {
    Origin(OriginPattern),
    Name(Regex),
}

/// What the statement rewrite may let through around a column rule (explicit opt-ins of its
/// section). A session is allowed something only if every column rule left for it allows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allowances {
    /// Whole-row references (`row_to_json(t)`, `t::text`, `t.*` in expressions).
    pub whole_row: bool,
    /// Functions that read relations or run queries named in strings (`table_to_xml`, ...).
    pub relation_functions: bool,
    /// Calls of functions outside pg_catalog, DO blocks, CREATE FUNCTION/PROCEDURE/TRIGGER/RULE.
    pub user_functions: bool,
    /// Reading and creating views and materialized views over masked columns.
    pub masked_views: bool,
}

impl Allowances {
    fn of(section: &MaskSection) -> Allowances {
        Allowances {
            whole_row: section.allow_whole_row,
            relation_functions: section.allow_relation_functions,
            user_functions: section.allow_user_functions,
            masked_views: section.allow_masked_views,
        }
    }

    fn and(self, o: Allowances) -> Allowances {
        Allowances {
            whole_row: self.whole_row && o.whole_row,
            relation_functions: self.relation_functions && o.relation_functions,
            user_functions: self.user_functions && o.user_functions,
            masked_views: self.masked_views && o.masked_views,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ColumnRule {
    pub matcher: ColumnMatcher,
    pub strategy: Strategy,
    exempt: Exemption,
    allow: Allowances,
}

impl ColumnRule {
    /// For names in SQL text: `schema` unknown (an unqualified table) matches any schema.
    fn matches_parts(&self, schema: Option<&str>, table: Option<&str>, column: &str) -> bool {
        match &self.matcher {
            ColumnMatcher::Origin(p) => p.matches_parts(schema, table, column),
            ColumnMatcher::Name(re) => re.is_match(column),
        }
    }

    fn matches(&self, output_name: &str, origin: Option<&ColumnOrigin>) -> bool {
        match &self.matcher {
            ColumnMatcher::Origin(p) => origin.is_some_and(|o| p.matches(o)),
            ColumnMatcher::Name(re) => {
                re.is_match(output_name) || origin.is_some_and(|o| re.is_match(&o.column))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct DetectorRule {
    kind: DetectorKind,
    name: String,
    custom: Option<String>,
    strategy: Strategy,
    exempt: Exemption,
}

/// The masking rules of a set of policies. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MaskRules {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub columns: Vec<ColumnRule>,
    detector_rules: Vec<DetectorRule>,
    pub scanner: Option<Scanner>,
    pub key: Option<MaskKey>,
}

impl Default for MaskRules {
    fn default() -> Self {
        MaskRules {
            inner: Arc::new(Inner {
                columns: Vec::new(),
                detector_rules: Vec::new(),
                scanner: None,
                key: None,
            }),
        }
    }
}

impl MaskRules {
    /// Rules that mask nothing.
    pub fn none() -> MaskRules {
        MaskRules::default()
    }

    /// Compile the `[mask]` sections of the applicable policies (each value is the section
    /// itself: a table with `exempt_groups`, `column`, `detector`). `key` keys pseudonyms and
    /// format-preserving output (at least 16 bytes); pseudonym rules without a key are refused.
    pub fn from_toml(values: &[toml::Value], key: Option<&[u8]>) -> Result<MaskRules, MaskError> {
        let key = key.map(MaskKey::new).transpose()?;
        let mut columns = Vec::new();
        let mut detectors = Vec::new();
        for value in values {
            let section = section_of(value)?;
            for c in &section.column {
                columns.push(column_rule(&section, c)?);
            }
            for d in &section.detector {
                detectors.extend(detector_rules(&section, d)?);
            }
        }
        let needs_key = columns
            .iter()
            .map(|c| &c.strategy)
            .chain(detectors.iter().map(|d| &d.strategy))
            .any(|s| *s == Strategy::Pseudonym);
        if needs_key && key.is_none() {
            return Err(MaskError::Config(
                "strategy \"pseudonym\" needs a masking key".into(),
            ));
        }
        build(columns, detectors, key)
    }

    /// The rules that apply to `identity`, without those it is exempt from.
    pub fn for_identity(&self, identity: &Identity) -> Result<MaskRules, MaskError> {
        let i = &self.inner;
        let exempt_any = i.columns.iter().any(|c| c.exempt.exempts(identity))
            || i.detector_rules.iter().any(|d| d.exempt.exempts(identity));
        if !exempt_any {
            return Ok(self.clone());
        }
        let columns = i
            .columns
            .iter()
            .filter(|c| !c.exempt.exempts(identity))
            .cloned()
            .collect();
        let detectors = i
            .detector_rules
            .iter()
            .filter(|d| !d.exempt.exempts(identity))
            .cloned()
            .collect();
        build(columns, detectors, i.key.clone())
    }

    /// Nothing to mask: the relay can skip masking entirely.
    pub fn is_empty(&self) -> bool {
        self.inner.columns.is_empty() && self.inner.scanner.is_none()
    }

    /// Column rules exist, so the relay must resolve the origin of every column of a
    /// RowDescription (table OID, attnum) before calling [`MaskRules::plan`].
    pub fn needs_origins(&self) -> bool {
        !self.inner.columns.is_empty()
    }

    /// The opt-ins every remaining column rule grants (all `false` without column rules).
    pub fn allowances(&self) -> Allowances {
        let mut it = self.inner.columns.iter().map(|c| c.allow);
        match it.next() {
            Some(first) => it.fold(first, Allowances::and),
            None => Allowances::default(),
        }
    }

    /// Whether a masking key is configured (keyed strategies cannot be written in SQL).
    pub(crate) fn has_key(&self) -> bool {
        self.inner.key.is_some()
    }

    /// The strongest column rule for a column named in SQL text (`schema`/`table` `None`
    /// when unknown: then any schema/table matches, masking more rather than less).
    pub(crate) fn strategy_for_parts(
        &self,
        schema: Option<&str>,
        table: Option<&str>,
        column: &str,
    ) -> Option<&Strategy> {
        self.inner
            .columns
            .iter()
            .filter(|r| r.matches_parts(schema, table, column))
            .map(|r| &r.strategy)
            .max_by_key(|s| s.kind().strength())
    }

    /// Whether some column rule could cover a column of this table.
    pub(crate) fn could_mask_table(&self, schema: Option<&str>, table: Option<&str>) -> bool {
        self.inner.columns.iter().any(|r| match &r.matcher {
            ColumnMatcher::Origin(p) => p.matches_table(schema, table),
            ColumnMatcher::Name(_) => true,
        })
    }

    /// Content detectors are active (every text value is scanned).
    pub fn has_detectors(&self) -> bool {
        self.inner.scanner.is_some()
    }
}

impl Inner {
    /// The strongest column rule matching a column.
    pub(crate) fn column_strategy(
        &self,
        output_name: &str,
        origin: Option<&ColumnOrigin>,
    ) -> Option<&Strategy> {
        self.columns
            .iter()
            .filter(|r| r.matches(output_name, origin))
            .map(|r| &r.strategy)
            .max_by_key(|s| s.kind().strength())
    }
}

fn build(
    columns: Vec<ColumnRule>,
    detector_rules: Vec<DetectorRule>,
    key: Option<MaskKey>,
) -> Result<MaskRules, MaskError> {
    // One detector per name; when policies disagree the strongest strategy wins.
    let mut by_name: BTreeMap<&str, &DetectorRule> = BTreeMap::new();
    for d in &detector_rules {
        let entry = by_name.entry(d.name.as_str()).or_insert(d);
        if d.strategy.kind().strength() > entry.strategy.kind().strength() {
            *entry = d;
        }
    }
    let detectors = by_name
        .values()
        .map(|d| {
            Arc::new(Detector {
                kind: d.kind,
                target: MaskTarget::Detector(Arc::from(d.name.as_str())),
                strategy: d.strategy.clone(),
                token: Arc::from(format!("[REDACTED:{}]", d.name)),
                custom: d.custom.clone(),
            })
        })
        .collect();
    let scanner = Scanner::new(detectors)?;
    Ok(MaskRules {
        inner: Arc::new(Inner {
            columns,
            detector_rules,
            scanner,
            key,
        }),
    })
}

/// A value is either a whole `[mask]` section or one rule (an item of `[[mask]]`, recognised
/// by its `strategy`/`method`), which becomes a section of one rule.
fn section_of(value: &toml::Value) -> Result<MaskSection, MaskError> {
    let config_err = |e: toml::de::Error| MaskError::Config(e.message().to_string());
    let Some(table) = value.as_table() else {
        return Err(MaskError::Config("a mask rule must be a table".into()));
    };
    if !(table.contains_key("strategy") || table.contains_key("method")) {
        return value.clone().try_into().map_err(config_err);
    }
    let item: RuleItem = value.clone().try_into().map_err(config_err)?;
    let strategy = match (item.strategy, item.method) {
        (Some(s), None) | (None, Some(s)) => s,
        _ => {
            return Err(MaskError::Config(
                "a mask rule needs exactly one of `strategy` or `method`".into(),
            ));
        }
    };
    let detector = item.kind.is_some() || item.all.is_some() || item.regex.is_some();
    let mut section = MaskSection::default();
    if detector {
        if item.table.is_some() || item.column.is_some() || item.origin.is_some() {
            return Err(MaskError::Config(
                "a detector rule cannot name a table or column".into(),
            ));
        }
        section.detector.push(DetectorConfig {
            kind: item.kind,
            all: item.all,
            name: item.name,
            regex: item.regex,
            strategy,
            replacement: item.replacement,
            keep_first: item.keep_first,
            keep_last: item.keep_last,
            keep_domain: item.keep_domain,
            exempt_groups: item.exempt_groups,
            exempt_subjects: item.exempt_subjects,
        });
        return Ok(section);
    }
    let origin = match (item.origin, item.table, item.column) {
        (Some(m), None, None) => Some(m),
        (None, Some(t), Some(c)) if t.contains('.') => Some(format!("{t}.{c}")),
        (None, Some(t), Some(c)) => Some(format!("*.{t}.{c}")),
        (None, None, Some(c)) => Some(format!("*.*.{c}")),
        (None, None, None) => None,
        _ => {
            return Err(MaskError::Config(
                "a column rule takes `match`, or `column` with an optional `table`".into(),
            ));
        }
    };
    if item.name.is_some() {
        return Err(MaskError::Config(
            "`name` belongs to a custom detector (with `regex`)".into(),
        ));
    }
    section.column.push(ColumnRuleConfig {
        origin,
        name_pattern: item.name_pattern,
        strategy,
        replacement: item.replacement,
        keep_first: item.keep_first,
        keep_last: item.keep_last,
        keep_domain: item.keep_domain,
        exempt_groups: item.exempt_groups,
        exempt_subjects: item.exempt_subjects,
    });
    Ok(section)
}

fn column_rule(section: &MaskSection, c: &ColumnRuleConfig) -> Result<ColumnRule, MaskError> {
    let matcher = match (&c.origin, &c.name_pattern) {
        (Some(m), None) => ColumnMatcher::Origin(OriginPattern::parse(m)?),
        (None, Some(p)) => ColumnMatcher::Name(
            regex::RegexBuilder::new(p)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| MaskError::Config(format!("invalid name_pattern `{p}`: {e}")))?,
        ),
        _ => {
            return Err(MaskError::Config(
                "a [[mask.column]] rule needs exactly one of `match` or `name_pattern`".into(),
            ));
        }
    };
    let strategy = strategy(
        c.strategy,
        &c.replacement,
        c.keep_first,
        c.keep_last,
        c.keep_domain,
    )?;
    Ok(ColumnRule {
        matcher,
        strategy,
        exempt: Exemption::new(section, &c.exempt_groups, &c.exempt_subjects),
        allow: Allowances::of(section),
    })
}

fn detector_rules(
    section: &MaskSection,
    d: &DetectorConfig,
) -> Result<Vec<DetectorRule>, MaskError> {
    let strategy = strategy(
        d.strategy,
        &d.replacement,
        d.keep_first,
        d.keep_last,
        d.keep_domain,
    )?;
    let exempt = Exemption::new(section, &d.exempt_groups, &d.exempt_subjects);
    let builtin = |kind: DetectorKind| DetectorRule {
        kind,
        name: kind.name().to_string(),
        custom: None,
        strategy: strategy.clone(),
        exempt: exempt.clone(),
    };
    match (&d.kind, d.all, &d.name, &d.regex) {
        (Some(kind), None, None, None) if kind == "secrets" => {
            Ok(DetectorKind::SECRETS.into_iter().map(builtin).collect())
        }
        (Some(kind), None, None, None) => match DetectorKind::parse(kind) {
            Some(k) => Ok(vec![builtin(k)]),
            None => Err(MaskError::Config(format!(
                "unknown detector kind `{kind}` (card, email, phone, ssn, iban, ip, aws_key, \
                 jwt, private_key, bearer_token, secrets)"
            ))),
        },
        (None, Some(true), None, None) => {
            Ok(DetectorKind::BUILTIN.into_iter().map(builtin).collect())
        }
        (None, None, Some(name), Some(pattern)) => {
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name || DetectorKind::parse(name).is_some() || name == "secrets" {
                return Err(MaskError::Config(format!(
                    "custom detector name `{name}` must be [A-Za-z0-9_-]{{1,64}} and not a \
                     built-in kind"
                )));
            }
            let re = super::detect::compile(pattern)?;
            if re.is_match(b"") {
                return Err(MaskError::Config(format!(
                    "custom detector `{name}`: regex matches the empty string"
                )));
            }
            Ok(vec![DetectorRule {
                kind: DetectorKind::Custom,
                name: name.clone(),
                custom: Some(pattern.clone()),
                strategy,
                exempt,
            }])
        }
        _ => Err(MaskError::Config(
            "a [[mask.detector]] needs exactly one of `kind`, `all = true`, or `name` with `regex`"
                .into(),
        )),
    }
}

fn strategy(
    name: StrategyName,
    replacement: &Option<String>,
    keep_first: Option<usize>,
    keep_last: Option<usize>,
    keep_domain: Option<bool>,
) -> Result<Strategy, MaskError> {
    let partial_params = keep_first.is_some() || keep_last.is_some() || keep_domain.is_some();
    if partial_params && name != StrategyName::Partial {
        return Err(MaskError::Config(
            "keep_first, keep_last and keep_domain belong to strategy \"partial\"".into(),
        ));
    }
    if replacement.is_some() && name != StrategyName::Redact {
        return Err(MaskError::Config(
            "replacement belongs to strategy \"redact\"".into(),
        ));
    }
    Ok(match name {
        StrategyName::Redact => Strategy::Redact {
            replacement: match replacement {
                Some(r) => Some(Arc::from(valid_replacement(r)?)),
                None => None,
            },
        },
        // Without parameters: the domain of an email, the last 4 characters of anything else.
        StrategyName::Partial if !partial_params => Strategy::Partial {
            keep_first: 0,
            keep_last: 4,
            keep_domain: true,
        },
        StrategyName::Partial => Strategy::Partial {
            keep_first: keep_first.unwrap_or(0),
            keep_last: keep_last.unwrap_or(0),
            keep_domain: keep_domain.unwrap_or(false),
        },
        StrategyName::Pseudonym => Strategy::Pseudonym,
        StrategyName::Null => Strategy::Null,
        StrategyName::FormatPreserving => Strategy::FormatPreserving,
    })
}

/// Replacements go verbatim into text values, array and record literals, JSON strings and
/// COPY fields, so they are limited to characters that need no escaping in any of them.
fn valid_replacement(r: &str) -> Result<&str, MaskError> {
    let ok = !r.is_empty()
        && r.len() <= 64
        && r.bytes().all(|b| {
            (b.is_ascii_graphic() || b == b' ')
                && !matches!(b, b'"' | b'\\' | b',' | b'{' | b'}' | b'(' | b')' | b'\'')
        });
    if ok {
        Ok(r)
    } else {
        Err(MaskError::Config(format!(
            "replacement `{r}` must be 1-64 printable ASCII characters without quotes, \
             backslashes, commas, braces or parentheses"
        )))
    }
}
