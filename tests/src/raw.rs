//! A minimal hand-driven PostgreSQL wire client for tests that must send bytes no real client
//! would (oversized or malformed messages after login). Speaks SCRAM-SHA-256 with the
//! rust-postgres protocol crate, plain TCP only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;

use crate::conn::ConnParams;

/// One backend message: type byte and body (without the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl RawMessage {
    /// The SQLSTATE (`C` field) of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.error_field(b'C')
    }

    /// A field of an ErrorResponse/NoticeResponse (`M` message, `S` severity, ...).
    pub fn error_field(&self, field: u8) -> Option<String> {
        if self.tag != b'E' && self.tag != b'N' {
            return None;
        }
        self.body
            .split(|b| *b == 0)
            .find(|f| f.first() == Some(&field))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
    }
}

#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    /// Connects over TCP and completes startup + authentication up to ReadyForQuery.
    pub fn login(params: &ConnParams) -> Result<RawClient> {
        if params.is_unix() {
            bail!("RawClient speaks TCP only");
        }
        let stream =
            TcpStream::connect((params.host.as_str(), params.port)).context("raw connect")?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut client = RawClient { stream };
        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", params.user.as_str()),
                ("database", params.dbname.as_str()),
            ],
            &mut buf,
        )?;
        client.send(&buf)?;
        let password = params.password.clone().unwrap_or_default();
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = client.read_message()?.context("closed during login")?;
            match msg.tag {
                b'R' => {
                    let code = msg
                        .body
                        .get(..4)
                        .and_then(|b| <[u8; 4]>::try_from(b).ok())
                        .map(i32::from_be_bytes)
                        .context("short Authentication message")?;
                    let data = &msg.body[4..];
                    let mut out = BytesMut::new();
                    match code {
                        0 => {}
                        3 => {
                            frontend::password_message(password.as_bytes(), &mut out)?;
                            client.send(&out)?;
                        }
                        10 => {
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unrequested(),
                            );
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)?;
                            client.send(&out)?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().context("SASLContinue before SASL")?;
                            s.update(data)?;
                            frontend::sasl_response(s.message(), &mut out)?;
                            client.send(&out)?;
                        }
                        12 => {
                            let s = scram.as_mut().context("SASLFinal before SASL")?;
                            s.finish(data).context("server SCRAM signature invalid")?;
                        }
                        other => bail!("unsupported authentication request {other}"),
                    }
                }
                b'E' => bail!(
                    "login failed: {} {}",
                    msg.sqlstate().unwrap_or_default(),
                    msg.error_field(b'M').unwrap_or_default()
                ),
                b'Z' => return Ok(client),
                _ => {}
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("raw send")
    }

    /// Next backend message, or `None` when the server closed the connection.
    pub fn read_message(&mut self) -> Result<Option<RawMessage>> {
        let mut header = [0u8; 5];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e).context("raw read"),
        }
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let body_len = usize::try_from(len - 4).context("bad backend length")?;
        if body_len > 1 << 30 {
            bail!("backend message too large: {body_len}");
        }
        let mut body = vec![0u8; body_len];
        self.stream.read_exact(&mut body).context("raw body")?;
        Ok(Some(RawMessage {
            tag: header[0],
            body,
        }))
    }

    /// Messages until ReadyForQuery (included) or until the server closes (`closed = true`).
    pub fn read_until_ready(&mut self) -> Result<(Vec<RawMessage>, bool)> {
        let mut out = Vec::new();
        loop {
            match self.read_message()? {
                None => return Ok((out, true)),
                Some(m) => {
                    let ready = m.tag == b'Z';
                    out.push(m);
                    if ready {
                        return Ok((out, false));
                    }
                }
            }
        }
    }

    /// Sends a simple Query and collects the response.
    pub fn simple_query(&mut self, sql: &str) -> Result<(Vec<RawMessage>, bool)> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.send(&buf)?;
        self.read_until_ready()
    }
}
