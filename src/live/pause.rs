//! PAUSE / RESUME: which databases take no new transactions.
//!
//! A `watch` channel so that held clients wake on RESUME without polling;
//! the sender is the state, clients subscribe only while held.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

#[derive(Debug, Default, Clone)]
pub struct PauseState {
    all: bool,
    databases: BTreeSet<String>,
}

impl PauseState {
    fn paused(&self, database: &str) -> bool {
        self.all || self.databases.contains(database)
    }

    fn any(&self) -> bool {
        self.all || !self.databases.is_empty()
    }
}

#[derive(Debug)]
pub struct Pause {
    state: watch::Sender<PauseState>,
    /// Mirrors `state.any()`, updated under the channel's lock. Every
    /// checkout asks `is_paused`; this keeps the common answer to one atomic
    /// load instead of the channel's shared read lock.
    any: AtomicBool,
}

impl Default for Pause {
    fn default() -> Self {
        Pause { state: watch::Sender::new(PauseState::default()), any: AtomicBool::new(false) }
    }
}

impl Pause {
    pub fn is_paused(&self, database: &str) -> bool {
        // SeqCst: one half of the PAUSE handshake (see `ClientInfo::wait_turn`).
        self.any.load(Ordering::SeqCst) && self.state.borrow().paused(database)
    }

    pub fn all_paused(&self) -> bool {
        self.state.borrow().all
    }

    /// Resolves once `database` is no longer paused.
    pub async fn wait_resumed(&self, database: &str) {
        let mut rx = self.state.subscribe();
        // The sender lives in `Shared`, as long as any client: no error to handle.
        let _ = rx.wait_for(|s| !s.paused(database)).await;
    }

    /// Pauses one database, or all when `None`. Errs if already paused.
    pub fn pause(&self, database: Option<&str>) -> Result<(), String> {
        let mut result = Ok(());
        self.state.send_if_modified(|s| {
            match database {
                _ if s.all => result = Err("pgmux is already paused".to_owned()),
                None => s.all = true,
                Some(db) if !s.databases.insert(db.to_owned()) => {
                    result = Err(format!("database \"{db}\" is already paused"))
                }
                Some(_) => {}
            }
            self.any.store(s.any(), Ordering::SeqCst);
            result.is_ok()
        });
        // Publish the flag before PAUSE reads client states (see `ClientInfo::wait_turn`).
        std::sync::atomic::fence(Ordering::SeqCst);
        result
    }

    /// Resumes one database, or everything when `None`.
    pub fn resume(&self, database: Option<&str>) -> Result<(), String> {
        let mut result = Ok(());
        self.state.send_if_modified(|s| {
            match database {
                None if !s.all && s.databases.is_empty() => result = Err("nothing is paused".to_owned()),
                None => *s = PauseState::default(),
                Some(_) if s.all => {
                    result = Err("pgmux is paused as a whole; RESUME without a database resumes it".to_owned())
                }
                Some(db) if !s.databases.remove(db) => result = Err(format!("database \"{db}\" is not paused")),
                Some(_) => {}
            }
            self.any.store(s.any(), Ordering::SeqCst);
            result.is_ok()
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_and_resume_rules() {
        let p = Pause::default();
        p.pause(Some("a")).unwrap();
        assert!(p.is_paused("a") && !p.is_paused("b"));
        assert!(p.pause(Some("a")).is_err());
        assert!(p.resume(Some("b")).is_err());
        p.resume(Some("a")).unwrap();
        p.pause(None).unwrap();
        assert!(p.is_paused("b"));
        assert!(p.resume(Some("b")).is_err());
        p.resume(None).unwrap();
        assert!(!p.is_paused("b"));
        assert!(p.resume(None).is_err());
    }

    #[tokio::test]
    async fn held_client_wakes_on_resume() {
        let p = std::sync::Arc::new(Pause::default());
        p.pause(Some("a")).unwrap();
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.wait_resumed("a").await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        p.resume(None).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
