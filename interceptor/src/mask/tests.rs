//! Unit tests of the masking engine, on protocol message bodies built byte by byte and
//! cross-checked with postgres-protocol's backend parser.

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;

use super::strategy::luhn_valid;
use super::*;
use crate::identity::{Identity, Proof};

// ---------------------------------------------------------------- message builders

const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const INT8: u32 = 20;
const INT4: u32 = 23;
const JSON: u32 = 114;
const JSONB: u32 = 3802;
const UUID: u32 = 2950;

struct Field<'a> {
    name: &'a str,
    table: u32,
    attnum: i16,
    type_oid: u32,
    format: i16,
}

fn f(name: &str, table: u32, attnum: i16, type_oid: u32, format: i16) -> Field<'_> {
    Field {
        name,
        table,
        attnum,
        type_oid,
        format,
    }
}

fn row_description(fields: &[Field<'_>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(fields.len() as i16).to_be_bytes());
    for f in fields {
        b.extend_from_slice(f.name.as_bytes());
        b.push(0);
        b.extend_from_slice(&f.table.to_be_bytes());
        b.extend_from_slice(&f.attnum.to_be_bytes());
        b.extend_from_slice(&f.type_oid.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&f.format.to_be_bytes());
    }
    b
}

fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        match v {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
        }
    }
    b
}

/// Parse a DataRow body with postgres-protocol (as a client library would) into its values.
fn decode_row(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let mut frame = BytesMut::new();
    frame.extend_from_slice(b"D");
    frame.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    frame.extend_from_slice(body);
    match Message::parse(&mut frame) {
        Ok(Some(Message::DataRow(row))) => {
            let buf = row.buffer();
            let mut out = Vec::new();
            let mut ranges = row.ranges();
            while let Ok(Some(r)) = fallible_iterator::FallibleIterator::next(&mut ranges) {
                out.push(r.map(|r| buf[r].to_vec()));
            }
            assert!(frame.is_empty(), "DataRow frame fully consumed");
            out
        }
        other => panic!("not a valid DataRow: {:?}", other.is_ok()),
    }
}

fn text(v: &Option<Vec<u8>>) -> String {
    String::from_utf8(v.clone().expect("non-null")).expect("utf-8")
}

fn error_body(fields: &[(u8, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (code, v) in fields {
        b.push(*code);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    b
}

fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut frame = BytesMut::new();
    frame.extend_from_slice(b"E");
    frame.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    frame.extend_from_slice(body);
    let Ok(Some(Message::ErrorResponse(e))) = Message::parse(&mut frame) else {
        panic!("not a valid ErrorResponse");
    };
    let mut out = Vec::new();
    let mut it = e.fields();
    while let Ok(Some(field)) = fallible_iterator::FallibleIterator::next(&mut it) {
        out.push((
            field.type_(),
            String::from_utf8_lossy(field.value_bytes()).into_owned(),
        ));
    }
    out
}

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const OTHER_KEY: &[u8] = b"fedcba9876543210fedcba9876543210";

fn rules(toml_text: &str) -> MaskRules {
    rules_with_key(toml_text, Some(KEY))
}

fn rules_with_key(toml_text: &str, key: Option<&[u8]>) -> MaskRules {
    let doc: toml::Value = toml::from_str(toml_text).expect("toml");
    let section = doc.get("mask").expect("[mask]").clone();
    MaskRules::from_toml(&[section], key).expect("rules")
}

fn detector(kind: &str, strategy: &str) -> MaskRules {
    rules(&format!(
        "[mask]\n[[mask.detector]]\nkind = \"{kind}\"\nstrategy = \"{strategy}\"\n"
    ))
}

fn no_origins(_: u32, _: i16) -> Option<ColumnOrigin> {
    None
}

/// Mask one text value in a one-column text result.
fn mask_text(rules: &MaskRules, value: &str) -> Option<String> {
    let rd = row_description(&[f("v", 0, 0, TEXT, 0)]);
    let plan = rules.plan(&rd, &no_origins).expect("plan").expect("a plan");
    let mut summary = MaskSummary::new();
    let out = plan
        .mask_data_row(&data_row(&[Some(value.as_bytes())]), &mut summary)
        .expect("mask")?;
    Some(text(&decode_row(&out)[0]))
}

fn identity(subject: &str, groups: &[&str]) -> Identity {
    Identity {
        subject: subject.into(),
        display_name: subject.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        proof: Proof::ScramSha256,
        process: None,
    }
}

const ACCOUNTS: u32 = 16401;

fn accounts_origin(table: u32, attnum: i16) -> Option<ColumnOrigin> {
    let column = match (table, attnum) {
        (ACCOUNTS, 1) => "id",
        (ACCOUNTS, 2) => "card_number",
        (ACCOUNTS, 3) => "email",
        (ACCOUNTS, 4) => "notes",
        _ => return None,
    };
    Some(ColumnOrigin::new("public", "accounts", column))
}

const EXAMPLE_RULES: &str = r#"
[mask]
exempt_groups = ["dba"]

[[mask.column]]
match = "public.accounts.card_number"
strategy = "partial"
keep_last = 4

[[mask.column]]
name_pattern = "(?i)email"
strategy = "pseudonym"

[[mask.detector]]
kind = "card"
strategy = "redact"

[[mask.detector]]
name = "employee_id"
regex = "EMP-[0-9]{6}"
strategy = "redact"
"#;

// ---------------------------------------------------------------- rules

#[test]
fn example_rules_parse_and_exempt_dba() {
    let r = rules(EXAMPLE_RULES);
    assert!(!r.is_empty());
    assert!(r.needs_origins());
    assert!(r.has_detectors());
    let dba = r.for_identity(&identity("root", &["dba"])).expect("dba");
    assert!(dba.is_empty());
    let analyst = r
        .for_identity(&identity("ann", &["analysts"]))
        .expect("ann");
    assert!(!analyst.is_empty());
}

#[test]
fn per_rule_exemptions_by_group_and_subject() {
    let r = rules(
        r#"
[mask]
[[mask.column]]
name_pattern = "ssn"
strategy = "redact"
exempt_subjects = ["hr-bot"]
[[mask.detector]]
kind = "email"
strategy = "redact"
exempt_groups = ["support"]
"#,
    );
    let bot = r.for_identity(&identity("hr-bot", &[])).expect("bot");
    assert!(!bot.needs_origins());
    assert!(bot.has_detectors());
    let support = r.for_identity(&identity("sam", &["support"])).expect("sam");
    assert!(support.needs_origins());
    assert!(!support.has_detectors());
}

#[test]
fn invalid_rules_are_refused() {
    let bad = [
        "[mask]\nunknown = 1\n",
        "[mask]\n[[mask.column]]\nmatch = \"a.b.c\"\nname_pattern = \"x\"\nstrategy = \"redact\"\n",
        "[mask]\n[[mask.column]]\nmatch = \"a.b\"\nstrategy = \"redact\"\n",
        "[mask]\n[[mask.column]]\nmatch = \"a.b.c\"\nstrategy = \"shred\"\n",
        "[mask]\n[[mask.column]]\nmatch = \"a.b.c\"\nstrategy = \"redact\"\nkeep_last = 4\n",
        "[mask]\n[[mask.column]]\nname_pattern = \"(\"\nstrategy = \"redact\"\n",
        "[mask]\n[[mask.column]]\nmatch = \"a.b.c\"\nstrategy = \"redact\"\nreplacement = \"a\\\"b\"\n",
        "[mask]\n[[mask.detector]]\nkind = \"dna\"\nstrategy = \"redact\"\n",
        "[mask]\n[[mask.detector]]\nname = \"x\"\nregex = \"a*\"\nstrategy = \"redact\"\n",
        "[mask]\n[[mask.detector]]\nname = \"card\"\nregex = \"a\"\nstrategy = \"redact\"\n",
        "[mask]\n[[mask.detector]]\nkind = \"card\"\nall = true\nstrategy = \"redact\"\n",
    ];
    for text in bad {
        let doc: toml::Value = toml::from_str(text).expect("toml");
        let section = doc.get("mask").expect("mask").clone();
        assert!(
            MaskRules::from_toml(&[section], Some(KEY)).is_err(),
            "accepted: {text}"
        );
    }
    // Pseudonyms need a key, and keys must be long enough.
    let doc: toml::Value =
        toml::from_str("[mask]\n[[mask.column]]\nname_pattern = \"x\"\nstrategy = \"pseudonym\"\n")
            .expect("toml");
    let section = doc.get("mask").expect("mask").clone();
    assert!(MaskRules::from_toml(std::slice::from_ref(&section), None).is_err());
    assert!(MaskRules::from_toml(std::slice::from_ref(&section), Some(b"short")).is_err());
    assert!(MaskRules::from_toml(&[section], Some(KEY)).is_ok());
}

#[test]
fn strongest_strategy_wins_across_policies() {
    let a: toml::Value = toml::from_str(
        "[[column]]\nname_pattern = \"email\"\nstrategy = \"partial\"\nkeep_domain = true\n",
    )
    .expect("toml");
    let b: toml::Value =
        toml::from_str("[[column]]\nname_pattern = \"email\"\nstrategy = \"redact\"\n")
            .expect("toml");
    let r = MaskRules::from_toml(&[a, b], None).expect("rules");
    let rd = row_description(&[f("email", 0, 0, TEXT, 0)]);
    let plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    let mut s = MaskSummary::new();
    let out = plan
        .mask_data_row(&data_row(&[Some(b"bob@example.com")]), &mut s)
        .expect("mask")
        .expect("changed");
    assert_eq!(text(&decode_row(&out)[0]), "[REDACTED]");
}

// ---------------------------------------------------------------- plans and DataRows

#[test]
fn untouched_result_has_no_plan_and_clean_rows_are_unchanged() {
    let r = rules(
        "[mask]\n[[mask.column]]\nmatch = \"public.accounts.card_number\"\nstrategy = \"redact\"\n",
    );
    let rd = row_description(&[
        f("id", ACCOUNTS, 1, INT4, 0),
        f("notes", ACCOUNTS, 4, TEXT, 0),
    ]);
    assert!(r.plan(&rd, &accounts_origin).expect("plan").is_none());

    // With detectors every result is planned, but clean rows cost no allocation.
    let r = rules(EXAMPLE_RULES);
    let plan = r
        .plan(&rd, &accounts_origin)
        .expect("plan")
        .expect("scan plan");
    let row = data_row(&[Some(b"42"), Some(b"nothing to see here, order 12345")]);
    let mut summary = MaskSummary::new();
    // (tests/mask_no_alloc.rs proves this path allocates nothing)
    assert!(
        plan.mask_data_row(&row, &mut summary)
            .expect("ok")
            .is_none()
    );
    assert!(summary.is_empty());
}

#[test]
fn column_rules_by_origin_and_name_pattern() {
    let r = rules(EXAMPLE_RULES);
    let rd = row_description(&[
        f("id", ACCOUNTS, 1, INT4, 0),
        f("cn", ACCOUNTS, 2, TEXT, 0), // aliased: the origin still matches
        f("contact_email", 0, 0, TEXT, 0),
        f("notes", ACCOUNTS, 4, TEXT, 0),
    ]);
    let plan = r.plan(&rd, &accounts_origin).expect("plan").expect("some");
    let row = data_row(&[
        Some(b"7"),
        Some(b"4111 1111 1111 1111"),
        Some(b"alice@example.com"),
        Some(b"staff EMP-123456 paid with 5500 0000 0000 0004"),
    ]);
    let mut summary = MaskSummary::new();
    let out = plan
        .mask_data_row(&row, &mut summary)
        .expect("mask")
        .expect("changed");
    let v = decode_row(&out);
    assert_eq!(text(&v[0]), "7");
    assert_eq!(text(&v[1]), "**** **** **** 1111");
    let pseudo = text(&v[2]);
    assert!(
        pseudo.starts_with("p_") && pseudo.ends_with("@pseudonym.invalid"),
        "{pseudo}"
    );
    assert_eq!(
        text(&v[3]),
        "staff [REDACTED:employee_id] paid with [REDACTED:card]"
    );
    let out_text = String::from_utf8_lossy(&out);
    for raw in ["4111 1111", "alice", "EMP-123456", "5500 0000"] {
        assert!(!out_text.contains(raw), "leaked {raw}");
    }
    let col = |s: &str| MaskTarget::Column(s.into());
    assert_eq!(
        summary.count(&col("public.accounts.card_number"), StrategyKind::Partial),
        1
    );
    assert_eq!(
        summary.count(&col("contact_email"), StrategyKind::Pseudonym),
        1
    );
    assert_eq!(
        summary.count(&MaskTarget::Detector("card".into()), StrategyKind::Redact),
        1
    );
    assert_eq!(summary.total(), 4);
    // What the audit record's masked-column list is built from.
    let lines: Vec<(String, &str, u64)> = summary
        .entries()
        .map(|c| (c.target.label(), c.strategy.as_str(), c.values))
        .collect();
    assert!(lines.contains(&("public.accounts.card_number".into(), "partial", 1)));
    assert!(lines.contains(&("detector:card".into(), "redact", 1)));
    // The audit summary names columns and detectors, never values.
    let json = serde_json::to_string(&summary).expect("json");
    assert!(json.contains("public.accounts.card_number") && !json.contains("4111"));
}

#[test]
fn unresolved_origin_fails_closed() {
    let r = rules(EXAMPLE_RULES);
    let rd = row_description(&[f("x", 99999, 1, TEXT, 0)]);
    assert!(matches!(
        r.plan(&rd, &accounts_origin),
        Err(MaskError::UnresolvedOrigin {
            table_oid: 99999,
            attnum: 1
        })
    ));
}

#[test]
fn every_strategy_on_a_text_column() {
    let card = "4111111111111111";
    let email = "alice@example.com";
    let run = |strategy: &str, extra: &str, value: &str, key: Option<&[u8]>| {
        let r = rules_with_key(
            &format!(
                "[mask]\n[[mask.column]]\nname_pattern = \"^v$\"\nstrategy = \"{strategy}\"\n{extra}"
            ),
            key,
        );
        let rd = row_description(&[f("v", 0, 0, TEXT, 0)]);
        let plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
        let mut s = MaskSummary::new();
        let out = plan
            .mask_data_row(&data_row(&[Some(value.as_bytes())]), &mut s)
            .expect("mask")
            .expect("changed");
        decode_row(&out).remove(0)
    };
    assert_eq!(text(&run("redact", "", card, None)), "[REDACTED]");
    assert_eq!(
        text(&run("redact", "replacement = \"<hidden>\"", card, None)),
        "<hidden>"
    );
    assert_eq!(run("null", "", card, None), None);
    assert_eq!(
        text(&run("partial", "keep_last = 4", card, None)),
        "************1111"
    );
    assert_eq!(
        text(&run(
            "partial",
            "keep_first = 1\nkeep_last = 2",
            "Jonathan",
            None
        )),
        "J*****an"
    );
    // Asking to keep everything keeps nothing.
    assert_eq!(text(&run("partial", "keep_last = 8", "abc", None)), "***");
    assert_eq!(
        text(&run("partial", "keep_domain = true", email, None)),
        "***@example.com"
    );

    let fpe = text(&run("format_preserving", "", card, Some(KEY)));
    assert_eq!(fpe.len(), 16);
    assert!(fpe.starts_with('4') && fpe != card);
    let digits: Vec<u8> = fpe.bytes().map(|b| b - b'0').collect();
    assert!(luhn_valid(&digits), "{fpe} must stay Luhn-valid");
    let spaced = text(&run(
        "format_preserving",
        "",
        "5500 0000 0000 0004",
        Some(KEY),
    ));
    assert_eq!(spaced.len(), 19);
    assert_eq!(spaced.as_bytes()[4], b' ');
    let fpe_email = text(&run("format_preserving", "", email, Some(KEY)));
    assert_eq!(fpe_email.len(), email.len());
    assert!(fpe_email.contains('@') && fpe_email.ends_with(".com"));
    assert!(!fpe_email.contains("alice") && !fpe_email.contains("example"));
    // Without a key the output is a constant pattern, carrying nothing of the input.
    assert_eq!(
        text(&run("format_preserving", "", "bob@mail.org", None)),
        "aaa@aaaa.org"
    );
}

#[test]
fn pseudonyms_are_stable_across_instances_and_differ_across_keys() {
    let toml = "[mask]\n[[mask.column]]\nname_pattern = \"^v$\"\nstrategy = \"pseudonym\"\n";
    let a1 = rules_with_key(toml, Some(KEY));
    let a2 = rules_with_key(toml, Some(KEY));
    let b = rules_with_key(toml, Some(OTHER_KEY));
    let p = |r: &MaskRules, v: &str| mask_text(r, v).expect("masked");
    assert_eq!(p(&a1, "carol"), p(&a2, "carol"));
    assert_ne!(p(&a1, "carol"), p(&b, "carol"));
    assert_ne!(p(&a1, "carol"), p(&a1, "carola"));
    assert_eq!(p(&a1, "carol").len(), 18);
    assert!(!p(&a1, "carol").contains("carol"));
}

#[test]
fn pseudonym_output_is_the_documented_hmac() {
    // p_ + the first 8 bytes, in lower-case hex, of HMAC-SHA256(key, be32(len(domain)) ||
    // domain || be32(0) || value): pseudonyms must not change across versions, or joins on
    // them break after an upgrade.
    use hmac::{Hmac, Mac};
    let expected = |value: &[u8]| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(KEY).expect("key");
        mac.update(&9u32.to_be_bytes());
        mac.update(b"pseudonym");
        mac.update(&0u32.to_be_bytes());
        mac.update(value);
        format!("p_{}", hex::encode(&mac.finalize().into_bytes()[..8]))
    };
    let toml = "[mask]\n[[mask.column]]\nname_pattern = \"^v$\"\nstrategy = \"pseudonym\"\n";
    let r = rules_with_key(toml, Some(KEY));
    assert_eq!(
        mask_text(&r, "carol").as_deref(),
        Some(expected(b"carol").as_str())
    );
    let filler = " ".repeat(84);
    assert_eq!(mask_text(&r, &filler), Some(expected(filler.as_bytes())));
    assert_eq!(
        mask_text(&r, "alice@example.com"),
        Some(format!(
            "{}@pseudonym.invalid",
            expected(b"alice@example.com")
        ))
    );
}

#[test]
fn framed_rows_are_the_masked_body_with_a_data_row_header() {
    let r = rules_with_key(EXAMPLE_RULES, Some(KEY));
    let rd = row_description(&[
        f("id", ACCOUNTS, 1, INT4, 0),
        f("card_number", ACCOUNTS, 2, TEXT, 0),
        f("notes", ACCOUNTS, 4, TEXT, 0),
    ]);
    let plan = r.plan(&rd, &accounts_origin).expect("plan").expect("some");
    let mut s = MaskSummary::new();
    let row = data_row(&[Some(b"7"), Some(b"4111 1111 1111 1111"), None]);
    let body = plan
        .mask_data_row(&row, &mut s)
        .expect("mask")
        .expect("changed");
    let message = plan
        .mask_data_row_message(&row, &mut s)
        .expect("mask")
        .expect("changed");
    assert_eq!(message[0], b'D');
    assert_eq!(
        i32::from_be_bytes([message[1], message[2], message[3], message[4]]) as usize,
        body.len() + 4
    );
    assert_eq!(&message[5..], &body[..]);
    // Both calls were counted.
    assert_eq!(s.total(), 2);
    // An untouched row stays unframed and unallocated.
    let clean = data_row(&[Some(b"7"), None, Some(b"nothing here")]);
    assert_eq!(
        plan.mask_data_row_message(&clean, &mut s).expect("mask"),
        None
    );
}

// ---------------------------------------------------------------- detectors

#[test]
fn card_detector() {
    let r = detector("card", "redact");
    let m = |v: &str| mask_text(&r, v);
    assert_eq!(m("4111111111111111").as_deref(), Some("[REDACTED:card]"));
    assert_eq!(
        m("pay 4111-1111-1111-1111 now").as_deref(),
        Some("pay [REDACTED:card] now")
    );
    assert_eq!(
        m("amex 378282246310005").as_deref(),
        Some("amex [REDACTED:card]")
    );
    // The card inside a longer digit sequence with group separators is still found.
    assert_eq!(
        m("cvv 123 4111 1111 1111 1111").as_deref(),
        Some("cvv 123 [REDACTED:card]")
    );
    assert_eq!(
        m("4111 1111 1111 1111 exp 12/29").as_deref(),
        Some("[REDACTED:card] exp 12/29")
    );
    // Not Luhn-valid, too short, or part of a longer number: not a card.
    assert_eq!(m("4111111111111112"), None);
    assert_eq!(m("order 1234567890123456"), None);
    assert_eq!(m("411111111111"), None);
    assert_eq!(m("41111111111111110000000"), None);
    // A list of small numbers is not a card, even when the digits pass Luhn.
    assert!(luhn_valid(&[
        4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1
    ]));
    assert_eq!(m("4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"), None);
    assert_eq!(m("41 11 11 11 11 11 11 11"), None);
    // Luhn-valid, but no card network starts with 1: an epoch-millisecond timestamp.
    assert!(luhn_valid(&[1, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]));
    assert_eq!(m("{\"ts\":1700000000004}"), None);
}

#[test]
fn email_detector() {
    let r = detector("email", "redact");
    assert_eq!(
        mask_text(&r, "mail ALICE.Smith+tag@Example.co.uk, thanks").as_deref(),
        Some("mail [REDACTED:email], thanks")
    );
    assert_eq!(mask_text(&r, "user@localhost"), None);
    assert_eq!(mask_text(&r, "a @ b.com"), None);
    // Derived expressions: lower(email), string_agg.
    assert_eq!(
        mask_text(&r, "a@x.io;b@y.io").as_deref(),
        Some("[REDACTED:email];[REDACTED:email]")
    );
}

#[test]
fn phone_detector() {
    let r = detector("phone", "redact");
    let m = |v: &str| mask_text(&r, v);
    assert_eq!(
        m("call +44 20 7946 0958").as_deref(),
        Some("call [REDACTED:phone]")
    );
    assert_eq!(m("(555) 123-4567").as_deref(), Some("[REDACTED:phone]"));
    assert_eq!(
        m("tel 555.123.4567.").as_deref(),
        Some("tel [REDACTED:phone].")
    );
    assert_eq!(m("+14155550123").as_deref(), Some("[REDACTED:phone]"));
    assert_eq!(m("2024-01-15 10:30"), None);
    assert_eq!(m("+123"), None);
    assert_eq!(m("id 5551234567"), None);
}

#[test]
fn ssn_detector() {
    let r = detector("ssn", "redact");
    assert_eq!(
        mask_text(&r, "ssn 123-45-6789").as_deref(),
        Some("ssn [REDACTED:ssn]")
    );
    for bad in [
        "000-12-3456",
        "666-12-3456",
        "912-34-5678",
        "123-00-4567",
        "123-45-0000",
    ] {
        assert_eq!(mask_text(&r, bad), None, "{bad}");
    }
}

#[test]
fn iban_detector() {
    let r = detector("iban", "redact");
    assert_eq!(
        mask_text(&r, "to DE89 3704 0044 0532 0130 00 IS OK").as_deref(),
        Some("to [REDACTED:iban] IS OK")
    );
    assert_eq!(
        mask_text(&r, "GB82WEST12345698765432").as_deref(),
        Some("[REDACTED:iban]")
    );
    assert_eq!(mask_text(&r, "DE00 3704 0044 0532 0130 00"), None);
    assert_eq!(mask_text(&r, "GB82WEST12345698765433"), None);
}

#[test]
fn ip_detector() {
    let r = detector("ip", "redact");
    let m = |v: &str| mask_text(&r, v);
    assert_eq!(
        m("from 192.168.1.20:5432").as_deref(),
        Some("from [REDACTED:ip]:5432")
    );
    assert_eq!(
        m("v6 2001:db8::8a2e:370:7334 ok").as_deref(),
        Some("v6 [REDACTED:ip] ok")
    );
    assert_eq!(
        m("fe80:0:0:0:202:b3ff:fe1e:8329").as_deref(),
        Some("[REDACTED:ip]")
    );
    assert_eq!(m("999.1.1.1"), None);
    assert_eq!(m("at 12:30:45"), None);
    assert_eq!(m("version 1.2.3.4.5"), None);
    assert_eq!(m("SELECT x::text, date::date"), None);
    assert_eq!(m("loopback ::1"), None);
    assert_eq!(m("db8::1:2").as_deref(), Some("[REDACTED:ip]"));
}

#[test]
fn secret_detectors() {
    let r = detector("secrets", "redact");
    let m = |v: &str| mask_text(&r, v);
    assert_eq!(
        m("key AKIAIOSFODNN7EXAMPLE used").as_deref(),
        Some("key [REDACTED:aws_key] used")
    );
    assert_eq!(
        m("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY").as_deref(),
        Some("aws_secret_access_key = [REDACTED:aws_key]")
    );
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
    assert_eq!(
        m(&format!("token={jwt}")).as_deref(),
        Some("token=[REDACTED:jwt]")
    );
    assert_eq!(
        m("Authorization: Bearer abcDEF123456789xyz").as_deref(),
        Some("Authorization: Bearer [REDACTED:bearer_token]")
    );
    let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq\n-----END RSA PRIVATE KEY-----";
    assert_eq!(
        m(&format!("k: {pem} end")).as_deref(),
        Some("k: [REDACTED:private_key] end")
    );
    // Truncated key: masked to the end of the value.
    assert_eq!(
        m("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg").as_deref(),
        Some("[REDACTED:private_key]")
    );
    assert_eq!(m("AKIA1234"), None);
    assert_eq!(m("eyJhbGciOiJIUzI1NiJ9"), None);
    assert_eq!(m("-----BEGIN PUBLIC KEY-----\nMIIB"), None);
    assert_eq!(m("a bearer of bad news"), None);
}

#[test]
fn all_detectors_and_custom_regex() {
    let r = rules(
        "[mask]\n[[mask.detector]]\nall = true\nstrategy = \"redact\"\n\
         [[mask.detector]]\nname = \"employee_id\"\nregex = \"EMP-[0-9]{6}\"\nstrategy = \"partial\"\nkeep_last = 2\n",
    );
    let out = mask_text(
        &r,
        "EMP-123456 alice@example.com 4111111111111111 123-45-6789 10.0.0.1",
    )
    .expect("masked");
    assert_eq!(
        out,
        "***-****56 [REDACTED:email] [REDACTED:card] [REDACTED:ssn] [REDACTED:ip]"
    );
    assert_eq!(mask_text(&r, "EMP-12345 only five digits"), None);
}

#[test]
fn detector_strategies_inside_text() {
    let fpe = detector("card", "format_preserving");
    let out = mask_text(&fpe, "card 4111 1111 1111 1111.").expect("masked");
    assert!(
        out.starts_with("card 4") && out.ends_with('.') && out.len() == 25,
        "{out}"
    );
    let digits: Vec<u8> = out
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect();
    assert!(luhn_valid(&digits));
    let partial = rules(
        "[mask]\n[[mask.detector]]\nkind = \"email\"\nstrategy = \"partial\"\nkeep_domain = true\n",
    );
    assert_eq!(
        mask_text(&partial, "to bob@corp.example").as_deref(),
        Some("to ***@corp.example")
    );
    let pseudo = detector("email", "pseudonym");
    let a = mask_text(&pseudo, "to bob@corp.example").expect("masked");
    assert!(a.starts_with("to p_") && a.ends_with("@pseudonym.invalid"));
    let ip = detector("ip", "format_preserving");
    let out = mask_text(&ip, "peer 203.0.113.9").expect("masked");
    let addr: std::net::Ipv4Addr = out.trim_start_matches("peer ").parse().expect("an IPv4");
    assert_ne!(addr.to_string(), "203.0.113.9");
    // NULL on a detector hit makes the whole value NULL.
    let null = detector("ssn", "null");
    let rd = row_description(&[f("v", 0, 0, TEXT, 0)]);
    let plan = null.plan(&rd, &no_origins).expect("plan").expect("some");
    let mut s = MaskSummary::new();
    let out = plan
        .mask_data_row(&data_row(&[Some(b"ssn 123-45-6789")]), &mut s)
        .expect("ok")
        .expect("changed");
    assert_eq!(decode_row(&out), vec![None]);
}

#[test]
fn json_results_stay_valid_json() {
    let r = rules("[mask]\n[[mask.detector]]\nall = true\nstrategy = \"redact\"\n");
    let rd = row_description(&[f("row_to_json", 0, 0, JSON, 0), f("j", 0, 0, JSONB, 1)]);
    let plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    let text_json = br#"{"id":1,"email":"alice@example.com","card":4111111111111111,"note":"say \"hi\" to 10.1.2.3"}"#;
    let mut binary_jsonb = vec![1u8];
    binary_jsonb.extend_from_slice(br#"{"ssn": "123-45-6789", "n": 5}"#);
    let mut s = MaskSummary::new();
    let out = plan
        .mask_data_row(&data_row(&[Some(text_json), Some(&binary_jsonb)]), &mut s)
        .expect("ok")
        .expect("changed");
    let v = decode_row(&out);
    let parsed: serde_json::Value = serde_json::from_str(&text(&v[0])).expect("valid JSON");
    assert_eq!(parsed["email"], "[REDACTED:email]");
    assert_eq!(parsed["card"], "[REDACTED:card]");
    assert_eq!(parsed["note"], "say \"hi\" to [REDACTED:ip]");
    let jsonb = v[1].clone().expect("non-null");
    assert_eq!(jsonb[0], 1, "jsonb version byte kept");
    let parsed: serde_json::Value = serde_json::from_slice(&jsonb[1..]).expect("valid JSON");
    assert_eq!(parsed["ssn"], "[REDACTED:ssn]");
    assert_eq!(parsed["n"], 5);

    // Column rules on json columns produce a JSON string.
    let r = rules(
        "[mask]\n[[mask.column]]\nname_pattern = \"^j$\"\nstrategy = \"partial\"\nkeep_last = 2\n",
    );
    let rd = row_description(&[f("j", 0, 0, JSON, 0)]);
    let plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    let out = plan
        .mask_data_row(&data_row(&[Some(br#""secret42""#)]), &mut s)
        .expect("ok")
        .expect("changed");
    assert_eq!(text(&decode_row(&out)[0]), r#""******42""#);
}

#[test]
fn binary_format_values() {
    let r = rules(
        "[mask]\n[[mask.column]]\nname_pattern = \"^(secret_id|token)$\"\nstrategy = \"redact\"\n\
         [[mask.detector]]\nall = true\nstrategy = \"redact\"\n",
    );
    let rd = row_description(&[
        f("name", 0, 0, VARCHAR, 1),
        f("cardnum", 0, 0, INT8, 1),
        f("secret_id", 0, 0, INT4, 1),
        f("token", 0, 0, UUID, 1),
        f("n", 0, 0, INT8, 1),
        f("u", 0, 0, UUID, 1),
    ]);
    let plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    let uuid = [0x11u8; 16];
    let row = data_row(&[
        Some(b"mail bob@example.com"),
        Some(&4111111111111111i64.to_be_bytes()),
        Some(&7i32.to_be_bytes()),
        Some(&uuid),
        Some(&12345i64.to_be_bytes()),
        Some(&uuid),
    ]);
    let mut s = MaskSummary::new();
    let out = plan
        .mask_data_row(&row, &mut s)
        .expect("ok")
        .expect("changed");
    let v = decode_row(&out);
    assert_eq!(text(&v[0]), "mail [REDACTED:email]");
    assert_eq!(
        v[1], None,
        "a card in a binary int8 cannot be rewritten: NULL"
    );
    assert_eq!(v[2], None, "binary int4 under a redact rule: NULL");
    assert_eq!(v[3], None, "binary uuid under a redact rule: NULL");
    assert_eq!(v[4].as_deref(), Some(&12345i64.to_be_bytes()[..]));
    assert_eq!(v[5].as_deref(), Some(&uuid[..]));
    assert_eq!(
        s.count(&MaskTarget::Column("secret_id".into()), StrategyKind::Null),
        1
    );
    // Malformed binary integers are errors, not panics.
    let bad = data_row(&[Some(b"x"), Some(b"123"), None, None, None, None]);
    assert!(plan.mask_data_row(&bad, &mut s).is_err());
}

#[test]
fn text_format_numbers_stay_numbers() {
    let r = rules(
        "[mask]\n[[mask.column]]\nname_pattern = \"^a$\"\nstrategy = \"format_preserving\"\n\
         [[mask.column]]\nname_pattern = \"^b$\"\nstrategy = \"redact\"\n",
    );
    let rd = row_description(&[f("a", 0, 0, INT8, 0), f("b", 0, 0, INT8, 0)]);
    let plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    let mut s = MaskSummary::new();
    let out = plan
        .mask_data_row(
            &data_row(&[Some(b"-4111111111111111"), Some(b"42")]),
            &mut s,
        )
        .expect("ok")
        .expect("changed");
    let v = decode_row(&out);
    let a = text(&v[0]);
    assert!(a.parse::<i64>().is_ok() && a.len() == 17 && a != "-4111111111111111");
    assert_eq!(v[1], None);
}

#[test]
fn bind_result_formats_switch_columns_to_binary() {
    let r = detector("email", "redact");
    // A Describe of a statement reports text; the Bind asked for binary.
    let rd = row_description(&[f("n", 0, 0, INT4, 0), f("t", 0, 0, TEXT, 0)]);
    let mut plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    plan.set_result_formats(&[1]).expect("formats");
    let mut s = MaskSummary::new();
    let row = data_row(&[Some(&5i32.to_be_bytes()), Some(b"x@example.com")]);
    let out = plan
        .mask_data_row(&row, &mut s)
        .expect("ok")
        .expect("changed");
    let v = decode_row(&out);
    assert_eq!(v[0].as_deref(), Some(&5i32.to_be_bytes()[..]));
    assert_eq!(text(&v[1]), "[REDACTED:email]");
    assert!(plan.set_result_formats(&[1, 0, 1]).is_err());
    assert!(plan.set_result_formats(&[2]).is_err());
}

#[test]
fn rows_without_row_description() {
    let detectors_only = detector("email", "redact");
    let plan = detectors_only
        .plan_without_description()
        .expect("ok")
        .expect("some");
    let mut s = MaskSummary::new();
    let out = plan
        .mask_data_row(&data_row(&[Some(b"1"), Some(b"a@b.org")]), &mut s)
        .expect("ok")
        .expect("changed");
    assert_eq!(decode_row(&out), vec![Some(b"1".to_vec()), None]);
    assert!(matches!(
        rules(EXAMPLE_RULES).plan_without_description(),
        Err(MaskError::ColumnsUnknown)
    ));
    assert!(
        MaskRules::none()
            .plan_without_description()
            .expect("ok")
            .is_none()
    );
}

#[test]
fn malformed_messages_are_errors_not_panics() {
    let r = rules(EXAMPLE_RULES);
    let rd = row_description(&[f("email", 0, 0, TEXT, 0), f("b", 0, 0, TEXT, 0)]);
    let plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    let mut s = MaskSummary::new();
    let good = data_row(&[Some(b"a"), Some(b"b")]);
    for cut in 0..good.len() {
        assert!(
            plan.mask_data_row(&good[..cut], &mut s).is_err(),
            "cut {cut}"
        );
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(plan.mask_data_row(&trailing, &mut s).is_err());
    assert!(matches!(
        plan.mask_data_row(&data_row(&[Some(b"a")]), &mut s),
        Err(MaskError::ColumnCount {
            expected: 2,
            got: 1
        })
    ));
    let mut negative = vec![0, 1];
    negative.extend_from_slice(&(-2i32).to_be_bytes());
    assert!(plan.mask_data_row(&negative, &mut s).is_err());
    for cut in 0..rd.len() {
        assert!(r.plan(&rd[..cut], &no_origins).is_err(), "rd cut {cut}");
    }
    let err = error_body(&[(b'S', "ERROR"), (b'M', "x")]);
    assert!(r.mask_error_fields(&err[..err.len() - 1], &mut s).is_err());
    assert!(r.mask_notification_body(b"\0\0\0\x01chan", &mut s).is_err());

    // Random bytes into every entry point: errors or results, never a panic.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let copy_resp = [0u8, 0, 2, 0, 0, 0, 0];
    for _ in 0..3000 {
        let len = rng.gen_range(0..40);
        let mut body: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        if rng.gen_bool(0.5) && body.len() > 2 {
            body[0] = 0;
            body[1] = 2;
        }
        let _ = plan.mask_data_row(&body, &mut s);
        let _ = r.plan(&body, &no_origins);
        let _ = r.mask_error_fields(&body, &mut s);
        let _ = r.mask_notification_body(&body, &mut s);
        let _ = r.copy_plan(&body, None, CopyOptions::text());
        for opts in [
            CopyOptions::text(),
            CopyOptions::csv(),
            CopyOptions::binary(),
        ] {
            let resp = if opts.format == CopyFormat::Binary {
                [1u8, 0, 2, 0, 1, 0, 1]
            } else {
                copy_resp
            };
            let cols = [copy_col("email", TEXT), copy_col("b", TEXT)];
            if let Ok(Some(mut m)) = r.copy_plan(&resp, Some(&cols), opts) {
                let _ = m.feed(&body, &mut s);
                let _ = m.finish(&mut s);
            }
        }
    }
}

// ---------------------------------------------------------------- errors and notifications

#[test]
fn unique_violation_detail_is_redacted() {
    let r = rules(EXAMPLE_RULES);
    let body = error_body(&[
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', "23505"),
        (
            b'M',
            "duplicate key value violates unique constraint \"accounts_email_key\"",
        ),
        (b'D', "Key (email)=(alice@example.com) already exists."),
        (b's', "public"),
        (b't', "accounts"),
        (b'n', "accounts_email_key"),
    ]);
    let mut s = MaskSummary::new();
    let out = r
        .mask_error_fields(&body, &mut s)
        .expect("ok")
        .expect("changed");
    let fields = error_fields(&out);
    let detail = fields.iter().find(|(c, _)| *c == b'D').expect("detail");
    assert_eq!(detail.1, "Key (email)=([REDACTED]) already exists.");
    assert!(fields.iter().any(|(c, v)| *c == b'C' && v == "23505"));
    assert!(!String::from_utf8_lossy(&out).contains("alice"));

    // Origin rule on the table of the constraint, composite key, FK wording.
    let body = error_body(&[
        (b'C', "23503"),
        (
            b'D',
            "Key (tenant, card_number)=(3, 4111 1111 1111 1112) is not present in table \"cards\".",
        ),
        (b's', "public"),
        (b't', "accounts"),
    ]);
    let out = r
        .mask_error_fields(&body, &mut s)
        .expect("ok")
        .expect("changed");
    let detail = error_fields(&out)
        .into_iter()
        .find(|(c, _)| *c == b'D')
        .expect("D");
    assert_eq!(
        detail.1,
        "Key (tenant, card_number)=([REDACTED]) is not present in table \"cards\"."
    );
    // Another table's key columns are left alone (no detector hit either).
    let body = error_body(&[
        (b'D', "Key (card_number)=(12) already exists."),
        (b's', "public"),
        (b't', "orders"),
    ]);
    assert!(r.mask_error_fields(&body, &mut s).expect("ok").is_none());
}

#[test]
fn detectors_and_cast_errors_in_error_fields() {
    let detectors_only = detector("email", "redact");
    let body = error_body(&[
        (b'C', "23505"),
        (b'D', "Key (contact)=(bob@example.com) already exists."),
        (b'n', "c_key"),
    ]);
    let mut s = MaskSummary::new();
    let out = detectors_only
        .mask_error_fields(&body, &mut s)
        .expect("ok")
        .expect("changed");
    assert!(error_fields(&out).contains(&(
        b'D',
        "Key (contact)=([REDACTED:email]) already exists.".to_string()
    )));

    let r = rules(EXAMPLE_RULES);
    let cast = error_body(&[
        (b'C', "22P02"),
        (
            b'M',
            "invalid input syntax for type integer: \"4111 1111 1111 1111x\"",
        ),
    ]);
    let out = r
        .mask_error_fields(&cast, &mut s)
        .expect("ok")
        .expect("changed");
    assert!(error_fields(&out).contains(&(
        b'M',
        "invalid input syntax for type integer: \"[REDACTED]\"".to_string()
    )));
    let range = error_body(&[(
        b'M',
        "value \"99999999999\" is out of range for type integer",
    )]);
    let out = r
        .mask_error_fields(&range, &mut s)
        .expect("ok")
        .expect("changed");
    assert_eq!(
        error_fields(&out),
        vec![(
            b'M',
            "value \"[REDACTED]\" is out of range for type integer".to_string()
        )]
    );
    let failing = error_body(&[
        (b'C', "23514"),
        (b'D', "Failing row contains (7, 4111, secret notes)."),
        (b's', "public"),
        (b't', "accounts"),
    ]);
    let out = r
        .mask_error_fields(&failing, &mut s)
        .expect("ok")
        .expect("changed");
    assert!(error_fields(&out).contains(&(b'D', "Failing row contains ([REDACTED]).".to_string())));
    // A notice raised by a function echoing a value.
    let notice = error_body(&[(b'S', "NOTICE"), (b'M', "processing 5500 0000 0000 0004")]);
    let out = r
        .mask_error_fields(&notice, &mut s)
        .expect("ok")
        .expect("changed");
    assert!(error_fields(&out).contains(&(b'M', "processing [REDACTED:card]".to_string())));
    // Nothing sensitive: unchanged.
    let plain = error_body(&[
        (b'S', "ERROR"),
        (b'C', "42P01"),
        (b'M', "relation \"x\" does not exist"),
    ]);
    assert!(r.mask_error_fields(&plain, &mut s).expect("ok").is_none());
}

#[test]
fn notification_payloads() {
    let r = rules("[mask]\n[[mask.detector]]\nall = true\nstrategy = \"redact\"\n");
    assert_eq!(
        r.mask_notification("{\"user\":\"eve@example.com\"}")
            .as_deref(),
        Some("{\"user\":\"[REDACTED:email]\"}")
    );
    assert_eq!(r.mask_notification("job 42 done"), None);
    let mut body = 1234i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"events\0card 4111111111111111\0");
    let mut s = MaskSummary::new();
    let out = r
        .mask_notification_body(&body, &mut s)
        .expect("ok")
        .expect("changed");
    let mut expected = 1234i32.to_be_bytes().to_vec();
    expected.extend_from_slice(b"events\0card [REDACTED:card]\0");
    assert_eq!(out, expected);
    // NULL strategy cannot empty a payload silently: it becomes the token.
    let null = detector("email", "null");
    assert_eq!(
        null.mask_notification("x a@b.io").as_deref(),
        Some("x [REDACTED:email]")
    );
}

// ---------------------------------------------------------------- COPY

fn copy_col(name: &str, type_oid: u32) -> CopyColumn {
    CopyColumn {
        name: name.into(),
        origin: None,
        type_oid,
    }
}

fn copy_out_response(format: u8, n: i16) -> Vec<u8> {
    let mut b = vec![format];
    b.extend_from_slice(&n.to_be_bytes());
    for _ in 0..n {
        b.extend_from_slice(&i16::from(format).to_be_bytes());
    }
    b
}

/// Feed chunks and collect what the relay would forward.
fn run_copy(m: &mut CopyMasker, chunks: &[&[u8]], s: &mut MaskSummary) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        match m.feed(c, s).expect("feed") {
            None => out.extend_from_slice(c),
            Some(b) => out.extend_from_slice(&b),
        }
    }
    if let Some(b) = m.finish(s).expect("finish") {
        out.extend_from_slice(&b);
    }
    out
}

#[test]
fn copy_text_with_split_rows_and_escapes() {
    let r = rules(
        "[mask]\n[[mask.column]]\nname_pattern = \"^card$\"\nstrategy = \"partial\"\nkeep_last = 4\n\
         [[mask.detector]]\nkind = \"email\"\nstrategy = \"redact\"\n",
    );
    let cols = [
        copy_col("id", INT4),
        copy_col("card", TEXT),
        copy_col("note", TEXT),
    ];
    let mut m = r
        .copy_plan(&copy_out_response(0, 3), Some(&cols), CopyOptions::text())
        .expect("plan")
        .expect("some");
    let data =
        b"1\t4111111111111111\tline1\\nmail a@b.io\\tx\n2\t\\N\tclean\n3\t5500000000000004\t\\N\n";
    let mut s = MaskSummary::new();
    // Split inside a row, inside an escape, and at a row boundary.
    let chunks: [&[u8]; 4] = [&data[..10], &data[10..30], &data[30..50], &data[50..]];
    let out = run_copy(&mut m, &chunks, &mut s);
    assert_eq!(
        String::from_utf8(out).expect("utf8"),
        "1\t************1111\tline1\\nmail [REDACTED:email]\\tx\n2\t\\N\tclean\n3\t************0004\t\\N\n"
    );
    assert_eq!(s.total(), 3);

    // Clean whole rows are forwarded as they are (None) without buffering.
    let mut m = r
        .copy_plan(&copy_out_response(0, 3), Some(&cols), CopyOptions::text())
        .expect("plan")
        .expect("some");
    let clean = b"5\t\\N\tnothing\n";
    assert!(m.feed(clean, &mut s).expect("ok").is_none());
    // Column count mismatches are errors.
    assert!(m.feed(b"1\t2\n", &mut s).is_err());
}

#[test]
fn copy_csv_with_quoted_newlines_split_across_messages() {
    let r = rules("[mask]\n[[mask.detector]]\nall = true\nstrategy = \"redact\"\n");
    let mut opts = CopyOptions::csv();
    opts.header = true;
    let mut m = r
        .copy_plan(&copy_out_response(0, 3), None, opts)
        .expect("plan")
        .expect("some");
    let data =
        b"id,email,note\n1,bob@example.com,\"multi\nline, \"\"quoted\"\" 10.0.0.7\"\n2,,\"\"\n";
    let mut s = MaskSummary::new();
    let chunks: Vec<&[u8]> = data.chunks(7).collect();
    let out = run_copy(&mut m, &chunks, &mut s);
    assert_eq!(
        String::from_utf8(out).expect("utf8"),
        "id,email,note\n1,\"[REDACTED:email]\",\"multi\nline, \"\"quoted\"\" [REDACTED:ip]\"\n2,,\"\"\n"
    );
    // Column rules without known columns: refused.
    assert!(matches!(
        rules(EXAMPLE_RULES).copy_plan(&copy_out_response(0, 3), None, CopyOptions::csv()),
        Err(MaskError::ColumnsUnknown)
    ));
    // Options that disagree with the server: refused.
    assert!(
        r.copy_plan(&copy_out_response(1, 3), None, CopyOptions::csv())
            .is_err()
    );
}

#[test]
fn copy_csv_null_strategy_and_custom_options() {
    let r = rules("[mask]\n[[mask.column]]\nname_pattern = \"^ssn$\"\nstrategy = \"null\"\n");
    let mut opts = CopyOptions::csv();
    opts.delimiter = b';';
    opts.null = b"NULL".to_vec();
    let cols = [copy_col("ssn", TEXT), copy_col("x", TEXT)];
    let mut m = r
        .copy_plan(&copy_out_response(0, 2), Some(&cols), opts)
        .expect("plan")
        .expect("some");
    let mut s = MaskSummary::new();
    let out = run_copy(&mut m, &[b"\"123-45-6789\";a\nNULL;b\n"], &mut s);
    assert_eq!(out, b"NULL;a\nNULL;b\n");
}

#[test]
fn copy_binary_with_split_tuples() {
    let r = rules(
        "[mask]\n[[mask.column]]\nname_pattern = \"^card$\"\nstrategy = \"redact\"\n\
         [[mask.detector]]\nkind = \"email\"\nstrategy = \"redact\"\n",
    );
    let cols = [
        copy_col("id", INT8),
        copy_col("card", TEXT),
        copy_col("note", TEXT),
    ];
    let mut m = r
        .copy_plan(&copy_out_response(1, 3), Some(&cols), CopyOptions::binary())
        .expect("plan")
        .expect("some");
    let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    let tuple = |id: i64, card: Option<&[u8]>, note: &[u8]| {
        let mut t = 3i16.to_be_bytes().to_vec();
        let mut v = Vec::new();
        wire::put_value(&mut v, Some(&id.to_be_bytes())).expect("put");
        wire::put_value(&mut v, card).expect("put");
        wire::put_value(&mut v, Some(note)).expect("put");
        t.extend_from_slice(&v);
        t
    };
    data.extend(tuple(1, Some(b"4111111111111111"), b"mail x@y.org"));
    data.extend(tuple(2, None, b"fine"));
    data.extend_from_slice(&(-1i16).to_be_bytes());
    let mut s = MaskSummary::new();
    let chunks: Vec<&[u8]> = data.chunks(5).collect();
    let out = run_copy(&mut m, &chunks, &mut s);
    let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
    expected.extend_from_slice(&[0; 8]);
    expected.extend(tuple(1, Some(b"[REDACTED]"), b"mail [REDACTED:email]"));
    expected.extend(tuple(2, None, b"fine"));
    expected.extend_from_slice(&(-1i16).to_be_bytes());
    assert_eq!(out, expected);
    // Data after the trailer, and a truncated stream, are errors.
    assert!(m.feed(b"\0\x01", &mut s).is_err());
    let mut m = r
        .copy_plan(&copy_out_response(1, 3), Some(&cols), CopyOptions::binary())
        .expect("plan")
        .expect("some");
    assert!(m.feed(&data[..30], &mut s).is_ok());
    assert!(m.finish(&mut s).is_err());
}

// ---------------------------------------------------------------- catalog helpers

#[test]
fn origin_cache_and_catalog_query() {
    let rd = row_description(&[
        f("a", ACCOUNTS, 1, INT4, 0),
        f("b", 0, 0, TEXT, 0),
        f("c", ACCOUNTS, 2, TEXT, 0),
        f("d", 16500, 1, TEXT, 0),
    ]);
    assert_eq!(table_oids(&rd).expect("oids"), vec![ACCOUNTS, 16500]);
    let mut cache = OriginCache::new(2);
    assert_eq!(cache.missing(&[ACCOUNTS, 16500, 0]), vec![ACCOUNTS, 16500]);
    cache.insert(
        ACCOUNTS,
        2,
        ColumnOrigin::new("public", "accounts", "card_number"),
    );
    cache.insert_table(16500);
    assert!(cache.missing(&[ACCOUNTS, 16500]).is_empty());
    let r = rules(EXAMPLE_RULES);
    // 16500 was looked up but has no such column: the plan fails closed.
    assert!(r.plan(&rd, &|t, a| cache.origin(t, a)).is_err());
    let q = catalog_query(&[ACCOUNTS, 16500]);
    assert!(q.contains("IN (16401,16500)"));
}

#[test]
fn bytea_and_function_results() {
    let r = detector("email", "redact");
    let rd = row_description(&[f("b", 0, 0, 17, 0)]);
    let plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    let mut s = MaskSummary::new();
    let hex_value = format!("\\x{}", hex::encode("to eve@example.com"));
    let out = plan
        .mask_data_row(&data_row(&[Some(hex_value.as_bytes())]), &mut s)
        .expect("ok")
        .expect("changed");
    assert_eq!(decode_row(&out), vec![None]);
    let clean = format!("\\x{}", hex::encode("nothing"));
    assert!(
        plan.mask_data_row(&data_row(&[Some(clean.as_bytes())]), &mut s)
            .expect("ok")
            .is_none()
    );
    assert!(
        plan.mask_data_row(&data_row(&[Some(b"\\xzz")]), &mut s)
            .is_err()
    );

    let mut body = (18i32).to_be_bytes().to_vec();
    body.extend_from_slice(b"to eve@example.com");
    assert_eq!(
        r.mask_function_result(&body, &mut s).expect("ok"),
        Some((-1i32).to_be_bytes().to_vec())
    );
    let mut body = (4i32).to_be_bytes().to_vec();
    body.extend_from_slice(b"fine");
    assert_eq!(r.mask_function_result(&body, &mut s).expect("ok"), None);
    assert!(r.mask_function_result(&body[..6], &mut s).is_err());
}

#[test]
fn engine_types_can_cross_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MaskRules>();
    assert_send_sync::<MaskPlan>();
    assert_send_sync::<CopyMasker>();
    assert_send_sync::<MaskSummary>();
}

#[test]
fn sensitive_values_never_survive_in_random_text() {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let r = rules("[mask]\n[[mask.detector]]\nall = true\nstrategy = \"redact\"\n");
    let secrets = [
        "4111111111111111",
        "4111 1111 1111 1111",
        "5500-0000-0000-0004",
        "378282246310005",
        "alice.smith@example.com",
        "+44 20 7946 0958",
        "(415) 555-0132",
        "123-45-6789",
        "DE89370400440532013000",
        "GB82 WEST 1234 5698 7654 32",
        "192.168.17.42",
        "2001:db8:85a3::8a2e:370:7334",
        "AKIAIOSFODNN7EXAMPLE",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    ];
    let glue = [
        // (no empty glue: two numbers glued together are one number)
        " ",
        ",",
        ";",
        ":",
        "=",
        "_",
        "(",
        ")",
        "\"",
        "'",
        "\n",
        "\t",
        "/",
        "<",
        ">",
        "x",
        "key_",
        "[",
        "]",
        "{\"v\":\"",
        "\"}",
    ];
    let words = [
        "order", "shipped", "note", "ref", "ok", "la", "zz", "id", "value",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for _ in 0..3000 {
        let mut text = String::new();
        let mut planted = Vec::new();
        for _ in 0..rng.gen_range(1..6) {
            if rng.gen_bool(0.5) {
                text.push_str(words.choose(&mut rng).expect("word"));
                text.push(' ');
            }
            let secret = secrets.choose(&mut rng).expect("secret");
            text.push_str(glue.choose(&mut rng).expect("glue"));
            text.push_str(secret);
            text.push_str(glue.choose(&mut rng).expect("glue"));
            planted.push(*secret);
        }
        let masked = mask_text(&r, &text).unwrap_or_else(|| text.clone());
        for secret in planted {
            // The distinctive core of each value must be gone (a kept separator is fine).
            let core: String = secret
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect();
            let core_masked: String = masked
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect();
            assert!(
                !masked.contains(secret) && !core_masked.contains(&core),
                "{secret} survived in {masked:?} (from {text:?})"
            );
        }
    }
}

#[test]
fn more_postgres_messages_quoting_input() {
    let r = rules(EXAMPLE_RULES);
    let mut s = MaskSummary::new();
    let cases = [
        (
            (b'M', "malformed array literal: \"{alice,bob\""),
            "malformed array literal: \"[REDACTED]\"",
        ),
        (
            (b'M', "date/time field value out of range: \"2024-13-45\""),
            "date/time field value out of range: \"[REDACTED]\"",
        ),
        (
            (b'M', "\"1e999\" is out of range for type double precision"),
            "\"[REDACTED]\" is out of range for type double precision",
        ),
        (
            (b'D', "Token \"secretword\" is invalid."),
            "Token \"[REDACTED]\" is invalid.",
        ),
    ];
    for ((code, input), expected) in cases {
        let body = error_body(&[(b'S', "ERROR"), (code, input)]);
        let out = r
            .mask_error_fields(&body, &mut s)
            .expect("ok")
            .unwrap_or_else(|| panic!("{input} unchanged"));
        assert!(
            error_fields(&out).contains(&(code, expected.to_string())),
            "{input} -> {:?}",
            error_fields(&out)
        );
    }
    // Messages that quote identifiers without a `: "..."` tail stay as they are.
    let body = error_body(&[(b'M', "column \"email\" does not exist")]);
    assert!(r.mask_error_fields(&body, &mut s).expect("ok").is_none());
    // Without column rules only detectors apply.
    let d = detector("ssn", "redact");
    let body = error_body(&[(b'M', "invalid input syntax for type integer: \"abc\"")]);
    assert!(d.mask_error_fields(&body, &mut s).expect("ok").is_none());
}

#[test]
fn copy_custom_delimiters_and_escapes() {
    let r = detector("email", "redact");
    // Text format with DELIMITER ',': a comma inside a value is escaped as `\,`.
    let mut opts = CopyOptions::text();
    opts.delimiter = b',';
    let mut m = r
        .copy_plan(&copy_out_response(0, 2), None, opts)
        .expect("plan")
        .expect("some");
    let mut s = MaskSummary::new();
    let out = run_copy(&mut m, &[b"a\\, b@c.io,x\n"], &mut s);
    assert_eq!(out, b"a\\, [REDACTED:email],x\n");
    // CSV with ESCAPE '\': quotes inside quoted values are `\"`.
    let mut opts = CopyOptions::csv();
    opts.escape = b'\\';
    let mut m = r
        .copy_plan(&copy_out_response(0, 2), None, opts)
        .expect("plan")
        .expect("some");
    let out = run_copy(&mut m, &[b"\"say \\\"hi\\\" to d@e.io\",2\n"], &mut s);
    assert_eq!(out, b"\"say \\\"hi\\\" to [REDACTED:email]\",2\n");
    // An unterminated quote at the end of the stream is an error.
    let mut m = r
        .copy_plan(&copy_out_response(0, 2), None, CopyOptions::csv())
        .expect("plan")
        .expect("some");
    assert_eq!(
        m.feed(b"1,\"open", &mut s).expect("buffered"),
        Some(Vec::new())
    );
    assert!(m.finish(&mut s).is_err());
}

#[test]
fn per_column_result_formats() {
    let r = detector("email", "redact");
    let rd = row_description(&[f("a", 0, 0, TEXT, 0), f("b", 0, 0, INT4, 0)]);
    let mut plan = r.plan(&rd, &no_origins).expect("plan").expect("some");
    plan.set_result_formats(&[0, 1]).expect("formats");
    let mut s = MaskSummary::new();
    let out = plan
        .mask_data_row(
            &data_row(&[Some(b"x@y.io"), Some(&7i32.to_be_bytes())]),
            &mut s,
        )
        .expect("ok")
        .expect("changed");
    let v = decode_row(&out);
    assert_eq!(text(&v[0]), "[REDACTED:email]");
    assert_eq!(v[1].as_deref(), Some(&7i32.to_be_bytes()[..]));
    assert_eq!(plan.column_count(), 2);
}

#[test]
fn policy_mask_items_and_the_example_policies_load() {
    // The policy module hands over each `[[mask]]` item on its own.
    let doc: toml::Value = toml::from_str(
        r#"
[[mask]]
table = "public.customers"
column = "email"
method = "partial"
[[mask]]
table = "customers"
column = "phone"
method = "redact"
[[mask]]
column = "ssn"
method = "hash"
[[mask]]
kind = "card"
strategy = "format_preserving"
"#,
    )
    .expect("toml");
    let items = doc["mask"].as_array().expect("array").clone();
    let r = MaskRules::from_toml(&items, Some(KEY)).expect("rules");
    let origin = |_: u32, a: i16| {
        let col = ["", "email", "phone", "ssn", "note"][a as usize];
        let schema = if a == 2 { "sales" } else { "public" };
        Some(ColumnOrigin::new(schema, "customers", col))
    };
    let rd = row_description(&[
        f("email", 16500, 1, TEXT, 0),
        f("phone", 16500, 2, TEXT, 0),
        f("ssn", 16500, 3, TEXT, 0),
        f("note", 16500, 4, TEXT, 0),
    ]);
    let plan = r.plan(&rd, &origin).expect("plan").expect("some");
    let mut s = MaskSummary::new();
    let out = plan
        .mask_data_row(
            &data_row(&[
                Some(b"bob@corp.example"),
                Some(b"+1 415 555 0132"),
                Some(b"123-45-6789"),
                Some(b"card 4111111111111111"),
            ]),
            &mut s,
        )
        .expect("ok")
        .expect("changed");
    let v = decode_row(&out);
    assert_eq!(
        text(&v[0]),
        "***@corp.example",
        "partial without parameters keeps the domain"
    );
    assert_eq!(
        text(&v[1]),
        "[REDACTED]",
        "table without schema matches any schema"
    );
    assert!(text(&v[2]).starts_with("p_"), "hash is a keyed pseudonym");
    assert!(text(&v[3]).starts_with("card 4") && !text(&v[3]).contains("4111111111111111"));

    // Shorthand mistakes are refused.
    for bad in [
        "strategy = \"redact\"\nmethod = \"redact\"\ncolumn = \"x\"",
        "strategy = \"redact\"\nkind = \"card\"\ncolumn = \"x\"",
        "strategy = \"redact\"\nmatch = \"a.b.c\"\ncolumn = \"x\"",
        "method = \"shred\"\ncolumn = \"x\"",
        "method = \"redact\"\ncolumn = \"x\"\ncolour = 1",
    ] {
        let v: toml::Value = toml::from_str(bad).expect("toml");
        assert!(
            MaskRules::from_toml(&[v], Some(KEY)).is_err(),
            "accepted {bad}"
        );
    }

    // The example policies in policies/ load as the policy module hands them over.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let mut loaded = 0;
    for entry in std::fs::read_dir(dir).expect("policies dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let doc: toml::Value = toml::from_str(&text).expect("policy toml");
        let items = match doc.get("mask") {
            Some(toml::Value::Array(items)) => items.clone(),
            Some(v) => vec![v.clone()],
            None => continue,
        };
        MaskRules::from_toml(&items, Some(KEY))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        loaded += 1;
    }
    assert!(loaded >= 2, "example policies with masks: {loaded}");
}
