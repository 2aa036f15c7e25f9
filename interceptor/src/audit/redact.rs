//! Keeps secrets out of audit records. The classified statements say where their secrets are
//! (string constants PostgreSQL's parser reads as a password or a connection string, see
//! `Classified::secrets`); those bytes are replaced, the rest is recorded byte for byte:
//! `ALTER ROLE bob PASSWORD 'secret'` is recorded as `ALTER ROLE bob PASSWORD '[redacted]'`.
//! Nothing here parses SQL again.

use interceptor_sql::classify::Classified;

use super::record::StatementRecord;

pub(crate) const REDACTED: &str = "[redacted]";

/// Words without which no statement PostgreSQL accepts can hold a secret (keywords cannot be
/// spelled with escapes; `U&"p\0061ssword"` as an option name still needs `OPTIONS`).
const SECRET_WORDS: [&str; 5] = ["password", "connection", "options", "scram-sha-256", "md5"];

/// Redacts the secrets of `st`, whose text was classified as `statements`. Fails closed: a
/// text that could not be classified but may hold a secret, a secret the parser could not
/// place, or a span that does not fit the text withholds the whole text, its parameters and
/// the refusal reason (a syntax error may quote the text).
pub(crate) fn redact_record(st: &mut StatementRecord, statements: &[Classified]) {
    if statements.is_empty() {
        if may_hold_secret(&st.sql) {
            withhold(
                st,
                "statement could not be classified and may hold a secret",
            );
        }
        return;
    }
    if statements.iter().any(|c| c.secret_unplaced) {
        withhold(st, "statement holds a secret");
        return;
    }
    let mut spans: Vec<(usize, usize)> = statements
        .iter()
        .flat_map(|c| c.secrets.iter().copied())
        .collect();
    if spans.is_empty() {
        return;
    }
    spans.sort_unstable();
    let fits = spans.windows(2).all(|w| w[0].1 <= w[1].0)
        && spans.iter().all(|&(start, end)| {
            start < end
                && st.sql.get(start..end).is_some_and(|s| {
                    s.starts_with(['\'', '$', 'E', 'e', 'U', 'u', 'N', 'n', 'B', 'b', 'X', 'x'])
                })
        });
    if !fits {
        withhold(st, "statement holds a secret");
        return;
    }
    for (start, end) in spans.into_iter().rev() {
        st.sql.replace_range(start..end, &format!("'{REDACTED}'"));
    }
}

fn may_hold_secret(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| lower.contains(w))
}

fn withhold(st: &mut StatementRecord, why: &str) {
    st.sql = format!("{REDACTED} ({why})");
    st.parameters.clear();
    if st.reason.is_some() {
        st.reason = Some(format!("{REDACTED} (the reason may quote the statement)"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{QueryProtocol, SessionId};
    use interceptor_sql::classify::classify;
    use interceptor_sql::lexer::LexSettings;

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

    fn redacted(sql: &str, scs: bool) -> String {
        let lex = LexSettings {
            standard_conforming_strings: scs,
        };
        let statements = classify(sql, lex).unwrap_or_default();
        let mut s = st(sql, vec![Some("p".into())]);
        redact_record(&mut s, &statements);
        s.sql
    }

    /// Every spelling of a password PostgreSQL accepts, with the secret each hides.
    const PASSWORD_FORMS: &[(&str, &str)] = &[
        (
            "ALTER ROLE bob WITH PASSWORD 's3cr''et' VALID UNTIL 'infinity'",
            "s3cr",
        ),
        ("create user \"ü\"\n  password E'x\\'hunter2';", "hunter2"),
        ("CREATE ROLE a LOGIN PASSWORD $$dollar1$$", "dollar1"),
        ("CREATE ROLE a PASSWORD $tag$dollar2$tag$", "dollar2"),
        ("ALTER USER a ENCRYPTED PASSWORD 'enc1'", "enc1"),
        (
            "ALTER USER a ENCRYPTED /* c */ PASSWORD -- c\n 'enc2'",
            "enc2",
        ),
        ("ALTER ROLE a PASSWORD /* 'not' */ E'esc\\x41pe'", "esc"),
        ("ALTER ROLE a PASSWORD U&'uni\\0041code'", "uni"),
        ("ALTER ROLE a PASSWORD U&'uni!0041x2' UESCAPE '!'", "uni"),
        (
            "ALTER USER a PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy'",
            "c3RvcmVk",
        ),
        (
            "ALTER ROLE a PASSWORD 'md5a1b2c3d4e5f60718293a4b5c6d7e8f9'",
            "a1b2c3d4",
        ),
        (
            "CREATE USER MAPPING FOR a SERVER s OPTIONS (user 'u', password 'fdw1')",
            "fdw1",
        ),
        (
            "ALTER USER MAPPING FOR a SERVER s OPTIONS (SET password 'fdw2')",
            "fdw2",
        ),
        (
            "CREATE SUBSCRIPTION sub CONNECTION 'host=h password=sub1' PUBLICATION p \
             WITH (connect = false)",
            "sub1",
        ),
        ("ALTER SUBSCRIPTION sub CONNECTION 'password=sub2'", "sub2"),
        (
            "SELECT 1; ALTER ROLE a PASSWORD 'second'; SELECT 2",
            "second",
        ),
    ];

    #[test]
    fn every_password_form_is_redacted_from_the_tree() {
        for (sql, secret) in PASSWORD_FORMS {
            let out = redacted(sql, true);
            assert!(!out.contains(secret), "{sql} -> {out}");
            assert!(out.contains("'[redacted]'"), "{sql} -> {out}");
        }
        // The rest of the text is kept byte for byte.
        assert_eq!(
            redacted(PASSWORD_FORMS[0].0, true),
            "ALTER ROLE bob WITH PASSWORD '[redacted]' VALID UNTIL 'infinity'"
        );
        // With standard_conforming_strings off, a plain string takes backslash escapes.
        let out = redacted(r"ALTER ROLE a PASSWORD 'x\'hunter3'", false);
        assert_eq!(out, "ALTER ROLE a PASSWORD '[redacted]'");
    }

    #[test]
    fn other_statements_are_untouched() {
        for sql in [
            "SELECT 'password' AS label, password_hash FROM users WHERE id = $1",
            "ALTER ROLE a PASSWORD NULL",
            "ALTER ROLE a VALID UNTIL 'infinity'",
        ] {
            assert_eq!(redacted(sql, true), sql);
        }
    }

    #[test]
    fn unclassifiable_text_that_may_hold_a_secret_is_withheld() {
        let mut s = st(
            "ALTER ROLE bob PASSWORD 'unterminated",
            vec![Some("p".into())],
        );
        s.reason = Some("syntax error at or near \"'unterminated\"".into());
        redact_record(&mut s, &[]);
        assert!(!s.sql.contains("unterminated"));
        assert!(!s.reason.as_deref().unwrap_or("").contains("unterminated"));
        assert!(s.parameters.is_empty());
        for sql in [
            "ALTER ROLE a PASSWORD 'x' 'secret9'",
            "CREATE SUBSCRIPTION s CONNECTION 'password=secret9' BROKEN",
        ] {
            assert!(!redacted(sql, true).contains("secret9"), "{sql}");
        }
        // Without a word that could introduce a secret, a syntax error is recorded as sent.
        assert_eq!(redacted("SELEC 'x'", true), "SELEC 'x'");
    }

    #[test]
    fn spans_that_do_not_fit_the_text_withhold_it() {
        let mut c =
            classify("ALTER ROLE a PASSWORD 'pw1'", LexSettings::default()).unwrap_or_default();
        c[0].secrets = vec![(0, 5)];
        let mut s = st("ALTER ROLE a PASSWORD 'pw1'", vec![]);
        redact_record(&mut s, &c);
        assert!(!s.sql.contains("pw1"), "{}", s.sql);
        c[0].secrets.clear();
        c[0].secret_unplaced = true;
        let mut s = st("ALTER ROLE a PASSWORD 'pw1'", vec![]);
        redact_record(&mut s, &c);
        assert!(!s.sql.contains("pw1"), "{}", s.sql);
    }
}
