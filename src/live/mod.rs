//! Live state every task shares: the configuration in force, the pools,
//! the connected clients (registry, cancel keys, PAUSE gate, slots) and the
//! process counters. Client tasks write it at their few state changes; the
//! admin console and `/metrics` read it. It sits below both, so neither has
//! to reach into the other.

pub mod auth_cache;
pub mod cancel;
pub mod client_caps;
pub mod disabled;
pub mod pause;
pub mod registry;
pub mod slots;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::pool::Pools;
use crate::reload::{ReloadError, Reloaded};
use crate::settings::Settings;
use cancel::CancelRegistry;
use pause::Pause;
use registry::ClientRegistry;
use slots::{ClientSlot, ClientSlots, Lingering};
use stats::Stats;

/// State every client task shares. Read-only apart from the registries' own
/// interior locking and the configuration, which a reload swaps whole.
#[derive(Debug)]
pub struct Shared {
    /// Read lock-free by every login; replaced by [`Shared::reload`].
    config: ArcSwap<Settings>,
    /// The file the configuration came from; `None` disables reloading.
    config_path: Option<PathBuf>,
    /// Serialises reloads (SIGHUP and RELOAD at once would race otherwise).
    reload_lock: std::sync::Mutex<()>,
    pub pools: Arc<Pools>,
    pub cancels: CancelRegistry,
    /// Connected clients and their states (SHOW CLIENTS, PAUSE, KILL_CLIENT).
    pub clients: ClientRegistry,
    /// Process-wide counters for `/metrics`.
    pub stats: Stats,
    /// Databases held by the admin PAUSE command.
    pub pause: Pause,
    /// The admin SHUTDOWN command; `run` treats it like SIGINT (or SIGTERM,
    /// with WAIT_FOR_CLIENTS).
    shutdown_request: Notify,
    /// Set by `SHUTDOWN WAIT_FOR_CLIENTS`: stop accepting, then wait for
    /// the clients to leave by themselves instead of draining them.
    wait_for_clients: std::sync::atomic::AtomicBool,
    /// SUSPEND: the accept loop takes no connection until RESUME.
    suspended: tokio::sync::watch::Sender<bool>,
    /// Replica monitors, read-your-writes scopes, routing counters.
    pub routing: crate::routing::Routing,
    /// Secrets of users looked up with auth_query.
    pub auth_cache: auth_cache::AuthCache,
    /// Logged-in clients per database and per user, against their caps.
    pub client_caps: client_caps::ClientCaps,
    /// Databases DISABLEd on the admin console: no new logins.
    pub disabled: disabled::Disabled,
    /// Connected clients, against `max_client_conn`, and the cleanups of
    /// clients that left: a shutdown waits for both.
    slots: Arc<ClientSlots>,
}

impl Shared {
    /// The configuration in force. A session keeps the one it logged in
    /// with; a reload affects it only through its pool's settings.
    pub fn config(&self) -> Arc<Settings> {
        self.config.load_full()
    }

    /// Re-reads the config file and applies it (SIGHUP, admin RELOAD). On
    /// error the current configuration stays. See [`crate::reload`] for
    /// what applies when.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let Some(path) = &self.config_path else { return Err(ReloadError::NoConfigFile) };
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.config();
        let result = crate::reload::prepare(&old, path);
        let (new, reloaded) = match result {
            Ok(r) => r,
            Err(e) => {
                self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                // Config errors name file, line and key, never a password's value.
                tracing::error!(path = %path.display(), error = %e, "reload failed; keeping the current configuration");
                return Err(e);
            }
        };
        self.apply(Arc::new(new));
        self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
        for key in &reloaded.needs_restart {
            tracing::warn!(key = %key, "setting changed in the file but needs a restart; keeping the current value");
        }
        if reloaded.changes.is_empty() {
            tracing::info!(path = %path.display(), "configuration reloaded; nothing changed");
        }
        for change in &reloaded.changes {
            tracing::info!(change = %change, "configuration reloaded");
        }
        Ok(reloaded)
    }

    /// The admin console's `SET key = value`: one setting changed as a
    /// reload would change it, checked by the same rules as the file.
    /// Returns what changed; a later RELOAD takes the file's value again.
    pub fn set(&self, key: &str, value: &str) -> Result<Vec<String>, String> {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.config();
        let new = old.file().with_setting(key, value).map_err(|e| e.to_string())?;
        let changes = crate::reload::changes(old.file(), &new);
        self.apply(Arc::new(Settings::build(new).map_err(|e| format!("TLS: {e}"))?));
        for change in &changes {
            tracing::info!(change = %change, "setting changed on the admin console");
        }
        Ok(changes)
    }

    /// Puts a new configuration in force: for new logins, the pools, and
    /// the serving threads' polling.
    fn apply(&self, new: Arc<Settings>) {
        crate::net::idle_poll::set_limit(new.proxy.idle_poll);
        self.config.store(new.clone());
        self.pools.reconfigure(&new);
    }

    /// Starts the drain of SIGINT: open transactions finish, then everyone is closed.
    pub fn request_shutdown(&self) {
        // notify_one keeps a permit, so a request is never lost.
        self.shutdown_request.notify_one();
    }

    /// PgBouncer's `SHUTDOWN WAIT_FOR_CLIENTS`: stop accepting; exit once
    /// every client has left by itself, however long that takes (a signal
    /// meanwhile drains them).
    pub fn request_shutdown_waiting_for_clients(&self) {
        self.wait_for_clients.store(true, Ordering::SeqCst);
        self.shutdown_request.notify_one();
    }

    pub fn is_suspended(&self) -> bool {
        *self.suspended.borrow()
    }

    pub fn set_suspended(&self, on: bool) {
        self.suspended.send_replace(on);
    }

    /// Resolves once pgmux is not suspended.
    pub async fn not_suspended(&self) {
        let mut rx = self.suspended.subscribe();
        // The sender lives as long as `self`: no error to handle.
        let _ = rx.wait_for(|s| !s).await;
    }

    /// Whether the shutdown under way waits for clients to leave by themselves.
    pub fn waits_for_clients(&self) -> bool {
        self.wait_for_clients.load(Ordering::SeqCst)
    }
}

impl Shared {
    /// Live state for `config`, served by `pools`; `config_path` is the file
    /// a reload re-reads (`None` refuses reloading).
    pub fn new(config: Arc<Settings>, pools: Arc<Pools>, config_path: Option<PathBuf>) -> Shared {
        // Validated to 16383 at most; peer_id is restart-only, so keys issued
        // under it stay valid for the process's life.
        let peer_id = u16::try_from(config.proxy.peer_id).unwrap_or(0);
        Shared {
            config: ArcSwap::new(config),
            config_path,
            reload_lock: std::sync::Mutex::new(()),
            pools,
            cancels: CancelRegistry::new(peer_id),
            clients: ClientRegistry::default(),
            stats: Stats::default(),
            pause: Pause::default(),
            shutdown_request: Notify::new(),
            wait_for_clients: std::sync::atomic::AtomicBool::new(false),
            suspended: tokio::sync::watch::Sender::new(false),
            routing: crate::routing::Routing::default(),
            auth_cache: auth_cache::AuthCache::default(),
            client_caps: client_caps::ClientCaps::default(),
            disabled: disabled::Disabled::default(),
            slots: Arc::default(),
        }
    }

    /// A ticket for the cleanup of a backend whose client left
    /// mid-transaction ([`Lingering`]).
    pub fn lingering(&self) -> Lingering {
        ClientSlots::linger(&self.slots)
    }

    /// A slot for a newly accepted client, unless `max_client_conn` (of the
    /// configuration in force) clients are connected already.
    pub fn take_slot(self: &Arc<Self>) -> Option<ClientSlot> {
        ClientSlots::try_take(self, self.config.load().proxy.max_client_conn)
    }

    /// Clients connected plus cleanups running.
    pub fn connected(&self) -> usize {
        self.slots.count()
    }

    /// Resolves once no client is connected and no cleanup runs.
    pub async fn all_gone(&self) {
        self.slots.all_gone().await
    }

    /// Resolves when an admin asks for SHUTDOWN ([`Shared::request_shutdown`]).
    pub async fn shutdown_requested(&self) {
        self.shutdown_request.notified().await
    }
}
