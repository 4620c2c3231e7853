//! The `pgmux` binary: parse the command line, set up logging, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use pgmux::config::{Config, Listen};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Backs pgmux's heap with 4 KiB pages, as Redis does by default
/// (`disable-thp`). With huge pages RSS grows in 2 MiB steps against ~1 KiB
/// per idle client, starts 6 MiB higher, and a fault can stall on
/// compaction; a proxy's heap is small, scattered per-connection state that
/// gains nothing measurable from fewer TLB misses (docs/benchmarks.md, idle
/// memory). mimalloc's `no_thp` feature stops it asking for huge pages
/// (what a system in THP `madvise` mode needs); this covers `always` mode
/// from here on. With `MIMALLOC_ALLOW_THP` set, the system's policy stands.
fn disable_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes an integer flag and no pointer.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

#[derive(Parser)]
#[command(name = "pgmux", version, about = "PostgreSQL connection pooler with replica routing")]
struct Cli {
    /// Path to proxy.toml.
    #[arg(long, short, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Log level (error, warn, info, debug, trace); RUST_LOG takes precedence.
    /// Defaults to info, and to warn for `demo`, whose own output is the point.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration file and exit (1 on error).
    Check,
    /// Start a throwaway primary + replica, pgmux in front, and drive pgbench traffic through it.
    Demo,
    /// Print a proxy.toml equivalent to a PgBouncer configuration; what cannot be carried over
    /// is listed on stderr and as comments in the output.
    Convert {
        /// pgbouncer.ini
        ini: PathBuf,
        /// Its auth_file (userlist.txt), for the [[users]] entries.
        userlist: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    disable_huge_pages();
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Some(Command::Demo)) { "warn" } else { "info" };
    let level = cli.log_level.as_deref().unwrap_or(default_level);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colour codes only for a terminal: in a log file or journal they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();

    let runtime = |workers: usize| {
        pgmux::server::runtime(workers).inspect_err(|e| eprintln!("pgmux: cannot start the runtime: {e}")).ok()
    };
    match cli.command {
        Some(Command::Check) => match Config::load(&cli.config) {
            // The certificate, key and CA files must load too, as at start.
            Ok(config) if let Err(e) = pgmux::settings::Settings::build(config.clone()) => {
                eprintln!("{}: TLS: {e}", cli.config.display());
                ExitCode::FAILURE
            }
            Ok(config) => {
                println!(
                    "{}: OK ({} databases, {} users)",
                    cli.config.display(),
                    config.databases.len(),
                    config.users.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Convert { ini, userlist }) => {
            let read = |p: &PathBuf| {
                pgmux::config::read_bounded(p, pgmux::config::MAX_CONFIG_FILE)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .inspect_err(|e| eprintln!("pgmux convert: {}: {e}", p.display()))
                    .ok()
            };
            let Some(ini_text) = read(&ini) else { return ExitCode::FAILURE };
            let users = match &userlist {
                Some(p) => match read(p) {
                    Some(t) => Some(t),
                    None => return ExitCode::FAILURE,
                },
                None => None,
            };
            let out = pgmux::convert::convert(&ini_text, users.as_deref());
            print!("{}", out.toml);
            if !out.skipped.is_empty() {
                eprintln!(
                    "pgmux convert: {} settings not carried over (listed at the top of the output):",
                    out.skipped.len()
                );
                for s in &out.skipped {
                    eprintln!("  {s}");
                }
            }
            ExitCode::SUCCESS
        }
        Some(Command::Demo) => {
            let Some(runtime) = runtime(pgmux::config::ProxyConfig::default().workers) else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(pgmux::demo::run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgmux demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            let config = match Config::load(&cli.config) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let Some(runtime) = runtime(config.proxy.workers) else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(serve(config, cli.config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgmux: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(config: Arc<Config>, path: PathBuf) -> std::io::Result<()> {
    let proxy = &config.proxy;
    let group = proxy.unix_socket_group.as_deref();
    let listener = match &proxy.listen {
        Listen::Tcp(addr) => pgmux::server::bind(*addr, proxy.so_reuseport)?.into(),
        Listen::Unix(path) => pgmux::server::bind_unix(path, proxy.unix_socket_mode, group)?,
    };
    tracing::info!(listen = %proxy.listen, so_reuseport = proxy.so_reuseport, "pgmux listening");
    let unix_socket = match &proxy.unix_socket_dir {
        Some(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", proxy.listen.port()));
            let l = pgmux::server::bind_unix(&path, proxy.unix_socket_mode, group)?;
            tracing::info!(listen = %path.display(), "unix_socket_dir: listening");
            Some(l)
        }
        None => None,
    };
    // This instance's own address: never shared, so a peer's forwarded
    // cancel or an operator's console session reaches this very process.
    let peer = match proxy.peer_listen {
        Some(addr) => {
            let l = pgmux::server::bind(addr, false)?;
            tracing::info!(listen = %l.local_addr()?, peer_id = proxy.peer_id, "peer_listen: this instance's own address");
            Some(l)
        }
        None => None,
    };
    let metrics = match proxy.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(listen = %l.local_addr()?, "metrics listening");
            Some(l)
        }
        None => None,
    };
    // SIGHUP and the admin console's RELOAD re-read this file.
    let options = pgmux::server::Options { config_path: Some(path), metrics, peer, unix_socket };
    pgmux::server::run(config, listener, pgmux::server::shutdown_signal(), options).await
}
