//! A session's read/write splitting: its replicas, and the routing
//! decision for each request ([`crate::routing`] decides; this adapts).

use super::*;

/// A session's view of its database's replicas.
pub(super) struct SessionRouting {
    pub(super) replicas: Vec<ReplicaTarget>,
    pub(super) primary_node: Arc<NodeState>,
    pub(super) sticky: Arc<std::sync::Mutex<Sticky>>,
    pub(super) policy: Policy,
    pub(super) write_functions: WriteFunctions,
}

pub(super) struct ReplicaTarget {
    pub(super) pool: Arc<Pool>,
    pub(super) node: Arc<NodeState>,
    pub(super) weight: u32,
}

impl SessionRouting {
    pub(super) fn new(
        shared: &Shared,
        config: &Settings,
        db: &crate::config::DatabaseConfig,
        user: &crate::config::UserConfig,
        credential: Option<&crate::auth::Credential>,
        looked_up: bool,
    ) -> Option<Self> {
        if !config.routing.read_write_split || db.replicas.is_empty() || config.pool_mode(db) != PoolMode::Transaction {
            return None;
        }
        // Monitors are shared by every user of the database and outlive
        // sessions: a looked-up user's keys stop working when its password
        // changes, so they log in as the auth_user instead.
        let monitor_user = match config.auth_lookup(db) {
            Some((auth_user, _)) if looked_up => auth_user,
            _ => user,
        };
        let monitor_credential = match looked_up {
            true => monitor_user.backend_password().map(|p| crate::auth::Credential::Password(p.to_owned())),
            false => credential.cloned(),
        };
        let login = MonitorLogin {
            user: monitor_user.name.clone(),
            credential: monitor_credential,
            dbname: db.server_dbname().to_owned(),
            tls: config.tls.client.clone(),
            keepalive: config.proxy.server_keepalive(),
        };
        let interval = config.routing.monitor_interval;
        let r = &config.routing;
        Some(SessionRouting {
            replicas: db
                .replicas
                .iter()
                .map(|rc| {
                    let pool = shared.pools.get_or_create_replica(config, db, user, rc.addr());
                    if let (true, Some(c)) = (looked_up, credential) {
                        pool.set_passthrough(c.clone());
                    }
                    ReplicaTarget {
                        pool,
                        node: shared.routing.node(&db.name, rc.addr(), &login, interval),
                        weight: rc.weight(),
                    }
                })
                .collect(),
            primary_node: shared.routing.node(&db.name, &db.primary, &login, interval),
            sticky: shared.routing.sticky(r.sticky_scope, &db.name, &user.name),
            policy: Policy::new(r),
            write_functions: WriteFunctions::new(&r.write_functions),
        })
    }

    /// Where the request unit at the front of `pending` goes.
    pub(super) fn route(
        &self,
        shared: &Shared,
        pending: &[u8],
        statements: &ClientStatements,
        now: Instant,
    ) -> (Intent, Route) {
        let intent = crate::routing::intent_of(Request::new(pending).sql(statements), &self.write_functions);
        let candidates: Vec<Candidate> = self
            .replicas
            .iter()
            .map(|r| {
                let s = r.pool.stats();
                let mut view = r.node.view();
                // A replica a reload removed takes no more reads, even from sessions that knew it.
                view.healthy &= !s.retired;
                Candidate { view, active: s.open.saturating_sub(s.idle), weight: r.weight }
            })
            .collect();
        let primary = self.primary_node.view();
        let mut sticky = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let route = crate::routing::route::route(
            intent,
            &self.policy,
            &mut sticky,
            &primary,
            &candidates,
            now,
            shared.routing.spin(),
        );
        (intent, route)
    }
}
