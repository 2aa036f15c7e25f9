//! A loaded, validated set of policies: the API the proxy calls (route at login, decide per
//! query), with a per-set classification cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use super::decide::{decide_statements, identity_matches, unparseable_decision};
use super::error::PolicyError;
use super::load::{parse_policy, policy_files};
use super::model::Limits;
use super::session::SessionStatements;
use crate::identity::Identity;
use interceptor_sql::classify::{Classified, Unclassifiable, classify_tree};
use interceptor_sql::lexer::LexSettings;
use interceptor_sql::pgparse::Tree;

use super::rules::{DecidedStatements, Decision, Policy, Verdict};

static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// Classification results kept per policy set (bounded; cleared when full).
const CACHE_ENTRIES: usize = 4096;
/// Longer texts are classified every time rather than kept (bounds the cache's memory).
const CACHE_MAX_SQL_BYTES: usize = 16 * 1024;
/// Parse trees are kept with classifications only for texts up to this size, and only up to
/// this much text in all. A tree takes 200 to 500 times its text's size in memory (measured:
/// 20 KB for a 52-byte SELECT, 0.9 MB for a 2 KB one), so the cache's trees stay under about
/// 16 MB; the rest of a cache that has used up the budget is kept without trees.
const CACHE_TREE_MAX_SQL_BYTES: usize = 2 * 1024;
const CACHE_TREES_SQL_BYTES: usize = 32 * 1024;

type Cached = Arc<Result<Vec<Classified>, Unclassifiable>>;

/// The classification cache: entries by key, and how much text the kept trees stand for.
#[derive(Debug, Default)]
struct Cache {
    /// By `standard_conforming_strings` (off, on): the same text lexes differently.
    entries: [HashMap<String, CacheEntry>; 2],
    tree_sql_bytes: usize,
}

impl Cache {
    fn get(&self, key: &str, standard_conforming_strings: bool) -> Option<&CacheEntry> {
        self.entries[usize::from(standard_conforming_strings)].get(key)
    }

    fn insert(
        &mut self,
        key: String,
        standard_conforming_strings: bool,
        entry: CacheEntry,
    ) -> Option<CacheEntry> {
        self.entries[usize::from(standard_conforming_strings)].insert(key, entry)
    }

    fn len(&self) -> usize {
        self.entries.iter().map(HashMap::len).sum()
    }

    fn clear(&mut self) {
        self.entries.iter_mut().for_each(HashMap::clear);
        self.tree_sql_bytes = 0;
    }

    /// The entry for `key` as the classification of `sql`, with the tree when it is this very
    /// text's.
    fn hit(&self, key: &str, sql: &str, scs: bool) -> Option<(Cached, Option<Arc<Tree>>)> {
        let hit = self.get(key, scs)?;
        let tree = hit.tree.as_ref().and_then(|t| {
            let same = match &t.text {
                None => key == sql,
                Some(text) => **text == *sql,
            };
            same.then(|| t.tree.clone())
        });
        Some((hit.classified.clone(), tree))
    }
}

/// A cached classification and, for a short text, PostgreSQL's parse tree of it (the masking
/// rewrite and the COPY masker read it). The tree is handed out only for the very text it was
/// parsed from (the key hides numbers, and the rewrite edits the text at the tree's
/// positions), so a repeated statement is parsed once in all; a text that only shares the
/// shape gets no tree, and whoever needs one parses it.
#[derive(Debug)]
struct CacheEntry {
    classified: Cached,
    tree: Option<CachedTree>,
}

#[derive(Debug)]
struct CachedTree {
    tree: Arc<Tree>,
    /// The text the tree was parsed from, when it differs from the key (it had numbers).
    text: Option<Box<str>>,
}

/// All policies of a directory, in evaluation order.
#[derive(Debug)]
pub(crate) struct PolicySet {
    policies: Vec<Policy>,
    version: u64,
    dir: PathBuf,
    cache: Mutex<Cache>,
    /// Some policy masks: trees are worth keeping for the masking rewrite.
    keep_trees: bool,
}

/// Where a session logs in upstream, and the limits that apply to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Route {
    pub policy: String,
    pub upstream_role: String,
    pub limits: Limits,
    /// The policy's raw `[mask]` rules (for the masking module).
    pub mask: Vec<toml::Value>,
}

/// A login refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Refusal {
    pub sqlstate: String,
    pub message: String,
}

impl PolicySet {
    /// Loads every `*.toml` (except `*.tests.toml`) in `dir`. Any error fails the whole load.
    pub(crate) fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        let mut policies = Vec::new();
        let mut names: HashMap<String, String> = HashMap::new();
        for path in policy_files(dir)? {
            let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::io(&path, e))?;
            let policy = parse_policy(&path, &text)?;
            if let Some(other) = names.insert(policy.name.clone(), path.display().to_string()) {
                return Err(PolicyError::Invalid {
                    path: path.clone(),
                    line: 1,
                    column: 1,
                    message: format!("policy name {:?} is also used by {other}", policy.name),
                });
            }
            policies.push(policy);
        }
        policies.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        let keep_trees = policies.iter().any(|p| p.mask.is_some());
        Ok(PolicySet {
            policies,
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            dir: dir.to_owned(),
            cache: Mutex::new(Cache::default()),
            keep_trees,
        })
    }

    /// A set without policies: every login is refused and every statement denied (for a
    /// daemon started without a policy directory: fail closed).
    pub(crate) fn empty() -> PolicySet {
        PolicySet {
            policies: Vec::new(),
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            dir: PathBuf::new(),
            cache: Mutex::new(Cache::default()),
            keep_trees: false,
        }
    }

    /// Changes on each successful load (a cache key for the proxy).
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The policy that applies to `who` on `database`: the first (by priority, then name)
    /// whose identity match and database list both fit.
    pub(crate) fn policy_for(&self, who: &Identity, database: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| {
            identity_matches(&p.identities, who) && p.databases.iter().any(|d| d.matches(database))
        })
    }

    /// At login: which upstream role to use, or a refusal.
    pub(crate) fn route(&self, who: &Identity, database: &str) -> Result<Route, Refusal> {
        match self.policy_for(who, database) {
            Some(p) => Ok(Route {
                policy: p.name.clone(),
                upstream_role: p.upstream_role.clone(),
                limits: p.limits.clone(),
                mask: mask_values(p.mask.as_ref()),
            }),
            None => Err(Refusal {
                sqlstate: "28000".to_owned(),
                message: format!(
                    "no policy allows identity {:?} to connect to database {database:?}; \
                     ask the security team to add it to a policy in {}",
                    who.subject,
                    self.dir.display()
                ),
            }),
        }
    }

    /// The raw `[mask]` rules of the policy that applies to `who` on `database`.
    #[cfg(test)]
    pub(crate) fn mask_rules_for(&self, who: &Identity, database: &str) -> Vec<toml::Value> {
        self.policy_for(who, database)
            .map(|p| mask_values(p.mask.as_ref()))
            .unwrap_or_default()
    }

    /// Decides every statement of one Query / Parse text (no prepared statements known).
    pub(crate) fn decide(
        &self,
        who: &Identity,
        database: &str,
        sql: &str,
        lex: &LexSettings,
    ) -> Decision {
        self.decide_in_session(who, database, sql, lex, &SessionStatements::new())
    }

    /// As [`PolicySet::decide`], resolving `EXECUTE name` through the session's prepared
    /// statements (feed it with [`SessionStatements::observe`]).
    pub(crate) fn decide_in_session(
        &self,
        who: &Identity,
        database: &str,
        sql: &str,
        lex: &LexSettings,
        session: &SessionStatements,
    ) -> Decision {
        self.decide_at(who, database, sql, lex, session, SystemTime::now())
    }

    /// As [`PolicySet::decide_in_session`] at a given time (for rules with windows).
    pub(crate) fn decide_at(
        &self,
        who: &Identity,
        database: &str,
        sql: &str,
        lex: &LexSettings,
        session: &SessionStatements,
        now: SystemTime,
    ) -> Decision {
        let (classified, tree) = self.classify_cached(sql, lex);
        let Some(policy) = self.policy_for(who, database) else {
            return Decision {
                verdict: Verdict::Deny {
                    sqlstate: "42501".to_owned(),
                    message: format!(
                        "interceptor: no policy covers identity {:?} on database {database:?}",
                        who.subject
                    ),
                },
                rule: None,
                policy: None,
                statements: DecidedStatements::shared(classified.clone()),
                statement_rules: Vec::new(),
                syntax_position: None,
                tree: None,
            };
        };
        match classified.as_ref() {
            Ok(_) => {}
            // Nothing but whitespace, `;` and comments: PostgreSQL runs nothing and answers
            // EmptyQueryResponse. Drivers and pools send these as pings.
            Err(interceptor_sql::classify::Unclassifiable::Empty) => {
                return Decision {
                    verdict: Verdict::Allow,
                    rule: Some("empty query".to_owned()),
                    policy: Some(policy.name.clone()),
                    statements: DecidedStatements::default(),
                    statement_rules: Vec::new(),
                    syntax_position: None,
                    tree: None,
                };
            }
            Err(e) => return unparseable_decision(policy, e),
        }
        Decision {
            tree,
            ..decide_statements(policy, DecidedStatements::shared(classified), session, now)
        }
    }

    /// The classification of `sql`, from the cache when this shape was seen; with the parse
    /// tree when it was parsed now, or when the cache holds the tree of this very text.
    fn classify_cached(&self, sql: &str, lex: &LexSettings) -> (Cached, Option<Arc<Tree>>) {
        if sql.len() > CACHE_MAX_SQL_BYTES {
            return classify_now(sql, lex);
        }
        let scs = lex.standard_conforming_strings;
        // A poisoned lock only means another thread panicked mid-insert; the map is still sound.
        let cache = || self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // A text without numeric literals is its own key (a key has a NUL where a number was,
        // a text never has one), so a repeat of it is found without lexing it: what drivers
        // that bind parameters send.
        if let Some(found) = cache().hit(sql, sql, scs) {
            return found;
        }
        let key = cache_key(sql, lex);
        if key != sql
            && let Some(found) = cache().hit(&key, sql, scs)
        {
            return found;
        }
        let (result, tree) = classify_now(sql, lex);
        // Secret spans are byte offsets in this text; the key hides numbers, whose length may
        // differ in a text with the same key, so such results are not shared.
        if let Ok(statements) = result.as_ref()
            && statements
                .iter()
                .any(|c| !c.secrets.is_empty() || c.secret_unplaced)
        {
            return (result, tree);
        }
        let mut cache = cache();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        let cached_tree = tree
            .as_ref()
            .filter(|_| {
                self.keep_trees
                    && sql.len() <= CACHE_TREE_MAX_SQL_BYTES
                    && cache.tree_sql_bytes + sql.len() <= CACHE_TREES_SQL_BYTES
            })
            .map(|t| CachedTree {
                tree: t.clone(),
                text: (key != sql).then(|| sql.into()),
            });
        if cached_tree.is_some() {
            cache.tree_sql_bytes += sql.len();
        }
        let entry = CacheEntry {
            classified: result.clone(),
            tree: cached_tree,
        };
        let key_len = key.len();
        if let Some(CacheEntry {
            tree: Some(old), ..
        }) = cache.insert(key, scs, entry)
        {
            // Two sessions classified the same shape at once: the first one's tree is gone.
            let old_len = old.text.map_or(key_len, |t| t.len());
            cache.tree_sql_bytes = cache.tree_sql_bytes.saturating_sub(old_len);
        }
        (result, tree)
    }
}

/// Classifies `sql` (PostgreSQL's parser runs once), keeping the tree apart from the result.
fn classify_now(sql: &str, lex: &LexSettings) -> (Cached, Option<Arc<Tree>>) {
    match classify_tree(sql, *lex) {
        Ok((statements, tree)) => (Arc::new(Ok(statements)), Some(Arc::new(tree))),
        Err(e) => (Arc::new(Err(e)), None),
    }
}

/// The classification cache key: the text with every numeric literal token replaced by a marker.
/// What a statement does (kind, tables, functions, risks) never depends on the value of a number,
/// and drivers that inline values (pgbench `-M simple`, ORMs) send the same statement shape with
/// different numbers over and over. The tokens come from the same PostgreSQL-faithful lexer
/// that splits statements, so a number inside a string, identifier or comment is not a token.
fn cache_key(sql: &str, lex: &LexSettings) -> String {
    let Ok(tokens) = interceptor_sql::lexer::tokenize(sql, *lex) else {
        return sql.to_owned();
    };
    let mut key = String::with_capacity(sql.len());
    let mut at = 0;
    for t in tokens
        .iter()
        .filter(|t| t.kind == interceptor_sql::lexer::TokKind::Number)
    {
        if t.span.start < at || t.span.end > sql.len() {
            return sql.to_owned();
        }
        key.push_str(&sql[at..t.span.start]);
        // NUL never occurs in query text (the protocol cannot carry it), so it cannot collide.
        key.push('\0');
        at = t.span.end;
    }
    key.push_str(&sql[at..]);
    key
}

fn mask_values(mask: Option<&toml::Value>) -> Vec<toml::Value> {
    match mask {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items.clone(),
        Some(v) => vec![v.clone()],
    }
}

#[cfg(test)]
mod cache_key_tests {
    use super::*;

    const ON: LexSettings = LexSettings {
        standard_conforming_strings: true,
    };

    #[test]
    fn only_numeric_literal_tokens_are_normalized() {
        assert_eq!(
            cache_key("SELECT abalance FROM a WHERE aid = 42", &ON),
            cache_key("SELECT abalance FROM a WHERE aid = 7", &ON)
        );
        // Digits inside names, strings, quoted identifiers and comments are the statement.
        for (a, b) in [
            ("SELECT * FROM t1", "SELECT * FROM t2"),
            ("SELECT 'a1'", "SELECT 'a2'"),
            ("SELECT * FROM \"x 1\"", "SELECT * FROM \"x 2\""),
            ("SELECT 1 /* 1 */", "SELECT 1 /* 2 */"),
            ("SELECT $$1$$", "SELECT $$2$$"),
        ] {
            assert_ne!(cache_key(a, &ON), cache_key(b, &ON), "{a} vs {b}");
        }
    }
}
