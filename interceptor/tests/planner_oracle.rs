#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! PostgreSQL as the oracle of the classifier.
//!
//! * The list of functions whose arguments name relations ([`relfuncs`]) is what its query
//!   selects from the test cluster's pg_proc.
//! * A generated corpus (sqlsmith against the test schema, plus mutations of the policy tests'
//!   statements and of the evasion battery) is classified, and planned by PostgreSQL with
//!   `EXPLAIN (VERBOSE, FORMAT JSON)` (never ANALYZE: nothing runs). Every relation and
//!   function the planner shows, and every ModifyTable node, must be among what the classifier
//!   reported, and a statement classified read-only must plan no write.
//!
//! `POLICY_ORACLE_QUERIES` sets the sqlsmith corpus size (default 300, about a minute on two
//! cores); `cargo xtask differential --minutes N` runs it for longer.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use interceptor_sql::classify::{Classified, classify};
use interceptor_sql::lexer::LexSettings;
use interceptor_sql::relfuncs;
use interceptor_sql::statement::StatementKind;
use interceptor_tests::pg::APP_DB;
use interceptor_tests::{PgCluster, PgCommand, corpus};
use serde_json::Value;

const ON: LexSettings = LexSettings {
    standard_conforming_strings: true,
};

fn skip() -> bool {
    let missing = !std::path::Path::new("/usr/lib/postgresql/15/bin/initdb").exists();
    if missing {
        eprintln!("\n*** SKIPPING planner_oracle: PostgreSQL 15 not installed ***\n");
    }
    missing
}

#[test]
fn relation_function_list_matches_pg_proc() {
    if skip() {
        return;
    }
    let pg = PgCluster::start().unwrap();
    let out = PgCommand::psql(&pg.superuser_params().dbname(APP_DB))
        .args(["-X", "-q", "-A", "-t", "-F", " ", "-f", "-"])
        .stdin(relfuncs::QUERY)
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    let live: Vec<&str> = out.stdout.lines().filter(|l| !l.is_empty()).collect();
    let checked_in: Vec<&str> = relfuncs::DATA
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if std::env::var_os("INTERCEPTOR_REGENERATE").is_some() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../interceptor-sql/src/pg15_relation_functions.txt"
        );
        let header = relfuncs::DATA.lines().next().unwrap_or("#");
        std::fs::write(path, format!("{header}\n{}\n", live.join("\n"))).unwrap();
        return;
    }
    assert_eq!(
        live, checked_in,
        "pg15_relation_functions.txt is stale: rerun with INTERCEPTOR_REGENERATE=1"
    );
    assert!(live.iter().any(|l| l.starts_with("table_to_xml ")));
}

/// The test schema sqlsmith and the mutations run against (no views, partitions or
/// inheritance: the planner would show relations the statement does not name).
const SCHEMA: &str = "
CREATE TABLE public.items (id int PRIMARY KEY, name text NOT NULL, price numeric, tags text[],
                           created timestamptz DEFAULT now());
CREATE TABLE public.orders (id bigserial PRIMARY KEY, item int REFERENCES public.items,
                            qty int CHECK (qty > 0), note jsonb, placed date);
CREATE SCHEMA other;
CREATE TABLE other.secrets (id int, secret text, at interval);
CREATE SEQUENCE public.q;
INSERT INTO public.items SELECT g, 'i' || g, g * 1.5, ARRAY['a'], now() FROM generate_series(1, 20) g;
INSERT INTO public.orders (item, qty, placed) SELECT 1 + g % 20, g, current_date FROM generate_series(1, 50) g;
ANALYZE;
";

/// What the planner found in one plan.
#[derive(Default, Debug)]
struct Planned {
    relations: BTreeSet<String>,
    functions: BTreeSet<String>,
    writes: Vec<String>,
    locks: bool,
}

fn walk_plan(v: &Value, out: &mut Planned) {
    match v {
        Value::Object(map) => {
            if let (Some(Value::String(rel)), Some(Value::String(schema))) =
                (map.get("Relation Name"), map.get("Schema"))
            {
                out.relations.insert(format!("{schema}.{rel}"));
            }
            if let (Some(Value::String(f)), Some(Value::String(schema))) =
                (map.get("Function Name"), map.get("Schema"))
            {
                out.functions.insert(format!("{schema}.{f}"));
            }
            match map.get("Node Type").and_then(Value::as_str) {
                Some("ModifyTable") => out.writes.push(
                    map.get("Operation")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned(),
                ),
                Some("LockRows") => out.locks = true,
                _ => {}
            }
            for (k, child) in map {
                if let Value::String(text) = child
                    && k != "Relation Name"
                    && k != "Alias"
                    && k != "Function Name"
                {
                    expression_functions(text, &mut out.functions);
                }
                walk_plan(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|c| walk_plan(c, out)),
        Value::String(text) => expression_functions(text, &mut out.functions),
        _ => {}
    }
}

/// Function calls in a deparsed expression: `name(` or `"name"(`, lower-case as ruleutils
/// prints them (SQL-syntax forms such as TRIM(…), COALESCE(…) are upper-case keywords).
fn expression_functions(text: &str, out: &mut BTreeSet<String>) {
    let b = text.as_bytes();
    let mut in_string = false;
    for i in 0..b.len() {
        if b[i] == b'\'' {
            in_string = !in_string;
        }
        if in_string || b[i] != b'(' || i == 0 {
            continue;
        }
        let name = if b[i - 1] == b'"' {
            let start = text[..i - 1].rfind('"').map(|s| s + 1);
            start.map(|s| &text[s..i - 1])
        } else {
            let start = text[..i]
                .rfind(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .map_or(0, |s| s + 1);
            Some(&text[start..i]).filter(|n| {
                !n.is_empty()
                    && n.as_bytes()[0].is_ascii_lowercase()
                    // An upper-case word glued before the name is not a function name.
                    && (start == 0 || !text.as_bytes()[start - 1].is_ascii_uppercase())
                    // `::numeric(10,2)` is a cast to a type with a modifier.
                    && !text[..start].ends_with("::")
            })
        };
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            out.insert(n.to_owned());
        }
    }
}

fn bare(f: &str) -> &str {
    f.rsplit('.').next().unwrap_or(f)
}

/// Catalog facts that explain what the planner adds to a statement: SQL functions it inlines
/// (their bodies' calls and relations) and column defaults of the tables written.
struct Catalog {
    sql_bodies: HashMap<String, String>,
    defaults: HashMap<String, String>,
    views: HashMap<String, String>,
}

impl Catalog {
    async fn load(client: &tokio_postgres::Client) -> Catalog {
        let mut sql_bodies = HashMap::new();
        for row in client
            .query(
                "SELECT proname::text, string_agg(prosrc, ' ') FROM pg_proc \
                 WHERE prolang = (SELECT oid FROM pg_language WHERE lanname = 'sql') \
                 GROUP BY proname",
                &[],
            )
            .await
            .unwrap()
        {
            sql_bodies.insert(row.get::<_, String>(0), row.get::<_, String>(1));
        }
        let mut defaults = HashMap::new();
        for row in client
            .query(
                "SELECT n.nspname || '.' || c.relname, string_agg(pg_get_expr(d.adbin, d.adrelid), ' ') \
                 FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace GROUP BY 1",
                &[],
            )
            .await
            .unwrap()
        {
            defaults.insert(row.get::<_, String>(0), row.get::<_, String>(1));
        }
        let mut views = HashMap::new();
        for row in client
            .query(
                "SELECT n.nspname || '.' || c.relname, pg_get_viewdef(c.oid) FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('v', 'm')",
                &[],
            )
            .await
            .unwrap()
        {
            views.insert(row.get::<_, String>(0), row.get::<_, String>(1));
        }
        Catalog {
            sql_bodies,
            defaults,
            views,
        }
    }

    /// Is `name` (a function or relation the planner shows) explained by a SQL function the
    /// statement calls, or a default of a table it names?
    fn explains(&self, c: &Classified, name: &str) -> bool {
        let inlined = c.functions.iter().any(|f| {
            self.sql_bodies
                .get(bare(f))
                .is_some_and(|body| body.contains(bare(name)))
        });
        let default = c
            .tables
            .iter()
            .any(|t| self.defaults.get(t).is_some_and(|d| d.contains(bare(name))));
        inlined || default || self.view_definitions(c).contains(bare(name))
    }

    /// The definitions of the views the statement names, and of the views they name (the
    /// planner expands them).
    fn view_definitions(&self, c: &Classified) -> String {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut text = String::new();
        let mut todo: Vec<&str> = c.tables.iter().map(String::as_str).collect();
        while let Some(t) = todo.pop() {
            let Some((name, def)) = self.views.get_key_value(t) else {
                continue;
            };
            if !seen.insert(name) {
                continue;
            }
            text.push_str(def);
            todo.extend(
                self.views
                    .keys()
                    .filter(|v| def.contains(bare(v)))
                    .map(String::as_str),
            );
        }
        text
    }
}

/// Statements the planner can plan.
fn explainable(sql: &str) -> bool {
    let head = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    matches!(
        head.as_str(),
        "select" | "insert" | "update" | "delete" | "merge" | "values" | "with" | "table"
    )
}

#[derive(Default)]
struct Tally {
    planned: usize,
    refused: usize,
    refusals: std::collections::BTreeMap<String, usize>,
    server_errors: usize,
    not_plannable: usize,
    failures: Vec<String>,
}

async fn check(client: &tokio_postgres::Client, catalog: &Catalog, sql: &str, tally: &mut Tally) {
    let statements = match classify(sql, ON) {
        Ok(s) => s,
        Err(e) => {
            tally.refused += 1;
            let reason = format!("{e:?}");
            let reason = reason
                .split([' ', '{', '('])
                .next()
                .unwrap_or("")
                .to_owned();
            *tally.refusals.entry(reason).or_default() += 1;
            return;
        }
    };
    let [c] = statements.as_slice() else {
        tally.not_plannable += 1;
        return;
    };
    if !explainable(sql) {
        tally.not_plannable += 1;
        return;
    }
    let explain = format!("EXPLAIN (VERBOSE, FORMAT JSON) {sql}");
    let plan = match client.simple_query(&explain).await {
        Ok(messages) => messages.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        }),
        Err(_) => {
            tally.server_errors += 1;
            return;
        }
    };
    let Some(plan) = plan.and_then(|p| serde_json::from_str::<Value>(&p).ok()) else {
        tally.failures.push(format!("no plan for {sql}"));
        return;
    };
    tally.planned += 1;
    let mut found = Planned::default();
    walk_plan(&plan, &mut found);
    let mut problems = Vec::new();
    if c.names_known {
        for r in &found.relations {
            if !c.tables.contains(r) && !catalog.explains(c, r) {
                problems.push(format!("relation {r} not reported"));
            }
        }
        let reported: BTreeSet<&str> = c.functions.iter().map(|f| bare(f)).collect();
        for f in &found.functions {
            if !reported.contains(bare(f)) && !catalog.explains(c, f) {
                problems.push(format!("function {f} not reported"));
            }
        }
    }
    let harmless = matches!(
        c.kind,
        StatementKind::Read | StatementKind::Session | StatementKind::Transaction
    );
    if harmless && (!found.writes.is_empty() || found.locks) {
        problems.push(format!(
            "classified {:?} but the plan writes ({:?}) or locks rows ({})",
            c.kind, found.writes, found.locks
        ));
    }
    if !problems.is_empty() {
        tally.failures.push(format!(
            "{sql}\n  classifier: {c:?}\n  planner: {found:?}\n  {}",
            problems.join("; ")
        ));
    }
}

/// Mutations of a statement that keep its meaning: a leading comment, newlines for spaces,
/// and (for queries) wrapping as a subquery and a CTE.
fn mutations(sql: &str) -> Vec<String> {
    let sql = sql.trim().trim_end_matches(';').trim();
    let mut out = vec![
        sql.to_owned(),
        format!("/* mutation */ {sql}"),
        sql.replace(' ', "\n  "),
    ];
    let lower = sql.to_ascii_lowercase();
    if lower.starts_with("select") && !lower.contains(" for ") && !lower.contains(" into ") {
        out.push(format!("SELECT * FROM ({sql}) AS m"));
        out.push(format!("WITH m AS ({sql}) SELECT * FROM m"));
    }
    if (lower.starts_with("delete") || lower.starts_with("update") || lower.starts_with("insert"))
        && !lower.contains("returning")
    {
        out.push(format!(
            "WITH m AS ({sql} RETURNING 1) SELECT count(*) FROM m"
        ));
    }
    out
}

/// The policy tests' statements (policies/*.tests.toml), each split into statements.
fn policy_test_statements() -> Vec<String> {
    let dir = interceptor_tests::workspace_root().join("policies");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if !path.to_string_lossy().ends_with(".tests.toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: toml::Value = toml::from_str(&text).unwrap();
        for case in doc
            .get("case")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(sql) = case.get("sql").and_then(toml::Value::as_str) {
                out.extend(split(sql));
            }
        }
    }
    out
}

fn split(sql: &str) -> Vec<String> {
    interceptor_sql::lexer::split_statements(sql, ON)
        .map(|pieces| {
            pieces
                .iter()
                .filter_map(|p| sql.get(p.span.clone()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn sqlsmith_corpus(pg: &PgCluster, queries: usize, seed: u64) -> Vec<String> {
    if !std::path::Path::new("/usr/bin/sqlsmith").exists() {
        eprintln!(
            "\n*** sqlsmith not installed (cargo xtask setup): generated corpus skipped ***\n"
        );
        return Vec::new();
    }
    // Host, port, user and password come from the libpq environment PgCommand sets.
    let out = PgCommand::new("sqlsmith", &pg.superuser_params().dbname(APP_DB))
        .arg(format!("--target=dbname={APP_DB}"))
        .args(["--exclude-catalog", "--dry-run"])
        .arg(format!("--max-queries={queries}"))
        .arg(format!("--seed={seed}"))
        .timeout(Duration::from_secs(600))
        .run()
        .unwrap();
    assert!(out.success(), "sqlsmith: {out:?}");
    split(&out.stdout)
}

#[tokio::test]
async fn classifier_covers_what_the_planner_finds() {
    if skip() {
        return;
    }
    let started = Instant::now();
    let pg = PgCluster::start().unwrap();
    pg.psql(SCHEMA).unwrap();
    let p = pg.superuser_params();
    let client = pg
        .connect(&p.user, p.password.as_deref().unwrap_or(""), APP_DB)
        .await
        .unwrap();
    client
        .simple_query("SET statement_timeout = '5s'")
        .await
        .unwrap();
    let catalog = Catalog::load(&client).await;
    // The oracle itself must see what a plan holds, or it proves nothing.
    for sql in [
        "SELECT lower(name) FROM public.items",
        "DELETE FROM public.orders WHERE id = 1",
    ] {
        let plan = client
            .simple_query(&format!("EXPLAIN (VERBOSE, FORMAT JSON) {sql}"))
            .await
            .unwrap();
        let text = plan
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        let mut found = Planned::default();
        walk_plan(&serde_json::from_str(&text).unwrap(), &mut found);
        assert!(!found.relations.is_empty(), "{sql}: {found:?}");
        assert!(
            found.functions.contains("lower") || !found.writes.is_empty(),
            "{sql}: {found:?}"
        );
    }

    let mut fixed: Vec<String> = Vec::new();
    for s in policy_test_statements()
        .iter()
        .map(String::as_str)
        .chain(corpus::DISGUISED_WRITES.iter().copied())
        .chain(corpus::OVER_BLOCKED.iter().copied())
        .chain(corpus::READS_BY_NAME_OUTSIDE_PUBLIC.iter().copied())
    {
        // The battery names the accounts fixture; plan it against the test schema too.
        for s in [s.to_owned(), s.replace("accounts", "public.items")] {
            fixed.extend(mutations(&s));
        }
    }
    let mut tally = Tally::default();
    for sql in &fixed {
        check(&client, &catalog, sql, &mut tally).await;
    }
    let fixed_planned = tally.planned;

    let queries = std::env::var("POLICY_ORACLE_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed = std::env::var("POLICY_ORACLE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let generated = sqlsmith_corpus(&pg, queries, seed);
    for sql in &generated {
        check(&client, &catalog, sql, &mut tally).await;
    }
    eprintln!(
        "planner oracle: {} fixed + {} generated statements: {} planned ({fixed_planned} fixed), \
         {} refused by the classifier {:?}, {} server errors, {} not plannable, {} disagreements, {:?}",
        fixed.len(),
        generated.len(),
        tally.planned,
        tally.refused,
        tally.refusals,
        tally.server_errors,
        tally.not_plannable,
        tally.failures.len(),
        started.elapsed()
    );
    assert!(
        tally.failures.is_empty(),
        "the classifier missed what the planner found:\n{}",
        tally.failures.join("\n\n")
    );
    assert!(
        fixed_planned >= 50,
        "only {fixed_planned} fixed statements planned"
    );
    if !generated.is_empty() {
        assert!(
            tally.planned - fixed_planned >= generated.len() / 4,
            "too few generated statements planned: {}",
            tally.planned - fixed_planned
        );
    }
}
