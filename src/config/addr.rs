//! Addresses: `listen`-style socket addresses and `host:port` server addresses.
//!
//! Checked while deserializing (not afterwards) so that toml attaches the
//! value's span to the error for free.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::ReplicaConfig;

/// `host:port` where host is an IPv4 address, a `[bracketed]` IPv6 address,
/// a DNS name or the absolute path of a directory holding Postgres's
/// Unix-domain socket, and port is 1..=65535. Names are resolved at connect time.
pub fn check_host_port(s: &str) -> Result<(), String> {
    let hint = "expected host:port, e.g. \"127.0.0.1:5432\", \"db.internal:5432\", \"[::1]:5432\" or \"/var/run/postgresql:5432\"";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("invalid address {s:?}: no port; {hint}"));
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(format!("invalid port {port:?} in {s:?}: must be 1-65535")),
        Ok(_) => {}
    }
    if host.starts_with('/') {
        // Postgres's Unix-domain socket in that directory.
        let path = crate::vocab::socket::unix_socket(s).expect("an absolute path with a port");
        return socket_path(path).map(drop);
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().map(drop).map_err(|_| format!("invalid IPv6 address in {s:?}; {hint}"));
    }
    if host.contains(':') {
        return Err(format!("invalid address {s:?}: IPv6 addresses need brackets, e.g. \"[::1]:5432\""));
    }
    // IPv4 literals also pass this check, which is what we want.
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid_name { Ok(()) } else { Err(format!("invalid host {host:?} in {s:?}; {hint}")) }
}

/// Where pgmux accepts clients (`[proxy] listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `ip:port`.
    Tcp(SocketAddr),
    /// A Unix-domain socket file: `"/dir:port"` names Postgres's
    /// `/dir/.s.PGSQL.port` (what libpq's `host=/dir port=port` opens), any
    /// other absolute path the socket file itself.
    Unix(PathBuf),
}

impl Listen {
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Listen::Tcp(a) => Some(*a),
            Listen::Unix(_) => None,
        }
    }

    /// The port clients name: TCP's, or the `N` of a `.s.PGSQL.N` socket (0 for another name).
    pub fn port(&self) -> u16 {
        match self {
            Listen::Tcp(a) => a.port(),
            Listen::Unix(p) => {
                p.file_name().and_then(|n| n.to_str()?.strip_prefix(".s.PGSQL.")?.parse().ok()).unwrap_or_default()
            }
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => a.fmt(f),
            Listen::Unix(p) => p.display().fmt(f),
        }
    }
}

/// A socket file's path, checked against the kernel's length limit.
pub fn socket_path(path: PathBuf) -> Result<PathBuf, String> {
    let len = path.as_os_str().len();
    if len > crate::vocab::socket::MAX_SOCKET_PATH {
        return Err(format!(
            "socket path {} is {len} bytes; the kernel takes at most {}",
            path.display(),
            crate::vocab::socket::MAX_SOCKET_PATH
        ));
    }
    Ok(path)
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        parse_listen(s)
    }
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if !s.starts_with('/') {
        return parse_socket_addr(s).map(Listen::Tcp).map_err(|e| format!("{e}, or a Unix socket \"/dir:port\""));
    }
    let path = match s.rsplit_once(':') {
        Some((dir, port)) => match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("invalid port {port:?} in {s:?}: must be 1-65535")),
            Ok(port) => std::path::Path::new(dir).join(format!(".s.PGSQL.{port}")),
        },
        None => PathBuf::from(s),
    };
    socket_path(path).map(Listen::Unix)
}

pub fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<Listen, D::Error> {
    let s = String::deserialize(d)?;
    parse_listen(&s).map_err(de::Error::custom)
}

/// `unix_socket_mode`: an octal string as PgBouncer writes it (`"0777"`), or
/// a TOML integer (`0o770`).
pub fn file_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct Mode;
    impl Visitor<'_> for Mode {
        type Value = u32;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a file mode: \"0770\" or 0o770")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
            u32::try_from(v).ok().filter(|m| *m <= 0o777).ok_or_else(|| E::custom("a file mode is 0 to 0o777"))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<u32, E> {
            u32::from_str_radix(s, 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| E::custom(format!("invalid file mode {s:?}: octal, 0000 to 0777, e.g. \"0770\"")))
        }
    }
    d.deserialize_any(Mode)
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    // Listening needs an IP: binding to a name would silently depend on DNS.
    s.parse().map_err(|_| {
        format!("invalid socket address {s:?}: expected ip:port, e.g. \"127.0.0.1:6432\" or \"[::]:6432\"")
    })
}

pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s).map_err(de::Error::custom)
}

pub fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

pub fn host_port<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_host_port(&s).map_err(de::Error::custom)?;
    Ok(s)
}

/// The table form of a replica; a private type so that serde's derive gives
/// us `deny_unknown_fields` and "missing field" errors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedReplica {
    #[serde(deserialize_with = "host_port")]
    addr: String,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Hand-written instead of `#[serde(untagged)]`: untagged enums replace
/// every inner error with "data did not match any variant".
impl<'de> Deserialize<'de> for ReplicaConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ReplicaVisitor)
    }
}

struct ReplicaVisitor;

impl<'de> Visitor<'de> for ReplicaVisitor {
    type Value = ReplicaConfig;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("\"host:port\" or { addr = \"host:port\", weight = N }")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<ReplicaConfig, E> {
        check_host_port(s).map_err(E::custom)?;
        Ok(ReplicaConfig::Addr(s.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ReplicaConfig, A::Error> {
        let r = WeightedReplica::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(ReplicaConfig::Weighted { addr: r.addr, weight: r.weight })
    }
}
