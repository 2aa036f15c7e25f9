//! PostgreSQL's own parser (libpg_query, through the `pg_query` crate): the authority on what a
//! query's statements are. Its grammar, keyword table and scanner are the server's, so every
//! synonym and spelling arrives normalised as the server sees it (`ANALYSE` and `ANALYZE` are
//! one option, `MOVE` is a `FetchStmt`, `U&"…"` identifiers are decoded).

use std::ffi::{CStr, CString, c_char, c_int};

use pg_query::protobuf::RawStmt;

/// A syntax error as PostgreSQL reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// The server's message, e.g. `syntax error at or near "FROBNICATE"`.
    pub message: String,
    /// 1-based character position in the query text (the ErrorResponse `P` field); 0 if none.
    pub position: u32,
}

/// A query's whole parse tree, as the masking rewrite reads it.
pub type Tree = pg_query::protobuf::ParseResult;

/// Parses `sql` as the server would with the given `standard_conforming_strings` setting.
pub(crate) fn parse(
    sql: &str,
    standard_conforming_strings: bool,
) -> Result<Vec<RawStmt>, SyntaxError> {
    parse_tree(sql, standard_conforming_strings).map(|tree| tree.stmts)
}

/// Parses `sql` as the server would with the given `standard_conforming_strings` setting, keeping
/// the whole tree.
pub fn parse_tree(sql: &str, standard_conforming_strings: bool) -> Result<Tree, SyntaxError> {
    #[cfg(any(test, feature = "count-parses"))]
    PARSES.with(|n| n.set(n.get() + 1));
    let options = if standard_conforming_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    match pg_query::parse(sql, options) {
        Ok(result) => Ok(result.protobuf),
        Err(pg_query::Error::Parse(message)) => Err(SyntaxError {
            position: error_position(sql, options),
            message,
        }),
        // A NUL byte (the protocol cannot carry one) or a tree too deep to decode.
        Err(e) => Err(SyntaxError {
            message: e.to_string(),
            position: 0,
        }),
    }
}

#[cfg(any(test, feature = "count-parses"))]
thread_local! {
    /// Calls of the parser on this thread (tests count them per statement).
    static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has called PostgreSQL's parser.
#[cfg(any(test, feature = "count-parses"))]
pub fn parses() -> usize {
    PARSES.with(|n| n.get())
}

#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

#[repr(C)]
struct PgQueryParseResult {
    parse_tree: *mut c_char,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

// The same static libpg_query the pg_query crate links; its safe API drops the cursor position
// of an error, so the error path asks the library once more through its plain C interface.
unsafe extern "C" {
    fn pg_query_parse_opts(input: *const c_char, parser_options: c_int) -> PgQueryParseResult;
    fn pg_query_free_parse_result(result: PgQueryParseResult);
}

/// The cursor position of the syntax error in `sql` (only called after a failed parse).
fn error_position(sql: &str, options: pg_query::ParserOptions) -> u32 {
    let Ok(input) = CString::new(sql) else {
        return 0;
    };
    // SAFETY: `input` is a valid NUL-terminated string that outlives the call; the result is
    // read only while it is alive and freed exactly once by the library's own free function.
    unsafe {
        let result = pg_query_parse_opts(input.as_ptr(), options.bits());
        let position = if result.error.is_null() {
            0
        } else {
            let e = &*result.error;
            if !e.message.is_null() {
                tracing::trace!(message = ?CStr::from_ptr(e.message), "pg_query error");
            }
            u32::try_from(e.cursorpos).unwrap_or(0)
        };
        pg_query_free_parse_result(result);
        position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_carry_the_servers_message_and_position() {
        let e = parse("SELECT 1; FROBNICATE", true).unwrap_err();
        assert_eq!(e.message, "syntax error at or near \"FROBNICATE\"");
        assert_eq!(e.position, 11);
        let e = parse("SELECT (", true).unwrap_err();
        assert_eq!(e.message, "syntax error at end of input");
        assert_eq!(e.position, 9);
        assert!(parse("SELECT 1\0", true).is_err());
    }

    #[test]
    fn standard_conforming_strings_is_honoured() {
        // With scs off, `'\''` is one string; with it on, the quote ends the string early.
        assert_eq!(
            parse(r"SELECT '\''; SELECT 2", false).map(|s| s.len()),
            Ok(2)
        );
        assert!(parse(r"SELECT '\''; SELECT 2", true).is_err());
    }
}
