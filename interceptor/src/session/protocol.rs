//! The session's protocol state, kept once: the client's messages decoded into typed views, the
//! prepared statements and portals the client declared, the answers PostgreSQL still owes for
//! what was forwarded, and what the relay does with each backend message.
//!
//! The gate, masking and the relay all read this state; none keeps a copy of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use interceptor_wire::message::{self, BindView, Cursor, Malformed, ParseView};

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

/// A protocol-level prepared statement the gate let through at Parse. Its decision is not
/// kept: every Execute is decided anew, because what allowed it can end between the two.
pub(crate) struct Prepared {
    pub name: Arc<str>,
    pub sql: Arc<str>,
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
pub(crate) struct Portal {
    pub statement: Arc<Prepared>,
    pub parameters: Vec<Option<String>>,
    pub result_formats: ResultFormats,
}

/// Prepared statements and portals by name, as the client declared them.
#[derive(Default)]
pub(crate) struct Statements {
    statements: HashMap<Arc<str>, Arc<Prepared>>,
    portals: HashMap<String, Portal>,
    /// Result formats are read (once more from the Bind) only when masking needs them.
    keep_result_formats: bool,
}

impl Statements {
    pub(crate) fn new(keep_result_formats: bool) -> Self {
        Statements {
            keep_result_formats,
            ..Statements::default()
        }
    }

    /// A Parse was let through under `name`.
    pub(crate) fn parsed(&mut self, name: &str, sql: &str) {
        let name: Arc<str> = Arc::from(name);
        let prepared = Arc::new(Prepared {
            name: name.clone(),
            sql: Arc::from(sql),
        });
        self.statements.insert(name, prepared);
    }

    /// A Parse under `name` was refused: PostgreSQL will not have it either.
    pub(crate) fn refused(&mut self, name: &str) {
        self.statements.remove(name);
    }

    #[cfg(test)]
    pub(crate) fn statement(&self, name: &str) -> Option<&Arc<Prepared>> {
        self.statements.get(name)
    }

    pub(crate) fn portal(&self, name: &str) -> Option<&Portal> {
        self.portals.get(name)
    }

    /// A Bind of `statement` into `portal`; `parameters` renders the recorded values. A Bind
    /// of a statement that was never let through leaves no portal.
    pub(crate) fn bound(
        &mut self,
        portal: &str,
        statement: &str,
        bind_body: &[u8],
        parameters: impl FnOnce() -> Vec<Option<String>>,
    ) {
        let Some(statement) = self.statements.get(statement) else {
            self.portals.remove(portal);
            return;
        };
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
            statement: statement.clone(),
            parameters: parameters(),
            result_formats,
        };
        self.portals.insert(portal.to_owned(), portal_state);
    }

    /// Close of a statement (`S`) or portal (anything else).
    pub(crate) fn close(&mut self, kind: u8, name: &str) {
        match kind {
            b'S' => {
                self.statements.remove(name);
            }
            _ => {
                self.portals.remove(name);
            }
        }
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

/// A request whose answer the upstream → client side must attribute, in the order forwarded.
#[derive(Debug)]
pub(crate) enum Owed<C> {
    Parse(Arc<str>),
    Bind(String),
    DescribeStatement(String),
    DescribePortal(String),
    /// `copies`: what each COPY TO STDOUT of the statement produces, in order.
    Execute {
        portal: String,
        statement: Arc<str>,
        formats: ResultFormats,
        copies: VecDeque<C>,
    },
    Query {
        copies: VecDeque<C>,
    },
    Sync,
    FunctionCall,
}

impl<C> Owed<C> {
    /// Answered by a ReadyForQuery.
    pub(crate) fn ends_batch(&self) -> bool {
        matches!(self, Owed::Query { .. } | Owed::Sync | Owed::FunctionCall)
    }
}

/// The queue of answers PostgreSQL owes, front first.
#[derive(Debug)]
pub(crate) struct OwedQueue<C> {
    queue: VecDeque<Owed<C>>,
}

impl<C> Default for OwedQueue<C> {
    fn default() -> Self {
        OwedQueue {
            queue: VecDeque::new(),
        }
    }
}

impl<C> OwedQueue<C> {
    pub(crate) fn push(&mut self, owed: Owed<C>) {
        self.queue.push_back(owed);
    }

    pub(crate) fn front(&self) -> Option<&Owed<C>> {
        self.queue.front()
    }

    pub(crate) fn front_mut(&mut self) -> Option<&mut Owed<C>> {
        self.queue.front_mut()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The front entry, if it is what `want` expects.
    pub(crate) fn pop_if(&mut self, want: impl Fn(&Owed<C>) -> bool) -> Option<Owed<C>> {
        if self.queue.front().is_some_and(want) {
            self.queue.pop_front()
        } else {
            None
        }
    }

    /// An ErrorResponse: PostgreSQL skips the rest of an extended batch up to Sync. Returns
    /// the names of the Parses it skipped, which PostgreSQL therefore does not have.
    pub(crate) fn skip_to_batch_end(&mut self, mut skipped_parse: impl FnMut(&str)) {
        while self.queue.front().is_some_and(|e| !e.ends_batch()) {
            if let Some(Owed::Parse(name)) = self.queue.pop_front() {
                skipped_parse(&name);
            }
        }
    }

    /// A ReadyForQuery: everything up to and including the entry that ends the batch is paid.
    pub(crate) fn end_batch(&mut self) {
        while let Some(e) = self.queue.pop_front() {
            if e.ends_batch() {
                break;
            }
        }
    }
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
        s.parsed("s1", "SELECT $1");
        s.bound("p1", "s1", &bind("p1", "s1", &[b"7"], &[1]), || {
            vec![Some("7".into())]
        });
        s.bound("p2", "nope", &bind("p2", "nope", &[], &[]), Vec::new);
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
        assert_eq!(&*p.statement.name, "s1");
        assert_eq!(p.result_formats.as_slice(), &[1]);
        s.close(b'P', "p1");
        assert!(s.portal("p1").is_none());

        let mut plain = Statements::new(false);
        plain.parsed("", "SELECT 1");
        plain.bound("", "", &bind("", "", &[], &[1, 0]), Vec::new);
        assert!(
            plain
                .portal("")
                .is_some_and(|p| p.result_formats.as_slice().is_empty())
        );
        plain.refused("");
        plain.bound("", "", &bind("", "", &[], &[]), Vec::new);
        assert!(
            plain.portal("").is_none(),
            "a refused Parse leaves nothing to bind"
        );
    }

    #[test]
    fn an_error_skips_to_the_batch_end_and_ready_pays_it() {
        let mut q: OwedQueue<()> = OwedQueue::default();
        q.push(Owed::Parse("a".into()));
        q.push(Owed::Bind(String::new()));
        q.push(Owed::Parse("b".into()));
        q.push(Owed::Sync);
        q.push(Owed::Query {
            copies: VecDeque::new(),
        });
        let mut skipped = Vec::new();
        q.skip_to_batch_end(|n| skipped.push(n.to_owned()));
        assert_eq!(skipped, ["a", "b"]);
        assert!(matches!(q.front(), Some(Owed::Sync)));
        q.end_batch();
        assert!(matches!(q.front(), Some(Owed::Query { .. })));
        q.end_batch();
        assert!(q.is_empty());
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
