//! FunctionCall, the protocol's fast path (libpq's `PQfn`, which its large-object API uses, and so
//! pg_dump and pg_restore): a call of a function by OID, outside SQL. The function is looked up
//! by OID in the catalog on a side connection, and the call is then decided, audited and masked
//! as the SQL it stands for: `SELECT "schema"."function"($1, ..., $n)`, the call's arguments
//! being the parameters.

use std::collections::HashMap;

use super::masking::{Side, SideError, SideLogin};
use interceptor_wire::message::{FunctionCallView, PgError, sqlstate};

/// A function as the catalog names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Function {
    pub schema: String,
    pub name: String,
}

impl Function {
    /// The SQL a call with `nargs` arguments stands for.
    pub(crate) fn call_sql(&self, nargs: usize) -> String {
        let args: Vec<String> = (1..=nargs).map(|i| format!("${i}")).collect();
        format!(
            "SELECT {}.{}({})",
            quote_ident(&self.schema),
            quote_ident(&self.name),
            args.join(", ")
        )
    }
}

/// Always quoted: catalog names may be keywords or hold any character.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The catalog query that names the function with `oid`.
fn lookup_sql(oid: u32) -> String {
    format!(
        "SELECT n.nspname, p.proname FROM pg_catalog.pg_proc p \
         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = {oid}"
    )
}

/// Bounds the per-session cache; past it, it starts over.
const MAX_CACHED: usize = 1_000;

/// Resolves function OIDs for one session. Only functions in `pg_catalog` are cached: those
/// cannot be renamed or replaced by the roles sessions log in as, while a user function can be
/// renamed under its OID (`ALTER FUNCTION ... RENAME`), so it is looked up at every call.
pub(crate) struct FunctionCatalog {
    login: SideLogin,
    side: Side,
    builtins: HashMap<u32, Function>,
}

impl FunctionCatalog {
    /// Nothing is opened until the first call needs a lookup.
    pub(crate) fn new(login: SideLogin) -> Self {
        FunctionCatalog {
            login,
            side: Side::new(),
            builtins: HashMap::new(),
        }
    }

    /// The function with `oid`; `Ok(None)` when the catalog has none (for the side connection:
    /// one created in the session's open transaction is not visible yet).
    pub(crate) async fn resolve(&mut self, oid: u32) -> Result<Option<Function>, SideError> {
        if let Some(f) = self.builtins.get(&oid) {
            return Ok(Some(f.clone()));
        }
        let rows = self.side.rows(&self.login, &lookup_sql(oid)).await?;
        let function = match rows.as_slice() {
            [] => None,
            [row] => match row.as_slice() {
                [Some(schema), Some(name)] => Some(Function {
                    schema: schema.clone(),
                    name: name.clone(),
                }),
                _ => return Err(SideError::Malformed),
            },
            _ => return Err(SideError::Malformed),
        };
        if let Some(f) = &function
            && f.schema == "pg_catalog"
        {
            if self.builtins.len() >= MAX_CACHED {
                self.builtins.clear();
            }
            self.builtins.insert(oid, f.clone());
        }
        Ok(function)
    }
}

/// Why a call could not be decided (the client gets this error; the session goes on).
pub(crate) fn unresolved(
    oid: u32,
    result: Result<Option<Function>, SideError>,
) -> Result<Function, PgError> {
    match result {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(PgError::error(
            UNDEFINED_FUNCTION,
            format!("function with OID {oid} does not exist"),
        )
        .with_detail(
            "interceptor looks fast-path calls up in the catalog on its own connection, which \
             does not see a function created in this session's open transaction",
        )
        .with_hint("commit first, or call the function with SELECT")),
        Err(e) => {
            tracing::warn!(error = %e, oid, "fast-path call: function lookup failed");
            Err(PgError::error(
                sqlstate::INTERNAL_ERROR,
                format!(
                    "interceptor: the function with OID {oid} could not be looked up, so the \
                     fast-path call cannot be decided ({e})"
                ),
            )
            .with_hint("retry; if it persists, call the function with SELECT"))
        }
    }
}

const UNDEFINED_FUNCTION: &str = "42883";

/// The arguments as the audit trail records them: text as it is, binary as hex, NULL as
/// `None`; `mask` replaces what a content detector finds.
pub(crate) fn recorded_arguments(
    call: &FunctionCallView<'_>,
    mask: impl Fn(&[u8], bool) -> String,
) -> Vec<Option<String>> {
    call.args
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.map(|v| {
                // Format codes: none = all text, one = for all, else one each.
                let binary = match call.arg_formats.len() {
                    0 => false,
                    1 => call.arg_formats[0] == 1,
                    _ => call.arg_formats.get(i) == Some(&1),
                };
                mask(v, binary)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_sql_names_the_function_and_its_arguments() {
        let f = Function {
            schema: "pg_catalog".into(),
            name: "lo_open".into(),
        };
        assert_eq!(f.call_sql(2), r#"SELECT "pg_catalog"."lo_open"($1, $2)"#);
        assert_eq!(f.call_sql(0), r#"SELECT "pg_catalog"."lo_open"()"#);
        let odd = Function {
            schema: "we\"ird".into(),
            name: "select".into(),
        };
        assert_eq!(odd.call_sql(1), r#"SELECT "we""ird"."select"($1)"#);
    }

    #[test]
    fn the_stand_in_sql_is_classified_as_a_call_of_that_function() {
        use interceptor_sql::statement::{Risk, StatementKind};
        let f = Function {
            schema: "pg_catalog".into(),
            name: "lowrite".into(),
        };
        let c = interceptor_sql::classify::classify(
            &f.call_sql(2),
            interceptor_sql::lexer::LexSettings::default(),
        )
        .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, StatementKind::Write);
        assert!(c[0].risks.contains(&Risk::LargeObject), "{c:?}");
    }

    #[test]
    fn arguments_are_recorded_by_format() {
        let body = {
            let mut b = Vec::new();
            b.extend_from_slice(&42i32.to_be_bytes());
            b.extend_from_slice(&2u16.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&0i16.to_be_bytes());
            b.extend_from_slice(&3u16.to_be_bytes());
            for v in [&[0u8, 0, 0, 7][..], b"x"] {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes());
            b
        };
        // Two format codes for three arguments: malformed, as PostgreSQL says too.
        assert!(interceptor_wire::message::decode_function_call(&body).is_err());
        let mut ok = body.clone();
        // One format code (binary) for all.
        ok.splice(
            4..10,
            1u16.to_be_bytes().into_iter().chain(1i16.to_be_bytes()),
        );
        let call = interceptor_wire::message::decode_function_call(&ok).unwrap();
        assert_eq!(call.function, 42);
        let rec = recorded_arguments(&call, |v, binary| {
            if binary {
                format!("\\x{}", hex::encode(v))
            } else {
                String::from_utf8_lossy(v).into_owned()
            }
        });
        assert_eq!(
            rec,
            vec![
                Some("\\x00000007".to_owned()),
                Some("\\x78".to_owned()),
                None
            ]
        );
        // Truncated or negative lengths are errors, never panics.
        for cut in 0..ok.len() {
            assert!(interceptor_wire::message::decode_function_call(&ok[..cut]).is_err());
        }
    }
}
