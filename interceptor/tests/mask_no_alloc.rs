#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! The masking engine's unchanged paths allocate nothing: a counting global allocator (in its
//! own test binary, so no other test runs under it) watches DataRow and COPY masking of rows
//! that no rule or detector touches.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use interceptor::mask::{ColumnOrigin, CopyColumn, CopyOptions, MaskRules, MaskSummary};

struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarding the caller's layout to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the pointer came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCS.with(|c| c.get());
    let out = f();
    let after = ALLOCS.with(|c| c.get());
    (out, after - before)
}

fn rules() -> MaskRules {
    let section: toml::Value = toml::from_str(
        "[[column]]\nmatch = \"public.accounts.card_number\"\nstrategy = \"redact\"\n\
         [[detector]]\nall = true\nstrategy = \"redact\"\n",
    )
    .expect("toml");
    MaskRules::from_toml(&[section], None).expect("rules")
}

fn text_column(name: &str, table: u32, attnum: i16, type_oid: u32) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(&table.to_be_bytes());
    b.extend_from_slice(&attnum.to_be_bytes());
    b.extend_from_slice(&type_oid.to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    b
}

#[test]
fn unchanged_data_rows_allocate_nothing() {
    let rules = rules();
    let mut rd = 3i16.to_be_bytes().to_vec();
    rd.extend(text_column("id", 16401, 1, 23));
    rd.extend(text_column("notes", 16401, 4, 25));
    rd.extend(text_column("doc", 0, 0, 114));
    let origin = |t: u32, a: i16| -> Option<ColumnOrigin> {
        let column = match (t, a) {
            (16401, 1) => "id",
            (16401, 4) => "notes",
            _ => return None,
        };
        Some(ColumnOrigin::new("public", "accounts", column))
    };
    let plan = rules
        .plan(&rd, &origin)
        .expect("plan")
        .expect("detectors plan");
    let mut row = 3i16.to_be_bytes().to_vec();
    for v in [
        &b"42"[..],
        b"shipped 3 parcels on 2024-03-11 12:30:45",
        br#"{"n":1,"ok":true}"#,
    ] {
        row.extend_from_slice(&(v.len() as i32).to_be_bytes());
        row.extend_from_slice(v);
    }
    row.extend_from_slice(&(-1i32).to_be_bytes());
    row[1] = 4; // 4 fields: add a NULL
    let mut rd4 = rd.clone();
    rd4[1] = 4;
    rd4.extend(text_column("maybe", 0, 0, 25));
    let plan4 = rules.plan(&rd4, &origin).expect("plan").expect("plan");
    let mut summary = MaskSummary::new();
    // Warm up this thread's regex caches (allocated once per thread).
    let _ = plan4.mask_data_row(&row, &mut summary);
    let (out, n) = allocations(|| plan4.mask_data_row(&row, &mut summary));
    assert!(out.expect("ok").is_none());
    assert_eq!(n, 0, "an unchanged DataRow allocated {n} times");
    // The relay's framed variant neither.
    let (out, n) = allocations(|| plan4.mask_data_row_message(&row, &mut summary));
    assert!(out.expect("ok").is_none());
    assert_eq!(n, 0, "an unchanged DataRow (framed) allocated {n} times");
    drop(plan);

    // A row that is masked does allocate (the counter works).
    let mut dirty = 4i16.to_be_bytes().to_vec();
    for v in [&b"1"[..], b"mail bob@example.com", b"{}", b"x"] {
        dirty.extend_from_slice(&(v.len() as i32).to_be_bytes());
        dirty.extend_from_slice(v);
    }
    let (out, n) = allocations(|| plan4.mask_data_row(&dirty, &mut summary));
    assert!(out.expect("ok").is_some());
    assert!(n > 0);
}

#[test]
fn unchanged_copy_rows_allocate_nothing() {
    let rules = rules();
    let columns = [
        CopyColumn {
            name: "id".into(),
            origin: Some(ColumnOrigin::new("public", "accounts", "id")),
            type_oid: 23,
        },
        CopyColumn {
            name: "notes".into(),
            origin: Some(ColumnOrigin::new("public", "accounts", "notes")),
            type_oid: 25,
        },
    ];
    let response = [0u8, 0, 2, 0, 0, 0, 0];
    let mut summary = MaskSummary::new();
    for options in [CopyOptions::text(), CopyOptions::csv()] {
        let csv = options.format == interceptor::mask::CopyFormat::Csv;
        let mut m = rules
            .copy_plan(&response, Some(&columns), options)
            .expect("copy plan")
            .expect("detectors plan");
        let data: &[u8] = if csv {
            b"1,\"quoted, clean\"\n2,plain\n"
        } else {
            b"1\tclean\\ttext\n2\t\\N\n"
        };
        let _ = m.feed(data, &mut summary);
        let (out, n) = allocations(|| m.feed(data, &mut summary));
        assert!(out.expect("ok").is_none());
        assert_eq!(n, 0, "unchanged COPY data allocated {n} times (csv: {csv})");
    }
}

#[test]
fn a_pseudonymised_cell_costs_two_allocations_per_row() {
    // The per-cell cost of a column rule (issue 6): the pseudonym and the new row, no
    // formatting temporaries, whatever the row's other columns hold.
    let section: toml::Value = toml::from_str(
        "[[column]]\nmatch = \"public.pgbench_accounts.filler\"\nstrategy = \"pseudonym\"\n",
    )
    .expect("toml");
    let rules =
        MaskRules::from_toml(&[section], Some(b"0123456789abcdef0123456789abcdef")).expect("rules");
    let mut rd = 4i16.to_be_bytes().to_vec();
    for (i, (name, type_oid)) in [("aid", 23), ("bid", 23), ("abalance", 23), ("filler", 1042)]
        .into_iter()
        .enumerate()
    {
        rd.extend(text_column(name, 16500, i as i16 + 1, type_oid));
    }
    let origin = |t: u32, a: i16| -> Option<ColumnOrigin> {
        let column = ["aid", "bid", "abalance", "filler"].get(usize::try_from(a - 1).ok()?)?;
        (t == 16500).then(|| ColumnOrigin::new("public", "pgbench_accounts", *column))
    };
    let plan = rules.plan(&rd, &origin).expect("plan").expect("rule plans");
    let filler = [b' '; 84];
    let mut row = 4i16.to_be_bytes().to_vec();
    for v in [&b"123456"[..], b"2", b"0", &filler] {
        row.extend_from_slice(&(v.len() as i32).to_be_bytes());
        row.extend_from_slice(v);
    }
    let mut summary = MaskSummary::new();
    let _ = plan.mask_data_row_message(&row, &mut summary);
    let (out, n) = allocations(|| plan.mask_data_row_message(&row, &mut summary));
    let out = out.expect("ok").expect("masked");
    assert_eq!(&out[..1], b"D");
    assert!(!out.windows(84).any(|w| w == filler), "filler survived");
    assert!(n <= 2, "one masked row allocated {n} times");
}
