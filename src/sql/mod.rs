//! What pgmux reads in a client's SQL, all on one lexer ([`lex`], with
//! PostgreSQL's lexical rules): the read/write classifier, session state
//! that transaction pooling cannot carry, the settings a statement may
//! change, and the statements that drop prepared statements. None of it
//! allocates on the common path; none of it splits text at a bare `;`.

mod classify;
pub(crate) mod lex;
pub mod session_state;
pub mod settings;
pub mod statements;

#[cfg(test)]
mod corpus;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;

pub use classify::{Class, Classified, Hint, WriteFunctions, classify, directive};

use crate::vocab::reasons::PinReason;

use lex::{Lexer, Tok};

/// What the relay needs to know of every Query and Parse, found in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sniffed {
    /// The first session state a statement creates ([`session_state`]).
    pub session_state: Option<PinReason>,
    /// Whether a statement may change a setting ([`settings::touches_settings`]).
    pub touches_settings: bool,
}

/// [`session_state::session_state`] and [`settings::touches_settings`] of
/// `sql` in one walk over its statements: this runs on every request.
pub fn sniff(sql: &[u8]) -> Sniffed {
    let mut out = Sniffed {
        session_state: session_state::calls_advisory_lock(sql).then_some(PinReason::AdvisoryLock),
        touches_settings: settings::calls_set_config(sql),
    };
    each_reading(sql, |statements| {
        for mut stmt in statements {
            let Some(first) = stmt.word() else { continue };
            out.touches_settings |= settings::sets(first);
            if out.session_state.is_none() {
                out.session_state = session_state::of_statement(first, &mut stmt);
            }
            if out.touches_settings && out.session_state.is_some() {
                return Some(());
            }
        }
        None
    });
    out
}

/// The statements of a text, each as a lexer at its first token (read it
/// with [`Statement::next`], which stops at the statement's end). A `;`
/// ends a statement where the lexer finds one outside literals, comments
/// and quoted names.
pub(crate) struct Statements<'a> {
    lx: Lexer<'a>,
    done: bool,
}

impl<'a> Statements<'a> {
    fn new(lx: Lexer<'a>) -> Statements<'a> {
        Statements { lx, done: false }
    }

    /// Whether lexing so far depended on `standard_conforming_strings`
    /// (or ran into an unterminated literal).
    fn ambiguous(&self) -> bool {
        self.lx.ambiguous
    }
}

impl<'a> Iterator for Statements<'a> {
    type Item = Statement<'a>;

    fn next(&mut self) -> Option<Statement<'a>> {
        if self.done {
            return None;
        }
        let at = self.lx;
        // No `;` left but trailing ones: this is the last statement in any
        // reading (a trailing `;` ends it, or sits in a line comment, or in a
        // literal or comment left open, which the server rejects whole), and
        // nobody needs its tokens past the few its reader takes. Most
        // requests are one statement: this spares them a full lex.
        let rest = self.lx.rest();
        let core =
            rest.iter().rposition(|&b| !matches!(b, b';' | b'\0') && !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
        if memchr::memchr(b';', &rest[..core]).is_none() {
            self.done = true;
            return Some(Statement { lx: at, ended: false });
        }
        loop {
            match self.lx.next_tok() {
                Tok::Semi => break,
                Tok::Eof => {
                    self.done = true;
                    break;
                }
                _ => {}
            }
        }
        Some(Statement { lx: at, ended: false })
    }
}

/// One statement's tokens.
pub(crate) struct Statement<'a> {
    lx: Lexer<'a>,
    ended: bool,
}

impl<'a> Statement<'a> {
    /// The next token, `None` at the statement's `;` or the text's end.
    fn next(&mut self) -> Option<Tok<'a>> {
        if self.ended {
            return None;
        }
        match self.lx.next_tok() {
            Tok::Semi | Tok::Eof => {
                self.ended = true;
                None
            }
            t => Some(t),
        }
    }

    /// The next token if it is an unquoted word.
    fn word(&mut self) -> Option<&'a [u8]> {
        match self.next()? {
            Tok::Word(w) => Some(w),
            _ => None,
        }
    }
}

/// Runs `scan` over the statements of `sql` as PostgreSQL reads them with
/// `standard_conforming_strings = on` and, when that reading was ambiguous
/// (a backslash before a quote), once more as with it off: a sniffer sees
/// every statement either reading contains. Stops at the first `Some`.
pub(crate) fn each_reading<T>(sql: &[u8], mut scan: impl FnMut(&mut Statements<'_>) -> Option<T>) -> Option<T> {
    let mut standard = Statements::new(Lexer::new(sql));
    if let Some(found) = scan(&mut standard) {
        return Some(found);
    }
    // `scan` returned None, so it read every statement: the flag is final.
    if !standard.ambiguous() {
        return None;
    }
    scan(&mut Statements::new(Lexer::with_backslash_quotes(sql)))
}

/// A quoted identifier's name: `""` stands for one `"`.
fn unquote_ident(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if memchr::memmem::find(raw, b"\"\"").is_none() {
        return std::borrow::Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        out.push(raw[i]);
        i += if raw[i] == b'"' { 2 } else { 1 };
    }
    std::borrow::Cow::Owned(out)
}
