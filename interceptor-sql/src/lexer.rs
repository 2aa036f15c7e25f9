//! A lexer that follows PostgreSQL's own scanner (`scan.l`) for everything that decides where a
//! token or a statement ends: comments (nested), quoting under both `standard_conforming_strings`
//! settings, `E''`, `U&''`, `B''`/`X''`, dollar quotes, string continuation across newlines.
//!
//! Why: sqlparser is not PostgreSQL. If the two disagree on where a string or comment ends, a
//! client can hide a statement from the classifier (a parser differential). This lexer splits the
//! text into statements the way the server will, and [`crate::classify::classify()`] refuses the query
//! when sqlparser's tokens disagree with ours.

use std::ops::Range;

/// Session settings that change how PostgreSQL reads the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LexSettings {
    /// The server's current `standard_conforming_strings` (on by default since 9.1). When off,
    /// a backslash escapes the next character inside plain `'...'` strings.
    pub standard_conforming_strings: bool,
}

impl Default for LexSettings {
    fn default() -> Self {
        LexSettings {
            standard_conforming_strings: true,
        }
    }
}

/// Why the text cannot be read safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    #[error("unterminated block comment at byte {0}")]
    UnterminatedComment(usize),
    #[error("unterminated quoted string at byte {0}")]
    UnterminatedString(usize),
    #[error("unterminated quoted identifier at byte {0}")]
    UnterminatedIdentifier(usize),
    #[error("unterminated dollar-quoted string at byte {0}")]
    UnterminatedDollarQuote(usize),
    #[error("Unicode escape string (U&'') while standard_conforming_strings is off (byte {0})")]
    UnicodeStringWithoutScs(usize),
    #[error("NUL byte in query text")]
    Nul,
}

/// What kind of token (only the distinctions the policy needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokKind {
    /// Keyword or identifier; `quoted` for `"..."` / `U&"..."` identifiers.
    Word {
        value: String,
        quoted: bool,
    },
    /// Any string constant. `needs_e_prefix`: a plain `'...'` containing a backslash while
    /// `standard_conforming_strings` is off, i.e. the server reads it as an `E''` string.
    Str {
        needs_e_prefix: bool,
        body: String,
    },
    Number,
    /// `$1`, `$2`, … (extended-protocol parameters).
    Param,
    Operator,
    Punct(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tok {
    pub kind: TokKind,
    /// Byte range in the original text.
    pub span: Range<usize>,
}

/// One statement as the server will split it: text up to (not including) a top-level `;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementText {
    pub span: Range<usize>,
    pub tokens: Vec<Tok>,
}

/// Splits `sql` into statements the way PostgreSQL does. Statements without any token
/// (e.g. `;;` or a lone comment) are dropped, as the server ignores them too.
pub fn split_statements(sql: &str, settings: LexSettings) -> Result<Vec<StatementText>, LexError> {
    let tokens = tokenize(sql, settings)?;
    let mut out = Vec::new();
    let mut current: Vec<Tok> = Vec::new();
    let mut start = 0usize;
    for tok in tokens {
        if tok.kind == TokKind::Punct(b';') {
            if !current.is_empty() {
                out.push(StatementText {
                    span: start..tok.span.start,
                    tokens: std::mem::take(&mut current),
                });
            }
            start = tok.span.end;
        } else {
            current.push(tok);
        }
    }
    if !current.is_empty() {
        out.push(StatementText {
            span: start..sql.len(),
            tokens: current,
        });
    }
    Ok(out)
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// PostgreSQL's `space`: `[ \t\n\r\f\v]` (`\v` since 16; accepting it here only makes the
/// server, not us, reject a query).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b)
}

const OP_CHARS: &[u8] = b"~!@#^&|`?+-*/%<>=";

/// Tokenizes the whole text. Comments and whitespace are dropped.
pub fn tokenize(sql: &str, settings: LexSettings) -> Result<Vec<Tok>, LexError> {
    #[cfg(any(test, feature = "count-parses"))]
    LEXES.with(|n| n.set(n.get() + 1));
    let b = sql.as_bytes();
    if b.contains(&0) {
        return Err(LexError::Nul);
    }
    let mut toks = Vec::new();
    let mut i = 0usize;
    while i < b.len() {
        let c = b[i];
        if is_space(c) {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            i = skip_line_comment(b, i);
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(b, i)?;
            continue;
        }
        let start = i;
        // Prefixed strings: E'', B'', X'', N'', U&''.
        if matches!(c, b'e' | b'E') && b.get(i + 1) == Some(&b'\'') {
            let (end, body) = scan_quoted(b, i + 1, QuoteMode::Escape)?;
            toks.push(tok_str(false, body, start..end));
            i = end;
            continue;
        }
        if matches!(c, b'b' | b'B' | b'x' | b'X') && b.get(i + 1) == Some(&b'\'') {
            let (end, body) = scan_quoted(b, i + 1, QuoteMode::Bits)?;
            toks.push(tok_str(false, body, start..end));
            i = end;
            continue;
        }
        if matches!(c, b'n' | b'N') && b.get(i + 1) == Some(&b'\'') {
            let mode = plain_mode(settings);
            let (end, body) = scan_quoted(b, i + 1, mode)?;
            let needs_e = mode == QuoteMode::Escape && body.contains('\\');
            toks.push(tok_str(needs_e, body, start..end));
            i = end;
            continue;
        }
        if matches!(c, b'u' | b'U') && b.get(i + 1) == Some(&b'&') {
            match b.get(i + 2) {
                Some(b'\'') => {
                    if !settings.standard_conforming_strings {
                        return Err(LexError::UnicodeStringWithoutScs(i));
                    }
                    let (end, body) = scan_quoted(b, i + 2, QuoteMode::Standard)?;
                    toks.push(tok_str(false, body, start..end));
                    i = end;
                    continue;
                }
                Some(b'"') => {
                    let (end, value) = scan_quoted_ident(b, i + 2)?;
                    toks.push(Tok {
                        kind: TokKind::Word {
                            value,
                            quoted: true,
                        },
                        span: start..end,
                    });
                    i = end;
                    continue;
                }
                _ => {}
            }
        }
        if c == b'\'' {
            let mode = plain_mode(settings);
            let (end, body) = scan_quoted(b, i, mode)?;
            let needs_e = mode == QuoteMode::Escape && body.contains('\\');
            toks.push(tok_str(needs_e, body, start..end));
            i = end;
            continue;
        }
        if c == b'"' {
            let (end, value) = scan_quoted_ident(b, i)?;
            toks.push(Tok {
                kind: TokKind::Word {
                    value,
                    quoted: true,
                },
                span: start..end,
            });
            i = end;
            continue;
        }
        if c == b'$' {
            // `$1` parameter, `$tag$` / `$$` dollar quote; anything else is a lone `$`.
            if b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                let mut j = i + 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                toks.push(Tok {
                    kind: TokKind::Param,
                    span: start..j,
                });
                i = j;
                continue;
            }
            if let Some(tag_end) = dollar_tag_end(b, i) {
                let tag = &b[i..tag_end];
                let body_start = tag_end;
                let Some(pos) = find(b, body_start, tag) else {
                    return Err(LexError::UnterminatedDollarQuote(i));
                };
                let body = String::from_utf8_lossy(&b[body_start..pos]).into_owned();
                let end = pos + tag.len();
                toks.push(tok_str(false, body, start..end));
                i = end;
                continue;
            }
            toks.push(Tok {
                kind: TokKind::Punct(b'$'),
                span: start..i + 1,
            });
            i += 1;
            continue;
        }
        if is_ident_start(c) {
            let mut j = i + 1;
            while j < b.len() && is_ident_cont(b[j]) {
                j += 1;
            }
            let value = String::from_utf8_lossy(&b[i..j]).to_ascii_lowercase();
            toks.push(Tok {
                kind: TokKind::Word {
                    value,
                    quoted: false,
                },
                span: start..j,
            });
            i = j;
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.' || b[j] == b'_') {
                // `1..2` is not a number followed by a number in PostgreSQL either; stop at `..`.
                if b[j] == b'.' && b.get(j + 1) == Some(&b'.') {
                    break;
                }
                j += 1;
            }
            if j < b.len() && matches!(b[j], b'e' | b'E') {
                let mut k = j + 1;
                if k < b.len() && matches!(b[k], b'+' | b'-') {
                    k += 1;
                }
                if k < b.len() && b[k].is_ascii_digit() {
                    while k < b.len() && b[k].is_ascii_digit() {
                        k += 1;
                    }
                    j = k;
                }
            }
            toks.push(Tok {
                kind: TokKind::Number,
                span: start..j,
            });
            i = j;
            continue;
        }
        if OP_CHARS.contains(&c) {
            let mut j = i;
            while j < b.len() && OP_CHARS.contains(&b[j]) {
                // An operator never contains the start of a comment (scan.l does the same).
                if (b[j] == b'-' && b.get(j + 1) == Some(&b'-'))
                    || (b[j] == b'/' && b.get(j + 1) == Some(&b'*'))
                {
                    break;
                }
                j += 1;
            }
            if j == i {
                // The operator starts with a comment opener: handled on the next turn.
                continue;
            }
            toks.push(Tok {
                kind: TokKind::Operator,
                span: start..j,
            });
            i = j;
            continue;
        }
        toks.push(Tok {
            kind: TokKind::Punct(c),
            span: start..i + 1,
        });
        i += 1;
    }
    Ok(toks)
}

#[cfg(any(test, feature = "count-parses"))]
thread_local! {
    /// Calls of [`tokenize`] on this thread (tests count them per statement).
    static LEXES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many texts this thread has tokenized.
#[cfg(any(test, feature = "count-parses"))]
pub fn lexes() -> usize {
    LEXES.with(|n| n.get())
}

fn tok_str(needs_e_prefix: bool, body: String, span: Range<usize>) -> Tok {
    Tok {
        kind: TokKind::Str {
            needs_e_prefix,
            body,
        },
        span,
    }
}

fn plain_mode(settings: LexSettings) -> QuoteMode {
    if settings.standard_conforming_strings {
        QuoteMode::Standard
    } else {
        QuoteMode::Escape
    }
}

fn skip_line_comment(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
        i += 1;
    }
    i
}

/// PostgreSQL block comments nest.
fn skip_block_comment(b: &[u8], start: usize) -> Result<usize, LexError> {
    let mut depth = 0usize;
    let mut i = start;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Ok(i);
            }
        } else {
            i += 1;
        }
    }
    Err(LexError::UnterminatedComment(start))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuoteMode {
    /// `''` doubles a quote, backslash is an ordinary character.
    Standard,
    /// Backslash escapes the next byte as well (`E''`, or plain strings with scs off).
    Escape,
    /// Bit strings: end at the first quote.
    Bits,
}

/// Scans a quoted string whose opening quote is at `open`. Returns the end offset and the body.
/// Follows scan.l's continuation rule: `'a'` + whitespace containing a newline + `'b'` is one
/// string, read in the same mode as the first part.
fn scan_quoted(b: &[u8], open: usize, mode: QuoteMode) -> Result<(usize, String), LexError> {
    let mut body = Vec::new();
    let mut i = open + 1;
    loop {
        let Some(&c) = b.get(i) else {
            return Err(LexError::UnterminatedString(open));
        };
        if c == b'\\' && mode == QuoteMode::Escape {
            body.push(c);
            if let Some(&n) = b.get(i + 1) {
                body.push(n);
            }
            i += 2;
            continue;
        }
        if c == b'\'' {
            if mode != QuoteMode::Bits && b.get(i + 1) == Some(&b'\'') {
                body.push(b'\'');
                i += 2;
                continue;
            }
            // Closing quote; look for a continuation.
            if let Some(next_open) = continuation(b, i + 1) {
                i = next_open + 1;
                continue;
            }
            return Ok((i + 1, String::from_utf8_lossy(&body).into_owned()));
        }
        body.push(c);
        i += 1;
    }
}

/// scan.l: `quotecontinue = {whitespace_with_newline}{quote}` where the whitespace holds at
/// least one newline and may hold `--` comments after it. Returns the offset of the new quote.
fn continuation(b: &[u8], mut i: usize) -> Option<usize> {
    let mut saw_newline = false;
    loop {
        match b.get(i) {
            Some(b' ' | b'\t' | 0x0c | 0x0b) => i += 1,
            Some(b'\n' | b'\r') => {
                saw_newline = true;
                i += 1;
            }
            Some(b'-') if saw_newline && b.get(i + 1) == Some(&b'-') => {
                i = skip_line_comment(b, i);
            }
            Some(b'\'') if saw_newline => return Some(i),
            _ => return None,
        }
    }
}

fn scan_quoted_ident(b: &[u8], open: usize) -> Result<(usize, String), LexError> {
    let mut value = Vec::new();
    let mut i = open + 1;
    loop {
        match b.get(i) {
            None => return Err(LexError::UnterminatedIdentifier(open)),
            Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                value.push(b'"');
                i += 2;
            }
            Some(b'"') => return Ok((i + 1, String::from_utf8_lossy(&value).into_owned())),
            Some(&c) => {
                value.push(c);
                i += 1;
            }
        }
    }
}

/// If a dollar-quote delimiter (`$$` or `$tag$`) starts at `i`, returns the offset after it.
fn dollar_tag_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if j < b.len() && b[j] == b'$' {
        return Some(j + 1);
    }
    if j < b.len() && is_ident_start(b[j]) {
        j += 1;
        while j < b.len() && (is_ident_start(b[j]) || b[j].is_ascii_digit()) {
            j += 1;
        }
        if j < b.len() && b[j] == b'$' {
            return Some(j + 1);
        }
    }
    None
}

fn find(haystack: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || from > haystack.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: LexSettings = LexSettings {
        standard_conforming_strings: true,
    };
    const OFF: LexSettings = LexSettings {
        standard_conforming_strings: false,
    };

    fn count(sql: &str, s: LexSettings) -> usize {
        split_statements(sql, s)
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    }

    #[test]
    fn backslash_depends_on_scs() {
        let sql = r"SELECT '\'; DROP TABLE t; --'";
        // scs on: the string is `\`, then DROP is a second statement.
        assert_eq!(count(sql, ON), 2);
        // scs off: `\'` is an escaped quote; everything is one string.
        assert_eq!(count(sql, OFF), 1);
    }

    #[test]
    fn e_strings_always_escape() {
        assert_eq!(count(r"SELECT E'\''; SELECT 2", ON), 2);
        assert_eq!(count(r"SELECT E'\'; SELECT 2'", ON), 1);
        assert_eq!(count(r"SELECT e'\\'; SELECT 2", ON), 2);
    }

    #[test]
    fn nested_comments() {
        assert_eq!(count("SELECT 1 /* /* */ ; SELECT 2 */", ON), 1);
        assert_eq!(
            split_statements("SELECT 1 /* /* */ ", ON),
            Err(LexError::UnterminatedComment(9))
        );
    }

    #[test]
    fn dollar_quotes_and_params() {
        assert_eq!(count("SELECT $a$ ; $b$ ; $a$; SELECT $1", ON), 2);
        assert_eq!(count("SELECT $$;$$", ON), 1);
        // `a$b$` is an identifier, not a dollar quote.
        assert_eq!(count("SELECT 1 AS a$b$; SELECT $b$x$b$", ON), 2);
        assert!(split_statements("SELECT $x$ ;", ON).is_err());
    }

    #[test]
    fn unicode_strings() {
        assert_eq!(count("SELECT U&'\\0041'; SELECT 2", ON), 2);
        assert!(split_statements("SELECT U&'x'", OFF).is_err());
    }

    #[test]
    fn continuation_keeps_escape_mode() {
        // The second part continues the E string, so `\'` is still an escape.
        assert_eq!(count("SELECT E'a'\n'\\'; SELECT 2'", ON), 1);
        // Without a newline the two strings are separate tokens (a syntax error for PG).
        assert_eq!(count("SELECT 'a' '\\'; SELECT '2'", ON), 2);
    }

    #[test]
    fn operators_stop_at_comments() {
        let toks = tokenize("SELECT 1 +-- c\n2 */* x */ 3", ON).unwrap_or_default();
        let ops: Vec<_> = toks
            .iter()
            .filter(|t| t.kind == TokKind::Operator)
            .collect();
        assert_eq!(ops.len(), 2);
    }

    #[test]
    fn needs_e_prefix_only_without_scs() {
        let on = tokenize(r"SELECT 'a\b'", ON).unwrap_or_default();
        let off = tokenize(r"SELECT 'a\b'", OFF).unwrap_or_default();
        assert!(matches!(
            on[1].kind,
            TokKind::Str {
                needs_e_prefix: false,
                ..
            }
        ));
        assert!(matches!(
            off[1].kind,
            TokKind::Str {
                needs_e_prefix: true,
                ..
            }
        ));
    }
}
