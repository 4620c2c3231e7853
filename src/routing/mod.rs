//! Read/write routing: which node runs a request, from the classifier's
//! verdict ([`crate::sql`]), the replicas' health and read-your-writes state.

pub mod monitor;
pub mod route;
pub mod token;
pub mod topology;

use crate::sql::{Class, Hint, WriteFunctions, classify};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;

use crate::config::{DatabaseConfig, NodeConfig, StickyScope};
use crate::pool::Leader;
use monitor::{MonitorLogin, NodeState};
use route::{Intent, RouteReason, Sticky};
use topology::{Topology, TopologyNode};

/// Process-wide routing state: node monitors, user-scoped read-your-writes
/// state, and decision counters. Shared by all client tasks.
#[derive(Debug, Default)]
pub struct Routing {
    monitors: DashMap<(String, String), Arc<NodeState>>,
    /// By database: its nodes' roles, for databases with several nodes.
    topologies: DashMap<String, Arc<Topology>>,
    /// By database: the primary its pools follow. Outlives a topology a
    /// reload replaces, so pools made before the reload follow the new one.
    leaders: DashMap<String, Arc<Leader>>,
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

    /// The topology of `db` (`None`: a single node, nothing to follow),
    /// starting it and its monitors on first use. A reload that changed the
    /// node list gets a new one; the old stops publishing.
    pub fn topology(&self, db: &DatabaseConfig, login: &MonitorLogin, interval: Duration) -> Option<Arc<Topology>> {
        let nodes: Vec<NodeConfig> = db.nodes();
        if nodes.len() < 2 {
            return None;
        }
        let same = |t: &Topology| t.nodes.len() == nodes.len() && t.addrs().zip(&nodes).all(|(a, n)| a == n.addr);
        if let Some(t) = self.topologies.get(&db.name)
            && same(&t)
        {
            return Some(t.clone());
        }
        let leader = self.leaders.entry(db.name.clone()).or_default().clone();
        let mut made = None;
        let topology = self
            .topologies
            .entry(db.name.clone())
            .and_modify(|t| {
                if !same(t) {
                    t.retire();
                    let fresh = self.build_topology(db, &nodes, leader.clone(), login, interval);
                    made = Some(fresh.clone());
                    *t = fresh;
                }
            })
            .or_insert_with(|| {
                let fresh = self.build_topology(db, &nodes, leader.clone(), login, interval);
                made = Some(fresh.clone());
                fresh
            })
            .clone();
        if let Some(t) = made {
            tokio::spawn(topology::run(Arc::downgrade(&t), interval));
        }
        Some(topology)
    }

    fn build_topology(
        &self,
        db: &DatabaseConfig,
        nodes: &[NodeConfig],
        leader: Arc<Leader>,
        login: &MonitorLogin,
        interval: Duration,
    ) -> Arc<Topology> {
        let nodes = nodes
            .iter()
            .map(|n| TopologyNode {
                addr: n.addr.clone(),
                weight: n.weight,
                stated: n.stated,
                state: self.node(&db.name, &n.addr, login, interval),
            })
            .collect();
        Topology::new(&db.name, nodes, leader)
    }

    /// The address of `db`'s observed primary, if it has several nodes and one is known.
    pub fn primary_of(&self, db: &str) -> Option<String> {
        self.leaders.get(db).and_then(|l| l.current().1.map(|a| a.to_string()))
    }

    /// Every topology, for SHOW and metrics.
    pub fn topologies(&self) -> Vec<Arc<Topology>> {
        self.topologies.iter().map(|e| e.value().clone()).collect()
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
