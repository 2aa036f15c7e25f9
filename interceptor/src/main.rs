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
        /// Log lines as text or JSON; `auto` is JSON under systemd's journal, text elsewhere.
        #[arg(long, value_enum, default_value_t, env = "INTERCEPTOR_LOG_FORMAT")]
        log_format: interceptor::cli::logging::LogFormat,
        /// Start even though the audit store lost records or fails verification (the daemon
        /// refuses otherwise); the accepted gap becomes an `audit_gap` record in the chain.
        #[arg(long)]
        accept_audit_gap: bool,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// The configuration file to check.
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
        command: interceptor::cli::audit::AuditCommand,
    },
    /// Held statements: list, show, approve or deny them (through the running daemon).
    Approvals {
        /// The daemon's configuration file (for the admin socket's path).
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: PathBuf,
        /// Print the daemon's answer as JSON (for scripts) instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: interceptor::cli::approval::ApprovalsCommand,
    },
    /// Time-bound grants: request, list, revoke.
    Access {
        /// The daemon's configuration file (for the admin socket's path).
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: PathBuf,
        /// Print the daemon's answer as JSON (for scripts) instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: interceptor::cli::approval::AccessCommand,
    },
    /// Kernel interception: status of the attached programs, or a clean uninstall.
    #[command(subcommand)]
    Ebpf(interceptor::cli::ebpf::EbpfCommand),
    /// Check this host: kernel features, cgroup2, bpffs, where PostgreSQL listens, bypass paths.
    Doctor {
        /// The daemon's configuration file, to check its [ebpf] settings too.
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Sessions open now (identity, process, role, database, state, statement, bytes), or
    /// `kill ID` to end one. Through the running daemon's admin socket.
    Sessions {
        /// The daemon's configuration file (for the admin socket's path).
        #[arg(long, short, env = "INTERCEPTOR_CONFIG", global = true)]
        config: Option<PathBuf>,
        /// JSON for scripts.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: Option<interceptor::cli::sessions::SessionsCommand>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on standard output.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on standard output, or write one page per command into DIR.
    Man {
        /// Write `interceptor.1`, `interceptor-audit.1`, ... into this directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Write, lint, explain and test policy files.
    #[command(subcommand)]
    Policy(interceptor::cli::policy::PolicyCommand),
    /// Put interceptor on this PostgreSQL host: user, directories, generated config, systemd
    /// unit; checks pg_hba.conf and open connections. A dry run unless --apply.
    Install(interceptor::cli::install::InstallArgs),
    /// Undo exactly what `install --apply` did (from its manifest). A dry run unless --apply.
    Uninstall(interceptor::cli::install::UninstallArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            log_format,
            accept_audit_gap,
        } => {
            interceptor::cli::logging::init(log_format);
            let path = config.clone();
            let mut config = Config::load(&config)?;
            config.audit.accept_gap = accept_audit_gap;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(interceptor::server::run_reloadable(config, Some(path)))
        }
        Command::CheckConfig { config } => {
            let c = Config::load(&config)?;
            let missing = interceptor::server::check_config(&c)?;
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
            if let interceptor::cli::audit::AuditCommand::Keygen { out } = &command {
                return interceptor::cli::audit::keygen(out);
            }
            let config =
                config.context("--config is required (the daemon's configuration file)")?;
            let config = Config::load(&config)?;
            interceptor::cli::audit::run(
                command,
                &config.audit,
                config.admin.as_ref().map(|a| a.socket.as_path()),
            )
        }
        Command::Approvals {
            config,
            json,
            command,
        } => {
            let socket = approvals_socket(&config)?;
            interceptor::cli::approval::run_approvals(command, &socket, json)?;
            Ok(())
        }
        Command::Access {
            config,
            json,
            command,
        } => {
            let socket = approvals_socket(&config)?;
            interceptor::cli::approval::run_access(command, &socket, json)?;
            Ok(())
        }
        Command::Ebpf(cmd) => {
            // A plain message and a failing exit, no backtrace: these are operator errors
            // (permissions, a wrong pin dir), not bugs.
            if let Err(e) = interceptor::cli::ebpf::run_command(&cmd, &mut std::io::stdout().lock())
            {
                eprintln!("interceptor ebpf: {e}");
                std::process::exit(1);
            }
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
            let ok = interceptor::cli::policy::run(&cmd, &mut std::io::stdout().lock())?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Sessions {
            config,
            json,
            command,
        } => {
            let config =
                config.context("--config is required (the daemon's configuration file)")?;
            interceptor::cli::sessions::run(&config, command, json, &mut std::io::stdout().lock())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            // Into a buffer: `generate` panics on a write error (e.g. a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "interceptor", &mut script);
            use std::io::Write;
            std::io::stdout().write_all(&script)?;
            Ok(())
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            let cmd = Cli::command();
            match dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    clap_mangen::generate_to(cmd, &dir).with_context(|| {
                        format!("cannot write man pages into {}", dir.display())
                    })?;
                }
                None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
            }
            Ok(())
        }
        Command::Install(args) => {
            interceptor::cli::install::install(&args, &mut std::io::stdout().lock())
        }
        Command::Uninstall(args) => {
            interceptor::cli::install::uninstall(&args, &mut std::io::stdout().lock())
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
            println!("{}", interceptor::cli::hash_password(pw));
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every option and argument of every subcommand says what it is for in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} {} (the subcommand)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "interceptor", &mut missing);
        assert!(
            missing.is_empty(),
            "arguments without help:\n{}",
            missing.join("\n")
        );
    }
}
