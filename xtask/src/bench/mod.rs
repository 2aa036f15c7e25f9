//! `cargo xtask bench` (being written).
mod pgbench;
mod pgbouncer;
mod report;
mod scenario;
mod stats;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// One repetition and short durations.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench: not written yet")
}
