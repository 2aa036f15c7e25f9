//! Keeps passwords out of audit records: `ALTER ROLE bob PASSWORD 'secret'` is recorded as
//! `ALTER ROLE bob PASSWORD '[redacted]'`, and a bind parameter given as `PASSWORD $1` is
//! replaced. Statements that do not mention `password` are recorded byte for byte.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use super::record::StatementRecord;

pub const REDACTED: &str = "[redacted]";

/// Redacts secrets in place. When the text mentions a password but cannot be tokenized, the
/// whole text is withheld (fail closed): a secret must never reach the audit trail.
pub fn redact_statement(st: &mut StatementRecord) {
    if !st.sql.to_ascii_lowercase().contains("password") {
        return;
    }
    let dialect = PostgreSqlDialect {};
    let tokens = match Tokenizer::new(&dialect, &st.sql).tokenize_with_location() {
        Ok(t) => t,
        Err(_) => {
            st.sql =
                format!("{REDACTED} (statement mentions a password and could not be tokenized)");
            st.parameters.clear();
            return;
        }
    };
    let lines = line_starts(&st.sql);
    let mut replace: Vec<(usize, usize)> = Vec::new();
    let mut after_password = false;
    for t in &tokens {
        if matches!(t.token, Token::Whitespace(_)) {
            continue;
        }
        if after_password {
            match &t.token {
                Token::Placeholder(p) => {
                    if let Some(i) = p
                        .strip_prefix('$')
                        .and_then(|n| n.parse::<usize>().ok())
                        .and_then(|n| n.checked_sub(1))
                        && let Some(v) = st.parameters.get_mut(i)
                        && v.is_some()
                    {
                        *v = Some(REDACTED.to_string());
                    }
                }
                tok if is_string_literal(tok) => match span_bytes(&st.sql, &lines, t) {
                    Some(r) => replace.push(r),
                    None => {
                        st.sql = format!("{REDACTED} (statement mentions a password)");
                        return;
                    }
                },
                _ => {}
            }
        }
        after_password = matches!(&t.token, Token::Word(w) if w.keyword == Keyword::PASSWORD);
    }
    for (start, end) in replace.into_iter().rev() {
        st.sql.replace_range(start..end, &format!("'{REDACTED}'"));
    }
}

fn is_string_literal(t: &Token) -> bool {
    matches!(
        t,
        Token::SingleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::DoubleQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::HexStringLiteral(_)
    )
}

fn line_starts(s: &str) -> Vec<usize> {
    let mut v = vec![0];
    v.extend(s.match_indices('\n').map(|(i, _)| i + 1));
    v
}

/// Byte offset of a 1-based line/column (columns count characters).
fn offset(s: &str, lines: &[usize], loc: Location) -> Option<usize> {
    let line_start = *lines.get(usize::try_from(loc.line).ok()?.checked_sub(1)?)?;
    let col = usize::try_from(loc.column).ok()?.checked_sub(1)?;
    let rest = s.get(line_start..)?;
    match rest.char_indices().nth(col) {
        Some((i, _)) => Some(line_start + i),
        None if rest.chars().count() == col => Some(s.len()),
        None => None,
    }
}

fn span_bytes(s: &str, lines: &[usize], t: &TokenWithSpan) -> Option<(usize, usize)> {
    let start = offset(s, lines, t.span.start)?;
    let end = offset(s, lines, t.span.end)?;
    (start < end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{QueryProtocol, SessionId};

    fn st(sql: &str, params: Vec<Option<String>>) -> StatementRecord {
        StatementRecord {
            session: SessionId(1),
            protocol: QueryProtocol::Simple,
            sql: sql.into(),
            parameters: params,
            statement_kinds: vec![],
            tables: vec![],
            decision: "allow".into(),
            rule: None,
            deny_sqlstate: None,
            reason: None,
            approval: None,
        }
    }

    #[test]
    fn password_literals_are_redacted() {
        let mut s = st(
            "ALTER ROLE bob WITH PASSWORD 's3cr''et' VALID UNTIL 'infinity'",
            vec![],
        );
        redact_statement(&mut s);
        assert_eq!(
            s.sql,
            "ALTER ROLE bob WITH PASSWORD '[redacted]' VALID UNTIL 'infinity'"
        );

        let mut s = st("create user \"ü\"\n  password E'x\\'y';", vec![]);
        redact_statement(&mut s);
        assert_eq!(s.sql, "create user \"ü\"\n  password '[redacted]';");

        let mut s = st("CREATE ROLE a PASSWORD $$pw$$", vec![]);
        redact_statement(&mut s);
        assert!(!s.sql.contains("pw$$"), "{}", s.sql);

        let mut s = st(
            "ALTER USER x PASSWORD $2",
            vec![Some("x".into()), Some("hunter2".into())],
        );
        redact_statement(&mut s);
        assert_eq!(s.parameters, vec![Some("x".into()), Some(REDACTED.into())]);
    }

    #[test]
    fn other_statements_are_untouched() {
        let sql = "SELECT 'password' AS label, password_hash FROM users WHERE id = $1";
        let mut s = st(sql, vec![Some("7".into())]);
        redact_statement(&mut s);
        assert_eq!(s.sql, sql);
        assert_eq!(s.parameters, vec![Some("7".into())]);
    }

    #[test]
    fn untokenizable_text_mentioning_a_password_is_withheld() {
        let mut s = st(
            "ALTER ROLE bob PASSWORD 'unterminated",
            vec![Some("p".into())],
        );
        redact_statement(&mut s);
        assert!(!s.sql.contains("unterminated"));
        assert!(s.parameters.is_empty());
    }
}
