//! SQLSTATE codes pgmux itself emits. Typed, so a code is never mistyped.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const READ_ONLY_TRANSACTION: SqlState = SqlState("25006");
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    pub const INVALID_CATALOG_NAME: SqlState = SqlState("3D000");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState("25P03");
    pub const IN_FAILED_SQL_TRANSACTION: SqlState = SqlState("25P02");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
    // What else Postgres may answer a login with (see `from_code`).
    pub const CONNECTION_EXCEPTION: SqlState = SqlState("08000");
    pub const CRASH_SHUTDOWN: SqlState = SqlState("57P02");
    pub const OPERATOR_INTERVENTION: SqlState = SqlState("57000");
    pub const INSUFFICIENT_RESOURCES: SqlState = SqlState("53000");
    pub const OUT_OF_MEMORY: SqlState = SqlState("53200");
    pub const CONFIGURATION_LIMIT_EXCEEDED: SqlState = SqlState("53400");
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
    pub const SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION: SqlState = SqlState("42000");
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    pub const DATA_EXCEPTION: SqlState = SqlState("22000");
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState("55000");
    /// RELOAD with an unreadable or invalid configuration file.
    pub const CONFIG_FILE_ERROR: SqlState = SqlState("F0000");
    /// Unknown admin console command.
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState("42P05");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");

    /// Every code above, for [`SqlState::from_code`].
    const KNOWN: &'static [SqlState] = &[
        Self::PROTOCOL_VIOLATION,
        Self::CONNECTION_FAILURE,
        Self::CANNOT_CONNECT_NOW,
        Self::ADMIN_SHUTDOWN,
        Self::QUERY_CANCELED,
        Self::INVALID_PASSWORD,
        Self::INVALID_AUTHORIZATION,
        Self::INVALID_CATALOG_NAME,
        Self::TOO_MANY_CONNECTIONS,
        Self::IDLE_IN_TRANSACTION_TIMEOUT,
        Self::IN_FAILED_SQL_TRANSACTION,
        Self::FEATURE_NOT_SUPPORTED,
        Self::INTERNAL_ERROR,
        Self::CONNECTION_EXCEPTION,
        Self::CRASH_SHUTDOWN,
        Self::OPERATOR_INTERVENTION,
        Self::INSUFFICIENT_RESOURCES,
        Self::OUT_OF_MEMORY,
        Self::CONFIGURATION_LIMIT_EXCEEDED,
        Self::INSUFFICIENT_PRIVILEGE,
        Self::SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION,
        Self::UNDEFINED_OBJECT,
        Self::INVALID_PARAMETER_VALUE,
        Self::DATA_EXCEPTION,
        Self::OBJECT_NOT_IN_PREREQUISITE_STATE,
        Self::CONFIG_FILE_ERROR,
        Self::SYNTAX_ERROR,
        Self::DUPLICATE_PREPARED_STATEMENT,
        Self::PROGRAM_LIMIT_EXCEEDED,
    ];

    /// Maps a code received from Postgres onto this typed set: the exact code
    /// when pgmux knows it, else its class's generic `xx000` code when known.
    /// `SqlState` holds only `&'static str`, so arbitrary server codes cannot
    /// be represented; callers that must forward a code verbatim keep the string.
    pub fn from_code(code: &str) -> Option<SqlState> {
        let exact = Self::KNOWN.iter().find(|s| s.0 == code);
        let class = || {
            let class = code.get(..2)?;
            Self::KNOWN.iter().find(|s| s.0.starts_with(class) && s.0.ends_with("000"))
        };
        exact.or_else(class).copied()
    }

    pub fn code(&self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::SqlState;

    #[test]
    fn from_code_exact_then_class() {
        assert_eq!(SqlState::from_code("28P01"), Some(SqlState::INVALID_PASSWORD));
        assert_eq!(SqlState::from_code("3D000"), Some(SqlState::INVALID_CATALOG_NAME));
        // 28xxx unknown to pgmux: its class, invalid authorization specification.
        assert_eq!(SqlState::from_code("28ZZZ"), Some(SqlState::INVALID_AUTHORIZATION));
        assert_eq!(SqlState::from_code("P0001"), None);
        assert_eq!(SqlState::from_code(""), None);
    }
}
