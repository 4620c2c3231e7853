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
use login::{establish, greet};
use params::SessionParams;
use relay::{Link, Lost, Outcome, RelayOptions, StatementScope};
use request::{Request, Unit, poll_first_read, read_unit};
use route::SessionRouting;
use session::run_session;
use statements::ClientStatements;
use transaction::{Ended, transaction};

/// Time a client gets to finish startup and authentication.
const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Serves one accepted connection until it ends. Never panics on client input:
/// every failure becomes an ErrorResponse or a close.
///
/// A plain function returning an `async move` block rather than an `async
/// fn`: an `async fn` keeps each argument twice (as argument and as local)
/// for the life of the task, and this future is most of what an idle client
/// costs. Log lines carry `client = id` instead of a per-client span, which
/// would cost an allocation per client and an enter/exit per poll.
#[allow(clippy::manual_async_fn)] // deliberate: see above
pub fn serve(stream: Stream, slot: ClientSlot, client_id: u64) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let shared = slot.shared();
        // Listed in the live registry (SHOW CLIENTS, KILL_CLIENT, drain) while the connection lives.
        let info = shared.clients.register(&shared.stats, client_id, stream.peer_addr(), stream.local_addr());
        // Boxed: startup, TLS and authentication state is large and short-lived;
        // it is freed before the session starts instead of sizing the task.
        let (mut stream, pending, session, config) = match Box::pin(establish(stream, shared, &info)).await {
            Ok(Some(established)) => established,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(client = client_id, error = %e, "client connection ended with an I/O error");
                return;
            }
        };
        let key = shared.cancels.issue(&info);
        let mut result = Box::pin(greet(&mut stream, &session, &key)).await;
        if result.is_ok() {
            result = run_session(&mut stream, pending, shared, &config, session, &info).await;
        }
        if let Err(e) = result {
            tracing::debug!(client = client_id, error = %e, "client connection ended with an I/O error");
        }
        tracing::info!(client = client_id, "client disconnected");
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
    server_params: crate::pool::ServerParams,
    params: SessionParams,
    mode: PoolMode,
    /// This client's place under the client caps, for as long as it is connected.
    _counted: crate::live::client_caps::Counted,
}
