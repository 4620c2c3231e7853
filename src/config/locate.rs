//! Source positions for config errors: byte offset <-> `line:col`, and
//! byte offset <-> key path (`databases[0].primary`).
//!
//! serde hands us a span but no key path, and our own semantic checks know
//! the key path but not the span, so both directions go through one flat
//! index of every key and value in the document.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A path to a key, printed as `databases[0].replicas[1].addr`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(Vec<Seg>);

impl KeyPath {
    pub fn new(key: &str) -> Self {
        KeyPath(vec![Seg::Key(key.to_owned())])
    }

    pub fn key(mut self, key: &str) -> Self {
        self.0.push(Seg::Key(key.to_owned()));
        self
    }

    pub fn index(mut self, i: usize) -> Self {
        self.0.push(Seg::Index(i));
        self
    }

    fn parent(&self) -> Option<KeyPath> {
        let (_, rest) = self.0.split_last()?;
        Some(KeyPath(rest.to_vec()))
    }

    pub fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Seg::Key(k)) => Some(k),
            _ => None,
        }
    }

    fn depth(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

struct Node {
    path: KeyPath,
    /// Absent for array elements.
    key_span: Option<Range<usize>>,
    /// For `[table]` and `[[array]]` entries this is only the header line:
    /// the parser does not give tables a span covering their body.
    value_span: Range<usize>,
    is_header: bool,
}

impl Node {
    /// Where the entry starts: its key, or the value for array elements.
    fn anchor(&self) -> usize {
        self.key_span.as_ref().map_or(self.value_span.start, |k| k.start)
    }
}

pub(crate) struct Locator<'a> {
    text: &'a str,
    origin: &'a str,
    nodes: Vec<Node>,
}

impl<'a> Locator<'a> {
    /// Indexes `text`. Uses the recovering parser so that even a file with a
    /// syntax error yields enough structure to name the key near the error;
    /// the returned errors are the syntax errors, first one first.
    pub fn new(text: &'a str, origin: &'a str) -> (Self, Vec<toml::de::Error>) {
        let (root, errors) = DeTable::parse_recoverable(text);
        let mut loc = Locator { text, origin, nodes: Vec::new() };
        loc.index_table(&KeyPath::default(), root.get_ref());
        (loc, errors)
    }

    fn index_table(&mut self, path: &KeyPath, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            let path = path.clone().key(key.get_ref());
            self.index_value(path, Some(key.span()), value.span(), value.get_ref());
        }
    }

    fn index_value(&mut self, path: KeyPath, key_span: Option<Range<usize>>, span: Range<usize>, value: &DeValue<'_>) {
        let is_header = value.is_table() && self.text.get(span.clone()).is_some_and(|s| s.starts_with('['));
        self.nodes.push(Node { path: path.clone(), key_span, value_span: span, is_header });
        match value {
            DeValue::Table(t) => self.index_table(&path, t),
            DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    self.index_value(path.clone().index(i), None, v.span(), v.get_ref());
                }
            }
            _ => {}
        }
    }

    /// The byte offset to report for `path`: its value if present, else the
    /// nearest enclosing table that is (so a missing key points at its table).
    pub fn offset_of(&self, path: &KeyPath) -> usize {
        let mut path = Some(path.clone());
        while let Some(p) = path {
            if let Some(node) = self.nodes.iter().find(|n| n.path == p) {
                return node.value_span.start;
            }
            path = p.parent();
        }
        0
    }

    /// The key path an error span belongs to. Exact for serde errors; for
    /// syntax errors the recovered tree can be garbled, so this is a best guess.
    pub fn path_at(&self, span: &Range<usize>) -> KeyPath {
        let at = span.start;
        // Smallest key or value span containing the error; ties go to the
        // deeper node (an `[[array]]` element shares its span with the array).
        let mut best: Option<(&Node, usize)> = None;
        for node in &self.nodes {
            for s in node.key_span.iter().chain([&node.value_span]) {
                // A header spanning lines only comes out of error recovery.
                let garbled = node.is_header && self.text.get(s.clone()).is_some_and(|t| t.contains('\n'));
                if s.start <= at && at < s.end && !garbled {
                    let len = s.end - s.start;
                    if best.is_none_or(|(b, l)| len < l || (len == l && node.path.depth() > b.path.depth())) {
                        best = Some((node, len));
                    }
                }
            }
        }
        if let Some((node, _)) = best {
            return node.path.clone();
        }
        // Nothing contains it: a syntax error, often at the end of a value.
        let line = self.line_col(at).0;
        let line_text = self.text.lines().nth(line - 1).unwrap_or("").trim();
        if let Some(header) = line_text.strip_prefix('[') {
            // A broken `[table]` header: name the table as written.
            let name = header.trim_start_matches('[').split(']').next().unwrap_or("").trim();
            return if is_bare_key(&name.replace('.', "")) { KeyPath::new(name) } else { KeyPath::default() };
        }
        let Some(prev) = self.nodes.iter().filter(|n| n.anchor() <= at).max_by_key(|n| (n.anchor(), n.path.depth()))
        else {
            return KeyPath::default();
        };
        if self.line_col(prev.anchor()).0 == line {
            return prev.path.clone();
        }
        // The last entry before the error is on an earlier line, so the error
        // is in the same table: a header's own, or the table holding a key.
        let table = if prev.is_header { prev.path.clone() } else { prev.path.parent().unwrap_or_default() };
        match self.text.get(span.clone()) {
            // e.g. a duplicate key: the span is the key itself.
            Some(key) if is_bare_key(key) => table.key(key),
            _ => table,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        // Spans from toml fall on char boundaries; this only guards against panics.
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// `origin:line:col: path: message`, plus the offset for sorting. Control
    /// characters, which quoted keys and echoed values can hold, are escaped:
    /// each error stays one line, as callers and logs expect.
    pub fn error(&self, offset: usize, path: &KeyPath, message: &str) -> (usize, String) {
        let (line, col) = self.line_col(offset);
        let mut text = format!("{}:{line}:{col}: ", self.origin);
        for c in format!("{path}: {message}").chars() {
            if c.is_control() {
                text.extend(c.escape_default());
            } else {
                text.push(c);
            }
        }
        (offset, text)
    }

    pub fn error_at(&self, path: &KeyPath, message: &str) -> (usize, String) {
        self.error(self.offset_of(path), path, message)
    }
}

fn is_bare_key(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
