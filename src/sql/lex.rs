//! A byte-level lexer with PostgreSQL's lexical rules, just precise enough to
//! find statement boundaries, keywords, names and parentheses. It never
//! allocates and never fails: anything it cannot lex with certainty sets
//! [`Lexer::ambiguous`], which the classifier turns into a write.

/// One token. Literals keep their raw text (no unescaping) because the
/// classifier only compares a few of them against short ASCII values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tok<'a> {
    /// An unquoted identifier or keyword, as written.
    Word(&'a [u8]),
    /// A quoted identifier's raw text between the quotes (`""` not collapsed).
    /// `unicode` for `U&"..."`, whose escapes we do not decode.
    QIdent {
        raw: &'a [u8],
        unicode: bool,
    },
    /// Any string literal; `raw` is the text between the delimiters.
    Str(&'a [u8]),
    Num(&'a [u8]),
    /// `$1`, `$2`, ...
    Param,
    LParen,
    RParen,
    Semi,
    Comma,
    Dot,
    /// Any other byte (operators, brackets, `::` is two of these).
    Op(u8),
    Eof,
}

#[derive(Clone, Copy)]
pub(crate) struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
    /// Set when lexing depended on something we cannot know (a string whose
    /// end depends on `standard_conforming_strings`) or the input is cut off
    /// (unterminated literal, identifier or comment).
    pub ambiguous: bool,
    /// Read `'...'` as with `standard_conforming_strings = off`: a backslash
    /// escapes the next byte. The sniffers try this second reading of a
    /// text the first found ambiguous.
    backslash_quotes: bool,
}

const SPACE: u8 = 1;
const START: u8 = 2;
const CONT: u8 = 4;
const TAG: u8 = 8;

/// Byte classes, one table lookup per byte in the hot loops.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c') {
            t[b] |= SPACE;
        }
        // `ident_start` in scan.l: letters, `_` and every non-ASCII byte.
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            t[b] |= START | CONT | TAG;
        }
        if c.is_ascii_digit() {
            t[b] |= CONT | TAG;
        }
        // `ident_cont` also has `$` (so `a$$b` is one name, not a dollar
        // quote); dollar-quote tags do not.
        if c == b'$' {
            t[b] |= CONT;
        }
        b += 1;
    }
    t
};

fn is_space(b: u8) -> bool {
    CLASS[usize::from(b)] & SPACE != 0
}

pub(crate) fn is_ident_start(b: u8) -> bool {
    CLASS[usize::from(b)] & START != 0
}

fn is_ident_cont(b: u8) -> bool {
    CLASS[usize::from(b)] & CONT != 0
}

fn is_tag_cont(b: u8) -> bool {
    CLASS[usize::from(b)] & TAG != 0
}

/// Position of `needle` in `hay`. Most literals and quoted names are short,
/// where a plain loop beats memchr's setup; long ones still get memchr.
fn find(needle: u8, hay: &[u8]) -> Option<usize> {
    const SHORT: usize = 24;
    let head = &hay[..hay.len().min(SHORT)];
    match head.iter().position(|&b| b == needle) {
        Some(n) => Some(n),
        None if hay.len() > SHORT => memchr::memchr(needle, &hay[SHORT..]).map(|n| n + SHORT),
        None => None,
    }
}

/// Index just past the end of a (nested) block comment starting at `i`
/// (which points at `/*`), or `None` if it is unterminated.
pub(crate) fn block_comment_end(s: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i + 1 < s.len() {
        match (s[i], s[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Index of the end of a `--` comment starting at `i` (the newline is not included).
pub(crate) fn line_comment_end(s: &[u8], i: usize) -> usize {
    memchr::memchr2(b'\n', b'\r', &s[i..]).map_or(s.len(), |n| i + n)
}

/// Skips whitespace; returns the index of the first other byte.
pub(crate) fn skip_space(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    i
}

impl<'a> Lexer<'a> {
    pub fn new(s: &'a [u8]) -> Self {
        Lexer { s, pos: 0, ambiguous: false, backslash_quotes: false }
    }

    /// A lexer reading `'...'` as `standard_conforming_strings = off` does.
    pub fn with_backslash_quotes(s: &'a [u8]) -> Self {
        Lexer { s, pos: 0, ambiguous: false, backslash_quotes: true }
    }

    /// The text not lexed yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.s[self.pos.min(self.s.len())..]
    }

    fn byte(&self, i: usize) -> u8 {
        self.s.get(i).copied().unwrap_or(0)
    }

    pub fn next_tok(&mut self) -> Tok<'a> {
        let s = self.s;
        loop {
            self.pos = skip_space(s, self.pos);
            let start = self.pos;
            let Some(&c) = s.get(start) else { return Tok::Eof };
            let next = self.byte(start + 1);
            // Comments win over operators anywhere (scan.l cuts operators at `--` and `/*`).
            if c == b'-' && next == b'-' {
                self.pos = line_comment_end(s, start);
                continue;
            }
            if c == b'/' && next == b'*' {
                match block_comment_end(s, start) {
                    Some(end) => self.pos = end,
                    None => self.cut_off(),
                }
                continue;
            }
            self.pos = start + 1;
            return match c {
                b'\'' if self.backslash_quotes => self.escape_string(start + 1),
                b'\'' => self.quoted_string(start + 1, true),
                b'"' => self.quoted_ident(start + 1, false),
                b'$' if next.is_ascii_digit() => {
                    while self.byte(self.pos).is_ascii_digit() {
                        self.pos += 1;
                    }
                    Tok::Param
                }
                b'$' => self.dollar_string(start),
                b'(' => Tok::LParen,
                b')' => Tok::RParen,
                b';' => Tok::Semi,
                b',' => Tok::Comma,
                b'.' if next.is_ascii_digit() => self.number(start),
                b'.' => Tok::Dot,
                b'0'..=b'9' => self.number(start),
                c if is_ident_start(c) => self.word(start),
                c => Tok::Op(c),
            };
        }
    }

    /// The input ends inside a literal or comment: PostgreSQL would reject the
    /// whole string, so the classifier must not call it a read.
    #[inline(never)] // rare: keeps next_tok's frame small
    fn cut_off(&mut self) {
        self.ambiguous = true;
        self.pos = self.s.len();
    }

    fn word(&mut self, start: usize) -> Tok<'a> {
        while is_ident_cont(self.byte(self.pos)) {
            self.pos += 1;
        }
        let w = &self.s[start..self.pos];
        let after = self.byte(self.pos);
        if w.len() == 1 {
            match (w[0] | 0x20, after) {
                // E'...' : backslash escapes regardless of standard_conforming_strings.
                (b'e', b'\'') => {
                    self.pos += 1;
                    return self.escape_string(self.pos);
                }
                // U&'...' and U&"...": backslash is the Unicode escape prefix, not a quote escape.
                (b'u', b'&') if matches!(self.byte(self.pos + 1), b'\'' | b'"') => {
                    let q = self.byte(self.pos + 1);
                    self.pos += 2;
                    return if q == b'"' {
                        self.quoted_ident(self.pos, true)
                    } else {
                        self.quoted_string(self.pos, false)
                    };
                }
                _ => {}
            }
        }
        Tok::Word(w)
    }

    /// A standard string: `''` is the only escape when standard_conforming_strings
    /// is on (the default since 9.1). With it off, `\'` also escapes a quote and the
    /// string would end elsewhere; a backslash right before any quote therefore
    /// makes the statement boundaries uncertain (`check_backslash`).
    fn quoted_string(&mut self, body: usize, check_backslash: bool) -> Tok<'a> {
        let s = self.s;
        let mut i = body;
        loop {
            let Some(n) = find(b'\'', &s[i..]) else {
                self.cut_off();
                return Tok::Str(&s[body..]);
            };
            let q = i + n;
            if check_backslash && q > body && s[q - 1] == b'\\' {
                self.ambiguous = true;
            }
            if self.byte(q + 1) == b'\'' {
                i = q + 2;
                continue;
            }
            self.pos = q + 1;
            return Tok::Str(&s[body..q]);
        }
    }

    #[inline(never)] // rare: keeps next_tok's frame small
    fn escape_string(&mut self, body: usize) -> Tok<'a> {
        let s = self.s;
        let mut i = body;
        loop {
            let Some(n) = memchr::memchr2(b'\'', b'\\', &s[i..]) else {
                self.cut_off();
                return Tok::Str(&s[body..]);
            };
            let q = i + n;
            if s[q] == b'\\' {
                i = q + 2;
                if i > s.len() {
                    self.cut_off();
                    return Tok::Str(&s[body..]);
                }
                continue;
            }
            if self.byte(q + 1) == b'\'' {
                i = q + 2;
                continue;
            }
            self.pos = q + 1;
            return Tok::Str(&s[body..q]);
        }
    }

    fn quoted_ident(&mut self, body: usize, unicode: bool) -> Tok<'a> {
        let s = self.s;
        let mut i = body;
        loop {
            let Some(n) = find(b'"', &s[i..]) else {
                self.cut_off();
                return Tok::QIdent { raw: &s[body..], unicode };
            };
            let q = i + n;
            if self.byte(q + 1) == b'"' {
                i = q + 2;
                continue;
            }
            self.pos = q + 1;
            return Tok::QIdent { raw: &s[body..q], unicode };
        }
    }

    /// `$tag$ ... $tag$` (tag may be empty). A `$` that does not open a valid
    /// tag is just an operator byte; PostgreSQL would reject it.
    #[inline(never)] // rare: keeps next_tok's frame small
    fn dollar_string(&mut self, start: usize) -> Tok<'a> {
        let s = self.s;
        let mut i = start + 1;
        if i < s.len() && is_ident_start(s[i]) {
            i += 1;
            while i < s.len() && is_tag_cont(s[i]) {
                i += 1;
            }
        }
        if self.byte(i) != b'$' {
            return Tok::Op(b'$');
        }
        let delim = &s[start..=i];
        let body = i + 1;
        match memchr::memmem::find(&s[body..], delim) {
            Some(n) => {
                self.pos = body + n + delim.len();
                Tok::Str(&s[body..body + n])
            }
            None => {
                self.cut_off();
                Tok::Str(&s[body..])
            }
        }
    }

    /// Digits, `_` separators, one `.`, an exponent only when digits follow
    /// (so `1e'x'` lexes as `1` then an E-string, as PostgreSQL < 15 did), and
    /// `0x`/`0o`/`0b` prefixes. Letters after a number start a new token.
    fn number(&mut self, start: usize) -> Tok<'a> {
        let s = self.s;
        let mut i = start;
        if s[i] == b'0' && matches!(self.byte(i + 1) | 0x20, b'x' | b'o' | b'b') && self.byte(i + 2).is_ascii_hexdigit()
        {
            i += 2;
            while i < s.len() && (s[i].is_ascii_hexdigit() || s[i] == b'_') {
                i += 1;
            }
            self.pos = i;
            return Tok::Num(&s[start..i]);
        }
        let mut seen_dot = false;
        while i < s.len() {
            match s[i] {
                b'0'..=b'9' | b'_' => i += 1,
                // `1..2` is not a number followed by `.2`; stop at a second dot.
                b'.' if !seen_dot && self.byte(i + 1) != b'.' => {
                    seen_dot = true;
                    i += 1;
                }
                _ => break,
            }
        }
        if matches!(self.byte(i), b'e' | b'E') {
            let mut j = i + 1;
            if matches!(self.byte(j), b'+' | b'-') {
                j += 1;
            }
            if self.byte(j).is_ascii_digit() {
                i = j;
                while i < s.len() && s[i].is_ascii_digit() {
                    i += 1;
                }
            }
        }
        self.pos = i;
        Tok::Num(&s[start..i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> (Vec<Tok<'_>>, bool) {
        let mut lx = Lexer::new(s.as_bytes());
        let mut v = Vec::new();
        loop {
            let t = lx.next_tok();
            if t == Tok::Eof {
                return (v, lx.ambiguous);
            }
            v.push(t);
        }
    }

    #[test]
    fn strings_and_comments() {
        let (t, amb) = toks("select 'a''b' -- x\n /* a /* b */ c */ $$ x $$ $q$ $$ $q$ e'\\'' \"a\"\"b\" $1");
        assert!(!amb);
        assert_eq!(
            t,
            vec![
                Tok::Word(b"select"),
                Tok::Str(b"a''b"),
                Tok::Str(b" x "),
                Tok::Str(b" $$ "),
                Tok::Str(b"\\'"),
                Tok::QIdent { raw: b"a\"\"b", unicode: false },
                Tok::Param,
            ]
        );
    }

    #[test]
    fn ambiguity() {
        assert!(toks("select 'a\\'").1, "backslash-quote depends on standard_conforming_strings");
        assert!(!toks("select 'a\\b'").1);
        assert!(toks("select 'abc").1);
        assert!(toks("select /* /* */").1);
        assert!(toks("select $x$ abc $y$").1);
        assert!(toks("select \"abc").1);
        assert!(toks("select e'abc\\").1);
    }

    #[test]
    fn odd_shapes() {
        assert_eq!(toks("a$$b$$").0, vec![Tok::Word(b"a$$b$$")]);
        assert_eq!(toks("1e'x'").0, vec![Tok::Num(b"1"), Tok::Str(b"x")]);
        assert_eq!(toks("1.5e-3 .5").0, vec![Tok::Num(b"1.5e-3"), Tok::Num(b".5")]);
        assert_eq!(toks("1for").0, vec![Tok::Num(b"1"), Tok::Word(b"for")]);
        assert_eq!(toks("U&\"n\" u&'x'").0, vec![Tok::QIdent { raw: b"n", unicode: true }, Tok::Str(b"x")]);
        assert_eq!(toks("+--x\n-").0, vec![Tok::Op(b'+'), Tok::Op(b'-')]);
        assert_eq!(toks("$ 1").0, vec![Tok::Op(b'$'), Tok::Num(b"1")]);
    }
}
