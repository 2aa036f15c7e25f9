//! The little HTTP/1.1 both ends of the admin API need: one request per connection,
//! bounded headers and body, JSON bodies.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ApprovalError;

pub(crate) const MAX_HEAD: usize = 16 * 1024;
pub(crate) const MAX_BODY: usize = 64 * 1024;

pub(crate) struct HttpRequest {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    /// Other headers the web console reads (`cookie`, `origin`, `content-type`), names in
    /// lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Headers kept in [`HttpRequest::headers`].
const KEPT_HEADERS: [&str; 4] = ["cookie", "origin", "content-type", "sec-fetch-site"];

impl HttpRequest {
    /// The first value of header `name` (lower case).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one request; errors are answered with 400 by the caller.
pub(crate) async fn read_request<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<HttpRequest, ApprovalError> {
    let bad = |m: &str| ApprovalError::BadRequest(m.to_owned());
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed before the request was complete"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_owned();
                let path = req.path.unwrap_or("").to_owned();
                let mut authorization = None;
                let mut headers = Vec::new();
                let mut length = 0usize;
                for h in req.headers.iter() {
                    if let Some(kept) = KEPT_HEADERS.iter().find(|k| h.name.eq_ignore_ascii_case(k))
                    {
                        if let Ok(v) = std::str::from_utf8(h.value) {
                            headers.push(((*kept).to_owned(), v.to_owned()));
                        }
                    } else if h.name.eq_ignore_ascii_case("authorization") {
                        authorization = Some(
                            std::str::from_utf8(h.value)
                                .map_err(|_| bad("authorization is not text"))?
                                .to_owned(),
                        );
                    } else if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| bad("bad content-length"))?;
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(bad("transfer-encoding is not supported"));
                    }
                }
                if length > MAX_BODY {
                    return Err(bad("body too large"));
                }
                let mut body = buf.split_off(head_len);
                while body.len() < length {
                    let n = s.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(bad("body shorter than content-length"));
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(length);
                return Ok(HttpRequest {
                    method,
                    path,
                    authorization,
                    headers,
                    body,
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(bad("request head too large")),
            Err(_) => return Err(bad("malformed request")),
        }
    }
}

pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        502 => "Bad Gateway",
        _ => "Internal Server Error",
    }
}

pub(crate) async fn write_response<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    body: &serde_json::Value,
) -> std::io::Result<()> {
    let body = body.to_string();
    let auth = if status == 401 {
        "WWW-Authenticate: Bearer\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        reason_phrase(status),
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.flush().await
}

/// A response with caller-chosen headers (the web console's pages); `Content-Length` and
/// `Connection: close` are added.
pub(crate) async fn write_raw<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(s, status, headers, Some(body.len())).await?;
    s.write_all(body).await?;
    s.flush().await
}

/// Only the head: without `length` the body ends when the connection closes (streamed
/// exports).
pub(crate) async fn write_head<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    headers: &[(&str, String)],
    length: Option<usize>,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    for (name, value) in headers {
        // Values are ours, but a CR or LF would split the response: drop such a header.
        if value.contains(['\r', '\n']) {
            continue;
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(n) = length {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await
}
