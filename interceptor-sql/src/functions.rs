//! What calling a function means for policy: built-in or not, and which side effects it has.

use std::collections::HashSet;
use std::sync::OnceLock;

use super::statement::{Risk, StatementKind};

/// Names that sqlparser reports as function calls but PostgreSQL treats as syntax
/// (or maps onto a differently named built-in).
const SYNTAX_FUNCTIONS: &[&str] = &[
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "grouping",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "current_user",
    "current_role",
    "session_user",
    "user",
    "current_catalog",
    "system_user",
    "exists",
    "array",
    "row",
    "cast",
    "treat",
    "any",
    "all",
    "some",
    "xmlelement",
    "xmlforest",
    "xmlattributes",
    "xmlroot",
    "xmlpi",
    "xmlparse",
    "xmlserialize",
    "xmlexists",
    "json_object",
    "json_array",
];

fn builtins() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        include_str!("pg15_builtin_functions.txt")
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .chain(SYNTAX_FUNCTIONS.iter().copied())
            .collect()
    })
}

/// True if an unqualified call of `name` resolves to a PostgreSQL built-in (pg_catalog is
/// searched first, so a user cannot shadow these without schema-qualifying).
pub(crate) fn is_builtin(name: &str) -> bool {
    builtins().contains(name)
}

/// The side effects of calling `name` (the last part of the function name, lower-case):
/// the statement kind it raises the statement to, and the risks it adds. `None` for functions
/// without known side effects.
pub(crate) fn side_effects(name: &str) -> Option<(StatementKind, &'static [Risk])> {
    use Risk::*;
    use StatementKind::*;
    const SIDE: &[Risk] = &[SideEffectFunction];
    const ADMIN: &[Risk] = &[AdminFunction];
    const FILE: &[Risk] = &[ServerFile];
    const LO: &[Risk] = &[LargeObject];
    const LO_FILE: &[Risk] = &[LargeObject, ServerFile];
    const DBLINK: &[Risk] = &[Dblink];
    const DYNAMIC: &[Risk] = &[DynamicSql];
    let effect: (StatementKind, &'static [Risk]) = match name {
        "nextval"
        | "setval"
        | "setseed"
        | "pg_notify"
        | "pg_logical_emit_message"
        | "pg_import_system_collations"
        | "pg_stat_clear_snapshot"
        | "txid_current"
        | "pg_current_xact_id"
        | "brin_summarize_range"
        | "brin_summarize_new_values"
        | "brin_desummarize_range"
        | "gin_clean_pending_list"
        | "pg_export_snapshot" => (Write, SIDE),
        n if n.starts_with("pg_advisory") || n.starts_with("pg_try_advisory") => (Write, SIDE),
        "pg_terminate_backend"
        | "pg_cancel_backend"
        | "pg_reload_conf"
        | "pg_rotate_logfile"
        | "pg_rotate_logfile_old"
        | "pg_promote"
        | "pg_switch_wal"
        | "pg_create_restore_point"
        | "pg_backup_start"
        | "pg_backup_stop"
        | "pg_start_backup"
        | "pg_stop_backup"
        | "pg_wal_replay_pause"
        | "pg_wal_replay_resume"
        | "pg_log_backend_memory_contexts"
        | "pg_stop_making_pinned_objects"
        | "pg_nextoid" => (Utility, ADMIN),
        n if n.starts_with("pg_stat_reset")
            || n.starts_with("pg_replication_origin")
            || n.contains("replication_slot")
            || n.starts_with("pg_logical_slot")
            || n.starts_with("binary_upgrade") =>
        {
            (Utility, ADMIN)
        }
        "pg_read_file"
        | "pg_read_file_old"
        | "pg_read_binary_file"
        | "pg_stat_file"
        | "pg_file_write"
        | "pg_file_rename"
        | "pg_file_unlink"
        | "pg_file_sync"
        | "pg_logdir_ls"
        | "pg_show_all_file_settings"
        | "pg_hba_file_rules"
        | "pg_ident_file_mappings" => (Utility, FILE),
        n if n.starts_with("pg_ls_") => (Utility, FILE),
        "lo_import" | "lo_export" => (Write, LO_FILE),
        n if n.starts_with("lo_") || n == "loread" || n == "lowrite" => (Write, LO),
        n if n.starts_with("dblink") => (Write, DBLINK),
        "query_to_xml"
        | "query_to_xmlschema"
        | "query_to_xml_and_xmlschema"
        | "cursor_to_xml"
        | "cursor_to_xmlschema"
        | "ts_stat"
        | "ts_rewrite" => (Write, DYNAMIC),
        _ => return None,
    };
    Some(effect)
}

/// Risks of `set_config(setting, …)` by the setting's name; `None` means the name is not a
/// literal and so could be anything.
pub(crate) fn set_config_risks(setting: Option<&str>) -> &'static [Risk] {
    match setting.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("role") => &[Risk::SetRole],
        Some("session_authorization") => &[Risk::SessionAuthorization],
        Some("search_path") => &[Risk::SearchPath],
        Some(_) => &[],
        None => &[Risk::SetRole, Risk::SessionAuthorization, Risk::SearchPath],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_list_is_loaded() {
        assert!(is_builtin("pg_get_userbyid"));
        assert!(is_builtin("count"));
        assert!(is_builtin("coalesce"));
        assert!(!is_builtin("my_function"));
        assert!(!is_builtin(
            "# postgresql 15 built-in function names (pg_catalog), from: select distinct lower(proname) from pg_proc where pronamespace = 'pg_catalog'::regnamespace"
        ));
    }

    #[test]
    fn side_effect_table() {
        assert!(side_effects("nextval").is_some());
        assert!(side_effects("pg_read_file").is_some());
        assert!(side_effects("lo_unlink").is_some());
        assert!(side_effects("dblink_exec").is_some());
        assert!(side_effects("lower").is_none());
        assert!(side_effects("currval").is_none());
    }
}
