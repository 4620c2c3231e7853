//! A session's read/write splitting: its database's nodes, and the routing
//! decision for each request ([`crate::routing`] decides; this adapts).

use super::*;
use crate::config::ReadYourWrites;
use crate::routing::route::{Position, PrimaryView};
use crate::routing::token;
use crate::routing::topology::Topology;

/// How long a read in `global` mode waits for the primary's position (a
/// monitor sample's own bound) before it goes to the primary instead.
const PRIMARY_POSITION_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A session's view of its database's nodes.
pub(super) struct SessionRouting {
    /// Every node of the database, in the topology's order: whichever is a
    /// replica of the primary's timeline takes reads.
    pub(super) replicas: Vec<ReplicaTarget>,
    pub(super) topology: Arc<Topology>,
    pub(super) sticky: Arc<std::sync::Mutex<Sticky>>,
    pub(super) policy: Policy,
    pub(super) write_functions: WriteFunctions,
    /// Who the session's replica pools serve, to make them on first use.
    db: crate::config::DatabaseConfig,
    user: crate::config::UserConfig,
    /// A looked-up user's proof from its login, for backends it opens.
    passthrough: Option<crate::auth::Credential>,
}

pub(super) struct ReplicaTarget {
    /// Made when a read first goes to the node: a node that has only ever
    /// been the primary has no replica pool.
    pool: std::sync::OnceLock<Arc<Pool>>,
    pub(super) addr: String,
    pub(super) node: Arc<NodeState>,
    pub(super) weight: u32,
}

/// How `user`'s monitors log in to `db`'s nodes. Monitors are shared by
/// every user of the database and outlive sessions: a looked-up user's keys
/// stop working when its password changes, so they log in as the auth_user.
pub(super) fn monitor_login(
    config: &Settings,
    db: &crate::config::DatabaseConfig,
    user: &crate::config::UserConfig,
    credential: Option<&crate::auth::Credential>,
    looked_up: bool,
) -> MonitorLogin {
    let monitor_user = match config.auth_lookup(db) {
        Some((auth_user, _)) if looked_up => auth_user,
        _ => user,
    };
    let monitor_credential = match looked_up {
        true => monitor_user.backend_password().map(|p| crate::auth::Credential::Password(p.to_owned())),
        false => credential.cloned(),
    };
    MonitorLogin {
        user: monitor_user.name.clone(),
        credential: monitor_credential,
        dbname: db.server_dbname().to_owned(),
        tls: config.tls.client.clone(),
        keepalive: config.proxy.server_keepalive(),
    }
}

/// The topology of `db` (several nodes), started with `login` if it is new.
pub(super) fn topology(
    shared: &Shared,
    config: &Settings,
    db: &crate::config::DatabaseConfig,
    login: impl FnOnce() -> MonitorLogin,
) -> Option<Arc<Topology>> {
    if !db.has_topology() {
        return None;
    }
    shared.routing.topology(db, &login(), config.routing.monitor_interval)
}

impl SessionRouting {
    pub(super) fn new(
        shared: &Shared,
        config: &Settings,
        db: &crate::config::DatabaseConfig,
        user: &crate::config::UserConfig,
        credential: Option<&crate::auth::Credential>,
        looked_up: bool,
        topology: Option<&Arc<Topology>>,
    ) -> Option<Self> {
        let topology = topology?;
        if !config.routing.read_write_split || config.pool_mode(db) != PoolMode::Transaction {
            return None;
        }
        let r = &config.routing;
        Some(SessionRouting {
            replicas: topology
                .nodes
                .iter()
                .map(|n| ReplicaTarget {
                    pool: std::sync::OnceLock::new(),
                    addr: n.addr.clone(),
                    node: n.state.clone(),
                    weight: n.weight,
                })
                .collect(),
            topology: topology.clone(),
            sticky: shared.routing.sticky(r.sticky_scope, &db.name, &user.name),
            policy: Policy::new(r),
            write_functions: WriteFunctions::new(&r.write_functions),
            db: db.clone(),
            user: user.clone(),
            passthrough: credential.filter(|_| looked_up).cloned(),
        })
    }

    /// The pool of replica `i`, made on first use.
    pub(super) fn replica_pool(&self, shared: &Shared, config: &Settings, i: usize) -> Arc<Pool> {
        let target = &self.replicas[i];
        target
            .pool
            .get_or_init(|| {
                // With a reload's settings if there was one since login
                // (or a retired one-off pool if it removed the node).
                let pool = shared.pools.get_or_create_replica(config, &self.db, &self.user, &target.addr);
                if let Some(c) = &self.passthrough {
                    pool.set_passthrough(c.clone());
                }
                pool
            })
            .clone()
    }

    /// The primary's position from a sample sent after `after`: it covers
    /// every transaction committed before then, through any connection.
    /// Reads arriving together share one sample (see `NodeState::sample_after`).
    async fn primary_position_after(&self, after: Instant) -> Option<Position> {
        let p = self.topology.decision().primary?;
        let deadline = tokio::time::Instant::now() + PRIMARY_POSITION_WAIT;
        let v = self.replicas[p].node.sample_after(after, deadline).await?;
        (!v.in_recovery).then_some(Position { timeline: v.timeline, lsn: v.lsn })
    }

    /// The primary as `d` names it (unknown while there is none).
    fn primary(&self, d: &crate::routing::topology::Decision) -> PrimaryView {
        let view = d.primary.map_or(crate::routing::monitor::NodeView::UNKNOWN, |p| self.replicas[p].node.view());
        PrimaryView { view, timeline: d.timeline, timeline_start: d.timeline_start }
    }

    /// Where the request unit at the front of `pending`, arrived at `now`, goes.
    /// `read_after`: the session's `pgmux.read_after` token, if set. `Err`:
    /// the message of a malformed token (22023), presented or being SET.
    pub(super) async fn route(
        &self,
        shared: &Shared,
        pending: &[u8],
        statements: &ClientStatements,
        read_after: Option<&str>,
        now: Instant,
    ) -> Result<(Intent, Route), String> {
        let sql = Request::new(pending).sql(statements);
        if pending.first() == Some(&crate::protocol::tag::QUERY)
            && let Some((name, value)) = sql.first().and_then(|s| token::set_value(s))
            && let Some(message) = token::check(name, &value)
        {
            // Refused before it reaches the server, which would take any text.
            return Err(message);
        }
        let intent = if sql.is_empty() && Request::new(pending).runs_nothing() {
            Intent::Inert
        } else {
            crate::routing::intent_of(sql.iter().copied(), &self.write_functions)
        };
        if let Some(route) = crate::routing::route::fixed(intent) {
            return Ok((intent, route));
        }
        // Positions this read must see besides its scope's own writes.
        let mut floors = [None; 3];
        if intent == Intent::Read {
            if let Some(text) = read_after {
                floors[0] = token::parse(text).map_err(|_| token::invalid(token::READ_AFTER, text))?;
            }
            if let Some(sql) = sql.first() {
                floors[1] = token::after_hint(sql).transpose().map_err(|t| token::invalid("pgmux:after", &t))?;
            }
            if self.policy.read_your_writes == ReadYourWrites::Global {
                match self.primary_position_after(now).await {
                    Some(p) => floors[2] = Some(p),
                    // What the primary has committed is unknown: only it surely has it.
                    None => return Ok((intent, Route::primary(RouteReason::Sticky))),
                }
            }
        }
        let decision = self.topology.decision();
        let primary = self.primary(&decision);
        let mut floor: Option<Position> = None;
        for f in floors.into_iter().flatten() {
            if decision.timeline != 0 && f.timeline != decision.timeline {
                // A position of another timeline: only the primary surely has what it names.
                return Ok((intent, Route::primary(RouteReason::Sticky)));
            }
            floor = Some(Position { lsn: floor.map_or(f.lsn, |g| g.lsn.max(f.lsn)), ..f });
        }
        let candidates: Vec<Candidate> = self
            .replicas
            .iter()
            .enumerate()
            .zip(&decision.fenced)
            .map(|((i, r), &fenced)| {
                // The primary's view is already in hand: one lock less per read.
                let mut view = if decision.primary == Some(i) { primary.view } else { r.node.view() };
                let mut active = 0;
                if let Some(pool) = r.pool.get() {
                    let s = pool.stats();
                    // A replica a reload removed takes no more reads, even from sessions that knew it.
                    view.healthy &= !s.retired;
                    active = s.open.saturating_sub(s.idle);
                }
                Candidate { view, fenced, active, weight: r.weight }
            })
            .collect();
        let mut sticky = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let route = crate::routing::route::route(
            intent,
            &self.policy,
            &mut sticky,
            &primary,
            &candidates,
            floor,
            now,
            shared.routing.spin(),
        );
        Ok((intent, route))
    }
}
