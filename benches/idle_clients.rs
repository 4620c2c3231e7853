//! Memory per idle client: opens N logged-in client connections to a pgmux
//! process (and to PgBouncer when installed) and reports the proxy's RSS
//! growth per client.
//!
//!   cargo bench --bench idle_clients [-- CLIENTS]   (default 10000)
//!
//! Needs `cargo build --release` first (it runs target/release/pgmux). The
//! result table replaces the block between `<!-- idle:begin -->` and
//! `<!-- idle:end -->` in docs/benchmarks.md (`DOC=path` elsewhere, `DOC=`
//! not at all).
//!
//! PgBouncer refuses to run as root: as root it runs as the `postgres` OS
//! user (set directly, without `runuser`, whose PAM session would reset the
//! file-descriptor limit to 1024), with the raised limit inherited.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgmux::cluster::{Cluster, ClusterSpec};

fn main() {
    let clients: usize =
        std::env::args().skip(1).find(|a| !a.starts_with("--")).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let fd_limit = raise_fd_limit(clients as u64 * 2 + 1000);
    assert!(
        fd_limit > clients as u64 + 500,
        "open-file limit {fd_limit} is too low for {clients} clients: raise the hard limit (ulimit -Hn)"
    );
    let cluster = Cluster::start(&ClusterSpec::default()).expect("start Postgres (needs PostgreSQL server binaries)");
    let primary = cluster.primary().host_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("bench path");
    // target/release/deps/idle_clients-… → target/release/pgmux
    let pgmux_bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("pgmux")).expect("target dir");
    assert!(pgmux_bin.exists(), "build the binary first: cargo build --release ({} missing)", pgmux_bin.display());

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("idle_clients: {clients} logged-in idle clients, {cores} cores");
    let mut table = String::from("| proxy | RSS before | RSS with clients | per idle client |\n|---|---:|---:|---:|\n");
    print!("{table}");

    // pgmux on each data path: on io_uring an idle client's socket is a
    // slot in the ring's table instead of a tokio registration; and with
    // idle_poll, the fastest configuration (which allocates nothing more).
    for (io, poll) in [("epoll", "0"), ("uring", "0"), ("uring", "100us")] {
        let port = pgmux::cluster::pick_port().expect("a free loopback port");
        let config = dir.path().join(format!("proxy-{io}-{poll}.toml"));
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\nio = \"{io}\"\nidle_poll = \"{poll}\"\nmax_client_conn = {}\nserver_tls = \"disable\"\n[[databases]]\nname = \"postgres\"\nprimary = \"{primary}\"\npool_size = 5\n[[users]]\nname = \"postgres\"\nauth = \"trust\"\n",
                clients + 100
            ),
        )
        .expect("write config");
        let child = Command::new(&pgmux_bin)
            .args(["--config", config.to_str().expect("utf-8 path"), "--log-level", "error"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start pgmux");
        let name = match poll {
            "0" => format!("pgmux, io = \"{io}\""),
            _ => format!("pgmux, io = \"{io}\", idle_poll = \"{poll}\""),
        };
        let row = measure(&name, child, port, clients);
        print!("{row}");
        table.push_str(&row);
    }

    let mut bouncer_version = String::from("PgBouncer not installed");
    if let Ok(bouncer) = which("pgbouncer") {
        bouncer_version = Command::new(&bouncer)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|v| v.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "PgBouncer (version unknown)".into());
        let port = pgmux::cluster::pick_port().expect("a free loopback port");
        let ini = dir.path().join("pgbouncer.ini");
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").expect("users");
        let (host, pg_port) = primary.split_once(':').expect("host:port");
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host={host} port={pg_port} dbname=postgres\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = transaction\ndefault_pool_size = 5\nmax_client_conn = {}\nserver_tls_sslmode = disable\nlogfile = {}\n",
                users.display(),
                clients + 100,
                dir.path().join("pgbouncer.log").display()
            ),
        )
        .expect("ini");
        let mut cmd = Command::new(&bouncer);
        cmd.arg(&ini).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // PgBouncer refuses to run as root. It reads the ini and users
            // file (0644 by default) and writes its log in the temp dir.
            let (uid, gid) = postgres_ids().expect("running as root, but there is no `postgres` OS user");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().expect("start pgbouncer");
        let row = measure("pgbouncer", child, port, clients);
        print!("{row}");
        table.push_str(&row);
    }

    let doc = match std::env::var("DOC") {
        Ok(d) if d.is_empty() => return,
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md"),
    };
    let mut block = String::new();
    let _ = writeln!(
        block,
        "Generated by `cargo bench --bench idle_clients -- {clients}` on {}.\n\n- Machine: {cores} cores, {}\n- {}; {bouncer_version}; pgmux and PgBouncer with pool size 5, transaction mode\n- Each client: TCP login (trust), then idle. RSS from /proc/PID/status (VmRSS) after a first warm-up client, and again with all clients logged in.\n",
        utc_now(),
        cpu_model(),
        cluster
            .primary()
            .psql("SHOW server_version")
            .map(|v| format!("PostgreSQL {}", v.trim()))
            .unwrap_or_else(|_| "PostgreSQL".into()),
    );
    block.push_str(&table);
    match replace_block(&doc, "idle", &block) {
        Ok(()) => println!("written to {}", doc.display()),
        Err(e) => eprintln!("could not update {}: {e}", doc.display()),
    }
}

/// Logs `clients` idle clients into the proxy on `port`; returns the table row.
fn measure(label: &str, mut child: Child, port: u16, clients: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{label} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id();
    let mut warm = login(port).unwrap_or_else(|e| panic!("{label}: first login failed: {e}"));
    // Length 14: itself (4) + "SELECT 1;\0" (10).
    warm.write_all(b"Q\0\0\0\x0eSELECT 1;\0").expect("send query");
    read_until_ready(&mut warm).unwrap_or_else(|e| panic!("{label}: SELECT 1 failed: {e}"));
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        match login(port) {
            Ok(c) => conns.push(c),
            Err(e) => panic!("{label}: login {i} failed: {e}"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    drop(conns);
    drop(warm);
    let _ = child.kill();
    let _ = child.wait();
    format!(
        "| {label} | {before} KiB | {after} KiB | {:.2} KiB |\n",
        (after.saturating_sub(before)) as f64 / clients as f64
    )
}

fn login(port: u16) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    // A stuck proxy fails the benchmark instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for p in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(p.as_bytes());
        body.push(0);
    }
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    s.write_all(&packet)?;
    read_until_ready(&mut s)?;
    Ok(s)
}

fn read_until_ready(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        while buf.len() >= pos + 5 {
            let len = u32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]]) as usize;
            if buf.len() < pos + 1 + len {
                break;
            }
            match buf[pos] {
                b'Z' => return Ok(()),
                b'E' => return Err(std::io::Error::other("login refused")),
                _ => pos += 1 + len,
            }
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.exists()))
        .or_else(|| ["/usr/sbin", "/usr/bin"].iter().map(|d| std::path::Path::new(d).join(name)).find(|p| p.exists()))
        .ok_or(())
}

/// Raises the soft open-file limit towards `want` (children inherit it);
/// returns the limit now in force.
fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = want.min(lim.rlim_max).max(lim.rlim_cur);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// uid and gid of the `postgres` OS user.
fn postgres_ids() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam returns null or a pointer to static storage, read at
    // once; nothing else in this process calls it concurrently.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%F %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
/// in `path` with `body`, appending the marked block when it is missing.
fn replace_block(path: &std::path::Path, name: &str, body: &str) -> std::io::Result<()> {
    let (begin, end) = (format!("<!-- {name}:begin -->"), format!("<!-- {name}:end -->"));
    let text = std::fs::read_to_string(path).or_else(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Ok(String::new()),
        _ => Err(e),
    })?;
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{begin}\n{body}{}", &text[..b], &text[e..]),
        _ => {
            format!("{text}{}{begin}\n{body}{end}\n", if text.is_empty() || text.ends_with("\n\n") { "" } else { "\n" })
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, new)
}
