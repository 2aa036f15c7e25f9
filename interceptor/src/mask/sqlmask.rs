//! A column rule's strategy written as a SQL expression, for references to a masked column
//! inside a statement (see `rewrite`). The expression never reveals more than the proxy-side
//! strategy: where PostgreSQL cannot compute the same output it computes a stronger one, and
//! strategies that need the masking key have no SQL form (the key must never reach the
//! server, whose logs may hold statements).

use super::strategy::Strategy;

/// How a masked column is typed, from the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ColumnType {
    /// `format_type(atttypid, atttypmod)`: SQL for the column's type.
    pub sql: String,
    /// `pg_type.typcategory` is `S` (text, varchar, bpchar, name, citext, domains over them).
    pub string: bool,
}

/// Characters the partial strategy replaces: everything but ASCII punctuation and space
/// (PostgreSQL's `[[:alnum:]]` misses non-Latin letters under the C locale; this class masks
/// them, and any other non-ASCII character, too).
const KEEP_CLASS: &str = "[[:space:][:punct:]]";
const MASK_CLASS: &str = "[^[:space:][:punct:]]";
/// PostgreSQL's regex bound limit (RE_DUP_MAX).
const MAX_BOUND: usize = 255;

/// The SQL expression standing for `reference` (the column reference as written) under
/// `strategy`, or `None` when the strategy cannot be written without the key.
pub(super) fn masking_expression(
    strategy: &Strategy,
    keyed: bool,
    reference: &str,
    ty: &ColumnType,
) -> Option<String> {
    let null = format!("(NULL::{})", ty.sql);
    if !ty.string {
        // The proxy side gives NULL for every strategy on these types except format-preserving
        // numbers; NULL of the column's type is the stronger, type-correct form.
        return Some(null);
    }
    let v = format!("(({reference})::pg_catalog.text)");
    let body = match strategy {
        Strategy::Null => return Some(null),
        Strategy::Pseudonym => return None,
        Strategy::FormatPreserving if keyed => return None,
        Strategy::Redact { replacement } => {
            // Replacements are validated to need no quoting (no quotes, no backslashes).
            let token = replacement.as_deref().unwrap_or("[REDACTED]");
            format!("CASE WHEN {v} IS NULL THEN NULL ELSE '{token}' END")
        }
        Strategy::FormatPreserving => format!(
            "pg_catalog.regexp_replace(pg_catalog.translate({v}, \
             '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ', \
             '0000000000aaaaaaaaaaaaaaaaaaaaaaaaaaAAAAAAAAAAAAAAAAAAAAAAAAAA'), \
             E'[^\\\\u0001-\\\\u007f]', 'x', 'g')"
        ),
        Strategy::Partial {
            keep_first,
            keep_last,
            keep_domain,
        } => {
            let chars = partial_chars(&v, *keep_first, *keep_last);
            if *keep_domain {
                format!(
                    "CASE WHEN pg_catalog.strpos({v}, '@') > 0 THEN '***' || \
                     pg_catalog.substring({v}, '@[^@]*$') ELSE {chars} END"
                )
            } else {
                chars
            }
        }
    };
    Some(format!("(({body})::{})", ty.sql))
}

fn partial_chars(v: &str, first: usize, last: usize) -> String {
    let all = format!("pg_catalog.regexp_replace({v}, '{MASK_CLASS}', '*', 'g')");
    if (first == 0 && last == 0) || first > MAX_BOUND || last > MAX_BOUND {
        return all;
    }
    let mut pattern = String::new();
    if first > 0 {
        pattern.push_str(&format!("(?<=(?:{MASK_CLASS}{KEEP_CLASS}*){{{first}}})"));
    }
    pattern.push_str(MASK_CLASS);
    if last > 0 {
        pattern.push_str(&format!("(?=(?:{KEEP_CLASS}*{MASK_CLASS}){{{last}}})"));
    }
    // Keeping every character would reveal the value: then none is kept.
    format!(
        "CASE WHEN pg_catalog.length(pg_catalog.regexp_replace({v}, '{KEEP_CLASS}', '', 'g')) \
         <= {} THEN {all} ELSE pg_catalog.regexp_replace({v}, '{pattern}', '*', 'g') END",
        first + last
    )
}
