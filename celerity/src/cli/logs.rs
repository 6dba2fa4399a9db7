//! `--log-format` and `-l/--loglevel`: how every `celerity` verb logs ([`LogArgs`], flattened into
//! the top level of the command and global, so they may also follow the verb, as Celery's
//! `celery worker -l INFO`). The logger itself is `crate::logging`'s.

use clap::Args;

use crate::logging::{LogFormat, LogLevel, LOG_FORMAT_ENV};

/// Log format and level.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log lines as `text` (colour only on a terminal, never with NO_COLOR) or `json` (one object
    /// per line: timestamp, level, target, message, task_id and task_name where known)
    #[arg(long, global = true, env = LOG_FORMAT_ENV, value_name = "text|json")]
    pub log_format: Option<LogFormat>,
    /// Log level, as Celery spells it: debug, info, warning, error, critical (wins over CELERITY_LOG)
    #[arg(short = 'l', long, global = true, value_name = "LEVEL")]
    pub loglevel: Option<LogLevel>,
}
