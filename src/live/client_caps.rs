//! Logged-in clients counted per database and per user, against
//! `max_db_client_connections` and `max_user_client_connections`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

#[derive(Debug, Default)]
pub struct ClientCaps {
    by_database: DashMap<String, Arc<AtomicUsize>>,
    by_user: DashMap<String, Arc<AtomicUsize>>,
}

/// A client's place under both caps; given back when the session ends.
#[derive(Debug)]
pub struct Counted([Arc<AtomicUsize>; 2]);

impl Drop for Counted {
    fn drop(&mut self) {
        for n in &self.0 {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Which cap a login would exceed.
#[derive(Debug, PartialEq, Eq)]
pub enum Exceeded {
    Database,
    User,
}

fn take(n: &AtomicUsize, max: usize) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| (max == 0 || c < max).then_some(c + 1)).is_ok()
}

impl ClientCaps {
    /// Counts a client of `user` on `database`, unless that would pass a cap
    /// (0: none).
    pub fn admit(&self, database: &str, max_db: usize, user: &str, max_user: usize) -> Result<Counted, Exceeded> {
        let db = self.by_database.entry(database.to_owned()).or_default().clone();
        let us = self.by_user.entry(user.to_owned()).or_default().clone();
        if !take(&db, max_db) {
            return Err(Exceeded::Database);
        }
        if !take(&us, max_user) {
            db.fetch_sub(1, Ordering::AcqRel);
            return Err(Exceeded::User);
        }
        Ok(Counted([db, us]))
    }

    /// Logged-in clients of `database` (SHOW DATABASES).
    pub fn of_database(&self, database: &str) -> usize {
        self.by_database.get(database).map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// Logged-in clients of `user` (SHOW USERS).
    pub fn of_user(&self, user: &str) -> usize {
        self.by_user.get(user).map_or(0, |n| n.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_admit_and_release() {
        let c = ClientCaps::default();
        let a = c.admit("d", 2, "u", 0).unwrap();
        let _b = c.admit("d", 2, "v", 1).unwrap();
        assert_eq!(c.admit("d", 2, "w", 0).unwrap_err(), Exceeded::Database);
        assert_eq!(c.admit("e", 0, "v", 1).unwrap_err(), Exceeded::User);
        assert_eq!((c.of_database("d"), c.of_user("v"), c.of_database("e")), (2, 1, 0));
        drop(a);
        assert!(c.admit("d", 2, "w", 0).is_ok());
    }
}
