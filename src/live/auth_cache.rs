//! Secrets looked up with `auth_query`, by (database, user), for
//! `auth_cache_ttl`; a miss (no such role, or one that cannot log in) for a
//! tenth of it, so a stream of logins for a missing role does not become a
//! stream of queries, while a role created a moment later soon works.

use std::time::{Duration, Instant};

use dashmap::DashMap;

#[derive(Debug, Default)]
pub struct AuthCache {
    entries: DashMap<(String, String), Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// `None`: no usable secret (unknown role, NULL password, expired).
    secret: Option<String>,
    fetched: Instant,
}

impl AuthCache {
    /// The cached lookup of `user` on `database`, if still fresh: `Some(None)`
    /// is a cached miss.
    pub fn get(&self, database: &str, user: &str, ttl: Duration) -> Option<Option<String>> {
        let key = (database.to_owned(), user.to_owned());
        let e = self.entries.get(&key)?;
        let ttl = if e.secret.is_some() { ttl } else { ttl / 10 };
        (e.fetched.elapsed() < ttl).then(|| e.secret.clone())
    }

    pub fn put(&self, database: &str, user: &str, secret: Option<String>) {
        self.entries.insert((database.to_owned(), user.to_owned()), Entry { secret, fetched: Instant::now() });
    }

    /// Forgets a lookup (a secret that failed a login is fetched again).
    pub fn forget(&self, database: &str, user: &str) {
        self.entries.remove(&(database.to_owned(), user.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_misses_and_expiry() {
        let c = AuthCache::default();
        let ttl = Duration::from_secs(60);
        assert_eq!(c.get("d", "u", ttl), None);
        c.put("d", "u", Some("md5x".into()));
        assert_eq!(c.get("d", "u", ttl), Some(Some("md5x".into())));
        assert_eq!(c.get("d", "u", Duration::ZERO), None, "expired");
        c.put("d", "ghost", None);
        assert_eq!(c.get("d", "ghost", ttl), Some(None));
        c.forget("d", "u");
        assert_eq!(c.get("d", "u", ttl), None);
    }
}
