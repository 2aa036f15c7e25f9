//! Encoding the backend messages interceptor originates, and small views over frontend messages.
//!
//! Views take the body of one message already isolated by [`super::frame`], so a malformed body can
//! only fail its own decode.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

/// SQLSTATE codes interceptor itself raises.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const IO_ERROR: &str = "58030";
    pub const QUERY_CANCELED: &str = "57014";
}

#[derive(Debug, thiserror::Error)]
#[error("malformed {what} message")]
pub struct Malformed {
    pub what: &'static str,
}

fn malformed(what: &'static str) -> Malformed {
    Malformed { what }
}

/// Severity of an Error/Notice response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
        }
    }
}

/// An error or notice interceptor sends to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: Cow<'static, str>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// 1-based character position of a syntax error in the query text (field `P`).
    pub position: Option<u32>,
}

impl PgError {
    pub fn error(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Error,
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
        }
    }

    pub fn fatal(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Fatal,
            ..PgError::error(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_position(mut self, position: u32) -> Self {
        self.position = Some(position);
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The ErrorResponse (or NoticeResponse for notice severities) message bytes.
    pub fn encode(&self) -> Bytes {
        let tag = match self.severity {
            Severity::Error | Severity::Fatal => b'E',
            Severity::Notice | Severity::Warning => b'N',
        };
        let mut body = BytesMut::with_capacity(64 + self.message.len());
        let sev = self.severity.as_str();
        field(&mut body, b'S', sev);
        field(&mut body, b'V', sev);
        field(&mut body, b'C', &self.code);
        field(&mut body, b'M', &self.message);
        if let Some(d) = &self.detail {
            field(&mut body, b'D', d);
        }
        if let Some(h) = &self.hint {
            field(&mut body, b'H', h);
        }
        if let Some(p) = self.position {
            field(&mut body, b'P', &p.to_string());
        }
        body.put_u8(0);
        message(tag, &body)
    }
}

fn field(buf: &mut BytesMut, code: u8, value: &str) {
    buf.put_u8(code);
    put_cstr(buf, value);
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside a value would truncate it on the client; drop such bytes.
    buf.extend(s.bytes().filter(|&b| b != 0));
    buf.put_u8(0);
}

/// A whole message: tag, length, body.
pub fn message(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_i32((body.len() + 4) as i32);
    out.extend_from_slice(body);
    out.freeze()
}

pub fn auth_ok() -> Bytes {
    message(b'R', &0i32.to_be_bytes())
}

pub fn auth_cleartext() -> Bytes {
    message(b'R', &3i32.to_be_bytes())
}

pub fn auth_sasl(mechanisms: &[&str]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_i32(10);
    for m in mechanisms {
        put_cstr(&mut body, m);
    }
    body.put_u8(0);
    message(b'R', &body)
}

pub fn auth_sasl_continue(data: &[u8]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_i32(11);
    body.extend_from_slice(data);
    message(b'R', &body)
}

pub fn auth_sasl_final(data: &[u8]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_i32(12);
    body.extend_from_slice(data);
    message(b'R', &body)
}

pub fn parameter_status(name: &str, value: &str) -> Bytes {
    let mut body = BytesMut::new();
    put_cstr(&mut body, name);
    put_cstr(&mut body, value);
    message(b'S', &body)
}

pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    let mut body = BytesMut::new();
    body.put_i32(pid);
    body.put_i32(secret);
    message(b'K', &body)
}

pub fn ready_for_query(status: u8) -> Bytes {
    message(b'Z', &[status])
}

/// NegotiateProtocolVersion: the newest minor version we speak and the options we ignored.
pub fn negotiate_protocol_version(minor: i32, unrecognized: &[String]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_i32(minor);
    body.put_i32(unrecognized.len() as i32);
    for o in unrecognized {
        put_cstr(&mut body, o);
    }
    message(b'v', &body)
}

pub fn query(sql: &str) -> Bytes {
    let mut body = BytesMut::new();
    put_cstr(&mut body, sql);
    message(b'Q', &body)
}

/// Parse of the unnamed statement with no parameter types.
pub fn parse_unnamed(sql: &str) -> Bytes {
    let mut body = BytesMut::new();
    put_cstr(&mut body, "");
    put_cstr(&mut body, sql);
    body.put_i16(0);
    message(b'P', &body)
}

/// A cursor over a message body.
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    pub fn cstr(&mut self) -> Result<&'a [u8], Malformed> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(malformed(self.what))?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = &rest[1..];
        Ok(s)
    }

    pub fn utf8(&mut self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.cstr()?).map_err(|_| malformed(self.what))
    }

    pub fn i16(&mut self) -> Result<i16, Malformed> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    /// A 16-bit count. PostgreSQL reads Parse/Bind counts unsigned (`pq_getmsgint(msg, 2)`), so
    /// up to 65,535 parameters are valid.
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, Malformed> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(malformed(self.what));
        }
        let (s, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(s)
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub fn finish(&self) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.what))
        }
    }
}

/// Query ('Q'): the SQL text. SQL must be UTF-8 (interceptor requires `client_encoding` UTF8, so a
/// lossy conversion can never make it see different SQL than the server).
pub fn decode_query(body: &[u8]) -> Result<&str, Malformed> {
    let mut c = Cursor::new(body, "Query");
    let sql = c.utf8()?;
    c.finish()?;
    Ok(sql)
}

/// Parse ('P').
pub struct ParseView<'a> {
    pub statement: &'a str,
    pub sql: &'a str,
    pub param_types: Vec<u32>,
}

pub fn decode_parse(body: &[u8]) -> Result<ParseView<'_>, Malformed> {
    let mut c = Cursor::new(body, "Parse");
    let statement = c.utf8()?;
    let sql = c.utf8()?;
    let n = c.u16()?;
    // Each type OID takes 4 bytes: a count the body cannot hold is refused before allocating.
    if c.rest().len() < usize::from(n) * 4 {
        return Err(malformed("Parse"));
    }
    let mut param_types = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        param_types.push(c.i32()? as u32);
    }
    c.finish()?;
    Ok(ParseView {
        statement,
        sql,
        param_types,
    })
}

/// Bind ('B'): the portal and statement names; parameters are left raw.
pub struct BindView<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub param_formats: Vec<i16>,
    /// Parameter values, `None` for NULL.
    pub params: Vec<Option<&'a [u8]>>,
}

pub fn decode_bind(body: &[u8]) -> Result<BindView<'_>, Malformed> {
    let mut c = Cursor::new(body, "Bind");
    let portal = c.utf8()?;
    let statement = c.utf8()?;
    let nf = c.u16()?;
    if c.rest().len() < usize::from(nf) * 2 {
        return Err(malformed("Bind"));
    }
    let mut param_formats = Vec::with_capacity(usize::from(nf));
    for _ in 0..nf {
        param_formats.push(c.i16()?);
    }
    let np = c.u16()?;
    // PostgreSQL: zero format codes, one for all, or exactly one per parameter.
    if nf > 1 && nf != np {
        return Err(malformed("Bind"));
    }
    // Each parameter has at least its 4-byte length.
    if c.rest().len() < usize::from(np) * 4 {
        return Err(malformed("Bind"));
    }
    let mut params = Vec::with_capacity(usize::from(np));
    for _ in 0..np {
        let len = c.i32()?;
        params.push(match len {
            -1 => None,
            // PostgreSQL refuses any other negative length ("insufficient data left in
            // message"); reading it as NULL would forward a message the gate saw differently.
            ..-1 => return Err(malformed("Bind")),
            _ => Some(c.take(len as usize)?),
        });
    }
    // Result format codes follow; validated for shape only.
    let nr = c.u16()?;
    c.take(usize::from(nr) * 2)?;
    c.finish()?;
    Ok(BindView {
        portal,
        statement,
        param_formats,
        params,
    })
}

/// FunctionCall ('F'): a call of the function with this OID, outside SQL (libpq's `PQfn`,
/// which its large-object API uses).
pub struct FunctionCallView<'a> {
    pub function: u32,
    pub arg_formats: Vec<i16>,
    /// Argument values, `None` for NULL.
    pub args: Vec<Option<&'a [u8]>>,
}

pub fn decode_function_call(body: &[u8]) -> Result<FunctionCallView<'_>, Malformed> {
    const WHAT: &str = "FunctionCall";
    let mut c = Cursor::new(body, WHAT);
    let function = c.i32()? as u32;
    let nf = c.u16()?;
    if c.rest().len() < usize::from(nf) * 2 {
        return Err(malformed(WHAT));
    }
    let mut arg_formats = Vec::with_capacity(usize::from(nf));
    for _ in 0..nf {
        arg_formats.push(c.i16()?);
    }
    let na = c.u16()?;
    // As Bind: zero format codes, one for all, or exactly one per argument.
    if nf > 1 && nf != na {
        return Err(malformed(WHAT));
    }
    if c.rest().len() < usize::from(na) * 4 {
        return Err(malformed(WHAT));
    }
    let mut args = Vec::with_capacity(usize::from(na));
    for _ in 0..na {
        let len = c.i32()?;
        args.push(match len {
            -1 => None,
            ..-1 => return Err(malformed(WHAT)),
            _ => Some(c.take(len as usize)?),
        });
    }
    // The result format code.
    c.i16()?;
    c.finish()?;
    Ok(FunctionCallView {
        function,
        arg_formats,
        args,
    })
}

/// Execute ('E').
pub fn decode_execute(body: &[u8]) -> Result<(&str, i32), Malformed> {
    let mut c = Cursor::new(body, "Execute");
    let portal = c.utf8()?;
    let max_rows = c.i32()?;
    c.finish()?;
    Ok((portal, max_rows))
}

/// Close ('C') and Describe ('D'): kind `S` (statement) or `P` (portal) and a name.
pub fn decode_target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a str), Malformed> {
    let mut c = Cursor::new(body, what);
    let kind = c.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(malformed(what));
    }
    let name = c.utf8()?;
    c.finish()?;
    Ok((kind, name))
}

/// The fields of an ErrorResponse / NoticeResponse body, as (code, value) pairs.
pub fn decode_error_fields(body: &[u8]) -> Result<Vec<(u8, String)>, Malformed> {
    let mut c = Cursor::new(body, "ErrorResponse");
    let mut out = Vec::new();
    loop {
        let code = c.u8()?;
        if code == 0 {
            break;
        }
        let value = String::from_utf8_lossy(c.cstr()?).into_owned();
        out.push((code, value));
    }
    Ok(out)
}

/// The SQLSTATE and message of an ErrorResponse body.
pub fn error_code_and_message(body: &[u8]) -> Option<(String, String)> {
    let fields = decode_error_fields(body).ok()?;
    let get = |k: u8| fields.iter().find(|(c, _)| *c == k).map(|(_, v)| v.clone());
    Some((get(b'C')?, get(b'M').unwrap_or_default()))
}

/// SASLInitialResponse ('p' during SASL): the mechanism and the client's first message.
/// As in PostgreSQL, the declared length is -1 (no data) or exactly the bytes that follow.
pub fn decode_sasl_initial(body: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let mut c = Cursor::new(body, "SASLInitialResponse");
    let mechanism = c.cstr()?;
    let data = match c.i32()? {
        -1 => &[][..],
        len if len >= 0 => c.take(len as usize)?,
        _ => return Err(malformed("SASLInitialResponse")),
    };
    c.finish()?;
    Ok((mechanism, data))
}

/// StartupMessage parameters (after the protocol version).
pub fn decode_startup_params(body: &[u8]) -> Result<Vec<(String, String)>, Malformed> {
    let mut c = Cursor::new(body, "StartupMessage");
    let mut params = Vec::new();
    loop {
        let key = c.utf8()?;
        if key.is_empty() {
            break;
        }
        let value = c.utf8()?;
        params.push((key.to_owned(), value.to_owned()));
    }
    c.finish()?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trip() {
        let e = PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no").with_hint("ask");
        let bytes = e.encode();
        assert_eq!(bytes[0], b'E');
        let (code, msg) = error_code_and_message(&bytes[5..]).unwrap();
        assert_eq!((code.as_str(), msg.as_str()), ("42501", "no"));
    }

    #[test]
    fn views_reject_trailing_or_missing_bytes() {
        assert!(decode_query(b"select 1\0").is_ok());
        assert!(decode_query(b"select 1").is_err());
        assert!(decode_query(b"select 1\0Q").is_err());
        assert!(decode_parse(b"\0select 1\0\xff\xff").is_err());
        assert!(decode_execute(b"\0\0\0\0\0").is_ok());
        assert!(decode_execute(b"\0\0\0").is_err());
        assert!(decode_target(b"X\0", "Close").is_err());
        // Bind with a parameter length running past the end.
        let mut b = b"\0\0\0\0\0\x01".to_vec();
        b.extend_from_slice(&100i32.to_be_bytes());
        assert!(decode_bind(&b).is_err());
    }

    fn bind_body(formats: &[i16], lens: &[i32], results: u16) -> Vec<u8> {
        let mut b = b"\0\0".to_vec();
        b.extend_from_slice(&(formats.len() as u16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(lens.len() as u16).to_be_bytes());
        for &l in lens {
            b.extend_from_slice(&l.to_be_bytes());
            if l > 0 {
                b.extend(std::iter::repeat_n(b'x', l as usize));
            }
        }
        b.extend_from_slice(&results.to_be_bytes());
        b.extend(std::iter::repeat_n(0u8, usize::from(results) * 2));
        b
    }

    #[test]
    fn counts_are_unsigned_16_bit_like_postgres() {
        let n: u16 = 65_535;
        let mut p = b"\0select 1\0".to_vec();
        p.extend_from_slice(&n.to_be_bytes());
        p.extend(std::iter::repeat_n(0u8, usize::from(n) * 4));
        assert_eq!(decode_parse(&p).unwrap().param_types.len(), 65_535);
        // A count the body cannot hold fails without reserving for it.
        assert!(decode_parse(&p[..p.len() - 1]).is_err());

        let lens = vec![-1i32; 40_000];
        let b = bind_body(&[1], &lens, 40_000);
        let v = decode_bind(&b).unwrap();
        assert_eq!(v.params.len(), 40_000);
        assert!(v.params.iter().all(Option::is_none));
    }

    #[test]
    fn bind_lengths_below_minus_one_are_refused() {
        assert!(decode_bind(&bind_body(&[], &[-1, 2], 0)).is_ok());
        assert!(decode_bind(&bind_body(&[], &[-2], 0)).is_err());
        assert!(decode_bind(&bind_body(&[], &[i32::MIN], 0)).is_err());
    }

    #[test]
    fn bind_format_count_must_match_like_postgres() {
        assert!(decode_bind(&bind_body(&[0, 1], &[1, 1], 0)).is_ok());
        assert!(decode_bind(&bind_body(&[1], &[1, 1], 0)).is_ok());
        assert!(decode_bind(&bind_body(&[0, 1], &[1, 1, 1], 0)).is_err());
    }

    #[test]
    fn sasl_declared_length_must_match() {
        let msg = |len: i32, data: &[u8]| {
            let mut b = b"SCRAM-SHA-256\0".to_vec();
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(data);
            b
        };
        let ok = msg(4, b"n,,x");
        let (m, d) = decode_sasl_initial(&ok).unwrap();
        assert_eq!((m, d), (&b"SCRAM-SHA-256"[..], &b"n,,x"[..]));
        assert_eq!(decode_sasl_initial(&msg(-1, b"")).unwrap().1, b"");
        assert!(decode_sasl_initial(&msg(3, b"n,,x")).is_err());
        assert!(decode_sasl_initial(&msg(5, b"n,,x")).is_err());
        assert!(decode_sasl_initial(&msg(-1, b"n,,x")).is_err());
        assert!(decode_sasl_initial(&msg(-2, b"")).is_err());
    }

    #[test]
    fn invalid_utf8_sql_is_refused() {
        assert!(decode_query(b"select '\xe9'\0").is_err());
    }
}
