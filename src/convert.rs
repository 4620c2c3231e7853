//! `pgmux convert pgbouncer.ini [userlist.txt]`: an equivalent proxy.toml
//! for a PgBouncer configuration, and every setting that could not be
//! carried over, with why.
//!
//! Pure text to text: the caller reads the files and prints the result. What
//! is not carried over is listed twice, as comments at the top of the TOML
//! (so the saved file documents itself) and in [`Converted::skipped`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The result of a conversion.
#[derive(Debug)]
pub struct Converted {
    /// proxy.toml text.
    pub toml: String,
    /// `setting: why`, one per setting not carried over.
    pub skipped: Vec<String>,
}

/// A PgBouncer ini file: sections of `key = value`, in file order. Keys are
/// case-insensitive in `[pgbouncer]` (lower-cased here); database and user
/// names are kept as written.
#[derive(Debug, Default)]
struct Ini {
    sections: BTreeMap<String, Vec<(String, String)>>,
    includes: Vec<String>,
}

fn parse_ini(text: &str) -> Ini {
    let mut ini = Ini::default();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(inc) = line.strip_prefix("%include") {
            ini.includes.push(inc.trim().to_owned());
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_ascii_lowercase();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let key = key.trim();
        let key = if section == "pgbouncer" { key.to_ascii_lowercase() } else { key.to_owned() };
        ini.sections.entry(section.clone()).or_default().push((key, value.trim().to_owned()));
    }
    ini
}

/// A libpq-style `key=value key='quoted value'` string, as PgBouncer's
/// `[databases]` entries are written.
fn parse_connstr(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        if key.is_empty() {
            return out;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            out.push((key, String::new()));
            continue;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key.to_ascii_lowercase(), value));
    }
}

/// `"name" "password"` lines of a PgBouncer auth_file (`""` escapes a quote).
fn parse_userlist(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let mut fields = Vec::new();
        let mut rest = line;
        while let Some(start) = rest.find('"') {
            let mut field = String::new();
            let mut chars = rest[start + 1..].char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if rest[start + 1 + i + 1..].starts_with('"') {
                        field.push('"');
                        chars.next();
                    } else {
                        end = Some(start + 1 + i + 1);
                        break;
                    }
                } else {
                    field.push(c);
                }
            }
            fields.push(field);
            match end {
                Some(e) => rest = &rest[e..],
                None => break,
            }
        }
        if let [name, password, ..] = fields.as_slice() {
            out.push((name.clone(), password.clone()));
        }
    }
    out
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// PgBouncer's time settings are seconds (fractions allowed); proxy.toml's
/// are durations with a unit.
fn seconds(v: &str) -> Option<String> {
    let s: f64 = v.trim().parse().ok()?;
    if !(0.0..=1e9).contains(&s) {
        return None;
    }
    let ms = (s * 1000.0).round() as u64;
    Some(if ms.is_multiple_of(1000) { format!("\"{}s\"", ms / 1000) } else { format!("\"{ms}ms\"") })
}

/// How a user's secret fits pgmux's `auth` values.
fn auth_for(auth_type: &str, secret: &str) -> (&'static str, Option<String>) {
    let scram = secret.starts_with("SCRAM-SHA-256$");
    let md5 = secret.len() == 35 && secret.starts_with("md5") && secret[3..].bytes().all(|b| b.is_ascii_hexdigit());
    match auth_type {
        "trust" | "any" => ("trust", None),
        // A stored verifier decides, as it does in Postgres.
        _ if scram => ("scram-sha-256", None),
        "scram-sha-256" if md5 => ("md5", Some("an md5 hash cannot be used for SCRAM: auth = \"md5\"".into())),
        _ if md5 => ("md5", None),
        "scram-sha-256" => ("scram-sha-256", None),
        "md5" => ("md5", None),
        other => {
            ("scram-sha-256", Some(format!("auth_type = {other} has no pgmux equivalent: auth = \"scram-sha-256\"")))
        }
    }
}

/// Converts `ini` (a pgbouncer.ini) and `userlist` (its auth_file, when
/// given) into proxy.toml.
pub fn convert(ini_text: &str, userlist: Option<&str>) -> Converted {
    let ini = parse_ini(ini_text);
    let mut skipped = Vec::new();
    let mut skip = |what: &str, why: &str| skipped.push(format!("{what}: {why}"));
    for inc in &ini.includes {
        skip(&format!("%include {inc}"), "not followed; convert the included file and merge it by hand");
    }
    let empty = Vec::new();
    let pgb = ini.sections.get("pgbouncer").unwrap_or(&empty);
    let get = |key: &str| pgb.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());

    // [proxy]
    let mut proxy: Vec<String> = Vec::new();
    let port = get("listen_port").unwrap_or("6432");
    // PgBouncer's own default directory, /tmp, when the file names none; "" turns the socket off.
    let socket_dir = get("unix_socket_dir").map(str::trim).unwrap_or("/tmp");
    let addr = match get("listen_addr").map(str::trim) {
        None | Some("") if socket_dir.is_empty() => {
            skip("listen_addr", "unset, and so is unix_socket_dir: pgmux listens on 127.0.0.1");
            "127.0.0.1".to_owned()
        }
        // Unix socket only.
        None | Some("") => socket_dir.to_owned(),
        Some(list) => {
            let first = list.split(',').next().unwrap_or("").trim();
            if list.contains(',') {
                skip("listen_addr", &format!("pgmux listens on one address; kept the first, {first}"));
            }
            match first {
                "*" => "0.0.0.0".to_owned(),
                "localhost" => "127.0.0.1".to_owned(),
                a if a.contains(':') => format!("[{a}]"),
                a => a.to_owned(),
            }
        }
    };
    proxy.push(format!("listen = {}", quote(&format!("{addr}:{port}"))));
    let beside_tcp = !addr.starts_with('/') && get("unix_socket_dir").is_some_and(|d| !d.trim().is_empty());
    if beside_tcp {
        proxy.push(format!("unix_socket_dir = {}", quote(socket_dir)));
    }
    if addr.starts_with('/') || beside_tcp {
        if let Some(mode) = get("unix_socket_mode") {
            proxy.push(format!("unix_socket_mode = {}", quote(mode.trim())));
        }
        if let Some(group) = get("unix_socket_group").map(str::trim).filter(|g| !g.is_empty()) {
            proxy.push(format!("unix_socket_group = {}", quote(group)));
        }
    }
    let mut default_pool_size = "20".to_owned();
    let mut min_pool_size = "0".to_owned();
    let mut auth_type = "md5".to_owned();
    let mut admin_users: Vec<String> = Vec::new();
    let mut auth_user: Option<String> = None;
    for (key, value) in pgb {
        let v = value.as_str();
        let time = |name: &str, proxy: &mut Vec<String>, skip: &mut dyn FnMut(&str, &str)| match seconds(v) {
            Some(d) => proxy.push(format!("{name} = {d}")),
            None => skip(key, &format!("{v:?} is not a number of seconds")),
        };
        match key.as_str() {
            "listen_addr" | "listen_port" => {}
            "pool_mode" => match v {
                "session" | "transaction" => proxy.push(format!("pool_mode = {}", quote(v))),
                _ => skip(key, &format!("{v} pooling does not exist in pgmux; the default, transaction, applies")),
            },
            "max_client_conn" => proxy.push(format!("max_client_conn = {v}")),
            "default_pool_size" => default_pool_size = v.to_owned(),
            "min_pool_size" => min_pool_size = v.to_owned(),
            "server_lifetime" => time("server_lifetime", &mut proxy, &mut skip),
            "server_idle_timeout" => time("server_idle_timeout", &mut proxy, &mut skip),
            "server_connect_timeout" => time("server_connect_timeout", &mut proxy, &mut skip),
            "query_timeout" => time("query_timeout", &mut proxy, &mut skip),
            "query_wait_timeout" => time("query_wait_timeout", &mut proxy, &mut skip),
            "idle_transaction_timeout" => time("idle_transaction_timeout", &mut proxy, &mut skip),
            "max_prepared_statements" if v == "0" => skip(
                key,
                "0 turns PgBouncer's prepared-statement support off; pgmux always keeps prepared statements working",
            ),
            "max_prepared_statements" => proxy.push(format!("max_prepared_statements = {v}")),
            "tcp_keepalive" => proxy.push(format!("server_tcp_keepalive = {}", v == "1")),
            "tcp_keepidle" => time("server_tcp_keepalive_idle", &mut proxy, &mut skip),
            "tcp_keepintvl" => time("server_tcp_keepalive_interval", &mut proxy, &mut skip),
            "tcp_keepcnt" => proxy.push(format!("server_tcp_keepalive_count = {v}")),
            "client_tls_cert_file" => proxy.push(format!("tls_cert = {}", quote(v))),
            "client_tls_key_file" => proxy.push(format!("tls_key = {}", quote(v))),
            "client_tls_sslmode" => match v {
                "disable" | "allow" | "require" => proxy.push(format!("tls_mode = {}", quote(v))),
                "prefer" => proxy.push("tls_mode = \"allow\"".into()),
                _ => {
                    proxy.push("tls_mode = \"require\"".into());
                    skip(key, &format!("{v}: pgmux does not verify client certificates; tls_mode = \"require\""));
                }
            },
            "server_tls_sslmode" => match v {
                "disable" | "prefer" | "require" | "verify-full" => proxy.push(format!("server_tls = {}", quote(v))),
                "allow" => proxy.push("server_tls = \"prefer\"".into()),
                "verify-ca" => {
                    proxy.push("server_tls = \"verify-full\"".into());
                    skip(key, "verify-ca: pgmux verifies the host name too (verify-full)");
                }
                _ => skip(key, &format!("unknown mode {v:?}")),
            },
            "server_tls_ca_file" => proxy.push(format!("server_tls_ca = {}", quote(v))),
            "auth_type" => auth_type = v.to_owned(),
            "auth_file" => {
                if userlist.is_none() {
                    skip(
                        key,
                        &format!("pass the file to convert as the second argument: pgmux convert pgbouncer.ini {v}"),
                    );
                }
            }
            "admin_users" => {
                admin_users = v.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect()
            }
            "stats_users" => skip(key, "pgmux has no read-only console role; give them admin_users or /metrics"),
            "auth_user" => auth_user = Some(v.to_owned()),
            "auth_query" => proxy.push(format!("auth_query = {}", quote(v))),
            "auth_dbname" => skip(key, "pgmux runs auth_query on the database the client asks for"),
            "max_db_connections" => proxy.push(format!("max_db_connections = {v}")),
            "max_user_connections" => proxy.push(format!("max_user_connections = {v}")),
            "reserve_pool_size" => proxy.push(format!("reserve_pool_size = {v}")),
            "reserve_pool_timeout" => time("reserve_pool_timeout", &mut proxy, &mut skip),
            "max_db_client_connections" => proxy.push(format!("max_db_client_connections = {v}")),
            "max_user_client_connections" => proxy.push(format!("max_user_client_connections = {v}")),
            "so_reuseport" => proxy.push(format!("so_reuseport = {}", v == "1")),
            "peer_id" => proxy.push(format!("peer_id = {v}")),
            "logfile" | "syslog" | "syslog_ident" | "syslog_facility" | "log_connections" | "log_disconnections"
            | "log_pooler_errors" | "log_stats" | "verbose" => {
                skip(key, "pgmux logs to stderr; RUST_LOG or --log-level sets the level")
            }
            "pidfile" | "user" => skip(key, "pgmux runs in the foreground: leave it to the service manager"),
            "unix_socket_dir" | "unix_socket_mode" | "unix_socket_group" => {}
            "server_reset_query" | "server_reset_query_always" => skip(
                key,
                "pgmux resets server connections itself (transaction mode needs none; session state is tracked)",
            ),
            "server_check_query" | "server_check_delay" => {
                skip(key, "pgmux checks a server connection's liveness without a query before reuse")
            }
            "ignore_startup_parameters" => {
                skip(key, "pgmux accepts every startup parameter and applies it to the session")
            }
            "stats_period" => skip(key, "fixed at 60 s (SHOW STATS averages); /metrics has the raw counters"),
            "client_idle_timeout" | "client_login_timeout" => skip(key, "no equivalent: login times out after 15 s"),
            _ => skip(key, "no pgmux equivalent"),
        }
    }

    // [[users]]
    let mut users_toml = String::new();
    let mut user_names = Vec::new();
    if let Some(list) = userlist {
        for (name, secret) in parse_userlist(list) {
            let (auth, why) = auth_for(&auth_type, &secret);
            if let Some(why) = why {
                skip(&format!("user {name}"), &why);
            }
            let _ = writeln!(users_toml, "\n[[users]]\nname = {}", quote(&name));
            if auth != "trust" || !secret.is_empty() {
                let _ = writeln!(users_toml, "password = {}", quote(&secret));
            }
            let _ = writeln!(users_toml, "auth = {}", quote(auth));
            if secret.starts_with("SCRAM-SHA-256$") || secret.starts_with("md5") {
                skip(
                    &format!("user {name}"),
                    "the password is a hash: pgmux checks clients with it, but logs in to Postgres with \
                     server_password, which needs the plaintext (add it)",
                );
            }
            user_names.push(name);
        }
    }
    if let Some(u) = auth_user {
        if user_names.contains(&u) {
            proxy.push(format!("auth_user = {}", quote(&u)));
        } else {
            skip(
                &format!("auth_user {u}"),
                "not in the auth_file: add it to [[users]] with its plaintext password, then set auth_user",
            );
        }
    }
    let admins: Vec<String> = admin_users
        .into_iter()
        .filter(|u| {
            let known = user_names.contains(u);
            if !known {
                skip(&format!("admin_users {u}"), "not in the auth_file; a console user must be in [[users]]");
            }
            known
        })
        .collect();

    // [[databases]]
    let mut dbs_toml = String::new();
    for (name, connstr) in ini.sections.get("databases").unwrap_or(&empty) {
        let params = parse_connstr(connstr);
        let param = |k: &str| params.iter().rev().find(|(pk, _)| pk == k).map(|(_, v)| v.as_str());
        let host = param("host").unwrap_or("127.0.0.1");
        let hosts: Vec<&str> = host.split(',').map(str::trim).collect();
        let port = param("port").unwrap_or("5432");
        if hosts[0].is_empty() {
            skip(&format!("databases {name}"), "no host: name Postgres's socket directory or address");
            continue;
        }
        if hosts.len() > 1 {
            skip(
                &format!("databases {name} host"),
                "several hosts: kept the first as primary; list read replicas in `replicas`",
            );
        }
        let _ = writeln!(dbs_toml, "\n[[databases]]\nname = {}", quote(name));
        if let Some(dbname) = param("dbname").filter(|d| d != name) {
            let _ = writeln!(dbs_toml, "dbname = {}", quote(dbname));
        }
        let host = if hosts[0].contains(':') { format!("[{}]", hosts[0]) } else { hosts[0].to_owned() };
        let _ = writeln!(dbs_toml, "primary = {}", quote(&format!("{host}:{port}")));
        let _ = writeln!(dbs_toml, "pool_size = {}", param("pool_size").unwrap_or(&default_pool_size));
        let min = param("min_pool_size").unwrap_or(&min_pool_size);
        if min != "0" {
            let _ = writeln!(dbs_toml, "min_pool_size = {min}");
        }
        for (from, to) in [
            ("max_db_connections", "max_db_connections"),
            ("max_db_client_connections", "max_db_client_connections"),
            ("reserve_pool_size", "reserve_pool_size"),
            ("reserve_pool", "reserve_pool_size"),
        ] {
            if let Some(n) = param(from) {
                let _ = writeln!(dbs_toml, "{to} = {n}");
            }
        }
        match param("pool_mode") {
            Some(m @ ("session" | "transaction")) => {
                let _ = writeln!(dbs_toml, "pool_mode = {}", quote(m));
            }
            Some(m) => skip(&format!("databases {name} pool_mode"), &format!("{m} pooling does not exist in pgmux")),
            None => {}
        }
        for (k, _) in &params {
            let why = match k.as_str() {
                "host"
                | "port"
                | "dbname"
                | "pool_size"
                | "min_pool_size"
                | "pool_mode"
                | "max_db_connections"
                | "max_db_client_connections"
                | "reserve_pool_size"
                | "reserve_pool" => continue,
                "user" | "password" => "pgmux logs in as the client's user: no forced user",
                "auth_user" | "auth_query" | "auth_dbname" => {
                    "per-database auth settings: set them on the [[databases]] entry by hand"
                }
                "client_encoding" | "datestyle" | "timezone" | "application_name" => {
                    "no per-database startup defaults: the server's or the client's apply"
                }
                "connect_query" => "no query on new server connections",
                _ => "no pgmux equivalent",
            };
            skip(&format!("databases {name} {k}"), why);
        }
    }
    if user_names.is_empty() {
        skip("[[users]]", "no user: pass the auth_file as the second argument, or add [[users]] entries");
    }
    if dbs_toml.is_empty() {
        skip("[databases]", "no database pgmux can serve: add a [[databases]] entry");
    }
    for (user, _) in ini.sections.get("users").unwrap_or(&empty) {
        skip(&format!("users {user}"), "per-user pool settings have no equivalent");
    }
    // [[peers]]: where cancels issued by the other instances are forwarded.
    let mut peers_toml = String::new();
    for (id, connstr) in ini.sections.get("peers").unwrap_or(&empty) {
        let params = parse_connstr(connstr);
        let param = |k: &str| params.iter().rev().find(|(pk, _)| pk == k).map(|(_, v)| v.as_str());
        let host = param("host").unwrap_or("");
        if id.parse::<u32>().is_err() {
            skip(&format!("peers {id}"), "a peer id is a number");
            continue;
        }
        if host.is_empty() || host.starts_with('/') {
            skip(
                &format!("peers {id}"),
                "host is a Unix socket directory; pgmux forwards cancels over TCP to the peer's peer_listen",
            );
            continue;
        }
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
        let port = param("port").unwrap_or("6432");
        let _ = writeln!(peers_toml, "\n[[peers]]\nid = {id}\naddr = {}", quote(&format!("{host}:{port}")));
        for (k, _) in params.iter().filter(|(k, _)| k != "host" && k != "port") {
            skip(&format!("peers {id} {k}"), "pgmux opens a connection per forwarded cancel, no pool");
        }
    }

    let mut toml = String::from("# proxy.toml converted from a PgBouncer configuration by `pgmux convert`.\n");
    if !skipped.is_empty() {
        toml.push_str("#\n# Not carried over:\n");
        for s in &skipped {
            let _ = writeln!(toml, "#   {}", s.replace('\n', " "));
        }
    }
    toml.push_str("\n[proxy]\n");
    for line in &proxy {
        toml.push_str(line);
        toml.push('\n');
    }
    if !admins.is_empty() {
        let list: Vec<String> = admins.iter().map(|a| quote(a)).collect();
        let _ = write!(toml, "\n[admin]\nusers = [{}]\n", list.join(", "));
    }
    toml.push_str(&dbs_toml);
    toml.push_str(&users_toml);
    toml.push_str(&peers_toml);
    Converted { toml, skipped }
}

#[cfg(test)]
mod tests;
