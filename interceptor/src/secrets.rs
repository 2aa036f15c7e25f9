//! Upstream role passwords, read from a private file or the environment.
//!
//! The client never sees these: interceptor logs in upstream itself (credential offload).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A secret value whose `Debug` never prints it and whose memory is wiped when it is dropped
/// (`secrecy`), compared in constant time.
#[derive(Clone)]
pub(crate) struct Secret(SecretString);

impl Secret {
    pub(crate) fn new(s: impl Into<String>) -> Self {
        Secret(SecretString::from(s.into()))
    }
    pub(crate) fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl Default for Secret {
    fn default() -> Self {
        Secret::new(String::new())
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        crate::identity::scram::constant_time_eq(
            self.expose().as_bytes(),
            other.expose().as_bytes(),
        )
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SecretsError {
    #[error("cannot read secrets file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "secrets file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("invalid secrets file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    #[serde(default)]
    roles: HashMap<String, String>,
    /// Key for deterministic masking pseudonyms (hex or text).
    #[serde(default)]
    pseudonym_key: Option<String>,
}

/// Upstream credentials by role name.
#[derive(Debug, Default, Clone)]
pub(crate) struct Secrets {
    roles: HashMap<String, Secret>,
    pseudonym_key: Option<Secret>,
}

/// Environment variable consulted for a role without an entry in the file.
pub(crate) fn env_var_for(role: &str) -> String {
    let upper: String = role
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("INTERCEPTOR_ROLE_PASSWORD_{upper}")
}

impl Secrets {
    pub(crate) fn load(path: Option<&Path>) -> Result<Secrets, SecretsError> {
        let Some(path) = path else {
            return Ok(Secrets::default());
        };
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| SecretsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: SecretsFile = toml::from_str(&text).map_err(|e| SecretsError::Parse {
            path: path.to_owned(),
            // toml's message quotes the offending line, which may hold a password: keep only
            // the position.
            message: match e.span() {
                Some(span) => format!("syntax error at byte {}", span.start),
                None => "syntax error".into(),
            },
        })?;
        Ok(Secrets {
            roles: file
                .roles
                .into_iter()
                .map(|(k, v)| (k, Secret::new(v)))
                .collect(),
            pseudonym_key: file.pseudonym_key.map(Secret::new),
        })
    }

    /// The password for an upstream role: the file first, then `INTERCEPTOR_ROLE_PASSWORD_<ROLE>`.
    pub(crate) fn password_for(&self, role: &str) -> Option<Secret> {
        self.roles
            .get(role)
            .cloned()
            .or_else(|| std::env::var(env_var_for(role)).ok().map(Secret::new))
    }

    pub(crate) fn pseudonym_key(&self) -> Option<&Secret> {
        self.pseudonym_key.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn refuses_group_readable_file_and_never_prints_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.toml");
        std::fs::write(&path, "[roles]\napp = \"hunter2\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Secrets::load(Some(&path)).unwrap_err();
        assert!(err.to_string().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Secrets::load(Some(&path)).unwrap();
        assert_eq!(s.password_for("app").unwrap().expose(), "hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        std::fs::write(&path, "[roles]\napp = \"hunter2\n").unwrap();
        let err = Secrets::load(Some(&path)).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
