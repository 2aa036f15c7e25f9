//! pgbench through the proxy in all three query modes, with the TPC-B invariants checked
//! on the server afterwards (no lost, duplicated or corrupted statements).

use interceptor_tests::{ALICE, PgCommand, Stack, StackOptions};

const CLIENTS: u32 = 4;
const TX_PER_CLIENT: u32 = 150;

fn run_mode(mode: &str) {
    let s = Stack::start(StackOptions::standard().pgbench_scale(1)).unwrap();
    let out = PgCommand::pgbench(&s.params(ALICE))
        .args(["-n", "-M", mode, "-c", &CLIENTS.to_string(), "-j", "2"])
        .args(["-t", &TX_PER_CLIENT.to_string()])
        .timeout(std::time::Duration::from_secs(120))
        .run()
        .unwrap();
    assert!(out.success(), "pgbench -M {mode}: {out:?}");
    let total = CLIENTS * TX_PER_CLIENT;
    assert!(
        out.stdout.contains(&format!(
            "number of transactions actually processed: {total}/{total}"
        )),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("number of failed transactions: 0"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!("query mode: {mode}")),
        "{out:?}"
    );

    // Every transaction landed exactly once and the balances agree.
    let check = s
        .pg
        .psql(
            "SELECT (SELECT count(*) FROM pgbench_history), \
                    (SELECT sum(delta) FROM pgbench_history) = (SELECT sum(abalance) FROM pgbench_accounts), \
                    (SELECT sum(delta) FROM pgbench_history) = (SELECT sum(bbalance) FROM pgbench_branches), \
                    (SELECT sum(delta) FROM pgbench_history) = (SELECT sum(tbalance) FROM pgbench_tellers)",
        )
        .unwrap();
    assert_eq!(check.trim(), format!("{total}|t|t|t"));
}

#[test]
fn pgbench_simple() {
    run_mode("simple");
}

#[test]
fn pgbench_extended() {
    run_mode("extended");
}

#[test]
fn pgbench_prepared() {
    run_mode("prepared");
}
