//! Server-side prepared statements shared across clients.
//!
//! A client's named statement is interned per pool by its Parse body (query
//! text and parameter types) and lives on servers under a pgmux name
//! (`pgmux_<id>`), so clients preparing the same text share one server-side
//! statement per backend. Each backend keeps a bounded LRU of what it holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// One interned statement. Immutable; shared by clients and backends.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The name it has on servers.
    pub server_name: Box<str>,
    /// The Parse body after the statement name: query, NUL, parameter type count and OIDs.
    pub body: Bytes,
    /// Client names bound to it. At zero its server copies are closed the
    /// next time each backend is checked out, so later clients never see
    /// statements of clients long gone in `pg_prepared_statements`.
    users: AtomicUsize,
    /// The registry's count of statements that lost their last user.
    deaths: Arc<AtomicU64>,
    /// The registry's [`Tally`].
    tally: Arc<Tally>,
    /// A server has parsed it successfully: a client preparing the same
    /// text can be answered without a backend (see `client::prepare_locally`).
    validated: AtomicBool,
}

impl Statement {
    /// A server answered a Parse of it with ParseComplete: it is known good,
    /// and one more server-side statement was created (SHOW STATS).
    pub fn mark_validated(&self) {
        self.tally.server_parses.fetch_add(1, Ordering::Relaxed);
        self.validated.store(true, Ordering::Relaxed);
    }

    pub fn is_validated(&self) -> bool {
        self.validated.load(Ordering::Relaxed)
    }

    /// A client bound a name to it: the client prepared a named statement.
    pub fn acquire(&self) {
        self.tally.client_parses.fetch_add(1, Ordering::Relaxed);
        self.users.fetch_add(1, Ordering::Relaxed);
    }

    /// A client dropped a name bound to it.
    pub fn release(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.deaths.fetch_add(1, Ordering::Release);
        }
    }

    pub fn is_unused(&self) -> bool {
        self.users.load(Ordering::Acquire) == 0
    }
}

/// Named-statement counts of one pool since it was created, PgBouncer's
/// `client_parse_count` and `server_parse_count`: counted where the
/// statements themselves are, so the relay needs no extra bookkeeping.
#[derive(Debug, Default)]
pub struct Tally {
    /// Named statements clients prepared (a Parse through a backend, or one
    /// answered without one).
    pub client_parses: AtomicU64,
    /// Named statements servers parsed for pgmux: a client's Parse forwarded,
    /// or one pgmux sent before a Bind or Describe on a backend lacking it.
    pub server_parses: AtomicU64,
}

/// Interning table of one pool.
#[derive(Debug, Default)]
pub struct Registry {
    by_body: Mutex<HashMap<Bytes, Arc<Statement>>>,
    next_id: AtomicU64,
    deaths: Arc<AtomicU64>,
    tally: Arc<Tally>,
}

impl Registry {
    /// The statement for this Parse body, created on first sight.
    pub fn intern(&self, body: &[u8]) -> Arc<Statement> {
        let mut map = self.by_body.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = map.get(body) {
            return st.clone();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let body = Bytes::copy_from_slice(body);
        let st = Arc::new(Statement {
            id,
            server_name: format!("pgmux_{id}").into_boxed_str(),
            body: body.clone(),
            users: AtomicUsize::new(0),
            deaths: self.deaths.clone(),
            tally: self.tally.clone(),
            validated: AtomicBool::new(false),
        });
        map.insert(body, st.clone());
        st
    }

    /// The statement for this Parse body, if one exists.
    pub fn find(&self, body: &[u8]) -> Option<Arc<Statement>> {
        self.by_body.lock().unwrap_or_else(|e| e.into_inner()).get(body).cloned()
    }

    /// Retires a statement whose server copies went stale (e.g. "cached plan
    /// must not change result type" after DDL): the next Parse of the same
    /// text gets a fresh id, hence a fresh server-side statement.
    pub fn invalidate(&self, st: &Arc<Statement>) {
        let mut map = self.by_body.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&st.body).is_some_and(|cur| Arc::ptr_eq(cur, st)) {
            map.remove(&st.body);
        }
    }

    pub fn len(&self) -> usize {
        self.by_body.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// How many statements have lost their last user so far: backends that
    /// saw this number already have nothing new to close.
    pub fn deaths(&self) -> u64 {
        self.deaths.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }
}

/// The statements one backend holds, least recently used first out.
/// Small (`max_prepared_statements`, 200 by default): a vector scan is cheaper
/// than hashing at this size and allocates nothing per use.
#[derive(Debug, Default)]
pub struct PreparedSet {
    entries: Vec<(Arc<Statement>, u64)>,
    tick: u64,
    /// Server statements to close at the next opportunity (retired or evicted).
    pub to_close: Vec<Box<str>>,
    /// `Registry::deaths` when unused statements were last swept here.
    swept_at_deaths: u64,
}

impl PreparedSet {
    /// True if held; marks it used.
    pub fn touch(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.entries.iter_mut().find(|(s, _)| s.id == id) {
            Some((_, used)) => {
                *used = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records a statement as prepared on the server; evicts the least recently
    /// used one beyond `cap`, whose server name is queued in `to_close`.
    pub fn insert(&mut self, st: Arc<Statement>, cap: usize) {
        self.tick += 1;
        self.entries.push((st, self.tick));
        while self.entries.len() > cap.max(1) {
            let oldest = self.entries.iter().enumerate().min_by_key(|(_, (_, used))| *used).map(|(i, _)| i);
            let Some(i) = oldest else { break };
            let (evicted, _) = self.entries.swap_remove(i);
            self.to_close.push(evicted.server_name.clone());
        }
    }

    /// Forgets a statement (its Parse failed, or it was closed); `close` also
    /// queues a Close for its server copy.
    pub fn remove(&mut self, id: u64, close: bool) {
        if let Some(i) = self.entries.iter().position(|(s, _)| s.id == id) {
            let (st, _) = self.entries.swap_remove(i);
            if close {
                self.to_close.push(st.server_name.clone());
            }
        }
    }

    /// Removes statements no client uses any more, once per change of the
    /// registry's death count; returns their server names to close. Unused
    /// statements also leave the registry, so it only holds live ones.
    pub fn sweep_unused(&mut self, registry: &Registry) -> Vec<Box<str>> {
        let deaths = registry.deaths();
        if deaths == self.swept_at_deaths {
            return Vec::new();
        }
        self.swept_at_deaths = deaths;
        let mut names = Vec::new();
        self.entries.retain(|(st, _)| {
            if st.is_unused() {
                registry.invalidate(st);
                names.push(st.server_name.clone());
                false
            } else {
                true
            }
        });
        names
    }

    /// The server dropped every prepared statement (DISCARD ALL / DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.to_close.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_same_statement_until_invalidated() {
        let r = Registry::default();
        let a = r.intern(b"SELECT 1\0\0\0");
        let b = r.intern(b"SELECT 1\0\0\0");
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(r.intern(b"SELECT 2\0\0\0").id, a.id);
        r.invalidate(&a);
        let c = r.intern(b"SELECT 1\0\0\0");
        assert_ne!(c.id, a.id);
        assert_ne!(c.server_name, a.server_name);
        // Invalidating the stale one again must not retire its successor.
        r.invalidate(&a);
        assert!(Arc::ptr_eq(&c, &r.intern(b"SELECT 1\0\0\0")));
    }

    #[test]
    fn unused_statements_are_swept_once_their_last_user_leaves() {
        let r = Registry::default();
        let (a, b) = (r.intern(b"a\0\0\0"), r.intern(b"b\0\0\0"));
        a.acquire();
        b.acquire();
        b.acquire();
        let mut set = PreparedSet::default();
        set.insert(a.clone(), 10);
        set.insert(b.clone(), 10);
        assert!(set.sweep_unused(&r).is_empty());
        a.release();
        b.release();
        assert_eq!(set.sweep_unused(&r), vec![a.server_name.clone()]);
        assert!(set.touch(b.id) && !set.touch(a.id));
        // a left the registry too: the same text gets a fresh statement.
        assert_ne!(r.intern(b"a\0\0\0").id, a.id);
        b.mark_validated();
        assert_eq!(r.tally().client_parses.load(Ordering::Relaxed), 3);
        assert_eq!(r.tally().server_parses.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let r = Registry::default();
        let (a, b, c) = (r.intern(b"a\0\0\0"), r.intern(b"b\0\0\0"), r.intern(b"c\0\0\0"));
        let mut set = PreparedSet::default();
        set.insert(a.clone(), 2);
        set.insert(b.clone(), 2);
        assert!(set.touch(a.id));
        set.insert(c.clone(), 2);
        assert!(set.touch(a.id) && set.touch(c.id));
        assert!(!set.touch(b.id));
        assert_eq!(set.to_close, vec![b.server_name.clone()]);
        set.remove(a.id, true);
        assert_eq!(set.len(), 1);
        assert_eq!(set.to_close.len(), 2);
    }
}
