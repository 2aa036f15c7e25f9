//! Statements sqlparser 0.63 cannot parse, classified by their leading keywords (found with
//! the PostgreSQL-faithful lexer). Conservative: tables and functions are unknown, except for
//! table-form COPY whose single table is known exactly.

use std::collections::BTreeSet;

use super::classify::{Classified, Risk, StatementKind, bodies_execute, command_of, leading_words};
use super::lexer::{StatementText, TokKind};

/// Statements sqlparser 0.63 cannot parse, classified by their leading keywords. Conservative:
/// tables and functions are unknown (`names_known: false`).
pub(crate) fn keyword_fallback(piece: &StatementText, index: usize) -> Option<Classified> {
    let w = leading_words(piece, 4);
    let first = *w.first()?;
    let second = w.get(1).copied().unwrap_or("");
    let mut risks = BTreeSet::new();
    let (kind, n) = match (first, second) {
        ("do", _) => {
            risks.insert(Risk::AnonymousCode);
            if bodies_execute(piece) {
                risks.insert(Risk::DynamicSql);
            }
            (StatementKind::Procedural, 1)
        }
        ("alter", "system") => {
            risks.insert(Risk::AlterSystem);
            (StatementKind::Utility, 2)
        }
        ("grant" | "revoke", _) => {
            // Only role-membership grants fail to parse: they change what a role may do.
            risks.insert(Risk::AlterRole);
            (StatementKind::Dcl, 1)
        }
        ("security", "label") => (StatementKind::Dcl, 2),
        ("vacuum" | "analyze" | "analyse" | "checkpoint" | "cluster" | "reindex", _) => {
            (StatementKind::Utility, 1)
        }
        ("refresh", "materialized") => (StatementKind::Write, 3),
        ("copy", _) => return copy_fallback(piece, index),
        ("create", "procedure") | ("create", "or") => {
            if first == "create" && second == "or" && !w.contains(&"procedure") {
                return None;
            }
            if bodies_execute(piece) {
                risks.insert(Risk::DynamicSql);
            }
            (StatementKind::Ddl, if second == "or" { 4 } else { 2 })
        }
        _ => return None,
    };
    tracing::debug!(index, command = first, "classified by keywords");
    Some(Classified {
        command: command_of(piece, n),
        kind,
        risks: risks.into_iter().collect(),
        tables: Vec::new(),
        functions: Vec::new(),
        names_known: false,
        prepares: None,
        executes: None,
        deallocates: None,
        span: (piece.span.start, piece.span.end),
    })
}

/// `COPY table [(columns)] FROM|TO target …` with options sqlparser does not know (e.g.
/// pgbench's `WITH (FREEZE ON)`). Only the table form: a `COPY (query)` must parse.
pub(crate) fn copy_fallback(piece: &StatementText, index: usize) -> Option<Classified> {
    let toks = &piece.tokens;
    let mut i = 1;
    let mut name = Vec::new();
    loop {
        match &toks.get(i)?.kind {
            TokKind::Word { value, .. } => name.push(value.clone()),
            _ => return None,
        }
        i += 1;
        if toks.get(i).map(|t| &t.kind) == Some(&TokKind::Punct(b'.')) {
            i += 1;
        } else {
            break;
        }
    }
    if toks.get(i).map(|t| &t.kind) == Some(&TokKind::Punct(b'(')) {
        // Column list: plain identifiers and commas only.
        i += 1;
        loop {
            match &toks.get(i)?.kind {
                TokKind::Punct(b')') => break,
                TokKind::Word { .. } | TokKind::Punct(b',') => i += 1,
                _ => return None,
            }
        }
        i += 1;
    }
    let direction = match &toks.get(i)?.kind {
        TokKind::Word {
            value,
            quoted: false,
        } if value == "to" || value == "from" => value.clone(),
        _ => return None,
    };
    let mut risks = BTreeSet::new();
    match &toks.get(i + 1)?.kind {
        TokKind::Word {
            value,
            quoted: false,
        } if value == "stdin" || value == "stdout" => {}
        TokKind::Word {
            value,
            quoted: false,
        } if value == "program" => {
            risks.insert(Risk::CopyProgram);
        }
        TokKind::Str { .. } => {
            risks.insert(Risk::CopyFile);
            risks.insert(Risk::ServerFile);
        }
        _ => return None,
    }
    // COPY FROM … WHERE runs expressions (function calls) we would not see.
    if toks[i + 2..]
        .iter()
        .any(|t| matches!(&t.kind, TokKind::Word { value, quoted: false } if value == "where"))
    {
        return None;
    }
    let table = match name.as_slice() {
        [t] if t.starts_with("pg_") => format!("pg_catalog.{t}"),
        [t] => format!("public.{t}"),
        [.., s, t] => format!("{s}.{t}"),
        [] => return None,
    };
    tracing::debug!(index, "COPY classified by keywords");
    Some(Classified {
        command: "COPY".to_owned(),
        kind: if direction == "to" {
            StatementKind::CopyTo
        } else {
            StatementKind::CopyFrom
        },
        risks: risks.into_iter().collect(),
        tables: vec![table],
        functions: Vec::new(),
        // The table is known exactly and a table-form COPY calls no functions.
        names_known: true,
        prepares: None,
        executes: None,
        deallocates: None,
        span: (piece.span.start, piece.span.end),
    })
}
