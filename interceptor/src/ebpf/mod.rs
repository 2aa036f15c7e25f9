//! Kernel interception: loading, attaching and reading the programs of `interceptor-ebpf`.
//!
//! * Steering: an `sk_lookup` program in interceptor's network namespace hands every new TCP
//!   connection to a protected port (any local address, local or remote client) to interceptor's
//!   listener; without a listener the connection is refused, never delivered to PostgreSQL.
//! * Identity: cgroup `connect4`/`connect6` and `sock_ops` programs record who opened each local
//!   connection; [`Steering::identity_for`] turns that into a [`ProcessIdentity`].
//! * Upstream exemption: when interceptor reaches PostgreSQL over TCP on a steered port, it calls
//!   [`Steering::exempt_upstream`] on its socket before connect(). The kernel then exempts exactly
//!   that socket's 4-tuple, over loopback only, until the socket closes. Only a holder of the map
//!   (root / CAP_BPF) can register a socket, and a socket cookie cannot be forged or reused, so no
//!   other process can ride on the exemption. The default upstream (PostgreSQL's unix socket)
//!   needs none; that socket is guarded by directory permissions ([`check_unix_socket_dir`]),
//!   because BPF LSM programs do not load on the target kernels.
//! * Lifecycle: maps and links are pinned under `pin_dir` (bpffs), so steering outlives a crash of
//!   interceptor (connections are refused meanwhile); [`Steering::attach`] re-adopts the pinned
//!   maps and replaces the links without a gap. [`detach`] uninstalls.
//!
//! Using it from the server, at startup after binding the TCP listeners:
//!
//! ```ignore
//! let steering = cfg.ebpf.enabled
//!     .then(|| Steering::attach(&cfg.ebpf, &[v4.as_fd(), v6.as_fd()]))
//!     .transpose()?          // fail closed: no steering, no start
//!     .map(Arc::new);
//! // per accepted TCP connection:
//! let process = steering.as_ref().and_then(|s| s.identity_for(peer, stream.local_addr()?));
//! // TCP upstream on a steered port (not needed for the unix socket):
//! let sock = tokio::net::TcpSocket::new_v4()?;
//! if let Some(s) = &steering { s.exempt_upstream(sock.as_fd())?; }
//! let upstream = sock.connect(addr).await?;
//! ```
//!
//! The binary embeds the eBPF object when it was built first (`cargo xtask build-ebpf`, or
//! `INTERCEPTOR_EBPF_OBJ=<path>`); otherwise [`Steering::attach`] returns
//! [`EbpfError::NotCompiledIn`].

mod btf;
mod doctor;
pub(crate) mod existing;
mod logger;
pub mod maps;
mod process;
mod steering;
mod sys;

use std::path::PathBuf;

use serde::Deserialize;

pub use doctor::{Account, Finding, Severity, check_unix_socket_dir, doctor, doctor_with};
pub use steering::{Counters, Detached, LinkStatus, Status, Steering, detach, status};

/// Where the links and maps are pinned unless configured otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/interceptor";

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "eBPF support was not compiled in (build the object with `cargo xtask build-ebpf` \
         before `cargo build`, or set INTERCEPTOR_EBPF_OBJ)"
    )]
    NotCompiledIn,
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error(
        "loading the eBPF object with the maps pinned under {pin_dir} (left by an incompatible \
         version? `interceptor ebpf detach --pin-dir {pin_dir}` removes them): {source}",
        pin_dir = pin_dir.display()
    )]
    LoadPinned {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF link {path}: {message}")]
    Link { path: PathBuf, message: String },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
}

impl EbpfError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> EbpfError {
        EbpfError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The `[ebpf]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteeringConfig {
    /// Steer and identify with eBPF. Off by default: it changes how the whole host reaches the
    /// protected ports.
    #[serde(default)]
    pub enabled: bool,
    /// TCP ports whose connections go to interceptor whatever address they were sent to.
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    /// cgroup v2 directory whose processes are identified (default: the root of the mounted
    /// cgroup2 hierarchy, i.e. every process). interceptor itself must be inside it when it
    /// reaches PostgreSQL over TCP on a steered port.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned links and maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// What to do at attach time with connections to PostgreSQL that predate steering (they
    /// bypass interceptor until they reconnect): `warn` logs each one with its process,
    /// `terminate` also closes the TCP ones (unix-socket ones are listed for
    /// `pg_terminate_backend`).
    #[serde(default)]
    pub on_existing: existing::OnExisting,
}

impl Default for SteeringConfig {
    fn default() -> Self {
        SteeringConfig {
            enabled: false,
            ports: default_ports(),
            cgroup: None,
            pin_dir: default_pin_dir(),
            on_existing: existing::OnExisting::default(),
        }
    }
}

fn default_ports() -> Vec<u16> {
    vec![5432]
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

/// The eBPF object built into this binary, if it was built with one.
pub fn embedded_object() -> Option<&'static [u8]> {
    #[cfg(interceptor_ebpf_embedded)]
    {
        static OBJECT: &[u8] =
            aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor-ebpf.o"));
        Some(OBJECT)
    }
    #[cfg(not(interceptor_ebpf_embedded))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_fields() {
        #[derive(Deserialize)]
        struct Wrap {
            ebpf: SteeringConfig,
        }
        let w: Wrap = toml::from_str("[ebpf]\nenabled = true\n").unwrap();
        assert_eq!(
            w.ebpf,
            SteeringConfig {
                enabled: true,
                ..SteeringConfig::default()
            }
        );
        let w: Wrap = toml::from_str(
            "[ebpf]\nports = [5432, 5433]\ncgroup = \"/sys/fs/cgroup/unified/db\"\npin_dir = \"/sys/fs/bpf/x\"\n",
        )
        .unwrap();
        assert_eq!(w.ebpf.ports, vec![5432, 5433]);
        assert!(!w.ebpf.enabled);
        assert!(toml::from_str::<Wrap>("[ebpf]\nport = 1\n").is_err());
        let w: Wrap = toml::from_str("[ebpf]\non_existing = \"terminate\"\n").unwrap();
        assert_eq!(w.ebpf.on_existing, existing::OnExisting::Terminate);
        assert!(toml::from_str::<Wrap>("[ebpf]\non_existing = \"kill\"\n").is_err());
    }
}
