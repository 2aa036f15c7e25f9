//! The fuzz targets' bodies: everything interceptor decodes from bytes it does not control.
//! `fuzz/fuzz_targets/<name>.rs` hands libFuzzer's input to the function of the same name; the
//! unit test below replays every committed input in `fuzz/corpus/<name>/` (seeds captured from
//! real psql, pgbench and tokio-postgres sessions, a real write-ahead segment, and any input a
//! fuzzer once crashed on), so a crash found once stays a regression test in every `cargo test`.
//!
//! Each function must not panic on any input; where a property can be checked cheaply it is
//! asserted (a masked row is still a well-formed DataRow, blocks read back what was put in, no
//! SCRAM exchange succeeds against a verifier no password matches).

// A broken invariant must crash: that is how a fuzzer reports it.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use crate::identity::scram::{Mechanism, ServerExchange, Verifier};
use crate::mask::{ColumnOrigin, CopyColumn, CopyOptions, MaskPlan, MaskRules, MaskSummary};
use crate::session::protocol::{Frontend, Statements};
use interceptor_sql::{classify, lexer};
use interceptor_wire::{frame, message};

/// One target: the input libFuzzer generated.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*`).
pub const TARGETS: &[(&str, Target)] = &[
    ("frontend_messages", frontend_messages),
    ("backend_messages", backend_messages),
    ("startup_auth", startup_auth),
    ("sql_classify", sql_classify),
    ("mask_rows", mask_rows),
    ("mask_copy", mask_copy),
    ("wal_replay", wal_replay),
];

/// Frontend messages after startup: framing, the relay's one decoding of each message, and the
/// session's store of prepared statements and portals they drive.
pub fn frontend_messages(data: &[u8]) {
    let mut statements = Statements::new(true);
    for f in frame::frames(data) {
        match Frontend::decode(f.tag, f.body) {
            Ok(Some(Frontend::Parse(p))) => {
                statements.parsed(p.statement, p.sql, Vec::new(), 0);
            }
            Ok(Some(Frontend::Bind { view, body })) => {
                let params = || {
                    view.params
                        .iter()
                        .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect()
                };
                statements.bound(view.portal, view.statement, body, 0, params);
                if let Some(p) = statements.portal(view.portal) {
                    let _ = p.result_formats.as_slice();
                }
            }
            Ok(Some(Frontend::Close { kind, name })) => statements.close(kind, name),
            Ok(Some(Frontend::FunctionCall(call))) => {
                let _ = (call.function, call.arg_formats.len(), call.args.len());
            }
            _ => {}
        }
    }
}

/// Backend messages interceptor reads: framing, then ErrorResponse/NoticeResponse fields.
pub fn backend_messages(data: &[u8]) {
    for f in frame::frames(data) {
        if matches!(f.tag, b'E' | b'N') {
            let _ = message::decode_error_fields(f.body);
            let _ = message::error_code_and_message(f.body);
        }
    }
}

/// The startup phase: StartupMessage parameters, the SASL initial response, and a whole
/// SCRAM-SHA-256 exchange on the server side (client-first, then client-final after the first
/// NUL of the input).
pub fn startup_auth(data: &[u8]) {
    let _ = message::decode_startup_params(data);
    let _ = message::decode_sasl_initial(data);
    let (first, last) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    // No password matches a decoy verifier: an exchange that succeeds is a bypass. Each
    // mechanism as offered over plain TCP and over TLS (channel binding data known).
    let verifier = Verifier::decoy("fuzz", &[7u8; 32]);
    let end_point = [9u8; 32];
    for (mechanism, offered) in [
        (Mechanism::ScramSha256, None),
        (Mechanism::ScramSha256, Some(&end_point[..])),
        (Mechanism::ScramSha256Plus, Some(&end_point[..])),
    ] {
        if let Ok((exchange, _)) =
            ServerExchange::start(verifier.clone(), mechanism, offered, first)
        {
            assert!(
                exchange.finish(last).is_err(),
                "a SCRAM exchange succeeded against a verifier no password matches"
            );
        }
    }
}

/// The SQL lexer and classifier (PostgreSQL's parser), with both `standard_conforming_strings`.
pub fn sql_classify(data: &[u8]) {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    for scs in [true, false] {
        let lex = lexer::LexSettings {
            standard_conforming_strings: scs,
        };
        let _ = lexer::split_statements(sql, lex);
        let _ = lexer::tokenize(sql, lex);
        let _ = classify::classify(sql, lex);
    }
}

const RULES: &str = r#"
[[column]]
match = "public.accounts.card_number"
strategy = "partial"
keep_last = 4

[[column]]
name_pattern = "(?i)email"
strategy = "pseudonym"

[[detector]]
kind = "card"
strategy = "redact"

[[detector]]
name = "employee_id"
regex = "EMP-[0-9]{6}"
strategy = "redact"
"#;

const ACCOUNTS: u32 = 16401;
const COLUMNS: [(&str, u32); 4] = [
    ("id", 23),
    ("card_number", 25),
    ("email", 25),
    ("notes", 25),
];

fn rules() -> &'static MaskRules {
    static RULES_ONCE: OnceLock<MaskRules> = OnceLock::new();
    RULES_ONCE.get_or_init(|| {
        let section: toml::Value = toml::from_str(RULES).unwrap();
        MaskRules::from_toml(&[section], Some(&[9u8; 32])).unwrap()
    })
}

fn origin(table: u32, attnum: i16) -> Option<ColumnOrigin> {
    let i = usize::try_from(attnum).ok()?.checked_sub(1)?;
    let (column, _) = COLUMNS.get(i)?;
    (table == ACCOUNTS).then(|| ColumnOrigin::new("public", "accounts", *column))
}

fn row_description(format: i16) -> Vec<u8> {
    let mut b = (COLUMNS.len() as i16).to_be_bytes().to_vec();
    for (i, (name, oid)) in COLUMNS.iter().enumerate() {
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(&ACCOUNTS.to_be_bytes());
        b.extend_from_slice(&(i as i16 + 1).to_be_bytes());
        b.extend_from_slice(&oid.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&format.to_be_bytes());
    }
    b
}

/// The column count of a DataRow body, if it is well formed.
fn data_row_columns(body: &[u8]) -> Option<usize> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut at = 2usize;
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len >= 0 {
            at = at.checked_add(len as usize)?;
            body.get(..at)?;
        }
    }
    (at == body.len()).then_some(n as usize)
}

/// The masking engine on DataRows: a card number under a partial rule, an email under a
/// pseudonym, free text scanned by the detectors; text (first byte even) or binary format. A
/// masked row must still be a DataRow of the same four columns.
pub fn mask_rows(data: &[u8]) {
    static PLANS: OnceLock<[MaskPlan; 2]> = OnceLock::new();
    let plans = PLANS.get_or_init(|| {
        let plan = |format| rules().plan(&row_description(format), &origin).unwrap();
        [plan(0).unwrap(), plan(1).unwrap()]
    });
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let plan = &plans[usize::from(selector & 1)];
    if let Ok(Some(out)) = plan.mask_data_row(body, &mut MaskSummary::new()) {
        assert_eq!(
            data_row_columns(&out),
            Some(COLUMNS.len()),
            "masked row malformed"
        );
    }
    if let Ok(Some(msg)) = plan.mask_data_row_message(body, &mut MaskSummary::new()) {
        assert_eq!(msg.first(), Some(&b'D'));
        let len = u32::from_be_bytes(msg[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, msg.len() - 1, "the masked DataRow's length is wrong");
        assert_eq!(data_row_columns(&msg[5..]), Some(COLUMNS.len()));
    }
}

/// The masking engine on COPY TO STDOUT data: the first byte picks text, CSV or binary (and a
/// header line), the second where the stream is cut into CopyData messages (rows span
/// messages); the rest is fed to the masker and finished as at CopyDone.
pub fn mask_copy(data: &[u8]) {
    let [selector, step, stream @ ..] = data else {
        return;
    };
    let binary = selector % 3 == 2;
    let mut options = match selector % 3 {
        0 => CopyOptions::text(),
        1 => CopyOptions::csv(),
        _ => CopyOptions::binary(),
    };
    options.header = selector & 4 != 0;
    options.max_row_bytes = 1 << 16;
    let columns: Vec<CopyColumn> = COLUMNS
        .iter()
        .map(|(name, oid)| CopyColumn {
            name: (*name).to_owned(),
            origin: Some(ColumnOrigin::new("public", "accounts", *name)),
            type_oid: *oid,
        })
        .collect();
    let mut response = vec![u8::from(binary)];
    response.extend_from_slice(&(COLUMNS.len() as i16).to_be_bytes());
    for _ in COLUMNS {
        response.extend_from_slice(&i16::from(binary).to_be_bytes());
    }
    let mut masker = rules()
        .copy_plan(&response, Some(&columns), options)
        .unwrap()
        .expect("rules that mask two columns give a COPY masker");
    let mut summary = MaskSummary::new();
    for chunk in stream.chunks(usize::from(*step).max(1)) {
        if masker.feed(chunk, &mut summary).is_err() {
            return;
        }
    }
    let _ = masker.finish(&mut summary);
}

/// The audit trail's write-ahead replay at start, the first byte saying where the rest is cut
/// into two segments.
pub fn wal_replay(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut) * rest.len() / 255;
    crate::audit::fuzzing::wal_replay(rest, cut);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn committed_fuzz_inputs_pass() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut ran = 0;
        for (name, target) in super::TARGETS {
            let dir = corpus.join(name);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let mut n = 0;
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                target(&data);
                // Every prefix too: torn input is the commonest hostile input.
                for cut in [0, 1, 2, 5, data.len() / 2, data.len().saturating_sub(1)] {
                    target(&data[..cut.min(data.len())]);
                }
                n += 1;
            }
            assert!(n > 0, "no committed inputs for fuzz target {name}");
            ran += n;
        }
        assert!(ran >= 50, "only {ran} committed fuzz inputs");
    }
}
