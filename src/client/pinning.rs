//! Refusing a statement that creates session state (`on_session_state =
//! "error"`): what the client is sent instead. Detection is in
//! [`crate::sql::session_state`].

pub use crate::sql::session_state::session_state;
pub use crate::vocab::reasons::PinReason;

fn refusal_message(reason: PinReason) -> String {
    format!("{} is not supported in transaction pooling mode (on_session_state = \"error\")", reason.statement())
}

/// A statement that raises the refusal with SQLSTATE 0A000 when run, put in
/// place of a refused simple Query so the error arrives where the client
/// expects it and the server's transaction state matches what it is told.
pub fn refusal_sql(reason: PinReason) -> String {
    format!(
        "DO $pgmux$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = '{}'; END$pgmux$",
        refusal_message(reason)
    )
}

/// The Parse-time refusal for the extended protocol: a literal that fails its
/// cast while the statement is parsed (SQLSTATE 22P02, the refusal quoted in
/// the message). A DO block would only fail at Execute, after the client had
/// been told the statement takes no parameters.
pub fn refusal_parse_sql(reason: PinReason) -> String {
    format!("SELECT 'pgmux: {}'::pg_catalog.int4", refusal_message(reason))
}
