//! Opening and logging in the upstream PostgreSQL session with interceptor's own credentials.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{UpstreamAuth, UpstreamConfig, UpstreamTls};
use crate::net::reader::FrameReader;
use crate::net::stream::Stream;
use crate::secrets::Secret;
use interceptor_wire::frame::FrameError;
use interceptor_wire::message::{Cursor, error_code_and_message};

/// Where the upstream is and how to reach it.
pub(crate) struct UpstreamTarget {
    unix: Option<PathBuf>,
    host: String,
    port: u16,
    tls: UpstreamTls,
    connector: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    max_message: usize,
    auth: Vec<UpstreamAuth>,
    /// With kernel steering on, TCP connections to PostgreSQL are exempted socket by socket.
    steering: Option<Arc<crate::ebpf::Steering>>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("cannot connect to PostgreSQL at {at}: {source}")]
    Connect { at: String, source: std::io::Error },
    #[error("timed out connecting to PostgreSQL at {0}")]
    Timeout(String),
    #[error("PostgreSQL at {0} does not offer TLS, which the configuration requires")]
    NoTls(String),
    #[error("TLS with PostgreSQL failed: {0}")]
    Tls(std::io::Error),
    #[error("PostgreSQL refused the login: {code} {message}")]
    Refused { code: String, message: String },
    #[error("{0}")]
    AuthMethod(String),
    #[error("no password is configured for upstream role \"{0}\"")]
    NoPassword(String),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A logged-in upstream session, positioned right after its first ReadyForQuery.
pub(crate) struct Upstream {
    pub stream: Stream,
    pub reader: FrameReader,
    pub params: Vec<(String, String)>,
    pub backend_pid: i32,
    pub backend_secret: i32,
    pub status: u8,
    /// NoticeResponse messages received during login, to pass on.
    pub notices: Vec<Bytes>,
}

impl UpstreamTarget {
    pub(crate) fn new(
        cfg: &UpstreamConfig,
        connector: Option<Arc<rustls::ClientConfig>>,
        max_message: usize,
        steering: Option<Arc<crate::ebpf::Steering>>,
    ) -> Self {
        UpstreamTarget {
            unix: cfg.unix_socket_path(),
            host: cfg.host.clone(),
            port: cfg.port,
            tls: cfg.tls,
            connector: connector.map(tokio_rustls::TlsConnector::from),
            timeout: Duration::from_millis(cfg.connect_timeout_ms),
            max_message,
            auth: cfg.auth.clone(),
            steering,
        }
    }

    /// Refuses a password method the configuration does not allow, and MD5 or cleartext over
    /// an unencrypted TCP connection, before any credential is sent.
    fn allow_method(&self, method: UpstreamAuth, stream: &Stream) -> Result<(), UpstreamError> {
        let allowed = || {
            self.auth
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.auth.contains(&method) {
            return Err(UpstreamError::AuthMethod(format!(
                "PostgreSQL asked for {} authentication, which [upstream] auth does not allow \
                 (allowed: {}); add \"{}\" to [upstream] auth or give the role a SCRAM-SHA-256 password",
                method.as_str(),
                allowed(),
                method.as_str()
            )));
        }
        let weak = matches!(method, UpstreamAuth::Md5 | UpstreamAuth::Password);
        if weak && matches!(stream, Stream::Tcp(_)) {
            return Err(UpstreamError::AuthMethod(format!(
                "PostgreSQL asked for {} authentication over unencrypted TCP; interceptor never \
                 sends a password that way: use its unix socket or [upstream] tls",
                method.as_str()
            )));
        }
        Ok(())
    }

    pub(crate) fn describe(&self) -> String {
        match &self.unix {
            Some(p) => p.display().to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    /// A raw connection (TLS negotiated per configuration).
    pub(crate) async fn connect(&self) -> Result<Stream, UpstreamError> {
        let at = self.describe();
        let fut = async {
            if let Some(path) = &self.unix {
                let s =
                    UnixStream::connect(path)
                        .await
                        .map_err(|source| UpstreamError::Connect {
                            at: at.clone(),
                            source,
                        })?;
                return Ok(Stream::Unix(s));
            }
            let tcp = self
                .connect_tcp()
                .await
                .map_err(|source| UpstreamError::Connect {
                    at: at.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            self.negotiate_tls(tcp).await
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| UpstreamError::Timeout(at.clone()))?
    }

    /// A TCP connection to PostgreSQL. With kernel steering, the socket is registered as
    /// interceptor's own before connect(), so the kernel lets exactly it through (the cookie of
    /// a socket only interceptor holds: no other process can forge that exemption).
    async fn connect_tcp(&self) -> std::io::Result<TcpStream> {
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port)).await?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(s) = &self.steering {
                use std::os::fd::AsFd;
                s.exempt_upstream(socket.as_fd())
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            match socket.connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn negotiate_tls(&self, mut tcp: TcpStream) -> Result<Stream, UpstreamError> {
        let connector = match (self.tls, &self.connector) {
            (UpstreamTls::Disable, _) | (_, None) => return Ok(Stream::Tcp(tcp)),
            (_, Some(c)) => c,
        };
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.map_err(FrameError::Io)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(FrameError::Io)?;
        match answer[0] {
            b'S' => {
                let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| UpstreamError::Protocol(format!("bad upstream host name: {e}")))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(UpstreamError::Tls)?;
                Ok(Stream::TlsClient(Box::new(tls)))
            }
            b'N' if self.tls == UpstreamTls::Prefer => Ok(Stream::Tcp(tcp)),
            b'N' => Err(UpstreamError::NoTls(self.describe())),
            _ => Err(UpstreamError::Protocol(
                "unexpected answer to SSLRequest".into(),
            )),
        }
    }

    /// Asks PostgreSQL to cancel the query of backend `pid`.
    pub(crate) async fn cancel(&self, pid: i32, secret: i32) -> Result<(), UpstreamError> {
        let mut stream = self.connect().await?;
        let mut buf = BytesMut::new();
        frontend::cancel_request(pid, secret, &mut buf);
        stream.write_all(&buf).await.map_err(FrameError::Io)?;
        // PostgreSQL closes the connection without answering; wait for that briefly.
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut sink)).await;
        Ok(())
    }

    /// Connects and logs in as `role` on `database`.
    pub(crate) async fn login(
        &self,
        role: &str,
        password: Option<&Secret>,
        database: &str,
        passthrough: &[(String, String)],
    ) -> Result<Upstream, UpstreamError> {
        self.login_limited(role, password, database, passthrough, self.max_message)
            .await
    }

    /// As [`UpstreamTarget::login`], with the session's own message size limit.
    pub(crate) async fn login_limited(
        &self,
        role: &str,
        password: Option<&Secret>,
        database: &str,
        passthrough: &[(String, String)],
        max_message: usize,
    ) -> Result<Upstream, UpstreamError> {
        let mut stream = self.connect().await?;
        let mut params: Vec<(&str, &str)> = vec![("user", role), ("database", database)];
        params.extend(passthrough.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf)
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        stream.write_all(&buf).await.map_err(FrameError::Io)?;

        let mut reader = FrameReader::new(max_message);
        let mut scram: Option<ScramSha256> = None;
        // Whether PostgreSQL asked for any credential before AuthenticationOk.
        let mut challenged = false;
        let mut out = Upstream {
            stream,
            reader: FrameReader::new(self.max_message),
            params: Vec::new(),
            backend_pid: 0,
            backend_secret: 0,
            status: b'I',
            notices: Vec::new(),
        };
        let fut = async {
            loop {
                let Some((tag, body)) = reader.read_message(&mut out.stream).await? else {
                    return Err(UpstreamError::Protocol(
                        "PostgreSQL closed the connection during login".into(),
                    ));
                };
                match tag {
                    b'R' => {
                        let mut c = Cursor::new(&body, "Authentication");
                        let code = c
                            .i32()
                            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                        let mut reply = BytesMut::new();
                        match code {
                            0 => {
                                if !challenged {
                                    self.allow_method(UpstreamAuth::None, &out.stream)?;
                                }
                                continue;
                            }
                            3 => {
                                challenged = true;
                                self.allow_method(UpstreamAuth::Password, &out.stream)?;
                                let pw = password
                                    .ok_or_else(|| UpstreamError::NoPassword(role.into()))?;
                                frontend::password_message(pw.expose().as_bytes(), &mut reply)
                                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                            }
                            5 => {
                                challenged = true;
                                self.allow_method(UpstreamAuth::Md5, &out.stream)?;
                                let pw = password
                                    .ok_or_else(|| UpstreamError::NoPassword(role.into()))?;
                                let salt = c
                                    .take(4)
                                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                                let salt = [salt[0], salt[1], salt[2], salt[3]];
                                let hash = postgres_protocol::authentication::md5_hash(
                                    role.as_bytes(),
                                    pw.expose().as_bytes(),
                                    salt,
                                );
                                frontend::password_message(hash.as_bytes(), &mut reply)
                                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                            }
                            10 => {
                                challenged = true;
                                self.allow_method(UpstreamAuth::ScramSha256, &out.stream)?;
                                let pw = password
                                    .ok_or_else(|| UpstreamError::NoPassword(role.into()))?;
                                let mechanisms = c.rest();
                                if !mechanisms.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256") {
                                    return Err(UpstreamError::Protocol(
                                        "PostgreSQL offers no SASL mechanism interceptor supports"
                                            .into(),
                                    ));
                                }
                                let s = ScramSha256::new(
                                    pw.expose().as_bytes(),
                                    ChannelBinding::unsupported(),
                                );
                                frontend::sasl_initial_response(
                                    "SCRAM-SHA-256",
                                    s.message(),
                                    &mut reply,
                                )
                                .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                                scram = Some(s);
                            }
                            11 => {
                                let s = scram.as_mut().ok_or_else(|| {
                                    UpstreamError::Protocol(
                                        "SASL continue without a SASL start".into(),
                                    )
                                })?;
                                s.update(c.rest())
                                    .map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
                                frontend::sasl_response(s.message(), &mut reply)
                                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                            }
                            12 => {
                                let mut s = scram.take().ok_or_else(|| {
                                    UpstreamError::Protocol(
                                        "SASL final without a SASL start".into(),
                                    )
                                })?;
                                // Verifies the server knew the password too (mutual authentication).
                                s.finish(c.rest())
                                    .map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
                                continue;
                            }
                            other => {
                                return Err(UpstreamError::Protocol(format!(
                                    "unsupported authentication request {other} from PostgreSQL"
                                )));
                            }
                        }
                        out.stream.write_all(&reply).await.map_err(FrameError::Io)?;
                    }
                    b'E' => {
                        let (code, message) = error_code_and_message(&body)
                            .unwrap_or_else(|| ("XX000".into(), "malformed error".into()));
                        return Err(UpstreamError::Refused { code, message });
                    }
                    b'S' => {
                        let mut c = Cursor::new(&body, "ParameterStatus");
                        let (k, v) = c
                            .utf8()
                            .and_then(|k| Ok((k, c.utf8()?)))
                            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                        out.params.push((k.to_owned(), v.to_owned()));
                    }
                    b'K' => {
                        let mut c = Cursor::new(&body, "BackendKeyData");
                        out.backend_pid = c
                            .i32()
                            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                        out.backend_secret = c
                            .i32()
                            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                    }
                    b'N' => out
                        .notices
                        .push(interceptor_wire::message::message(b'N', &body)),
                    b'Z' => {
                        out.status = body.first().copied().unwrap_or(b'I');
                        return Ok(());
                    }
                    b'v' => continue,
                    other => {
                        return Err(UpstreamError::Protocol(format!(
                            "unexpected message '{}' during login",
                            other.escape_ascii()
                        )));
                    }
                }
            }
        };
        tokio::time::timeout(self.timeout * 2, fut)
            .await
            .map_err(|_| UpstreamError::Timeout(self.describe()))??;
        out.reader = reader;
        Ok(out)
    }
}
