//! Where and as whom a client connects: one description shared by tokio-postgres, `psql` and
//! `pgbench`, so the same test can target PostgreSQL directly or through interceptor.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_postgres::{Client, Config, Connection, NoTls, Socket, tls::NoTlsStream};

/// libpq `sslmode` values the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Connection parameters in libpq terms. `host` is a host name / address or, when it starts
/// with `/`, a unix socket directory.
#[derive(Debug, Clone)]
pub struct ConnParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub connect_timeout: Duration,
}

impl ConnParams {
    pub fn new(host: impl Into<String>, port: u16, user: &str, password: Option<&str>) -> Self {
        ConnParams {
            host: host.into(),
            port,
            user: user.to_owned(),
            password: password.map(str::to_owned),
            dbname: crate::pg::APP_DB.to_owned(),
            sslmode: SslMode::Disable,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            connect_timeout: Duration::from_secs(10),
        }
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = user.to_owned();
        self
    }

    pub fn password(mut self, password: Option<&str>) -> Self {
        self.password = password.map(str::to_owned);
        self
    }

    pub fn dbname(mut self, dbname: &str) -> Self {
        self.dbname = dbname.to_owned();
        self
    }

    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    pub fn sslmode(mut self, mode: SslMode) -> Self {
        self.sslmode = mode;
        self
    }

    pub fn sslrootcert(mut self, path: impl Into<PathBuf>) -> Self {
        self.sslrootcert = Some(path.into());
        self
    }

    /// A client certificate and key for mTLS.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.sslcert = Some(cert.into());
        self.sslkey = Some(key.into());
        self
    }

    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    /// A tokio-postgres config (always plaintext: the tokio-postgres tests use `NoTls`).
    pub fn tokio_config(&self) -> Config {
        let mut cfg = Config::new();
        if self.is_unix() {
            cfg.host_path(&self.host);
        } else {
            cfg.host(&self.host);
        }
        cfg.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .connect_timeout(self.connect_timeout)
            .application_name("interceptor-tests");
        if let Some(pw) = &self.password {
            cfg.password(pw);
        }
        cfg
    }

    /// Connects with tokio-postgres and drives the connection on a spawned task.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.tokio_config().connect(NoTls).await?;
        tokio::spawn(async move {
            // The error surfaces to the client as a closed connection; no need to report it here.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Connects and returns the connection too, for tests that poll it (LISTEN/NOTIFY).
    pub async fn connect_raw(
        &self,
    ) -> Result<(Client, Connection<Socket, NoTlsStream>), tokio_postgres::Error> {
        self.tokio_config().connect(NoTls).await
    }

    /// The libpq environment for `psql`/`pgbench`. Inherited `PG*` variables are cleared by
    /// [`crate::cli::PgCommand`] so the host's settings never leak into a test.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PGHOST", self.host.clone()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", self.user.clone()),
            ("PGDATABASE", self.dbname.clone()),
            ("PGSSLMODE", self.sslmode.as_str().to_owned()),
            (
                "PGCONNECT_TIMEOUT",
                self.connect_timeout.as_secs().max(2).to_string(),
            ),
            ("PGAPPNAME", "interceptor-tests".to_owned()),
            // No ~/.pgpass, no GSS: only what the test states.
            ("PGPASSFILE", "/dev/null".to_owned()),
            ("PGGSSENCMODE", "disable".to_owned()),
        ];
        if let Some(pw) = &self.password {
            env.push(("PGPASSWORD", pw.clone()));
        }
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        env.push((
            "PGSSLROOTCERT",
            self.sslrootcert
                .as_ref()
                .map(path)
                .unwrap_or_else(|| "/nonexistent/root.crt".to_owned()),
        ));
        if let (Some(cert), Some(key)) = (&self.sslcert, &self.sslkey) {
            env.push(("PGSSLCERT", path(cert)));
            env.push(("PGSSLKEY", path(key)));
        } else {
            env.push(("PGSSLCERT", "/nonexistent/client.crt".to_owned()));
            env.push(("PGSSLKEY", "/nonexistent/client.key".to_owned()));
        }
        env
    }
}

/// Runs one query through a fresh connection and returns the first column of the first row
/// as text (via `::text` cast done by the caller).
pub async fn query_one_text(params: &ConnParams, sql: &str) -> Result<String> {
    let client = params
        .connect()
        .await
        .with_context(|| format!("connect to {}:{}", params.host, params.port))?;
    let row = client.query_one(sql, &[]).await.context("query")?;
    row.try_get::<_, String>(0).context("first column as text")
}
