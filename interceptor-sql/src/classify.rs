//! Statement classification: what each statement of a query does, in terms policy rules match
//! on (kind, risks, tables, functions).
//!
//! PostgreSQL's own parser ([`super::pgparse`]) is the authority: its tree gives every
//! statement's kind, relations, functions and nested statements (`pgwalk`). Two second
//! opinions can only make the answer stricter: our PostgreSQL-faithful lexer
//! ([`super::lexer`]) must split the text into the same statements, and where sqlparser also
//! parses a statement and believes it writes, a statement the tree calls harmless is refused.

use serde::{Deserialize, Serialize};
use sqlparser::ast::{self, ObjectType, Statement, Visit};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use pg_query::protobuf::RawStmt;

use super::lexer::{self, LexSettings, StatementText, TokKind};
use super::names::{ident_name, name_parts, table_name};
use super::pgparse;
use super::pgwalk::{self, TreeError, TreeFacts};
use super::secrets;
use super::statement::{Risk, StatementKind};
use super::walk::{Facts, Walk, shallow};

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
    /// `EXECUTE name`: decided by what `name` was prepared as (the policy keeps the map of prepared names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executes: Option<String>,
    /// `DEALLOCATE name` (`Some("")` for DEALLOCATE ALL / DISCARD ALL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deallocates: Option<String>,
    /// Byte range of the statement in the query text.
    pub span: (usize, usize),
    /// Byte ranges (in the query text) of string constants holding secrets: passwords and
    /// connection strings, as PostgreSQL's parser reads them. The audit trail leaves them out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<(usize, usize)>,
    /// The parser names a secret the lexer's tokens could not place: the statement is never
    /// recorded as text (fail closed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret_unplaced: bool,
}

/// Why a query cannot be classified (it is then refused, or sent for approval if the policy
/// says so).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unclassifiable {
    #[error("cannot read the query text: {0}")]
    Lex(#[from] lexer::LexError),
    #[error("cannot parse statement {index}: {message}")]
    Parse { index: usize, message: String },
    /// PostgreSQL's parser rejects the text: its own message and cursor position.
    #[error("{message}")]
    Syntax { message: String, position: u32 },
    #[error(
        "statement {index}: PostgreSQL's parser and the SQL parser disagree about whether \
         it writes; refusing rather than guessing"
    )]
    WriteDisagreement { index: usize },
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
            Unclassifiable::Lex(_)
            | Unclassifiable::Parse { .. }
            | Unclassifiable::Syntax { .. } => "42601",
            _ => "42501",
        }
    }

    /// The syntax error's 1-based character position in the query text, if PostgreSQL's
    /// parser reported one.
    pub fn position(&self) -> Option<u32> {
        match self {
            Unclassifiable::Syntax { position, .. } if *position > 0 => Some(*position),
            _ => None,
        }
    }
}

/// Classifies every statement of a simple-query or Parse text.
pub fn classify(sql: &str, lex: LexSettings) -> Result<Vec<Classified>, Unclassifiable> {
    classify_tree(sql, lex).map(|(statements, _)| statements)
}

/// [`classify`], also handing back PostgreSQL's parse of `sql` for later stages (the masking
/// rewrite) so that nothing parses the text again.
pub fn classify_tree(
    sql: &str,
    lex: LexSettings,
) -> Result<(Vec<Classified>, pgparse::Tree), Unclassifiable> {
    let scs = lex.standard_conforming_strings;
    // Our lexer runs first: it is linear, and finds the strings outside which a long run of
    // operator characters is refused before PostgreSQL's scanner spends quadratic time on it.
    let lexed = lexer::split_statements(sql, lex);
    if let Some(run) = long_operator_run(sql, lexed.as_deref().unwrap_or(&[])) {
        return Err(Unclassifiable::Parse {
            index: 1,
            message: format!(
                "a run of {run} operator or comment characters outside strings; \
                 refused (longer than {MAX_OPERATOR_RUN})"
            ),
        });
    }
    let tree = pgparse::parse_tree(sql, scs).map_err(|e| Unclassifiable::Syntax {
        message: e.message,
        position: e.position,
    })?;
    let stmts = &tree.stmts;
    let pieces = lexed?;
    if pieces.is_empty() && stmts.is_empty() {
        return Err(Unclassifiable::Empty);
    }
    if pieces.len() != stmts.len() {
        tracing::debug!(
            ours = pieces.len(),
            postgres = stmts.len(),
            "statement split differential"
        );
        return Err(Unclassifiable::Differential {
            index: pieces.len().min(stmts.len()) + 1,
        });
    }
    let statements = pieces
        .iter()
        .zip(stmts)
        .enumerate()
        .map(|(i, (piece, raw))| classify_piece(sql, piece, raw, i + 1, scs))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((statements, tree))
}

/// PostgreSQL's scanner rescans a run of operator characters at every `/*` in it (in and out of
/// comments), so its time grows with the square of the run's length: 100 kB of `/*` take
/// minutes. No real statement has such a run outside a string constant.
const MAX_OPERATOR_RUN: usize = 1024;

fn long_operator_run(sql: &str, pieces: &[StatementText]) -> Option<usize> {
    let strings: Vec<std::ops::Range<usize>> = pieces
        .iter()
        .flat_map(|p| &p.tokens)
        .filter(|t| matches!(t.kind, TokKind::Str { .. }))
        .map(|t| t.span.clone())
        .collect();
    let (mut run, mut longest, mut next_string) = (0, 0, 0);
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if let Some(s) = strings.get(next_string)
            && i >= s.start
        {
            i = s.end.max(i + 1);
            next_string += 1;
            run = 0;
            continue;
        }
        if b"~!@#^&|`?+-*/%<>=".contains(&bytes[i]) {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
        i += 1;
    }
    (longest > MAX_OPERATOR_RUN).then_some(longest)
}

fn classify_piece(
    sql: &str,
    piece: &StatementText,
    raw: &RawStmt,
    index: usize,
    scs: bool,
) -> Result<Classified, Unclassifiable> {
    // Both splits must put the statement in the same place: PostgreSQL's statement starts at
    // or before our first token and ends at or after our last.
    let start = usize::try_from(raw.stmt_location).unwrap_or(usize::MAX);
    let end = match usize::try_from(raw.stmt_len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(n) => start.saturating_add(n),
    };
    let first = piece.tokens.first().map(|t| t.span.start);
    let last = piece.tokens.last().map(|t| t.span.end);
    if !(first.is_some_and(|f| f >= start) && last.is_some_and(|l| l <= end.max(start))) {
        return Err(Unclassifiable::Differential { index });
    }
    let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
        return Err(Unclassifiable::Differential { index });
    };
    let tree = pgwalk::statement(node, scs).map_err(|e| match e {
        TreeError::ExplainOption(option) => Unclassifiable::Parse {
            index,
            message: format!("EXPLAIN option {option} is not one PostgreSQL 15 accepts"),
        },
        TreeError::Empty => Unclassifiable::Differential { index },
    })?;
    let TreeFacts {
        facts,
        names_unknown,
        prepares,
        executes,
        deallocates,
        command_words,
    } = tree;
    let kind = facts.kind.unwrap_or(StatementKind::Procedural);
    // A DDL/DCL/utility statement in which no table was found may still act on objects.
    let unnamed_objects = facts.tables.is_empty()
        && matches!(
            kind,
            StatementKind::Ddl | StatementKind::Dcl | StatementKind::Utility
        );
    let names_known = !(names_unknown || unnamed_objects);
    let (secrets, secret_unplaced) = match secrets::secret_spans(node, &piece.tokens) {
        Ok(spans) => (spans.into_iter().map(|r| (r.start, r.end)).collect(), false),
        Err(secrets::Unplaced) => (Vec::new(), true),
    };
    let classified = Classified {
        command: command_of(piece, command_words),
        kind,
        risks: facts.risks.into_iter().collect(),
        tables: facts.tables.into_iter().collect(),
        functions: facts.functions.into_iter().collect(),
        names_known,
        prepares,
        executes,
        deallocates,
        span: (piece.span.start, piece.span.end),
        secrets,
        secret_unplaced,
    };
    // Second opinion: where sqlparser reads the same text and believes it writes, a statement
    // the tree calls harmless is refused (one of the two misreads it; fail closed).
    if !writes(&classified)
        && let Some(other) = sqlparser_opinion(sql, piece, index)
        && writes(&other)
    {
        tracing::debug!(index, ?other.kind, "write differential with sqlparser");
        return Err(Unclassifiable::WriteDisagreement { index });
    }
    Ok(classified)
}

/// Can running this statement change the database or the server (anything beyond reading
/// and session state)?
fn writes(c: &Classified) -> bool {
    !matches!(
        c.kind,
        StatementKind::Read
            | StatementKind::Transaction
            | StatementKind::Session
            | StatementKind::CopyTo
    ) || c.risks.iter().any(|r| {
        matches!(
            r,
            Risk::SideEffectFunction
                | Risk::AdminFunction
                | Risk::DynamicSql
                | Risk::LargeObject
                | Risk::Dblink
                | Risk::ServerFile
        )
    })
}

/// sqlparser's reading of one statement, when it has one (it cannot parse every statement
/// PostgreSQL accepts; then it has no opinion).
fn sqlparser_opinion(sql: &str, piece: &StatementText, index: usize) -> Option<Classified> {
    let text = parser_text(sql, piece);
    let dialect = PostgreSqlDialect {};
    let statements = Parser::new(&dialect)
        .try_with_sql(&text)
        .and_then(|mut p| p.parse_statements())
        .ok()?;
    check_tokens_agree(&text, piece, index).ok()?;
    let [statement] = statements.as_slice() else {
        return None;
    };
    classify_statement(statement, piece, index).ok()
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
pub(crate) fn leading_words(piece: &StatementText, n: usize) -> Vec<&str> {
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

pub(crate) fn command_of(piece: &StatementText, n: usize) -> String {
    leading_words(piece, n).join(" ").to_ascii_uppercase()
}

/// Does any string constant in the statement mention EXECUTE (dynamic SQL in PL/pgSQL)?
pub(crate) fn bodies_execute(piece: &StatementText) -> bool {
    piece.tokens.iter().any(|t| match &t.kind {
        TokKind::Str { body, .. } => body.to_ascii_lowercase().contains("execute"),
        _ => false,
    })
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
            // DISCARD PLANS drops cached plans only; prepared statements stay.
            if matches!(object_type, ast::DiscardObject::ALL) {
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
    if let Statement::Comment {
        object_type: ast::CommentObject::Table | ast::CommentObject::View,
        object_name,
        ..
    } = statement
    {
        facts.tables.insert(table_name(object_name));
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
        secrets: Vec::new(),
        secret_unplaced: false,
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
