//! Where Postgres's Unix-domain sockets live: one spelling for the config
//! (which checks addresses) and the network layer (which connects).

use std::path::{Path, PathBuf};

/// The Unix-domain socket a server address names: `/dir:port` is where
/// Postgres listens (and libpq's `host=/dir port=port` looks),
/// `/dir/.s.PGSQL.port`. `None` for `host:port`.
pub fn unix_socket(addr: &str) -> Option<PathBuf> {
    if !addr.starts_with('/') {
        return None;
    }
    let (dir, port) = addr.rsplit_once(':')?;
    Some(Path::new(dir).join(format!(".s.PGSQL.{port}")))
}

/// The longest socket path the kernel takes (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
