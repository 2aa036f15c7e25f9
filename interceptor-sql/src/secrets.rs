//! Where a statement holds secrets: the string constants PostgreSQL's parser reads as a
//! password (`CREATE/ALTER ROLE|USER … [ENCRYPTED] PASSWORD '…'`, `password` options of user
//! mappings and foreign servers) or a connection string (`CREATE/ALTER SUBSCRIPTION …
//! CONNECTION '…'`). The parser's tree says which constant it is, whatever its spelling
//! (dollar quotes, `E''`, `U&''`, comments in between); the lexer's tokens of the same text
//! give its exact bytes, so the audit trail can leave out those bytes and nothing else.

use std::ops::Range;

use pg_query::protobuf::node::Node as N;
use pg_query::protobuf::{DefElem, Node};

use super::lexer::{Tok, TokKind};

/// A secret the tree names but the tokens do not place: the statement must be withheld whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unplaced;

/// The byte ranges (in the query text) of the string constants holding secrets in `node`,
/// whose tokens are `tokens`.
pub(crate) fn secret_spans(node: &N, tokens: &[Tok]) -> Result<Vec<Range<usize>>, Unplaced> {
    let mut out = Vec::new();
    match node {
        N::CreateRoleStmt(s) => password_options(&s.options, tokens, &mut out)?,
        N::AlterRoleStmt(s) => password_options(&s.options, tokens, &mut out)?,
        N::CreateUserMappingStmt(s) => password_options(&s.options, tokens, &mut out)?,
        N::AlterUserMappingStmt(s) => password_options(&s.options, tokens, &mut out)?,
        N::CreateForeignServerStmt(s) => password_options(&s.options, tokens, &mut out)?,
        N::AlterForeignServerStmt(s) => password_options(&s.options, tokens, &mut out)?,
        N::CreateSubscriptionStmt(s) => {
            out.push(string_at(s.conninfo_location, tokens).ok_or(Unplaced)?)
        }
        N::AlterSubscriptionStmt(s) if !s.conninfo.is_empty() => {
            out.push(string_at(s.conninfo_location, tokens).ok_or(Unplaced)?)
        }
        _ => {}
    }
    Ok(out)
}

fn password_options(
    options: &[Node],
    tokens: &[Tok],
    out: &mut Vec<Range<usize>>,
) -> Result<(), Unplaced> {
    for o in options {
        let Some(N::DefElem(d)) = o.node.as_ref() else {
            continue;
        };
        if !d.defname.eq_ignore_ascii_case("password") {
            continue;
        }
        match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
            // `PASSWORD NULL`: no secret.
            None => {}
            Some(_) => out.push(argument(d, tokens).ok_or(Unplaced)?),
        }
    }
    Ok(())
}

/// The string constant that is the option's value: at the tree's argument location when it
/// gives one, else the first token after the option's own location (`PASSWORD`, `ENCRYPTED`
/// or the option name); either way it must be a string token, or the secret is not placed.
fn argument(d: &DefElem, tokens: &[Tok]) -> Option<Range<usize>> {
    if d.arg_location >= 0 {
        return string_at(d.arg_location, tokens);
    }
    let at = usize::try_from(d.location).ok()?;
    let i = tokens.iter().position(|t| t.span.start == at)?;
    let mut rest = tokens[i + 1..].iter();
    let mut next = rest.next()?;
    if matches!(&next.kind, TokKind::Word { value, quoted: false } if value.eq_ignore_ascii_case("password"))
    {
        next = rest.next()?;
    }
    matches!(next.kind, TokKind::Str { .. }).then(|| next.span.clone())
}

fn string_at(location: i32, tokens: &[Tok]) -> Option<Range<usize>> {
    let at = usize::try_from(location).ok()?;
    tokens
        .iter()
        .find(|t| t.span.start == at && matches!(t.kind, TokKind::Str { .. }))
        .map(|t| t.span.clone())
}
