//! Names as PostgreSQL resolves them: identifier folding and truncation, `schema.table`,
//! `schema.function`, and the reserved keywords that can never be a table name.

use sqlparser::ast::{self, Expr, ObjectName, Value};

use super::functions;

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
pub(crate) const MAX_IDENTIFIER_BYTES: usize = 63;

/// Normalizes an identifier the way PostgreSQL does: unquoted names fold to lower case, and
/// every name is truncated to 63 bytes (so a long name cannot dodge a pattern the server
/// would resolve it to).
pub(crate) fn ident_name(ident: &ast::Ident) -> String {
    let mut name = match ident.quote_style {
        None => ident.value.to_ascii_lowercase(),
        Some(_) => ident.value.clone(),
    };
    if name.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

pub(crate) fn name_parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| match p.as_ident() {
            Some(i) => ident_name(i),
            // A dialect-specific computed name part: unknown, keep it visibly odd.
            None => "?".to_owned(),
        })
        .collect()
}

/// `schema.table`, with the database part of `db.schema.table` dropped (PostgreSQL only allows
/// the current database there).
pub(crate) fn table_name(name: &ObjectName) -> String {
    let parts = name_parts(name);
    match parts.as_slice() {
        [t] if t.starts_with("pg_") => format!("pg_catalog.{t}"),
        [t] => format!("public.{t}"),
        [.., s, t] => format!("{s}.{t}"),
        [] => "?".to_owned(),
    }
}

/// `schema.function` and the bare function name.
pub(crate) fn function_name(name: &ObjectName) -> (String, String) {
    let parts = name_parts(name);
    let bare = parts.last().cloned().unwrap_or_default();
    let full = match parts.as_slice() {
        [f] if functions::is_builtin(f) => format!("pg_catalog.{f}"),
        [f] => format!("public.{f}"),
        [.., s, f] => format!("{s}.{f}"),
        [] => "?".to_owned(),
    };
    (full, bare)
}

pub(crate) fn literal_string(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::NationalStringLiteral(s)
            | Value::UnicodeStringLiteral(s) => Some(s),
            Value::DollarQuotedString(d) => Some(&d.value),
            _ => None,
        },
        Expr::Cast { expr, .. } | Expr::Nested(expr) => literal_string(expr),
        _ => None,
    }
}

/// PostgreSQL 15 keywords that can never be an unquoted table name or alias (categories
/// "reserved" and "reserved (can be function or type name)" of the SQL Key Words appendix).
pub(crate) const PG_RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

pub(crate) fn is_reserved_unquoted(ident: &ast::Ident) -> bool {
    ident.quote_style.is_none() && PG_RESERVED.contains(&ident.value.to_ascii_lowercase().as_str())
}

/// An unqualified relation as the default search_path resolves it for policy matching:
/// `pg_*` names are catalogs, others `public`.
pub(crate) fn qualify_relation(schema: &str, name: &str) -> String {
    match (schema, name) {
        ("", t) if t.starts_with("pg_") => format!("pg_catalog.{t}"),
        ("", t) => format!("public.{t}"),
        (s, t) => format!("{s}.{t}"),
    }
}
