//! `--broker` and `--backend`: where every `celerity` verb connects ([`ConnectionArgs`], flattened
//! into the top level of the command; flags win over the environment).

use std::sync::Arc;

use clap::Args;

use celerity_broker::{connect_backend, BrokerError, ResultBackend};
use celerity_client::default_backend_url;

/// Where to connect (flags win over the environment).
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Broker URL: memory://, redis://host:6379/0, rediss://…, amqp://user:pass@host:5672//, amqps://…
    #[arg(
        long,
        global = true,
        env = "CELERITY_BROKER_URL",
        default_value = "memory://"
    )]
    pub broker: String,
    /// Result backend URL (redis:// or memory://). Defaults to the broker when it is Redis.
    #[arg(long, global = true, env = "CELERITY_RESULT_BACKEND")]
    pub backend: Option<String>,
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
            Some(url) => Ok(Some(connect_backend(&url).await?)),
            None => Ok(None),
        }
    }
}
