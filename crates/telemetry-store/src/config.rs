//! The database settings of a service that writes (the audit service, the rollup, the alerter),
//! flattened into each one's configuration as `telemetry_kafka::KafkaConfig` is.

use crate::{is_sqlite_url, open_migrated, DynStore, Result, Store, DEFAULT_MYSQL_URL};

/// Where a writing service finds its database, and with which accounts.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseConfig {
    /// MySQL/MariaDB URL of the telemetry database with the writer's account (SELECT, INSERT,
    /// UPDATE, DELETE); `sqlite://<file>` for the embedded SQLite store of `telemetry up`.
    /// Default: the development writer account of `scripts/services.sh`.
    #[arg(
        long,
        env = "TELEMETRY_MYSQL_URL",
        hide_env_values = true,
        default_value = DEFAULT_MYSQL_URL,
        hide_default_value = true
    )]
    pub mysql_url: String,

    /// MySQL/MariaDB URL of the telemetry database with the owner's account (DDL on that
    /// database): the schema is migrated with it at start-up, then the service works with
    /// `--mysql-url`'s account (DML alone). Without it, a schema that is behind is migrated with
    /// `--mysql-url`'s account if that may, or the service stops and asks for `telemetry migrate`.
    #[arg(long, env = "TELEMETRY_MYSQL_OWNER_URL", hide_env_values = true)]
    pub mysql_owner_url: Option<String>,

    /// Database connections in the pool. Default: 4 for the audit service, 2 for the rollup and
    /// the alerter.
    #[arg(long, env = "TELEMETRY_MYSQL_MAX_CONNECTIONS")]
    pub mysql_max_connections: Option<u32>,
}

impl DatabaseConfig {
    /// Opens the store for writing: migrated first with the owner's account when one is given,
    /// then opened (and migrated if it may) with the writer's, `connections` in the pool unless
    /// `--mysql-max-connections` says otherwise. Retried while MySQL is unreachable; `None` when
    /// `shutdown` came first.
    pub async fn open_writer(
        &self,
        connections: u32,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<DynStore>> {
        // The owner's account is MySQL's: a SQLite store (`telemetry up`'s) migrates itself, and
        // an owner URL left in the environment must not send it to another database.
        if let Some(owner_url) = self
            .mysql_owner_url
            .as_deref()
            .filter(|url| !url.is_empty() && !is_sqlite_url(url) && !is_sqlite_url(&self.mysql_url))
        {
            if !Store::migrate_as_owner(owner_url, shutdown).await? {
                return Ok(None);
            }
        }
        let connections = self.mysql_max_connections.unwrap_or(connections);
        open_migrated(&self.mysql_url, connections, shutdown).await
    }
}
