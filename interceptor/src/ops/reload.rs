//! SIGHUP: the policies are reloaded and the configuration file is read again and checked; the
//! identities and the secrets file apply to new sessions at once (see
//! `ServerState::reload_credentials`); other sections that changed only take effect at a start
//! and are named in the log.

use std::path::Path;

use crate::config::Config;
use crate::session::shared::ServerState;

/// The top-level sections whose values differ between `old` and `new`.
pub(crate) fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    macro_rules! cmp {
        ($($field:ident => $name:literal),* $(,)?) => {
            $(if format!("{:?}", old.$field) != format!("{:?}", new.$field) {
                out.push($name);
            })*
        };
    }
    cmp!(
        listen => "listen",
        tls => "tls",
        upstream => "upstream",
        secrets => "secrets",
        identities => "identity",
        audit => "audit",
        policy => "policy",
        admin => "admin",
        limits => "limits",
        oidc => "oidc",
        mtls => "mtls",
        approvals => "approvals",
        ebpf => "ebpf",
        metrics => "metrics",
    );
    out
}

/// Handles one SIGHUP.
pub(crate) fn reload(state: &ServerState, config_path: Option<&Path>) {
    super::notify::reloading();
    let outcome = |ok: bool| {
        crate::metrics::METRICS
            .reloads
            .get_or_create(&crate::metrics::EventLabels {
                event: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    };
    let mut ok = true;
    if let Some(path) = config_path {
        match Config::load(path)
            .map_err(anyhow::Error::from)
            .and_then(|c| {
                let loaded = crate::session::shared::Loaded::load(&c)?;
                Ok((c, loaded))
            }) {
            Ok((new, loaded)) => {
                let applied = state.reload_credentials(&new, loaded);
                tracing::info!(config = %path.display(), sections = ?applied, "reload: applied to new sessions");
                let changed: Vec<&str> = changed_sections(&state.config, &new)
                    .into_iter()
                    .filter(|s| !applied.contains(s))
                    .collect();
                if changed.is_empty() {
                    tracing::info!(config = %path.display(), "reload: nothing else changed");
                } else {
                    tracing::warn!(
                        config = %path.display(),
                        sections = ?changed,
                        "reload: these configuration sections changed and take effect only after a restart (systemctl restart interceptor); the running values are kept"
                    );
                }
            }
            Err(e) => {
                ok = false;
                tracing::error!(config = %path.display(), error = %format!("{e:#}"), "reload: the configuration file is invalid; keeping the running configuration");
            }
        }
    }
    match &state.config.policy {
        Some(p) => match state.policy.reload(&p.dir) {
            crate::policy::PolicyEvent::Reloaded { .. } => {}
            crate::policy::PolicyEvent::ReloadFailed { .. } => ok = false,
        },
        None => tracing::info!("reload: no [policy] configured"),
    }
    outcome(ok);
    super::notify::ready("reloaded");
}
