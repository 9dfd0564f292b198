//! The telemetry store: the MySQL/MariaDB schema (versioned migrations) and the queries the
//! services run against it. The one place SQL lives.
//!
//! # Layout
//! - `migrations/`: versioned schema, applied by [`Store::migrate`] at start-up.
//! - [`Store`]: a connection pool with the queries.

use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{MySql, MySqlPool, QueryBuilder};
use telemetry_core::event::CleanedRecord;

/// The schema migrations, embedded in the binary.
static MIGRATOR: Migrator = sqlx::migrate!();

/// Rows per INSERT statement: well under MySQL's 65,535 placeholders per statement.
const ROWS_PER_STATEMENT: usize = 1_000;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database URL could not be parsed.
    #[error("database URL is not valid: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// A query or connection failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A timestamp does not fit SQL's DATETIME; validation rules out such events.
    #[error("timestamp {0} ms is out of the DATETIME range")]
    TimestampOutOfRange(i64),
}

impl Error {
    /// Whether the database refused the data itself (a value out of a column's range, a failed
    /// constraint, ...), so that retrying the same rows cannot succeed. Connection losses,
    /// timeouts and deadlocks are not: those are retried.
    pub fn is_data_error(&self) -> bool {
        match self {
            Error::TimestampOutOfRange(_) => true,
            Error::Database(sqlx::Error::Encode(_)) => true,
            Error::Database(sqlx::Error::Database(error)) => {
                // SQLSTATE class 22: data exception; 23: integrity constraint violation.
                error
                    .code()
                    .is_some_and(|state| state.starts_with("22") || state.starts_with("23"))
            }
            _ => false,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A pool of connections to the telemetry database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: MySqlPool,
}

impl Store {
    /// Connects to `url` (`mysql://user:password@host:port/database`), creating the database when
    /// it does not exist. Sessions run in UTC.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let options: MySqlConnectOptions = url.parse().map_err(Error::InvalidUrl)?;
        if !MySql::database_exists(url).await? {
            match MySql::create_database(url).await {
                Ok(()) => tracing::info!("Created the telemetry database."),
                // Another instance starting at the same moment created it first.
                Err(_) if MySql::database_exists(url).await? => {}
                Err(error) => return Err(error.into()),
            }
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.timezone(Some(String::from("+00:00"))))
            .await?;
        Ok(Store { pool })
    }

    /// Applies the migrations that have not been applied yet.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The underlying pool, for callers that need a query this crate does not offer yet.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Inserts the events in one transaction. Idempotent: an event whose identity
    /// (device_id, device_ts, seq) is already stored is skipped, so redelivery adds no row.
    pub async fn insert_events(&self, records: &[CleanedRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let rows = records.iter().map(Row::new).collect::<Result<Vec<_>>>()?;
        let mut transaction = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut insert = QueryBuilder::<MySql>::new(
                "INSERT INTO telemetry (device_id, device_ts, seq, received_at, metrics, \
                 schema_version, attributes, quality, \
                 source_topic, source_partition, source_offset) ",
            );
            insert.push_values(chunk, |mut values, row| {
                values
                    .push_bind(&row.record.event.device_id)
                    .push_bind(row.device_ts)
                    .push_bind(row.record.event.seq)
                    .push_bind(row.received_at)
                    .push_bind(&row.metrics)
                    .push_bind(row.record.event.schema_version)
                    .push_bind(&row.attributes)
                    .push_bind(&row.quality)
                    .push_bind(&row.record.source.topic)
                    .push_bind(row.record.source.partition)
                    .push_bind(row.record.source.offset);
            });
            insert.push(" ON DUPLICATE KEY UPDATE id = id");
            // Statements differ by row count; caching each prepared variant would only churn.
            insert
                .build()
                .persistent(false)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }
}

/// One record with its values converted for binding.
struct Row<'a> {
    record: &'a CleanedRecord,
    device_ts: chrono::NaiveDateTime,
    received_at: chrono::NaiveDateTime,
    metrics: String,
    attributes: Option<String>,
    quality: Option<String>,
}

impl<'a> Row<'a> {
    fn new(record: &'a CleanedRecord) -> Result<Self> {
        Ok(Row {
            record,
            device_ts: utc_datetime(record.event.device_ts)?,
            received_at: utc_datetime(record.event.received_at)?,
            metrics: json(&record.event.metrics)?,
            attributes: (!record.event.attributes.is_empty())
                .then(|| json(&record.event.attributes))
                .transpose()?,
            quality: (!record.event.quality.is_clean())
                .then(|| json(&record.event.quality))
                .transpose()?,
        })
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|error| Error::Database(sqlx::Error::Encode(Box::new(error))))
}

fn utc_datetime(millis: i64) -> Result<chrono::NaiveDateTime> {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|time| time.naive_utc())
        .ok_or(Error::TimestampOutOfRange(millis))
}
