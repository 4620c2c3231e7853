//! The configuration as used: the parsed file plus what is built from it
//! once, the TLS contexts and a cache per user for the SCRAM verifier derived
//! from a plaintext password. [`Settings::build`] is the one place that
//! makes them, at start, on each reload and for `pgmux check`, so no caller
//! has to remember to fill a part in, and `config` stays a plain parse of
//! the file that imports nothing of the runtime.

use std::collections::HashMap;
use std::ops::Deref;

use crate::auth::DerivedVerifier;
use crate::config::Config;
use crate::tls::TlsContext;

#[derive(Debug)]
pub struct Settings {
    file: Config,
    pub tls: TlsContext,
    /// By user name. Fresh with every build: a reload that changes a
    /// password derives its verifier anew.
    verifiers: HashMap<String, DerivedVerifier>,
}

/// Settings are read as the file's values (`settings.proxy.pool_mode`);
/// the derived parts are named fields beside them.
impl Deref for Settings {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.file
    }
}

impl Settings {
    /// Loads the certificates and keys `[proxy]` names; the error says which
    /// file failed and why.
    pub fn build(file: Config) -> Result<Settings, String> {
        let tls = TlsContext::load(&file.proxy)?;
        let verifiers = file.users.iter().map(|u| (u.name.clone(), DerivedVerifier::default())).collect();
        Ok(Settings { file, tls, verifiers })
    }

    /// The parsed file these settings were built from.
    pub fn file(&self) -> &Config {
        &self.file
    }

    /// The verifier cache of `user` (a configured user; others get a cache
    /// of their own, used once).
    pub fn verifier(&self, user: &str) -> DerivedVerifier {
        self.verifiers.get(user).cloned().unwrap_or_default()
    }
}
