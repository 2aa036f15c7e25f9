//! Which password methods interceptor answers when it logs in upstream (`[upstream] auth`, like
//! libpq's `require_auth`): SCRAM or no challenge by default; MD5 and cleartext only when listed
//! and never over unencrypted TCP. Each case runs against a real cluster configured for that
//! method, and the refusal reaches the client as a FATAL naming the method and the setting.

use interceptor_tests::{HbaAuth, Interceptor, InterceptorSetup, PgCluster, PgOptions};

const AGENT: &str = "agent";
const AGENT_PASSWORD: &str = "agent-Upstream-Auth-5";

fn start(pg: &PgCluster, f: impl FnOnce(InterceptorSetup) -> InterceptorSetup) -> Interceptor {
    let setup = InterceptorSetup::new(pg).allow_all_policies().identity(
        AGENT,
        AGENT_PASSWORD,
        &["dev"],
        Some("app_rw"),
    );
    Interceptor::start(f(setup)).unwrap()
}

async fn login(proxy: &Interceptor) -> Result<String, tokio_postgres::Error> {
    let c = proxy.params(AGENT).connect().await?;
    let row = c.query_one("SELECT current_user::text", &[]).await?;
    Ok(row.get(0))
}

fn fatal_text(e: &tokio_postgres::Error) -> String {
    let db = e
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert_eq!(db.severity(), "FATAL", "{db:?}");
    format!("{} {}", db.message(), db.detail().unwrap_or_default())
}

#[tokio::test]
async fn md5_is_refused_unless_listed_and_works_over_the_unix_socket_when_listed() {
    let pg = PgCluster::start_with(PgOptions::default().auth(HbaAuth::Md5)).unwrap();

    let default = start(&pg, |s| s);
    let e = login(&default).await.unwrap_err();
    let text = fatal_text(&e);
    assert!(
        text.contains("md5") && text.contains("[upstream] auth"),
        "{text}"
    );
    drop(default);

    let allowed = start(&pg, |s| s.upstream_auth(&["md5"]));
    assert_eq!(login(&allowed).await.unwrap(), "app_rw");
    drop(allowed);

    // Listed, but PostgreSQL is reached over plain TCP: the hash is never sent that way.
    let tcp = start(&pg, |s| s.upstream_auth(&["md5"]).upstream_tcp());
    let e = login(&tcp).await.unwrap_err();
    assert!(fatal_text(&e).contains("unencrypted TCP"), "{e:?}");
}

#[tokio::test]
async fn a_server_that_asks_for_nothing_is_accepted_by_default_and_refused_when_scram_is_required()
{
    let pg = PgCluster::start_with(PgOptions::default().auth(HbaAuth::Trust)).unwrap();

    let default = start(&pg, |s| s);
    assert_eq!(login(&default).await.unwrap(), "app_rw");
    drop(default);

    let strict = start(&pg, |s| s.upstream_auth(&["scram-sha-256"]));
    let e = login(&strict).await.unwrap_err();
    assert!(fatal_text(&e).contains("none"), "{e:?}");
}

#[tokio::test]
async fn scram_is_accepted_by_default() {
    let pg = PgCluster::start().unwrap();
    let proxy = start(&pg, |s| s.upstream_auth(&["scram-sha-256"]));
    assert_eq!(login(&proxy).await.unwrap(), "app_rw");
}

#[test]
fn an_unknown_method_is_a_config_error() {
    let pg = PgCluster::start().unwrap();
    let setup = InterceptorSetup::new(&pg)
        .allow_all_policies()
        .upstream_auth(&["kerberos-please"]);
    assert!(Interceptor::start(setup).is_err());
}
