//! Read/write routing: which node runs a request, from the classifier's
//! verdict ([`crate::sql`]), the replicas' health and read-your-writes state.

pub mod monitor;
pub mod route;

use crate::sql::{Class, Hint, WriteFunctions, classify};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;

use crate::config::StickyScope;
use monitor::{MonitorLogin, NodeState};
use route::{Intent, RouteReason, Sticky};

/// Process-wide routing state: node monitors, user-scoped read-your-writes
/// state, and decision counters. Shared by all client tasks.
#[derive(Debug, Default)]
pub struct Routing {
    monitors: DashMap<(String, String), Arc<NodeState>>,
    user_sticky: DashMap<(String, String), Arc<Mutex<Sticky>>>,
    counts: [AtomicU64; RouteReason::ALL.len()],
    spin: AtomicUsize,
}

impl Routing {
    /// The state of `addr` for database `db`, starting its monitor on first use.
    pub fn node(&self, db: &str, addr: &str, login: &MonitorLogin, interval: Duration) -> Arc<NodeState> {
        let key = (db.to_owned(), addr.to_owned());
        if let Some(n) = self.monitors.get(&key) {
            return n.clone();
        }
        self.monitors
            .entry(key)
            .or_insert_with(|| {
                let state = NodeState::new(addr);
                tokio::spawn(monitor::run(state.clone(), login.clone(), interval));
                state
            })
            .clone()
    }

    /// Every monitored node, for SHOW REPLICAS and metrics.
    pub fn nodes(&self) -> Vec<((String, String), Arc<NodeState>)> {
        self.monitors.iter().map(|e| (e.key().clone(), e.value().clone())).collect()
    }

    /// The read-your-writes scope of a new client.
    pub fn sticky(&self, scope: StickyScope, db: &str, user: &str) -> Arc<Mutex<Sticky>> {
        match scope {
            StickyScope::Connection => Arc::default(),
            StickyScope::User => self.user_sticky.entry((db.to_owned(), user.to_owned())).or_default().clone(),
        }
    }

    pub fn count(&self, reason: RouteReason) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counted(&self, reason: RouteReason) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    /// A value for round-robin / random choice.
    pub fn spin(&self) -> usize {
        self.spin.fetch_add(1, Ordering::Relaxed)
    }

    pub fn stop_monitors(&self) {
        for m in self.monitors.iter() {
            m.value().stop();
        }
    }
}

/// What a request unit (the SQL of its Query, or of the statements its
/// Parse/Bind/Describe messages refer to) means for routing: a read only if
/// every part surely is one.
pub fn intent_of<'a>(sql_parts: impl IntoIterator<Item = &'a [u8]>, write_functions: &WriteFunctions) -> Intent {
    let mut any = false;
    for sql in sql_parts {
        any = true;
        let c = classify(sql, write_functions);
        match c.hint {
            Some(Hint::Primary) => return Intent::HintPrimary,
            Some(Hint::Replica) => return Intent::HintReplica,
            None => {}
        }
        match c.class {
            Class::Read | Class::Empty | Class::Begin { read_only: true } | Class::SetTransactionReadOnly => {}
            Class::Begin { read_only: false } => return Intent::Transaction,
            _ => return Intent::Write,
        }
    }
    if any { Intent::Read } else { Intent::Write }
}
