//! Users that live in Postgres, not in proxy.toml: `auth_query` lookups with
//! SCRAM pass-through, against the real test cluster. Roles are created
//! after pgmux started; none of them is in its configuration.

mod support;

use std::time::{Duration, Instant};

use support::proxy::{Proxy, admin_config};
use support::{DB, code, scalar};

/// Tests that time logins, or storm them, run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shared cluster's superuser is trusted over TCP; as auth_user it
/// still needs a password pgmux would send (trust ignores it).
fn config(extra_proxy: &str) -> String {
    admin_config(support::cluster(), 3, &format!("auth_user = \"postgres\"\n{extra_proxy}")).replace(
        "name = \"postgres\"\nauth = \"trust\"",
        "name = \"postgres\"\nauth = \"trust\"\nserver_password = \"unused\"",
    )
}

async fn create_role(name: &str, options: &str) {
    let su = support::superuser(DB).await;
    su.batch_execute(&format!("DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN {options}")).await.unwrap();
}

/// A role created after pgmux started logs in through it and runs
/// transactions; pgmux logs in to Postgres as that role with the keys its
/// SCRAM proof revealed, including for server connections opened later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_created_in_postgres_logs_in_through_pgmux() {
    let proxy = Proxy::start(&config("")).await;
    create_role("aq_alice", "PASSWORD 'alice pw'").await;
    let su = support::superuser(DB).await;
    su.batch_execute("CREATE TABLE IF NOT EXISTS aq_log (who text); GRANT ALL ON aq_log TO PUBLIC").await.unwrap();

    let alice = proxy.connect("aq_alice", Some("alice pw"), DB).await.expect("login through auth_query");
    assert_eq!(scalar(&alice, "SELECT current_user").await, "aq_alice");
    alice.batch_execute("BEGIN; INSERT INTO aq_log VALUES (current_user); COMMIT").await.unwrap();

    // New server connections for the same user after the login: RECONNECT
    // closes the pooled ones; two clients at once need two.
    let admin = proxy.connect("postgres", None, "pgmux").await.unwrap();
    admin.simple_query(&format!("RECONNECT {DB}")).await.unwrap();
    let bob_side = proxy.connect("aq_alice", Some("alice pw"), DB).await.unwrap();
    let (a, b) = tokio::join!(
        alice.batch_execute("BEGIN; SELECT pg_sleep(0.2); INSERT INTO aq_log VALUES (current_user); COMMIT"),
        bob_side.batch_execute("BEGIN; SELECT pg_sleep(0.2); INSERT INTO aq_log VALUES (current_user); COMMIT"),
    );
    a.unwrap();
    b.unwrap();
    let n: i64 = scalar(&su, "SELECT count(*) FROM aq_log WHERE who = 'aq_alice'").await.parse().unwrap();
    assert!(n >= 3, "{n}");
    let sessions: i64 = scalar(
        &su,
        "SELECT count(DISTINCT pid) FROM pg_stat_activity WHERE usename = 'aq_alice' AND backend_type = 'client backend'",
    )
    .await
    .parse()
    .unwrap();
    assert!(sessions >= 2, "Postgres saw {sessions} sessions of aq_alice");
    proxy.shutdown().await;
}

/// Wrong password, unknown role, a role past VALID UNTIL and one that
/// cannot log in: the same 28P01 and message, and about the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_tell_nothing_about_which_roles_exist() {
    let _serial = SERIAL.lock().await;
    let proxy = Proxy::start(&config("")).await;
    create_role("aq_carol", "PASSWORD 'carol pw'").await;
    create_role("aq_expired", "PASSWORD 'old pw' VALID UNTIL '2001-01-01'").await;
    create_role("aq_nologin", "PASSWORD 'x pw'").await;
    support::superuser(DB).await.batch_execute("ALTER ROLE aq_nologin NOLOGIN").await.unwrap();

    let refused = |user: &'static str, password: &'static str| {
        let proxy = &proxy;
        async move {
            let started = Instant::now();
            let e = proxy.connect(user, Some(password), DB).await.expect_err("refused");
            let took = started.elapsed();
            assert_eq!(code(&e), "28P01", "{user}: {e}");
            let text = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
            assert_eq!(text, format!("password authentication failed for user \"{user}\""));
            took
        }
    };
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..7 {
        wrong.push(refused("aq_carol", "not it").await);
        unknown.push(refused("aq_nobody", "not it").await);
    }
    refused("aq_expired", "old pw").await;
    refused("aq_nologin", "x pw").await;
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (w, u) = (median(&mut wrong), median(&mut unknown));
    eprintln!("median refusal: wrong password {w:?}, unknown role {u:?}");
    let ratio = w.as_secs_f64() / u.as_secs_f64();
    assert!((0.5..2.0).contains(&ratio), "wrong password {w:?} vs unknown role {u:?}");
    // And the right password works.
    let carol = proxy.connect("aq_carol", Some("carol pw"), DB).await.expect("right password");
    assert_eq!(scalar(&carol, "SELECT current_user").await, "aq_carol");
    proxy.shutdown().await;
}

/// A client's `search_path` cannot change what auth_query reads: a
/// look-alike `pg_authid` in a schema the client puts first is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_cannot_redirect_the_lookup() {
    let proxy = Proxy::start(&config("")).await;
    create_role("aq_dave", "PASSWORD 'dave pw'").await;
    let su = support::superuser(DB).await;
    // The look-alike holds a verifier for "evil pw".
    let evil = postgres_protocol::password::scram_sha_256(b"evil pw");
    su.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS aq_evil CASCADE; CREATE SCHEMA aq_evil; \
         CREATE TABLE aq_evil.pg_authid (rolname name, rolpassword text, rolvaliduntil timestamptz, rolcanlogin bool); \
         INSERT INTO aq_evil.pg_authid VALUES ('aq_dave', '{evil}', NULL, true); GRANT USAGE ON SCHEMA aq_evil TO PUBLIC"
    ))
    .await
    .unwrap();
    let with_path = |password: &str| {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(proxy.port())
            .user("aq_dave")
            .password(password)
            .dbname(DB)
            .options("-c search_path=aq_evil,pg_catalog");
        c
    };
    let e =
        with_path("evil pw").connect(tokio_postgres::NoTls).await.map(|_| ()).expect_err("the look-alike is ignored");
    assert_eq!(code(&e), "28P01");
    let (client, conn) = with_path("dave pw").connect(tokio_postgres::NoTls).await.expect("the real password");
    tokio::spawn(conn);
    assert_eq!(scalar(&client, "SHOW search_path").await, "aq_evil,pg_catalog");
    proxy.shutdown().await;
}

/// A password changed in Postgres: sessions already logged in go on; the
/// new password works without a restart, after at most one refusal while
/// the old verifier was cached (a SCRAM proof is bound to the salt it was
/// computed with); the old password no longer works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_takes_effect() {
    let proxy = Proxy::start(&config("auth_cache_ttl = \"1h\"")).await;
    create_role("aq_erin", "PASSWORD 'first pw'").await;
    let before = proxy.connect("aq_erin", Some("first pw"), DB).await.expect("first password");
    support::superuser(DB).await.batch_execute("ALTER ROLE aq_erin PASSWORD 'second pw'").await.unwrap();

    let mut refusals = 0;
    let after = loop {
        match proxy.connect("aq_erin", Some("second pw"), DB).await {
            Ok(c) => break c,
            Err(e) => {
                assert_eq!(code(&e), "28P01");
                refusals += 1;
                assert!(refusals <= 1, "the new password was refused {refusals} times");
            }
        }
    };
    assert_eq!(scalar(&after, "SELECT current_user").await, "aq_erin");
    assert_eq!(scalar(&before, "SELECT 1").await, "1", "the earlier session goes on");
    let e = proxy.connect("aq_erin", Some("first pw"), DB).await.expect_err("the old password");
    assert_eq!(code(&e), "28P01");
    proxy.shutdown().await;
}

/// With read/write splitting on: a looked-up user's reads run on the
/// replica, which pgmux logs in to with the same pass-through keys, and its
/// writes on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looked_up_users_read_from_replicas() {
    let cluster = support::cluster_async().await;
    let replica = cluster.replicas()[0].host_port();
    let primary = format!("primary = \"{}\"", cluster.primary().host_port());
    let toml = config("").replacen(&primary, &format!("{primary}\nreplicas = [\"{replica}\"]"), 1);
    let proxy = Proxy::start(&toml).await;
    create_role("aq_frank", "PASSWORD 'frank pw'").await;
    let frank = proxy.connect("aq_frank", Some("frank pw"), DB).await.expect("login");
    // (pg_is_in_recovery() would tell the node, but pgmux sends it to the primary.)
    let on_replica = format!("aq_frank {}", cluster.replicas()[0].port());
    support::eventually(Duration::from_secs(10), "a read from the replica as aq_frank", || async {
        scalar(&frank, "SELECT current_user || ' ' || pg_catalog.inet_server_port()").await == on_replica
    })
    .await;
    assert_eq!(
        scalar(&frank, "SELECT pg_catalog.inet_server_port() FROM pg_catalog.txid_current()").await,
        cluster.primary().port().to_string(),
        "a write goes to the primary"
    );
    proxy.shutdown().await;
}

/// PgBouncer's own auth_query shape, (name, secret), works as is: what
/// `pgmux convert` carries over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_shaped_auth_query() {
    let query = "auth_query = \"SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1\"";
    let proxy = Proxy::start(&config(query)).await;
    create_role("aq_gina", "PASSWORD 'gina pw'").await;
    let gina = proxy.connect("aq_gina", Some("gina pw"), DB).await.expect("login with a two-column auth_query");
    assert_eq!(scalar(&gina, "SELECT current_user").await, "aq_gina");
    let e = proxy.connect("aq_gina", Some("nope"), DB).await.expect_err("wrong password");
    assert_eq!(code(&e), "28P01");
    proxy.shutdown().await;
}

/// 2,000 logins of 20 roles that only Postgres knows, 64 at a time, while
/// a connected client keeps querying: every login succeeds, the connected
/// client is not held up, and Postgres sees no more server connections for
/// those roles than their pools allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_storm_of_looked_up_users() {
    let _serial = SERIAL.lock().await;
    const ROLES: usize = 20;
    const LOGINS: usize = 2000;
    const POOL_SIZE: usize = 3;
    let proxy = Proxy::start(&config("max_client_conn = 5000")).await;
    let su = support::superuser(DB).await;
    for i in 0..ROLES {
        create_role(&format!("aq_storm{i}"), &format!("PASSWORD 'storm pw {i}'")).await;
    }
    let canary = proxy.connect(support::APP.0, Some(support::APP.1), DB).await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let storm = {
        let (port, done) = (proxy.port(), done.clone());
        tokio::spawn(async move {
            let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
            let mut logins = tokio::task::JoinSet::new();
            for n in 0..LOGINS {
                let gate = gate.clone();
                logins.spawn(async move {
                    let _turn = gate.acquire_owned().await.unwrap();
                    let i = n % ROLES;
                    let url =
                        format!("host=127.0.0.1 port={port} user=aq_storm{i} password='storm pw {i}' dbname={DB}");
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    c.simple_query("SELECT 1").await.map(drop)
                });
            }
            let mut failed = Vec::new();
            while let Some(r) = logins.join_next().await {
                if let Err(e) = r.unwrap() {
                    failed.push(e.to_string());
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            failed
        })
    };
    let mut lat = Vec::new();
    let mut most_sessions = 0i64;
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        let t = Instant::now();
        assert_eq!(scalar(&canary, "SELECT 1").await, "1");
        lat.push(t.elapsed());
        let sessions: i64 = scalar(
            &su,
            "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE 'aq\\_storm%' AND backend_type = 'client backend'",
        )
        .await
        .parse()
        .unwrap();
        most_sessions = most_sessions.max(sessions);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let failed = storm.await.unwrap();
    let took = started.elapsed();
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    eprintln!(
        "auth_query login storm: {LOGINS} logins of {ROLES} roles in {took:?} ({:.0}/s); canary p50 {:?} p99 {:?} max {:?}; \
         at most {most_sessions} server sessions of those roles",
        LOGINS as f64 / took.as_secs_f64(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
    assert!(failed.is_empty(), "{} logins failed, first: {}", failed.len(), failed[0]);
    assert!(p(0.99) < Duration::from_millis(500), "canary p99 {:?}", p(0.99));
    assert!(most_sessions <= (ROLES * POOL_SIZE) as i64, "{most_sessions} server sessions");
    proxy.shutdown().await;
}

/// 200 clients of 20 roles only Postgres knows, on a database only the
/// `"*"` entry names, under max_db_connections = 6 and
/// max_user_connections = 2: every transaction runs, and Postgres never sees
/// more than the caps allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looked_up_users_over_the_wildcard_stay_under_the_caps() {
    let _serial = SERIAL.lock().await;
    const ROLES: usize = 20;
    let cluster = support::cluster_async().await;
    let su = support::superuser(DB).await;
    su.batch_execute("DROP DATABASE IF EXISTS aq_capdb").await.unwrap();
    su.batch_execute("CREATE DATABASE aq_capdb").await.unwrap();
    for i in 0..ROLES {
        create_role(&format!("aq_cap{i}"), &format!("PASSWORD 'cap pw {i}'")).await;
    }
    let toml =
        config("max_db_connections = 6\nmax_user_connections = 2\nquery_wait_timeout = \"60s\"\nmax_client_conn = 500")
            + &format!(
                "\n[[databases]]\nname = \"*\"\nprimary = \"{}\"\npool_size = 3\n",
                cluster.primary().host_port()
            );
    let proxy = Proxy::start(&toml).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let (mut most_db, mut most_user) = (0i64, 0i64);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let rows = su
                    .simple_query(
                        // The auth_user's lookups (at most 2 connections, outside the caps) aside.
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'aq_capdb' AND backend_type = 'client backend' \
                         AND usename <> 'postgres' \
                         UNION ALL SELECT coalesce(max(n), 0) FROM (SELECT count(*) n FROM pg_stat_activity \
                         WHERE usename LIKE 'aq\\_cap%' AND backend_type = 'client backend' GROUP BY usename) u",
                    )
                    .await
                    .unwrap();
                let v: Vec<i64> = rows
                    .iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|x| x.parse().unwrap()),
                        _ => None,
                    })
                    .collect();
                most_db = most_db.max(v[0]);
                most_user = most_user.max(v[1]);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (most_db, most_user, su)
        })
    };
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..200 {
        let port = proxy.port();
        clients.spawn(async move {
            let i = n % ROLES;
            let url = format!("host=127.0.0.1 port={port} user=aq_cap{i} password='cap pw {i}' dbname=aq_capdb");
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("login");
            tokio::spawn(conn);
            for _ in 0..2 {
                c.batch_execute("BEGIN; SELECT pg_sleep(0.01); COMMIT").await.expect("every transaction runs");
            }
        });
    }
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (most_db, most_user, su) = sampler.await.unwrap();
    eprintln!(
        "200 clients of {ROLES} looked-up roles over the wildcard: at most {most_db} sessions on aq_capdb, {most_user} of one role"
    );
    assert!(most_db <= 6, "{most_db} sessions on aq_capdb");
    assert!(most_user <= 2, "{most_user} sessions of one role");
    assert!(most_db >= 2, "the load never reached the server: {most_db}");
    proxy.shutdown().await;
    su.batch_execute("DROP DATABASE aq_capdb").await.unwrap();
}

/// md5: a password changed in Postgres works at the very next login even
/// while the old hash is cached: the response that fails the cached hash is
/// checked once more against a fresh lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_password_change_works_at_the_next_login() {
    let (md5_user, md5_pw) = support::MD5;
    // md5user is an md5 role with an md5 pg_hba line in the test cluster;
    // here it is not in proxy.toml, so auth_query finds it.
    let toml = config("auth_cache_ttl = \"1h\"")
        .replace(&format!("[[users]]\nname = \"{md5_user}\"\npassword = \"{md5_pw}\"\nauth = \"md5\"\n"), "");
    assert!(!toml.contains(&format!("\"{md5_user}\"")), "{toml}");
    let proxy = Proxy::start(&toml).await;
    let su = support::superuser(DB).await;
    let first = proxy.connect(md5_user, Some(md5_pw), DB).await.expect("md5 login through auth_query");
    assert_eq!(scalar(&first, "SELECT current_user").await, md5_user);
    su.batch_execute(&format!("SET password_encryption = 'md5'; ALTER ROLE {md5_user} PASSWORD 'changed md5 pw'"))
        .await
        .unwrap();
    let result = proxy.connect(md5_user, Some("changed md5 pw"), DB).await;
    su.batch_execute(&format!("SET password_encryption = 'md5'; ALTER ROLE {md5_user} PASSWORD '{md5_pw}'"))
        .await
        .unwrap();
    let after = result.expect("the new password at the very next login");
    assert_eq!(scalar(&after, "SELECT current_user").await, md5_user);
    proxy.shutdown().await;
}
