//! What the statement rewrite needs to know about the relations and functions a statement
//! names: columns and their types, the base columns a view reads, whether a function name
//! exists outside pg_catalog. Looked up by name on the side connection with
//! [`RelationCache::query`] (the names as PostgreSQL resolves them with the side
//! connection's `search_path`), cached per session.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use super::sqlmask::ColumnType;

/// A relation as a statement names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RelName {
    pub schema: Option<String>,
    pub name: String,
}

impl RelName {
    fn qualified(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        match &self.schema {
            Some(s) => format!("{}.{}", q(s), q(&self.name)),
            None => q(&self.name),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ColumnInfo {
    pub name: String,
    pub ty: ColumnType,
}

/// A column a view or materialized view reads (`column` `None`: the whole row).
#[derive(Debug, Clone)]
pub(crate) struct BaseColumn {
    pub schema: String,
    pub table: String,
    pub column: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct RelationInfo {
    pub schema: String,
    pub name: String,
    /// `pg_class.relkind`.
    pub kind: char,
    pub columns: Vec<ColumnInfo>,
    /// For views and materialized views: the base-table columns they read, through nested
    /// views (from `pg_depend`).
    pub reads: Vec<BaseColumn>,
}

/// Per-session cache of lookups. `None` = looked up, does not exist for the side connection.
#[derive(Debug, Default)]
pub(crate) struct RelationCache {
    relations: HashMap<RelName, Option<RelationInfo>>,
    user_functions: HashMap<String, bool>,
}

/// Caps the cache: past it, it starts over (entries are cheap to fetch again).
const MAX_ENTRIES: usize = 10_000;

impl RelationCache {
    pub(crate) fn relation(&self, name: &RelName) -> Option<&RelationInfo> {
        self.relations.get(name).and_then(Option::as_ref)
    }

    /// A function of this name exists outside pg_catalog and information_schema (unknown
    /// names count as user functions: fail closed).
    pub(crate) fn is_user_function(&self, name: &str) -> bool {
        self.user_functions.get(name).copied().unwrap_or(true)
    }

    pub(crate) fn clear(&mut self) {
        self.relations.clear();
        self.user_functions.clear();
    }

    /// The catalog query for what is not cached yet, `None` when everything is.
    pub(crate) fn query(&self, relations: &[RelName], functions: &[String]) -> Option<Lookup> {
        let rels: Vec<RelName> = relations
            .iter()
            .filter(|r| !self.relations.contains_key(*r))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let funcs: Vec<String> = functions
            .iter()
            .filter(|f| !self.user_functions.contains_key(*f))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if rels.is_empty() && funcs.is_empty() {
            return None;
        }
        let mut values = String::new();
        for (i, r) in rels.iter().enumerate() {
            if i > 0 {
                values.push(',');
            }
            let _ = write!(values, "({i}, {})", literal(&r.qualified()));
        }
        if values.is_empty() {
            values.push_str("(0, NULL::text)");
        }
        let mut names = String::new();
        for (i, f) in funcs.iter().enumerate() {
            if i > 0 {
                names.push(',');
            }
            names.push_str(&literal(f));
        }
        if names.is_empty() {
            names.push_str("NULL");
        }
        let sql = format!(
            "WITH RECURSIVE q(i, name) AS (VALUES {values}), \
             r AS (SELECT q.i, c.oid, n.nspname, c.relname, c.relkind FROM q \
               JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(q.name) \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace), \
             v(i, relid) AS (SELECT i, oid FROM r WHERE relkind IN ('v', 'm') \
               UNION SELECT v.i, d.refobjid FROM v \
               JOIN pg_catalog.pg_rewrite w ON w.ev_class = v.relid \
               JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
                 AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                 AND d.refobjid <> v.relid) \
             SELECT 'r', r.i::text, r.nspname::text, r.relname::text, r.relkind::text, a.attname::text, \
               pg_catalog.format_type(a.atttypid, a.atttypmod), t.typcategory::text \
             FROM r LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 \
               AND NOT a.attisdropped LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             UNION ALL \
             SELECT 'd', v.i::text, n.nspname::text, c.relname::text, c.relkind::text, a.attname::text, \
               NULL, NULL FROM v \
             JOIN pg_catalog.pg_rewrite w ON w.ev_class = v.relid \
             JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
               AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
               AND d.refobjid <> v.relid \
             JOIN pg_catalog.pg_class c ON c.oid = d.refobjid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND d.refobjsubid > 0 \
               AND a.attnum = d.refobjsubid \
             WHERE c.relkind NOT IN ('v', 'm') \
             UNION ALL \
             SELECT 'f', NULL, n.nspname::text, p.proname::text, NULL, NULL, NULL, NULL \
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.proname IN ({names}) AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        );
        Some(Lookup {
            sql,
            relations: rels,
            functions: funcs,
        })
    }

    /// Stores the answer to `lookup` (rows of 8 text fields). Malformed rows are an error.
    pub(crate) fn insert(
        &mut self,
        lookup: Lookup,
        rows: &[Vec<Option<String>>],
    ) -> Result<(), MalformedCatalog> {
        if self.relations.len() + lookup.relations.len() > MAX_ENTRIES
            || self.user_functions.len() + lookup.functions.len() > MAX_ENTRIES
        {
            self.clear();
        }
        let mut found: Vec<Option<RelationInfo>> = vec![None; lookup.relations.len()];
        let mut reads: Vec<Vec<BaseColumn>> = vec![Vec::new(); lookup.relations.len()];
        let mut user = HashSet::new();
        for row in rows {
            let f = |i: usize| row.get(i).and_then(|v| v.as_deref());
            let index = || -> Result<usize, MalformedCatalog> {
                let i: usize = f(1)
                    .ok_or(MalformedCatalog)?
                    .parse()
                    .map_err(|_| MalformedCatalog)?;
                if i < found.len() {
                    Ok(i)
                } else {
                    Err(MalformedCatalog)
                }
            };
            match f(0) {
                Some("r") => {
                    let i = index()?;
                    let info = found[i].get_or_insert_with(|| RelationInfo {
                        schema: f(2).unwrap_or_default().to_owned(),
                        name: f(3).unwrap_or_default().to_owned(),
                        kind: f(4).and_then(|k| k.chars().next()).unwrap_or('?'),
                        columns: Vec::new(),
                        reads: Vec::new(),
                    });
                    if let (Some(name), Some(ty)) = (f(5), f(6)) {
                        info.columns.push(ColumnInfo {
                            name: name.to_owned(),
                            ty: ColumnType {
                                sql: ty.to_owned(),
                                string: f(7) == Some("S"),
                            },
                        });
                    }
                }
                Some("d") => {
                    let i = index()?;
                    reads[i].push(BaseColumn {
                        schema: f(2).ok_or(MalformedCatalog)?.to_owned(),
                        table: f(3).ok_or(MalformedCatalog)?.to_owned(),
                        column: f(5).map(str::to_owned),
                    });
                }
                Some("f") => {
                    user.insert(f(3).ok_or(MalformedCatalog)?.to_owned());
                }
                _ => return Err(MalformedCatalog),
            }
        }
        for ((name, mut info), r) in lookup.relations.into_iter().zip(found).zip(reads) {
            if let Some(info) = info.as_mut() {
                info.reads = r;
            }
            self.relations.insert(name, info);
        }
        for f in lookup.functions {
            let is_user = user.contains(&f);
            self.user_functions.insert(f, is_user);
        }
        Ok(())
    }
}

/// A catalog answer that does not have the shape of the lookup query's rows.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("malformed catalog answer")]
pub(crate) struct MalformedCatalog;

/// A pending catalog lookup: run `sql` (simple protocol), hand the rows to
/// [`RelationCache::insert`].
#[derive(Debug)]
pub(crate) struct Lookup {
    pub sql: String,
    relations: Vec<RelName>,
    functions: Vec<String>,
}

/// An escape-string literal: correct whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}
