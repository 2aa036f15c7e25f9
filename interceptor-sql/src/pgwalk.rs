//! What one statement does, read from PostgreSQL's own parse tree ([`super::pgparse`]).
//!
//! The statement's node type gives its kind; a walk over the whole tree (every field of every
//! node, through the tree's serde form, so no field can be forgotten) finds every relation,
//! every function call and every nested data-modifying statement (CTEs, rules, PREPARE, …).

use pg_query::NodeEnum;
use pg_query::protobuf::{
    self, CopyStmt, DiscardMode, DropStmt, ExplainStmt, ObjectType, VariableSetKind,
};
use serde_json::{Map, Value};

use super::names::qualify_relation;
use super::relfuncs::{self, ArgClass};
use super::statement::{Risk, StatementKind};
use super::walk::Facts;

/// How deep query text inside a literal (`query_to_xml('…')`) is followed.
const MAX_INNER_QUERY_DEPTH: usize = 3;

/// What the tree says about one statement.
#[derive(Default)]
pub(crate) struct TreeFacts {
    pub(crate) facts: Facts,
    /// Some relations the statement reads are not written in it (a relation name computed at
    /// run time, a schema- or database-wide function).
    pub(crate) names_unknown: bool,
    pub(crate) prepares: Option<String>,
    pub(crate) executes: Option<String>,
    pub(crate) deallocates: Option<String>,
    /// How many leading words name the command (`SELECT` vs `ALTER TABLE`).
    pub(crate) command_words: usize,
}

/// Why the tree cannot be classified.
#[derive(Debug)]
pub(crate) enum TreeError {
    /// An EXPLAIN option or value PostgreSQL 15 would reject.
    ExplainOption(String),
    /// The tree has no statement (cannot happen for a parsed statement; fail closed).
    Empty,
}

/// Classifies one parsed statement.
pub(crate) fn statement(
    node: &NodeEnum,
    standard_conforming_strings: bool,
) -> Result<TreeFacts, TreeError> {
    let mut out = TreeFacts {
        command_words: 1,
        ..TreeFacts::default()
    };
    classify_node(node, standard_conforming_strings, 0, &mut out)?;
    Ok(out)
}

fn classify_node(
    node: &NodeEnum,
    scs: bool,
    depth: usize,
    out: &mut TreeFacts,
) -> Result<(), TreeError> {
    use StatementKind as K;
    let f = &mut out.facts;
    let mut words = 2;
    match node {
        NodeEnum::ExplainStmt(e) => return explain(e, scs, depth, out),
        NodeEnum::SelectStmt(s) => {
            words = 1;
            f.raise(if s.into_clause.is_some() {
                K::Ddl
            } else {
                K::Read
            });
        }
        NodeEnum::DeclareCursorStmt(_)
        | NodeEnum::FetchStmt(_)
        | NodeEnum::ClosePortalStmt(_)
        | NodeEnum::VariableShowStmt(_) => f.raise(K::Read),
        NodeEnum::PrepareStmt(p) => {
            words = 1;
            f.raise(K::Read);
            out.prepares = Some(p.name.clone());
        }
        NodeEnum::InsertStmt(_) | NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_) => {
            words = 1;
            f.raise(K::Write);
        }
        NodeEnum::MergeStmt(_) | NodeEnum::LockStmt(_) => {
            words = 1;
            f.raise(K::Write);
        }
        NodeEnum::RefreshMatViewStmt(_) => {
            words = 3;
            f.raise(K::Write);
        }
        NodeEnum::CopyStmt(c) => {
            words = 1;
            copy(c, f);
        }
        NodeEnum::TransactionStmt(_) => {
            words = 1;
            f.raise(K::Transaction);
        }
        NodeEnum::ConstraintsSetStmt(_) => f.raise(K::Transaction),
        NodeEnum::VariableSetStmt(v) => {
            let kind = VariableSetKind::try_from(v.kind).unwrap_or(VariableSetKind::Undefined);
            match (kind, v.name.as_str()) {
                // SET TRANSACTION … / SET SESSION CHARACTERISTICS AS TRANSACTION …
                (VariableSetKind::VarSetMulti, "TRANSACTION") => f.raise(K::Transaction),
                (VariableSetKind::VarSetMulti, _) => f.raise(K::Session),
                // role and session_authorization are GUC_NO_RESET_ALL in PostgreSQL.
                (VariableSetKind::VarResetAll, _) => f.raise(K::Session),
                (_, name) => {
                    f.raise(K::Session);
                    setting_risks(name, f);
                }
            }
        }
        NodeEnum::DiscardStmt(d) => {
            f.raise(K::Session);
            // DISCARD PLANS drops cached plans only; prepared statements stay.
            if matches!(DiscardMode::try_from(d.target), Ok(DiscardMode::DiscardAll)) {
                out.deallocates = Some(String::new());
            }
        }
        NodeEnum::DeallocateStmt(d) => {
            f.raise(K::Session);
            out.deallocates = Some(if d.isall {
                String::new()
            } else {
                d.name.clone()
            });
        }
        NodeEnum::ListenStmt(_) | NodeEnum::UnlistenStmt(_) => f.raise(K::Session),
        NodeEnum::NotifyStmt(_)
        | NodeEnum::VacuumStmt(_)
        | NodeEnum::CheckPointStmt(_)
        | NodeEnum::ClusterStmt(_)
        | NodeEnum::ReindexStmt(_) => {
            words = 1;
            f.raise(K::Utility);
        }
        NodeEnum::LoadStmt(_) => {
            f.raise(K::Utility);
            f.risks.insert(Risk::ServerFile);
        }
        NodeEnum::AlterSystemStmt(_) => {
            f.raise(K::Utility);
            f.risks.insert(Risk::AlterSystem);
        }
        NodeEnum::DoStmt(d) => {
            words = 1;
            f.raise(K::Procedural);
            f.risks.insert(Risk::AnonymousCode);
            if bodies_execute(&d.args) {
                f.risks.insert(Risk::DynamicSql);
            }
        }
        NodeEnum::CallStmt(_) => {
            words = 1;
            f.raise(K::Procedural);
        }
        NodeEnum::ExecuteStmt(e) => {
            words = 1;
            f.raise(K::Procedural);
            out.executes = Some(e.name.clone());
        }
        NodeEnum::GrantStmt(_) => {
            words = 1;
            f.raise(K::Dcl);
        }
        NodeEnum::GrantRoleStmt(_)
        | NodeEnum::CreateRoleStmt(_)
        | NodeEnum::AlterRoleStmt(_)
        | NodeEnum::AlterRoleSetStmt(_) => {
            words = if matches!(node, NodeEnum::GrantRoleStmt(_)) {
                1
            } else {
                2
            };
            f.raise(K::Dcl);
            f.risks.insert(Risk::AlterRole);
        }
        NodeEnum::DropRoleStmt(_) => {
            f.raise(K::Dcl);
            f.risks.insert(Risk::AlterRole);
            f.risks.insert(Risk::Drop);
        }
        NodeEnum::DropOwnedStmt(_) => {
            f.raise(K::Dcl);
            f.risks.insert(Risk::Drop);
        }
        NodeEnum::SecLabelStmt(_)
        | NodeEnum::AlterDefaultPrivilegesStmt(_)
        | NodeEnum::ReassignOwnedStmt(_) => f.raise(K::Dcl),
        NodeEnum::TruncateStmt(_) => {
            words = 1;
            f.raise(K::Ddl);
            f.risks.insert(Risk::Truncate);
        }
        NodeEnum::DropStmt(d) => {
            f.raise(K::Ddl);
            f.risks.insert(Risk::Drop);
            drop_tables(d, f);
        }
        NodeEnum::CommentStmt(c) => {
            f.raise(K::Ddl);
            if matches!(
                ObjectType::try_from(c.objtype),
                Ok(ObjectType::ObjectTable | ObjectType::ObjectView | ObjectType::ObjectMatview)
            ) && let Some(name) = c
                .object
                .as_ref()
                .and_then(|o| o.node.as_ref())
                .and_then(name_list)
            {
                f.tables.insert(name);
            }
        }
        NodeEnum::CreateFunctionStmt(c) => {
            f.raise(K::Ddl);
            let language = c.options.iter().find_map(|o| match o.node.as_ref() {
                Some(NodeEnum::DefElem(d)) if d.defname == "language" => {
                    d.arg.as_ref().and_then(|a| string_value(a.node.as_ref()?))
                }
                _ => None,
            });
            // SQL and PL/pgSQL are trusted; anything else (C, plpython3u, …) runs arbitrary code.
            if !matches!(language.as_deref(), Some("sql" | "plpgsql") | None)
                || bodies_execute(&c.options)
            {
                f.risks.insert(Risk::DynamicSql);
            }
        }
        NodeEnum::CreateForeignServerStmt(_)
        | NodeEnum::AlterForeignServerStmt(_)
        | NodeEnum::CreateUserMappingStmt(_)
        | NodeEnum::AlterUserMappingStmt(_) => {
            f.raise(K::Ddl);
            f.risks.insert(Risk::Dblink);
        }
        // Every other statement PostgreSQL parses (CREATE …, ALTER …, IMPORT FOREIGN SCHEMA,
        // …) changes the schema: DDL, whose objects the walk below may not fully name.
        _ => f.raise(K::Ddl),
    }
    if depth == 0 {
        out.command_words = words;
    }
    let tree = serde_json::to_value(node).map_err(|_| TreeError::Empty)?;
    let mut walker = Walker {
        out,
        executed: true,
        scs,
        depth,
    };
    walker.walk(&tree);
    Ok(())
}

/// EXPLAIN runs its statement when an ANALYZE option is on: then it is that statement.
/// Options are checked as PostgreSQL 15 checks them, so a spelling it would reject is refused.
fn explain(e: &ExplainStmt, scs: bool, depth: usize, out: &mut TreeFacts) -> Result<(), TreeError> {
    let mut analyze = false;
    for option in &e.options {
        let Some(NodeEnum::DefElem(d)) = option.node.as_ref() else {
            return Err(TreeError::ExplainOption("?".to_owned()));
        };
        let arg = d.arg.as_ref().and_then(|a| a.node.as_ref());
        match d.defname.as_str() {
            "analyze" => analyze |= explain_bool(&d.defname, arg)?,
            "verbose" | "costs" | "settings" | "buffers" | "wal" | "timing" | "summary" => {
                explain_bool(&d.defname, arg)?;
            }
            "format" => {
                let value = arg.and_then(string_value).unwrap_or_default();
                if !matches!(value.as_str(), "text" | "xml" | "json" | "yaml") {
                    return Err(TreeError::ExplainOption(format!("format {value:?}")));
                }
            }
            other => return Err(TreeError::ExplainOption(other.to_owned())),
        }
    }
    let Some(inner) = e.query.as_ref().and_then(|q| q.node.as_ref()) else {
        return Err(TreeError::Empty);
    };
    if depth == 0 {
        out.command_words = 1;
    }
    if analyze {
        let mut inner_out = TreeFacts::default();
        classify_node(inner, scs, depth + 1, &mut inner_out)?;
        let TreeFacts {
            facts,
            names_unknown,
            executes,
            ..
        } = inner_out;
        out.facts.merge(facts);
        out.names_unknown |= names_unknown;
        // EXPLAIN ANALYZE EXECUTE p runs p.
        out.executes = executes;
        // The inner kind is at least a read.
        out.facts.raise(StatementKind::Read);
        return Ok(());
    }
    out.facts.raise(StatementKind::Read);
    let tree = serde_json::to_value(inner).map_err(|_| TreeError::Empty)?;
    let mut walker = Walker {
        out,
        executed: false,
        scs,
        depth,
    };
    walker.walk(&tree);
    Ok(())
}

/// PostgreSQL's `defGetBoolean`: no value, `true`/`false`/`on`/`off` in any case, or 0/1.
fn explain_bool(name: &str, arg: Option<&NodeEnum>) -> Result<bool, TreeError> {
    let bad = || TreeError::ExplainOption(name.to_owned());
    match arg {
        None => Ok(true),
        Some(NodeEnum::Integer(i)) => match i.ival {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad()),
        },
        Some(NodeEnum::Boolean(b)) => Ok(b.boolval),
        Some(other) => match string_value(other)
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            Some("true" | "on") => Ok(true),
            Some("false" | "off") => Ok(false),
            _ => Err(bad()),
        },
    }
}

fn string_value(node: &NodeEnum) -> Option<String> {
    match node {
        NodeEnum::String(s) => Some(s.sval.clone()),
        NodeEnum::Float(f) => Some(f.fval.clone()),
        NodeEnum::TypeName(_) => None,
        _ => None,
    }
}

fn copy(c: &CopyStmt, f: &mut Facts) {
    f.raise(if c.is_from {
        StatementKind::CopyFrom
    } else {
        StatementKind::CopyTo
    });
    if c.is_program {
        f.risks.insert(Risk::CopyProgram);
    } else if !c.filename.is_empty() {
        f.risks.insert(Risk::CopyFile);
        f.risks.insert(Risk::ServerFile);
    }
}

fn drop_tables(d: &DropStmt, f: &mut Facts) {
    if !matches!(
        ObjectType::try_from(d.remove_type),
        Ok(ObjectType::ObjectTable
            | ObjectType::ObjectView
            | ObjectType::ObjectMatview
            | ObjectType::ObjectForeignTable
            | ObjectType::ObjectSequence
            | ObjectType::ObjectIndex)
    ) {
        return;
    }
    for o in &d.objects {
        if let Some(name) = o.node.as_ref().and_then(name_list) {
            f.tables.insert(name);
        }
    }
}

/// `schema.name` from a List of String nodes (how DROP and COMMENT name objects).
fn name_list(node: &NodeEnum) -> Option<String> {
    let NodeEnum::List(list) = node else {
        return None;
    };
    let parts: Vec<&str> = list
        .items
        .iter()
        .map(|i| match i.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    Some(match parts.as_slice() {
        [t] => qualify_relation("", t),
        [.., s, t] => format!("{s}.{t}"),
        [] => return None,
    })
}

/// Does any `AS` body (DO, CREATE FUNCTION) mention EXECUTE (dynamic SQL in PL/pgSQL)?
fn bodies_execute(options: &[protobuf::Node]) -> bool {
    options.iter().any(|o| match o.node.as_ref() {
        Some(NodeEnum::DefElem(d)) if d.defname == "as" => {
            let text = serde_json::to_string(&d.arg).unwrap_or_default();
            text.to_ascii_lowercase().contains("execute")
        }
        _ => false,
    })
}

fn setting_risks(name: &str, f: &mut Facts) {
    match name.to_ascii_lowercase().as_str() {
        "role" => {
            f.risks.insert(Risk::SetRole);
        }
        "session_authorization" => {
            f.risks.insert(Risk::SessionAuthorization);
        }
        "search_path" => {
            f.risks.insert(Risk::SearchPath);
        }
        _ => {}
    }
}

struct Walker<'a> {
    out: &'a mut TreeFacts,
    /// False inside EXPLAIN without ANALYZE: names are collected, effects are not.
    executed: bool,
    scs: bool,
    depth: usize,
}

impl Walker<'_> {
    fn walk(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                self.node(map);
                for child in map.values() {
                    self.walk(child);
                }
            }
            Value::Array(items) => {
                for child in items {
                    self.walk(child);
                }
            }
            _ => {}
        }
    }

    /// One object of the tree: a tagged node (`{"DeleteStmt": {…}}`) or a struct (a RangeVar
    /// or FuncCall held directly by its parent, without the tag).
    fn node(&mut self, map: &Map<String, Value>) {
        if is_range_var(map) {
            let field = |k: &str| map.get(k).and_then(Value::as_str).unwrap_or("");
            let name = qualify_relation(field("schemaname"), field("relname"));
            self.out.facts.tables.insert(name);
            return;
        }
        if is_func_call(map) {
            self.func_call(map);
            return;
        }
        if map.len() != 1 || !self.executed {
            return;
        }
        let Some((tag, body)) = map.iter().next() else {
            return;
        };
        let facts = &mut self.out.facts;
        let without_where = || body.get("where_clause").is_none_or(Value::is_null);
        match tag.as_str() {
            "InsertStmt" | "MergeStmt" => facts.raise(StatementKind::Write),
            "UpdateStmt" => {
                facts.raise(StatementKind::Write);
                if without_where() {
                    facts.risks.insert(Risk::UpdateWithoutWhere);
                }
            }
            "DeleteStmt" => {
                facts.raise(StatementKind::Write);
                if without_where() {
                    facts.risks.insert(Risk::DeleteWithoutWhere);
                }
            }
            // SELECT … FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE takes row locks.
            "SelectStmt"
                if body
                    .get("locking_clause")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty()) =>
            {
                facts.raise(StatementKind::Write)
            }
            _ => {}
        }
    }

    fn func_call(&mut self, map: &Map<String, Value>) {
        let parts: Vec<&str> = map
            .get("funcname")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(node_string).collect())
            .unwrap_or_default();
        let bare = parts.last().copied().unwrap_or("").to_owned();
        let full = match parts.as_slice() {
            [f] if super::functions::is_builtin(f) => format!("pg_catalog.{f}"),
            [f] => format!("public.{f}"),
            [.., s, f] => format!("{s}.{f}"),
            [] => "?".to_owned(),
        };
        let args: &[Value] = map
            .get("args")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let first = args.first().and_then(literal_string);
        let first_positional = args
            .first()
            .is_some_and(|a| tag_of(a) != Some("NamedArgExpr"));
        let builtin = full.starts_with("pg_catalog.");
        self.out.facts.record_call(
            full,
            &bare,
            first.filter(|_| first_positional),
            self.executed,
        );
        // The planner may evaluate immutable and stable functions even when nothing runs.
        if !builtin && !self.executed {
            self.out.facts.risks.insert(Risk::UserFunction);
        }
        if builtin {
            self.relation_arguments(&bare, args);
        }
    }

    /// Functions whose arguments name relations or carry query text (from pg_proc).
    fn relation_arguments(&mut self, bare: &str, args: &[Value]) {
        for spec in relfuncs::lookup(bare) {
            let arg = if spec.position == 0 {
                None
            } else {
                positional_or_named(args, spec.position, &spec.name)
            };
            match spec.class {
                ArgClass::Database | ArgClass::Schema => self.out.names_unknown = true,
                ArgClass::Cursor => {}
                // A named relation is reported; an OID or computed name is a catalog lookup
                // (psql's \d sends OIDs), no more than reading pg_class.
                ArgClass::RelationMetadata => {
                    if let Some(name) = arg
                        .and_then(literal_string)
                        .and_then(relfuncs::regclass_name)
                    {
                        self.out.facts.tables.insert(name);
                    }
                }
                ArgClass::Relation => match arg {
                    None => {}
                    Some(a) => match literal_string(a).and_then(relfuncs::regclass_name) {
                        Some(name) => {
                            self.out.facts.tables.insert(name);
                        }
                        None => self.out.names_unknown = true,
                    },
                },
                ArgClass::Query => match arg.map(literal_string) {
                    None => {}
                    Some(Some(text)) if self.depth < MAX_INNER_QUERY_DEPTH => {
                        self.inner_query(text)
                    }
                    Some(_) => self.out.names_unknown = true,
                },
            }
        }
    }

    /// Query text in a literal: classify it as the statement it is.
    fn inner_query(&mut self, text: &str) {
        let Ok(stmts) = super::pgparse::parse(text, self.scs) else {
            self.out.names_unknown = true;
            return;
        };
        for s in stmts {
            let Some(node) = s.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
                continue;
            };
            let mut inner = TreeFacts::default();
            if classify_node(node, self.scs, self.depth + 1, &mut inner).is_err() {
                self.out.names_unknown = true;
                continue;
            }
            self.out.names_unknown |= inner.names_unknown;
            if self.executed {
                self.out.facts.merge(inner.facts);
            } else {
                self.out.facts.tables.extend(inner.facts.tables);
                self.out.facts.functions.extend(inner.facts.functions);
            }
        }
    }
}

fn is_range_var(map: &Map<String, Value>) -> bool {
    map.contains_key("relname") && map.contains_key("relpersistence") && map.contains_key("inh")
}

fn is_func_call(map: &Map<String, Value>) -> bool {
    map.contains_key("funcname") && map.contains_key("agg_order") && map.contains_key("funcformat")
}

/// The tag of a `Node` (`{"node": {"Tag": {…}}}`).
fn tag_of(v: &Value) -> Option<&str> {
    v.get("node")?
        .as_object()?
        .keys()
        .next()
        .map(String::as_str)
}

/// The body of a `Node` with the given tag.
fn tagged<'a>(v: &'a Value, tag: &str) -> Option<&'a Value> {
    v.get("node")?.get(tag)
}

fn node_string(v: &Value) -> Option<&str> {
    tagged(v, "String")?.get("sval")?.as_str()
}

/// A string constant, possibly cast (`'t'::regclass`).
fn literal_string(v: &Value) -> Option<&str> {
    if let Some(c) = tagged(v, "TypeCast") {
        return literal_string(c.get("arg")?);
    }
    let c = tagged(v, "AConst")?;
    c.get("val")?.get("Sval")?.get("sval")?.as_str()
}

/// The argument at 1-based `position`, or the named argument `name`.
fn positional_or_named<'a>(args: &'a [Value], position: usize, name: &str) -> Option<&'a Value> {
    let positional = args
        .iter()
        .take_while(|a| tag_of(a) != Some("NamedArgExpr"))
        .nth(position - 1);
    positional.or_else(|| {
        if name.is_empty() {
            return None;
        }
        args.iter().find_map(|a| {
            let n = tagged(a, "NamedArgExpr")?;
            (n.get("name")?.as_str()? == name).then(|| n.get("arg"))?
        })
    })
}
