//! Throughput of the masking engine with every built-in detector active: prints MB/s of
//! DataRow bytes scanned, for clean rows (the common case) and rows with 1% sensitive values;
//! then `pgbench_accounts` rows (what `cargo xtask bench` streams) under one column rule and
//! under all detectors, with ns per row.
//!
//! `cargo run --release -p interceptor --example mask_throughput [NAME-FILTER]`

use std::time::Instant;

use interceptor::mask::{ColumnOrigin, MaskRules, MaskSummary};

fn row_description(columns: usize) -> Vec<u8> {
    let mut b = (columns as i16).to_be_bytes().to_vec();
    for i in 0..columns {
        b.extend_from_slice(format!("c{i}\0").as_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // table oid
        b.extend_from_slice(&0i16.to_be_bytes()); // attnum
        b.extend_from_slice(&25u32.to_be_bytes()); // text
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    b
}

fn data_row(values: &[&str]) -> Vec<u8> {
    let mut b = (values.len() as i16).to_be_bytes().to_vec();
    for v in values {
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// A RowDescription of `pgbench_accounts` (text format): aid, bid, abalance int4, filler
/// char(84), all from table `ACCOUNTS_OID`.
const ACCOUNTS_OID: u32 = 16400;
const ACCOUNTS_COLUMNS: [(&str, u32); 4] =
    [("aid", 23), ("bid", 23), ("abalance", 23), ("filler", 1042)];

fn accounts_description() -> Vec<u8> {
    let mut b = (ACCOUNTS_COLUMNS.len() as i16).to_be_bytes().to_vec();
    for (i, (name, type_oid)) in ACCOUNTS_COLUMNS.iter().enumerate() {
        b.extend_from_slice(format!("{name}\0").as_bytes());
        b.extend_from_slice(&ACCOUNTS_OID.to_be_bytes());
        b.extend_from_slice(&(i as i16 + 1).to_be_bytes());
        b.extend_from_slice(&type_oid.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    b
}

fn accounts_origin(table: u32, attnum: i16) -> Option<ColumnOrigin> {
    let (name, _) = ACCOUNTS_COLUMNS.get(usize::try_from(attnum).ok()?.checked_sub(1)?)?;
    (table == ACCOUNTS_OID).then(|| ColumnOrigin::new("public", "pgbench_accounts", *name))
}

fn accounts_rows() -> Vec<Vec<u8>> {
    let filler = " ".repeat(84);
    (1..=100_000)
        .map(|aid: u32| {
            let aid_text = aid.to_string();
            let bid_text = (aid / 100_000 + 1).to_string();
            data_row(&[&aid_text, &bid_text, "0", &filler])
        })
        .collect()
}

fn accounts(name: &str, section: &str) -> anyhow::Result<()> {
    let rules = MaskRules::from_toml(
        &[toml::from_str(section)?],
        Some(b"benchmark-key-0123456789"),
    )?;
    let plan = rules
        .plan(&accounts_description(), &accounts_origin)?
        .ok_or_else(|| anyhow::anyhow!("{name}: the rule must plan the result"))?;
    let rows = accounts_rows();
    measure(name, &rows, &plan)
}

fn measure(name: &str, rows: &[Vec<u8>], plan: &interceptor::mask::MaskPlan) -> anyhow::Result<()> {
    // An argument runs only the cases whose name contains it (for profiling one case).
    if let Some(filter) = std::env::args().nth(1)
        && !name.contains(&filter)
    {
        return Ok(());
    }
    let bytes: usize = rows.iter().map(Vec::len).sum();
    let mut summary = MaskSummary::new();
    let rounds = 20;
    let start = Instant::now();
    let mut changed = 0usize;
    for _ in 0..rounds {
        for r in rows {
            if plan.mask_data_row(r, &mut summary)?.is_some() {
                changed += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mb = (bytes * rounds) as f64 / 1e6;
    println!(
        "{name:<36} {:>8.1} MB/s {:>6.0} ns/row  ({} rows, {:.1} MB, {} rows rewritten)",
        mb / secs,
        secs * 1e9 / (rows.len() * rounds) as f64,
        rows.len() * rounds,
        mb,
        changed
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let section: toml::Value = toml::from_str(
        "[[detector]]\nall = true\nstrategy = \"redact\"\n\
         [[detector]]\nname = \"employee_id\"\nregex = \"EMP-[0-9]{6}\"\nstrategy = \"redact\"\n",
    )?;
    let rules = MaskRules::from_toml(&[section], Some(b"benchmark-key-0123456789"))?;
    let no_origin = |_: u32, _: i16| -> Option<ColumnOrigin> { None };
    let plan = rules
        .plan(&row_description(3), &no_origin)?
        .ok_or_else(|| anyhow::anyhow!("detectors must plan every result"))?;

    let clean = [
        "Order 88213 shipped to warehouse North-7 on 2024-03-11, 3 parcels",
        "The quick brown fox jumps over the lazy dog while the cat sleeps",
        "status=delivered carrier=UPS weight=12.5kg dims=30x20x10 ref=A-19",
    ];
    let dirty = [
        "Order 88213 paid with 4111 1111 1111 1111 by alice@example.com",
        "call +44 20 7946 0958 or ssn 123-45-6789 from 192.168.10.20 ok",
        "Authorization: Bearer abcDEF1234567890xyz and AKIAIOSFODNN7EXAMPLE",
    ];
    let clean_rows: Vec<Vec<u8>> = (0..20_000).map(|_| data_row(&clean)).collect();
    let mixed_rows: Vec<Vec<u8>> = (0..20_000)
        .map(|i| data_row(if i % 100 == 0 { &dirty } else { &clean }))
        .collect();
    let json_row = r#"{"id":1,"name":"Bob","note":"nothing here at all, just words and 12345"}"#;
    let json_rows: Vec<Vec<u8>> = (0..20_000)
        .map(|_| data_row(&[json_row, json_row, json_row]))
        .collect();
    println!("all built-in detectors and one custom regex active");
    measure("clean text rows", &clean_rows, &plan)?;
    measure("1% rows with hits", &mixed_rows, &plan)?;
    measure("clean JSON-ish rows", &json_rows, &plan)?;
    println!("pgbench_accounts rows (aid, bid, abalance, 84 blank filler)");
    accounts(
        "filler pseudonymised (column rule)",
        "[[column]]\nmatch = \"public.pgbench_accounts.filler\"\nstrategy = \"pseudonym\"\n",
    )?;
    accounts(
        "filler redacted (column rule)",
        "[[column]]\nmatch = \"public.pgbench_accounts.filler\"\nstrategy = \"redact\"\n",
    )?;
    accounts(
        "all detectors (no hits)",
        "[[detector]]\nall = true\nstrategy = \"redact\"\n",
    )?;
    Ok(())
}
