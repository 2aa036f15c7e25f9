//! Masking inside statements: before a statement goes upstream, every reference to a masked
//! column that is not a plain output column of the outermost SELECT is replaced by the rule's
//! masking expression, so that functions, casts, comparisons, aggregates, sort orders and
//! error messages all see the masked value (as PostgreSQL Anonymizer's masking views do).
//! What cannot be rewritten soundly is refused ([`Refusal`]).
//!
//! The rewrite works on PostgreSQL's own parse tree (pg_query) and edits the statement text
//! at the references' positions, so everything else reaches the server byte for byte as the
//! client wrote it (parameters, literals, comments). Names are resolved like PostgreSQL
//! does: innermost query level first, FROM entries by alias, unqualified columns against the
//! columns the catalog lists; anything that could be a masked column but cannot be resolved
//! is refused.

use serde_json::Value;

use super::relcat::{RelName, RelationCache, RelationInfo};
use super::rules::{Allowances, MaskRules};
use super::sqlmask::{ColumnType, masking_expression};
use super::strategy::Strategy;

/// Why a statement cannot be sent: the message names the column and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refusal(pub String);

/// What a statement needs from the catalog before [`rewrite`] can run, and its parse tree as
/// the rewrite reads it: converted from pg_query's protobuf once, here, for both.
#[derive(Debug, Default)]
pub(crate) struct Needs {
    pub relations: Vec<RelName>,
    pub functions: Vec<String>,
    /// The statement may change the catalog (the session's cache should be dropped after it).
    pub changes_catalog: bool,
    /// `None`: the tree could not be converted (the rewrite then refuses the statement).
    tree: Option<Value>,
}

#[cfg(test)]
thread_local! {
    /// Conversions of a parse tree and scans of a text on this thread (tests count them).
    static COUNTS: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// How many parse trees this thread converted for the rewrite, and texts it scanned.
#[cfg(test)]
pub(crate) fn conversions_and_scans() -> (usize, usize) {
    COUNTS.with(|c| c.get())
}

/// The relations and function names `tree` mentions.
pub(crate) fn needs(tree: &pg_query::protobuf::ParseResult) -> Needs {
    #[cfg(test)]
    COUNTS.with(|c| c.set((c.get().0 + 1, c.get().1)));
    let mut n = Needs::default();
    let Ok(v) = serde_json::to_value(tree) else {
        return n;
    };
    collect(&v, &mut n);
    if let Some(stmts) = v.get("stmts").and_then(Value::as_array) {
        for s in stmts {
            let kind = s
                .pointer("/stmt/node")
                .and_then(Value::as_object)
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_default();
            if !matches!(
                kind.as_str(),
                "SelectStmt"
                    | "InsertStmt"
                    | "UpdateStmt"
                    | "DeleteStmt"
                    | "CopyStmt"
                    | "ExplainStmt"
                    | "TransactionStmt"
                    | "VariableSetStmt"
                    | "VariableShowStmt"
                    | "FetchStmt"
                    | "ClosePortalStmt"
                    | "DeclareCursorStmt"
                    | "ExecuteStmt"
            ) {
                n.changes_catalog = true;
            }
        }
    }
    n.tree = Some(v);
    n
}

fn collect(v: &Value, n: &mut Needs) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| collect(x, n)),
        Value::Object(o) => {
            // A RangeVar, whether wrapped in a Node or held directly (`relation` fields).
            if o.contains_key("relname") && o.contains_key("schemaname") {
                let schema = str_of(v, "schemaname");
                n.relations.push(RelName {
                    schema: (!schema.is_empty()).then(|| schema.to_owned()),
                    name: str_of(v, "relname").to_owned(),
                });
            }
            for (k, val) in o {
                if k == "FuncCall"
                    && let Some(name) = func_name(val).1
                {
                    n.functions.push(name);
                }
                collect(val, n);
            }
        }
        _ => {}
    }
}

/// Rewrites `sql`, whose parse [`needs`] read: `Ok(None)` when nothing changes.
pub(crate) fn rewrite(
    sql: &str,
    needs: &Needs,
    rules: &MaskRules,
    catalog: &RelationCache,
) -> Result<Option<String>, Refusal> {
    if !rules.needs_origins() {
        return Ok(None);
    }
    let v = needs.tree.as_ref().ok_or_else(|| {
        Refusal("interceptor: statement could not be analysed for masking".into())
    })?;
    let mut w = Walker {
        sql,
        rules,
        catalog,
        allow: rules.allowances(),
        keyed: rules.has_key(),
        tokens: std::cell::OnceCell::new(),
        edits: Vec::new(),
        in_view: false,
    };
    for s in v
        .get("stmts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(node) = s.pointer("/stmt/node") {
            w.statement(node, &mut Vec::new(), true)?;
        }
    }
    if w.edits.is_empty() {
        return Ok(None);
    }
    w.edits.sort_by_key(|e| e.start);
    let mut out = String::with_capacity(sql.len() + w.edits.len() * 64);
    let mut at = 0;
    for e in &w.edits {
        if e.start < at || e.end > sql.len() {
            return Err(Refusal(
                "interceptor: statement could not be rewritten for masking".into(),
            ));
        }
        out.push_str(&sql[at..e.start]);
        out.push_str(&e.text);
        at = e.end;
    }
    out.push_str(&sql[at..]);
    Ok(Some(out))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The inner node of a `Node` wrapper: `{"node": {"Kind": {...}}}` → `("Kind", {...})`.
fn kind_of(v: &Value) -> Option<(&str, &Value)> {
    let o = v.get("node").unwrap_or(v).as_object()?;
    let (k, inner) = o.iter().next()?;
    Some((k.as_str(), inner))
}

fn sval(v: &Value) -> Option<&str> {
    match kind_of(v)? {
        ("String", s) => s.get("sval").and_then(Value::as_str),
        _ => None,
    }
}

/// `(schema, name)` of a FuncCall.
fn func_name(f: &Value) -> (Option<String>, Option<String>) {
    let parts: Vec<&str> = list(f, "funcname").iter().filter_map(sval).collect();
    match parts.as_slice() {
        [] => (None, None),
        [n] => (None, Some((*n).to_owned())),
        [.., s, n] => (Some((*s).to_owned()), Some((*n).to_owned())),
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Functions that read a relation named in a string, or run query text.
const RELATION_FUNCTIONS: &[&str] = &[
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "dblink_exec",
    "dblink_open",
    "dblink_fetch",
    "dblink_send_query",
];

struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// One column of a FROM entry.
#[derive(Debug, Clone)]
struct Col {
    name: String,
    ty: ColumnType,
    strategy: Option<Strategy>,
    label: String,
}

#[derive(Debug, Clone)]
enum Source {
    /// A table (or anything else with catalog columns) whose masked columns are known.
    Table {
        cols: Vec<Col>,
        masked_any: bool,
        label: String,
    },
    /// A subquery, CTE, function, VALUES: its outputs were rewritten where they are defined.
    Derived { cols: Option<Vec<String>> },
    /// A relation the side connection does not see (a temporary table of the session).
    Unknown {
        schema: Option<String>,
        name: String,
    },
    /// A join with an alias: its columns are those of its sides.
    Join(Vec<Entry>),
}

#[derive(Debug, Clone)]
struct Entry {
    refname: String,
    /// `(schema, table)` when the entry has no alias (it can be named `schema.table.col`).
    qualified: Option<(String, String)>,
    source: Source,
}

#[derive(Default)]
struct Level {
    entries: Vec<Entry>,
    ctes: Vec<String>,
}

enum Found {
    Masked(Col),
    Safe,
    /// Could be a masked column the catalog does not describe.
    Doubt(String),
    No,
}

impl Entry {
    fn find(&self, rules: &MaskRules, col: &str) -> Found {
        match &self.source {
            Source::Table { cols, .. } => match cols.iter().find(|c| c.name == col) {
                Some(c) if c.strategy.is_some() => Found::Masked(c.clone()),
                Some(_) => Found::Safe,
                None => Found::No,
            },
            Source::Derived { cols: Some(cols) } if cols.iter().any(|c| c == col) => Found::Safe,
            Source::Derived { cols: Some(_) } => Found::No,
            Source::Derived { cols: None } => Found::No,
            Source::Unknown { schema, name } => {
                if rules
                    .strategy_for_parts(schema.as_deref(), Some(name), col)
                    .is_some()
                {
                    Found::Doubt(format!("{name}.{col}"))
                } else {
                    Found::No
                }
            }
            Source::Join(children) => {
                let mut best = Found::No;
                for c in children {
                    match c.find(rules, col) {
                        m @ (Found::Masked(_) | Found::Doubt(_)) => return m,
                        Found::Safe => best = Found::Safe,
                        Found::No => {}
                    }
                }
                best
            }
        }
    }

    /// Its column names are not known here.
    fn opaque(&self) -> bool {
        match &self.source {
            Source::Derived { cols: None } | Source::Unknown { .. } => true,
            Source::Join(children) => children.iter().any(Entry::opaque),
            _ => false,
        }
    }

    /// The entry holds a masked column (or may: unknown relations).
    fn masked(&self, rules: &MaskRules) -> Option<String> {
        match &self.source {
            Source::Table {
                masked_any: true,
                label,
                ..
            } => Some(label.clone()),
            Source::Unknown { schema, name }
                if rules.could_mask_table(schema.as_deref(), Some(name)) =>
            {
                Some(name.clone())
            }
            Source::Join(children) => children.iter().find_map(|c| c.masked(rules)),
            _ => None,
        }
    }
}

struct Walker<'a> {
    sql: &'a str,
    rules: &'a MaskRules,
    catalog: &'a RelationCache,
    allow: Allowances,
    keyed: bool,
    /// Token spans of `sql`, scanned at the first edit (most statements need none). The scan
    /// is PostgreSQL's own scanner, whose positions the tree's locations are. The
    /// interceptor-sql lexer is not used instead: its tokens are not carried with the
    /// statement (a classification from the cache never lexed this text), and it is held to
    /// the server's scanner where strings, comments and statements end, not at every token
    /// boundary the span arithmetic below counts; it would be a second scan, only close to
    /// this one.
    tokens: std::cell::OnceCell<Option<Vec<(usize, usize)>>>,
    edits: Vec<Edit>,
    /// Inside CREATE VIEW: every masked reference is refused (a view would read it later,
    /// out of sight).
    in_view: bool,
}

fn refuse<T>(msg: String) -> Result<T, Refusal> {
    Err(Refusal(msg))
}

impl<'a> Walker<'a> {
    /// A statement (or a statement-shaped subtree: CTE bodies, EXPLAIN/COPY queries).
    /// `top`: plain output columns of this SELECT may keep the proxy-side path.
    fn statement(
        &mut self,
        node: &Value,
        scopes: &mut Vec<Level>,
        top: bool,
    ) -> Result<(), Refusal> {
        let Some((kind, s)) = kind_of(node) else {
            return Ok(());
        };
        match kind {
            "SelectStmt" => self.select(s, scopes, top),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                self.dml(kind, s, scopes, top)
            }
            "CopyStmt" => match s.get("query") {
                Some(q) if !q.is_null() => self.statement(q, scopes, top),
                _ => Ok(()),
            },
            "ExplainStmt" => match s.get("query") {
                Some(q) if !q.is_null() => self.statement(q, scopes, top),
                _ => Ok(()),
            },
            // A cursor's or prepared statement's rows are read later: all references masked.
            "DeclareCursorStmt" | "PrepareStmt" | "CreateTableAsStmt" => match s.get("query") {
                Some(q) if !q.is_null() => self.statement(q, scopes, false),
                _ => Ok(()),
            },
            "ViewStmt" => {
                let was = std::mem::replace(&mut self.in_view, !self.allow.masked_views);
                let r = match s.get("query") {
                    Some(q) if !q.is_null() => self.statement(q, scopes, false),
                    _ => Ok(()),
                };
                self.in_view = was;
                r
            }
            "DoStmt"
            | "CreateFunctionStmt"
            | "CreateTrigStmt"
            | "RuleStmt"
            | "CreateEventTrigStmt"
                if !self.allow.user_functions =>
            {
                refuse(format!(
                    "interceptor: {} is not allowed while column masking rules apply: \
                     procedural code could read a masked column out of sight of the rewrite \
                     (policy [mask] allow_user_functions = true permits it)",
                    statement_label(kind)
                ))
            }
            _ => self.walk(s, scopes),
        }
    }

    fn select(&mut self, s: &Value, scopes: &mut Vec<Level>, top: bool) -> Result<(), Refusal> {
        scopes.push(Level::default());
        let r = self.select_in(s, scopes, top);
        scopes.pop();
        r
    }

    fn with_clause(&mut self, s: &Value, scopes: &mut Vec<Level>) -> Result<(), Refusal> {
        let Some(with) = s.get("with_clause").filter(|w| !w.is_null()) else {
            return Ok(());
        };
        for cte in list(with, "ctes") {
            if let Some(("CommonTableExpr", c)) = kind_of(cte) {
                let name = str_of(c, "ctename").to_owned();
                if let Some(level) = scopes.last_mut() {
                    level.ctes.push(name);
                }
                if let Some(q) = c.get("ctequery").filter(|q| !q.is_null()) {
                    self.statement(q, scopes, false)?;
                }
            }
        }
        Ok(())
    }

    fn select_in(&mut self, s: &Value, scopes: &mut Vec<Level>, top: bool) -> Result<(), Refusal> {
        self.with_clause(s, scopes)?;
        let op = s.get("op").and_then(Value::as_i64).unwrap_or(1);
        if op > 1 {
            for side in ["larg", "rarg"] {
                if let Some(q) = s.get(side).filter(|q| !q.is_null()) {
                    self.select(q, scopes, false)?;
                }
            }
            // ORDER BY / LIMIT of a set operation see its (already masked) outputs.
            for k in ["sort_clause", "limit_offset", "limit_count"] {
                if let Some(v) = s.get(k) {
                    self.walk_outputs_only(v)?;
                }
            }
            return Ok(());
        }
        for v in list(s, "values_lists") {
            self.walk(v, scopes)?;
        }
        for item in list(s, "from_clause") {
            self.range_item(item, scopes)?;
        }
        let targets = list(s, "target_list");
        let keep_bare = top
            && !self.in_view
            && s.get("into_clause").is_none_or(Value::is_null)
            && list(s, "group_clause").is_empty()
            && list(s, "distinct_clause").is_empty()
            && list(s, "window_clause").is_empty()
            && s.get("having_clause").is_none_or(Value::is_null)
            && !sorts_by_output(list(s, "sort_clause"), targets);
        self.target_list(targets, scopes, keep_bare)?;
        for k in [
            "where_clause",
            "group_clause",
            "having_clause",
            "window_clause",
            "sort_clause",
            "distinct_clause",
            "limit_offset",
            "limit_count",
        ] {
            if let Some(v) = s.get(k) {
                self.walk(v, scopes)?;
            }
        }
        Ok(())
    }

    /// A target list. `keep_bare`: a target that is just a masked column stays (its value is
    /// masked on the way back, where RowDescription names its origin). Otherwise such a
    /// target is rewritten and keeps its name with an alias.
    fn target_list(
        &mut self,
        targets: &[Value],
        scopes: &mut Vec<Level>,
        keep_bare: bool,
    ) -> Result<(), Refusal> {
        for t in targets {
            let Some(("ResTarget", rt)) = kind_of(t) else {
                self.walk(t, scopes)?;
                continue;
            };
            let Some(val) = rt.get("val").filter(|v| !v.is_null()) else {
                continue;
            };
            match kind_of(val) {
                Some(("ColumnRef", c)) => {
                    let alias = str_of(rt, "name").is_empty();
                    self.column_ref(c, scopes, Place::Target { keep_bare, alias })?;
                }
                _ => self.walk(val, scopes)?,
            }
            self.walk(&Value::Array(list(rt, "indirection").to_vec()), scopes)?;
        }
        Ok(())
    }

    /// INSERT/UPDATE/DELETE/MERGE. `top`: plain RETURNING columns keep the proxy-side path
    /// (PostgreSQL names their origin in RowDescription, as for a SELECT).
    fn dml(
        &mut self,
        kind: &str,
        s: &Value,
        scopes: &mut Vec<Level>,
        top: bool,
    ) -> Result<(), Refusal> {
        scopes.push(Level::default());
        let r = self.dml_in(kind, s, scopes, top);
        scopes.pop();
        r
    }

    fn dml_in(
        &mut self,
        kind: &str,
        s: &Value,
        scopes: &mut Vec<Level>,
        top: bool,
    ) -> Result<(), Refusal> {
        self.with_clause(s, scopes)?;
        if kind == "InsertStmt" {
            // The inserted query cannot see the target table's columns.
            if let Some(q) = s.get("select_stmt").filter(|q| !q.is_null()) {
                self.statement(q, scopes, false)?;
            }
        }
        if let Some(rel) = s.get("relation").filter(|r| !r.is_null()) {
            let rel = serde_json::json!({ "RangeVar": rel });
            self.range_item(&rel, scopes)?;
            if kind == "InsertStmt" {
                // ON CONFLICT sees the proposed row as `excluded`, shaped like the target.
                if let Some(mut e) = scopes.last().and_then(|l| l.entries.last().cloned()) {
                    e.refname = "excluded".into();
                    e.qualified = None;
                    if let Some(l) = scopes.last_mut() {
                        l.entries.push(e);
                    }
                }
            }
        }
        for k in ["from_clause", "using_clause"] {
            for item in list(s, k) {
                self.range_item(item, scopes)?;
            }
        }
        if let Some(src) = s.get("source_relation").filter(|r| !r.is_null()) {
            self.range_item(src, scopes)?;
        }
        if kind == "UpdateStmt" {
            // SET targets: names are the target's columns, values are expressions.
            for t in list(s, "target_list") {
                if let Some(("ResTarget", rt)) = kind_of(t) {
                    if let Some(v) = rt.get("val") {
                        self.walk(v, scopes)?;
                    }
                    self.walk(&Value::Array(list(rt, "indirection").to_vec()), scopes)?;
                }
            }
        }
        for k in [
            "where_clause",
            "on_conflict_clause",
            "join_condition",
            "merge_when_clauses",
        ] {
            if let Some(v) = s.get(k) {
                self.walk(v, scopes)?;
            }
        }
        if let Some(r) = s.get("returning_clause").filter(|r| !r.is_null()) {
            self.target_list(list(r, "exprs"), scopes, top && !self.in_view)?;
        }
        Ok(())
    }

    fn range_item(&mut self, item: &Value, scopes: &mut Vec<Level>) -> Result<(), Refusal> {
        let Some((kind, f)) = kind_of(item) else {
            return Ok(());
        };
        match kind {
            "RangeVar" => {
                let entry = self.range_var(f, scopes)?;
                self.push_entry(scopes, entry);
            }
            "JoinExpr" => {
                let before = scopes.last().map_or(0, |l| l.entries.len());
                for side in ["larg", "rarg"] {
                    if let Some(x) = f.get(side).filter(|x| !x.is_null()) {
                        self.range_item(x, scopes)?;
                    }
                }
                let children: Vec<Entry> = scopes
                    .last()
                    .map(|l| l.entries[before..].to_vec())
                    .unwrap_or_default();
                let natural = f
                    .get("is_natural")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if natural && let Some(t) = children.iter().find_map(|c| c.masked(self.rules)) {
                    return refuse(format!(
                        "interceptor: NATURAL JOIN over {t}, which has masked columns, compares \
                         them unmasked; name the join columns with ON instead"
                    ));
                }
                for u in list(f, "using_clause").iter().filter_map(sval) {
                    for c in &children {
                        if let Found::Doubt(col) = found_label(c.find(self.rules, u)) {
                            return refuse(format!(
                                "interceptor: JOIN USING ({u}) compares masked column {col} \
                                 unmasked; join with ON instead"
                            ));
                        }
                    }
                }
                if let Some(q) = f.get("quals") {
                    self.walk(q, scopes)?;
                }
                if let Some(alias) = f.get("alias").filter(|a| !a.is_null()) {
                    self.push_entry(
                        scopes,
                        Entry {
                            refname: str_of(alias, "aliasname").to_owned(),
                            qualified: None,
                            source: Source::Join(children),
                        },
                    );
                }
            }
            "RangeSubselect" => {
                let sub = f.get("subquery").filter(|q| !q.is_null());
                if let Some(q) = sub {
                    self.statement(q, scopes, false)?;
                }
                self.push_derived(scopes, f, sub.and_then(output_names));
            }
            "RangeTableSample" => {
                if let Some(r) = f.get("relation").filter(|r| !r.is_null()) {
                    self.range_item(r, scopes)?;
                }
                for k in ["args", "repeatable"] {
                    if let Some(v) = f.get(k) {
                        self.walk(v, scopes)?;
                    }
                }
            }
            _ => {
                // Functions, XMLTABLE, JSON_TABLE: arguments are expressions of this scope.
                self.walk(f, scopes)?;
                self.push_derived(scopes, f, None);
            }
        }
        Ok(())
    }

    fn push_entry(&self, scopes: &mut [Level], e: Entry) {
        if let Some(l) = scopes.last_mut() {
            l.entries.push(e);
        }
    }

    fn push_derived(&self, scopes: &mut [Level], f: &Value, outputs: Option<Vec<String>>) {
        let alias = f.get("alias").filter(|a| !a.is_null());
        let refname = alias
            .map(|a| str_of(a, "aliasname"))
            .unwrap_or("")
            .to_owned();
        let cols: Vec<String> = alias
            .map(|a| {
                list(a, "colnames")
                    .iter()
                    .filter_map(sval)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        self.push_entry(
            scopes,
            Entry {
                refname,
                qualified: None,
                source: Source::Derived {
                    cols: if cols.is_empty() {
                        outputs
                    } else {
                        // Aliases rename the leading columns; the rest keep their names.
                        outputs
                            .map(|o| {
                                let mut c = cols.clone();
                                c.extend(o.into_iter().skip(cols.len()));
                                c
                            })
                            .or(Some(cols))
                    },
                },
            },
        );
    }

    fn range_var(&self, f: &Value, scopes: &[Level]) -> Result<Entry, Refusal> {
        let schema = str_of(f, "schemaname");
        let name = str_of(f, "relname");
        let alias = f.get("alias").filter(|a| !a.is_null());
        let refname = alias.map_or(name, |a| str_of(a, "aliasname")).to_owned();
        let colnames: Vec<&str> = alias
            .map(|a| list(a, "colnames").iter().filter_map(sval).collect())
            .unwrap_or_default();
        if schema.is_empty() && scopes.iter().any(|l| l.ctes.iter().any(|c| c == name)) {
            return Ok(Entry {
                refname,
                qualified: None,
                source: Source::Derived { cols: None },
            });
        }
        let key = RelName {
            schema: (!schema.is_empty()).then(|| schema.to_owned()),
            name: name.to_owned(),
        };
        let Some(info) = self.catalog.relation(&key) else {
            return Ok(Entry {
                refname,
                qualified: None,
                source: Source::Unknown {
                    schema: key.schema,
                    name: name.to_owned(),
                },
            });
        };
        if matches!(info.kind, 'v' | 'm')
            && !self.allow.masked_views
            && let Some(col) = self.view_reads_masked(info)
        {
            return refuse(format!(
                "interceptor: {}.{} reads masked column {col}; views over masked columns are \
                 refused (policy [mask] allow_masked_views = true permits them)",
                info.schema, info.name
            ));
        }
        let unqualified = schema.is_empty();
        let mut cols = Vec::with_capacity(info.columns.len());
        let mut masked_any = false;
        for (i, c) in info.columns.iter().enumerate() {
            let strategy = self
                .rules
                .strategy_for_parts(Some(&info.schema), Some(&info.name), &c.name)
                .or_else(|| {
                    unqualified
                        .then(|| self.rules.strategy_for_parts(None, Some(name), &c.name))
                        .flatten()
                })
                .cloned();
            masked_any |= strategy.is_some();
            cols.push(Col {
                name: colnames.get(i).map_or(c.name.as_str(), |n| n).to_owned(),
                ty: c.ty.clone(),
                label: format!("{}.{}.{}", info.schema, info.name, c.name),
                strategy,
            });
        }
        Ok(Entry {
            qualified: alias
                .is_none()
                .then(|| (info.schema.clone(), info.name.clone())),
            refname,
            source: Source::Table {
                cols,
                masked_any,
                label: format!("{}.{}", info.schema, info.name),
            },
        })
    }

    fn view_reads_masked(&self, info: &RelationInfo) -> Option<String> {
        info.reads.iter().find_map(|b| match &b.column {
            Some(c) => self
                .rules
                .strategy_for_parts(Some(&b.schema), Some(&b.table), c)
                .map(|_| format!("{}.{}.{c}", b.schema, b.table)),
            None => self
                .rules
                .could_mask_table(Some(&b.schema), Some(&b.table))
                .then(|| format!("{}.{} (whole row)", b.schema, b.table)),
        })
    }

    /// Generic descent through expressions and anything not modelled above: every ColumnRef
    /// is resolved, every subquery gets its own level.
    fn walk(&mut self, v: &Value, scopes: &mut Vec<Level>) -> Result<(), Refusal> {
        match v {
            Value::Array(a) => {
                for x in a {
                    self.walk(x, scopes)?;
                }
            }
            Value::Object(o) => {
                for (k, val) in o {
                    match k.as_str() {
                        "ColumnRef" => self.column_ref(val, scopes, Place::Expression)?,
                        "SelectStmt" => self.select(val, scopes, false)?,
                        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                            self.dml(k, val, scopes, false)?
                        }
                        "FuncCall" => {
                            self.function(val)?;
                            self.walk(val, scopes)?;
                        }
                        // Relation names outside FROM (DDL, LOCK, ...) carry no values.
                        "RangeVar" => {}
                        _ => self.walk(val, scopes)?,
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// ORDER BY of a set operation: names refer to its outputs (masked where defined); a
    /// subquery there still needs its own walk.
    fn walk_outputs_only(&mut self, v: &Value) -> Result<(), Refusal> {
        match v {
            Value::Array(a) => a.iter().try_for_each(|x| self.walk_outputs_only(x)),
            Value::Object(o) => {
                for (k, val) in o {
                    match k.as_str() {
                        "ColumnRef" => {}
                        "SelectStmt" => self.select(val, &mut Vec::new(), false)?,
                        "FuncCall" => {
                            self.function(val)?;
                            self.walk_outputs_only(val)?;
                        }
                        _ => self.walk_outputs_only(val)?,
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn function(&self, f: &Value) -> Result<(), Refusal> {
        let (schema, name) = func_name(f);
        let Some(name) = name else { return Ok(()) };
        if !self.allow.relation_functions && RELATION_FUNCTIONS.contains(&name.as_str()) {
            return refuse(format!(
                "interceptor: {name}() reads relations or runs queries named in strings, out of \
                 sight of column masking (policy [mask] allow_relation_functions = true permits it)"
            ));
        }
        let catalog_schema = matches!(schema.as_deref(), Some("pg_catalog" | "information_schema"));
        if !self.allow.user_functions && !catalog_schema && self.catalog.is_user_function(&name) {
            return refuse(format!(
                "interceptor: {name}() is not a built-in function; while column masking rules \
                 apply, functions outside pg_catalog are refused because they could read a masked \
                 column out of sight (policy [mask] allow_user_functions = true permits them)"
            ));
        }
        Ok(())
    }

    /// The source span of a ColumnRef with `fields` fields at `location`.
    fn span(&self, location: i64, fields: usize) -> Result<(usize, usize), Refusal> {
        let bad = || Refusal("interceptor: statement could not be rewritten for masking".into());
        let start = usize::try_from(location).map_err(|_| bad())?;
        let tokens = self
            .tokens
            .get_or_init(|| {
                #[cfg(test)]
                COUNTS.with(|c| c.set((c.get().0, c.get().1 + 1)));
                let scanned = pg_query::scan(self.sql).ok()?;
                Some(
                    scanned
                        .tokens
                        .iter()
                        .map(|t| (t.start as usize, t.end as usize))
                        .collect(),
                )
            })
            .as_deref()
            .ok_or_else(bad)?;
        let i = tokens
            .binary_search_by_key(&start, |t| t.0)
            .map_err(|_| bad())?;
        let last = i + 2 * fields.max(1) - 2;
        let end = tokens.get(last).ok_or_else(bad)?.1;
        Ok((start, end))
    }

    fn column_ref(&mut self, c: &Value, scopes: &mut [Level], place: Place) -> Result<(), Refusal> {
        let fields = list(c, "fields");
        let star = fields
            .last()
            .is_some_and(|f| matches!(kind_of(f), Some(("AStar", _))));
        let names: Vec<&str> = fields.iter().filter_map(sval).collect();
        if names.len() + usize::from(star) != fields.len() {
            return self.doubt("a column reference", scopes);
        }
        let location = c.get("location").and_then(Value::as_i64).unwrap_or(-1);
        if star {
            return self.star(&names, location, fields.len(), scopes, place);
        }
        match self.resolve(&names, scopes)? {
            Resolved::Safe => Ok(()),
            Resolved::WholeRow(table) => {
                if self.allow.whole_row && !self.in_view {
                    return Ok(());
                }
                refuse(format!(
                    "interceptor: whole-row reference `{}` to {table}, which has masked columns, \
                     would carry them unmasked; name the columns instead (policy [mask] \
                     allow_whole_row = true permits it)",
                    names.join(".")
                ))
            }
            Resolved::Masked(col) => {
                if let Place::Target {
                    keep_bare: true, ..
                } = place
                {
                    return Ok(());
                }
                if self.in_view {
                    return refuse(format!(
                        "interceptor: a view over masked column {} is refused (policy [mask] \
                         allow_masked_views = true permits it)",
                        col.label
                    ));
                }
                let (start, end) = self.span(location, fields.len())?;
                let sql: &'a str = self.sql;
                let reference = &sql[start..end];
                let Some(strategy) = &col.strategy else {
                    return Ok(());
                };
                let Some(mut expr) = masking_expression(strategy, self.keyed, reference, &col.ty)
                else {
                    return refuse(format!(
                        "interceptor: column {} is masked with strategy \"{}\", which needs the \
                         masking key and so cannot be computed inside a statement; select the \
                         column on its own (it is masked in the result) instead of using it in \
                         an expression, condition, ordering or subquery",
                        col.label,
                        strategy.kind().as_str()
                    ));
                };
                if let Place::Target { alias: true, .. } = place {
                    expr.push_str(" AS ");
                    expr.push_str(&quote_ident(&col.name));
                }
                self.edits.push(Edit {
                    start,
                    end,
                    text: expr,
                });
                Ok(())
            }
        }
    }

    /// `*` / `t.*`: plain in the outermost target list (expanded by PostgreSQL, masked on the
    /// way back); elsewhere expanded here into masked columns, or refused in expressions.
    fn star(
        &mut self,
        names: &[&str],
        location: i64,
        nfields: usize,
        scopes: &mut [Level],
        place: Place,
    ) -> Result<(), Refusal> {
        let Some(level) = scopes.last() else {
            return Ok(());
        };
        let entries: Vec<Entry> = match names {
            [] => level.entries.clone(),
            [t] => match find_entry(scopes, t) {
                Some(e) => vec![e.clone()],
                None => return self.doubt_table(None, t),
            },
            [.., s, t] => match find_qualified(scopes, s, t) {
                Some(e) => vec![e.clone()],
                None => return self.doubt_table(Some(s), t),
            },
        };
        let masked = entries.iter().find_map(|e| e.masked(self.rules));
        let Some(table) = masked else { return Ok(()) };
        match place {
            Place::Target {
                keep_bare: true, ..
            } if !self.in_view => Ok(()),
            Place::Target { .. } if !self.in_view => {
                // Expand a single plain table into its columns, masked ones rewritten.
                let [entry] = entries.as_slice() else {
                    return refuse(format!(
                        "interceptor: `*` over several relations including {table}, which has \
                         masked columns, cannot be rewritten here; list the columns"
                    ));
                };
                let Source::Table { cols, .. } = &entry.source else {
                    return refuse(format!(
                        "interceptor: `*` over {table}, which may have masked columns, cannot \
                         be rewritten here; list the columns"
                    ));
                };
                let qual = if entry.refname.is_empty() {
                    String::new()
                } else {
                    format!("{}.", quote_ident(&entry.refname))
                };
                let mut parts = Vec::with_capacity(cols.len());
                for col in cols {
                    let r = format!("{qual}{}", quote_ident(&col.name));
                    match &col.strategy {
                        None => parts.push(r),
                        Some(st) => match masking_expression(st, self.keyed, &r, &col.ty) {
                            Some(e) => parts.push(format!("{e} AS {}", quote_ident(&col.name))),
                            None => {
                                return refuse(format!(
                                    "interceptor: column {} is masked with strategy \"{}\", \
                                     which cannot be computed inside a statement; `*` here \
                                     would carry it",
                                    col.label,
                                    st.kind().as_str()
                                ));
                            }
                        },
                    }
                }
                let (start, end) = self.span(location, nfields)?;
                self.edits.push(Edit {
                    start,
                    end,
                    text: parts.join(", "),
                });
                Ok(())
            }
            _ if self.allow.whole_row && !self.in_view => Ok(()),
            _ => refuse(format!(
                "interceptor: whole-row reference `{}*` to {table}, which has masked columns, \
                 would carry them unmasked; name the columns instead (policy [mask] \
                 allow_whole_row = true permits it)",
                names.iter().map(|n| format!("{n}.")).collect::<String>()
            )),
        }
    }

    fn resolve(&self, names: &[&str], scopes: &[Level]) -> Result<Resolved, Refusal> {
        match names {
            [col] => {
                // Entries whose columns are not known (a subquery with `*`, a CTE, a relation
                // the catalog does not show) may hold the name: then a masked column of an
                // outer level cannot be told apart from theirs.
                let mut opaque = false;
                for level in scopes.iter().rev() {
                    let mut safe = false;
                    let mut opaque_here = false;
                    for e in &level.entries {
                        match e.find(self.rules, col) {
                            Found::Masked(_) if opaque => return self.unresolvable(col),
                            Found::Masked(c) => return Ok(Resolved::Masked(c)),
                            Found::Doubt(what) => return self.unresolvable(&what),
                            Found::Safe => safe = true,
                            Found::No => opaque_here |= e.opaque(),
                        }
                    }
                    if safe {
                        return Ok(Resolved::Safe);
                    }
                    // No column of that name: PostgreSQL reads it as a whole-row reference.
                    if let Some(e) = level.entries.iter().find(|e| e.refname == *col) {
                        return Ok(match e.masked(self.rules) {
                            Some(t) => Resolved::WholeRow(t),
                            None => Resolved::Safe,
                        });
                    }
                    opaque |= opaque_here;
                }
                if opaque {
                    return Ok(Resolved::Safe);
                }
                self.outside_scope(None, None, col)
            }
            [t, col] => match find_entry(scopes, t) {
                Some(e) => self.in_entry(e, col),
                None => self.outside_scope(None, Some(t), col),
            },
            [.., s, t, col] => match find_qualified(scopes, s, t) {
                Some(e) => self.in_entry(e, col),
                None => self.outside_scope(Some(s), Some(t), col),
            },
            [] => Ok(Resolved::Safe),
        }
    }

    fn in_entry(&self, e: &Entry, col: &str) -> Result<Resolved, Refusal> {
        match e.find(self.rules, col) {
            Found::Masked(c) => Ok(Resolved::Masked(c)),
            Found::Doubt(what) => self.unresolvable(&what),
            Found::Safe => Ok(Resolved::Safe),
            // `t.t`-style whole-row or composite field access on an entry: refuse if masked.
            Found::No => Ok(match e.masked(self.rules) {
                Some(t) if e.refname == col => Resolved::WholeRow(t),
                _ => Resolved::Safe,
            }),
        }
    }

    /// A name no FROM entry in scope provides (an output alias, a column of a relation named
    /// in DDL, a typo): refused when a rule could cover it.
    fn outside_scope(
        &self,
        schema: Option<&str>,
        table: Option<&str>,
        col: &str,
    ) -> Result<Resolved, Refusal> {
        if self.rules.strategy_for_parts(schema, table, col).is_some() {
            return self.unresolvable(&match table {
                Some(t) => format!("{t}.{col}"),
                None => col.to_owned(),
            });
        }
        Ok(Resolved::Safe)
    }

    fn unresolvable<T>(&self, what: &str) -> Result<T, Refusal> {
        refuse(format!(
            "interceptor: `{what}` may be a masked column, and its table could not be resolved \
             here (a relation unknown to the catalog, or a reference outside any FROM clause); \
             qualify it with a table the statement reads"
        ))
    }

    fn doubt(&self, what: &str, _scopes: &[Level]) -> Result<(), Refusal> {
        refuse(format!(
            "interceptor: {what} could not be analysed for column masking"
        ))
    }

    fn doubt_table(&self, schema: Option<&str>, table: &str) -> Result<(), Refusal> {
        if self.rules.could_mask_table(schema, Some(table)) {
            return self.unresolvable(&format!("{table}.*"));
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Place {
    Expression,
    Target { keep_bare: bool, alias: bool },
}

enum Resolved {
    Safe,
    Masked(Col),
    WholeRow(String),
}

/// Found::Masked/Doubt as labels (for refusal messages).
fn found_label(f: Found) -> Found {
    match f {
        Found::Masked(c) => Found::Doubt(c.label),
        other => other,
    }
}

fn find_entry<'s>(scopes: &'s [Level], name: &str) -> Option<&'s Entry> {
    scopes
        .iter()
        .rev()
        .find_map(|l| l.entries.iter().rev().find(|e| e.refname == name))
}

fn find_qualified<'s>(scopes: &'s [Level], schema: &str, table: &str) -> Option<&'s Entry> {
    scopes.iter().rev().find_map(|l| {
        l.entries.iter().find(|e| {
            e.qualified
                .as_ref()
                .is_some_and(|(s, t)| s == schema && t == table)
        })
    })
}

/// ORDER BY that names an output position or an output alias (which would sort by the
/// unmasked value of a plain masked output column).
fn sorts_by_output(sorts: &[Value], targets: &[Value]) -> bool {
    let aliases: Vec<&str> = targets
        .iter()
        .filter_map(|t| match kind_of(t) {
            Some(("ResTarget", rt)) => Some(str_of(rt, "name")),
            _ => None,
        })
        .filter(|n| !n.is_empty())
        .collect();
    sorts.iter().any(|s| {
        let Some(("SortBy", sb)) = kind_of(s) else {
            return true;
        };
        match sb.get("node").and_then(kind_of) {
            Some(("AConst", _)) => true,
            Some(("ColumnRef", c)) => {
                let f = list(c, "fields");
                f.len() == 1 && sval(&f[0]).is_some_and(|n| aliases.contains(&n))
            }
            _ => false,
        }
    })
}

/// The output column names of a SELECT as PostgreSQL names them, when every one is known
/// (`None` with `*` or a target whose name this does not work out).
fn output_names(q: &Value) -> Option<Vec<String>> {
    let ("SelectStmt", s) = kind_of(q)? else {
        return None;
    };
    if s.get("op").and_then(Value::as_i64).unwrap_or(1) > 1 {
        return output_names(&serde_json::json!({ "SelectStmt": s.get("larg")? }));
    }
    let mut out = Vec::new();
    for t in list(s, "target_list") {
        let ("ResTarget", rt) = kind_of(t)? else {
            return None;
        };
        let name = str_of(rt, "name");
        if !name.is_empty() {
            out.push(name.to_owned());
            continue;
        }
        match kind_of(rt.get("val")?)? {
            ("ColumnRef", c) => out.push(sval(list(c, "fields").last()?)?.to_owned()),
            ("FuncCall", f) => out.push(func_name(f).1?),
            _ => return None,
        }
    }
    Some(out)
}

fn statement_label(kind: &str) -> &'static str {
    match kind {
        "DoStmt" => "DO",
        "CreateFunctionStmt" => "CREATE FUNCTION/PROCEDURE",
        "CreateTrigStmt" => "CREATE TRIGGER",
        "RuleStmt" => "CREATE RULE",
        "CreateEventTrigStmt" => "CREATE EVENT TRIGGER",
        "CreateTransformStmt" => "CREATE TRANSFORM",
        "CreateCastStmt" => "CREATE CAST",
        "CreateOpClassStmt" => "CREATE OPERATOR CLASS",
        _ => "CREATE AGGREGATE/OPERATOR/TYPE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> MaskRules {
        let v: toml::Value = toml::from_str(
            r#"
            [[column]]
            match = "public.t.card"
            strategy = "redact"
            [[column]]
            match = "public.t.email"
            strategy = "pseudonym"
            "#,
        )
        .unwrap();
        MaskRules::from_toml(&[v], Some(b"0123456789abcdef0123")).unwrap()
    }

    /// A cache that knows `public.t (id int, card text, email text)`.
    fn catalog(sql: &str) -> RelationCache {
        let tree = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
        let n = needs(&tree.protobuf);
        let mut cache = RelationCache::default();
        let Some(lookup) = cache.query(&n.relations, &n.functions) else {
            return cache;
        };
        let mut rows = Vec::new();
        for (i, r) in n.relations.iter().enumerate() {
            if r.name != "t" {
                continue;
            }
            for (col, ty, cat) in [
                ("id", "integer", "N"),
                ("card", "text", "S"),
                ("email", "text", "S"),
            ] {
                rows.push(
                    ["r", &i.to_string(), "public", "t", "r", col, ty, cat]
                        .iter()
                        .map(|s| Some(s.to_string()))
                        .collect(),
                );
            }
            // Only the first occurrence of a name is looked up.
            break;
        }
        cache.insert(lookup, &rows).unwrap();
        cache
    }

    fn run(sql: &str) -> Result<Option<String>, Refusal> {
        let tree = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
        rewrite(sql, &needs(&tree.protobuf), &rules(), &catalog(sql))
    }

    /// The tree is converted once per statement (the catalog lookup and the rewrite share
    /// it), and the text is scanned only when a reference is rewritten.
    #[test]
    fn one_conversion_per_statement_and_a_scan_only_for_an_edit() {
        let rules = rules();
        for (sql, scans) in [
            ("SELECT card, email FROM t", 0),
            ("SELECT upper(card) FROM t WHERE card LIKE $1", 1),
        ] {
            let cache = catalog(sql);
            let tree = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
            let before = conversions_and_scans();
            let n = needs(&tree.protobuf);
            let out = rewrite(sql, &n, &rules, &cache).unwrap();
            let (conversions, scanned) = conversions_and_scans();
            assert_eq!(
                (conversions - before.0, scanned - before.1),
                (1, scans),
                "{sql} -> {out:?}"
            );
        }
    }

    #[test]
    fn plain_output_columns_stay_expressions_are_rewritten() {
        assert_eq!(run("SELECT card, email FROM t").unwrap(), None);
        let out = run("SELECT upper(card) FROM t WHERE card LIKE $1")
            .unwrap()
            .unwrap();
        assert_eq!(out.matches("[REDACTED]").count(), 2, "{out}");
        assert!(out.ends_with("LIKE $1"), "{out}");
        let out = run("SELECT s.c FROM (SELECT card AS c, x.card FROM t x) s")
            .unwrap()
            .unwrap();
        assert!(out.contains("AS \"card\""), "{out}");
    }

    #[test]
    fn keyed_strategies_and_whole_rows_are_refused() {
        let e = run("SELECT lower(email) FROM t").unwrap_err();
        assert!(
            e.0.contains("public.t.email") && e.0.contains("pseudonym"),
            "{e}"
        );
        assert!(
            run("SELECT row_to_json(a) FROM t a")
                .unwrap_err()
                .0
                .contains("whole-row")
        );
        assert!(run("SELECT t FROM t").unwrap_err().0.contains("whole-row"));
        assert!(run("SELECT 1 FROM t a JOIN t b USING (card)").is_err());
        assert!(run("DO $$ BEGIN NULL; END $$").is_err());
        assert!(run("SELECT query_to_xml('select 1', true, false, '')").is_err());
    }

    #[test]
    fn ordering_by_an_output_position_rewrites_the_plain_column() {
        let out = run("SELECT card FROM t ORDER BY 1").unwrap().unwrap();
        assert!(out.starts_with("SELECT ((CASE"), "{out}");
        assert!(run("SELECT email FROM t ORDER BY 1").is_err());
    }
}
