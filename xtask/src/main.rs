//! `cargo xtask <command>`: the project's automation (setup, tests, demo, benchmark).

mod apt;
mod bench;
mod build_ebpf;
mod cmd;
mod demo;
mod differential;
mod fuzz;
mod harness_env;
mod package;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "interceptor's project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: PostgreSQL, psql, pgbouncer, libclang, sqlsmith, the eBPF toolchain (Debian, root).
    Setup,
    /// Build interceptor, run every workspace test against it, then the policy tests.
    Test,
    /// Build the eBPF programs (interceptor-ebpf).
    BuildEbpf {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Start PostgreSQL with sample data and interceptor in front of it, and show a session.
    Demo {
        /// Run the scripted session and exit instead of waiting for Ctrl-C.
        #[arg(long)]
        no_wait: bool,
    },
    /// Compare direct PostgreSQL, interceptor and pgbouncer with pgbench and a large stream.
    Bench(bench::BenchArgs),
    /// Check the policy classifier against PostgreSQL's planner on a generated corpus.
    Differential(differential::DifferentialArgs),
    /// Build the Debian package (binary, unit, example config, policies, docs, man pages,
    /// completions, maintainer scripts) into target/debian.
    Package(package::PackageArgs),
    /// Run every libFuzzer target in fuzz/ (needs the nightly toolchain and cargo-fuzz).
    Fuzz(fuzz::FuzzArgs),
    /// Sustained mixed load through interceptor, then audit vs PostgreSQL counts, RSS and fds.
    Soak(soak::SoakArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Test => test::run(),
        // build() prints where the object went.
        Task::BuildEbpf { release } => build_ebpf::build(release).map(drop),
        Task::Demo { no_wait } => demo::run(no_wait),
        Task::Bench(args) => bench::run(&args),
        Task::Differential(args) => differential::run(&args),
        Task::Package(args) => package::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Soak(args) => soak::run(&args),
    }
}
