//! The AST walk: what one parsed statement does (kind, risks, tables, functions), including
//! nested statements (data-modifying CTEs, EXPLAIN ANALYZE, PREPARE).

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    self, CopySource, CopyTarget, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    ObjectName, ObjectType, Reset, Set, Statement, TableFactor, Visitor,
};

use super::functions;
use super::names::{
    function_name, ident_name, is_reserved_unquoted, literal_string, name_parts, table_name,
};
use super::statement::{Risk, StatementKind};

/// Accumulates what one statement does.
#[derive(Default)]
pub(crate) struct Facts {
    pub(crate) kind: Option<StatementKind>,
    pub(crate) risks: BTreeSet<Risk>,
    pub(crate) tables: BTreeSet<String>,
    pub(crate) functions: BTreeSet<String>,
}

impl Facts {
    pub(crate) fn raise(&mut self, kind: StatementKind) {
        self.kind = Some(self.kind.map_or(kind, |k| k.max(kind)));
    }

    pub(crate) fn record_function(
        &mut self,
        name: &ObjectName,
        first_arg: Option<&Expr>,
        executed: bool,
    ) {
        let (full, bare) = function_name(name);
        self.record_call(full, &bare, first_arg.and_then(literal_string), executed);
    }

    /// One function call: `full` is `schema.name`, `bare` the name alone, `first_literal` the
    /// first positional argument when it is a string constant.
    pub(crate) fn record_call(
        &mut self,
        full: String,
        bare: &str,
        first_literal: Option<&str>,
        executed: bool,
    ) {
        let builtin = full.starts_with("pg_catalog.");
        self.functions.insert(full);
        if !executed {
            return;
        }
        if !builtin {
            self.risks.insert(Risk::UserFunction);
        }
        if bare == "set_config" {
            self.raise(StatementKind::Session);
            self.risks
                .extend(functions::set_config_risks(first_literal).iter().copied());
        }
        if let Some((kind, risks)) = functions::side_effects(bare) {
            self.raise(kind);
            self.risks.extend(risks.iter().copied());
        }
    }

    /// Adds what another statement part does (the statement EXPLAIN ANALYZE runs, a query in
    /// a string argument).
    pub(crate) fn merge(&mut self, other: Facts) {
        if let Some(k) = other.kind {
            self.raise(k);
        }
        self.risks.extend(other.risks);
        self.tables.extend(other.tables);
        self.functions.extend(other.functions);
    }
}

/// Walks the whole AST: tables, functions, nested data-modifying statements.
pub(crate) struct Walk<'a> {
    pub(crate) facts: &'a mut Facts,
    /// Depth of statements visited; the outermost is classified by [`classify_statement`].
    pub(crate) depth: usize,
    /// Inside `EXPLAIN` without ANALYZE nothing runs: collect names, not effects.
    pub(crate) not_executed: usize,
    pub(crate) explain_stack: Vec<bool>,
    /// Table-function names already recorded as functions (sqlparser also reports them as
    /// relations).
    pub(crate) table_functions: Vec<ObjectName>,
    /// sqlparser read a PostgreSQL reserved keyword as a table name or alias (e.g.
    /// `FROM ONLY secrets` as table `only` aliased `secrets`): its tree is not PostgreSQL's.
    pub(crate) misread: bool,
}

impl Visitor for Walk<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        self.depth += 1;
        let non_executing_explain =
            matches!(statement, Statement::Explain { .. }) && !explain_executes(statement);
        self.explain_stack.push(non_executing_explain);
        if non_executing_explain {
            self.not_executed += 1;
        }
        if self.depth > 1 && self.not_executed == 0 {
            shallow(statement, self.facts);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _statement: &Statement) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        if self.explain_stack.pop() == Some(true) {
            self.not_executed = self.not_executed.saturating_sub(1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &ast::Query) -> ControlFlow<()> {
        if !query.locks.is_empty() && self.not_executed == 0 {
            self.facts.raise(StatementKind::Write);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &ast::Select) -> ControlFlow<()> {
        if select.into.is_some() && self.not_executed == 0 {
            self.facts.raise(StatementKind::Ddl);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        let executed = self.not_executed == 0;
        let alias = match factor {
            TableFactor::Table { alias, .. }
            | TableFactor::Derived { alias, .. }
            | TableFactor::Function { alias, .. }
            | TableFactor::UNNEST { alias, .. } => alias.as_ref(),
            _ => None,
        };
        if alias.is_some_and(|a| is_reserved_unquoted(&a.name)) {
            self.misread = true;
        }
        match factor {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                let first = match args.args.first() {
                    Some(a @ FunctionArg::Unnamed(_)) => arg_expr(a),
                    _ => None,
                };
                self.facts.record_function(name, first, executed);
                self.table_functions.push(name.clone());
            }
            TableFactor::Function { name, args, .. } => {
                let first = match args.first() {
                    Some(a @ FunctionArg::Unnamed(_)) => arg_expr(a),
                    _ => None,
                };
                self.facts.record_function(name, first, executed);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if relation
            .0
            .iter()
            .any(|p| p.as_ident().is_some_and(is_reserved_unquoted))
        {
            self.misread = true;
        }
        if let Some(pos) = self.table_functions.iter().position(|n| n == relation) {
            self.table_functions.swap_remove(pos);
        } else {
            self.facts.tables.insert(table_name(relation));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            // Only a positional first argument is the setting name of set_config; a named
            // argument could be any parameter (then the name counts as unknown).
            let first = match &f.args {
                FunctionArguments::List(list) => match list.args.first() {
                    Some(a @ FunctionArg::Unnamed(_)) => arg_expr(a),
                    _ => None,
                },
                _ => None,
            };
            self.facts
                .record_function(&f.name, first, self.not_executed == 0);
        }
        ControlFlow::Continue(())
    }
}

/// `EXPLAIN ANALYZE …` and `EXPLAIN (ANALYZE[, …]) …` run the statement. An ANALYZE option is
/// taken as "on" unless its argument is literally false/off/0.
pub(crate) fn explain_executes(statement: &Statement) -> bool {
    let Statement::Explain {
        analyze, options, ..
    } = statement
    else {
        return false;
    };
    *analyze
        || options.iter().flatten().any(|o| {
            ident_name(&o.name) == "analyze"
                && !o.arg.as_ref().is_some_and(|a| {
                    let text = a.to_string().to_ascii_lowercase();
                    matches!(text.trim_matches('\''), "false" | "off" | "0" | "no")
                })
        })
}

pub(crate) fn arg_expr(arg: &FunctionArg) -> Option<&Expr> {
    let e = match arg {
        FunctionArg::Named { arg, .. }
        | FunctionArg::ExprNamed { arg, .. }
        | FunctionArg::Unnamed(arg) => arg,
    };
    match e {
        FunctionArgExpr::Expr(e) => Some(e),
        _ => None,
    }
}

pub(crate) fn set_variable_risks(name: &ObjectName, facts: &mut Facts) {
    let parts = name_parts(name);
    match parts.last().map(String::as_str) {
        Some("role") => {
            facts.risks.insert(Risk::SetRole);
        }
        Some("session_authorization") => {
            facts.risks.insert(Risk::SessionAuthorization);
        }
        Some("search_path") => {
            facts.risks.insert(Risk::SearchPath);
        }
        _ => {}
    }
}

/// Kind and risks of one statement node, not looking into nested statements (the walk does).
/// Returns false for statements the engine does not know.
pub(crate) fn shallow(statement: &Statement, facts: &mut Facts) -> bool {
    use StatementKind as K;
    match statement {
        Statement::Query(_) | Statement::Prepare { .. } => facts.raise(K::Read),
        Statement::Explain { .. }
        | Statement::ExplainTable { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowDatabases { .. } => facts.raise(K::Read),
        Statement::Insert(_) | Statement::Merge(_) | Statement::Lock(_) => facts.raise(K::Write),
        Statement::Update(u) => {
            facts.raise(K::Write);
            if u.selection.is_none() {
                facts.risks.insert(Risk::UpdateWithoutWhere);
            }
        }
        Statement::Delete(d) => {
            facts.raise(K::Write);
            if d.selection.is_none() {
                facts.risks.insert(Risk::DeleteWithoutWhere);
            }
        }
        Statement::Copy {
            source, to, target, ..
        } => {
            facts.raise(if *to { K::CopyTo } else { K::CopyFrom });
            if let CopySource::Table { table_name: t, .. } = source {
                facts.tables.insert(table_name(t));
            }
            match target {
                CopyTarget::File { .. } => {
                    facts.risks.insert(Risk::CopyFile);
                    facts.risks.insert(Risk::ServerFile);
                }
                CopyTarget::Program { .. } => {
                    facts.risks.insert(Risk::CopyProgram);
                }
                CopyTarget::Stdin | CopyTarget::Stdout => {}
            }
        }
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => facts.raise(K::Transaction),
        Statement::Set(set) => match set {
            Set::SetTransaction { .. } => facts.raise(K::Transaction),
            Set::SingleAssignment { variable, .. } => {
                facts.raise(K::Session);
                set_variable_risks(variable, facts);
            }
            Set::ParenthesizedAssignments { variables, .. } => {
                facts.raise(K::Session);
                for v in variables {
                    set_variable_risks(v, facts);
                }
            }
            Set::MultipleAssignments { assignments } => {
                facts.raise(K::Session);
                for a in assignments {
                    set_variable_risks(&a.name, facts);
                }
            }
            Set::SetRole { .. } => {
                facts.raise(K::Session);
                facts.risks.insert(Risk::SetRole);
            }
            Set::SetSessionAuthorization(_) => {
                facts.raise(K::Session);
                facts.risks.insert(Risk::SessionAuthorization);
            }
            Set::SetTimeZone { .. } | Set::SetNames { .. } | Set::SetNamesDefault {} => {
                facts.raise(K::Session)
            }
            // SET SESSION param kinds are SQL Server's; not PostgreSQL.
            Set::SetSessionParam(_) => return false,
        },
        Statement::Reset(r) => {
            facts.raise(K::Session);
            match &r.reset {
                // role and session_authorization are GUC_NO_RESET_ALL in PostgreSQL.
                Reset::ALL => {}
                Reset::SessionAuthorization => {
                    facts.risks.insert(Risk::SessionAuthorization);
                }
                Reset::ConfigurationParameter(name) => set_variable_risks(name, facts),
            }
        }
        Statement::Discard { .. }
        | Statement::Deallocate { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. } => facts.raise(K::Session),
        Statement::NOTIFY { .. } | Statement::Vacuum(_) | Statement::Analyze(_) => {
            facts.raise(K::Utility)
        }
        Statement::Load { .. } => {
            facts.raise(K::Utility);
            facts.risks.insert(Risk::ServerFile);
        }
        Statement::Execute { .. } | Statement::Call(_) => facts.raise(K::Procedural),
        Statement::Truncate(_) => {
            facts.raise(K::Ddl);
            facts.risks.insert(Risk::Truncate);
        }
        Statement::Drop { object_type, .. } => {
            facts.risks.insert(Risk::Drop);
            if matches!(object_type, ObjectType::Role | ObjectType::User) {
                facts.raise(K::Dcl);
                facts.risks.insert(Risk::AlterRole);
            } else {
                facts.raise(K::Ddl);
            }
        }
        Statement::DropFunction(_)
        | Statement::DropDomain(_)
        | Statement::DropProcedure { .. }
        | Statement::DropPolicy(_)
        | Statement::DropExtension(_)
        | Statement::DropOperator(_)
        | Statement::DropOperatorFamily(_)
        | Statement::DropOperatorClass(_)
        | Statement::DropTrigger(_) => {
            facts.raise(K::Ddl);
            facts.risks.insert(Risk::Drop);
        }
        Statement::CreateServer(_) => {
            facts.raise(K::Ddl);
            facts.risks.insert(Risk::Dblink);
        }
        Statement::CreateFunction(f) => {
            facts.raise(K::Ddl);
            let language = f.language.as_ref().map(ident_name);
            // SQL and PL/pgSQL are trusted; anything else (C, plpython3u, …) runs arbitrary code.
            if !matches!(language.as_deref(), Some("sql" | "plpgsql") | None) {
                facts.risks.insert(Risk::DynamicSql);
            }
        }
        Statement::CreateView(_)
        | Statement::CreateTable(_)
        | Statement::CreateIndex(_)
        | Statement::CreatePolicy(_)
        | Statement::CreateOperator(_)
        | Statement::CreateOperatorFamily(_)
        | Statement::CreateOperatorClass(_)
        | Statement::CreateTextSearch(_)
        | Statement::CreateExtension(_)
        | Statement::CreateCollation(_)
        | Statement::CreateTrigger(_)
        | Statement::CreateProcedure { .. }
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateSequence { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateType { .. }
        | Statement::AlterTable(_)
        | Statement::AlterSchema(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterFunction(_)
        | Statement::AlterType(_)
        | Statement::AlterCollation(_)
        | Statement::AlterOperator(_)
        | Statement::AlterOperatorFamily(_)
        | Statement::AlterOperatorClass(_)
        | Statement::AlterTextSearch(_)
        | Statement::AlterPolicy(_)
        | Statement::Comment { .. }
        | Statement::RenameTable(_) => facts.raise(K::Ddl),
        Statement::Grant(_) | Statement::Revoke(_) | Statement::Deny(_) => facts.raise(K::Dcl),
        Statement::CreateRole(_) | Statement::CreateUser(_) => facts.raise(K::Dcl),
        Statement::AlterRole { .. } | Statement::AlterUser(_) => {
            facts.raise(K::Dcl);
            facts.risks.insert(Risk::AlterRole);
        }
        _ => return false,
    }
    true
}
