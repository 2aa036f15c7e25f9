//! The `interceptor` command: a thin layer over the library.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use interceptor::config::Config;

#[derive(Parser)]
#[command(
    name = "interceptor",
    version,
    about = "A PostgreSQL gateway: identity, policy, masking and audit for every statement"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The TOML configuration file.
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Read a password on standard input and print its SCRAM-SHA-256 verifier for `[identity.*] secret`.
    HashPassword,
    /// Query, replay, verify and export the audit trail (works while the daemon runs).
    Audit {
        /// The daemon's configuration file (for the store and admin socket paths).
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: interceptor::audit::cli::AuditCommand,
    },
    /// Held statements: list, show, approve or deny them (through the running daemon).
    Approvals {
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: PathBuf,
        #[command(subcommand)]
        command: interceptor::approval::cli::ApprovalsCommand,
    },
    /// Time-bound grants: request, list, revoke.
    Access {
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: PathBuf,
        #[command(subcommand)]
        command: interceptor::approval::cli::AccessCommand,
    },
    /// Kernel interception: status of the attached programs, or a clean uninstall.
    #[command(subcommand)]
    Ebpf(interceptor::ebpf::EbpfCommand),
    /// Check this host: kernel features, cgroup2, bpffs, where PostgreSQL listens, bypass paths.
    Doctor {
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Write, lint, explain and test policy files.
    #[command(subcommand)]
    Policy(interceptor::policy::cli::PolicyCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            init_tracing();
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(interceptor::server::run(config))
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            let loaded = interceptor::server::Loaded::load(&c)?;
            let missing = loaded.roles_without_secret();
            if !missing.is_empty() {
                for (policy, role) in &missing {
                    eprintln!(
                        "{}: policy {policy:?} logs in as upstream role {role:?}, which has no \
                         password in the secrets file (add `[roles] {role} = \"...\"` there)",
                        config.display()
                    );
                }
                anyhow::bail!(
                    "{} upstream role(s) without a secret; their logins would fail",
                    missing.len()
                );
            }
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Audit { config, command } => {
            if let interceptor::audit::cli::AuditCommand::Keygen { out } = &command {
                return interceptor::audit::cli::keygen(out);
            }
            let config =
                config.context("--config is required (the daemon's configuration file)")?;
            let config = Config::load(&config)?;
            interceptor::audit::cli::run(command, &config)
        }
        Command::Approvals { config, command } => {
            let socket = approvals_socket(&config)?;
            interceptor::approval::cli::run_approvals(command, &socket)?;
            Ok(())
        }
        Command::Access { config, command } => {
            let socket = approvals_socket(&config)?;
            interceptor::approval::cli::run_access(command, &socket)?;
            Ok(())
        }
        Command::Ebpf(cmd) => {
            interceptor::ebpf::run_command(&cmd, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Doctor { config } => {
            let findings = match config {
                Some(c) => {
                    let c = Config::load(&c)?;
                    interceptor::ebpf::doctor_with(
                        &c.ebpf,
                        Some(interceptor::ebpf::Account::current()),
                    )
                }
                None => interceptor::ebpf::doctor(),
            };
            let mut failed = false;
            for f in &findings {
                println!("{f}");
                failed |= f.severity == interceptor::ebpf::Severity::Fail;
            }
            if failed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Policy(cmd) => {
            let ok = interceptor::policy::cli::run(&cmd, &mut std::io::stdout().lock())?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::HashPassword => {
            let mut pw = String::new();
            std::io::stdin()
                .read_to_string(&mut pw)
                .context("cannot read the password from standard input")?;
            let pw = pw.trim_end_matches(['\r', '\n']);
            if pw.is_empty() {
                anyhow::bail!("empty password");
            }
            println!("{}", interceptor::identity::scram::hash_password(pw));
            Ok(())
        }
    }
}

fn approvals_socket(config: &std::path::Path) -> anyhow::Result<PathBuf> {
    let config = Config::load(config)?;
    config
        .approvals
        .and_then(|a| a.socket)
        .context("the config has no [approvals] socket: approvals are not enabled")
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("INTERCEPTOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
