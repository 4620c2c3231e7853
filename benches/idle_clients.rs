//! Memory per idle client: opens N logged-in client connections to a pgmux
//! process (and to PgBouncer when installed) and reports the proxy's RSS
//! growth per client.
//!
//!   cargo bench --bench idle_clients [-- CLIENTS]   (default 10000)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgmux::cluster::{Cluster, ClusterSpec};

fn main() {
    let clients: usize =
        std::env::args().skip(1).find(|a| !a.starts_with("--")).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    raise_fd_limit(clients as u64 * 2 + 1000);
    let cluster = Cluster::start(&ClusterSpec::default()).expect("start Postgres (needs PostgreSQL server binaries)");
    let primary = cluster.primary().host_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("bench path");
    // target/release/deps/idle_clients-… → target/release/pgmux
    let pgmux_bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("pgmux")).expect("target dir");
    assert!(pgmux_bin.exists(), "build the binary first: cargo build --release ({} missing)", pgmux_bin.display());

    println!(
        "idle_clients: {clients} logged-in idle clients, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| proxy | RSS before | RSS with clients | per idle client |");
    println!("|---|---|---|---|");

    let port = free_port();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\nmax_client_conn = {}\n[[databases]]\nname = \"postgres\"\nprimary = \"{primary}\"\npool_size = 5\n[[users]]\nname = \"postgres\"\nauth = \"trust\"\n",
            clients + 100
        ),
    )
    .expect("write config");
    let child = Command::new(&pgmux_bin)
        .args(["--config", config.to_str().expect("utf-8 path"), "--log-level", "error"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start pgmux");
    measure("pgmux", child, port, clients);

    if let Ok(bouncer) = which("pgbouncer") {
        let port = free_port();
        let ini = dir.path().join("pgbouncer.ini");
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").expect("users");
        let (host, pg_port) = primary.split_once(':').expect("host:port");
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host={host} port={pg_port} dbname=postgres\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = transaction\ndefault_pool_size = 5\nmax_client_conn = {}\nlogfile = {}\n",
                users.display(),
                clients + 100,
                dir.path().join("pgbouncer.log").display()
            ),
        )
        .expect("ini");
        // PgBouncer refuses to run as root.
        let _ = Command::new("chmod").args(["-R", "a+rwx", dir.path().to_str().unwrap_or("/tmp")]).status();
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bouncer);
            c
        } else {
            Command::new(&bouncer)
        };
        let child = cmd.arg(&ini).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start pgbouncer");
        measure("pgbouncer", child, port, clients);
    }
}

fn measure(label: &str, mut child: Child, port: u16, clients: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{label} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // With runuser the child is runuser; find the proxy's own pid.
    let pid = own_pid(child.id(), label);
    let mut warm = login(port).expect("first login");
    let _ = warm.write_all(b"Q\0\0\0\x0dSELECT 1;\0");
    let _ = read_until_ready(&mut warm);
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
    println!(
        "| {label} | {before} KiB | {after} KiB | {:.2} KiB |",
        (after.saturating_sub(before)) as f64 / clients as f64
    );
    drop(conns);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = child.kill();
    let _ = child.wait();
}

fn login(port: u16) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
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

fn own_pid(child: u32, label: &str) -> u32 {
    // runuser forks the real program as its child.
    let children = std::fs::read_to_string(format!("/proc/{child}/task/{child}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p: &u32| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| label.starts_with(c.trim())))
        .unwrap_or(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.exists()))
        .or_else(|| ["/usr/sbin", "/usr/bin"].iter().map(|d| std::path::Path::new(d).join(name)).find(|p| p.exists()))
        .ok_or(())
}

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
