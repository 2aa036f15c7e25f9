//! Live-session requests on the admin socket (beside the audit ones):
//! `{"op":"live_sessions"}` and `{"op":"kill_session","id":N}`.

use std::sync::Arc;

use crate::audit::admin::{Extension, ExtensionFuture};
use crate::session::shared::ServerState;

pub(crate) fn extension(state: Arc<ServerState>) -> Extension {
    Arc::new(move |req: serde_json::Value| -> ExtensionFuture {
        let state = state.clone();
        Box::pin(async move { handle(&state, req).await })
    })
}

async fn handle(state: &ServerState, req: serde_json::Value) -> Result<serde_json::Value, String> {
    match req.get("op").and_then(|o| o.as_str()) {
        Some("live_sessions") => serde_json::to_value(state.live.list()).map_err(|e| e.to_string()),
        Some("kill_session") => {
            let id = req
                .get("id")
                .and_then(|v| v.as_u64())
                .ok_or("kill_session needs a numeric \"id\"")?;
            let running = state.live.kill(id, "admin socket")?;
            tracing::warn!(
                session = id,
                "session killed by an administrator (admin socket)"
            );
            if let Some((pid, secret)) = running
                && let Err(e) = state.upstream.cancel(pid, secret).await
            {
                tracing::warn!(session = id, error = %e, "could not cancel the killed session's statement");
            }
            Ok(serde_json::json!({ "killed": id, "cancelled_statement": running.is_some() }))
        }
        Some(op) => Err(format!("unknown op `{op}`")),
        None => Err("missing \"op\"".into()),
    }
}
