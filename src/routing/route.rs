//! The routing decision: primary or which replica, and why. Pure: inputs in,
//! a [`Route`] with its reason out; no locks, clock or sockets inside.

use std::time::{Duration, Instant};

use super::monitor::NodeView;
use crate::config::{LoadBalance, ReadYourWrites};

pub use crate::vocab::reasons::RouteReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    /// Index into the replicas given to [`route`].
    Replica(usize),
    /// Replica `replica` once it has replayed past `lsn` of `timeline`, if
    /// it does within `max_replica_wait`; else the primary. It is in the
    /// rotation and replaying promptly, but its last sample predates the
    /// scope's write.
    CatchUp {
        replica: usize,
        timeline: u32,
        lsn: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub target: Target,
    pub reason: RouteReason,
}

impl Route {
    pub fn primary(reason: RouteReason) -> Route {
        Route { target: Target::Primary, reason }
    }
}

/// What the request is, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Surely a read (or a read-only transaction).
    Read,
    /// A read-write transaction start.
    Transaction,
    /// Anything else.
    Write,
    HintPrimary,
    HintReplica,
    /// Runs nothing: only closes statements or portals, or only syncs
    /// (drivers close a statement after each one-off query). Any node
    /// answers it as the primary would, and it needs none of the scope's
    /// writes: it must neither wait for a primary nor count as a write.
    Inert,
}

/// A WAL position: comparable only within one timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub timeline: u32,
    pub lsn: u64,
}

/// The primary as routing sees it: its latest sample (unknown while there
/// is none) and the topology's timeline.
#[derive(Debug, Clone, Copy)]
pub struct PrimaryView {
    pub view: NodeView,
    /// The timeline pgmux follows (0: not known yet); replicas on another
    /// take no reads.
    pub timeline: u32,
    /// The primary's position when pgmux switched to `timeline`: what a
    /// replica must have replayed for a write made on an earlier timeline.
    pub timeline_start: u64,
}

impl PrimaryView {
    /// A single primary of timeline `view.timeline` since forever.
    pub fn of(view: NodeView) -> PrimaryView {
        PrimaryView { view, timeline: view.timeline, timeline_start: 0 }
    }
}

/// The read-your-writes state of one scope (a connection, or a user).
#[derive(Debug, Default, Clone)]
pub struct Sticky {
    wrote_at: Option<Instant>,
    /// A primary WAL position sampled after the last write: replicas of its
    /// timeline that replayed past it have that write.
    need: Option<Position>,
    /// Writes of this scope sent to the primary and not yet settled: until
    /// each has its post-commit position, the scope reads from the primary
    /// (with a user scope, another connection may read in between).
    in_flight: u32,
    /// `wrote_at` before the writes in flight began, for [`Sticky::abandon_write`].
    wrote_before: Option<Instant>,
}

impl Sticky {
    /// A transaction that was not a pure read committed on the primary.
    pub fn wrote(&mut self, now: Instant) {
        self.wrote_at = Some(now);
        self.need = None;
    }

    /// A write is about to be sent to the primary.
    pub fn begin_write(&mut self, now: Instant) {
        if self.in_flight == 0 {
            self.wrote_before = self.wrote_at;
        }
        self.in_flight += 1;
        self.wrote_at = Some(now);
    }

    /// A write begun with [`Sticky::begin_write`] never reached a server (no
    /// server connection was to be had): the scope is as it was.
    pub fn abandon_write(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.wrote_at = self.wrote_before;
        }
    }

    /// A write begun with [`Sticky::begin_write`] is settled: with `lsn`, the
    /// primary's insert position read on the same session right after the
    /// commit (replicas past it have the write); without, the position will
    /// come from the first primary sample taken after `now`.
    pub fn end_write(&mut self, now: Instant, at: Option<Position>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.wrote_at = Some(now);
        self.need = match (at, self.need) {
            (Some(p), Some(n)) if n.timeline == p.timeline => Some(Position { lsn: n.lsn.max(p.lsn), ..p }),
            (Some(p), Some(n)) if n.timeline > p.timeline => Some(n),
            (p, _) => p,
        };
    }

    /// What a read of this scope needs now; `floor` is a position every read
    /// must see besides the scope's own writes (see [`route`]).
    fn requirement(
        &mut self,
        policy: &Policy,
        primary: &PrimaryView,
        floor: Option<Position>,
        now: Instant,
    ) -> Requirement {
        if self.in_flight > 0 && policy.read_your_writes != ReadYourWrites::Off {
            return Requirement::Primary;
        }
        let own = self.own_requirement(policy, primary, now);
        let Some(f) = floor else { return own };
        // A floor from another timeline than the primary's is not comparable:
        // only the primary surely has it.
        if primary.timeline != 0 && f.timeline != primary.timeline {
            return Requirement::Primary;
        }
        match own {
            Requirement::Primary => Requirement::Primary,
            Requirement::Any => Requirement::ReplayedPast(f.lsn),
            Requirement::ReplayedPast(lsn) => Requirement::ReplayedPast(lsn.max(f.lsn)),
        }
    }

    /// What a read needs to see this scope's own writes.
    fn own_requirement(&mut self, policy: &Policy, primary: &PrimaryView, now: Instant) -> Requirement {
        let Some(wrote_at) = self.wrote_at else { return Requirement::Any };
        match policy.read_your_writes {
            // The floor, read after the read arrived, covers the scope's own writes too.
            ReadYourWrites::Global => Requirement::Any,
            ReadYourWrites::Off => Requirement::Any,
            ReadYourWrites::Window if now < wrote_at + policy.sticky_window => Requirement::Primary,
            ReadYourWrites::Window => Requirement::Any,
            ReadYourWrites::Lsn => {
                let p = &primary.view;
                if self.need.is_none() && p.healthy && p.sampled_at.is_some_and(|t| t > wrote_at) {
                    self.need = Some(Position { timeline: p.timeline, lsn: p.lsn });
                }
                match self.need {
                    None => Requirement::Primary,
                    Some(n) if n.timeline == primary.timeline || primary.timeline == 0 => {
                        Requirement::ReplayedPast(n.lsn)
                    }
                    // Written on an earlier timeline: what of it survived, the
                    // new primary had when pgmux switched to it.
                    Some(n) if n.timeline < primary.timeline => Requirement::ReplayedPast(primary.timeline_start),
                    Some(_) => Requirement::Primary,
                }
            }
        }
    }
}

enum Requirement {
    Any,
    Primary,
    ReplayedPast(u64),
}

/// The `[routing]` settings `route` needs.
#[derive(Debug, Clone)]
pub struct Policy {
    pub read_your_writes: ReadYourWrites,
    pub sticky_window: Duration,
    pub max_replica_lag: Duration,
    pub max_replica_lag_bytes: Option<u64>,
    pub max_replica_wait: Duration,
    pub load_balance: LoadBalance,
}

/// A replica as `route` sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub view: NodeView,
    /// A second writer the topology fenced.
    pub fenced: bool,
    /// Server connections in use (for least_connections).
    pub active: usize,
    pub weight: u32,
}

impl Policy {
    pub fn new(r: &crate::config::RoutingConfig) -> Policy {
        Policy {
            read_your_writes: r.read_your_writes,
            sticky_window: r.sticky_window,
            max_replica_lag: r.max_replica_lag,
            max_replica_lag_bytes: r.max_replica_lag_bytes,
            max_replica_wait: r.max_replica_wait,
            load_balance: r.load_balance,
        }
    }
}

/// Why a replica takes no reads now (`None`: it is in the rotation). The one
/// rule: [`route`] applies it, and SHOW REPLICAS and `/metrics` report it.
pub fn out_of_rotation(policy: &Policy, replica: &Candidate, primary: &PrimaryView) -> Option<&'static str> {
    let v = &replica.view;
    if !v.healthy {
        Some("down")
    } else if replica.fenced {
        Some("fenced")
    } else if !v.in_recovery {
        Some("not in recovery")
    } else if primary.timeline != 0 && v.timeline != primary.timeline {
        Some("timeline")
    } else if replica.weight == 0 {
        Some("weight 0")
    } else if v.replay_delay > policy.max_replica_lag
        || policy
            .max_replica_lag_bytes
            .is_some_and(|max| primary.view.healthy && primary.view.lsn.saturating_sub(v.lsn) > max)
    {
        Some("lagging")
    } else {
        None
    }
}

/// The route of an intent that goes to the primary whatever the nodes say:
/// the caller need not gather candidates for it.
pub fn fixed(intent: Intent) -> Option<Route> {
    match intent {
        Intent::Write => Some(Route::primary(RouteReason::Write)),
        Intent::Transaction => Some(Route::primary(RouteReason::Transaction)),
        Intent::HintPrimary => Some(Route::primary(RouteReason::Hint)),
        Intent::Read | Intent::HintReplica | Intent::Inert => None,
    }
}

/// Decides where a request goes. `floor`: a position a read must see
/// whatever its scope wrote — the primary's position read after the read
/// arrived (`global`), or a token the client presented. `spin` is a
/// caller-kept counter (round robin) or random value (random).
#[allow(clippy::too_many_arguments)]
pub fn route(
    intent: Intent,
    policy: &Policy,
    sticky: &mut Sticky,
    primary: &PrimaryView,
    replicas: &[Candidate],
    floor: Option<Position>,
    now: Instant,
    spin: usize,
) -> Route {
    if let Some(route) = fixed(intent) {
        return route;
    }
    // A hint to read from a replica overrides read-your-writes, and a
    // request that runs nothing needs none; a read does not.
    let (lsn_ok, reason_if_none): (Option<u64>, RouteReason) = match intent {
        Intent::HintReplica => (None, RouteReason::Hint),
        Intent::Inert => (None, RouteReason::Read),
        _ => match sticky.requirement(policy, primary, floor, now) {
            Requirement::Primary => return Route::primary(RouteReason::Sticky),
            Requirement::Any => (None, RouteReason::Read),
            Requirement::ReplayedPast(lsn) => (Some(lsn), RouteReason::Read),
        },
    };
    let healthy = |c: &Candidate| out_of_rotation(policy, c, primary).is_none();
    let eligible: Vec<usize> = (0..replicas.len())
        .filter(|&i| healthy(&replicas[i]) && lsn_ok.is_none_or(|need| replicas[i].view.lsn >= need))
        .collect();
    if eligible.is_empty() {
        // The replica furthest along, if it replays promptly, likely has the
        // write already: ask it rather than send the read to the primary.
        if let Some(need) = lsn_ok
            && !policy.max_replica_wait.is_zero()
            && let Some(i) = (0..replicas.len())
                .filter(|&i| healthy(&replicas[i]) && replicas[i].view.replay_delay <= policy.max_replica_wait)
                .max_by_key(|&i| replicas[i].view.lsn)
        {
            let timeline = if primary.timeline != 0 { primary.timeline } else { replicas[i].view.timeline };
            return Route {
                target: Target::CatchUp { replica: i, timeline, lsn: need },
                reason: RouteReason::CaughtUp,
            };
        }
        let any_healthy = replicas.iter().any(|c| c.view.healthy && c.view.in_recovery);
        return Route::primary(if any_healthy { RouteReason::ReplicaLagging } else { RouteReason::NoReplica });
    }
    let pick = match policy.load_balance {
        LoadBalance::LeastConnections => *eligible
            .iter()
            .min_by_key(|&&i| (replicas[i].active * 1000) / replicas[i].weight.max(1) as usize)
            .expect("eligible is not empty"),
        LoadBalance::RoundRobin | LoadBalance::Random => {
            let total: usize = eligible.iter().map(|&i| replicas[i].weight as usize).sum();
            let mut at = spin % total.max(1);
            let mut chosen = eligible[0];
            for &i in &eligible {
                let w = replicas[i].weight as usize;
                if at < w {
                    chosen = i;
                    break;
                }
                at -= w;
            }
            chosen
        }
    };
    Route { target: Target::Replica(pick), reason: reason_if_none }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: ReadYourWrites) -> Policy {
        Policy {
            read_your_writes: mode,
            sticky_window: Duration::from_secs(1),
            max_replica_lag: Duration::from_secs(2),
            max_replica_lag_bytes: None,
            // Without waiting, unless a test says otherwise.
            max_replica_wait: Duration::ZERO,
            load_balance: LoadBalance::LeastConnections,
        }
    }

    fn node(lsn: u64, sampled_at: Instant, in_recovery: bool) -> NodeView {
        NodeView {
            healthy: true,
            in_recovery,
            lsn,
            sampled_at: Some(sampled_at),
            replay_delay: Duration::ZERO,
            timeline: 1,
        }
    }

    #[test]
    fn writes_and_transactions_go_to_the_primary() {
        let t = Instant::now();
        let p = PrimaryView::of(node(100, t, false));
        let r = [Candidate { fenced: false, view: node(100, t, true), active: 0, weight: 1 }];
        let mut s = Sticky::default();
        let pol = policy(ReadYourWrites::Lsn);
        assert_eq!(route(Intent::Write, &pol, &mut s, &p, &r, None, t, 0), Route::primary(RouteReason::Write));
        assert_eq!(
            route(Intent::Transaction, &pol, &mut s, &p, &r, None, t, 0),
            Route::primary(RouteReason::Transaction)
        );
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, None, t, 0).target, Target::Replica(0));
    }

    #[test]
    fn lsn_mode_waits_for_a_sample_after_the_write_then_for_replay() {
        let t0 = Instant::now();
        let pol = policy(ReadYourWrites::Lsn);
        let mut s = Sticky::default();
        let write_at = t0 + Duration::from_millis(10);
        s.wrote(write_at);
        // The primary's last sample predates the write: its LSN proves nothing.
        let p_old = PrimaryView::of(node(100, t0, false));
        let r = [Candidate { fenced: false, view: node(500, t0, true), active: 0, weight: 1 }];
        assert_eq!(
            route(Intent::Read, &pol, &mut s, &p_old, &r, None, write_at, 0),
            Route::primary(RouteReason::Sticky)
        );
        // A sample taken after the write: the replica must reach it.
        let p_new = PrimaryView::of(node(600, write_at + Duration::from_millis(5), false));
        assert_eq!(
            route(Intent::Read, &pol, &mut s, &p_new, &r, None, write_at, 0),
            Route::primary(RouteReason::ReplicaLagging)
        );
        let caught_up = [Candidate { fenced: false, view: node(600, write_at, true), active: 0, weight: 1 }];
        assert_eq!(route(Intent::Read, &pol, &mut s, &p_new, &caught_up, None, write_at, 0).target, Target::Replica(0));
    }

    #[test]
    fn a_prompt_replica_behind_the_write_is_asked_a_slow_one_is_not() {
        let t = Instant::now();
        let pol = Policy { max_replica_wait: Duration::from_millis(10), ..policy(ReadYourWrites::Lsn) };
        let p = PrimaryView::of(node(100, t, false));
        let mut s = Sticky::default();
        s.begin_write(t);
        s.end_write(t, Some(Position { timeline: 1, lsn: 900 }));
        let behind = |lsn, delay_ms| Candidate {
            fenced: false,
            view: NodeView { replay_delay: Duration::from_millis(delay_ms), ..node(lsn, t, true) },
            active: 0,
            weight: 1,
        };
        // The furthest along of the prompt ones is asked for the write's position.
        let r = [behind(800, 0), behind(850, 1), behind(890, 500)];
        assert_eq!(
            route(Intent::Read, &pol, &mut s, &p, &r, None, t, 0),
            Route { target: Target::CatchUp { replica: 1, timeline: 1, lsn: 900 }, reason: RouteReason::CaughtUp }
        );
        // Only one replaying half a second late: the read goes to the primary at once.
        assert_eq!(
            route(Intent::Read, &pol, &mut s, &p, &r[2..], None, t, 0),
            Route::primary(RouteReason::ReplicaLagging)
        );
        // Nothing to wait for without a write to see.
        let mut fresh = Sticky::default();
        assert_eq!(route(Intent::Read, &pol, &mut fresh, &p, &r, None, t, 0).target, Target::Replica(0));
    }

    #[test]
    fn a_floor_is_what_every_read_must_see_whoever_wrote() {
        let t = Instant::now();
        let pol = policy(ReadYourWrites::Global);
        let p = PrimaryView::of(node(1000, t, false));
        let r = [Candidate { fenced: false, view: node(500, t, true), active: 0, weight: 1 }];
        let mut s = Sticky::default();
        let floor = |lsn| Some(Position { timeline: 1, lsn });
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, floor(400), t, 0).target, Target::Replica(0));
        assert_eq!(
            route(Intent::Read, &pol, &mut s, &p, &r, floor(600), t, 0),
            Route::primary(RouteReason::ReplicaLagging)
        );
        // The scope's own write, settled at 700, is covered by a floor past it, not by one before.
        s.begin_write(t);
        s.end_write(t, Some(Position { timeline: 1, lsn: 700 }));
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, floor(400), t, 0).target, Target::Replica(0));
        let lsn_pol = policy(ReadYourWrites::Lsn);
        assert_eq!(
            route(Intent::Read, &lsn_pol, &mut s, &p, &r, floor(400), t, 0),
            Route::primary(RouteReason::ReplicaLagging),
            "in lsn mode the scope's own write still counts"
        );
        // A floor from another timeline: only the primary surely has it.
        let other = Some(Position { timeline: 2, lsn: 1 });
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, other, t, 0), Route::primary(RouteReason::Sticky));
    }

    #[test]
    fn a_write_in_flight_keeps_the_scope_on_the_primary() {
        let t = Instant::now();
        let pol = policy(ReadYourWrites::Lsn);
        let p = PrimaryView::of(node(100, t + Duration::from_secs(1), false));
        let r = [Candidate { fenced: false, view: node(1000, t, true), active: 0, weight: 1 }];
        let mut s = Sticky::default();
        s.begin_write(t);
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, None, t, 0), Route::primary(RouteReason::Sticky));
        s.end_write(t, Some(Position { timeline: 1, lsn: 900 }));
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, None, t, 0).target, Target::Replica(0));
        s.begin_write(t);
        s.end_write(t, Some(Position { timeline: 1, lsn: 2000 }));
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, None, t, 0), Route::primary(RouteReason::ReplicaLagging));
    }

    #[test]
    fn a_request_that_runs_nothing_needs_no_write_and_no_primary() {
        let t = Instant::now();
        let pol = policy(ReadYourWrites::Lsn);
        let r = [Candidate { fenced: false, view: node(1000, t, true), active: 0, weight: 1 }];
        // The scope's write is unsettled and there is no primary at all.
        let p = PrimaryView::of(NodeView::UNKNOWN);
        let mut s = Sticky::default();
        s.begin_write(t);
        s.end_write(t, None);
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, None, t, 0), Route::primary(RouteReason::Sticky));
        assert_eq!(
            route(Intent::Inert, &pol, &mut s, &p, &r, None, t, 0),
            Route { target: Target::Replica(0), reason: RouteReason::Read }
        );
        // With no replica in the rotation it goes where everything goes.
        assert_eq!(route(Intent::Inert, &pol, &mut s, &p, &[], None, t, 0).target, Target::Primary);
    }

    #[test]
    fn window_mode_and_off() {
        let t = Instant::now();
        let p = PrimaryView::of(node(1, t, false));
        let r = [Candidate { fenced: false, view: node(1, t, true), active: 0, weight: 1 }];
        let mut s = Sticky::default();
        s.wrote(t);
        let pol = policy(ReadYourWrites::Window);
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &r, None, t, 0), Route::primary(RouteReason::Sticky));
        assert_eq!(
            route(Intent::Read, &pol, &mut s, &p, &r, None, t + Duration::from_secs(2), 0).target,
            Target::Replica(0)
        );
        assert_eq!(
            route(Intent::Read, &policy(ReadYourWrites::Off), &mut s, &p, &r, None, t, 0).target,
            Target::Replica(0)
        );
    }

    #[test]
    fn unhealthy_lagging_and_balanced_replicas() {
        let t = Instant::now();
        let p = PrimaryView::of(node(1000, t, false));
        let mut s = Sticky::default();
        let mut pol = policy(ReadYourWrites::Off);
        let mut down = node(1000, t, true);
        down.healthy = false;
        assert_eq!(
            route(
                Intent::Read,
                &pol,
                &mut s,
                &p,
                &[Candidate { fenced: false, view: down, active: 0, weight: 1 }],
                None,
                t,
                0
            ),
            Route::primary(RouteReason::NoReplica)
        );
        let mut slow = node(1000, t, true);
        slow.replay_delay = Duration::from_secs(5);
        assert_eq!(
            route(
                Intent::Read,
                &pol,
                &mut s,
                &p,
                &[Candidate { fenced: false, view: slow, active: 0, weight: 1 }],
                None,
                t,
                0
            ),
            Route::primary(RouteReason::ReplicaLagging)
        );
        pol.max_replica_lag_bytes = Some(100);
        let behind = Candidate { fenced: false, view: node(800, t, true), active: 0, weight: 1 };
        let near = Candidate { fenced: false, view: node(950, t, true), active: 5, weight: 1 };
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &[behind, near], None, t, 0).target, Target::Replica(1));
        let idle = Candidate { fenced: false, view: node(950, t, true), active: 1, weight: 1 };
        assert_eq!(route(Intent::Read, &pol, &mut s, &p, &[near, idle], None, t, 0).target, Target::Replica(1));
        // A promoted "replica" (not in recovery) never takes reads meant for replicas.
        let promoted = Candidate { fenced: false, view: node(1000, t, false), active: 0, weight: 1 };
        assert_eq!(
            route(Intent::Read, &pol, &mut s, &p, &[promoted], None, t, 0),
            Route::primary(RouteReason::NoReplica)
        );
        pol.load_balance = LoadBalance::RoundRobin;
        let picks: Vec<_> =
            (0..4).map(|i| route(Intent::Read, &pol, &mut s, &p, &[near, idle], None, t, i).target).collect();
        assert_eq!(picks, [Target::Replica(0), Target::Replica(1), Target::Replica(0), Target::Replica(1)]);
    }

    #[test]
    fn across_a_timeline_change_a_write_needs_the_new_timelines_start() {
        let t = Instant::now();
        let pol = policy(ReadYourWrites::Lsn);
        let mut s = Sticky::default();
        s.begin_write(t);
        s.end_write(t, Some(Position { timeline: 1, lsn: 5000 }));
        let mut promoted = PrimaryView::of(node(300, t, false));
        promoted.view.timeline = 2;
        promoted.timeline = 2;
        promoted.timeline_start = 200;
        let mut behind = node(150, t, true);
        behind.timeline = 2;
        let mut past = node(250, t, true);
        past.timeline = 2;
        let old = node(9000, t, true);
        // On the new timeline, before the switch point: no.
        let r = [Candidate { fenced: false, view: behind, active: 0, weight: 1 }];
        assert_eq!(
            route(Intent::Read, &pol, &mut s, &promoted, &r, None, t, 0),
            Route::primary(RouteReason::ReplicaLagging)
        );
        // Still on the old timeline, however far: out of rotation.
        let c = Candidate { fenced: false, view: old, active: 0, weight: 1 };
        assert_eq!(out_of_rotation(&pol, &c, &promoted), Some("timeline"));
        // Past the switch point on the new timeline: yes (5000 on timeline 1 means nothing there).
        let r = [Candidate { fenced: false, view: past, active: 0, weight: 1 }];
        assert_eq!(route(Intent::Read, &pol, &mut s, &promoted, &r, None, t, 0).target, Target::Replica(0));
        let fenced = Candidate { fenced: true, view: past, active: 0, weight: 1 };
        assert_eq!(out_of_rotation(&pol, &fenced, &promoted), Some("fenced"));
    }
}
