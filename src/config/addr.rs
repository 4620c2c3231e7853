//! Addresses: `listen`-style socket addresses and `host:port` server addresses.
//!
//! Checked while deserializing (not afterwards) so that toml attaches the
//! value's span to the error for free.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::ReplicaConfig;

/// `host:port` where host is an IPv4 address, a `[bracketed]` IPv6 address or
/// a DNS name, and port is 1..=65535. Names are resolved at connect time.
pub fn check_host_port(s: &str) -> Result<(), String> {
    let hint = "expected host:port, e.g. \"127.0.0.1:5432\", \"db.internal:5432\" or \"[::1]:5432\"";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("invalid address {s:?}: no port; {hint}"));
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(format!("invalid port {port:?} in {s:?}: must be 1-65535")),
        Ok(_) => {}
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
