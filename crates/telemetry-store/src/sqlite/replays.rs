//! `telemetry dlq replay` on the SQLite store (`migrations/sqlite/0004_dlq_replays.sql`): the same
//! ledger as the MySQL store's (`crate::dead_letters`), written in the row's transaction.

use libsql::Value;

use super::{insert_live, integer, nullable_text, string, text, SqliteStore};
use crate::dead_letters::{DeadLetterReplay, DlqPosition, ReplayLock};
use crate::{Error, Result};
use telemetry_core::event::CleanedRecord;

impl SqliteStore {
    /// See [`crate::Store::replay_dead_letter`].
    pub(super) async fn replay_one(
        &self,
        position: &DlqPosition,
        record: &CleanedRecord,
        cleaned: &str,
    ) -> Result<DeadLetterReplay> {
        let connection = self.writer.lock().await;
        let transaction = connection
            .transaction_with_behavior(libsql::TransactionBehavior::Immediate)
            .await?;
        let claimed = transaction
            .execute(
                "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, device_id, cleaned) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                vec![
                    text(&position.topic),
                    Value::Integer(i64::from(position.partition)),
                    Value::Integer(position.offset),
                    text(&record.event.device_id),
                    text(cleaned),
                ],
            )
            .await?;
        if claimed == 0 {
            return Ok(DeadLetterReplay::AlreadyReplayed); // Rolled back as the transaction drops.
        }
        let inserted = insert_live(&transaction, std::slice::from_ref(record)).await?;
        let outcome = if inserted == 1 {
            DeadLetterReplay::Stored
        } else {
            // As the MySQL store: produced already unless `telemetry replay` stored it from this
            // very raw record.
            let event = &record.event;
            let rows = super::read_all(
                &transaction,
                "SELECT source_topic, source_partition, source_offset FROM telemetry \
                 WHERE device_id = ?1 AND device_ts = ?2 AND seq_key = ?3",
                vec![
                    text(&event.device_id),
                    Value::Integer(event.device_ts),
                    Value::Integer(event.seq.unwrap_or(crate::NO_SEQ)),
                ],
            )
            .await?;
            let same_source = match rows.first() {
                Some(row) => {
                    string(row, 0)? == record.source.topic
                        && integer(row, 1)? == i64::from(record.source.partition)
                        && integer(row, 2)? == record.source.offset
                }
                None => false,
            };
            if !same_source {
                mark_produced(&transaction, std::slice::from_ref(position)).await?;
            }
            DeadLetterReplay::AlreadyStored
        };
        transaction.commit().await?;
        Ok(outcome)
    }

    /// See [`crate::Store::lock_dlq_replay`]: an exclusive lock on a file beside the database,
    /// released when the returned lock is dropped or the process ends.
    pub(super) fn lock_replays(&self) -> Result<ReplayLock> {
        let mut name = self.path.clone().into_os_string();
        name.push(".dlq-replay.lock");
        let path = std::path::PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| Error::Sqlite(format!("cannot open {}: {error}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(ReplayLock::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(Error::Busy("another `telemetry dlq replay` is running"))
            }
            Err(std::fs::TryLockError::Error(error)) => Err(Error::Sqlite(format!(
                "cannot lock {}: {error}",
                path.display()
            ))),
        }
    }

    /// See [`crate::Store::pending_cleaned`].
    pub(super) async fn pending_replays(&self) -> Result<Vec<(DlqPosition, String, String)>> {
        let rows = self
            .query_rows(
                "SELECT dlq_topic, dlq_partition, dlq_offset, device_id, cleaned FROM dlq_replays \
                 WHERE produced = 0 AND cleaned IS NOT NULL ORDER BY replayed_at, dlq_partition, dlq_offset",
                Vec::new(),
            )
            .await?;
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(cleaned) = nullable_text(row, 4)? else {
                continue;
            };
            pending.push((
                DlqPosition {
                    topic: string(row, 0)?,
                    partition: i32::try_from(integer(row, 1)?).unwrap_or(i32::MAX),
                    offset: integer(row, 2)?,
                },
                string(row, 3)?,
                cleaned,
            ));
        }
        Ok(pending)
    }

    /// See [`crate::Store::mark_cleaned_produced`].
    pub(super) async fn mark_replays_produced(&self, positions: &[DlqPosition]) -> Result<()> {
        let connection = self.writer.lock().await;
        let transaction = connection
            .transaction_with_behavior(libsql::TransactionBehavior::Immediate)
            .await?;
        mark_produced(&transaction, positions).await?;
        transaction.commit().await?;
        Ok(())
    }
}

async fn mark_produced(connection: &libsql::Connection, positions: &[DlqPosition]) -> Result<()> {
    for position in positions {
        connection
            .execute(
                "UPDATE dlq_replays SET produced = 1, cleaned = NULL \
                 WHERE dlq_topic = ?1 AND dlq_partition = ?2 AND dlq_offset = ?3",
                vec![
                    text(&position.topic),
                    Value::Integer(i64::from(position.partition)),
                    Value::Integer(position.offset),
                ],
            )
            .await?;
    }
    Ok(())
}
