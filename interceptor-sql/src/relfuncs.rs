//! Built-in functions whose arguments name relations or carry query text (`table_to_xml`,
//! `query_to_xml`, `schema_to_xml`, `database_to_xml`, `pg_relation_size`, …). The list is
//! PostgreSQL 15's pg_proc, selected by argument type and name (`pg15_relation_functions.sql`);
//! a test compares it with the test cluster's catalog.

use std::collections::HashMap;
use std::sync::OnceLock;

use super::names::{MAX_IDENTIFIER_BYTES, qualify_relation};

/// What an argument carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArgClass {
    /// A relation (regclass) whose contents the function reads.
    Relation,
    /// A relation (regclass) of which only metadata is read (size, structure, sequence
    /// state): the same facts the catalogs give.
    RelationMetadata,
    /// Query text that the function runs.
    Query,
    /// A cursor (its query was decided when it was declared).
    Cursor,
    /// A schema: every table in it is read.
    Schema,
    /// The function reads every table of the database.
    Database,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ArgSpec {
    /// 1-based argument position; 0 for whole-database functions without such an argument.
    pub position: usize,
    /// The argument's name in pg_proc (for named notation), empty if unnamed.
    pub name: String,
    pub class: ArgClass,
}

/// The checked-in list: `proname position argname class` per line.
pub const DATA: &str = include_str!("pg15_relation_functions.txt");
/// The query that produced [`DATA`] (run by the catalog test).
pub const QUERY: &str = include_str!("pg15_relation_functions.sql");

fn table() -> &'static HashMap<String, Vec<ArgSpec>> {
    static TABLE: OnceLock<HashMap<String, Vec<ArgSpec>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut map: HashMap<String, Vec<ArgSpec>> = HashMap::new();
        for line in DATA
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, position, arg, class] = fields.as_slice() else {
                continue;
            };
            let class = match *class {
                "relation" => ArgClass::Relation,
                "relation_metadata" => ArgClass::RelationMetadata,
                "query" => ArgClass::Query,
                "cursor" => ArgClass::Cursor,
                "schema" => ArgClass::Schema,
                "database" => ArgClass::Database,
                _ => continue,
            };
            let Ok(position) = position.parse() else {
                continue;
            };
            map.entry((*name).to_owned()).or_default().push(ArgSpec {
                position,
                name: if *arg == "-" {
                    String::new()
                } else {
                    (*arg).to_owned()
                },
                class,
            });
        }
        map
    })
}

/// The relation-naming arguments of built-in function `name` (empty for most functions).
pub(crate) fn lookup(name: &str) -> &'static [ArgSpec] {
    table().get(name).map(Vec::as_slice).unwrap_or(&[])
}

/// The relation a regclass literal names, as PostgreSQL's `regclassin` reads it: dotted
/// identifiers, double quotes keep case, unquoted names fold to lower case. `None` for anything
/// else (an OID, a malformed name): the relation is then unknown.
pub(crate) fn regclass_name(text: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c.is_whitespace() {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return None;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
            if part.is_empty() || part.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
        }
        truncate(&mut part);
        parts.push(part);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return None,
        }
    }
    match parts.as_slice() {
        [t] => Some(qualify_relation("", t)),
        [s, t] | [_, s, t] => Some(qualify_relation(s, t)),
        _ => None,
    }
}

fn truncate(name: &mut String) {
    if name.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_loaded() {
        assert_eq!(lookup("table_to_xml")[0].class, ArgClass::Relation);
        assert_eq!(lookup("table_to_xml")[0].name, "tbl");
        assert_eq!(lookup("query_to_xml")[0].class, ArgClass::Query);
        assert_eq!(lookup("schema_to_xml")[0].class, ArgClass::Schema);
        assert_eq!(lookup("database_to_xml")[0].class, ArgClass::Database);
        assert_eq!(
            lookup("pg_relation_size")[0].class,
            ArgClass::RelationMetadata
        );
        assert!(lookup("lower").is_empty());
    }

    #[test]
    fn regclass_literals() {
        assert_eq!(
            regclass_name("accounts").as_deref(),
            Some("public.accounts")
        );
        assert_eq!(
            regclass_name(" Public . \"Mixed\"\"Q\" ").as_deref(),
            Some("public.Mixed\"Q")
        );
        assert_eq!(
            regclass_name("pg_authid").as_deref(),
            Some("pg_catalog.pg_authid")
        );
        assert_eq!(regclass_name("db.s.t").as_deref(), Some("s.t"));
        for bad in ["", "1259", "a b", "a.", "\"open", "a;b", "a.b.c.d"] {
            assert_eq!(regclass_name(bad), None, "{bad:?}");
        }
    }
}
