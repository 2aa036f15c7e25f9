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
            interceptor::server::ServerState::new(c)?;
            println!("{}: ok", config.display());
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

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("INTERCEPTOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
