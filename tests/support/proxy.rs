//! pgmux itself, run in-process on `127.0.0.1:0` in front of the shared cluster.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pgmux::cluster::Cluster;
use pgmux::config::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{APP, CLEAR, DB, MD5, TRUST};

/// A running pgmux; shut it down with [`Proxy::shutdown`] (dropping it also stops it).
pub struct Proxy {
    pub addr: SocketAddr,
    /// Where `/metrics` answers, when started with [`Proxy::start_with_metrics`].
    pub metrics: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    /// The proxy thread's result, once `server::run` returns.
    finished: Option<oneshot::Receiver<std::io::Result<()>>>,
}

/// A proxy.toml for the standard cluster: database `app` on the primary with
/// `pool_size`, the standard users with their passwords, plus `proxy_extra`
/// lines appended to `[proxy]`.
pub fn standard_config(cluster: &Cluster, pool_size: usize, proxy_extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
{proxy_extra}

[[databases]]
name = "{DB}"
primary = "{primary}"
pool_size = {pool_size}

[[databases]]
name = "postgres"
primary = "{primary}"
pool_size = {pool_size}

[[users]]
name = "{app}"
password = "{app_pw}"

[[users]]
name = "{md5}"
password = "{md5_pw}"
auth = "md5"

[[users]]
name = "{clear}"
password = "{clear_pw}"

[[users]]
name = "{trust}"
auth = "trust"

[[users]]
name = "postgres"
auth = "trust"
"#,
        primary = cluster.primary().host_port(),
        app = APP.0,
        app_pw = APP.1,
        md5 = MD5.0,
        md5_pw = MD5.1,
        clear = CLEAR.0,
        clear_pw = CLEAR.1,
        trust = TRUST,
    )
}

/// [`standard_config`] plus `[admin] users = ["postgres"]`: the trust
/// superuser may open the admin console (database `pgmux`).
pub fn admin_config(cluster: &Cluster, pool_size: usize, proxy_extra: &str) -> String {
    standard_config(cluster, pool_size, proxy_extra) + "\n[admin]\nusers = [\"postgres\"]\n"
}

impl Proxy {
    /// How much a process-wide `count` grows per `SELECT 1` of one client
    /// through this proxy, over `requests` of them, after `warm_up` more
    /// (login, the server connection, whatever state the count depends on).
    pub async fn count_per_select_1(&self, warm_up: usize, requests: usize, count: impl Fn() -> u64) -> f64 {
        let c = self.connect(APP.0, Some(APP.1), DB).await.expect("client through pgmux");
        for _ in 0..warm_up {
            c.simple_query("SELECT 1").await.unwrap();
        }
        let before = count();
        for _ in 0..requests {
            c.simple_query("SELECT 1").await.unwrap();
        }
        (count() - before) as f64 / requests as f64
    }

    /// Starts pgmux with `toml` on a fresh loopback port.
    pub async fn start(toml: &str) -> Proxy {
        Proxy::launch(toml, false, None).await
    }

    /// Like [`Proxy::start`], with `/metrics` on another fresh loopback port.
    pub async fn start_with_metrics(toml: &str) -> Proxy {
        Proxy::launch(toml, true, None).await
    }

    /// Starts pgmux from the config file at `path` (its `listen` is ignored:
    /// a fresh loopback port is used), so that the admin console's RELOAD and
    /// SIGHUP re-read it. `/metrics` is on another fresh port.
    pub async fn start_file(path: &Path) -> Proxy {
        let toml = std::fs::read_to_string(path).expect("read the test config file");
        Proxy::launch(&toml, true, Some(path)).await
    }

    /// Runs the proxy on a runtime of its own, on its own thread, built as
    /// the binary builds it (`[proxy] workers`, one thread by default): the
    /// suite exercises the runtime pgmux ships with, not the test's.
    async fn launch(toml: &str, with_metrics: bool, path: Option<&Path>) -> Proxy {
        let origin = path.map_or("test.toml".to_owned(), |p| p.display().to_string());
        let mut config = Config::parse(toml, &origin).unwrap_or_else(|e| panic!("test config is invalid: {e}"));
        // PGMUX_TEST_IO=uring runs a whole test binary on the io_uring data path.
        match std::env::var("PGMUX_TEST_IO").as_deref() {
            Ok("uring") => config.proxy.io = pgmux::config::IoMode::Uring,
            Ok("epoll") => config.proxy.io = pgmux::config::IoMode::Epoll,
            _ => {}
        }
        // PGMUX_TEST_IDLE_POLL=100us runs it with polling before sleeping,
        // except where a test sets idle_poll itself.
        if let Ok(poll) = std::env::var("PGMUX_TEST_IDLE_POLL")
            && !toml.contains("idle_poll")
        {
            config.proxy.idle_poll = pgmux::config::parse_duration(&poll).expect("PGMUX_TEST_IDLE_POLL: a duration");
        }
        let bind = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
            l.set_nonblocking(true).expect("non-blocking listener");
            l
        };
        let listener = bind();
        let addr = listener.local_addr().expect("bound address");
        let metrics_listener = with_metrics.then(bind);
        let metrics = metrics_listener.as_ref().map(|l| l.local_addr().expect("bound address"));
        let (stop, stopped) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel::<std::io::Result<()>>();
        let config_path = path.map(Path::to_owned);
        let runtime = pgmux::server::runtime(config.proxy.workers).expect("proxy runtime");
        std::thread::spawn(move || {
            let result = runtime.block_on(async move {
                // Registered with this runtime's reactor, not the test's.
                let listener = TcpListener::from_std(listener)?;
                let metrics_listener = metrics_listener.map(TcpListener::from_std).transpose()?;
                let stopped = async {
                    let _ = stopped.await;
                };
                let options = pgmux::server::Options { config_path, metrics: metrics_listener, ..Default::default() };
                pgmux::server::run(Arc::new(config), listener, stopped, options).await
            });
            let _ = done.send(result);
        });
        Proxy { addr, metrics, stop: Some(stop), finished: Some(finished) }
    }

    /// The standard config with the given pool size and extra `[proxy]` lines.
    pub async fn standard(cluster: &Cluster, pool_size: usize, proxy_extra: &str) -> Proxy {
        Proxy::start(&standard_config(cluster, pool_size, proxy_extra)).await
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A libpq-style URL through pgmux.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port())
    }

    pub async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(self.port()).user(user).dbname(db).connect_timeout(Duration::from_secs(10));
        if let Some(p) = password {
            config.password(p);
        }
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// `app` on database `app`.
    pub async fn app(&self) -> tokio_postgres::Client {
        self.connect(APP.0, Some(APP.1), DB).await.expect("connect through pgmux as app")
    }

    /// Triggers the drain (as SIGINT would) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits for the server task to finish.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        self.wait_stopped().await;
    }

    /// Waits for a shutdown begun with [`Proxy::begin_shutdown`].
    pub async fn wait_stopped(&mut self) {
        if let Some(finished) = self.finished.take() {
            finished.await.expect("proxy thread panicked").expect("server::run failed");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}
