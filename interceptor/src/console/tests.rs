use std::time::Duration;

use super::reply::CSP;
use super::routes::is_console_path;
use super::session::{Sessions, cookie, same_token, session_cookie};
use crate::identity::{Identity, Proof};

fn dana() -> Identity {
    Identity {
        subject: "dana".into(),
        display_name: "dana".into(),
        groups: vec!["dba".into()],
        proof: Proof::Kernel,
        process: None,
    }
}

#[test]
fn console_paths_are_only_under_console() {
    assert!(is_console_path("/console"));
    assert!(is_console_path("/console/approvals"));
    assert!(is_console_path("/console?x=1"));
    assert!(!is_console_path("/consoles"));
    assert!(!is_console_path("/approvals"));
}

#[test]
fn the_policy_allows_no_inline_code() {
    assert!(!CSP.contains("unsafe"));
    assert!(CSP.contains("default-src 'none'"));
    assert!(CSP.contains("frame-ancestors 'none'"));
}

#[test]
fn cookies_are_found_by_exact_name() {
    let h = Some("a=1; __Host-interceptor-console=xyz; b=2");
    assert_eq!(cookie(h, "__Host-interceptor-console"), Some("xyz"));
    assert_eq!(cookie(h, "interceptor-console"), None);
    assert_eq!(cookie(None, "a"), None);
    let c = session_cookie("id", Duration::from_secs(60));
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(c.contains(attr), "{c}");
    }
}

#[test]
fn tokens_compare_exactly() {
    assert!(same_token("abc", "abc"));
    assert!(!same_token("abc", "abd"));
    assert!(!same_token("abc", "abcd"));
    assert!(!same_token("", "a"));
}

#[test]
fn sessions_expire_and_sign_ins_are_used_once() {
    let s = Sessions::new(Duration::from_millis(50));
    let (id, session) = s.open(dana(), None);
    assert_eq!(s.get(&id).map(|x| x.csrf), Some(session.csrf.clone()));
    assert!(s.get("nope").is_none());
    std::thread::sleep(Duration::from_millis(80));
    assert!(s.get(&id).is_none(), "an expired session still worked");

    let (login, state) = s.start_login();
    assert_ne!(state.state, state.verifier);
    assert!(s.finish_login(&login).is_some());
    assert!(
        s.finish_login(&login).is_none(),
        "a sign-in was redeemed twice"
    );
}

#[test]
fn the_console_config_needs_https_tls_and_a_way_to_sign_in() {
    use crate::config::Config;
    let base = "[listen]\ntcp=[\"127.0.0.1:1\"]\n[upstream]\nhost=\"/tmp\"\n[audit]\ndir=\"/tmp/a\"\n\
                [tls]\ncert=\"/c\"\nkey=\"/k\"\n\
                [oidc]\nissuer=\"https://idp.example\"\naudience=[\"console\"]\n\
                [approvals]\ndir=\"/tmp/ap\"\nhttp_listen=\"127.0.0.1:7070\"\n";
    let err = |extra: &str| {
        Config::parse(&format!("{base}{extra}"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        err("[console]\npublic_url=\"https://db:7070\"\nclient_id=\"console\"\n"),
        ""
    );
    assert!(
        err("[console]\npublic_url=\"http://db:7070\"\nclient_id=\"console\"\n").contains("https")
    );
    assert!(
        err("[console]\npublic_url=\"https://db:7070\"\nclient_id=\"other\"\n")
            .contains("audience")
    );
    assert!(err("[console]\npublic_url=\"https://db:7070\"\n").contains("sign in"));
    let no_tls = base
        .replace("[tls]\ncert=\"/c\"\nkey=\"/k\"\n", "")
        .replace(
            "[oidc]\nissuer=\"https://idp.example\"\naudience=[\"console\"]\n",
            "",
        );
    assert!(
        Config::parse(&format!(
            "{no_tls}[console]\npublic_url=\"https://db:7070\"\n"
        ))
        .unwrap_err()
        .to_string()
        .contains("[tls]")
    );
}
