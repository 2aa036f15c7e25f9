//! Column origins: RowDescription carries a table OID and attribute number per column; origin
//! rules need `schema.table.column`. The relay resolves unknown OIDs with [`catalog_query`] on
//! its own upstream connection, stores the rows in an [`OriginCache`], and hands
//! `|oid, attnum| cache.origin(oid, attnum)` to [`super::MaskRules::plan`].

use std::collections::HashMap;
use std::fmt::Write as _;

use super::MaskError;
use super::wire::{FieldDescription, parse_row_description};

/// Where a result column comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ColumnOrigin {
    pub schema: String,
    pub table: String,
    pub column: String,
}

impl ColumnOrigin {
    pub fn new(
        schema: impl Into<String>,
        table: impl Into<String>,
        column: impl Into<String>,
    ) -> Self {
        ColumnOrigin {
            schema: schema.into(),
            table: table.into(),
            column: column.into(),
        }
    }

    /// `schema.table.column`, used as the column's name in summaries.
    pub fn label(&self) -> String {
        format!("{}.{}.{}", self.schema, self.table, self.column)
    }
}

/// Anything that maps `(table_oid, attnum)` to an origin.
pub trait CatalogResolver {
    fn origin(&self, table_oid: u32, attnum: i16) -> Option<ColumnOrigin>;
}

/// Resolved origins, per table. Bounded: past `max_tables` it starts over (entries are cheap
/// to fetch again). Call [`OriginCache::clear`] after DDL (ALTER TABLE ... RENAME changes
/// names under the same OIDs).
#[derive(Debug, Clone)]
pub struct OriginCache {
    tables: HashMap<u32, HashMap<i16, ColumnOrigin>>,
    max_tables: usize,
}

impl Default for OriginCache {
    fn default() -> Self {
        OriginCache::new(10_000)
    }
}

impl OriginCache {
    pub fn new(max_tables: usize) -> Self {
        OriginCache {
            tables: HashMap::new(),
            max_tables: max_tables.max(1),
        }
    }

    /// Table OIDs that are not cached yet.
    pub fn missing(&self, table_oids: &[u32]) -> Vec<u32> {
        let mut out: Vec<u32> = table_oids
            .iter()
            .copied()
            .filter(|o| *o != 0 && !self.tables.contains_key(o))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Record one row of [`catalog_query`]'s result.
    pub fn insert(&mut self, table_oid: u32, attnum: i16, origin: ColumnOrigin) {
        if !self.tables.contains_key(&table_oid) && self.tables.len() >= self.max_tables {
            self.tables.clear();
        }
        self.tables
            .entry(table_oid)
            .or_default()
            .insert(attnum, origin);
    }

    /// Mark a table as looked up even if the query returned no row for it (a dropped table):
    /// later lookups return `None` and the plan fails closed, instead of re-querying forever.
    pub fn insert_table(&mut self, table_oid: u32) {
        if !self.tables.contains_key(&table_oid) && self.tables.len() >= self.max_tables {
            self.tables.clear();
        }
        self.tables.entry(table_oid).or_default();
    }

    pub fn clear(&mut self) {
        self.tables.clear();
    }
}

impl CatalogResolver for OriginCache {
    fn origin(&self, table_oid: u32, attnum: i16) -> Option<ColumnOrigin> {
        self.tables.get(&table_oid)?.get(&attnum).cloned()
    }
}

/// The distinct non-zero table OIDs of a RowDescription (what needs resolving).
pub fn table_oids(row_description: &[u8]) -> Result<Vec<u32>, MaskError> {
    Ok(table_oids_of(&parse_row_description(row_description)?))
}

/// [`table_oids`] of a RowDescription already decoded.
pub(crate) fn table_oids_of(fields: &[FieldDescription]) -> Vec<u32> {
    let mut oids: Vec<u32> = fields
        .iter()
        .map(|f| f.table_oid)
        .filter(|o| *o != 0)
        .collect();
    oids.sort_unstable();
    oids.dedup();
    oids
}

/// A simple-protocol query returning `table_oid int8, attnum int4, schema, table, column` for
/// every user column of the given tables. OIDs are integers, so building the text is safe.
pub fn catalog_query(table_oids: &[u32]) -> String {
    let mut list = String::new();
    for (i, oid) in table_oids.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        let _ = write!(list, "{oid}");
    }
    if list.is_empty() {
        list.push('0');
    }
    format!(
        "SELECT c.oid::int8, a.attnum::int4, n.nspname::text, c.relname::text, a.attname::text \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
         WHERE c.oid IN ({list}) AND a.attnum > 0 AND NOT a.attisdropped"
    )
}
