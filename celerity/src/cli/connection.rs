//! `--broker` and `--backend`: where every `celerity` verb connects ([`ConnectionArgs`], flattened
//! into the top level of the command; flags win over the environment).

use std::sync::Arc;

use clap::Args;

use celerity_broker::url::redact;
use celerity_broker::{connect_backend_for, BrokerError, ResultBackend};
use celerity_client::default_backend_url;

/// The environment variable that gives the broker URL when `--broker` does not.
pub const BROKER_ENV: &str = "CELERITY_BROKER_URL";
/// The environment variable that gives the result backend URL when `--backend` does not.
pub const BACKEND_ENV: &str = "CELERITY_RESULT_BACKEND";

/// Where to connect (flags win over the environment). The URLs may hold passwords: `--help` names
/// the variables but never shows their values (`hide_env_values`), and `Debug` shows them redacted.
#[derive(Clone, Args)]
pub struct ConnectionArgs {
    /// Broker URL: memory://, redis://host:6379/0, rediss://…, amqp://user:pass@host:5672//, amqps://…
    #[arg(
        long,
        global = true,
        env = BROKER_ENV,
        hide_env_values = true,
        default_value = "memory://"
    )]
    pub broker: String,
    /// Result backend URL (redis://, db+postgresql:// or memory://). Defaults to the broker when it is Redis.
    #[arg(long, global = true, env = BACKEND_ENV, hide_env_values = true)]
    pub backend: Option<String>,
}

impl std::fmt::Debug for ConnectionArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionArgs")
            .field("broker", &redact(&self.broker))
            .field("backend", &self.backend.as_deref().map(redact))
            .finish()
    }
}

impl ConnectionArgs {
    /// The result backend a worker stores into: `--backend`, else what the broker implies (the
    /// client's rule); `--backend none` stores no results.
    pub(crate) async fn worker_backend(
        &self,
    ) -> Result<Option<Arc<dyn ResultBackend>>, BrokerError> {
        match self
            .backend
            .clone()
            .or_else(|| default_backend_url(&self.broker))
        {
            Some(url) if url == "none" => Ok(None),
            Some(url) => Ok(Some(connect_backend_for(&url, Some(&self.broker)).await?)),
            None => Ok(None),
        }
    }
}
