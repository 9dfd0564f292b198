//! The SQLite store: the embedded default of `telemetry up`, one file under the data directory.
//!
//! Why libsql and not sqlx's SQLite driver: the embedded Kafka-protocol broker (nisshi) stores its
//! log in SQLite through libsql, which compiles SQLite's C source with the usual `sqlite3_*`
//! symbols; sqlx's driver would link a second copy of them into the same binary. So the store uses
//! the same library.
//!
//! Same tables and the same guarantees as the MySQL store, in SQLite's terms:
//! - times are UTC milliseconds (INTEGER); JSON columns are TEXT read with SQLite's JSON functions;
//! - the event's identity (device_id, device_ts, seq_key) is the primary key, and inserts are
//!   `ON CONFLICT DO NOTHING`: a redelivered event adds no row and counts nothing twice;
//! - one transaction per batch, WAL journal with `synchronous = FULL`: a batch the audit service
//!   was told is stored survives a crash of the process or of the machine;
//! - one writer connection (SQLite has one writer at a time) and one reader connection, which
//!   WAL lets read while the writer writes;
//! - a reader opened with a statement timeout ([`SqliteStore::with_statement_timeout`], the API's)
//!   has it enforced by a watchdog thread that interrupts the statement, as MariaDB's
//!   `max_statement_time` would.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use libsql::Value;
use telemetry_core::event::CleanedRecord;
use tokio::sync::Mutex;

use crate::dead_letters::{
    cut, MAX_INDEXED_PAYLOAD_BYTES, MAX_MESSAGE_CHARS, MAX_TEXT_COLUMN_CHARS,
};
use crate::{
    AlertEntry, AlertOffset, AlertStateRow, Bucket, DeadLetterEntry, DeadLetterFilter, DevicePage,
    DeviceSummary, Error, NewAlert, NewDeadLetter, OutboxEntry, Resolution, Result, RollupCoverage,
    RollupOutcome, RollupRow, Seen, SeriesQuery, Sightings, Table, TelemetryStore,
};
use telemetry_core::Event;

mod alerts;
mod rebuild;
mod replays;
mod rollups;

/// The schema's versions, oldest first: `migrations/sqlite/NNNN_*.sql`, embedded. A database's
/// `user_version` is the number of the last one applied; opening applies the newer ones, each in
/// the transaction that moves `user_version` on (SQLite's DDL is transactional), so a database is
/// at one version or the next, never between. A file at a version this build does not know (made
/// by a newer release) is refused, not touched.
pub const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        include_str!("../../migrations/sqlite/0001_telemetry.sql"),
    ),
    (2, include_str!("../../migrations/sqlite/0002_rollups.sql")),
    (3, include_str!("../../migrations/sqlite/0003_alerts.sql")),
    (
        4,
        include_str!("../../migrations/sqlite/0004_dlq_replays.sql"),
    ),
];

/// The schema version this build writes: the last migration's.
pub fn schema_version() -> u32 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

/// Most rows one pruning statement deletes.
const PRUNE_BATCH: i64 = 10_000;

/// How long a statement waits for another connection's lock (a second process on the same file).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// With a statement timeout, how long a query waits for the reader connection (busy with another
/// query) before it is refused as unavailable: the MySQL store's pool waits as long.
const READER_WAIT: Duration = Duration::from_secs(5);

/// A telemetry database in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    /// Keeps the database open; the connections below come from it.
    _database: libsql::Database,
    writer: Mutex<libsql::Connection>,
    reader: Mutex<libsql::Connection>,
    /// The reader's statement timeout and what enforces it; `None`: no timeout.
    statement_timeout: Option<(Duration, Watchdog)>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating when missing) the database `url` names: `sqlite://<path>`, a relative path
    /// from the working directory (`sqlite://data/telemetry.db`) or an absolute one
    /// (`sqlite:///var/lib/telemetry/telemetry.db`); then applies the schema.
    pub async fn open(url: &str) -> Result<Self> {
        let path = path_of(url)?;
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                Error::Sqlite(format!("cannot make {}: {error}", parent.display()))
            })?;
        }
        let database = libsql::Builder::new_local(&path)
            .build()
            .await
            .map_err(|error| sqlite_error(&path, error))?;
        let connect = || -> Result<libsql::Connection> {
            let connection = database
                .connect()
                .map_err(|error| sqlite_error(&path, error))?;
            connection
                .busy_timeout(BUSY_TIMEOUT)
                .map_err(|error| sqlite_error(&path, error))?;
            Ok(connection)
        };
        let writer = connect()?;
        writer
            .execute_batch("PRAGMA journal_mode = WAL;")
            .await
            .map_err(|error| sqlite_error(&path, error))?;
        migrate(&writer, &path).await?;
        // Durable at commit, also through a power loss: the audit service moves its Kafka offsets
        // only past batches the store has committed.
        writer
            .execute_batch("PRAGMA synchronous = FULL;")
            .await
            .map_err(|error| sqlite_error(&path, error))?;
        let reader = connect()?;
        Ok(SqliteStore {
            path,
            _database: database,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            statement_timeout: None,
        })
    }

    /// Bounds every read: a statement of the reader connection still running after `timeout` is
    /// interrupted and fails with [`Error::StatementTimeout`]; a query that waits longer than
    /// five seconds for the reader (busy with others) fails with [`Error::Busy`]. Zero: no
    /// timeout. (Writes are not bounded: the audit service's batches must finish.)
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            self.statement_timeout = None;
            return Ok(self);
        }
        let reader = self.reader.get_mut().clone();
        let watchdog = Watchdog::spawn(reader).map_err(|error| {
            Error::Sqlite(format!(
                "cannot start the statement-timeout thread: {error}"
            ))
        })?;
        self.statement_timeout = Some((timeout, watchdog));
        Ok(self)
    }

    /// Every row of the query on the reader, as values; within the statement timeout, if the
    /// store has one.
    async fn query_rows(&self, sql: &str, params: Vec<Value>) -> Result<Vec<Row>> {
        let Some((timeout, watchdog)) = &self.statement_timeout else {
            let connection = self.reader.lock().await;
            return read_all(&connection, sql, params).await;
        };
        let connection = tokio::time::timeout(READER_WAIT, self.reader.lock())
            .await
            .map_err(|_| {
                Error::Busy("the SQLite reader connection stayed busy with other queries")
            })?;
        let statement = watchdog.start(*timeout);
        let read = read_all(&connection, sql, params).await;
        let interrupted = watchdog.finish(statement);
        match read {
            Err(_) if interrupted => Err(Error::StatementTimeout(*timeout)),
            read => read,
        }
    }

    /// Runs `delete` (bound to `bound` and a batch size) until it deletes less than a batch, each
    /// batch in its own statement, so the writer is never held for long.
    async fn delete_in_batches(&self, delete: &str, bound: i64) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let done = self
                .writer
                .lock()
                .await
                .execute(
                    delete,
                    vec![Value::Integer(bound), Value::Integer(PRUNE_BATCH)],
                )
                .await?;
            deleted += done;
            if done < PRUNE_BATCH as u64 {
                return Ok(deleted);
            }
        }
    }

    async fn scalar_u64(&self, sql: &str, params: Vec<Value>) -> Result<u64> {
        let rows = self.query_rows(sql, params).await?;
        Ok(rows
            .first()
            .map(|row| nullable_i64(row, 0))
            .transpose()?
            .flatten()
            .map_or(0, |count| u64::try_from(count).unwrap_or(0)))
    }
}

/// Every row of the query on `connection`, as values. (A libsql row reads its statement's current
/// row, so each is copied out before the next step.)
async fn read_all(
    connection: &libsql::Connection,
    sql: &str,
    params: Vec<Value>,
) -> Result<Vec<Row>> {
    collect(connection.query(sql, params).await?).await
}

/// Every row of a prepared statement run with `params`, as values; the statement is reset for
/// its next run.
async fn read_prepared(statement: &libsql::Statement, params: Vec<Value>) -> Result<Vec<Row>> {
    let rows = collect(statement.query(params).await?).await;
    statement.reset();
    rows
}

/// The rows of a result, copied out.
async fn collect(mut rows: libsql::Rows) -> Result<Vec<Row>> {
    let columns = rows.column_count();
    let mut all = Vec::new();
    while let Some(row) = rows.next().await? {
        all.push(
            (0..columns)
                .map(|index| row.get_value(index))
                .collect::<Result<Row, _>>()?,
        );
    }
    Ok(all)
}

/// Interrupts the reader's statement once it has run for the statement timeout. A thread of its
/// own: libsql runs a local statement on the calling thread to its end, so nothing on the async
/// runtime could stop it; `sqlite3_interrupt` may be called from any thread.
struct Watchdog {
    shared: Arc<Watched>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Watched {
    state: std::sync::Mutex<Watch>,
    wake: Condvar,
}

#[derive(Default)]
struct Watch {
    /// The statement running now: its number and deadline.
    running: Option<(u64, Instant)>,
    /// The number of the last statement interrupted.
    interrupted: Option<u64>,
    /// The number of the last statement started.
    last: u64,
    /// Set when the store is dropped: the thread ends.
    stop: bool,
}

impl Watched {
    fn lock(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Watchdog {
    fn spawn(connection: libsql::Connection) -> std::io::Result<Self> {
        let shared = Arc::new(Watched {
            state: std::sync::Mutex::new(Watch::default()),
            wake: Condvar::new(),
        });
        let thread = std::thread::Builder::new()
            .name(String::from("sqlite-statement-timeout"))
            .spawn({
                let shared = Arc::clone(&shared);
                move || watch(&shared, &connection)
            })?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Starts timing a statement of the reader; returns its number for [`Watchdog::finish`].
    fn start(&self, timeout: Duration) -> u64 {
        let mut watch = self.shared.lock();
        watch.last += 1;
        let number = watch.last;
        watch.running = Some((number, Instant::now() + timeout));
        self.shared.wake.notify_one();
        number
    }

    /// Stops timing statement `number`; whether it was interrupted. Once this returns, the
    /// watchdog cannot interrupt the reader on its behalf any more (it interrupts holding the lock).
    fn finish(&self, number: u64) -> bool {
        let mut watch = self.shared.lock();
        if watch.running.is_some_and(|(running, _)| running == number) {
            watch.running = None;
        }
        watch.interrupted == Some(number)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread only waits on the condition variable: it ends at once.
            let _ = thread.join();
        }
    }
}

/// The watchdog thread: waits for a statement's deadline, and interrupts the connection if the
/// statement is still running then. (An interrupt when no statement runs is a no-op.)
fn watch(shared: &Watched, connection: &libsql::Connection) {
    let mut watch = shared.lock();
    loop {
        if watch.stop {
            return;
        }
        match watch.running {
            None => {
                watch = shared
                    .wake
                    .wait(watch)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            Some((number, deadline)) => {
                let now = Instant::now();
                if now >= deadline {
                    if let Err(error) = connection.interrupt() {
                        tracing::warn!(%error, "Could not interrupt a SQLite statement.");
                    }
                    watch.interrupted = Some(number);
                    watch.running = None;
                } else {
                    watch = shared
                        .wake
                        .wait_timeout(watch, deadline - now)
                        .map_or_else(|error| error.into_inner().0, |(guard, _)| guard);
                }
            }
        }
    }
}

/// The file a `sqlite:` URL names.
fn path_of(url: &str) -> Result<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| Error::Sqlite(format!("`{url}` is not a sqlite:// URL")))?;
    // Options after `?` are not supported; a path with `?` in it is refused rather than misread.
    // An in-memory database would be a different one on each connection.
    if rest.is_empty() || rest.contains('?') || rest.starts_with(":memory:") {
        return Err(Error::Sqlite(format!(
            "`{url}`: give a file, as sqlite://data/telemetry.db or sqlite:///absolute/path.db"
        )));
    }
    Ok(PathBuf::from(rest))
}

fn sqlite_error(path: &Path, error: libsql::Error) -> Error {
    Error::Sqlite(format!("{}: {error}", path.display()))
}

impl From<libsql::Error> for Error {
    fn from(error: libsql::Error) -> Self {
        match error {
            // SQLITE_CONSTRAINT: the data itself was refused.
            libsql::Error::SqliteFailure(code, message) if code & 0xff == 19 => {
                Error::SqliteData(message)
            }
            error => Error::Sqlite(error.to_string()),
        }
    }
}

/// Inserts `records` into the live table on `transaction`, idempotently, noting and counting their
/// devices; how many were new.
async fn insert_live(transaction: &libsql::Connection, records: &[CleanedRecord]) -> Result<u64> {
    insert_into(transaction, &Table::live(), records).await
}

/// Inserts `records` into `table` (the live one or a copy of it, see [`SqliteStore::rebuild_into`])
/// on `transaction`, idempotently; the live table's devices are noted and counted. How many were new.
async fn insert_into(
    transaction: &libsql::Connection,
    table: &Table,
    records: &[CleanedRecord],
) -> Result<u64> {
    // A table's name is a checked identifier (`Table::new`).
    let statement = transaction
        .prepare(&format!(
            "INSERT INTO \"{}\" (device_id, device_ts, seq, seq_key, received_at, metrics, \
             schema_version, attributes, quality, source_topic, source_partition, source_offset) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT DO NOTHING",
            table.name()
        ))
        .await?;
    let mut sightings = Sightings::default();
    let mut inserted = 0;
    for record in records {
        let event = &record.event;
        let metrics = crate::json(&event.metrics)?;
        let attributes = (!event.attributes.is_empty())
            .then(|| crate::json(&event.attributes))
            .transpose()?;
        let quality = (!event.quality.is_clean())
            .then(|| crate::json(&event.quality))
            .transpose()?;
        // The same range as the MySQL store's DATETIME conversion, so both refuse the same
        // events (validation rules such times out before they get here).
        crate::utc_datetime(event.device_ts)?;
        let received_at = crate::utc_datetime(event.received_at)?;
        let seq_key = event.seq.unwrap_or(crate::NO_SEQ);
        let changed = statement
            .execute(vec![
                text(&event.device_id),
                Value::Integer(event.device_ts),
                optional_integer(event.seq),
                Value::Integer(seq_key),
                Value::Integer(event.received_at),
                Value::Text(metrics),
                Value::Integer(i64::from(event.schema_version)),
                attributes.map_or(Value::Null, Value::Text),
                quality.map_or(Value::Null, Value::Text),
                text(&record.source.topic),
                Value::Integer(i64::from(record.source.partition)),
                Value::Integer(record.source.offset),
            ])
            .await?;
        statement.reset();
        sightings.saw(&event.device_id, received_at, Seen::Accepted);
        if changed > 0 {
            inserted += 1;
            sightings.count(&event.device_id, received_at, Seen::Accepted);
        }
    }
    drop(statement);
    if table.is_live() {
        upsert_sightings(transaction, &sightings).await?;
    }
    Ok(inserted)
}

fn text(value: &str) -> Value {
    Value::Text(value.to_string())
}

fn optional_text(value: Option<&str>) -> Value {
    value.map_or(Value::Null, text)
}

fn optional_integer(value: Option<i64>) -> Value {
    value.map_or(Value::Null, Value::Integer)
}

/// Brings the database's schema to [`schema_version`]: the migrations after its `user_version`,
/// in one IMMEDIATE transaction (a second process opening the same file at the same moment waits
/// for it, then finds nothing left to do).
async fn migrate(connection: &libsql::Connection, path: &Path) -> Result<()> {
    let transaction = connection
        .transaction_with_behavior(libsql::TransactionBehavior::Immediate)
        .await
        .map_err(|error| sqlite_error(path, error))?;
    let found = read_all(&transaction, "PRAGMA user_version", Vec::new()).await?;
    let version = match found.first() {
        Some(row) => integer(row, 0)?,
        None => 0,
    };
    let latest = i64::from(schema_version());
    if version > latest {
        return Err(Error::Sqlite(format!(
            "{} has schema version {version}, made by a newer release; this one knows versions up \
             to {latest} and leaves the file as it is",
            path.display()
        )));
    }
    for (number, sql) in MIGRATIONS {
        if i64::from(*number) <= version {
            continue;
        }
        transaction.execute_batch(sql).await.map_err(|error| {
            Error::Sqlite(format!(
                "{}: schema migration {number} failed: {error}",
                path.display()
            ))
        })?;
    }
    if version < latest {
        // PRAGMA takes no parameters; `latest` is this build's constant.
        transaction
            .execute_batch(&format!("PRAGMA user_version = {latest};"))
            .await
            .map_err(|error| sqlite_error(path, error))?;
        tracing::info!(path = %path.display(), from = version, to = latest, "SQLite schema migrated");
    }
    transaction
        .commit()
        .await
        .map_err(|error| sqlite_error(path, error))
}

/// One row of a result, copied out.
type Row = Vec<Value>;

fn value(row: &Row, index: usize) -> Result<&Value> {
    row.get(index)
        .ok_or_else(|| Error::Sqlite(format!("no column {index} in the result")))
}

fn integer(row: &Row, index: usize) -> Result<i64> {
    nullable_i64(row, index)?
        .ok_or_else(|| Error::Sqlite(format!("column {index}: expected an integer, found NULL")))
}

fn string(row: &Row, index: usize) -> Result<String> {
    nullable_text(row, index)?
        .ok_or_else(|| Error::Sqlite(format!("column {index}: expected text, found NULL")))
}

fn blob(row: &Row, index: usize) -> Result<Vec<u8>> {
    match value(row, index)? {
        Value::Blob(bytes) => Ok(bytes.clone()),
        Value::Text(text) => Ok(text.clone().into_bytes()),
        other => Err(Error::Sqlite(format!(
            "column {index}: expected bytes, found {other:?}"
        ))),
    }
}

fn nullable_i64(row: &Row, index: usize) -> Result<Option<i64>> {
    match value(row, index)? {
        Value::Null => Ok(None),
        Value::Integer(value) => Ok(Some(*value)),
        // SUM over no rows of an INTEGER column, or arithmetic, may give a REAL.
        Value::Real(value) => Ok(Some(*value as i64)),
        other => Err(Error::Sqlite(format!(
            "column {index}: expected an integer, found {other:?}"
        ))),
    }
}

fn nullable_text(row: &Row, index: usize) -> Result<Option<String>> {
    match value(row, index)? {
        Value::Null => Ok(None),
        Value::Text(value) => Ok(Some(value.clone())),
        other => Err(Error::Sqlite(format!(
            "column {index}: expected text, found {other:?}"
        ))),
    }
}

fn real(row: &Row, index: usize) -> Result<f64> {
    match value(row, index)? {
        Value::Real(value) => Ok(*value),
        Value::Integer(value) => Ok(*value as f64),
        other => Err(Error::Sqlite(format!(
            "column {index}: expected a number, found {other:?}"
        ))),
    }
}

fn utc(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

fn count(row: &Row, index: usize) -> Result<u64> {
    Ok(nullable_i64(row, index)?.map_or(0, |value| u64::try_from(value).unwrap_or(0)))
}

/// UTC milliseconds of a time the store's shared code works with.
fn millis(time: chrono::NaiveDateTime) -> i64 {
    time.and_utc().timestamp_millis()
}

/// Merges a batch's sightings (the same aggregation the MySQL store uses) into `devices` and
/// `device_minutes`, inside the caller's transaction. Times only move outwards (MIN/MAX), so
/// writing the same sightings again changes nothing.
async fn upsert_sightings(
    connection: &libsql::Connection,
    sightings: &Sightings<'_>,
) -> Result<()> {
    // Each statement compiled once per batch, not once per device or minute: compiling was most
    // of this function's time under `telemetry up` (perf, docs/benchmarks.md).
    if !sightings.devices.is_empty() {
        let devices = connection
            .prepare(
                "INSERT INTO devices (device_id, first_seen, last_seen, last_accepted, last_rejected) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (device_id) DO UPDATE SET \
                   first_seen = MIN(first_seen, excluded.first_seen), \
                   last_seen = MAX(last_seen, excluded.last_seen), \
                   last_accepted = COALESCE(MAX(last_accepted, excluded.last_accepted), \
                                            last_accepted, excluded.last_accepted), \
                   last_rejected = COALESCE(MAX(last_rejected, excluded.last_rejected), \
                                            last_rejected, excluded.last_rejected)",
            )
            .await?;
        for (device_id, sighting) in &sightings.devices {
            devices
                .execute(vec![
                    text(device_id),
                    Value::Integer(millis(sighting.first)),
                    Value::Integer(millis(sighting.last)),
                    optional_integer(sighting.accepted.map(millis)),
                    optional_integer(sighting.rejected.map(millis)),
                ])
                .await?;
            devices.reset();
        }
    }
    if !sightings.minutes.is_empty() {
        let minutes = connection
            .prepare(
                "INSERT INTO device_minutes (device_id, minute, accepted, rejected) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (device_id, minute) DO UPDATE SET \
                   accepted = accepted + excluded.accepted, \
                   rejected = rejected + excluded.rejected",
            )
            .await?;
        for ((device_id, minute), (accepted, rejected)) in &sightings.minutes {
            minutes
                .execute(vec![
                    text(device_id),
                    Value::Integer(millis(*minute)),
                    Value::Integer(i64::from(*accepted)),
                    Value::Integer(i64::from(*rejected)),
                ])
                .await?;
            minutes.reset();
        }
    }
    Ok(())
}

/// Appends ` AND (...)` restricting `column` to the scope's devices. Exact ids compare with `=`
/// (SQLite's BINARY collation: every character counts, trailing spaces too); prefixes with
/// `substr`, since SQLite's LIKE ignores ASCII case.
fn push_scope(
    sql: &mut String,
    params: &mut Vec<Value>,
    column: &str,
    scope: &telemetry_core::DeviceScope,
) {
    use telemetry_core::{DevicePattern, DeviceScope};
    let DeviceScope::Only(patterns) = scope else {
        return;
    };
    sql.push_str(" AND (0");
    for pattern in patterns {
        match pattern {
            DevicePattern::Exact(id) => {
                params.push(text(id));
                sql.push_str(&format!(" OR {column} = ?{}", params.len()));
            }
            DevicePattern::Prefix(prefix) => {
                params.push(text(prefix));
                let index = params.len();
                sql.push_str(&format!(
                    " OR substr({column}, 1, length(?{index})) = ?{index}"
                ));
            }
        }
    }
    sql.push(')');
}

#[async_trait::async_trait]
impl TelemetryStore for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        self.query_rows("SELECT 1", Vec::new()).await.map(drop)
    }

    async fn insert_events_into(&self, table: &Table, records: &[CleanedRecord]) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        let connection = self.writer.lock().await;
        let transaction = connection.transaction().await?;
        let inserted = insert_into(&transaction, table, records).await?;
        transaction.commit().await?;
        Ok(inserted)
    }

    async fn insert_dead_letters(&self, letters: &[NewDeadLetter<'_>]) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let connection = self.writer.lock().await;
        let transaction = connection.transaction().await?;
        let statement = transaction
            .prepare(
                "INSERT INTO dlq_events (source_topic, source_partition, source_offset, device_id, \
                 received_at, code, message, field, rule, contract_version, payload, payload_bytes) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        let mut sightings = Sightings::default();
        for letter in letters {
            let received_at = crate::utc_datetime(letter.received_at)?;
            let kept = &letter.payload[..letter.payload.len().min(MAX_INDEXED_PAYLOAD_BYTES)];
            let changed = statement
                .execute(vec![
                    text(letter.source_topic),
                    Value::Integer(i64::from(letter.source_partition)),
                    Value::Integer(letter.source_offset),
                    optional_text(letter.device_id),
                    Value::Integer(letter.received_at),
                    text(letter.code),
                    text(cut(letter.message, MAX_MESSAGE_CHARS)),
                    optional_text(letter.field.map(|field| cut(field, MAX_TEXT_COLUMN_CHARS))),
                    optional_text(letter.rule.map(|rule| cut(rule, MAX_TEXT_COLUMN_CHARS))),
                    Value::Integer(i64::from(letter.contract_version)),
                    Value::Blob(kept.to_vec()),
                    Value::Integer(i64::try_from(letter.payload.len()).unwrap_or(i64::MAX)),
                ])
                .await?;
            statement.reset();
            if let Some(device_id) = letter.device_id {
                sightings.saw(device_id, received_at, Seen::Rejected);
                if changed > 0 {
                    sightings.count(device_id, received_at, Seen::Rejected);
                }
            }
        }
        drop(statement);
        upsert_sightings(&transaction, &sightings).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn prune_dead_letters(&self, older_than: DateTime<Utc>, keep_rows: u64) -> Result<u64> {
        let mut deleted = self
            .delete_in_batches(
                "DELETE FROM dlq_events WHERE id IN \
                 (SELECT id FROM dlq_events WHERE received_at < ?1 LIMIT ?2)",
                older_than.timestamp_millis(),
            )
            .await?;
        // The newest `keep_rows` rows stay: find the id just below them.
        let cutoff = self
            .query_rows(
                "SELECT id FROM dlq_events ORDER BY id DESC LIMIT 1 OFFSET ?1",
                vec![Value::Integer(i64::try_from(keep_rows).unwrap_or(i64::MAX))],
            )
            .await?;
        if let Some(cutoff) = cutoff.first() {
            deleted += self
                .delete_in_batches(
                    "DELETE FROM dlq_events WHERE id IN \
                     (SELECT id FROM dlq_events WHERE id <= ?1 LIMIT ?2)",
                    integer(cutoff, 0)?,
                )
                .await?;
        }
        Ok(deleted)
    }

    async fn prune_device_minutes(&self, older_than: DateTime<Utc>) -> Result<u64> {
        self.delete_in_batches(
            "DELETE FROM device_minutes WHERE (device_id, minute) IN \
             (SELECT device_id, minute FROM device_minutes WHERE minute < ?1 LIMIT ?2)",
            older_than.timestamp_millis(),
        )
        .await
    }

    async fn devices(
        &self,
        now: DateTime<Utc>,
        page: &DevicePage<'_>,
    ) -> Result<Vec<DeviceSummary>> {
        let hour_ago = millis(crate::queries::minute_of(now - chrono::Duration::hours(1)));
        let day_ago = millis(crate::queries::minute_of(now - chrono::Duration::days(1)));
        // The page is cut from `devices` first (its primary key, in order, from the cursor on);
        // only its devices' minutes are read.
        let mut sql = String::from(
            "SELECT d.device_id, d.first_seen, d.last_seen, d.last_accepted, d.last_rejected, \
                    COALESCE(SUM(CASE WHEN m.minute > ?1 THEN m.accepted ELSE 0 END), 0), \
                    COALESCE(SUM(m.accepted), 0), \
                    COALESCE(SUM(CASE WHEN m.minute > ?1 THEN m.rejected ELSE 0 END), 0), \
                    COALESCE(SUM(m.rejected), 0) \
             FROM (SELECT device_id, first_seen, last_seen, last_accepted, last_rejected \
                   FROM devices WHERE 1 = 1",
        );
        let mut params = vec![Value::Integer(hour_ago), Value::Integer(day_ago)];
        if let Some(after) = page.after {
            params.push(text(after));
            sql.push_str(&format!(" AND device_id > ?{}", params.len()));
        }
        push_scope(&mut sql, &mut params, "device_id", page.scope);
        params.push(Value::Integer(i64::from(page.limit)));
        sql.push_str(&format!(
            " ORDER BY device_id LIMIT ?{}) d \
             LEFT JOIN device_minutes m ON m.device_id = d.device_id AND m.minute > ?2 \
             GROUP BY d.device_id, d.first_seen, d.last_seen, d.last_accepted, d.last_rejected \
             ORDER BY d.device_id",
            params.len()
        ));
        let rows = self.query_rows(&sql, params).await?;
        let mut devices = Vec::with_capacity(rows.len());
        for row in &rows {
            devices.push(DeviceSummary {
                device_id: string(row, 0)?,
                first_seen: utc(integer(row, 1)?),
                last_seen: utc(integer(row, 2)?),
                last_accepted: nullable_i64(row, 3)?.map(utc),
                last_rejected: nullable_i64(row, 4)?.map(utc),
                events_last_hour: count(row, 5)?,
                events_last_day: count(row, 6)?,
                dlq_last_hour: count(row, 7)?,
                dlq_last_day: count(row, 8)?,
                metrics: Vec::new(),
            });
        }
        if devices.is_empty() {
            return Ok(devices);
        }
        // Each listed device's latest row by device time: the newest end of its primary-key
        // range, one index step per device (SQLite finds MAX alone that way; with GROUP BY it
        // would read every row of the device).
        let placeholders = (1..=devices.len())
            .map(|index| format!("?{index}"))
            .collect::<Vec<_>>()
            .join(", ");
        let latest = self
            .query_rows(
                &format!(
                    "SELECT t.device_id, t.metrics \
                     FROM (SELECT d.device_id, \
                                  (SELECT MAX(x.device_ts) FROM telemetry x \
                                   WHERE x.device_id = d.device_id) AS device_ts \
                           FROM devices d WHERE d.device_id IN ({placeholders})) latest \
                     JOIN telemetry t \
                       ON t.device_id = latest.device_id AND t.device_ts = latest.device_ts"
                ),
                devices
                    .iter()
                    .map(|device| text(&device.device_id))
                    .collect(),
            )
            .await?;
        let mut names = Vec::with_capacity(latest.len());
        for row in &latest {
            let device_id = string(row, 0)?;
            let metrics = string(row, 1)?;
            let listed: Vec<String> =
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&metrics)
                    .map(|metrics| metrics.into_iter().map(|(name, _)| name).collect())
                    .unwrap_or_default();
            names.push((device_id, listed));
        }
        crate::queries::add_metric_names(&mut devices, names);
        Ok(devices)
    }

    async fn device_exists(&self, device_id: &str) -> Result<bool> {
        let rows = self
            .query_rows(
                "SELECT 1 FROM devices WHERE device_id = ?1",
                vec![text(device_id)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn first_event_ts(&self, device_id: &str) -> Result<Option<i64>> {
        let rows = self
            .query_rows(
                "SELECT MIN(device_ts) FROM telemetry WHERE device_id = ?1",
                vec![text(device_id)],
            )
            .await?;
        match rows.first() {
            Some(row) => nullable_i64(row, 0),
            None => Ok(None),
        }
    }

    async fn series(&self, query: &SeriesQuery<'_>) -> Result<Vec<Bucket>> {
        let bucket_millis = query.bucket.num_milliseconds().max(1);
        let origin = query.from.timestamp_millis();
        let rows = self
            .query_rows(
                "SELECT bucket, COUNT(reading), MIN(reading), AVG(reading), MAX(reading) \
                 FROM (SELECT (device_ts - ?1) / ?2 AS bucket, \
                              json_extract(metrics, ?3) AS reading \
                       FROM telemetry \
                       WHERE device_id = ?4 AND device_ts >= ?1 AND device_ts < ?5) \
                 WHERE typeof(reading) IN ('integer', 'real') \
                 GROUP BY bucket ORDER BY bucket",
                vec![
                    Value::Integer(origin),
                    Value::Integer(bucket_millis),
                    Value::Text(crate::queries::json_path(query.metric)),
                    text(query.device_id),
                    Value::Integer(query.to.timestamp_millis()),
                ],
            )
            .await?;
        let mut buckets = Vec::with_capacity(rows.len());
        for row in &rows {
            let index = integer(row, 0)?;
            buckets.push(Bucket {
                start: origin.saturating_add(index.saturating_mul(bucket_millis)),
                count: count(row, 1)?,
                min: real(row, 2)?,
                avg: real(row, 3)?,
                max: real(row, 4)?,
            });
        }
        Ok(buckets)
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter<'_>) -> Result<Vec<DeadLetterEntry>> {
        // substr of a BLOB counts bytes (the CAST in case a row holds TEXT).
        let mut sql = String::from(
            "SELECT id, received_at, device_id, code, message, field, rule, contract_version, \
                    source_topic, source_partition, source_offset, \
                    substr(CAST(payload AS BLOB), 1, ?1), payload_bytes \
             FROM dlq_events WHERE 1 = 1",
        );
        let mut params = vec![Value::Integer(i64::from(filter.max_payload_bytes))];
        if let Some(device_id) = filter.device_id {
            params.push(text(device_id));
            sql.push_str(&format!(" AND device_id = ?{}", params.len()));
        }
        if let Some(code) = filter.code {
            params.push(text(code));
            sql.push_str(&format!(" AND code = ?{}", params.len()));
        }
        push_scope(&mut sql, &mut params, "device_id", filter.scope);
        params.push(Value::Integer(i64::from(filter.limit)));
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", params.len()));
        let rows = self.query_rows(&sql, params).await?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            entries.push(DeadLetterEntry {
                id: u64::try_from(integer(row, 0)?).unwrap_or(0),
                received_at: utc(integer(row, 1)?),
                device_id: nullable_text(row, 2)?,
                code: string(row, 3)?,
                message: string(row, 4)?,
                field: nullable_text(row, 5)?,
                rule: nullable_text(row, 6)?,
                contract_version: u32::try_from(integer(row, 7)?).unwrap_or(0),
                source_topic: string(row, 8)?,
                source_partition: i32::try_from(integer(row, 9)?).unwrap_or(0),
                source_offset: integer(row, 10)?,
                payload: blob(row, 11)?,
                payload_bytes: u32::try_from(integer(row, 12)?).unwrap_or(u32::MAX),
            });
        }
        Ok(entries)
    }

    async fn count_events(&self) -> Result<u64> {
        self.scalar_u64("SELECT COUNT(*) FROM telemetry", Vec::new())
            .await
    }

    async fn count_dead_letters(&self) -> Result<u64> {
        self.scalar_u64("SELECT COUNT(*) FROM dlq_events", Vec::new())
            .await
    }

    async fn rollup_coverage(&self, device_id: &str) -> Result<Option<RollupCoverage>> {
        self.coverage(device_id).await
    }

    async fn rollup_series(
        &self,
        resolution: Resolution,
        device_id: &str,
        metric: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        bucket_ms: i64,
    ) -> Result<Vec<Bucket>> {
        self.rolled_up_series(resolution, device_id, metric, from, to, bucket_ms)
            .await
    }

    async fn recent_alerts(
        &self,
        device_id: Option<&str>,
        scope: &telemetry_core::DeviceScope,
        firing_only: bool,
        limit: u32,
    ) -> Result<Vec<AlertEntry>> {
        self.latest_alerts(device_id, scope, firing_only, limit)
            .await
    }

    async fn roll_up(&self, events: &[Event], late_window_ms: i64) -> Result<RollupOutcome> {
        self.fold(events, late_window_ms).await
    }

    async fn rollup_rows(
        &self,
        resolution: Resolution,
        devices: &[&str],
    ) -> Result<Vec<RollupRow>> {
        self.rows_of(resolution, devices).await
    }

    async fn alert_states(&self) -> Result<Vec<AlertStateRow>> {
        self.stored_alert_states().await
    }

    async fn alert_offsets(&self, group_id: &str) -> Result<Vec<AlertOffset>> {
        self.stored_alert_offsets(group_id).await
    }

    async fn save_alerts(
        &self,
        group_id: &str,
        offsets: &[AlertOffset],
        states: &[(&str, &str, Option<&str>)],
        alerts: &[NewAlert<'_>],
        webhook: bool,
    ) -> Result<()> {
        self.store_alerts(group_id, offsets, states, alerts, webhook)
            .await
    }

    async fn unproduced_alerts(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        self.outbox("produced = 0", limit).await
    }

    async fn mark_alerts_produced(&self, ids: &[u64]) -> Result<()> {
        self.alerts_produced(ids).await
    }

    async fn webhook_queue(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        self.outbox("webhook = 0", limit).await
    }

    async fn webhook_attempted(
        &self,
        id: u64,
        delivered: bool,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        self.webhook_attempt(id, delivered, retry_at).await
    }

    async fn prune_alert_outbox(&self, before: DateTime<Utc>) -> Result<u64> {
        self.prune_outbox(before).await
    }

    async fn lock_dlq_replay(&self) -> Result<crate::ReplayLock> {
        self.lock_replays()
    }

    async fn replay_dead_letter(
        &self,
        position: &crate::DlqPosition,
        record: &CleanedRecord,
        cleaned: &str,
    ) -> Result<crate::DeadLetterReplay> {
        self.replay_one(position, record, cleaned).await
    }

    async fn pending_cleaned(&self) -> Result<Vec<(crate::DlqPosition, String, String)>> {
        self.pending_replays().await
    }

    async fn mark_cleaned_produced(&self, positions: &[crate::DlqPosition]) -> Result<()> {
        self.mark_replays_produced(positions).await
    }

    async fn prepare_rebuild(&self, table: &Table) -> Result<()> {
        self.rebuild_into(table).await
    }

    async fn swap_into_live(&self, table: &Table, keep_as: &Table) -> Result<()> {
        self.swap_live(table, keep_as).await
    }
}
