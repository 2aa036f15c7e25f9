//! The one rule for URLs interceptor itself calls (an IdP's discovery document and keys, approval
//! webhooks): https anywhere, plain http to a loopback host only, never credentials in the URL
//! (they would end up in logs and errors), always a host. Parsed with `http::Uri`, the parser
//! ureq sends the request with, so the host checked is the host dialled.

use std::net::{Ipv4Addr, Ipv6Addr};

use http::Uri;

/// Why a URL is refused. The messages never repeat the URL's user-info part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum UrlError {
    #[error("is not a valid URL")]
    Invalid,
    #[error("must use https (plain http is allowed to loopback only)")]
    Scheme,
    #[error("must not contain credentials")]
    Credentials,
    #[error("names no host")]
    NoHost,
}

/// Whether `url` may be dialled; `Ok(true)` when it is https.
pub(crate) fn check(url: &str) -> Result<bool, UrlError> {
    // Credentials first and on the raw text: `http::Uri` rejects some user-info forms outright,
    // and the caller must learn that the URL carried them, not just that it did not parse.
    if let Some((_, rest)) = url.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(UrlError::Credentials);
        }
    }
    let uri: Uri = url.parse().map_err(|_| UrlError::Invalid)?;
    let https = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(UrlError::Scheme),
    };
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        return Err(UrlError::NoHost);
    }
    if !https && !is_loopback(host) {
        return Err(UrlError::Scheme);
    }
    Ok(https)
}

fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_anywhere_http_to_loopback_only() {
        assert_eq!(check("https://login.example.com/keys"), Ok(true));
        assert_eq!(check("HTTPS://login.example.com"), Ok(true));
        assert_eq!(check("http://127.0.0.1:8080/keys"), Ok(false));
        assert_eq!(check("http://127.5.0.1/"), Ok(false));
        assert_eq!(check("http://localhost/keys"), Ok(false));
        assert_eq!(check("http://[::1]:80/keys"), Ok(false));
        assert_eq!(check("http://idp.example.com/keys"), Err(UrlError::Scheme));
        assert_eq!(check("http://127.0.0.1.evil.com/"), Err(UrlError::Scheme));
        assert_eq!(check("http://[::ffff:8.8.8.8]/"), Err(UrlError::Scheme));
        assert_eq!(check("ftp://127.0.0.1/"), Err(UrlError::Scheme));
        assert!(check("file:///etc/passwd").is_err());
    }

    #[test]
    fn credentials_and_missing_hosts_are_refused_for_every_scheme() {
        assert_eq!(
            check("https://user:pw@idp.example.com/"),
            Err(UrlError::Credentials)
        );
        assert_eq!(
            check("https://user@hooks.example.com/x"),
            Err(UrlError::Credentials)
        );
        assert_eq!(check("http://user@127.0.0.1/"), Err(UrlError::Credentials));
        assert!(check("https:///nohost").is_err());
        assert!(check("https://").is_err());
        assert!(check("not a url").is_err());
    }

    #[test]
    fn errors_never_echo_the_secret() {
        let e = check("https://admin:hunter2@idp.example.com/").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }
}
