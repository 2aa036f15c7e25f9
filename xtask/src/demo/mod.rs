//! `cargo xtask demo` (being written).
pub fn run(_no_wait: bool) -> anyhow::Result<()> {
    anyhow::bail!("demo: not written yet")
}
