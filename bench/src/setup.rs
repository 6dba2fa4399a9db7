//! What one benchmark row runs on: which system, which broker, results or not, and the names (key
//! prefix, queue) that keep a run's state apart from everything else on the shared Redis/RabbitMQ.

/// The local Redis (db 0; a run's keys carry its own prefix).
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// The local PostgreSQL (trust auth), for the rows with results in PostgreSQL.
pub const POSTGRES_URL: &str = "db+postgresql://postgres@127.0.0.1:5432/postgres";
/// The local RabbitMQ.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Celery,
    Celerity,
}

/// The broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Redis,
    Amqp,
}

impl BrokerKind {
    pub fn label(self) -> &'static str {
        match self {
            BrokerKind::Redis => "Redis",
            BrokerKind::Amqp => "RabbitMQ",
        }
    }
}

/// How the worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Celery prefork -c 2; Celerity two worker processes under its supervisor.
    TwoProcesses,
    /// Celery threads -c 16; Celerity one process with many jobs at once.
    Io,
    /// Celerity only: [`Pool::TwoProcesses`] with `--metrics-addr 127.0.0.1:0` (the metrics A/B).
    TwoProcessesWithMetrics,
    /// Celerity only: `celerity worker` with no pool flags at all (what a user gets untuned).
    Default,
}

/// One broker + backend combination, with this run's names.
#[derive(Debug, Clone)]
pub struct Setup {
    pub broker: BrokerKind,
    pub results: bool,
    /// Redis key prefix of this run (kombu's `global_keyprefix`), e.g. `bench-1a2b…:`.
    pub prefix: String,
    /// Results in this PostgreSQL schema (Celery's database backend) instead of Redis.
    pub pg_schema: Option<String>,
}

impl Setup {
    pub fn label(&self) -> String {
        format!(
            "{} / {}",
            self.broker.label(),
            match (self.results, &self.pg_schema) {
                (false, _) => "none",
                (true, None) => "Redis",
                (true, Some(_)) => "PostgreSQL",
            }
        )
    }

    /// The broker URL as Celerity takes it (the prefix as a URL option on Redis).
    pub fn celerity_broker_url(&self) -> String {
        match self.broker {
            BrokerKind::Redis => self.prefixed_redis(),
            BrokerKind::Amqp => AMQP_URL.to_owned(),
        }
    }

    /// The broker URL as Celery takes it (the prefix goes in transport options).
    pub fn celery_broker_url(&self) -> &'static str {
        match self.broker {
            BrokerKind::Redis => REDIS_URL,
            BrokerKind::Amqp => AMQP_URL,
        }
    }

    /// Celerity's result backend URL, if results are stored.
    pub fn backend_url(&self) -> Option<String> {
        match &self.pg_schema {
            Some(schema) if self.results => Some(format!("{POSTGRES_URL}?schema={schema}")),
            _ => self.results.then(|| self.prefixed_redis()),
        }
    }

    /// Celery's result backend URL (`""`: none) and the schema of its tables, if in PostgreSQL.
    pub fn celery_backend(&self) -> (&'static str, &str) {
        match (&self.pg_schema, self.results) {
            (_, false) => ("", ""),
            (None, true) => (REDIS_URL, ""),
            (Some(schema), true) => (POSTGRES_URL, schema),
        }
    }

    fn prefixed_redis(&self) -> String {
        format!("{REDIS_URL}?global_keyprefix={}", self.prefix)
    }
}
