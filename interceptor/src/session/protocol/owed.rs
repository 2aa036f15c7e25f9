//! The answers PostgreSQL owes the session, in the order it will give them: one entry per
//! forwarded message it answers (a refused message's stand-in included). The client → upstream
//! side pushes an entry before the message goes out; the upstream → client side advances the
//! queue by each backend message in one place, [`OwedQueue::answered`], after masking and the
//! audit bookkeeping have read the entry the message belongs to. Nothing else keeps a queue of
//! its own, so the three can never disagree about which answer is whose.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;

use super::{Portal, Prepared};
use crate::audit::RecordId;
use crate::mask::{CopyColumn, CopyOptions, MaskSummary};
use interceptor_wire::message::{self, sqlstate};

/// One COPY TO STDOUT as the statement declares it, with the columns it produces as described
/// just before it ran (masking sessions only).
#[derive(Debug)]
pub(crate) struct CopySpec {
    pub options: CopyOptions,
    pub columns: Option<Vec<CopyColumn>>,
}

/// What a COPY TO STDOUT of a statement will produce, or why that is unknown (its data is then
/// withheld under masking).
pub(crate) type OwedCopy = Result<CopySpec, String>;

/// Outcome of a forwarded statement, for the audit trail.
#[derive(Debug, Default, Clone)]
pub(crate) struct Outcome {
    pub command_tags: Vec<String>,
    pub rows: u64,
    pub sqlstate: Option<String>,
    pub error: Option<String>,
    pub duration_us: u64,
    pub skipped: bool,
    /// Result rows as the client saw them (already masked), up to the recording cap.
    pub columns: Vec<String>,
    pub recorded: Vec<Vec<Option<String>>>,
    pub truncated: bool,
    /// What masking replaced in this statement's answer (targets and counts, never values).
    pub masked: MaskSummary,
}

/// Where a statement stands with the session's `max_rows` limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    Within,
    /// Past the limit: rows are dropped and PostgreSQL was asked to cancel; the statement's
    /// end (its CommandComplete or the cancel's error) becomes interceptor's error.
    Cutting,
    /// The client has its error; the rest of this query message is dropped up to
    /// ReadyForQuery, as after any error of a simple query.
    Reported,
}

/// A statement forwarded to run: the audit record its outcome attaches to, and what its
/// answer has shown so far.
#[derive(Debug)]
pub(crate) struct Running {
    pub record: Option<RecordId>,
    pub started: Instant,
    pub outcome: Outcome,
    pub cut: Cut,
}

impl Running {
    pub(crate) fn new(record: Option<RecordId>) -> Self {
        Running {
            record,
            started: Instant::now(),
            outcome: Outcome::default(),
            cut: Cut::Within,
        }
    }
}

/// What PostgreSQL owes for one forwarded message. Describes and Executes carry the statement
/// or portal they name as it was when forwarded, so an answer lands where it belongs even if
/// the client reused the name since.
#[derive(Debug)]
pub(crate) enum Owed {
    /// ParseComplete, which makes the statement count ([`Prepared::settle`]); an error that
    /// fails or skips the Parse leaves the statement PostgreSQL had.
    Parse(Arc<Prepared>),
    /// BindComplete.
    Bind,
    /// ParameterDescription, then RowDescription or NoData: masking keeps the plan in the
    /// statement (`None`: one the session does not know; PostgreSQL does not either).
    DescribeStatement(Option<Arc<Prepared>>),
    /// RowDescription or NoData of the portal `name` (`portal`: as the session knows it;
    /// `None` for one it does not, such as a SQL cursor).
    DescribePortal {
        name: Box<str>,
        portal: Option<Arc<Portal>>,
    },
    /// Rows, COPY data and a CommandComplete (or EmptyQuery, PortalSuspended, an error).
    /// `copies`: what each COPY TO STDOUT of the statement produces, in order.
    Execute {
        name: Box<str>,
        portal: Option<Arc<Portal>>,
        copies: VecDeque<OwedCopy>,
        run: Running,
    },
    /// The results of each statement of the Query, then ReadyForQuery.
    Query {
        copies: VecDeque<OwedCopy>,
        run: Running,
    },
    /// FunctionCallResponse, then ReadyForQuery.
    FunctionCall(Running),
    /// ReadyForQuery.
    Sync,
    /// A refused message went as a stand-in that cannot parse (`interceptor_refused_<nonce>`):
    /// PostgreSQL answers with a syntax error naming it, which the client gets as `error`.
    /// `simple`: the stand-in is a Query (it ends its batch), else an unnamed Parse. `run`:
    /// the statement's outcome when it was let through and then refused (by column masking).
    Refused {
        nonce: String,
        error: Bytes,
        simple: bool,
        run: Option<Running>,
    },
}

impl Owed {
    /// Answered last by a ReadyForQuery.
    pub(crate) fn ends_batch(&self) -> bool {
        matches!(
            self,
            Owed::Query { .. }
                | Owed::Sync
                | Owed::FunctionCall(_)
                | Owed::Refused { simple: true, .. }
        )
    }

    /// The statement it runs, if it runs one.
    pub(crate) fn run(&self) -> Option<&Running> {
        match self {
            Owed::Execute { run, .. } | Owed::Query { run, .. } | Owed::FunctionCall(run) => {
                Some(run)
            }
            Owed::Refused { run, .. } => run.as_ref(),
            _ => None,
        }
    }

    fn run_mut(&mut self) -> Option<&mut Running> {
        match self {
            Owed::Execute { run, .. } | Owed::Query { run, .. } | Owed::FunctionCall(run) => {
                Some(run)
            }
            Owed::Refused { run, .. } => run.as_mut(),
            _ => None,
        }
    }

    fn is_describe(&self) -> bool {
        matches!(
            self,
            Owed::DescribeStatement(_) | Owed::DescribePortal { .. }
        )
    }

    /// Gone from the queue without an answer of its own (an error earlier in the batch, or
    /// the batch's end): a pending Parse failed, an Execute was skipped unless the error was
    /// recorded as its own. Statements go to `out`, their outcome complete; returns whether a
    /// Parse was settled.
    fn drop_unanswered(self, out: &mut Vec<Running>) -> bool {
        match self {
            Owed::Parse(p) => {
                p.settle(false);
                return true;
            }
            Owed::Execute { mut run, .. } => {
                run.outcome.skipped = run.outcome.sqlstate.is_none();
                out.push(run);
            }
            Owed::Query { run, .. } | Owed::FunctionCall(run) => out.push(run),
            Owed::Refused { run: Some(run), .. } => out.push(run),
            _ => {}
        }
        false
    }
}

/// The queue of answers PostgreSQL owes, front first.
#[derive(Debug, Default)]
pub(crate) struct OwedQueue {
    queue: VecDeque<Owed>,
}

impl OwedQueue {
    pub(crate) fn push(&mut self, owed: Owed) {
        self.queue.push_back(owed);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// PostgreSQL owes nothing: nothing of the session is running or about to answer.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Statements forwarded whose results have not all come back yet.
    pub(crate) fn running(&self) -> usize {
        self.queue.iter().filter(|e| e.run().is_some()).count()
    }

    /// The first entry of the batch being answered that `want` accepts. Answers come in the
    /// order the messages went, so this is the front whenever the entries before it are
    /// answered; an entry of a later batch never takes an answer of this one.
    fn first(&self, want: impl Fn(&Owed) -> bool) -> Option<usize> {
        for (i, e) in self.queue.iter().enumerate() {
            if want(e) {
                return Some(i);
            }
            if e.ends_batch() {
                return None;
            }
        }
        None
    }

    /// The statement whose answer is arriving: the first of the batch that runs one.
    pub(crate) fn running_mut(&mut self) -> Option<&mut Running> {
        let i = self.first(|e| e.run().is_some())?;
        self.queue.get_mut(i)?.run_mut()
    }

    /// The entry whose result rows or COPY are arriving (an Execute or a Query).
    pub(crate) fn producing(&self) -> Option<&Owed> {
        self.queue.get(self.first(|e| e.run().is_some())?)
    }

    /// The Describe a RowDescription or NoData answers; `None` when a RowDescription starts
    /// a statement's result.
    pub(crate) fn describing(&self) -> Option<&Owed> {
        let i = self.first(|e| e.is_describe() || e.run().is_some())?;
        self.queue.get(i).filter(|e| e.is_describe())
    }

    /// If this ErrorResponse is PostgreSQL's answer to the front entry, a refusal's stand-in,
    /// the error the client gets in its place. Recognised on PostgreSQL's own text, which
    /// names the stand-in's nonce: no other error can take a refusal's place.
    pub(crate) fn refusal_answered(&self, body: &[u8]) -> Option<Bytes> {
        let Some(Owed::Refused { nonce, error, .. }) = self.queue.front() else {
            return None;
        };
        let (code, msg) = message::error_code_and_message(body)?;
        (code == sqlstate::SYNTAX_ERROR && msg.contains(nonce.as_str())).then(|| error.clone())
    }

    /// Advances the queue by one backend message, after masking and the audit bookkeeping
    /// read the entry it belongs to. Statements whose outcome is complete go to `done`.
    /// Returns whether a Parse was settled (answered, failed or skipped).
    pub(crate) fn answered(&mut self, tag: u8, done: &mut Vec<Running>) -> bool {
        match tag {
            b'1' => {
                if let Some(i) = self.first(|e| matches!(e, Owed::Parse(_)))
                    && let Some(Owed::Parse(p)) = self.queue.remove(i)
                {
                    p.settle(true);
                    return true;
                }
            }
            b'2' => self.remove_first(|e| matches!(e, Owed::Bind)),
            // A Describe's answer ends with its RowDescription or NoData (its
            // ParameterDescription comes first); a RowDescription of a result ends nothing.
            b'T' | b'n' => {
                if let Some(i) = self.first(|e| e.is_describe() || e.run().is_some())
                    && self.queue.get(i).is_some_and(Owed::is_describe)
                {
                    self.queue.remove(i);
                }
            }
            // The COPY's spec is used: the next COPY of the statement has the next one.
            b'H' => {
                if let Some(i) = self.first(|e| e.run().is_some())
                    && let Some(Owed::Execute { copies, .. } | Owed::Query { copies, .. }) =
                        self.queue.get_mut(i)
                {
                    copies.pop_front();
                }
            }
            // An Execute ends with its statement; a Query's statements end at ReadyForQuery.
            b'C' | b'I' | b's' => {
                if let Some(i) = self.first(|e| e.run().is_some())
                    && matches!(self.queue.get(i), Some(Owed::Execute { .. }))
                    && let Some(Owed::Execute { run, .. }) = self.queue.remove(i)
                {
                    done.push(run);
                }
            }
            // PostgreSQL skips the rest of an extended batch up to Sync.
            b'E' => {
                let mut settled = false;
                while self.queue.front().is_some_and(|e| !e.ends_batch()) {
                    if let Some(e) = self.queue.pop_front() {
                        settled |= e.drop_unanswered(done);
                    }
                }
                return settled;
            }
            // Everything up to and including the entry that ends the batch is paid.
            b'Z' => {
                let mut settled = false;
                while let Some(e) = self.queue.pop_front() {
                    let ends = e.ends_batch();
                    settled |= e.drop_unanswered(done);
                    if ends {
                        break;
                    }
                }
                return settled;
            }
            _ => {}
        }
        false
    }

    fn remove_first(&mut self, want: impl Fn(&Owed) -> bool) {
        if let Some(i) = self.first(want) {
            self.queue.remove(i);
        }
    }
}

/// The session's owed queue as both directions share it, with the signal a client message
/// waits on when what it refers to depends on a Parse still unanswered.
#[derive(Debug, Default)]
pub(crate) struct Owing {
    queue: Mutex<OwedQueue>,
    parses_settled: tokio::sync::Notify,
}

impl Owing {
    /// PostgreSQL will answer a message about to go upstream with `owed`.
    pub(crate) fn push(&self, owed: Owed) {
        self.lock().push(owed);
    }

    /// Statements forwarded whose results have not all come back yet.
    pub(crate) fn running(&self) -> usize {
        self.lock().running()
    }

    /// The queue, to read and advance by a chunk of backend messages.
    pub(crate) fn lock(&self) -> MutexGuard<'_, OwedQueue> {
        // Each operation leaves the queue consistent, so a holder's panic leaves it usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves at the next [`Owing::settled`]; enable it before checking whether a Parse is
    /// still pending, so a settlement in between is not missed.
    pub(crate) fn parses_settled(&self) -> tokio::sync::futures::Notified<'_> {
        self.parses_settled.notified()
    }

    /// Backend messages settled Parses ([`OwedQueue::answered`] said so).
    pub(crate) fn settled(&self) {
        self.parses_settled.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::super::Statements;
    use super::*;

    fn run(id: u64) -> Running {
        Running::new(Some(RecordId(id)))
    }

    fn execute(id: u64) -> Owed {
        Owed::Execute {
            name: "".into(),
            portal: None,
            copies: VecDeque::new(),
            run: run(id),
        }
    }

    fn refused(nonce: &str, simple: bool, run: Option<Running>) -> Owed {
        Owed::Refused {
            nonce: nonce.into(),
            error: Bytes::from_static(b"interceptor's error"),
            simple,
            run,
        }
    }

    /// PostgreSQL's syntax error for a stand-in (or any other text).
    fn syntax_error(text: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (k, v) in [(b'S', "ERROR"), (b'C', "42601"), (b'M', text)] {
            b.push(k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    /// Feeds backend message tags; returns the records of the statements that completed, with
    /// whether each was skipped.
    fn answer(q: &mut OwedQueue, tags: &[u8]) -> Vec<(u64, bool)> {
        let mut done = Vec::new();
        for t in tags {
            q.answered(*t, &mut done);
        }
        done.iter()
            .map(|r| (r.record.map_or(0, |r| r.0), r.outcome.skipped))
            .collect()
    }

    /// Two Parse/Bind/Execute groups in one batch and a third batch pipelined behind it; the
    /// second Parse fails. Its Parse counts as failed, the statement PostgreSQL has stays; the
    /// Execute after it is skipped; the next batch's Parse is not touched by that error and
    /// counts only once its own ParseComplete arrives.
    #[test]
    fn an_error_in_a_pipeline_fails_and_skips_only_its_own_batch() {
        let mut s = Statements::new(false);
        let p1 = s.parsed("a", "SELECT 1", Vec::new(), 0);
        let p2 = s.parsed("b", "SELECT 2", Vec::new(), 0);
        let p3 = s.parsed("c", "SELECT 3", Vec::new(), 1);
        let mut q = OwedQueue::default();
        for e in [
            Owed::Parse(p1.clone()),
            Owed::Bind,
            execute(1),
            Owed::Parse(p2.clone()),
            Owed::Bind,
            execute(2),
            Owed::Sync,
            Owed::Parse(p3.clone()),
            Owed::Bind,
            execute(3),
            Owed::Sync,
        ] {
            q.push(e);
        }
        assert_eq!(q.running(), 3);
        assert_eq!(answer(&mut q, b"12DC"), [(1, false)]);
        assert!(!p1.is_pending() && p2.is_pending() && p3.is_pending());
        // The second Parse fails: the rest of the batch is skipped up to its Sync.
        let mut done = Vec::new();
        assert!(q.answered(b'E', &mut done), "a Parse was settled");
        assert_eq!(
            done.iter()
                .map(|r| (r.record.map(|r| r.0), r.outcome.skipped))
                .collect::<Vec<_>>(),
            [(Some(2), true)]
        );
        assert!(!p2.is_pending() && s.statement("b").is_none(), "p2 failed");
        assert!(p3.is_pending(), "the next batch's Parse is not failed");
        assert!(matches!(q.queue.front(), Some(Owed::Sync)));
        assert_eq!(answer(&mut q, b"Z"), []);
        // The next batch: a ParseComplete settles its own Parse and nothing else.
        assert!(q.answered(b'1', &mut done));
        assert!(!p3.is_pending() && s.statement("c").is_some());
        assert_eq!(answer(&mut q, b"2DDCZ"), [(3, false)]);
        assert_eq!(q.len(), 0);
    }

    /// An error recorded as a statement's own (the audit bookkeeping attributes it before the
    /// queue advances) leaves the statement answered, not skipped; a ReadyForQuery settles a
    /// Parse nobody answered as failed.
    #[test]
    fn an_execute_with_its_own_error_is_not_skipped() {
        let mut s = Statements::new(false);
        let p = s.parsed("", "SELECT 1", Vec::new(), 0);
        let mut q = OwedQueue::default();
        q.push(execute(1));
        q.push(execute(2));
        q.push(Owed::Parse(p.clone()));
        q.push(Owed::Sync);
        q.running_mut()
            .expect("the first Execute is running")
            .outcome
            .sqlstate = Some("22012".into());
        assert_eq!(answer(&mut q, b"E"), [(1, false), (2, true)]);
        assert!(!p.is_pending());
        let mut q = OwedQueue::default();
        let p = s.parsed("", "SELECT 2", Vec::new(), 1);
        q.push(Owed::Parse(p.clone()));
        q.push(Owed::Sync);
        answer(&mut q, b"Z");
        assert!(!p.is_pending(), "unanswered at ReadyForQuery: failed");
        assert!(s.statement("").is_none(), "and the name holds what it held");
    }

    /// A refused Parse in the middle of a pipeline: PostgreSQL's error for its stand-in is
    /// recognised only at the front and only with its nonce; the statements behind it are
    /// skipped, the ones before it complete, and a simple stand-in waits for ReadyForQuery.
    #[test]
    fn a_refused_statement_answers_in_its_place() {
        let mut q = OwedQueue::default();
        q.push(Owed::Bind);
        q.push(execute(1));
        q.push(refused("interceptor_refused_ab", false, None));
        q.push(Owed::Bind);
        q.push(execute(2));
        q.push(Owed::Sync);
        q.push(refused("interceptor_refused_cd", true, Some(run(3))));
        let stand_in = syntax_error("syntax error at or near \"interceptor_refused_ab\"");
        assert!(
            q.refusal_answered(&stand_in).is_none(),
            "not at the front yet"
        );
        assert_eq!(answer(&mut q, b"2C"), [(1, false)]);
        assert!(
            q.refusal_answered(&syntax_error("syntax error at or near \"x\""))
                .is_none(),
            "PostgreSQL's own error is not a refusal"
        );
        assert_eq!(
            q.refusal_answered(&stand_in).as_deref(),
            Some(&b"interceptor's error"[..])
        );
        assert_eq!(answer(&mut q, b"E"), [(2, true)]);
        assert_eq!(answer(&mut q, b"Z"), []);
        // The simple stand-in: its error does not end it, its ReadyForQuery does.
        assert!(
            q.refusal_answered(&syntax_error("at \"interceptor_refused_cd\""))
                .is_some()
        );
        assert_eq!(answer(&mut q, b"E"), []);
        assert_eq!(q.running(), 1);
        assert_eq!(answer(&mut q, b"Z"), [(3, false)]);
        assert_eq!(q.len(), 0);
    }

    /// A Describe of a statement is answered by ParameterDescription then RowDescription or
    /// NoData, a Describe of a portal by one of the two; a RowDescription that starts a
    /// result belongs to its statement and answers no Describe.
    #[test]
    fn describes_take_their_row_description_and_results_keep_theirs() {
        let mut s = Statements::new(false);
        let p = s.parsed("s", "SELECT 1", Vec::new(), 0);
        let mut q = OwedQueue::default();
        q.push(Owed::Parse(p.clone()));
        q.push(Owed::DescribeStatement(Some(p)));
        q.push(Owed::Bind);
        q.push(Owed::DescribePortal {
            name: "".into(),
            portal: None,
        });
        q.push(execute(1));
        q.push(Owed::Sync);
        q.push(Owed::Query {
            copies: VecDeque::new(),
            run: run(2),
        });
        answer(&mut q, b"1t");
        assert!(matches!(
            q.describing(),
            Some(Owed::DescribeStatement(Some(_)))
        ));
        answer(&mut q, b"T2");
        assert!(matches!(q.describing(), Some(Owed::DescribePortal { .. })));
        answer(&mut q, b"n");
        assert!(q.describing().is_none(), "the Execute's rows are next");
        assert!(matches!(
            q.producing(),
            Some(Owed::Execute { run, .. }) if run.record == Some(RecordId(1))
        ));
        assert_eq!(answer(&mut q, b"DCZ"), [(1, false)]);
        // A Query's RowDescription starts its result: the entry stays until ReadyForQuery.
        assert!(q.describing().is_none());
        assert_eq!(answer(&mut q, b"TDCTDC"), []);
        assert_eq!(q.running(), 1);
        assert_eq!(answer(&mut q, b"Z"), [(2, false)]);
    }

    /// Each COPY TO STDOUT of a statement takes the next of its specs; an Execute's COPY
    /// ends with its CommandComplete, a Query's with ReadyForQuery.
    #[test]
    fn each_copy_takes_the_next_spec_of_its_own_statement() {
        fn front_copy(q: &OwedQueue) -> Option<String> {
            match q.producing()? {
                Owed::Query { copies, .. } | Owed::Execute { copies, .. } => {
                    copies.front().and_then(|c| c.as_ref().err().cloned())
                }
                _ => None,
            }
        }
        let mut q = OwedQueue::default();
        q.push(Owed::Bind);
        q.push(Owed::Execute {
            name: "".into(),
            portal: None,
            copies: VecDeque::from([Err("execute".into())]),
            run: run(1),
        });
        q.push(Owed::Sync);
        q.push(Owed::Query {
            copies: VecDeque::from([Err("first".into()), Err("second".into())]),
            run: run(2),
        });
        answer(&mut q, b"2");
        assert_eq!(front_copy(&q).as_deref(), Some("execute"));
        assert_eq!(answer(&mut q, b"HddcCZ"), [(1, false)]);
        assert_eq!(front_copy(&q).as_deref(), Some("first"));
        answer(&mut q, b"HdcC");
        assert_eq!(front_copy(&q).as_deref(), Some("second"));
        answer(&mut q, b"HdcC");
        assert_eq!(front_copy(&q), None);
        assert_eq!(answer(&mut q, b"Z"), [(2, false)]);
    }
}
