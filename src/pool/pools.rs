//! Every pool of the process, by (database, user[, replica]), created on
//! first use; the connection caps they share; reload and upkeep over all.

use super::*;

/// The user a pool of `db` serves under `config`: a configured one, or,
/// where `db` looks users up with auth_query, `user` as its login found it.
fn user_in<'a>(config: &'a Settings, db: &DatabaseConfig, user: &'a UserConfig) -> Option<&'a UserConfig> {
    config.user(&user.name).or_else(|| config.auth_lookup(db).map(|_| user))
}

/// All pools of the process, created on first use.
#[derive(Debug, Default)]
pub struct Pools {
    /// Toward each database's primary, by (database, user).
    pools: DashMap<(String, String), Arc<Pool>>,
    /// Toward replicas, by (database, user, replica address).
    replica_pools: DashMap<(String, String, String), Arc<Pool>>,
    /// pgmux's own connections for auth_query, by database: never lent to a
    /// client, so no client's session settings are in force when it runs.
    auth_pools: DashMap<String, Arc<Pool>>,
    /// `max_db_connections` by (database, server address) and
    /// `max_user_connections` by (user, server address).
    db_caps: DashMap<(String, String), Arc<caps::Cap>>,
    user_caps: DashMap<(String, String), Arc<caps::Cap>>,
    /// The configuration of the last [`Pools::reconfigure`]. Pools are
    /// created under its read lock and reconfigured under its write lock, so
    /// a login that began before a reload cannot add a pool with old settings
    /// after the reload went over the pools.
    reloaded: RwLock<Option<Arc<Settings>>>,
}

/// Connections per database for auth_query: lookups are one short query
/// each, and a login storm should not take many server connections.
const AUTH_POOL_SIZE: usize = 2;

impl Pools {
    /// The caps a pool of `user` on `db` at `addr` counts against.
    fn caps_for(&self, config: &Settings, db: &DatabaseConfig, user: &str, addr: &str) -> Vec<Arc<caps::Cap>> {
        let db_cap = self
            .db_caps
            .entry((db.name.clone(), addr.to_owned()))
            .or_insert_with(|| caps::Cap::new(config.max_db_connections(db)))
            .clone();
        let user_cap = self
            .user_caps
            .entry((user.to_owned(), addr.to_owned()))
            .or_insert_with(|| caps::Cap::new(config.proxy.max_user_connections))
            .clone();
        vec![db_cap, user_cap]
    }

    /// Server connections to `db` at `addr` and its limit (0: none), for SHOW.
    pub fn db_cap(&self, db: &str, addr: &str) -> Option<(usize, usize)> {
        self.db_caps.get(&(db.to_owned(), addr.to_owned())).map(|c| (c.used(), c.max()))
    }

    /// Server connections of `user` at `addr` and its limit (0: none), for SHOW.
    pub fn user_cap(&self, user: &str, addr: &str) -> Option<(usize, usize)> {
        self.user_caps.get(&(user.to_owned(), addr.to_owned())).map(|c| (c.used(), c.max()))
    }

    /// The pool that runs `db`'s auth_query as `auth_user`.
    pub fn auth_pool(&self, config: &Settings, db: &DatabaseConfig, auth_user: &UserConfig) -> Arc<Pool> {
        self.auth_pools
            .entry(db.name.clone())
            .or_insert_with(|| {
                let mut settings = PoolSettings::new(config, db, auth_user);
                settings.pool_size = AUTH_POOL_SIZE.min(db.pool_size);
                settings.min_pool_size = 0;
                Pool::new(settings)
            })
            .clone()
    }

    /// The pool of (`db`, `user`), created with `config`'s settings if it
    /// does not exist yet (or with a reload's, if one happened since `config`
    /// was read; a database or user that reload removed gets a retired pool
    /// of its own, which serves that one client and is not kept).
    pub fn get_or_create(&self, config: &Settings, db: &DatabaseConfig, user: &UserConfig) -> Arc<Pool> {
        let key = (db.name.clone(), user.name.clone());
        if let Some(p) = self.pools.get(&key) {
            return p.clone();
        }
        let reloaded = self.reloaded.read().unwrap_or_else(|e| e.into_inner());
        let current = reloaded.as_deref().unwrap_or(config);
        match current.resolve(&db.name).and_then(|d| Some((user_in(current, &d, user)?, d))) {
            Some((u, d)) => self
                .pools
                .entry(key)
                .or_insert_with(|| {
                    let settings = PoolSettings::new(current, &d, u);
                    let caps = self.caps_for(current, &d, &u.name, &settings.addr);
                    Pool::with_caps(settings, caps)
                })
                .clone(),
            _ => {
                let pool = Pool::new(PoolSettings::new(config, db, user));
                pool.retire();
                pool
            }
        }
    }

    /// Applies a reloaded configuration to every pool: new settings for
    /// those whose database and user (and replica) remain, retirement for
    /// the others (removed from the map, so new logins never reach them),
    /// and warm pools for new databases with `min_pool_size`.
    pub fn reconfigure(&self, config: &Arc<Settings>) {
        {
            let mut reloaded = self.reloaded.write().unwrap_or_else(|e| e.into_inner());
            *reloaded = Some(config.clone());
            // Made again on the next lookup, with the new auth_user and settings.
            for cap in self.db_caps.iter() {
                if let Some(d) = config.resolve(&cap.key().0) {
                    cap.value().set_max(config.max_db_connections(&d));
                }
            }
            for cap in self.user_caps.iter() {
                cap.value().set_max(config.proxy.max_user_connections);
            }
            let auth: Vec<Arc<Pool>> = self.auth_pools.iter().map(|e| e.value().clone()).collect();
            self.auth_pools.clear();
            for pool in auth {
                pool.retire();
            }
            for ((db, user), pool) in self.all() {
                let looked_up = UserConfig::looked_up(&user);
                match config.resolve(&db).and_then(|d| Some((user_in(config, &d, &looked_up)?, d))) {
                    Some((u, d)) => pool.update(PoolSettings::new(config, &d, u)),
                    _ => {
                        tracing::info!(database = %db, user = %user, "pool retired: its database or user was removed");
                        self.pools.remove(&(db, user));
                        pool.retire();
                    }
                }
            }
            for ((db, user, addr), pool) in self.replicas() {
                let looked_up = UserConfig::looked_up(&user);
                match config.resolve_replica(&db, &addr).and_then(|d| Some((user_in(config, &d, &looked_up)?, d))) {
                    Some((u, d)) => pool.update(PoolSettings::replica(config, &d, u, &addr)),
                    _ => {
                        tracing::info!(database = %db, user = %user, replica = %addr, "replica pool retired: its replica, database or user was removed");
                        self.replica_pools.remove(&(db, user, addr));
                        pool.retire();
                    }
                }
            }
        }
        self.prewarm(config);
    }

    /// The pool of `user` on `db`'s replica at `addr` (same sizes and
    /// timeouts as the primary's), created like [`Pools::get_or_create`]:
    /// with a reload's settings if one happened since `config` was read, and
    /// retired (not kept) if that reload removed the replica.
    pub fn get_or_create_replica(
        &self,
        config: &Settings,
        db: &DatabaseConfig,
        user: &UserConfig,
        addr: &str,
    ) -> Arc<Pool> {
        let key = (db.name.clone(), user.name.clone(), addr.to_owned());
        if let Some(p) = self.replica_pools.get(&key) {
            return p.clone();
        }
        let reloaded = self.reloaded.read().unwrap_or_else(|e| e.into_inner());
        let current = reloaded.as_deref().unwrap_or(config);
        match current.resolve_replica(&db.name, addr).and_then(|d| Some((user_in(current, &d, user)?, d))) {
            Some((u, d)) => self
                .replica_pools
                .entry(key)
                .or_insert_with(|| {
                    let settings = PoolSettings::replica(current, &d, u, addr);
                    Pool::with_caps(settings, self.caps_for(current, &d, &u.name, addr))
                })
                .clone(),
            _ => {
                let pool = Pool::new(PoolSettings::replica(config, db, user, addr));
                pool.retire();
                pool
            }
        }
    }

    /// Replica pools, keyed by (database, user, address).
    pub fn replicas(&self) -> Vec<((String, String, String), Arc<Pool>)> {
        self.replica_pools.iter().map(|e| (e.key().clone(), e.value().clone())).collect()
    }

    pub fn get(&self, db: &str, user: &str) -> Option<Arc<Pool>> {
        self.pools.get(&(db.to_owned(), user.to_owned())).map(|p| p.clone())
    }

    /// Every pool of `db` (all of them for `None`), primaries' and replicas'.
    pub fn of_database(&self, db: Option<&str>) -> Vec<Arc<Pool>> {
        let mut out: Vec<Arc<Pool>> =
            self.pools.iter().filter(|e| db.is_none_or(|d| e.key().0 == d)).map(|e| e.value().clone()).collect();
        out.extend(self.replica_pools.iter().filter(|e| db.is_none_or(|d| e.key().0 == d)).map(|e| e.value().clone()));
        out
    }

    pub fn all(&self) -> Vec<((String, String), Arc<Pool>)> {
        self.pools.iter().map(|e| (e.key().clone(), e.value().clone())).collect()
    }

    /// Creates the pools of every configured (database, user) pair that keeps
    /// backends warm, so `min_pool_size` holds before the first client.
    pub fn prewarm(&self, config: &Settings) {
        // The wildcard is no database of its own: its pools open on first use.
        for db in config.databases.iter().filter(|d| d.min_pool_size > 0 && d.name != crate::config::WILDCARD_DATABASE)
        {
            for user in &config.users {
                self.get_or_create(config, db, user);
            }
        }
    }

    /// Runs pool upkeep every second until the process ends.
    pub async fn janitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let replicas = self.replicas().into_iter().map(|(_, p)| p);
            let auth: Vec<Arc<Pool>> = self.auth_pools.iter().map(|e| e.value().clone()).collect();
            for pool in self.all().into_iter().map(|(_, p)| p).chain(replicas).chain(auth) {
                pool.maintain().await;
            }
            self.forget_unused();
        }
    }

    /// Drops the wildcard's pools nobody uses: no session holds them (the
    /// map's reference is the only one), no backend is checked out, and no
    /// checkout for `pool_idle_timeout`. Their idle backends are closed.
    fn forget_unused(&self) {
        let unused = |p: &Arc<Pool>| {
            let s = p.stats();
            let after = p.settings.load().forget_after;
            Arc::strong_count(p) == 1 && s.open == s.idle && after.is_some_and(|t| p.unused_for() >= t)
        };
        let mut gone = Vec::new();
        self.pools.retain(|_, p| {
            let keep = !unused(p);
            if !keep {
                gone.push(p.clone());
            }
            keep
        });
        self.replica_pools.retain(|_, p| {
            let keep = !unused(p);
            if !keep {
                gone.push(p.clone());
            }
            keep
        });
        for pool in gone {
            tracing::info!(database = %pool.settings.load().dbname, user = %pool.settings.load().user, "unused pool of the wildcard database forgotten");
            pool.close_idle();
        }
    }

    pub fn close_idle(&self) {
        let replicas = self.replicas().into_iter().map(|(_, p)| p);
        let auth: Vec<Arc<Pool>> = self.auth_pools.iter().map(|e| e.value().clone()).collect();
        for pool in self.all().into_iter().map(|(_, p)| p).chain(replicas).chain(auth) {
            pool.close_idle();
        }
    }
}
