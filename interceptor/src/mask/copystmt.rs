//! The COPY statements that send data to the client, read from PostgreSQL's own parse tree.
//!
//! PostgreSQL's grammar turns every spelling of a COPY option into one list of `DefElem`s: the
//! current `(FORMAT csv, ESCAPE '\')`, the pre-9.0 `WITH CSV HEADER ESCAPE '\'`, `BINARY` before
//! the table name and `USING DELIMITERS`. Identifiers arrive decoded and case-folded as the
//! server reads them (`U&"…"`, `"Mixed"`), so what the masker is told is what the server does.

use pg_query::NodeEnum;
use pg_query::protobuf::{CopyStmt, DefElem, ParseResult, RangeVar};

use super::copy::{CopyFormat, CopyOptions};

/// One COPY … TO STDOUT, in statement order: what it copies and the options that shape its
/// output. An error names an option the masker cannot follow (the result is then withheld).
pub(crate) type CopyTarget = Result<CopyOut, String>;

/// What a COPY TO STDOUT produces.
#[derive(Debug, Clone)]
pub(crate) struct CopyOut {
    pub options: CopyOptions,
    /// A query whose RowDescription has the COPY's columns, in order (described, never run).
    pub columns_query: String,
}

/// The COPY TO STDOUT statements of `tree`, in order. COPY FROM, and COPY TO a file or a
/// program, send no data to the client and are left out.
pub(crate) fn copies_to_client(tree: &ParseResult) -> Vec<CopyTarget> {
    tree.stmts
        .iter()
        .filter_map(|raw| match raw.stmt.as_ref()?.node.as_ref()? {
            NodeEnum::CopyStmt(c) if !c.is_from && !c.is_program && c.filename.is_empty() => {
                Some(copy_out(c))
            }
            _ => None,
        })
        .collect()
}

fn copy_out(c: &CopyStmt) -> CopyTarget {
    let options = copy_options(&c.options)?;
    let columns_query = match (&c.relation, &c.query) {
        (Some(rel), _) => table_columns_query(rel, &c.attlist)?,
        (None, Some(q)) => match q.node.as_ref() {
            Some(node) => node
                .deparse(Default::default())
                .map_err(|e| format!("COPY query could not be read back: {e}"))?,
            None => return Err("COPY without a query".into()),
        },
        (None, None) => return Err("COPY without a table or query".into()),
    };
    Ok(CopyOut {
        options,
        columns_query,
    })
}

/// `SELECT <columns> FROM <table>` with every name quoted, so it names exactly what the
/// COPY names.
fn table_columns_query(
    rel: &RangeVar,
    attlist: &[pg_query::protobuf::Node],
) -> Result<String, String> {
    let mut table = String::new();
    for part in [&rel.catalogname, &rel.schemaname] {
        if !part.is_empty() {
            table.push_str(&quote_ident(part));
            table.push('.');
        }
    }
    table.push_str(&quote_ident(&rel.relname));
    if attlist.is_empty() {
        return Ok(format!("SELECT * FROM {table}"));
    }
    let mut columns = Vec::with_capacity(attlist.len());
    for a in attlist {
        match a.node.as_ref() {
            Some(NodeEnum::String(s)) => columns.push(quote_ident(&s.sval)),
            _ => return Err("COPY column list of an unexpected shape".into()),
        }
    }
    Ok(format!("SELECT {} FROM {table}", columns.join(", ")))
}

/// A quoted identifier as PostgreSQL's `quote_ident` writes it when quoting is needed.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The options as the masker needs them. Option names arrive lower-cased by the grammar
/// unless the client quoted them (which PostgreSQL then rejects, as it does every option it
/// does not know); values are compared as the server compares them.
pub(crate) fn copy_options(options: &[pg_query::protobuf::Node]) -> Result<CopyOptions, String> {
    let defs: Vec<&DefElem> = options
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::DefElem(d)) => Some(&**d),
            _ => None,
        })
        .collect();
    let mut opts = match defs.iter().rev().find(|d| d.defname == "format") {
        None => CopyOptions::text(),
        Some(d) => match string_arg(d).as_deref() {
            // The server compares the name exactly: `FORMAT 'CSV'` is an error there.
            Some("text") => CopyOptions::text(),
            Some("csv") => CopyOptions::csv(),
            Some("binary") => CopyOptions::binary(),
            other => return Err(format!("unknown COPY format {other:?}")),
        },
    };
    let mut escape_set = false;
    for d in &defs {
        match d.defname.as_str() {
            "delimiter" => opts.delimiter = one_byte(d)?,
            "null" => {
                opts.null = string_arg(d)
                    .ok_or("COPY NULL needs a string")?
                    .into_bytes()
            }
            "header" => opts.header = header(d)?,
            "quote" => opts.quote = one_byte(d)?,
            "escape" => {
                opts.escape = one_byte(d)?;
                escape_set = true;
            }
            // Output converted to another encoding could put delimiter or quote bytes inside
            // a multibyte character; the masker reads UTF-8 only.
            "encoding" => {
                let name = string_arg(d).unwrap_or_default();
                let plain: String = name
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect::<String>()
                    .to_ascii_lowercase();
                if plain != "utf8" && plain != "unicode" {
                    return Err(format!("COPY to encoding {name:?} cannot be masked"));
                }
            }
            _ => {}
        }
    }
    if opts.format == CopyFormat::Csv && !escape_set {
        // CSV's escape defaults to its quote.
        opts.escape = opts.quote;
    }
    Ok(opts)
}

/// A string argument (`'x'` or a bare word; numbers as PostgreSQL prints them).
fn string_arg(d: &DefElem) -> Option<String> {
    match d.arg.as_ref()?.node.as_ref()? {
        NodeEnum::String(s) => Some(s.sval.clone()),
        NodeEnum::Integer(i) => Some(i.ival.to_string()),
        NodeEnum::Float(f) => Some(f.fval.clone()),
        NodeEnum::Boolean(b) => Some(if b.boolval { "true" } else { "false" }.into()),
        _ => None,
    }
}

/// DELIMITER, QUOTE and ESCAPE: a single one-byte character, as the server requires.
fn one_byte(d: &DefElem) -> Result<u8, String> {
    match string_arg(d).as_deref().map(str::as_bytes) {
        Some([b]) if b.is_ascii() => Ok(*b),
        _ => Err(format!(
            "COPY {} must be a single one-byte character",
            d.defname
        )),
    }
}

/// HEADER as the server reads a boolean option (no value: true).
fn header(d: &DefElem) -> Result<bool, String> {
    let Some(arg) = d.arg.as_ref().and_then(|a| a.node.as_ref()) else {
        return Ok(true);
    };
    match arg {
        NodeEnum::Boolean(b) => Ok(b.boolval),
        NodeEnum::Integer(i) if i.ival == 0 || i.ival == 1 => Ok(i.ival == 1),
        NodeEnum::String(s) => match s.sval.to_ascii_lowercase().as_str() {
            "true" | "on" => Ok(true),
            "false" | "off" => Ok(false),
            _ => Err(format!("COPY HEADER {:?} is not a boolean", s.sval)),
        },
        _ => Err("COPY HEADER is not a boolean".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copies(sql: &str) -> Vec<CopyTarget> {
        let tree = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
            .unwrap()
            .protobuf;
        copies_to_client(&tree)
    }

    fn one(sql: &str) -> CopyOut {
        let mut all = copies(sql);
        assert_eq!(all.len(), 1, "{sql}");
        all.remove(0).unwrap()
    }

    #[test]
    fn every_spelling_of_the_options_reads_the_same() {
        let t = one("COPY t TO STDOUT");
        assert_eq!(t.options.format, CopyFormat::Text);
        assert_eq!((t.options.delimiter, t.options.header), (b'\t', false));
        assert_eq!(t.columns_query, r#"SELECT * FROM "t""#);

        for sql in [
            r"COPY t TO STDOUT WITH CSV HEADER DELIMITER ';' ESCAPE '\'",
            r"COPY t TO STDOUT (FORMAT csv, HEADER, DELIMITER ';', ESCAPE '\')",
            r"COPY t TO STDOUT WITH (format 'csv', header true, delimiter ';', escape E'\\')",
            r"copy t to stdout csv header delimiter as ';' escape as '\'",
        ] {
            let c = one(sql).options;
            assert_eq!(c.format, CopyFormat::Csv, "{sql}");
            assert!(c.header, "{sql}");
            assert_eq!(
                (c.delimiter, c.quote, c.escape),
                (b';', b'"', b'\\'),
                "{sql}"
            );
        }
        // CSV escape defaults to the quote.
        let q = one("COPY t TO STDOUT WITH CSV QUOTE ''''").options;
        assert_eq!((q.quote, q.escape), (b'\'', b'\''));
        let b = one("COPY BINARY t TO STDOUT").options;
        assert_eq!(b.format, CopyFormat::Binary);
        let n = one("COPY t TO STDOUT (NULL 'nil', HEADER off)").options;
        assert!(!n.header);
        assert_eq!(n.null, b"nil");
        let d = one("COPY t TO STDOUT USING DELIMITERS '|'").options;
        assert_eq!(d.delimiter, b'|');
    }

    #[test]
    fn options_the_server_refuses_or_the_masker_cannot_follow_are_errors() {
        for sql in [
            "COPY t TO STDOUT (FORMAT parquet)",
            "COPY t TO STDOUT (FORMAT 'CSV')",
            "COPY t TO STDOUT (DELIMITER ';;')",
            "COPY t TO STDOUT (FORMAT csv, QUOTE 'é')",
            "COPY t TO STDOUT (ENCODING 'SJIS')",
            "COPY t TO STDOUT (HEADER maybe)",
        ] {
            let all = copies(sql);
            assert!(matches!(all.as_slice(), [Err(_)]), "{sql}: {all:?}");
        }
        assert!(one("COPY t TO STDOUT (ENCODING 'UTF-8')").options.format == CopyFormat::Text);
    }

    #[test]
    fn names_arrive_decoded_and_quoted_back() {
        let c = one(r#"COPY "Sales".Leads (U&"e\002dmail", "Note""s") TO STDOUT"#);
        assert_eq!(
            c.columns_query,
            r#"SELECT "e-mail", "Note""s" FROM "Sales"."leads""#
        );
        let q = one("COPY (SELECT id, email FROM customers WHERE id < 10) TO STDOUT");
        assert_eq!(
            q.columns_query,
            "SELECT id, email FROM customers WHERE id < 10"
        );
    }

    #[test]
    fn only_copies_to_the_client_count() {
        let all = copies(
            "COPY t TO '/tmp/x'; COPY t FROM STDIN; COPY t TO PROGRAM 'cat'; \
             SELECT 1; COPY u TO STDOUT (FORMAT csv)",
        );
        assert_eq!(all.len(), 1);
        assert!(all[0].as_ref().unwrap().columns_query.contains("\"u\""));
    }
}
