//! A database's nodes and their observed roles: which one is the primary
//! now, which are fenced, and from where on the primary's timeline a
//! replica's position means anything.
//!
//! A task per topology reads the node monitors' samples every
//! `monitor_interval`, decides with [`decide`] (pure), publishes the
//! primary to the database's [`Leader`] (the primary pools follow it) and
//! logs every change. The rules, in order:
//! - a primary is a node that answers, is not in recovery, and is not fenced;
//! - its timeline never goes down: a writer on an older timeline than the
//!   one pgmux already follows (an old primary restarted without rewind) is
//!   fenced — no writes, no reads — until it comes back as a replica of the
//!   current timeline;
//! - the primary stays while it answers on the highest timeline (never
//!   alternate); any other writer is fenced;
//! - with no writable node, there is no primary: writes wait in the pool
//!   queue for one (`Pool::follow`), reads go on from replicas.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::monitor::{NodeState, NodeView};
use crate::config::StatedRole;
use crate::pool::Leader;

/// One node of a topology.
#[derive(Debug)]
pub struct TopologyNode {
    pub addr: String,
    /// Share of reads while it is a replica.
    pub weight: u32,
    /// What proxy.toml says it is (`hosts`: nothing).
    pub stated: Option<StatedRole>,
    pub state: Arc<NodeState>,
}

/// A node's state as the admin console and `/metrics` report it (`lagging`
/// is a routing judgement on top of `Up`, made with the current policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    Up,
    Down,
    /// A second writer: no writes, no reads.
    Fenced,
    /// A replica not on the primary's timeline: no reads.
    Timeline,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Up => "up",
            NodeStatus::Down => "down",
            NodeStatus::Fenced => "fenced",
            NodeStatus::Timeline => "timeline",
        }
    }
}

/// The observed role of a node.
pub fn role_of(view: &NodeView) -> &'static str {
    match (view.sampled_at, view.in_recovery) {
        (None, _) => "unknown",
        (Some(_), true) => "replica",
        (Some(_), false) => "primary",
    }
}

/// What the topology decided from its last look at the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index of the primary in the topology's nodes.
    pub primary: Option<usize>,
    /// The primary's timeline (0 before the first primary): never goes down.
    pub timeline: u32,
    /// The primary's position when pgmux first saw it on `timeline`: a
    /// replica of that timeline past it has everything the old timeline
    /// handed over.
    pub timeline_start: u64,
    pub fenced: Vec<bool>,
    pub status: Vec<NodeStatus>,
    /// When each node's role or status last changed.
    pub since: Vec<Instant>,
}

impl Decision {
    fn initial(n: usize, now: Instant) -> Decision {
        Decision {
            primary: None,
            timeline: 0,
            timeline_start: 0,
            fenced: vec![false; n],
            status: vec![NodeStatus::Down; n],
            since: vec![now; n],
        }
    }
}

/// The next decision from the previous one and the nodes' latest samples.
pub fn decide(prev: &Decision, views: &[NodeView], stated: &[Option<StatedRole>], now: Instant) -> Decision {
    let mut fenced = prev.fenced.clone();
    for (f, v) in fenced.iter_mut().zip(views) {
        // Back as a replica of the current timeline: harmless again.
        if *f && v.healthy && v.in_recovery && v.timeline >= prev.timeline {
            *f = false;
        }
    }
    let writable = |i: usize| {
        let v = &views[i];
        v.healthy && !v.in_recovery && !fenced[i] && v.timeline >= prev.timeline
    };
    let best = (0..views.len()).filter(|&i| writable(i)).map(|i| views[i].timeline).max();
    let primary = best.and_then(|tl| {
        let on_best = |i: &usize| writable(*i) && views[*i].timeline == tl;
        prev.primary
            .filter(on_best)
            .or_else(|| (0..views.len()).filter(on_best).find(|&i| stated[i] == Some(StatedRole::Primary)))
            .or_else(|| (0..views.len()).find(on_best))
    });
    // Every other writer that answers is a second writer.
    for (i, v) in views.iter().enumerate() {
        if Some(i) != primary && v.healthy && !v.in_recovery {
            fenced[i] = true;
        }
    }
    let (timeline, timeline_start) = match primary {
        Some(p) if views[p].timeline != prev.timeline => (views[p].timeline, views[p].lsn),
        _ => (prev.timeline, prev.timeline_start),
    };
    let status: Vec<NodeStatus> = views
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if !v.healthy {
                NodeStatus::Down
            } else if fenced[i] {
                NodeStatus::Fenced
            } else if v.in_recovery && timeline != 0 && v.timeline != timeline {
                NodeStatus::Timeline
            } else {
                NodeStatus::Up
            }
        })
        .collect();
    let since = (0..views.len())
        .map(|i| {
            let role_changed = (prev.primary == Some(i)) != (primary == Some(i));
            if role_changed || prev.status[i] != status[i] { now } else { prev.since[i] }
        })
        .collect();
    Decision { primary, timeline, timeline_start, fenced, status, since }
}

/// The nodes of one database and who the primary is.
#[derive(Debug)]
pub struct Topology {
    pub db: String,
    pub nodes: Vec<TopologyNode>,
    pub leader: Arc<Leader>,
    decision: ArcSwap<Decision>,
    /// Times the primary moved to another node.
    changes: AtomicU64,
    /// The last node that was primary, for the log line of the next change.
    last_primary: std::sync::Mutex<Option<usize>>,
    /// A reload replaced this topology: it no longer publishes.
    retired: AtomicBool,
}

impl Topology {
    pub fn new(db: &str, nodes: Vec<TopologyNode>, leader: Arc<Leader>) -> Arc<Topology> {
        let n = nodes.len();
        Arc::new(Topology {
            db: db.to_owned(),
            nodes,
            leader,
            decision: ArcSwap::from_pointee(Decision::initial(n, Instant::now())),
            changes: AtomicU64::new(0),
            last_primary: std::sync::Mutex::new(None),
            retired: AtomicBool::new(false),
        })
    }

    /// The latest decision (lock-free, no reference count touched: read
    /// once per routed request).
    pub fn decision(&self) -> arc_swap::Guard<Arc<Decision>> {
        self.decision.load()
    }

    /// Times the primary moved to another node since this topology started.
    pub fn primary_changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// The node stated as the database's addresses, in proxy.toml's order.
    pub fn addrs(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.addr.as_str())
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Looks at the nodes again and publishes what changed.
    pub fn reconsider(&self, now: Instant) {
        let views: Vec<NodeView> = self.nodes.iter().map(|n| n.state.view()).collect();
        let stated: Vec<Option<StatedRole>> = self.nodes.iter().map(|n| n.stated).collect();
        let prev = self.decision.load_full();
        let next = decide(&prev, &views, &stated, now);
        if *prev == next {
            return;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if next.fenced[i] && !prev.fenced[i] {
                tracing::error!(
                    database = %self.db, node = %node.addr, timeline = views[i].timeline,
                    primary_timeline = next.timeline,
                    "two nodes accept writes: fencing this one (no writes, no reads) until it comes back as a replica of the current timeline"
                );
            } else if prev.fenced[i] && !next.fenced[i] {
                tracing::warn!(database = %self.db, node = %node.addr, "fenced node is a replica of the current timeline again");
            }
            if next.status[i] == NodeStatus::Timeline && prev.status[i] != NodeStatus::Timeline {
                tracing::warn!(database = %self.db, node = %node.addr, timeline = views[i].timeline, primary_timeline = next.timeline, "replica is not on the primary's timeline: out of rotation");
            }
            if let Some(role) = node.stated
                && views[i].healthy
                && (role == StatedRole::Primary) == views[i].in_recovery
                && prev.status[i] == NodeStatus::Down
            {
                tracing::warn!(database = %self.db, node = %node.addr, stated = ?role, observed = role_of(&views[i]), "node's observed role differs from proxy.toml's");
            }
        }
        if prev.primary != next.primary {
            let mut last = self.last_primary.lock().unwrap_or_else(|e| e.into_inner());
            let name = |i: Option<usize>| i.map_or("none", |i| self.nodes[i].addr.as_str());
            match next.primary {
                Some(p) => {
                    if last.is_some_and(|l| l != p) {
                        self.changes.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(
                        database = %self.db, old = name(*last), new = %self.nodes[p].addr, timeline = next.timeline,
                        "primary changed"
                    );
                    *last = Some(p);
                }
                None => tracing::warn!(
                    database = %self.db, old = name(*last), new = "none",
                    "no writable primary: writes wait (query_wait_timeout) for one"
                ),
            }
        }
        if !self.retired.load(Ordering::Relaxed) {
            self.leader.set(next.primary.map(|p| self.nodes[p].addr.as_str()));
        }
        self.decision.store(Arc::new(next));
    }
}

/// One node as the admin console and `/metrics` report it.
#[derive(Debug, Clone)]
pub struct NodeReport<'a> {
    pub addr: &'a str,
    pub weight: u32,
    pub stated: Option<StatedRole>,
    pub view: NodeView,
    /// `primary`, `replica` or `unknown`, as observed.
    pub role: &'static str,
    /// `up`, `down`, `lagging`, `fenced` or `timeline`.
    pub state: &'static str,
    /// Replicas: bytes of WAL behind the primary's position.
    pub lag_bytes: Option<u64>,
    /// `None`: the node takes reads now (replicas) or writes (the primary).
    pub out_of_rotation: Option<&'static str>,
    pub is_primary: bool,
    pub since: Instant,
}

impl Topology {
    /// Every node's role and state, judged with the routing `policy` the
    /// way [`super::route::route`] judges them.
    pub fn report(&self, policy: &super::route::Policy) -> Vec<NodeReport<'_>> {
        use super::route::{Candidate, PrimaryView, out_of_rotation};
        let d = self.decision();
        let views: Vec<NodeView> = self.nodes.iter().map(|n| n.state.view()).collect();
        let primary = PrimaryView {
            view: d.primary.map_or(NodeView::UNKNOWN, |p| views[p]),
            timeline: d.timeline,
            timeline_start: d.timeline_start,
        };
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let v = views[i];
                let is_primary = d.primary == Some(i);
                let candidate = Candidate { view: v, fenced: d.fenced[i], active: 0, weight: n.weight };
                let why_not = if is_primary { None } else { out_of_rotation(policy, &candidate, &primary) };
                let state = match d.status[i] {
                    NodeStatus::Up if why_not == Some("lagging") => "lagging",
                    s => s.as_str(),
                };
                NodeReport {
                    addr: &n.addr,
                    weight: n.weight,
                    stated: n.stated,
                    view: v,
                    role: if d.fenced[i] { "primary" } else { role_of(&v) },
                    state,
                    lag_bytes: (primary.view.healthy && v.in_recovery && v.healthy)
                        .then(|| primary.view.lsn.saturating_sub(v.lsn)),
                    out_of_rotation: why_not,
                    is_primary,
                    since: d.since[i],
                }
            })
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

/// Decides every `interval` until the topology is dropped or retired.
pub async fn run(topology: Weak<Topology>, interval: Duration) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(t) = topology.upgrade() else { return };
        if t.retired.load(Ordering::Relaxed) {
            return;
        }
        t.reconsider(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(healthy: bool, in_recovery: bool, timeline: u32, lsn: u64) -> NodeView {
        NodeView { healthy, in_recovery, timeline, lsn, ..NodeView::UNKNOWN }
    }

    const HOSTS: [Option<StatedRole>; 3] = [None, None, None];

    #[test]
    fn the_writable_node_is_the_primary_and_a_promotion_is_followed() {
        let t = Instant::now();
        let d0 = Decision::initial(3, t);
        let d1 = decide(&d0, &[v(true, false, 1, 100), v(true, true, 1, 90), v(true, true, 1, 90)], &HOSTS, t);
        assert_eq!((d1.primary, d1.timeline, d1.timeline_start), (Some(0), 1, 100));
        // The primary dies: no primary, writes wait.
        let d2 = decide(&d1, &[v(false, false, 1, 100), v(true, true, 1, 100), v(true, true, 1, 100)], &HOSTS, t);
        assert_eq!(d2.primary, None);
        assert_eq!(d2.status[0], NodeStatus::Down);
        // Replica 1 promoted: the primary, on timeline 2 from its position then;
        // replica 2, still on timeline 1, is out of rotation.
        let d3 = decide(&d2, &[v(false, false, 1, 100), v(true, false, 2, 120), v(true, true, 1, 100)], &HOSTS, t);
        assert_eq!((d3.primary, d3.timeline, d3.timeline_start), (Some(1), 2, 120));
        assert_eq!(d3.status[2], NodeStatus::Timeline);
        // Re-pointed, it streams timeline 2.
        let d4 = decide(&d3, &[v(false, false, 1, 100), v(true, false, 2, 130), v(true, true, 2, 125)], &HOSTS, t);
        assert_eq!((d4.primary, d4.status[2], d4.timeline_start), (Some(1), NodeStatus::Up, 120));
    }

    #[test]
    fn an_old_primary_that_comes_back_writable_is_fenced_until_it_is_a_replica() {
        let t = Instant::now();
        let d0 = Decision::initial(2, t);
        let d1 = decide(&d0, &[v(false, false, 0, 0), v(true, false, 2, 500)], &HOSTS, t);
        assert_eq!(d1.primary, Some(1));
        // Restarted without rewind: a writer on timeline 1.
        let d2 = decide(&d1, &[v(true, false, 1, 400), v(true, false, 2, 510)], &HOSTS, t);
        assert_eq!((d2.primary, d2.fenced[0], d2.status[0]), (Some(1), true, NodeStatus::Fenced));
        // Even while the real primary is down, the fenced node takes nothing.
        let d3 = decide(&d2, &[v(true, false, 1, 400), v(false, false, 2, 510)], &HOSTS, t);
        assert_eq!((d3.primary, d3.fenced[0]), (None, true));
        // As a replica of an old timeline, still fenced; of the current one, back.
        let d4 = decide(&d3, &[v(true, true, 1, 400), v(true, false, 2, 510)], &HOSTS, t);
        assert!(d4.fenced[0]);
        let d5 = decide(&d4, &[v(true, true, 2, 510), v(true, false, 2, 520)], &HOSTS, t);
        assert_eq!((d5.primary, d5.fenced[0], d5.status[0]), (Some(1), false, NodeStatus::Up));
    }

    #[test]
    fn two_writers_never_alternate() {
        let t = Instant::now();
        let stated = [Some(StatedRole::Replica), Some(StatedRole::Primary)];
        let d0 = Decision::initial(2, t);
        // Same timeline, no incumbent: the stated primary wins, the other is fenced.
        let d1 = decide(&d0, &[v(true, false, 3, 10), v(true, false, 3, 10)], &stated, t);
        assert_eq!((d1.primary, d1.fenced.clone()), (Some(1), vec![true, false]));
        // The incumbent keeps the role while it answers on the highest timeline.
        let d2 = decide(&d1, &[v(true, false, 3, 20), v(true, false, 3, 20)], &stated, t);
        assert_eq!(d2.primary, Some(1));
        // A higher timeline elsewhere wins (a promotion the old primary missed).
        let d3 = decide(&Decision::initial(2, t), &[v(true, false, 4, 10), v(true, false, 3, 10)], &stated, t);
        assert_eq!((d3.primary, d3.fenced.clone()), (Some(0), vec![false, true]));
    }

    #[test]
    fn a_stated_primary_in_recovery_is_not_written_to() {
        let t = Instant::now();
        let stated = [Some(StatedRole::Primary), Some(StatedRole::Replica)];
        let d = decide(&Decision::initial(2, t), &[v(true, true, 1, 10), v(true, false, 1, 10)], &stated, t);
        assert_eq!(d.primary, Some(1));
        let none = decide(&Decision::initial(2, t), &[v(true, true, 1, 10), v(true, true, 1, 10)], &stated, t);
        assert_eq!(none.primary, None);
    }
}
