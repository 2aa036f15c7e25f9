//! What a console answer is made of: form fields in, a reply out, and the headers every reply
//! carries. A leaf: the routes, the sign-in checks and the pages all speak it.

use std::collections::HashMap;

use maud::Markup;

/// No inline script or style, nothing from another origin, no framing, forms post only here.
pub(super) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                       base-uri 'none'";

/// A form body or query string.
pub(super) type Form = HashMap<String, String>;

pub(super) fn parse_form(bytes: &[u8]) -> Form {
    form_urlencoded::parse(bytes).into_owned().collect()
}

/// One answer.
pub(super) struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub(super) fn html(status: u16, page: Markup) -> Reply {
        Reply {
            status,
            content_type: "text/html; charset=utf-8",
            headers: Vec::new(),
            body: page.into_string().into_bytes(),
        }
    }

    pub(super) fn redirect(to: &str) -> Reply {
        Reply {
            status: 303,
            content_type: "text/plain; charset=utf-8",
            headers: vec![("Location", to.to_owned())],
            body: Vec::new(),
        }
    }

    pub(super) fn asset(content_type: &'static str, body: &str) -> Reply {
        Reply {
            status: 200,
            content_type,
            headers: vec![("Cache-Control", "max-age=300".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub(super) fn with_cookie(mut self, c: Option<String>) -> Reply {
        if let Some(c) = c {
            self.headers.push(("Set-Cookie", c));
        }
        self
    }
}

/// Headers on every console answer.
pub(super) fn security_headers(content_type: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Content-Type", content_type.to_owned()),
        ("Content-Security-Policy", CSP.to_owned()),
        ("X-Content-Type-Options", "nosniff".into()),
        ("X-Frame-Options", "DENY".into()),
        // `same-origin`, not `no-referrer`: with no referrer Chrome sends `Origin: null` on form
        // posts, and the same-origin check needs the real origin.
        ("Referrer-Policy", "same-origin".into()),
        ("Cross-Origin-Opener-Policy", "same-origin".into()),
        ("Strict-Transport-Security", "max-age=31536000".into()),
    ]
}
