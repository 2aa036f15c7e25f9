//! What a statement is, in the words policy rules use: its kind and its risks. A leaf: the
//! classifier, the tree walks and the rule model all name these.

use serde::{Deserialize, Serialize};

/// What a statement does, from least to most powerful (the order is used when a statement does
/// several things, e.g. a SELECT calling `nextval` is a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    /// SELECT, SHOW, EXPLAIN (without ANALYZE), FETCH, …
    Read,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION.
    Transaction,
    /// SET, RESET, DISCARD, DEALLOCATE, LISTEN.
    Session,
    /// COPY … TO STDOUT.
    CopyTo,
    /// INSERT, UPDATE, DELETE, MERGE, SELECT … FOR UPDATE, LOCK.
    Write,
    /// COPY … FROM STDIN.
    CopyFrom,
    /// VACUUM, ANALYZE, CHECKPOINT, REINDEX, NOTIFY, admin functions.
    Utility,
    /// DO, CALL, EXECUTE of a prepared statement that is unknown.
    Procedural,
    /// CREATE, ALTER, DROP, TRUNCATE, COMMENT.
    Ddl,
    /// GRANT, REVOKE, CREATE/ALTER/DROP ROLE.
    Dcl,
}

impl StatementKind {
    pub const ALL: [StatementKind; 10] = [
        StatementKind::Read,
        StatementKind::Transaction,
        StatementKind::Session,
        StatementKind::CopyTo,
        StatementKind::Write,
        StatementKind::CopyFrom,
        StatementKind::Utility,
        StatementKind::Procedural,
        StatementKind::Ddl,
        StatementKind::Dcl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Read => "read",
            StatementKind::Transaction => "transaction",
            StatementKind::Session => "session",
            StatementKind::CopyTo => "copy_to",
            StatementKind::Write => "write",
            StatementKind::CopyFrom => "copy_from",
            StatementKind::Utility => "utility",
            StatementKind::Procedural => "procedural",
            StatementKind::Ddl => "ddl",
            StatementKind::Dcl => "dcl",
        }
    }
}

/// Risk patterns a rule can match (or, for `allow` rules, must explicitly accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    DeleteWithoutWhere,
    UpdateWithoutWhere,
    Drop,
    Truncate,
    AlterRole,
    AlterSystem,
    CopyProgram,
    CopyFile,
    /// EXECUTE in a DO block or function body, functions in untrusted languages, query_to_xml…
    DynamicSql,
    /// A DO block: code that runs without being a named, reviewable object.
    AnonymousCode,
    /// Server file access: pg_read_file, pg_ls_dir, lo_import/lo_export, LOAD.
    ServerFile,
    LargeObject,
    Dblink,
    /// SET ROLE, RESET ROLE, set_config('role', …).
    SetRole,
    /// SET SESSION AUTHORIZATION, RESET SESSION AUTHORIZATION.
    SessionAuthorization,
    /// Changing search_path changes what unqualified names mean.
    SearchPath,
    /// nextval, setval, advisory locks, pg_notify, …
    SideEffectFunction,
    /// pg_terminate_backend, pg_reload_conf, replication slots, …
    AdminFunction,
    /// A function that is not a PostgreSQL built-in: it may do anything.
    UserFunction,
}
