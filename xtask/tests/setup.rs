//! `cargo xtask setup` is idempotent: once everything is installed, running it again installs
//! nothing and does not even refresh the package lists.

use std::process::Command;
use std::time::{Duration, Instant};

fn setup() -> (String, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("setup")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cargo xtask setup failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, started.elapsed())
}

#[test]
fn second_setup_installs_nothing() {
    // The first run installs whatever this machine lacks (nothing, after CI's own setup).
    setup();
    let (stdout, took) = setup();
    assert!(
        !stdout.contains("apt-get"),
        "second run used apt-get:\n{stdout}"
    );
    assert!(
        !stdout.contains("installing:"),
        "second run installed:\n{stdout}"
    );
    for what in ["PostgreSQL server binaries", "psql", "pgbouncer"] {
        assert!(
            stdout.contains(&format!("ok: {what}")),
            "{what} not reported present:\n{stdout}"
        );
    }
    assert!(stdout.contains("setup complete"), "{stdout}");
    assert!(
        took < Duration::from_secs(60),
        "a no-op setup took {took:?}"
    );
}
