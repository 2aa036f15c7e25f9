//! A PostgreSQL cluster with an interceptor in front: what most e2e tests need.
//!
//! With `INTERCEPTOR_E2E_DIRECT=1` the same tests run against PostgreSQL directly (no proxy):
//! each identity becomes a PostgreSQL login role that is a member of its upstream role, and
//! TLS is served by PostgreSQL itself. That validates the tests and the harness against the
//! reference behaviour the proxy must reproduce.

use anyhow::{Context, Result};

use crate::certs::TestCerts;
use crate::conn::ConnParams;
use crate::pg::{PgCluster, PgOptions};
use crate::proxy::{IdentitySpec, Interceptor, InterceptorSetup};

/// True when tests should target PostgreSQL directly (`INTERCEPTOR_E2E_DIRECT=1`).
pub fn direct_mode() -> bool {
    std::env::var("INTERCEPTOR_E2E_DIRECT").is_ok_and(|v| v == "1" || v == "true")
}

/// Standard identity mapped to the read-write role.
pub const ALICE: &str = "alice";
pub const ALICE_PASSWORD: &str = "alice-Correct-Horse-1";
/// Standard identity mapped to the read-only role.
pub const BOB: &str = "bob";
pub const BOB_PASSWORD: &str = "bob-Battery-Staple-2";

#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    pub pg: PgOptions,
    pub identities: Vec<IdentitySpec>,
    /// Serve TLS to clients with a fresh test CA.
    pub tls: bool,
    /// Refuse plaintext clients on TCP.
    pub require_tls: bool,
    /// `pgbench -i -s <scale>` before the proxy starts.
    pub pgbench_scale: Option<u32>,
    /// Customize the proxy setup (ignored in direct mode). The stack starts from
    /// [`InterceptorSetup::allow_all_policies`]: these are relay tests.
    pub customize: Option<fn(InterceptorSetup) -> InterceptorSetup>,
}

impl StackOptions {
    /// `alice` (group `dev`, upstream `app_rw`) and `bob` (group `analyst`, upstream `app_ro`).
    pub fn standard() -> Self {
        StackOptions::default()
            .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(crate::pg::APP_RW))
            .identity(BOB, BOB_PASSWORD, &["analyst"], Some(crate::pg::APP_RO))
    }

    pub fn identity(
        mut self,
        name: &str,
        password: &str,
        groups: &[&str],
        upstream_role: Option<&str>,
    ) -> Self {
        self.identities
            .push(IdentitySpec::new(name, password, groups, upstream_role));
        self
    }
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }
    pub fn require_tls(mut self, on: bool) -> Self {
        self.require_tls = on;
        self
    }
    pub fn pgbench_scale(mut self, scale: u32) -> Self {
        self.pgbench_scale = Some(scale);
        self
    }
    pub fn pg(mut self, pg: PgOptions) -> Self {
        self.pg = pg;
        self
    }
}

/// A cluster plus (unless in direct mode) an interceptor in front of it.
#[derive(Debug)]
pub struct Stack {
    // Field order matters for Drop: the proxy goes first, then the cluster, then the certs.
    pub proxy: Option<Interceptor>,
    pub pg: PgCluster,
    pub certs: Option<TestCerts>,
    identities: Vec<IdentitySpec>,
}

impl Stack {
    pub fn start(opts: StackOptions) -> Result<Stack> {
        let direct = direct_mode();
        let certs = if opts.tls {
            Some(TestCerts::generate()?)
        } else {
            None
        };
        let mut pg_opts = opts.pg.clone();
        if direct && let Some(c) = &certs {
            pg_opts = pg_opts
                .ssl(&c.server.cert, &c.server.key)
                .ssl_only(opts.require_tls);
        }
        let pg = PgCluster::start_with(pg_opts)?;
        if let Some(scale) = opts.pgbench_scale {
            pg.pgbench_init(scale)?;
        }
        let proxy = if direct {
            for id in &opts.identities {
                let role = id.upstream_role.as_deref().unwrap_or(crate::pg::APP_RO);
                pg.psql_db(
                    "postgres",
                    &format!(
                        "CREATE ROLE \"{}\" LOGIN PASSWORD '{}' IN ROLE {role};",
                        id.name,
                        id.password.replace('\'', "''")
                    ),
                )
                .context("create direct-mode identity role")?;
            }
            None
        } else {
            let mut setup = InterceptorSetup::new(&pg).allow_all_policies();
            for id in &opts.identities {
                setup = setup.identity_spec(id.clone());
            }
            if let Some(c) = &certs {
                setup = setup.tls(c).require_tls(opts.require_tls);
            }
            if let Some(f) = opts.customize {
                setup = f(setup);
            }
            Some(Interceptor::start(setup)?)
        };
        Ok(Stack {
            proxy,
            pg,
            certs,
            identities: opts.identities,
        })
    }

    pub fn is_direct(&self) -> bool {
        self.proxy.is_none()
    }

    /// TCP parameters for an identity: the proxy's port, or PostgreSQL's in direct mode.
    pub fn params(&self, identity: &str) -> ConnParams {
        let pw = self
            .identities
            .iter()
            .find(|i| i.name == identity)
            .map(|i| i.password.as_str());
        match &self.proxy {
            Some(p) => p.params(identity),
            None => self.pg.tcp_params(identity, pw),
        }
    }

    /// The CA certificate clients should trust (when TLS is on).
    pub fn ca_cert(&self) -> Option<&std::path::Path> {
        self.certs.as_ref().map(|c| c.ca_cert.as_path())
    }

    /// The proxy's log, or the server log in direct mode.
    pub fn logs(&self) -> String {
        match &self.proxy {
            Some(p) => p.logs(),
            None => self.pg.server_log(),
        }
    }
}
