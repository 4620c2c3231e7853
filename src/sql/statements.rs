//! The simple-protocol statements that drop prepared statements, which
//! pgmux must see because it keeps its own names for them on the servers.

use std::borrow::Cow;

use super::lex::{Lexer, Tok};
use super::unquote_ident;

/// What a simple Query does to prepared statements, as far as pgmux must know.
#[derive(Debug, PartialEq, Eq)]
pub enum StatementCommand<'a> {
    /// `DEALLOCATE [PREPARE] ALL` or `DISCARD ALL`: the server drops every statement.
    DropAll,
    /// `DEALLOCATE [PREPARE] name`, with the name as Postgres resolves it
    /// (folded to lower case unless quoted, `""` unescaped).
    Deallocate(Cow<'a, [u8]>),
    Other,
}

/// Recognises a Query (its body, NUL included or not) that is exactly one
/// DEALLOCATE or DISCARD ALL statement, with an optional `;`.
pub fn statement_command(query: &[u8]) -> StatementCommand<'_> {
    let query = query.strip_suffix(b"\0").unwrap_or(query);
    // Every Query comes here: one token decides for almost all of them.
    let starts_right = match Lexer::new(query).next_tok() {
        Tok::Word(w) => w.eq_ignore_ascii_case(b"discard") || w.eq_ignore_ascii_case(b"deallocate"),
        _ => false,
    };
    if !starts_right {
        return StatementCommand::Other;
    }
    let mut lx = Lexer::new(query);
    let mut toks = [Tok::Eof; 4];
    let mut n = 0;
    loop {
        match lx.next_tok() {
            Tok::Eof => break,
            // One statement only: a `;` must be the last token.
            Tok::Semi => {
                if lx.next_tok() != Tok::Eof {
                    return StatementCommand::Other;
                }
                break;
            }
            _ if n == toks.len() => return StatementCommand::Other,
            t => {
                toks[n] = t;
                n += 1;
            }
        }
    }
    if lx.ambiguous {
        return StatementCommand::Other;
    }
    let kw = |t: &Tok<'_>, k: &[u8]| matches!(t, Tok::Word(w) if w.eq_ignore_ascii_case(k));
    let mut words = &toks[..n];
    match words {
        [d, a] if kw(d, b"discard") && kw(a, b"all") => return StatementCommand::DropAll,
        [d, rest @ ..] if kw(d, b"deallocate") => words = rest,
        _ => return StatementCommand::Other,
    }
    if let [p, rest @ ..] = words
        && kw(p, b"prepare")
    {
        words = rest;
    }
    match words {
        [a] if kw(a, b"all") => StatementCommand::DropAll,
        [Tok::Word(w)] if w.iter().any(u8::is_ascii_uppercase) => {
            StatementCommand::Deallocate(Cow::Owned(w.to_ascii_lowercase()))
        }
        [Tok::Word(w)] => StatementCommand::Deallocate(Cow::Borrowed(w)),
        [Tok::QIdent { raw, unicode: false }] => StatementCommand::Deallocate(unquote_ident(raw)),
        _ => StatementCommand::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dealloc(name: &[u8]) -> StatementCommand<'_> {
        StatementCommand::Deallocate(Cow::Borrowed(name))
    }

    #[test]
    fn recognises_deallocate_and_discard() {
        assert_eq!(statement_command(b"DEALLOCATE ALL\0"), StatementCommand::DropAll);
        assert_eq!(statement_command(b" discard  all ;\0"), StatementCommand::DropAll);
        assert_eq!(statement_command(b"deallocate prepare s1\0"), dealloc(b"s1"));
        assert_eq!(statement_command(b"DEALLOCATE \"S 1\"\0"), dealloc(b"S 1"));
        assert_eq!(statement_command(b"DEALLOCATE \"S1\"\0"), dealloc(b"S1"));
        assert_eq!(statement_command(b"DEALLOCATE \"a\"\"b\";"), dealloc(b"a\"b"));
        // Unquoted names are folded, as Postgres does.
        assert_eq!(statement_command(b"DEALLOCATE S1"), dealloc(b"s1"));
        assert_eq!(statement_command(b"DEALLOCATE /* c */ s1 -- c"), dealloc(b"s1"));
        assert_eq!(statement_command(b"DISCARD PLANS\0"), StatementCommand::Other);
        assert_eq!(statement_command(b"SELECT 1\0"), StatementCommand::Other);
        assert_eq!(statement_command(b"DEALLOCATE s1; SELECT 1"), StatementCommand::Other);
        assert_eq!(statement_command(b"DEALLOCATE 'x\\';"), StatementCommand::Other);
    }
}
