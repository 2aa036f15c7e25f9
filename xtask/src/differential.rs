//! `cargo xtask differential --minutes N`: the planner oracle (interceptor/tests/planner_oracle.rs)
//! with a larger generated corpus, one sqlsmith seed after another until the time is up.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::cmd;

#[derive(clap::Args)]
pub struct DifferentialArgs {
    /// How long to keep generating and checking statements.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Statements sqlsmith generates per round (one cluster and seed per round).
    #[arg(long, default_value_t = 2000)]
    pub queries: u64,
}

pub fn run(args: &DifferentialArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.minutes * 60);
    let mut seed = 1u64;
    loop {
        let mut test = cmd::cargo();
        test.args([
            "test",
            "-p",
            "interceptor",
            "--test",
            "planner_oracle",
            "classifier_covers_what_the_planner_finds",
            "--",
            "--nocapture",
        ])
        .env("POLICY_ORACLE_QUERIES", args.queries.to_string())
        .env("POLICY_ORACLE_SEED", seed.to_string());
        println!("$ {} (seed {seed})", cmd::display(&test));
        let status = test.status()?;
        if !status.success() {
            bail!("planner oracle failed with sqlsmith seed {seed} ({status})");
        }
        seed += 1;
        if Instant::now() >= deadline {
            println!("differential: {} rounds clean", seed - 1);
            return Ok(());
        }
    }
}
