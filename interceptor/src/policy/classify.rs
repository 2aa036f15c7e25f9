//! Statement classification: what each statement of a query does, in terms policy rules match
//! on (kind, risks, tables, functions).
//!
//! The text is split by our PostgreSQL-faithful lexer ([`super::lexer`]); each piece is then
//! parsed by sqlparser, and the query is refused when the two disagree about the tokens. The few
//! statements sqlparser cannot parse (DO, ALTER SYSTEM, VACUUM (…), …) are classified by their
//! leading keywords, conservatively and without table information.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};
use sqlparser::ast::{
    self, CopySource, CopyTarget, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    ObjectName, ObjectType, Reset, Set, Statement, TableFactor, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::functions;
use super::lexer::{self, LexSettings, StatementText, TokKind};

/// What a statement does, from least to most powerful (the order is used when a statement does
/// several things, e.g. a SELECT calling `nextval` is a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    /// SELECT, SHOW, EXPLAIN (without ANALYZE), FETCH, …
    Read,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION.
    Transaction,
    /// SET, RESET, DISCARD, DEALLOCATE, LISTEN.
    Session,
    /// COPY … TO STDOUT.
    CopyTo,
    /// INSERT, UPDATE, DELETE, MERGE, SELECT … FOR UPDATE, LOCK.
    Write,
    /// COPY … FROM STDIN.
    CopyFrom,
    /// VACUUM, ANALYZE, CHECKPOINT, REINDEX, NOTIFY, admin functions.
    Utility,
    /// DO, CALL, EXECUTE of a prepared statement that is unknown.
    Procedural,
    /// CREATE, ALTER, DROP, TRUNCATE, COMMENT.
    Ddl,
    /// GRANT, REVOKE, CREATE/ALTER/DROP ROLE.
    Dcl,
}

impl StatementKind {
    pub const ALL: [StatementKind; 10] = [
        StatementKind::Read,
        StatementKind::Transaction,
        StatementKind::Session,
        StatementKind::CopyTo,
        StatementKind::Write,
        StatementKind::CopyFrom,
        StatementKind::Utility,
        StatementKind::Procedural,
        StatementKind::Ddl,
        StatementKind::Dcl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Read => "read",
            StatementKind::Transaction => "transaction",
            StatementKind::Session => "session",
            StatementKind::CopyTo => "copy_to",
            StatementKind::Write => "write",
            StatementKind::CopyFrom => "copy_from",
            StatementKind::Utility => "utility",
            StatementKind::Procedural => "procedural",
            StatementKind::Ddl => "ddl",
            StatementKind::Dcl => "dcl",
        }
    }
}

/// Risk patterns a rule can match (or, for `allow` rules, must explicitly accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    DeleteWithoutWhere,
    UpdateWithoutWhere,
    Drop,
    Truncate,
    AlterRole,
    AlterSystem,
    CopyProgram,
    CopyFile,
    /// EXECUTE in a DO block or function body, functions in untrusted languages, query_to_xml…
    DynamicSql,
    /// A DO block: code that runs without being a named, reviewable object.
    AnonymousCode,
    /// Server file access: pg_read_file, pg_ls_dir, lo_import/lo_export, LOAD.
    ServerFile,
    LargeObject,
    Dblink,
    /// SET ROLE, RESET ROLE, set_config('role', …).
    SetRole,
    /// SET SESSION AUTHORIZATION, RESET SESSION AUTHORIZATION.
    SessionAuthorization,
    /// Changing search_path changes what unqualified names mean.
    SearchPath,
    /// nextval, setval, advisory locks, pg_notify, …
    SideEffectFunction,
    /// pg_terminate_backend, pg_reload_conf, replication slots, …
    AdminFunction,
    /// A function that is not a PostgreSQL built-in: it may do anything.
    UserFunction,
}

/// One classified statement (recorded in the audit trail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classified {
    /// Leading keywords, e.g. `SELECT`, `INSERT`, `ALTER SYSTEM`.
    pub command: String,
    pub kind: StatementKind,
    pub risks: Vec<Risk>,
    /// `schema.table`, lower-case unless quoted. Unqualified names are shown as
    /// `public.name` (`pg_catalog.name` for `pg_*`).
    pub tables: Vec<String>,
    /// `schema.function`; unqualified built-ins as `pg_catalog.name`, others as `public.name`.
    pub functions: Vec<String>,
    /// False when the tables and functions the statement touches are unknown: it was
    /// classified by keywords (sqlparser could not parse it), or it is a DDL/DCL/utility
    /// statement in which no table was found.
    pub names_known: bool,
    /// `PREPARE name AS …`: the name (the rest describes the prepared statement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepares: Option<String>,
    /// `EXECUTE name`: decided by what `name` was prepared as (see [`super::SessionStatements`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executes: Option<String>,
    /// `DEALLOCATE name` (`Some("")` for DEALLOCATE ALL / DISCARD ALL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deallocates: Option<String>,
    /// Byte range of the statement in the query text.
    pub span: (usize, usize),
}

/// Why a query cannot be classified (it is then refused, or sent for approval if the policy
/// says so).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unclassifiable {
    #[error("cannot read the query text: {0}")]
    Lex(#[from] lexer::LexError),
    #[error("cannot parse statement {index}: {message}")]
    Parse { index: usize, message: String },
    #[error(
        "statement {index}: the SQL parser and PostgreSQL's lexer disagree about this text; \
         refusing rather than guessing"
    )]
    Differential { index: usize },
    #[error("statement {index} ({command}) is not supported by the policy engine")]
    Unsupported { index: usize, command: String },
    #[error("empty query")]
    Empty,
}

impl Unclassifiable {
    /// The SQLSTATE a refusal for this reason carries.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Unclassifiable::Lex(_) | Unclassifiable::Parse { .. } => "42601",
            _ => "42501",
        }
    }
}

/// Classifies every statement of a simple-query or Parse text.
pub fn classify(sql: &str, lex: LexSettings) -> Result<Vec<Classified>, Unclassifiable> {
    let pieces = lexer::split_statements(sql, lex)?;
    if pieces.is_empty() {
        return Err(Unclassifiable::Empty);
    }
    pieces
        .iter()
        .enumerate()
        .map(|(index, piece)| classify_piece(sql, piece, index + 1))
        .collect()
}

fn classify_piece(
    sql: &str,
    piece: &StatementText,
    index: usize,
) -> Result<Classified, Unclassifiable> {
    let text = parser_text(sql, piece);
    let dialect = PostgreSqlDialect {};
    let parsed = Parser::new(&dialect)
        .try_with_sql(&text)
        .and_then(|mut p| p.parse_statements());
    let statements = match parsed {
        Ok(s) => s,
        Err(e) => {
            return keyword_fallback(piece, index).ok_or_else(|| Unclassifiable::Parse {
                index,
                message: e.to_string(),
            });
        }
    };
    check_tokens_agree(&text, piece, index)?;
    let [statement] = statements.as_slice() else {
        return Err(Unclassifiable::Differential { index });
    };
    classify_statement(statement, piece, index)
}

/// The piece of text handed to sqlparser. With `standard_conforming_strings` off the server
/// reads a plain `'a\'b'` like `E'a\'b'`; sqlparser does not know the setting, so such strings
/// get an explicit ` E` prefix (the space keeps it from gluing onto a preceding identifier).
fn parser_text(sql: &str, piece: &StatementText) -> String {
    let mut out = String::with_capacity(piece.span.len() + 8);
    let mut at = piece.span.start;
    for tok in &piece.tokens {
        if let TokKind::Str {
            needs_e_prefix: true,
            ..
        } = tok.kind
        {
            out.push_str(sql.get(at..tok.span.start).unwrap_or(""));
            out.push_str(" E");
            at = tok.span.start;
        }
    }
    out.push_str(sql.get(at..piece.span.end).unwrap_or(""));
    out
}

/// What both lexers must agree on: every word (keyword or identifier), every string constant
/// and every `;`, in order. Hidden code needs words, so a comment or string that one side ends
/// earlier than the other shows up here.
#[derive(Debug, PartialEq, Eq)]
enum Anchor {
    Word(String),
    Str,
    Semicolon,
}

fn check_tokens_agree(
    text: &str,
    piece: &StatementText,
    index: usize,
) -> Result<(), Unclassifiable> {
    let dialect = PostgreSqlDialect {};
    let theirs = Tokenizer::new(&dialect, text)
        .tokenize()
        .map_err(|_| Unclassifiable::Differential { index })?;
    let theirs: Vec<Anchor> = theirs
        .into_iter()
        .filter_map(|t| match t {
            Token::Word(w) => Some(Anchor::Word(match w.quote_style {
                None => w.value.to_ascii_lowercase(),
                Some(_) => w.value,
            })),
            Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_) => Some(Anchor::Str),
            Token::SemiColon => Some(Anchor::Semicolon),
            _ => None,
        })
        .collect();
    let ours: Vec<Anchor> = piece
        .tokens
        .iter()
        .filter_map(|t| match &t.kind {
            TokKind::Word { value, .. } => Some(Anchor::Word(value.clone())),
            TokKind::Str { .. } => Some(Anchor::Str),
            TokKind::Punct(b';') => Some(Anchor::Semicolon),
            _ => None,
        })
        .collect();
    if theirs == ours {
        Ok(())
    } else {
        tracing::debug!(index, "lexer differential: sqlparser tokens differ");
        Err(Unclassifiable::Differential { index })
    }
}

/// Leading words of the statement, upper-case, for `command`.
fn leading_words(piece: &StatementText, n: usize) -> Vec<&str> {
    piece
        .tokens
        .iter()
        .take(n)
        .map_while(|t| match &t.kind {
            TokKind::Word {
                value,
                quoted: false,
            } => Some(value.as_str()),
            _ => None,
        })
        .collect()
}

fn command_of(piece: &StatementText, n: usize) -> String {
    leading_words(piece, n).join(" ").to_ascii_uppercase()
}

/// Does any string constant in the statement mention EXECUTE (dynamic SQL in PL/pgSQL)?
fn bodies_execute(piece: &StatementText) -> bool {
    piece.tokens.iter().any(|t| match &t.kind {
        TokKind::Str { body, .. } => body.to_ascii_lowercase().contains("execute"),
        _ => false,
    })
}

/// Statements sqlparser 0.63 cannot parse, classified by their leading keywords. Conservative:
/// tables and functions are unknown (`names_known: false`).
fn keyword_fallback(piece: &StatementText, index: usize) -> Option<Classified> {
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
fn copy_fallback(piece: &StatementText, index: usize) -> Option<Classified> {
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

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// Normalizes an identifier the way PostgreSQL does: unquoted names fold to lower case, and
/// every name is truncated to 63 bytes (so a long name cannot dodge a pattern the server
/// would resolve it to).
fn ident_name(ident: &ast::Ident) -> String {
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

fn name_parts(name: &ObjectName) -> Vec<String> {
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
pub fn table_name(name: &ObjectName) -> String {
    let parts = name_parts(name);
    match parts.as_slice() {
        [t] if t.starts_with("pg_") => format!("pg_catalog.{t}"),
        [t] => format!("public.{t}"),
        [.., s, t] => format!("{s}.{t}"),
        [] => "?".to_owned(),
    }
}

/// `schema.function` and the bare function name.
fn function_name(name: &ObjectName) -> (String, String) {
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

fn literal_string(expr: &Expr) -> Option<&str> {
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

/// Accumulates what one statement does.
#[derive(Default)]
struct Facts {
    kind: Option<StatementKind>,
    risks: BTreeSet<Risk>,
    tables: BTreeSet<String>,
    functions: BTreeSet<String>,
}

impl Facts {
    fn raise(&mut self, kind: StatementKind) {
        self.kind = Some(self.kind.map_or(kind, |k| k.max(kind)));
    }

    fn record_function(&mut self, name: &ObjectName, first_arg: Option<&Expr>, executed: bool) {
        let (full, bare) = function_name(name);
        let builtin = full.starts_with("pg_catalog.");
        self.functions.insert(full);
        if !executed {
            return;
        }
        if !builtin {
            self.risks.insert(Risk::UserFunction);
        }
        if bare == "set_config" {
            self.raise(StatementKind::Session);
            let setting = first_arg.and_then(literal_string);
            self.risks
                .extend(functions::set_config_risks(setting).iter().copied());
        }
        if let Some((kind, risks)) = functions::side_effects(&bare) {
            self.raise(kind);
            self.risks.extend(risks.iter().copied());
        }
    }
}

/// Walks the whole AST: tables, functions, nested data-modifying statements.
struct Walk<'a> {
    facts: &'a mut Facts,
    /// Depth of statements visited; the outermost is classified by [`classify_statement`].
    depth: usize,
    /// Inside `EXPLAIN` without ANALYZE nothing runs: collect names, not effects.
    not_executed: usize,
    explain_stack: Vec<bool>,
    /// Table-function names already recorded as functions (sqlparser also reports them as
    /// relations).
    table_functions: Vec<ObjectName>,
    /// sqlparser read a PostgreSQL reserved keyword as a table name or alias (e.g.
    /// `FROM ONLY secrets` as table `only` aliased `secrets`): its tree is not PostgreSQL's.
    misread: bool,
}

/// PostgreSQL 15 keywords that can never be an unquoted table name or alias (categories
/// "reserved" and "reserved (can be function or type name)" of the SQL Key Words appendix).
const PG_RESERVED: &[&str] = &[
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

fn is_reserved_unquoted(ident: &ast::Ident) -> bool {
    ident.quote_style.is_none() && PG_RESERVED.contains(&ident.value.to_ascii_lowercase().as_str())
}

impl Visitor for Walk<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        self.depth += 1;
        let non_executing_explain =
            matches!(statement, Statement::Explain { .. }) && !explain_executes(statement);
        self.explain_stack.push(non_executing_explain);
        if non_executing_explain {
            self.not_executed += 1;
        }
        if self.depth > 1 && self.not_executed == 0 {
            shallow(statement, self.facts);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _statement: &Statement) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        if self.explain_stack.pop() == Some(true) {
            self.not_executed = self.not_executed.saturating_sub(1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &ast::Query) -> ControlFlow<()> {
        if !query.locks.is_empty() && self.not_executed == 0 {
            self.facts.raise(StatementKind::Write);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &ast::Select) -> ControlFlow<()> {
        if select.into.is_some() && self.not_executed == 0 {
            self.facts.raise(StatementKind::Ddl);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        let executed = self.not_executed == 0;
        let alias = match factor {
            TableFactor::Table { alias, .. }
            | TableFactor::Derived { alias, .. }
            | TableFactor::Function { alias, .. }
            | TableFactor::UNNEST { alias, .. } => alias.as_ref(),
            _ => None,
        };
        if alias.is_some_and(|a| is_reserved_unquoted(&a.name)) {
            self.misread = true;
        }
        match factor {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                let first = match args.args.first() {
                    Some(a @ FunctionArg::Unnamed(_)) => arg_expr(a),
                    _ => None,
                };
                self.facts.record_function(name, first, executed);
                self.table_functions.push(name.clone());
            }
            TableFactor::Function { name, args, .. } => {
                let first = match args.first() {
                    Some(a @ FunctionArg::Unnamed(_)) => arg_expr(a),
                    _ => None,
                };
                self.facts.record_function(name, first, executed);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if relation
            .0
            .iter()
            .any(|p| p.as_ident().is_some_and(is_reserved_unquoted))
        {
            self.misread = true;
        }
        if let Some(pos) = self.table_functions.iter().position(|n| n == relation) {
            self.table_functions.swap_remove(pos);
        } else {
            self.facts.tables.insert(table_name(relation));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            // Only a positional first argument is the setting name of set_config; a named
            // argument could be any parameter (then the name counts as unknown).
            let first = match &f.args {
                FunctionArguments::List(list) => match list.args.first() {
                    Some(a @ FunctionArg::Unnamed(_)) => arg_expr(a),
                    _ => None,
                },
                _ => None,
            };
            self.facts
                .record_function(&f.name, first, self.not_executed == 0);
        }
        ControlFlow::Continue(())
    }
}

/// `EXPLAIN ANALYZE …` and `EXPLAIN (ANALYZE[, …]) …` run the statement. An ANALYZE option is
/// taken as "on" unless its argument is literally false/off/0.
fn explain_executes(statement: &Statement) -> bool {
    let Statement::Explain {
        analyze, options, ..
    } = statement
    else {
        return false;
    };
    *analyze
        || options.iter().flatten().any(|o| {
            ident_name(&o.name) == "analyze"
                && !o.arg.as_ref().is_some_and(|a| {
                    let text = a.to_string().to_ascii_lowercase();
                    matches!(text.trim_matches('\''), "false" | "off" | "0" | "no")
                })
        })
}

fn arg_expr(arg: &FunctionArg) -> Option<&Expr> {
    let e = match arg {
        FunctionArg::Named { arg, .. }
        | FunctionArg::ExprNamed { arg, .. }
        | FunctionArg::Unnamed(arg) => arg,
    };
    match e {
        FunctionArgExpr::Expr(e) => Some(e),
        _ => None,
    }
}

fn set_variable_risks(name: &ObjectName, facts: &mut Facts) {
    let parts = name_parts(name);
    match parts.last().map(String::as_str) {
        Some("role") => {
            facts.risks.insert(Risk::SetRole);
        }
        Some("session_authorization") => {
            facts.risks.insert(Risk::SessionAuthorization);
        }
        Some("search_path") => {
            facts.risks.insert(Risk::SearchPath);
        }
        _ => {}
    }
}

/// Kind and risks of one statement node, not looking into nested statements (the walk does).
/// Returns false for statements the engine does not know.
fn shallow(statement: &Statement, facts: &mut Facts) -> bool {
    use StatementKind as K;
    match statement {
        Statement::Query(_) | Statement::Prepare { .. } => facts.raise(K::Read),
        Statement::Explain { .. }
        | Statement::ExplainTable { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowDatabases { .. } => facts.raise(K::Read),
        Statement::Insert(_) | Statement::Merge(_) | Statement::Lock(_) => facts.raise(K::Write),
        Statement::Update(u) => {
            facts.raise(K::Write);
            if u.selection.is_none() {
                facts.risks.insert(Risk::UpdateWithoutWhere);
            }
        }
        Statement::Delete(d) => {
            facts.raise(K::Write);
            if d.selection.is_none() {
                facts.risks.insert(Risk::DeleteWithoutWhere);
            }
        }
        Statement::Copy {
            source, to, target, ..
        } => {
            facts.raise(if *to { K::CopyTo } else { K::CopyFrom });
            if let CopySource::Table { table_name: t, .. } = source {
                facts.tables.insert(table_name(t));
            }
            match target {
                CopyTarget::File { .. } => {
                    facts.risks.insert(Risk::CopyFile);
                    facts.risks.insert(Risk::ServerFile);
                }
                CopyTarget::Program { .. } => {
                    facts.risks.insert(Risk::CopyProgram);
                }
                CopyTarget::Stdin | CopyTarget::Stdout => {}
            }
        }
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => facts.raise(K::Transaction),
        Statement::Set(set) => match set {
            Set::SetTransaction { .. } => facts.raise(K::Transaction),
            Set::SingleAssignment { variable, .. } => {
                facts.raise(K::Session);
                set_variable_risks(variable, facts);
            }
            Set::ParenthesizedAssignments { variables, .. } => {
                facts.raise(K::Session);
                for v in variables {
                    set_variable_risks(v, facts);
                }
            }
            Set::MultipleAssignments { assignments } => {
                facts.raise(K::Session);
                for a in assignments {
                    set_variable_risks(&a.name, facts);
                }
            }
            Set::SetRole { .. } => {
                facts.raise(K::Session);
                facts.risks.insert(Risk::SetRole);
            }
            Set::SetSessionAuthorization(_) => {
                facts.raise(K::Session);
                facts.risks.insert(Risk::SessionAuthorization);
            }
            Set::SetTimeZone { .. } | Set::SetNames { .. } | Set::SetNamesDefault {} => {
                facts.raise(K::Session)
            }
            // SET SESSION param kinds are SQL Server's; not PostgreSQL.
            Set::SetSessionParam(_) => return false,
        },
        Statement::Reset(r) => {
            facts.raise(K::Session);
            match &r.reset {
                // role and session_authorization are GUC_NO_RESET_ALL in PostgreSQL.
                Reset::ALL => {}
                Reset::SessionAuthorization => {
                    facts.risks.insert(Risk::SessionAuthorization);
                }
                Reset::ConfigurationParameter(name) => set_variable_risks(name, facts),
            }
        }
        Statement::Discard { .. }
        | Statement::Deallocate { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. } => facts.raise(K::Session),
        Statement::NOTIFY { .. } | Statement::Vacuum(_) | Statement::Analyze(_) => {
            facts.raise(K::Utility)
        }
        Statement::Load { .. } => {
            facts.raise(K::Utility);
            facts.risks.insert(Risk::ServerFile);
        }
        Statement::Execute { .. } | Statement::Call(_) => facts.raise(K::Procedural),
        Statement::Truncate(_) => {
            facts.raise(K::Ddl);
            facts.risks.insert(Risk::Truncate);
        }
        Statement::Drop { object_type, .. } => {
            facts.risks.insert(Risk::Drop);
            if matches!(object_type, ObjectType::Role | ObjectType::User) {
                facts.raise(K::Dcl);
                facts.risks.insert(Risk::AlterRole);
            } else {
                facts.raise(K::Ddl);
            }
        }
        Statement::DropFunction(_)
        | Statement::DropDomain(_)
        | Statement::DropProcedure { .. }
        | Statement::DropPolicy(_)
        | Statement::DropExtension(_)
        | Statement::DropOperator(_)
        | Statement::DropOperatorFamily(_)
        | Statement::DropOperatorClass(_)
        | Statement::DropTrigger(_) => {
            facts.raise(K::Ddl);
            facts.risks.insert(Risk::Drop);
        }
        Statement::CreateServer(_) => {
            facts.raise(K::Ddl);
            facts.risks.insert(Risk::Dblink);
        }
        Statement::CreateFunction(f) => {
            facts.raise(K::Ddl);
            let language = f.language.as_ref().map(ident_name);
            // SQL and PL/pgSQL are trusted; anything else (C, plpython3u, …) runs arbitrary code.
            if !matches!(language.as_deref(), Some("sql" | "plpgsql") | None) {
                facts.risks.insert(Risk::DynamicSql);
            }
        }
        Statement::CreateView(_)
        | Statement::CreateTable(_)
        | Statement::CreateIndex(_)
        | Statement::CreatePolicy(_)
        | Statement::CreateOperator(_)
        | Statement::CreateOperatorFamily(_)
        | Statement::CreateOperatorClass(_)
        | Statement::CreateTextSearch(_)
        | Statement::CreateExtension(_)
        | Statement::CreateCollation(_)
        | Statement::CreateTrigger(_)
        | Statement::CreateProcedure { .. }
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateSequence { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateType { .. }
        | Statement::AlterTable(_)
        | Statement::AlterSchema(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterFunction(_)
        | Statement::AlterType(_)
        | Statement::AlterCollation(_)
        | Statement::AlterOperator(_)
        | Statement::AlterOperatorFamily(_)
        | Statement::AlterOperatorClass(_)
        | Statement::AlterTextSearch(_)
        | Statement::AlterPolicy(_)
        | Statement::Comment { .. }
        | Statement::RenameTable(_) => facts.raise(K::Ddl),
        Statement::Grant(_) | Statement::Revoke(_) | Statement::Deny(_) => facts.raise(K::Dcl),
        Statement::CreateRole(_) | Statement::CreateUser(_) => facts.raise(K::Dcl),
        Statement::AlterRole { .. } | Statement::AlterUser(_) => {
            facts.raise(K::Dcl);
            facts.risks.insert(Risk::AlterRole);
        }
        _ => return false,
    }
    true
}

fn classify_statement(
    statement: &Statement,
    piece: &StatementText,
    index: usize,
) -> Result<Classified, Unclassifiable> {
    let mut facts = Facts::default();
    if !shallow(statement, &mut facts) {
        return Err(Unclassifiable::Unsupported {
            index,
            command: command_of(piece, 2),
        });
    }
    let mut walk = Walk {
        facts: &mut facts,
        depth: 0,
        not_executed: 0,
        explain_stack: Vec::new(),
        table_functions: Vec::new(),
        misread: false,
    };
    let _ = statement.visit(&mut walk);
    if walk.misread {
        return Err(Unclassifiable::Differential { index });
    }
    // Function bodies and DO blocks are strings to the parser: look for EXECUTE in them.
    if matches!(statement, Statement::CreateFunction(_)) && bodies_execute(piece) {
        facts.risks.insert(Risk::DynamicSql);
    }
    if let Statement::Call(f) = statement {
        facts.record_function(&f.name, None, true);
    }
    let mut prepares = None;
    let mut executes = None;
    let mut deallocates = None;
    match statement {
        Statement::Prepare { name, .. } => prepares = Some(ident_name(name)),
        Statement::Execute { name, .. } => {
            executes = Some(
                name.as_ref()
                    .map(|n| name_parts(n).join("."))
                    .unwrap_or_default(),
            )
        }
        Statement::Deallocate { name, .. } => deallocates = Some(ident_name(name)),
        Statement::Discard { object_type } => {
            if matches!(
                object_type,
                ast::DiscardObject::ALL | ast::DiscardObject::PLANS
            ) {
                deallocates = Some(String::new());
            }
        }
        _ => {}
    }
    if let Statement::Drop {
        object_type, names, ..
    } = statement
        && !matches!(object_type, ObjectType::Role | ObjectType::User)
    {
        facts.tables.extend(names.iter().map(table_name));
    }
    let command = command_of(piece, command_words(statement));
    let kind = facts.kind.unwrap_or(StatementKind::Procedural);
    // sqlparser's visitor does not report the objects of every DDL/DCL/utility statement: when
    // it found none, say the names are unknown rather than "none".
    let names_known = !(facts.tables.is_empty()
        && matches!(
            kind,
            StatementKind::Ddl | StatementKind::Dcl | StatementKind::Utility
        ));
    Ok(Classified {
        command,
        kind,
        risks: facts.risks.into_iter().collect(),
        tables: facts.tables.into_iter().collect(),
        functions: facts.functions.into_iter().collect(),
        names_known,
        prepares,
        executes,
        deallocates,
        span: (piece.span.start, piece.span.end),
    })
}

/// How many leading keywords name the command (`SELECT` vs `ALTER TABLE`).
fn command_words(statement: &Statement) -> usize {
    match statement {
        Statement::Query(_)
        | Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_)
        | Statement::Copy { .. }
        | Statement::Prepare { .. }
        | Statement::Execute { .. }
        | Statement::Truncate(_)
        | Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => 1,
        _ => 2,
    }
}
