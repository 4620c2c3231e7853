//! DISABLE / ENABLE: databases that take no new client logins (their
//! logged-in clients go on), as PgBouncer's admin commands do.

use std::collections::BTreeSet;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Disabled {
    databases: Mutex<BTreeSet<String>>,
}

impl Disabled {
    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.databases.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_disabled(&self, database: &str) -> bool {
        // Only logins ask, and the set is almost always empty.
        let set = self.set();
        !set.is_empty() && set.contains(database)
    }

    /// Errs if `database` is disabled already.
    pub fn disable(&self, database: &str) -> Result<(), String> {
        match self.set().insert(database.to_owned()) {
            true => Ok(()),
            false => Err(format!("database \"{database}\" is already disabled")),
        }
    }

    /// Errs if `database` is not disabled.
    pub fn enable(&self, database: &str) -> Result<(), String> {
        match self.set().remove(database) {
            true => Ok(()),
            false => Err(format!("database \"{database}\" is not disabled")),
        }
    }
}
