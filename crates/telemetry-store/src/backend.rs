//! The store as the audit service and the API see it: one trait, [`TelemetryStore`], with a MySQL
//! implementation ([`Store`], the production default) and a SQLite one ([`SqliteStore`], the
//! embedded default of `telemetry up`). `tests/contract.rs` runs one suite against both: same
//! rows, same idempotence, same answers to the API's queries.
//!
//! The trait covers every service's writes and reads: the audit service (rows, DLQ index), the
//! rollup (its buckets), the alerter (states, outbox, offsets) and the API. `tests/contract.rs`
//! runs the same suites against both.
//!
//! Which one a URL opens: `mysql://...` the MySQL store, `sqlite://<path>` the SQLite store.
//! Rebuilding tables (`telemetry replay --into`) and the DLQ replay stay MySQL only: they use
//! [`Store`] directly.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use telemetry_core::event::CleanedRecord;
use telemetry_core::Event;

use crate::dead_letters::ReplayLock;
use crate::{
    AlertEntry, AlertOffset, AlertStateRow, Bucket, DeadLetterEntry, DeadLetterFilter,
    DeadLetterReplay, DevicePage, DeviceSummary, DlqPosition, NewAlert, NewDeadLetter, OutboxEntry,
    Resolution, Result, RollupCoverage, RollupOutcome, RollupRow, SeriesQuery, SqliteStore, Store,
    Table,
};

/// What the audit service writes and the API reads, whatever the database.
#[async_trait::async_trait]
pub trait TelemetryStore: Send + Sync + std::fmt::Debug {
    /// Which database this is, for logs: `mysql` or `sqlite`.
    fn kind(&self) -> &'static str;

    /// Whether the database answers.
    async fn ping(&self) -> Result<()>;

    /// Inserts the events into `table` in one transaction, idempotently (an event whose identity
    /// (device_id, device_ts, seq) is stored is skipped); for the live table also notes the
    /// devices as seen and counts the new rows per minute of arrival. Returns how many were new.
    async fn insert_events_into(&self, table: &Table, records: &[CleanedRecord]) -> Result<u64>;

    /// Indexes rejected records idempotently (by raw topic, partition, offset), noting and
    /// counting their devices.
    async fn insert_dead_letters(&self, letters: &[NewDeadLetter<'_>]) -> Result<()>;

    /// Deletes DLQ index rows received before `older_than` and the oldest beyond `keep_rows`.
    async fn prune_dead_letters(&self, older_than: DateTime<Utc>, keep_rows: u64) -> Result<u64>;

    /// Deletes per-minute device counts from before `older_than`.
    async fn prune_device_minutes(&self, older_than: DateTime<Utc>) -> Result<u64>;

    /// One page of the devices seen, sorted by id (as the database orders ids), with their
    /// counts for the hour and day before `now`.
    async fn devices(
        &self,
        now: DateTime<Utc>,
        page: &DevicePage<'_>,
    ) -> Result<Vec<DeviceSummary>>;

    /// Whether the device has been seen.
    async fn device_exists(&self, device_id: &str) -> Result<bool>;

    /// The device time (UTC ms) of the device's earliest stored event.
    async fn first_event_ts(&self, device_id: &str) -> Result<Option<i64>>;

    /// The metric's readings in the range, aggregated per bucket; only buckets with readings, in
    /// time order.
    async fn series(&self, query: &SeriesQuery<'_>) -> Result<Vec<Bucket>>;

    /// The newest indexed rejected records matching `filter`, payloads cut by the query.
    async fn dead_letters(&self, filter: &DeadLetterFilter<'_>) -> Result<Vec<DeadLetterEntry>>;

    /// Rows in the live table.
    async fn count_events(&self) -> Result<u64>;

    /// Rows in the DLQ index.
    async fn count_dead_letters(&self) -> Result<u64>;

    /// The rollups' coverage of the device; `None` where there are no rollups (SQLite: `up`
    /// runs no rollup service, so the API reads raw rows).
    async fn rollup_coverage(&self, device_id: &str) -> Result<Option<RollupCoverage>>;

    /// Rollup buckets (see [`Store::rollup_series`]); empty where there are no rollups.
    async fn rollup_series(
        &self,
        resolution: Resolution,
        device_id: &str,
        metric: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        bucket_ms: i64,
    ) -> Result<Vec<Bucket>>;

    /// The newest alerts (see [`Store::recent_alerts`]); empty where there is no alerter.
    async fn recent_alerts(
        &self,
        device_id: Option<&str>,
        scope: &telemetry_core::DeviceScope,
        firing_only: bool,
        limit: u32,
    ) -> Result<Vec<AlertEntry>>;

    /// The rollup: folds `events` (in stream order) into the minute and hour tables in one
    /// transaction, each event once (see [`Store::roll_up`]).
    async fn roll_up(&self, events: &[Event], late_window_ms: i64) -> Result<RollupOutcome>;

    /// Every row of a rollup table for `devices` (all when empty), in key order.
    async fn rollup_rows(&self, resolution: Resolution, devices: &[&str])
        -> Result<Vec<RollupRow>>;

    /// The alerter: every stored rule state.
    async fn alert_states(&self) -> Result<Vec<AlertStateRow>>;

    /// The offsets `group_id`'s alert states reflect; empty before its first start.
    async fn alert_offsets(&self, group_id: &str) -> Result<Vec<AlertOffset>>;

    /// In one transaction: the changed states (`Some`) stored and the emptied ones (`None`)
    /// deleted, `alerts` added to the outbox (an alert there already is left as it is), and
    /// `group_id`'s offsets moved forward (never back) to `offsets` (see [`Store::save_alerts`]).
    async fn save_alerts(
        &self,
        group_id: &str,
        offsets: &[AlertOffset],
        states: &[(&str, &str, Option<&str>)],
        alerts: &[NewAlert<'_>],
        webhook: bool,
    ) -> Result<()>;

    /// The oldest alerts not yet acknowledged by Kafka, in outbox order.
    async fn unproduced_alerts(&self, limit: u32) -> Result<Vec<OutboxEntry>>;

    /// Marks alerts as acknowledged by Kafka.
    async fn mark_alerts_produced(&self, ids: &[u64]) -> Result<()>;

    /// The oldest alerts waiting for the webhook, in outbox order (due or not).
    async fn webhook_queue(&self, limit: u32) -> Result<Vec<OutboxEntry>>;

    /// Records a webhook attempt: delivered, to be tried again at `retry_at`, or (`None`) given
    /// up.
    async fn webhook_attempted(
        &self,
        id: u64,
        delivered: bool,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<()>;

    /// Deletes outbox rows that are done (produced, webhook not waiting, the alert resolved) and
    /// older than `before`.
    async fn prune_alert_outbox(&self, before: DateTime<Utc>) -> Result<u64>;

    /// `telemetry dlq replay`: one replay at a time per database, until the lock is dropped
    /// (also when the process dies); [`crate::Error::Busy`] while another holds it.
    async fn lock_dlq_replay(&self) -> Result<ReplayLock>;

    /// Replays one accepted DLQ record: notes it in the replay ledger and inserts its row in one
    /// transaction (see [`Store::replay_dead_letter`]).
    async fn replay_dead_letter(
        &self,
        position: &DlqPosition,
        record: &CleanedRecord,
        cleaned: &str,
    ) -> Result<DeadLetterReplay>;

    /// Replayed DLQ records whose cleaned record Kafka has not acknowledged yet: position,
    /// device id and the cleaned record's JSON, oldest first.
    async fn pending_cleaned(&self) -> Result<Vec<(DlqPosition, String, String)>>;

    /// Notes that Kafka acknowledged the cleaned records of `positions`.
    async fn mark_cleaned_produced(&self, positions: &[DlqPosition]) -> Result<()>;

    /// `telemetry replay --into`: creates `table` as a copy of the live table's schema when it is
    /// missing, and checks that its columns are the live table's ([`crate::Error::NotLikeLive`]
    /// when not). Events then go in with [`TelemetryStore::insert_events_into`].
    async fn prepare_rebuild(&self, table: &Table) -> Result<()>;

    /// `telemetry replay swap`: makes `table` the live table, the live one kept as `keep_as`.
    async fn swap_into_live(&self, table: &Table, keep_as: &Table) -> Result<()>;
}

/// A store shared by the tasks of a service.
pub type DynStore = Arc<dyn TelemetryStore>;

/// Whether `url` names the SQLite store.
pub fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// For writers: opens the store `url` names, creating and migrating its schema; MySQL is retried
/// with backoff while unreachable (see [`Store::connect_migrated`]). `None` when `shutdown` came
/// first.
pub async fn open_migrated(
    url: &str,
    max_connections: u32,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Option<DynStore>> {
    if is_sqlite_url(url) {
        return Ok(Some(Arc::new(SqliteStore::open(url).await?)));
    }
    Ok(Store::connect_migrated(url, max_connections, shutdown)
        .await?
        .map(|store| Arc::new(store) as DynStore))
}

/// For tools run by hand (`telemetry dlq replay`, `replay`): opens the store `url` names, failing
/// (not waiting) when MySQL is unreachable. A schema that is behind is migrated if the account
/// may, or the tool stops and asks for `telemetry migrate`; a current one is left alone, so the
/// writer's account (DML alone) will do.
pub async fn open_now(url: &str, max_connections: u32) -> Result<DynStore> {
    if is_sqlite_url(url) {
        return Ok(Arc::new(SqliteStore::open(url).await?));
    }
    let store = Store::connect(url, max_connections).await?;
    store.ensure_schema().await?;
    Ok(Arc::new(store))
}

/// For readers: opens the store `url` names without changing its schema (MySQL connects lazily;
/// SQLite creates the schema when the file is new, so a reader started first finds empty tables).
pub async fn open_reader(url: &str, max_connections: u32) -> Result<DynStore> {
    open_bounded_reader(url, max_connections, None).await
}

/// [`open_reader`] with a statement timeout on every query (none when `None` or zero): MySQL and
/// MariaDB stop a statement running longer on the server (see [`Store::connect_reader`]); the
/// SQLite store interrupts it (see [`SqliteStore::with_statement_timeout`]). Either way the
/// query fails with an error for which [`crate::Error::is_statement_timeout`] holds.
pub async fn open_bounded_reader(
    url: &str,
    max_connections: u32,
    statement_timeout: Option<Duration>,
) -> Result<DynStore> {
    if is_sqlite_url(url) {
        let store = SqliteStore::open(url).await?;
        return Ok(Arc::new(match statement_timeout {
            Some(timeout) => store.with_statement_timeout(timeout)?,
            None => store,
        }));
    }
    Ok(Arc::new(Store::connect_reader(
        url,
        max_connections,
        statement_timeout,
    )?))
}

#[async_trait::async_trait]
impl TelemetryStore for Store {
    fn kind(&self) -> &'static str {
        "mysql"
    }

    async fn ping(&self) -> Result<()> {
        Store::ping(self).await
    }

    async fn insert_events_into(&self, table: &Table, records: &[CleanedRecord]) -> Result<u64> {
        Store::insert_events_into(self, table, records).await
    }

    async fn insert_dead_letters(&self, letters: &[NewDeadLetter<'_>]) -> Result<()> {
        Store::insert_dead_letters(self, letters).await
    }

    async fn prune_dead_letters(&self, older_than: DateTime<Utc>, keep_rows: u64) -> Result<u64> {
        Store::prune_dead_letters(self, older_than, keep_rows).await
    }

    async fn prune_device_minutes(&self, older_than: DateTime<Utc>) -> Result<u64> {
        Store::prune_device_minutes(self, older_than).await
    }

    async fn devices(
        &self,
        now: DateTime<Utc>,
        page: &DevicePage<'_>,
    ) -> Result<Vec<DeviceSummary>> {
        Store::devices(self, now, page).await
    }

    async fn device_exists(&self, device_id: &str) -> Result<bool> {
        Store::device_exists(self, device_id).await
    }

    async fn first_event_ts(&self, device_id: &str) -> Result<Option<i64>> {
        Store::first_event_ts(self, device_id).await
    }

    async fn series(&self, query: &SeriesQuery<'_>) -> Result<Vec<Bucket>> {
        Store::series(self, query).await
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter<'_>) -> Result<Vec<DeadLetterEntry>> {
        Store::dead_letters(self, filter).await
    }

    async fn count_events(&self) -> Result<u64> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
            .fetch_one(self.pool())
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn count_dead_letters(&self) -> Result<u64> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dlq_events")
            .fetch_one(self.pool())
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn rollup_coverage(&self, device_id: &str) -> Result<Option<RollupCoverage>> {
        Store::rollup_coverage(self, device_id).await
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
        Store::rollup_series(self, resolution, device_id, metric, from, to, bucket_ms).await
    }

    async fn recent_alerts(
        &self,
        device_id: Option<&str>,
        scope: &telemetry_core::DeviceScope,
        firing_only: bool,
        limit: u32,
    ) -> Result<Vec<AlertEntry>> {
        Store::recent_alerts(self, device_id, scope, firing_only, limit).await
    }

    async fn roll_up(&self, events: &[Event], late_window_ms: i64) -> Result<RollupOutcome> {
        Store::roll_up(self, events, late_window_ms).await
    }

    async fn rollup_rows(
        &self,
        resolution: Resolution,
        devices: &[&str],
    ) -> Result<Vec<RollupRow>> {
        Store::rollup_rows(self, resolution, devices).await
    }

    async fn alert_states(&self) -> Result<Vec<AlertStateRow>> {
        Store::alert_states(self).await
    }

    async fn alert_offsets(&self, group_id: &str) -> Result<Vec<AlertOffset>> {
        Store::alert_offsets(self, group_id).await
    }

    async fn save_alerts(
        &self,
        group_id: &str,
        offsets: &[AlertOffset],
        states: &[(&str, &str, Option<&str>)],
        alerts: &[NewAlert<'_>],
        webhook: bool,
    ) -> Result<()> {
        Store::save_alerts(self, group_id, offsets, states, alerts, webhook).await
    }

    async fn unproduced_alerts(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        Store::unproduced_alerts(self, limit).await
    }

    async fn mark_alerts_produced(&self, ids: &[u64]) -> Result<()> {
        Store::mark_alerts_produced(self, ids).await
    }

    async fn webhook_queue(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        Store::webhook_queue(self, limit).await
    }

    async fn webhook_attempted(
        &self,
        id: u64,
        delivered: bool,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        Store::webhook_attempted(self, id, delivered, retry_at).await
    }

    async fn prune_alert_outbox(&self, before: DateTime<Utc>) -> Result<u64> {
        Store::prune_alert_outbox(self, before).await
    }

    async fn lock_dlq_replay(&self) -> Result<ReplayLock> {
        Ok(ReplayLock::new(Store::lock_dlq_replay(self).await?))
    }

    async fn replay_dead_letter(
        &self,
        position: &DlqPosition,
        record: &CleanedRecord,
        cleaned: &str,
    ) -> Result<DeadLetterReplay> {
        Store::replay_dead_letter(self, position, record, cleaned).await
    }

    async fn pending_cleaned(&self) -> Result<Vec<(DlqPosition, String, String)>> {
        Store::pending_cleaned(self).await
    }

    async fn mark_cleaned_produced(&self, positions: &[DlqPosition]) -> Result<()> {
        Store::mark_cleaned_produced(self, positions).await
    }

    async fn prepare_rebuild(&self, table: &Table) -> Result<()> {
        self.create_table_like_live(table).await?;
        self.check_like_live(table).await
    }

    async fn swap_into_live(&self, table: &Table, keep_as: &Table) -> Result<()> {
        Store::swap_into_live(self, table, keep_as).await
    }
}
