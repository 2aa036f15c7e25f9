//! The session's protocol state, kept once: the client's messages decoded into typed views, the
//! prepared statements and portals the client declared, the answers PostgreSQL still owes for
//! what was forwarded, and what the relay does with each backend message.
//!
//! The gate, masking and the relay all read this state; none keeps a copy of its own.

mod owed;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::mask::{CopyTarget, MaskPlan};
use interceptor_wire::message::{self, BindView, Cursor, Malformed, ParseView};

pub(crate) use owed::{CopySpec, Cut, Outcome, Owed, OwedCopy, OwedQueue, Owing, Running};

/// One frontend message, decoded once (views over the frame; no copy of the SQL or values).
pub(crate) enum Frontend<'a> {
    Query(&'a str),
    Parse(ParseView<'a>),
    /// `body` is the whole Bind, for the result format codes [`BindView`] leaves out.
    Bind {
        view: BindView<'a>,
        body: &'a [u8],
    },
    /// `kind` is `S` (statement) or `P` (portal).
    Describe {
        kind: u8,
        name: &'a str,
    },
    Execute {
        portal: &'a str,
    },
    Close {
        kind: u8,
        name: &'a str,
    },
    Sync,
    FunctionCall(message::FunctionCallView<'a>),
    Terminate,
    /// Flush, COPY data/done/fail, and a Describe too malformed to name its target: forwarded
    /// as they are (PostgreSQL answers a malformed one itself).
    Passthrough,
}

impl<'a> Frontend<'a> {
    /// Decodes one frontend message. `Ok(None)`: a message type the protocol does not have.
    pub(crate) fn decode(tag: u8, body: &'a [u8]) -> Result<Option<Frontend<'a>>, Malformed> {
        Ok(Some(match tag {
            b'Q' => Frontend::Query(message::decode_query(body)?),
            b'P' => Frontend::Parse(message::decode_parse(body)?),
            b'B' => Frontend::Bind {
                view: message::decode_bind(body)?,
                body,
            },
            b'E' => Frontend::Execute {
                portal: message::decode_execute(body)?.0,
            },
            b'C' => {
                let (kind, name) = message::decode_target(body, "Close")?;
                Frontend::Close { kind, name }
            }
            b'D' => match message::decode_target(body, "Describe") {
                Ok((kind, name)) => Frontend::Describe { kind, name },
                Err(_) => Frontend::Passthrough,
            },
            b'S' => Frontend::Sync,
            b'F' => Frontend::FunctionCall(message::decode_function_call(body)?),
            b'X' => Frontend::Terminate,
            b'H' | b'd' | b'c' | b'f' => Frontend::Passthrough,
            _ => return Ok(None),
        }))
    }
}

/// What a Describe told masking about the rows of a statement or portal: the plan of their
/// DataRows (`Ok(None)`: nothing to mask; `Err`: no safe plan, the rows are withheld).
pub(crate) type Described = Result<Option<MaskPlan>, String>;

/// Where masking keeps what a Describe of this statement or portal answered. It lives in the
/// statement or portal itself, so replacing or closing one drops its plan with it.
#[derive(Debug, Default)]
pub(crate) struct DescribedSlot(Mutex<Option<Described>>);

impl DescribedSlot {
    pub(crate) fn set(&self, described: Described) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(described);
    }

    pub(crate) fn get(&self) -> Option<Described> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A protocol-level prepared statement the gate let through at Parse. Its decision is not
/// kept: every Execute is decided anew, because what allowed it can end between the two.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub sql: Arc<str>,
    /// Its COPY TO STDOUT statements as PostgreSQL's parser read them (masking sessions only;
    /// their columns are described at each Execute, as the table may change in between).
    pub copies: Box<[CopyTarget]>,
    /// Masking's plan from a Describe of the statement.
    pub described: DescribedSlot,
    /// The batch its Parse went upstream in.
    pub batch: u64,
    /// Whether PostgreSQL has it: [`PENDING`] until its Parse is answered.
    fate: AtomicU8,
    /// What PostgreSQL has under the name while the Parse is pending, and keeps if the Parse
    /// fails (a named one that exists, an error earlier in the batch that skips it). Dropped
    /// once the Parse completes.
    previous: Mutex<Option<Arc<Prepared>>>,
}

const PENDING: u8 = 0;
const PARSED: u8 = 1;
const FAILED: u8 = 2;

impl Prepared {
    /// Its Parse is not answered yet.
    pub(crate) fn is_pending(&self) -> bool {
        self.fate.load(Ordering::Acquire) == PENDING
    }

    /// PostgreSQL answered its Parse: ParseComplete (`parsed`), or an error that failed or
    /// skipped it.
    pub(crate) fn settle(&self, parsed: bool) {
        self.fate
            .store(if parsed { PARSED } else { FAILED }, Ordering::Release);
        if parsed {
            *lock(&self.previous) = None;
        }
    }

    /// What PostgreSQL has under this name: this statement, unless its Parse failed; then
    /// what the name held before (`None`: nothing).
    fn effective(self: &Arc<Self>) -> Option<Arc<Prepared>> {
        let mut at = self.clone();
        while at.fate.load(Ordering::Acquire) == FAILED {
            let before = lock(&at.previous).clone()?;
            at = before;
        }
        Some(at)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Result format codes of a Bind: none (all text) and one (for all) are kept inline.
#[derive(Debug, Clone, Default)]
pub(crate) enum ResultFormats {
    #[default]
    AllText,
    All(i16),
    Each(Box<[i16]>),
}

impl ResultFormats {
    /// The codes as the Bind gave them.
    pub(crate) fn as_slice(&self) -> &[i16] {
        match self {
            ResultFormats::AllText => &[],
            ResultFormats::All(c) => std::slice::from_ref(c),
            ResultFormats::Each(c) => c,
        }
    }
}

/// A portal: its statement (which outlives a Close of the statement's name, as in
/// PostgreSQL), the parameters as recorded, and its result formats.
#[derive(Debug)]
pub(crate) struct Portal {
    pub statement: Arc<Prepared>,
    pub parameters: Vec<Option<String>>,
    pub result_formats: ResultFormats,
    /// Masking's plan from a Describe of the portal.
    pub described: DescribedSlot,
    /// The batch (count of Query, Sync and FunctionCall forwarded before it) it was bound in:
    /// the transaction it lives in ended by the first idle ReadyForQuery of a later one.
    batch: u64,
}

/// Prepared statements and portals by name, as the client declared them: the session's one
/// copy, which the gate decides from and masking keeps its plans in.
#[derive(Default)]
pub(crate) struct Statements {
    statements: HashMap<Arc<str>, Arc<Prepared>>,
    portals: HashMap<String, Arc<Portal>>,
    /// Portals bound (in the batch given) to a statement the session does not know: what
    /// PostgreSQL would run there cannot be decided, so an Execute of one is refused.
    unattributed: HashMap<String, u64>,
    /// Result formats are read (once more from the Bind) only when masking needs them.
    keep_result_formats: bool,
    /// Portals of batches before this one are gone: their transaction ended.
    portals_from: u64,
}

impl Statements {
    pub(crate) fn new(keep_result_formats: bool) -> Self {
        Statements {
            keep_result_formats,
            ..Statements::default()
        }
    }

    /// A Parse was let through under `name` in batch `batch`; `copies` are its COPY TO STDOUT
    /// statements (masking sessions only). It replaces any statement of that name, with its
    /// plan, keeping the one before until PostgreSQL answers ([`Prepared::settle`]): the
    /// returned statement is to be settled by that answer.
    pub(crate) fn parsed(
        &mut self,
        name: &str,
        sql: &str,
        copies: Vec<CopyTarget>,
        batch: u64,
    ) -> Arc<Prepared> {
        let name: Arc<str> = Arc::from(name);
        // A failed Parse stands for what it replaced: the chain stays as short as the
        // Parses still unanswered.
        let previous = self.statements.get(&name).and_then(|p| {
            if p.is_pending() {
                Some(p.clone())
            } else {
                p.effective()
            }
        });
        let prepared = Arc::new(Prepared {
            sql: Arc::from(sql),
            copies: copies.into_boxed_slice(),
            described: DescribedSlot::default(),
            batch,
            fate: AtomicU8::new(PENDING),
            previous: Mutex::new(previous),
        });
        self.statements.insert(name, prepared.clone());
        prepared
    }

    /// A Parse was refused. PostgreSQL gets an unnamed Parse that fails in its place, which
    /// drops the unnamed statement, as the client's own Parse of it would have; a named
    /// statement it already had stays as it was (its own Parse would have failed too).
    pub(crate) fn refused(&mut self, _name: &str) {
        self.statements.remove("");
    }

    /// The statement named `name` as far as the session knows: the last Parse of it, unless
    /// PostgreSQL failed that Parse (then what it still has). A Parse still unanswered counts
    /// as done: see [`Prepared::is_pending`] for when that matters.
    pub(crate) fn statement(&self, name: &str) -> Option<Arc<Prepared>> {
        self.statements.get(name)?.effective()
    }

    pub(crate) fn portal(&self, name: &str) -> Option<&Arc<Portal>> {
        self.portals.get(name)
    }

    /// A Bind of `statement` into `portal` in batch `batch`; `parameters` renders the recorded
    /// values. A Bind of a statement that was never let through leaves no portal.
    pub(crate) fn bound(
        &mut self,
        portal: &str,
        statement: &str,
        bind_body: &[u8],
        batch: u64,
        parameters: impl FnOnce() -> Vec<Option<String>>,
    ) {
        let Some(statement) = self.statement(statement) else {
            self.portals.remove(portal);
            self.unattributed.insert(portal.to_owned(), batch);
            return;
        };
        self.unattributed.remove(portal);
        let result_formats = if self.keep_result_formats {
            match bind_result_formats(bind_body).as_deref() {
                None | Some([]) => ResultFormats::AllText,
                Some([one]) => ResultFormats::All(*one),
                Some(each) => ResultFormats::Each(each.into()),
            }
        } else {
            ResultFormats::AllText
        };
        let portal_state = Portal {
            statement,
            parameters: parameters(),
            result_formats,
            described: DescribedSlot::default(),
            batch,
        };
        self.portals
            .insert(portal.to_owned(), Arc::new(portal_state));
    }

    /// Close of a statement (`S`) or portal (anything else).
    pub(crate) fn close(&mut self, kind: u8, name: &str) {
        match kind {
            b'S' => {
                self.statements.remove(name);
            }
            _ => {
                self.portals.remove(name);
                self.unattributed.remove(name);
            }
        }
    }

    /// DEALLOCATE ALL or DISCARD ALL: every prepared statement is gone (portals stay).
    pub(crate) fn deallocate_all(&mut self) {
        self.statements.clear();
    }

    /// The portal was bound to a statement the session does not know.
    pub(crate) fn unattributed(&self, portal: &str) -> bool {
        self.unattributed.contains_key(portal)
    }

    /// PostgreSQL reported the session idle after batch `before - 1`: every transaction that
    /// held the portals bound up to then has ended, and the portals with it (an implicit
    /// transaction's unnamed portal at its Sync, a block's at COMMIT or ROLLBACK).
    pub(crate) fn transactions_ended_before(&mut self, before: u64) {
        if before <= self.portals_from {
            return;
        }
        self.portals_from = before;
        self.portals.retain(|_, p| p.batch >= before);
        self.unattributed.retain(|_, batch| *batch >= before);
    }
}

/// The result format codes at the end of a Bind.
pub(crate) fn bind_result_formats(body: &[u8]) -> Option<Vec<i16>> {
    let mut c = Cursor::new(body, "Bind");
    c.cstr().ok()?;
    c.cstr().ok()?;
    let nf = c.i16().ok()?;
    for _ in 0..nf {
        c.i16().ok()?;
    }
    let np = c.i16().ok()?;
    for _ in 0..np {
        let len = c.i32().ok()?;
        if len > 0 {
            c.take(len as usize).ok()?;
        }
    }
    let nr = c.i16().ok()?;
    let mut out = Vec::with_capacity(usize::try_from(nr).ok()?);
    for _ in 0..nr {
        out.push(c.i16().ok()?);
    }
    Some(out)
}

/// What the relay does with one backend message.
#[derive(Debug)]
pub(crate) enum Action {
    /// Forward it unchanged.
    Forward,
    /// Forward this message (complete, with header) instead: the same message masked.
    Rewrite(Bytes),
    /// Forward nothing (a row past a limit, the rest of a result that was refused).
    Withhold,
    /// The result could not be masked safely: the client gets this ErrorResponse in the
    /// message's place and the statement's outcome records the refusal.
    Refuse(Bytes),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(portal: &str, statement: &str, params: &[&[u8]], results: &[i16]) -> Vec<u8> {
        let mut b = Vec::new();
        for s in [portal, statement] {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p);
        }
        b.extend_from_slice(&(results.len() as i16).to_be_bytes());
        for r in results {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }

    #[test]
    fn bind_result_formats_are_read_after_the_parameters() {
        let mut b = Vec::new();
        b.extend_from_slice(b"portal\0stmt\0");
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        assert_eq!(bind_result_formats(&b), Some(vec![0, 1]));
        assert_eq!(bind_result_formats(&b[..b.len() - 1]), None);
    }

    #[test]
    fn portals_follow_binds_and_outlive_their_statement_name() {
        let mut s = Statements::new(true);
        s.parsed("s1", "SELECT $1", Vec::new(), 0);
        s.bound("p1", "s1", &bind("p1", "s1", &[b"7"], &[1]), 0, || {
            vec![Some("7".into())]
        });
        s.bound("p2", "nope", &bind("p2", "nope", &[], &[]), 0, Vec::new);
        assert!(
            s.portal("p2").is_none(),
            "no portal for an unknown statement"
        );
        s.close(b'S', "s1");
        assert!(s.statement("s1").is_none());
        let p = s
            .portal("p1")
            .expect("portal survives Close of its statement");
        assert_eq!(&*p.statement.sql, "SELECT $1");
        assert_eq!(p.result_formats.as_slice(), &[1]);
        s.close(b'P', "p1");
        assert!(s.portal("p1").is_none());

        let mut plain = Statements::new(false);
        plain.parsed("", "SELECT 1", Vec::new(), 0);
        plain.bound("", "", &bind("", "", &[], &[1, 0]), 0, Vec::new);
        assert!(
            plain
                .portal("")
                .is_some_and(|p| p.result_formats.as_slice().is_empty())
        );
        plain.refused("");
        plain.bound("", "", &bind("", "", &[], &[]), 0, Vec::new);
        assert!(
            plain.portal("").is_none(),
            "a refused Parse leaves nothing to bind"
        );
    }

    /// A refused Parse reaches PostgreSQL as a failing unnamed Parse: the unnamed statement is
    /// gone there, and a named one PostgreSQL already had is still there (the client's own
    /// Parse of an existing name fails as well), so every Execute of it is still decided.
    #[test]
    fn a_refused_parse_drops_the_unnamed_statement_and_keeps_a_named_one() {
        let mut s = Statements::new(false);
        s.parsed("", "SELECT 1", Vec::new(), 0);
        s.parsed("s1", "DELETE FROM t", Vec::new(), 0);
        s.refused("s1");
        assert!(s.statement("").is_none());
        assert_eq!(
            s.statement("s1").map(|p| p.sql.to_string()).as_deref(),
            Some("DELETE FROM t"),
            "PostgreSQL still has s1: binding it must find it to decide it"
        );
    }

    /// A Parse PostgreSQL fails or skips (a named statement that exists, an error earlier in
    /// its batch) leaves the statement it had: binding the name finds that one, not the text
    /// of the failed Parse. One that completes stands alone.
    #[test]
    fn a_failed_parse_leaves_the_statement_postgresql_has() {
        let mut s = Statements::new(false);
        s.parsed("s1", "DELETE FROM t", Vec::new(), 0).settle(true);
        let dup = s.parsed("s1", "SELECT 1", Vec::new(), 1);
        assert!(dup.is_pending());
        assert_eq!(
            &*s.statement("s1").unwrap().sql,
            "SELECT 1",
            "same batch: as sent"
        );
        dup.settle(false);
        assert_eq!(&*s.statement("s1").unwrap().sql, "DELETE FROM t");
        s.bound("p", "s1", &bind("p", "s1", &[], &[]), 2, Vec::new);
        assert_eq!(&*s.portal("p").unwrap().statement.sql, "DELETE FROM t");

        // Two unanswered Parses of the unnamed statement, the second skipped.
        s.parsed("", "SELECT 'a'", Vec::new(), 3);
        let b = s.parsed("", "SELECT 'b'", Vec::new(), 3);
        let c = s.parsed("", "SELECT 'c'", Vec::new(), 4);
        s.statement("").unwrap();
        b.settle(true);
        c.settle(false);
        assert_eq!(&*s.statement("").unwrap().sql, "SELECT 'b'");
        // The completed one forgot what it replaced.
        assert!(lock(&b.previous).is_none());
        let never = s.parsed("n", "SELECT 2", Vec::new(), 5);
        never.settle(false);
        assert!(s.statement("n").is_none(), "nothing was there before");
    }

    /// A portal bound to a statement the session does not know is marked, so its Execute can
    /// be refused rather than forwarded as unknown; a later good Bind clears the mark.
    #[test]
    fn portals_of_unknown_statements_are_marked() {
        let mut s = Statements::new(false);
        s.bound(
            "p",
            "sql_prepared",
            &bind("p", "sql_prepared", &[], &[]),
            0,
            Vec::new,
        );
        assert!(s.unattributed("p") && s.portal("p").is_none());
        s.parsed("k", "SELECT 1", Vec::new(), 0);
        s.bound("p", "k", &bind("p", "k", &[], &[]), 0, Vec::new);
        assert!(!s.unattributed("p") && s.portal("p").is_some());
        s.bound("q", "nope", &bind("q", "nope", &[], &[]), 0, Vec::new);
        s.transactions_ended_before(1);
        assert!(!s.unattributed("q"), "gone with its transaction");
    }

    /// A replaced or closed statement or portal takes its masking plan with it; a portal
    /// keeps the plan of the statement it was bound from.
    #[test]
    fn plans_live_and_die_with_their_statement_or_portal() {
        let mut s = Statements::new(true);
        s.parsed("", "SELECT 1", Vec::new(), 0);
        s.statement("").unwrap().described.set(Err("old".into()));
        s.bound("", "", &bind("", "", &[], &[]), 0, Vec::new);
        s.portal("").unwrap().described.set(Ok(None));
        // Re-Parse of the unnamed statement: a fresh entry, no plan.
        s.parsed("", "SELECT 2", Vec::new(), 0);
        assert!(s.statement("").unwrap().described.get().is_none());
        // The portal bound earlier still refers to the statement it was bound from.
        assert!(matches!(
            s.portal("").unwrap().statement.described.get(),
            Some(Err(_))
        ));
        s.bound("", "", &bind("", "", &[], &[]), 0, Vec::new);
        assert!(s.portal("").unwrap().described.get().is_none());
    }

    /// An idle ReadyForQuery ends the transaction of every portal bound before it; portals of
    /// batches still in flight stay.
    #[test]
    fn portals_end_with_their_transaction() {
        let mut s = Statements::new(false);
        s.parsed("st", "SELECT 1", Vec::new(), 0);
        s.bound("", "st", &bind("", "st", &[], &[]), 0, Vec::new);
        s.bound("a", "st", &bind("a", "st", &[], &[]), 1, Vec::new);
        s.bound("b", "st", &bind("b", "st", &[], &[]), 2, Vec::new);
        s.transactions_ended_before(2);
        assert!(s.portal("").is_none() && s.portal("a").is_none());
        assert!(s.portal("b").is_some(), "bound in a batch not yet answered");
        s.transactions_ended_before(1);
        assert!(s.portal("b").is_some(), "an older report changes nothing");
        assert!(
            s.statement("st").is_some(),
            "statements outlive transactions"
        );
    }

    #[test]
    fn frontend_messages_decode_once_into_views() {
        let parse = b"s1\0SELECT 1\0\0\0";
        assert!(matches!(
            Frontend::decode(b'P', parse),
            Ok(Some(Frontend::Parse(p))) if p.statement == "s1" && p.sql == "SELECT 1"
        ));
        assert!(matches!(
            Frontend::decode(b'D', b"Pportal\0"),
            Ok(Some(Frontend::Describe {
                kind: b'P',
                name: "portal"
            }))
        ));
        assert!(matches!(
            Frontend::decode(b'D', b"S"),
            Ok(Some(Frontend::Passthrough))
        ));
        assert!(
            Frontend::decode(b'Q', b"SELECT 1").is_err(),
            "no terminator"
        );
        assert!(matches!(Frontend::decode(b'z', b""), Ok(None)));
    }
}
