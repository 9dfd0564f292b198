//! The telemetry store: the MySQL/MariaDB schema (versioned migrations) and the queries the
//! services run against it. The one place SQL lives.
//!
//! # Layout
//! - `migrations/mysql/`: the MySQL schema's versions (sqlx), applied by [`Store::migrate`].
//! - `migrations/sqlite/`: the SQLite store's, applied when it opens (by `user_version`).
//! - [`Store`]: a connection pool; the audit service's writes are here.
//! - `dead_letters`: the bounded index of rejected records (written by the audit service).
//! - `queries`: what the API reads: devices and their health counts, downsampled series, the DLQ.
//! - `rollups`: the minute and hour aggregates `telemetry rollup` writes and the API reads.
//! - `alerts`: the alerter's states and outbox.

mod alerts;
mod backend;
mod config;
mod dead_letters;
pub(crate) mod literal;
mod queries;
mod rollups;
mod sqlite;

pub use alerts::{AlertEntry, AlertOffset, AlertStateRow, NewAlert, OutboxEntry};
pub use backend::{
    is_sqlite_url, open_bounded_reader, open_migrated, open_now, open_reader, DynStore,
    TelemetryStore,
};
pub use config::DatabaseConfig;
pub use dead_letters::{
    DeadLetterReplay, DlqPosition, NewDeadLetter, ReplayLock, MAX_INDEXED_PAYLOAD_BYTES,
};
pub use queries::{
    Bucket, DeadLetterEntry, DeadLetterFilter, DevicePage, DeviceSummary, SeriesQuery,
};
pub use rollups::{
    Aggregate, Resolution, RollupCoverage, RollupOutcome, RollupRow, MAX_METRIC_NAME_CHARS,
};
pub use sqlite::{
    schema_version as sqlite_schema_version, SqliteStore, MIGRATIONS as SQLITE_MIGRATIONS,
};

use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{MySql, MySqlPool, QueryBuilder};
use telemetry_core::event::CleanedRecord;

/// The MySQL schema migrations (`migrations/mysql`), embedded in the binary.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/mysql");

/// The database the writers (audit, rollup, alert, DLQ replay) use unless told otherwise: the
/// development writer account of `scripts/services.sh` (SELECT, INSERT, UPDATE, DELETE on the
/// `telemetry` database).
pub const DEFAULT_MYSQL_URL: &str = "mysql://telemetry:telemetry@127.0.0.1:3306/telemetry";

/// The database the API reads unless told otherwise: the development reader account of
/// `scripts/services.sh` (SELECT on the `telemetry` database).
pub const DEFAULT_READER_URL: &str =
    "mysql://telemetry_reader:telemetry-reader@127.0.0.1:3306/telemetry";

/// The database `telemetry migrate` changes unless told otherwise: the development owner account
/// of `scripts/services.sh` (every privilege on the `telemetry` database, none elsewhere).
pub const DEFAULT_OWNER_URL: &str =
    "mysql://telemetry_owner:telemetry-owner@127.0.0.1:3306/telemetry";

/// The columns an event's row is written with, in the order both write paths give the values
/// (bound, `insert_rows`; literals, `push_insert_values`).
const EVENT_COLUMNS: &str = "(device_id, device_ts, seq, seq_key, received_at, metrics, \
     schema_version, attributes, quality, source_topic, source_partition, source_offset)";

/// Rows per INSERT statement: well under MySQL's 65,535 placeholders per statement.
const ROWS_PER_STATEMENT: usize = 1_000;

/// The longest transaction sent as one text query: literals spell values out (hexadecimal doubles
/// bytes), and a server refuses a packet over its `max_allowed_packet` (4 MiB on MySQL 5.7, 16 MiB
/// on MariaDB) by closing the connection. Longer ones go with bound values.
const TEXT_TRANSACTION_BYTES: usize = 1024 * 1024;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The schema is behind this binary's migrations and this account may not change it.
    #[error("the database schema is not up to date and this account may not migrate it ({0}); run `telemetry migrate` with the owner's account (TELEMETRY_MYSQL_OWNER_URL), or give the service TELEMETRY_MYSQL_OWNER_URL")]
    NeedsMigration(String),
    /// The account may not do what the service needs (a privilege, or the database, is missing).
    #[error(
        "the database refused this account: {0}; see docs/operations.md, \"Database accounts\""
    )]
    AccessDenied(#[source] sqlx::Error),
    /// The database URL could not be parsed.
    #[error("database URL is not valid: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// A query or connection failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Another process holds a lock this operation needs.
    #[error("{0}")]
    Busy(&'static str),
    /// A table that is not a copy of `telemetry`.
    #[error("table `{0}` is not a copy of `telemetry` (its columns differ); give a new name or a table made by `telemetry replay --into`")]
    NotLikeLive(String),
    /// A table name that is not a plain identifier.
    #[error("`{0}` is not a usable table name: use ASCII letters, digits and `_`, starting with a letter, at most 64 characters, and not one of the service's own tables")]
    InvalidTableName(String),
    /// A timestamp does not fit SQL's DATETIME; validation rules out such events.
    #[error("timestamp {0} ms is out of the DATETIME range")]
    TimestampOutOfRange(i64),
    /// The SQLite store failed (opening, a query, a connection).
    #[error("SQLite: {0}")]
    Sqlite(String),
    /// SQLite refused the data itself (a constraint).
    #[error("SQLite refused the data: {0}")]
    SqliteData(String),
    /// A query ran longer than the store's statement timeout and was stopped (the SQLite store's
    /// own bound; MySQL/MariaDB report theirs as a [`Error::Database`] error, see
    /// [`Error::is_statement_timeout`]).
    #[error("the query ran longer than the statement timeout of {} ms and was stopped", .0.as_millis())]
    StatementTimeout(Duration),
}

impl Error {
    /// A privilege refusal, as [`Error::AccessDenied`]; any other error as it is.
    fn refused_as_access_denied(self) -> Self {
        match self {
            Error::Database(error) if is_privilege_refusal(&error) => Error::AccessDenied(error),
            Error::Migrate(sqlx::migrate::MigrateError::Execute(error))
                if is_privilege_refusal(&error) =>
            {
                Error::AccessDenied(error)
            }
            error => error,
        }
    }

    /// Errors of connecting that waiting cannot mend: a URL that does not parse, an account
    /// refused what it needs, a schema it may not migrate.
    fn is_permanent_for_connecting(&self) -> bool {
        matches!(
            self,
            Error::InvalidUrl(_) | Error::AccessDenied(_) | Error::NeedsMigration(_)
        )
    }

    /// Whether the database refused the data itself (a value out of a column's range, a failed
    /// constraint, ...), so that retrying the same rows cannot succeed. Connection losses,
    /// timeouts and deadlocks are not: those are retried.
    pub fn is_data_error(&self) -> bool {
        match self {
            Error::TimestampOutOfRange(_) | Error::SqliteData(_) => true,
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

    /// Whether the query was stopped by the statement timeout of a reader (see
    /// [`Store::connect_reader`], [`SqliteStore::with_statement_timeout`]): MariaDB's
    /// `max_statement_time` (error 1969), MySQL's `max_execution_time` (error 3024), or the SQLite
    /// store's own bound.
    pub fn is_statement_timeout(&self) -> bool {
        match self {
            Error::StatementTimeout(_) => true,
            Error::Database(error) => error
                .as_database_error()
                .and_then(|error| error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
                .is_some_and(|error| {
                    matches!(
                        error.number(),
                        MARIADB_STATEMENT_TIMEOUT | MYSQL_QUERY_TIMEOUT
                    )
                }),
            _ => false,
        }
    }
}

/// Runs `attempt`, retrying with backoff (`what` names it in the log) while it fails with an
/// error waiting may mend (the database unreachable); an error it cannot mend
/// ([`Error::is_permanent_for_connecting`]) is returned at once. `None` when `shutdown` came first.
async fn retry_unless_permanent<T, F, Fut>(
    what: &str,
    shutdown: &tokio_util::sync::CancellationToken,
    attempt: F,
) -> Result<Option<T>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    // Ok(Err(..)): an error retrying cannot mend, taken out of the retry loop.
    let sorted = || async {
        match attempt().await {
            Ok(value) => Ok(Ok(value)),
            Err(error) if error.is_permanent_for_connecting() => Ok(Err(error)),
            Err(error) => Err(error),
        }
    };
    match sorted().await {
        Ok(outcome) => outcome.map(Some),
        Err(error) => {
            tracing::warn!(%error, "The database is not reachable yet; retrying.");
            telemetry_retry::retry(what, shutdown, sorted)
                .await
                .transpose()
        }
    }
}

/// Whether a MySQL/MariaDB error is a refusal of the account's privileges: ER_DBACCESS_DENIED
/// (1044), ER_TABLEACCESS_DENIED (1142), ER_COLUMNACCESS_DENIED (1143), ER_SPECIFIC_ACCESS_DENIED
/// (1227). A wrong password (1045) is not: it may be a password being changed, and is retried.
fn is_privilege_refusal(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|error| error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|error| matches!(error.number(), 1044 | 1142 | 1143 | 1227))
}

/// MariaDB's ER_STATEMENT_TIMEOUT: "Query execution was interrupted (max_statement_time exceeded)".
const MARIADB_STATEMENT_TIMEOUT: u16 = 1969;
/// MySQL's ER_QUERY_TIMEOUT: "maximum statement execution time exceeded".
const MYSQL_QUERY_TIMEOUT: u16 = 3024;
/// MySQL/MariaDB's ER_UNKNOWN_SYSTEM_VARIABLE.
const UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;

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
            .after_connect(|connection, _| {
                Box::pin(async move {
                    // Counting only new rows relies on the gap locks of REPEATABLE READ (the
                    // default, set here in case the server's is READ COMMITTED): no other writer
                    // can slip a row in between reading which rows are stored and inserting.
                    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        .execute(connection)
                        .await?;
                    Ok(())
                })
            })
            // sqlx logs a statement's whole text when it is slow (at WARN), and a small batch's
            // statement holds its values (`insert_new_in_one_round_trip`): device ids,
            // attributes, DLQ payloads, megabytes at a time, just when the database is
            // struggling. Slow writes show in `db_write_duration_seconds` instead.
            .connect_with(sqlx::ConnectOptions::disable_statement_logging(
                options.timezone(Some(String::from("+00:00"))),
            ))
            .await?;
        Ok(Store { pool })
    }

    /// For writers: [`Store::connect`], then the schema checked and, when it is behind, migrated
    /// (see [`Store::ensure_schema`]); retried with backoff while the database is unreachable.
    /// `None` when `shutdown` came first. A URL that does not parse, and an account the database
    /// refuses what it needs (it may not create the database or migrate a schema that is behind),
    /// are errors at once: they will not change by waiting.
    pub async fn connect_migrated(
        url: &str,
        max_connections: u32,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<Self>> {
        let connect = || async {
            let store = Store::connect(url, max_connections)
                .await
                .map_err(Error::refused_as_access_denied)?;
            store.ensure_schema().await?;
            Ok::<_, Error>(store)
        };
        retry_unless_permanent("Connecting to the database", shutdown, connect).await
    }

    /// Migrates the database `owner_url` names (created when missing) with that account, then
    /// lets its connections go: what `telemetry migrate` and a service given the owner's URL
    /// (`TELEMETRY_MYSQL_OWNER_URL`) run before they connect with their own account. Retried
    /// while the database is unreachable, as [`Store::connect_migrated`]; `false` when
    /// `shutdown` came first.
    pub async fn migrate_as_owner(
        owner_url: &str,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<bool> {
        let migrate = || async {
            let store = Store::connect(owner_url, 1)
                .await
                .map_err(Error::refused_as_access_denied)?;
            let applied = store
                .migrate()
                .await
                .map_err(Error::refused_as_access_denied);
            store.pool.close().await;
            applied
        };
        Ok(
            retry_unless_permanent("Migrating the database", shutdown, migrate)
                .await?
                .is_some(),
        )
    }

    /// Whether every migration of this binary is applied (read from sqlx's `_sqlx_migrations`
    /// with SELECT alone). A writer's account holds no DDL privilege, and sqlx's migrator runs
    /// DDL even when nothing is pending, so it is run only when something is.
    pub async fn schema_is_current(&self) -> Result<bool> {
        let applied: Vec<(i64, bool)> =
            match sqlx::query_as("SELECT version, success FROM _sqlx_migrations")
                .fetch_all(&self.pool)
                .await
            {
                Ok(applied) => applied,
                // ER_NO_SUCH_TABLE: nothing applied yet.
                Err(error)
                    if error
                        .as_database_error()
                        .and_then(|error| {
                            error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                        })
                        .is_some_and(|error| error.number() == 1146) =>
                {
                    return Ok(false)
                }
                Err(error) => return Err(error.into()),
            };
        Ok(MIGRATOR
            .iter()
            .filter(|migration| migration.migration_type.is_up_migration())
            .all(|migration| {
                applied
                    .iter()
                    .any(|(version, success)| *version == migration.version && *success)
            }))
    }

    /// Migrates when the schema is behind ([`Store::schema_is_current`]); an account that may not
    /// is told to ask the owner ([`Error::NeedsMigration`]).
    pub async fn ensure_schema(&self) -> Result<()> {
        if self.schema_is_current().await? {
            return Ok(());
        }
        match self.migrate().await {
            Err(Error::Migrate(sqlx::migrate::MigrateError::Execute(error)))
                if is_privilege_refusal(&error) =>
            {
                Err(Error::NeedsMigration(error.to_string()))
            }
            Err(Error::Database(error)) if is_privilege_refusal(&error) => {
                Err(Error::NeedsMigration(error.to_string()))
            }
            outcome => outcome,
        }
    }

    /// Connects to an existing database without creating or migrating it: for readers (the API),
    /// which never change the schema. The pool connects lazily, so a database that is down at
    /// start-up is an error per query, not at start.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self> {
        Store::connect_reader(url, max_connections, None)
    }

    /// [`Store::connect_lazy`] with a statement timeout on every connection of the pool: the
    /// server stops any statement still running after `statement_timeout` (MariaDB's
    /// `max_statement_time`, or MySQL's `max_execution_time`, which bounds SELECTs only: readers
    /// run nothing else), and the query fails with an error for which
    /// [`Error::is_statement_timeout`] holds. `None` or zero: no timeout.
    pub fn connect_reader(
        url: &str,
        max_connections: u32,
        statement_timeout: Option<Duration>,
    ) -> Result<Self> {
        let options: MySqlConnectOptions = url.parse().map_err(Error::InvalidUrl)?;
        let mut pool = MySqlPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5));
        if let Some(timeout) = statement_timeout.filter(|timeout| !timeout.is_zero()) {
            pool = pool.after_connect(move |connection, _| {
                Box::pin(async move { limit_statement_time(connection, timeout).await })
            });
        }
        let pool = pool.connect_lazy_with(options.timezone(Some(String::from("+00:00"))));
        Ok(Store { pool })
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Applies the migrations that have not been applied yet.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The underlying pool: for this crate's queries only (services and tools go through the
    /// store's methods).
    pub(crate) fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Inserts the events in one transaction, and notes their devices as seen and counts them
    /// per minute of arrival. Idempotent: an event whose identity (device_id, device_ts, seq) is
    /// already stored is skipped, so redelivery adds no row and counts nothing twice. Returns how
    /// many rows were new.
    pub async fn insert_events(&self, records: &[CleanedRecord]) -> Result<u64> {
        self.insert_into(&Table::live(), records, true).await
    }

    /// Inserts the events into `table` (a copy of `telemetry` made by [`Store::create_table_like_live`])
    /// in one transaction, as idempotently as [`Store::insert_events`], without touching the
    /// device tables. Returns how many rows were new.
    pub async fn insert_events_into(
        &self,
        table: &Table,
        records: &[CleanedRecord],
    ) -> Result<u64> {
        self.insert_into(table, records, table.is_live()).await
    }

    async fn insert_into(
        &self,
        table: &Table,
        records: &[CleanedRecord],
        note_devices: bool,
    ) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        let rows = records.iter().map(Row::new).collect::<Result<Vec<_>>>()?;
        // A batch smaller than a full statement (every batch at a low rate, most at full rate
        // with some rejected records) would be prepared, executed and closed afresh, with a
        // round trip for each of its statements: it goes as one text round trip instead.
        if rows.len() < ROWS_PER_STATEMENT {
            if let Some(inserted) = self
                .insert_new_in_one_round_trip(table, &rows, note_devices)
                .await?
            {
                return Ok(inserted);
            }
        }
        let mut transaction = self.pool.begin().await?;
        let inserted = insert_in(&mut transaction, table, &rows, note_devices).await?;
        transaction.commit().await?;
        Ok(inserted)
    }

    /// Writes `rows` and their devices' sightings in one transaction sent as one text statement
    /// (`START TRANSACTION; INSERT ...; INSERT INTO devices ...; INSERT INTO device_minutes ...;
    /// COMMIT`): one network round trip, nothing to prepare. Values are literals
    /// ([`literal`]). `None`, with nothing written, when a row's identity is stored already or
    /// repeats within `rows` (a redelivered batch).
    async fn insert_new_in_one_round_trip(
        &self,
        table: &Table,
        rows: &[Row<'_>],
        note_devices: bool,
    ) -> Result<Option<u64>> {
        let mut sql = String::with_capacity(512 + rows.len() * 400);
        sql.push_str("START TRANSACTION;");
        push_insert_values(&mut sql, table, rows);
        sql.push(';');
        if note_devices {
            let mut sightings = Sightings::default();
            for row in rows {
                let device_id = row.record.event.device_id.as_str();
                sightings.saw(device_id, row.received_at, Seen::Accepted);
                sightings.count(device_id, row.received_at, Seen::Accepted);
            }
            sightings.push_upserts(&mut sql);
        }
        sql.push_str("COMMIT");
        Ok(self
            .transaction_in_one_round_trip(&sql)
            .await?
            .then_some(rows.len() as u64))
    }

    /// Runs `sql`, a whole transaction as statements separated by `;` (`START TRANSACTION; ...;
    /// COMMIT`), as one text query: one network round trip. `false`, with the transaction rolled
    /// back, when a statement met a stored key (MySQL error 1062), and without running it when it
    /// is longer than [`TEXT_TRANSACTION_BYTES`]: the caller then takes its path with bound
    /// values, which sorts new rows from stored ones. Any other failure is rolled back and
    /// returned.
    pub(crate) async fn transaction_in_one_round_trip(&self, sql: &str) -> Result<bool> {
        if sql.len() > TEXT_TRANSACTION_BYTES {
            return Ok(false);
        }
        let mut connection = self.pool.acquire().await?;
        // A plain string is sent as COM_QUERY, the text protocol; the server stops at the first
        // statement that fails.
        let error = match sqlx::Executor::execute(&mut *connection, sql).await {
            Ok(_) => return Ok(true),
            Err(error) => error,
        };
        // The transaction may still be open on this connection: end it before the connection
        // goes back to the pool, or close the connection.
        if sqlx::Executor::execute(&mut *connection, "ROLLBACK")
            .await
            .is_err()
        {
            drop(connection.detach());
        }
        if is_duplicate_key(&error) {
            return Ok(false);
        }
        Err(error.into())
    }
}

/// The body of [`Store::insert_events_into`], inside the caller's transaction.
pub(crate) async fn insert_in(
    transaction: &mut sqlx::MySqlConnection,
    table: &Table,
    rows: &[Row<'_>],
    note_devices: bool,
) -> Result<u64> {
    let mut sightings = Sightings::default();
    let mut inserted = 0;
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        // The common case, new events only, is one plain INSERT. A stored identity fails it
        // (InnoDB undoes just the statement); then the chunk is sorted into new and stored.
        let all: Vec<&Row<'_>> = chunk.iter().collect();
        let new = match insert_rows(&mut *transaction, table, &all, false).await {
            Ok(()) => all,
            Err(error) if is_duplicate_key(&error) => {
                let new = new_rows(&mut *transaction, table, chunk).await?;
                insert_rows(&mut *transaction, table, &new, true).await?;
                new
            }
            Err(error) => return Err(error.into()),
        };
        inserted += new.len() as u64;
        if note_devices {
            for row in chunk {
                sightings.saw(&row.record.event.device_id, row.received_at, Seen::Accepted);
            }
            for row in new {
                sightings.count(&row.record.event.device_id, row.received_at, Seen::Accepted);
            }
        }
    }
    sightings.upsert(&mut *transaction).await?;
    Ok(inserted)
}

impl Store {
    /// Creates `table` as an empty copy of `telemetry` (columns, keys, checks) unless it exists.
    pub async fn create_table_like_live(&self, table: &Table) -> Result<()> {
        if table.is_live() {
            return Ok(());
        }
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS `{}` LIKE telemetry",
            table.name()
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Fails unless `table` has exactly the live table's columns (names, types, order): so a
    /// replay or a swap never writes into, or makes live, a table of another kind.
    pub async fn check_like_live(&self, table: &Table) -> Result<()> {
        let columns = |name: String| {
            sqlx::query_scalar::<_, String>(
                "SELECT CAST(CONCAT(COLUMN_NAME, ' ', COLUMN_TYPE, ' ', IS_NULLABLE) AS CHAR) \
                 FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            )
            .bind(name)
            .fetch_all(&self.pool)
        };
        let live = columns(String::from(LIVE_TABLE)).await?;
        let other = columns(table.name().to_string()).await?;
        if other.is_empty() || other != live {
            return Err(Error::NotLikeLive(table.to_string()));
        }
        Ok(())
    }

    /// Makes `table` the live `telemetry` table and keeps the current one as `keep_as`, in one
    /// atomic `RENAME TABLE`: writers and readers see either the old table or the new one.
    pub async fn swap_into_live(&self, table: &Table, keep_as: &Table) -> Result<()> {
        self.check_like_live(table).await?;
        sqlx::query(&format!(
            "RENAME TABLE telemetry TO `{}`, `{}` TO telemetry",
            keep_as.name(),
            table.name()
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Sets the session's statement timeout: MariaDB's `max_statement_time` (seconds, fractional),
/// else MySQL's `max_execution_time` (milliseconds). A server with neither is refused with a
/// message naming the API's setting (the pool logs it and the query fails as unavailable).
async fn limit_statement_time(
    connection: &mut sqlx::MySqlConnection,
    timeout: Duration,
) -> std::result::Result<(), sqlx::Error> {
    let millis = timeout.as_millis().max(1);
    let mariadb = format!(
        "SET SESSION max_statement_time = {}.{:03}",
        millis / 1_000,
        millis % 1_000
    );
    let unknown_variable = |error: &sqlx::Error| {
        error
            .as_database_error()
            .and_then(|error| error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .is_some_and(|error| error.number() == UNKNOWN_SYSTEM_VARIABLE)
    };
    match sqlx::query(&mariadb)
        .persistent(false)
        .execute(&mut *connection)
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if unknown_variable(&error) => {
            let mysql = format!("SET SESSION max_execution_time = {millis}");
            match sqlx::query(&mysql)
                .persistent(false)
                .execute(&mut *connection)
                .await
            {
                Ok(_) => Ok(()),
                Err(error) if unknown_variable(&error) => Err(sqlx::Error::Configuration(
                    "the server has neither max_statement_time (MariaDB 10.1+) nor \
                     max_execution_time (MySQL 5.7.8+), so the API cannot bound its queries; \
                     set TELEMETRY_API_STATEMENT_TIMEOUT_MS=0 to run without a statement timeout"
                        .into(),
                )),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    }
}

/// What the live table holds, as a tool that checks a run reads it (`telemetry bench`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WrittenRows {
    /// Rows.
    pub rows: u64,
    /// Distinct (device, seq) pairs among them: fewer than `rows` when one message was stored
    /// twice (under two device times).
    pub distinct_device_seq: u64,
    /// When the first row was written, UTC microseconds; 0 when there is none.
    pub first_written_us: i64,
    /// When the last row was written, UTC microseconds; 0 when there is none.
    pub last_written_us: i64,
}

impl Store {
    /// Counts the live table's rows and when they were written.
    pub async fn written_rows(&self) -> Result<WrittenRows> {
        let (rows, distinct, first, last): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT device_id, seq), \
                    CAST(COALESCE(UNIX_TIMESTAMP(MIN(written_at)), 0) * 1000000 AS SIGNED), \
                    CAST(COALESCE(UNIX_TIMESTAMP(MAX(written_at)), 0) * 1000000 AS SIGNED) \
             FROM telemetry",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(WrittenRows {
            rows: u64::try_from(rows).unwrap_or(0),
            distinct_device_seq: u64::try_from(distinct).unwrap_or(0),
            first_written_us: first,
            last_written_us: last,
        })
    }

    /// Each row's delay from its device time to its writing, in microseconds, in no order.
    pub async fn write_delays_micros(&self) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT TIMESTAMPDIFF(MICROSECOND, device_ts, written_at) FROM telemetry",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Drops the database this store is connected to: for a tool that made one of its own for a
    /// run (`telemetry bench`, its `bench_` databases).
    pub async fn drop_database(&self) -> Result<()> {
        let name: Option<String> = sqlx::query_scalar("SELECT DATABASE()")
            .fetch_one(&self.pool)
            .await?;
        if let Some(name) = name {
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS `{}`",
                name.replace('`', "``")
            ))
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

/// A telemetry table's name: `telemetry`, or a copy of it for a rebuild. Only ASCII letters,
/// digits and `_`, starting with a letter, at most 64 characters, so it is safe in SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table(String);

impl Table {
    /// The live table, `telemetry`.
    pub fn live() -> Self {
        Table(String::from(LIVE_TABLE))
    }

    /// A table name, checked.
    pub fn new(name: &str) -> Result<Self> {
        let mut characters = name.chars();
        let valid = characters
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic())
            && characters.all(|character| character.is_ascii_alphanumeric() || character == '_')
            && name.len() <= 64;
        if valid && !RESERVED_TABLES.contains(&name) {
            Ok(Table(name.to_string()))
        } else {
            Err(Error::InvalidTableName(name.chars().take(80).collect()))
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Whether this is the live table.
    pub fn is_live(&self) -> bool {
        self.0 == LIVE_TABLE
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The table the audit service writes and the API reads.
const LIVE_TABLE: &str = "telemetry";

/// The service's other tables: never a replay's target.
const RESERVED_TABLES: &[&str] = &[
    "devices",
    "device_minutes",
    "dlq_events",
    "dlq_replays",
    "rollup_1m",
    "rollup_1h",
    "rollup_devices",
    "rollup_seen",
    "alert_states",
    "alert_outbox",
    "alert_offsets",
    "_sqlx_migrations",
];

/// Inserts `rows` in one statement; with `skip_stored`, rows whose identity is stored (or repeats
/// within `rows`) are skipped instead of failing the statement.
async fn insert_rows(
    connection: &mut sqlx::MySqlConnection,
    table: &Table,
    rows: &[&Row<'_>],
    skip_stored: bool,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = QueryBuilder::<MySql>::new(format!("INSERT INTO `{table}` {EVENT_COLUMNS} "));
    insert.push_values(rows, |mut values, row| {
        let seq = row.record.event.seq;
        values
            .push_bind(&row.record.event.device_id)
            .push_bind(row.device_ts)
            .push_bind(seq)
            .push_bind(seq.unwrap_or(NO_SEQ))
            .push_bind(row.received_at)
            .push_bind(&row.metrics)
            .push_bind(row.record.event.schema_version)
            .push_bind(&row.attributes)
            .push_bind(&row.quality)
            .push_bind(&row.record.source.topic)
            .push_bind(row.record.source.partition)
            .push_bind(row.record.source.offset);
    });
    if skip_stored {
        insert.push(" ON DUPLICATE KEY UPDATE seq_key = seq_key");
    }
    // Statements differ by row count: only the full-size one (every chunk of a large batch) is
    // kept prepared on the connection, so it is parsed once, not per batch; caching every
    // variant would only churn.
    insert
        .build()
        .persistent(rows.len() == ROWS_PER_STATEMENT)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// `INSERT INTO `table` (...) VALUES (...), ...` of `rows`, the values as literals.
fn push_insert_values(sql: &mut String, table: &Table, rows: &[Row<'_>]) {
    sql.push_str("INSERT INTO `");
    sql.push_str(table.name());
    sql.push_str("` ");
    sql.push_str(EVENT_COLUMNS);
    sql.push_str(" VALUES ");
    for (place, row) in rows.iter().enumerate() {
        let event = &row.record.event;
        sql.push_str(if place == 0 { "(" } else { ",(" });
        literal::text(sql, &event.device_id);
        sql.push(',');
        literal::datetime(sql, row.device_ts);
        sql.push(',');
        match event.seq {
            Some(seq) => literal::integer(sql, seq),
            None => sql.push_str("NULL"),
        }
        sql.push(',');
        literal::integer(sql, event.seq.unwrap_or(NO_SEQ));
        sql.push(',');
        literal::datetime(sql, row.received_at);
        sql.push(',');
        literal::text(sql, &row.metrics);
        sql.push(',');
        literal::integer(sql, event.schema_version);
        sql.push(',');
        literal::optional_text(sql, row.attributes.as_deref());
        sql.push(',');
        literal::optional_text(sql, row.quality.as_deref());
        sql.push(',');
        literal::text(sql, &row.record.source.topic);
        sql.push(',');
        literal::integer(sql, row.record.source.partition);
        sql.push(',');
        literal::integer(sql, row.record.source.offset);
        sql.push(')');
    }
}

/// The rows of `chunk` whose identity is not stored yet, each identity once.
async fn new_rows<'r, 'a>(
    connection: &mut sqlx::MySqlConnection,
    table: &Table,
    chunk: &'r [Row<'a>],
) -> Result<Vec<&'r Row<'a>>> {
    type Identity = (String, chrono::NaiveDateTime, i64);
    let mut query = QueryBuilder::<MySql>::new(format!(
        "SELECT CAST(device_id AS CHAR), device_ts, seq_key FROM `{table}` \
         WHERE (device_id, device_ts, seq_key) IN "
    ));
    query.push_tuples(chunk, |mut tuple, row| {
        tuple
            .push_bind(&row.record.event.device_id)
            .push_bind(row.device_ts)
            .push_bind(row.record.event.seq.unwrap_or(NO_SEQ));
    });
    // Locks the stored identities, so a concurrent writer cannot slip one in before the insert.
    query.push(" FOR UPDATE");
    let stored: Vec<Identity> = query
        .build_query_as()
        .persistent(false)
        .fetch_all(&mut *connection)
        .await?;
    let mut known: std::collections::HashSet<Identity> = stored.into_iter().collect();
    Ok(chunk
        .iter()
        .filter(|row| {
            known.insert((
                row.record.event.device_id.clone(),
                row.device_ts,
                row.record.event.seq.unwrap_or(NO_SEQ),
            ))
        })
        .collect())
}

/// Whether the statement failed on a unique key (MySQL/MariaDB error 1062).
fn is_duplicate_key(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|error| error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|error| error.number() == 1062)
}

/// `seq_key` of an event without a sequence number: NULLs are distinct in a key, -1 is not.
pub(crate) const NO_SEQ: i64 = -1;

/// Which kind of record a device was seen with.
#[derive(Clone, Copy)]
enum Seen {
    Accepted,
    Rejected,
}

/// How a batch's sightings merge into `devices`: times only move outwards. GREATEST is NULL when
/// either side is: COALESCE keeps whichever time exists.
const DEVICES_MERGE: &str = " ON DUPLICATE KEY UPDATE \
     first_seen = LEAST(first_seen, VALUES(first_seen)), \
     last_seen = GREATEST(last_seen, VALUES(last_seen)), \
     last_accepted = COALESCE(GREATEST(last_accepted, VALUES(last_accepted)), \
         last_accepted, VALUES(last_accepted)), \
     last_rejected = COALESCE(GREATEST(last_rejected, VALUES(last_rejected)), \
         last_rejected, VALUES(last_rejected))";

/// How a batch's new records per minute add to `device_minutes`.
const MINUTES_MERGE: &str = " ON DUPLICATE KEY UPDATE accepted = accepted + VALUES(accepted), \
     rejected = rejected + VALUES(rejected)";

/// The devices of one batch, with the times they were seen (for the `devices` table) and the
/// records newly stored per minute of arrival (for `device_minutes`).
#[derive(Default)]
struct Sightings<'a> {
    /// Sorted by device id, so concurrent writers lock rows in the same order.
    devices: std::collections::BTreeMap<&'a str, Sighting>,
    /// (device, minute) → (accepted, rejected) newly stored.
    minutes: std::collections::BTreeMap<(&'a str, chrono::NaiveDateTime), (u32, u32)>,
}

#[derive(Clone, Copy)]
struct Sighting {
    first: chrono::NaiveDateTime,
    last: chrono::NaiveDateTime,
    accepted: Option<chrono::NaiveDateTime>,
    rejected: Option<chrono::NaiveDateTime>,
}

impl<'a> Sightings<'a> {
    /// Counts one newly stored record in its device's minute.
    fn count(&mut self, device_id: &'a str, at: chrono::NaiveDateTime, seen: Seen) {
        use chrono::Timelike as _;
        let minute = at
            .with_second(0)
            .and_then(|at| at.with_nanosecond(0))
            .unwrap_or(at);
        let counts = self.minutes.entry((device_id, minute)).or_default();
        match seen {
            Seen::Accepted => counts.0 += 1,
            Seen::Rejected => counts.1 += 1,
        }
    }

    fn saw(&mut self, device_id: &'a str, at: chrono::NaiveDateTime, seen: Seen) {
        let sighting = self.devices.entry(device_id).or_insert(Sighting {
            first: at,
            last: at,
            accepted: None,
            rejected: None,
        });
        sighting.first = sighting.first.min(at);
        sighting.last = sighting.last.max(at);
        let latest = match seen {
            Seen::Accepted => &mut sighting.accepted,
            Seen::Rejected => &mut sighting.rejected,
        };
        *latest = Some(latest.map_or(at, |latest| latest.max(at)));
    }

    /// The statements of [`Sightings::upsert`] as text, each ended by `;`, the values as literals
    /// (for a batch small enough that every one fits a statement).
    pub(crate) fn push_upserts(&self, sql: &mut String) {
        if !self.devices.is_empty() {
            sql.push_str(
                "INSERT INTO devices (device_id, first_seen, last_seen, last_accepted, last_rejected) VALUES ",
            );
            for (place, (device_id, sighting)) in self.devices.iter().enumerate() {
                sql.push_str(if place == 0 { "(" } else { ",(" });
                literal::text(sql, device_id);
                sql.push(',');
                literal::datetime(sql, sighting.first);
                sql.push(',');
                literal::datetime(sql, sighting.last);
                sql.push(',');
                literal::optional_datetime(sql, sighting.accepted);
                sql.push(',');
                literal::optional_datetime(sql, sighting.rejected);
                sql.push(')');
            }
            sql.push_str(DEVICES_MERGE);
            sql.push(';');
        }
        if !self.minutes.is_empty() {
            sql.push_str(
                "INSERT INTO device_minutes (device_id, minute, accepted, rejected) VALUES ",
            );
            for (place, ((device_id, minute), (accepted, rejected))) in
                self.minutes.iter().enumerate()
            {
                sql.push_str(if place == 0 { "(" } else { ",(" });
                literal::text(sql, device_id);
                sql.push(',');
                literal::datetime(sql, *minute);
                sql.push(',');
                literal::integer(sql, *accepted);
                sql.push(',');
                literal::integer(sql, *rejected);
                sql.push(')');
            }
            sql.push_str(MINUTES_MERGE);
            sql.push(';');
        }
    }

    /// Merges the sightings into `devices`. Only ever moves times outwards (LEAST/GREATEST), so
    /// writing the same batch again changes nothing.
    async fn upsert(&self, connection: &mut sqlx::MySqlConnection) -> Result<()> {
        let devices: Vec<_> = self.devices.iter().collect();
        for chunk in devices.chunks(ROWS_PER_STATEMENT) {
            let mut upsert = QueryBuilder::<MySql>::new(
                "INSERT INTO devices (device_id, first_seen, last_seen, last_accepted, last_rejected) ",
            );
            upsert.push_values(chunk, |mut values, (device_id, sighting)| {
                values
                    .push_bind(**device_id)
                    .push_bind(sighting.first)
                    .push_bind(sighting.last)
                    .push_bind(sighting.accepted)
                    .push_bind(sighting.rejected);
            });
            upsert.push(DEVICES_MERGE);
            upsert
                .build()
                .persistent(false)
                .execute(&mut *connection)
                .await?;
        }
        let minutes: Vec<_> = self.minutes.iter().collect();
        for chunk in minutes.chunks(ROWS_PER_STATEMENT) {
            let mut upsert = QueryBuilder::<MySql>::new(
                "INSERT INTO device_minutes (device_id, minute, accepted, rejected) ",
            );
            upsert.push_values(
                chunk,
                |mut values, ((device_id, minute), (accepted, rejected))| {
                    values
                        .push_bind(*device_id)
                        .push_bind(*minute)
                        .push_bind(*accepted)
                        .push_bind(*rejected);
                },
            );
            upsert.push(MINUTES_MERGE);
            upsert
                .build()
                .persistent(false)
                .execute(&mut *connection)
                .await?;
        }
        Ok(())
    }
}

/// One record with its values converted for binding.
pub(crate) struct Row<'a> {
    record: &'a CleanedRecord,
    device_ts: chrono::NaiveDateTime,
    received_at: chrono::NaiveDateTime,
    metrics: String,
    attributes: Option<String>,
    quality: Option<String>,
}

impl<'a> Row<'a> {
    pub(crate) fn new(record: &'a CleanedRecord) -> Result<Self> {
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

pub(crate) fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|error| Error::Database(sqlx::Error::Encode(Box::new(error))))
}

fn utc_datetime(millis: i64) -> Result<chrono::NaiveDateTime> {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|time| time.naive_utc())
        .ok_or(Error::TimestampOutOfRange(millis))
}
