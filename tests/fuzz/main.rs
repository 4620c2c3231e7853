//! Property-based fuzzing of everything pgmux parses from untrusted bytes,
//! through the public API (no database needed). Private parsers have their
//! own `fuzz_tests` modules next to them: src/sql (the SQL lexer),
//! src/admin (console commands, /metrics request line) and src/client
//! (statement-name rewrites); `cargo test --lib fuzz` runs those.
//!
//! The default run takes about 8 s in a debug build on two cores. For a long
//! run, PROPTEST_CASES overrides every property's case count:
//!
//!     PROPTEST_CASES=200000 cargo test --release --test fuzz
//!     PROPTEST_CASES=200000 cargo test --release --lib fuzz
//!
//! Measured on two cores: 200 s and 10 s, after a ~4 min LTO build; so
//! PROPTEST_CASES=N takes about N ms. Megabyte-sized cases run N/100 times.
//!
//! A failure prints the shrunk input; pin it as a plain `#[test]` next to the fix.

use std::time::Duration;

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;

use pgmux::auth::authenticate_client;
use pgmux::auth::scram::{ScramError, ScramServer, ScramVerifier};
use pgmux::auth::{BackendLoginError, login_backend};
use pgmux::client::relay::{Link, StatementScope};
use pgmux::client::statements::ClientStatements;
use pgmux::config::OnSessionState;
use pgmux::config::UserConfig;
use pgmux::config::{Config, ConfigError};
use pgmux::pool::statements::{PreparedSet, Registry};
use pgmux::protocol::backend as msg;
use pgmux::protocol::frame::{CAPTURE_LIMIT, FrameError, HEADER_LEN, Header, MAX_MESSAGE_LEN, Scanner, split_frame};
use pgmux::protocol::startup::{MAX_STARTUP_LEN, StartupError, StartupPacket, split_startup};
use pgmux::routing::intent_of;
use pgmux::routing::route::Intent;
use pgmux::sql::session_state::session_state;
use pgmux::sql::settings::settings_named_in;
use pgmux::sql::{Class, Classified, Hint, WriteFunctions, classify};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// `n` cases by default. The proptest! macro applies PROPTEST_CASES (and the
/// other PROPTEST_* variables) over any config, `with_cases` included.
fn cases(n: u32) -> ProptestConfig {
    // Regressions are pinned as plain #[test]s, not in files proptest writes.
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// Runs `test` over `strategy` as proptest! would, with `n` cases, or a
/// hundredth of PROPTEST_CASES when set: for properties whose cases are a
/// megabyte each, which would otherwise take most of a long run. (A
/// TestRunner built by hand, unlike the macro, keeps the case count given.)
fn run_heavy<S: Strategy>(n: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let long = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse::<u32>().ok());
    let mut runner = proptest::test_runner::TestRunner::new(cases(long.map_or(n, |c| (c / 100).max(n))));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}\n{runner}");
    }
}

/// A global allocator that reports, per thread, the largest single
/// allocation made while [`alloc_probe::measure`] runs: how the properties
/// check that a declared length does not turn into a reservation.
mod alloc_probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Probe;

    thread_local! {
        /// (measuring, largest allocation, number of allocations).
        static STATE: Cell<(bool, usize, usize)> = const { Cell::new((false, 0, 0)) };
    }

    fn note(size: usize) {
        // `try_with`: the slot is gone while the thread exits. A const-initialised
        // `Cell` of plain integers neither allocates nor registers a destructor.
        let _ = STATE.try_with(|s| {
            let (on, largest, count) = s.get();
            if on {
                s.set((true, largest.max(size), count + 1));
            }
        });
    }

    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Runs `f`; returns its result, the largest allocation it made and how many.
    pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
        STATE.with(|s| s.set((true, 0, 0)));
        let r = f();
        let (_, largest, count) = STATE.with(|s| s.replace((false, 0, 0)));
        (r, largest, count)
    }
}

#[global_allocator]
static ALLOC: alloc_probe::Probe = alloc_probe::Probe;

mod client;
mod config;
mod frames;
mod scram;
mod sql;

pub(crate) use frames::*;
pub(crate) use scram::*;
