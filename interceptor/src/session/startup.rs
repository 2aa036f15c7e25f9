//! The startup phase: TLS and GSS negotiation, then a StartupMessage or a CancelRequest.

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::net::reader::FrameReader;
use crate::net::stream::Stream;
use interceptor_wire::frame::FrameError;
use interceptor_wire::message::{self, PgError, sqlstate};

/// Startup packets are small; PostgreSQL caps them at 10 000 bytes as well.
const MAX_STARTUP: usize = 10_000;

const PROTOCOL_3_0: i32 = 3 << 16;
const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// What the client asked for.
pub(crate) enum Opening {
    Startup {
        stream: Stream,
        reader: FrameReader,
        params: Vec<(String, String)>,
        /// Options we did not understand (`_pq_.*`) or a newer minor version: answered with
        /// NegotiateProtocolVersion once authentication succeeds.
        negotiate: Option<(i32, Vec<String>)>,
    },
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// The client went away before saying anything useful.
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StartupError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Refused(String),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// Runs the startup phase. Refusals are sent to the client as FATAL before returning the error.
pub(crate) async fn negotiate(
    mut stream: Stream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    require_tls: bool,
    max_message: usize,
) -> Result<Opening, StartupError> {
    let mut reader = FrameReader::new(max_message);
    loop {
        let Some(packet) = reader.read_startup(&mut stream, MAX_STARTUP).await? else {
            return Ok(Opening::Closed);
        };
        if packet.len() < 4 {
            return refuse(&mut stream, "startup packet too short").await;
        }
        let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
        match code {
            SSL_REQUEST if packet.len() == 4 => {
                let acceptor = match (tls, &stream) {
                    (Some(a), Stream::Tcp(_)) => a,
                    _ => {
                        stream.write_all(b"N").await.map_err(FrameError::Io)?;
                        continue;
                    }
                };
                // Bytes sent after SSLRequest but before the handshake would be trusted as if
                // they came over TLS (CVE-2021-23214): refuse them.
                if reader.buffered() > 0 {
                    return refuse(&mut stream, "unexpected data after SSLRequest").await;
                }
                stream.write_all(b"S").await.map_err(FrameError::Io)?;
                let Stream::Tcp(tcp) = stream else {
                    return Err(StartupError::Refused("TLS over a non-TCP stream".into()));
                };
                let tls_stream = acceptor.accept(tcp).await.map_err(StartupError::Tls)?;
                stream = Stream::TlsServer(Box::new(tls_stream));
            }
            GSSENC_REQUEST if packet.len() == 4 => {
                stream.write_all(b"N").await.map_err(FrameError::Io)?;
            }
            CANCEL_REQUEST if packet.len() == 12 => {
                let pid = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                let secret = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
                return Ok(Opening::Cancel { pid, secret });
            }
            // A known request code with the wrong length: name it (it is not a protocol version).
            CANCEL_REQUEST | SSL_REQUEST | GSSENC_REQUEST => {
                let (what, expected) = match code {
                    CANCEL_REQUEST => ("CancelRequest", 16),
                    SSL_REQUEST => ("SSLRequest", 8),
                    _ => ("GSSENCRequest", 8),
                };
                return refuse(
                    &mut stream,
                    &format!(
                        "malformed {what}: {} bytes, expected {expected}",
                        packet.len() + 4
                    ),
                )
                .await;
            }
            version if version >> 16 == 3 => {
                return startup(stream, reader, packet, version, require_tls).await;
            }
            _ => {
                return refuse(
                    &mut stream,
                    &format!(
                        "unsupported frontend protocol {}.{}: interceptor speaks 3.0",
                        code >> 16,
                        code & 0xffff
                    ),
                )
                .await;
            }
        }
    }
}

async fn startup(
    mut stream: Stream,
    reader: FrameReader,
    packet: Bytes,
    version: i32,
    require_tls: bool,
) -> Result<Opening, StartupError> {
    if require_tls && !stream.is_tls() {
        let err = PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "interceptor requires TLS: connect with sslmode=require or stronger",
        );
        let _ = stream.write_all(&err.encode()).await;
        return Err(StartupError::Refused("plaintext connection refused".into()));
    }
    let all = match message::decode_startup_params(&packet[4..]) {
        Ok(p) => p,
        Err(_) => return refuse(&mut stream, "malformed startup packet").await,
    };
    let (unrecognized, params): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|(k, _)| k.starts_with("_pq_."));
    let unrecognized: Vec<String> = unrecognized.into_iter().map(|(k, _)| k).collect();
    let negotiate =
        (version != PROTOCOL_3_0 || !unrecognized.is_empty()).then_some((0, unrecognized));
    Ok(Opening::Startup {
        stream,
        reader,
        params,
        negotiate,
    })
}

async fn refuse<T>(stream: &mut Stream, why: &str) -> Result<T, StartupError> {
    let err = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, why);
    let _ = stream.write_all(&err.encode()).await;
    Err(StartupError::Refused(why.to_owned()))
}

/// Startup parameters that are not settings: they say who connects where, or how.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

/// Settings drivers send on every connection to fix the wire format: always forwarded (unless a
/// policy pins or forbids them), whatever the statement rules say about `SET`.
const PROTOCOL_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
];

/// Settings refused at startup unless a policy's `[limits.startup] allow` names them: they change
/// the session's identity or load code into the backend, which no statement rule could see.
const REFUSED_BY_DEFAULT: &[&str] = &[
    "role",
    "session_authorization",
    "local_preload_libraries",
    "session_preload_libraries",
    "shared_preload_libraries",
    "dynamic_library_path",
];

/// A startup parameter refused by policy: the client gets a FATAL naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SettingRefused {
    pub sqlstate: &'static str,
    pub message: String,
    pub hint: String,
}

/// Splits libpq `options` (`-c name=value`, `--name=value`, backslash escapes a character) into
/// settings. Anything else is refused: other server switches have no place in a proxied session.
pub(crate) fn parse_options(options: &str) -> Result<Vec<(String, String)>, SettingRefused> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    let refuse = |what: &str| SettingRefused {
        sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
        message: format!("startup option {what:?} is not allowed through interceptor"),
        hint:
            "only `-c name=value` (or `--name=value`) settings may be given in `options`/PGOPTIONS"
                .into(),
    };
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let assignment = if w == "-c" {
            it.next().ok_or_else(|| refuse("-c"))?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err(refuse(&w));
        };
        let Some((name, value)) = assignment.split_once('=') else {
            return Err(refuse(&w));
        };
        // PostgreSQL accepts `-c work-mem=...` for `work_mem`.
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

/// Is this a name PostgreSQL could take for a setting (also `prefix.custom`)?
fn valid_setting_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '$')
}

/// The settings to send upstream for a client's startup parameters, decided by policy: pinned
/// values always, forbidden names never, identity changes only where allowed, and every other
/// setting as the policy decides the equivalent `SET name TO 'value'`.
pub(crate) fn decide_settings(
    params: &[(String, String)],
    policies: &crate::policy::PolicySet,
    identity: &crate::identity::Identity,
    database: &str,
    route: &crate::policy::Route,
) -> Result<Vec<(String, String)>, SettingRefused> {
    let rules = &route.limits.startup;
    let policy = &route.policy;
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    // `options` first: PostgreSQL applies the packet's own parameters after it, so they win.
    let mut asked: Vec<(String, String)> = match get("options") {
        Some(o) => parse_options(o)?,
        None => Vec::new(),
    };
    asked.extend(
        params
            .iter()
            .filter(|(k, _)| !NOT_SETTINGS.contains(&k.as_str()))
            .cloned(),
    );
    let mut chosen: Vec<(String, String)> = Vec::new();
    for (name, value) in asked {
        let lname = name.to_ascii_lowercase();
        if !valid_setting_name(&lname) {
            return Err(SettingRefused {
                sqlstate: sqlstate::PROTOCOL_VIOLATION,
                message: format!("invalid startup parameter name {name:?}"),
                hint: "setting names are letters, digits, `_`, `.` and `$`".into(),
            });
        }
        let named = |list: &[String]| list.iter().any(|n| n.eq_ignore_ascii_case(&lname));
        if named(&rules.forbid) {
            return Err(SettingRefused {
                sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                message: format!(
                    "interceptor: startup setting \"{lname}\" is forbidden by policy {policy:?}"
                ),
                hint: format!(
                    "connect without setting {lname} (PGOPTIONS, options, server_settings)"
                ),
            });
        }
        // The policy's statement timeout is a pin too: a client cannot start above it.
        let pinned: Option<String> = rules
            .pin
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(&lname))
            .map(|(_, v)| v.clone())
            .or_else(|| {
                route
                    .limits
                    .statement_timeout_ms
                    .filter(|_| lname == "statement_timeout")
                    .map(|ms| ms.to_string())
            });
        if let Some(pin) = pinned {
            if value != pin {
                return Err(SettingRefused {
                    sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                    message: format!(
                        "interceptor: startup setting \"{lname}\" is pinned to {pin:?} by policy \
                         {policy:?}; the client asked for {value:?}"
                    ),
                    hint: format!("connect without setting {lname}, or with {lname}={pin}"),
                });
            }
            continue;
        }
        if PROTOCOL_SETTINGS.contains(&lname.as_str()) {
            chosen.retain(|(k, _)| *k != lname);
            chosen.push((lname, value));
            continue;
        }
        if REFUSED_BY_DEFAULT.contains(&lname.as_str()) && !named(&rules.allow) {
            return Err(SettingRefused {
                sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                message: format!(
                    "interceptor: startup setting \"{lname}\" is not allowed: it changes the \
                     session's identity or loads code"
                ),
                hint: format!(
                    "policy {policy:?} can allow it with [limits.startup] allow = [\"{lname}\"]"
                ),
            });
        }
        let sql = format!("SET {lname} TO '{}'", value.replace('\'', "''"));
        let decision = policies.decide(
            identity,
            database,
            &sql,
            &interceptor_sql::lexer::LexSettings::default(),
        );
        match decision.verdict {
            crate::policy::Verdict::Allow => {}
            crate::policy::Verdict::Deny { message, .. } => {
                return Err(SettingRefused {
                    sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                    message: format!("startup setting \"{lname}\" refused: {message}"),
                    hint: "a startup setting is decided like the SET statement it stands for"
                        .into(),
                });
            }
            crate::policy::Verdict::Approve { rule, .. } => {
                return Err(SettingRefused {
                    sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                    message: format!(
                        "interceptor: startup setting \"{lname}\" needs approval (rule {rule:?} \
                         of policy {policy:?}), which a login cannot wait for"
                    ),
                    hint: format!("connect without it and run SET {lname} in the session"),
                });
            }
        }
        chosen.retain(|(k, _)| *k != lname);
        chosen.push((lname, value));
    }
    for (k, v) in &rules.pin {
        let k = k.to_ascii_lowercase();
        chosen.retain(|(n, _)| *n != k);
        chosen.push((k, v.clone()));
    }
    if let Some(ms) = route.limits.statement_timeout_ms {
        // The policy's limit is the session's starting value on the server.
        chosen.retain(|(n, _)| n != "statement_timeout");
        chosen.push(("statement_timeout".into(), ms.to_string()));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_split_like_postgres_does() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=4MB").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "4MB".into()),
            ]
        );
        assert_eq!(
            parse_options(r"-c application_name=two\ words").unwrap(),
            vec![("application_name".into(), "two words".into())]
        );
        assert!(parse_options("-D /tmp").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c novalue").is_err());
        assert_eq!(parse_options("  ").unwrap(), vec![]);
    }

    #[test]
    fn setting_names_cannot_smuggle_sql() {
        assert!(valid_setting_name("search_path"));
        assert!(valid_setting_name("myapp.tenant"));
        assert!(!valid_setting_name("x; DROP TABLE t"));
        assert!(!valid_setting_name("1abc"));
        assert!(!valid_setting_name(""));
    }
}
