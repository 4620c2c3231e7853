//! One task per client connection: startup, authentication, then the loop
//! that takes a backend for each transaction and gives it back.

mod auth_query;
mod cancel;
mod local;
mod login;
mod lost;
pub mod params;
pub mod pinning;
pub mod relay;
mod request;
mod route;
mod session;
pub mod statements;
mod transaction;

#[cfg(test)]
mod fuzz_tests;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{PoolMode, TlsMode};
use crate::live::Shared;
use crate::live::cancel::CancelKey;
use crate::live::registry::{ClientInfo, SHUTTING_DOWN, Signal, TERMINATED_BY_ADMIN};
use crate::live::slots::ClientSlot;
use crate::net::Stream;
use crate::pool::inner::CloseReason;
use crate::pool::{Backend, Pool, Release};
use crate::protocol::backend::{self as msg, Severity};
use crate::protocol::frame::{FrameError, Header, MAX_MESSAGE_LEN, Scanner};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::{self, StartupError, StartupPacket};
use crate::protocol::tag;
use crate::routing::monitor::{MonitorLogin, NodeState};
use crate::routing::route::{Candidate, Intent, Policy, Position, Route, RouteReason, Sticky, Target};
use crate::settings::Settings;
use crate::sql::WriteFunctions;
use local::{prepare_locally, reject_request};
use login::establish;
use params::SessionParams;
use relay::{Link, Lost, Outcome, RelayOptions, StatementScope};
use request::{Request, Unit, poll_first_read, read_unit};
use route::SessionRouting;
use session::run_session;
use statements::ClientStatements;
use transaction::{Ended, transaction};

/// A connection just accepted, and the client id it is given.
pub struct Accepted {
    pub stream: Stream,
    pub id: u64,
}

/// Time a client gets to finish startup and authentication.
const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Serves one accepted connection until it ends. Never panics on client input:
/// every failure becomes an ErrorResponse or a close.
///
/// A plain function returning an `async move` block rather than an `async
/// fn`: an `async fn` keeps each argument twice (as argument and as local)
/// for the life of the task, and this future is most of what an idle client
/// costs. The block keeps what it captures for as long as it lives, even
/// once moved out: so the connection comes boxed ([`Accepted`]), 8 bytes
/// kept instead of 56, and the task fits in 384 bytes instead of 512
/// (tokio rounds a task to 128; see docs/benchmarks.md). Log lines carry
/// `client = id` instead of a per-client span, which would cost an
/// allocation per client and an enter/exit per poll.
#[allow(clippy::manual_async_fn)] // deliberate: see above
pub fn serve(accepted: Box<Accepted>, slot: ClientSlot) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let shared = slot.shared();
        // Listed in the live registry (SHOW CLIENTS, KILL_CLIENT, drain) while the connection lives.
        let (peer, local) = (accepted.stream.peer_addr(), accepted.stream.local_addr());
        let info = shared.clients.register(&shared.stats, accepted.id, peer, local);
        // Boxed: startup, TLS, authentication and greeting state is large and
        // short-lived; it is freed before the session starts instead of sizing the task.
        let session = match Box::pin(establish(accepted, shared, &info)).await {
            // Moved into the session future within this arm: nothing of it
            // is kept beside that future across its await.
            Ok(Some(established)) => run_session(established, shared, &info),
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(client = info.id, error = %e, "client connection ended with an I/O error");
                return;
            }
        };
        if let Err(e) = session.await {
            tracing::debug!(client = info.id, error = %e, "client connection ended with an I/O error");
        }
        tracing::info!(client = info.id, "client disconnected");
    }
}

pub(crate) use crate::net::fatal;

use crate::net::RarePath;

/// What login produced: enough to run the session.
struct Session {
    /// The primary's pool.
    pool: Arc<Pool>,
    /// The next request goes to the primary, and why: a replica refused it
    /// as a write, or stopped answering before anything reached the client.
    force_primary: Option<RouteReason>,
    /// The server was lost mid-transaction: what the client's next requests
    /// are answered with until it ends its (aborted) transaction block.
    /// Boxed: rare, and every idle client carries the field.
    lost: Option<Box<lost::LostState>>,
    /// Backends in a row that failed before this client's request was sent.
    retries: u8,
    /// Read/write splitting, when the database has replicas (boxed: most sessions have none).
    routing: Option<Box<SessionRouting>>,
    statements: ClientStatements,
    params: SessionParams,
    mode: PoolMode,
    /// This client's place under the client caps, for as long as it is connected.
    _counted: crate::live::client_caps::Counted,
}

/// What every idle client carries, against the allocator's size classes
/// (mimalloc: …, 128, 160, …, 256, 320, …): a field more moves a class up
/// and costs every idle client the difference (docs/benchmarks.md).
#[cfg(test)]
#[test]
fn idle_client_structures_fit_their_size_classes() {
    assert!(std::mem::size_of::<Session>() <= 128, "Session: {} bytes", std::mem::size_of::<Session>());
    // With the Arc's two counts: one 192-byte block.
    let info = std::mem::size_of::<crate::live::registry::ClientInfo>();
    assert!(info + 16 <= 192, "ClientInfo: {info} bytes");
}

/// An idle client's task: tokio rounds a task to 128 bytes, with 104 of
/// its own, so a future of at most 280 bytes takes 384 rather than 512.
#[cfg(test)]
#[tokio::test]
async fn idle_client_task_fits_in_384_bytes() {
    let config = crate::settings::Settings::build(crate::config::Config::default()).unwrap();
    let shared = Arc::new(crate::live::Shared::new(Arc::new(config), Arc::new(crate::pool::Pools::default()), None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let accepted = Box::new(Accepted { stream: Stream::Plain(tcp), id: 1 });
    let task = serve(accepted, shared.take_slot().unwrap());
    assert!(std::mem::size_of_val(&task) <= 280, "client task future: {} bytes", std::mem::size_of_val(&task));
}
