//! The alerter's tables in the SQLite store (`migrations/sqlite/0003_alerts.sql`): the same
//! states, outbox and offsets as the MySQL store's (`crate::alerts`), times in UTC milliseconds.

use chrono::{DateTime, Utc};
use libsql::Value;

use super::{integer, nullable_text, push_scope, string, text, utc, SqliteStore};
use crate::alerts::{webhook_after, WEBHOOK_NONE, WEBHOOK_WAITING};
use crate::{AlertEntry, AlertOffset, AlertStateRow, NewAlert, OutboxEntry, Result};

/// Most outbox rows one pruning call deletes (as the MySQL store).
const PRUNE_LIMIT: i64 = 10_000;

impl SqliteStore {
    /// See [`crate::Store::alert_states`].
    pub(super) async fn stored_alert_states(&self) -> Result<Vec<AlertStateRow>> {
        let rows = self
            .query_rows(
                "SELECT rule, device_id, state FROM alert_states",
                Vec::new(),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(AlertStateRow {
                    rule: string(row, 0)?,
                    device_id: string(row, 1)?,
                    state: string(row, 2)?,
                })
            })
            .collect()
    }

    /// See [`crate::Store::alert_offsets`].
    pub(super) async fn stored_alert_offsets(&self, group_id: &str) -> Result<Vec<AlertOffset>> {
        let rows = self
            .query_rows(
                "SELECT topic, kafka_partition, next_offset FROM alert_offsets WHERE group_id = ?1",
                vec![text(group_id)],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(AlertOffset {
                    topic: string(row, 0)?,
                    partition: i32::try_from(integer(row, 1)?).unwrap_or(i32::MAX),
                    next_offset: integer(row, 2)?,
                })
            })
            .collect()
    }

    /// See [`crate::Store::save_alerts`].
    pub(super) async fn store_alerts(
        &self,
        group_id: &str,
        offsets: &[AlertOffset],
        states: &[(&str, &str, Option<&str>)],
        alerts: &[NewAlert<'_>],
        webhook: bool,
    ) -> Result<()> {
        let connection = self.writer.lock().await;
        let transaction = connection
            .transaction_with_behavior(libsql::TransactionBehavior::Immediate)
            .await?;
        for offset in offsets {
            transaction
                .execute(
                    "INSERT INTO alert_offsets (group_id, topic, kafka_partition, next_offset) \
                     VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (group_id, topic, kafka_partition) DO UPDATE SET \
                       next_offset = MAX(next_offset, excluded.next_offset)",
                    vec![
                        text(group_id),
                        text(&offset.topic),
                        Value::Integer(i64::from(offset.partition)),
                        Value::Integer(offset.next_offset),
                    ],
                )
                .await?;
        }
        // A state per device the batch moved: prepared once for the batch.
        let upsert = transaction
            .prepare(
                "INSERT INTO alert_states (rule, device_id, state) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (rule, device_id) DO UPDATE SET state = excluded.state, \
                   updated_at = CAST(unixepoch('subsec') * 1000 AS INTEGER)",
            )
            .await?;
        let delete = transaction
            .prepare("DELETE FROM alert_states WHERE rule = ?1 AND device_id = ?2")
            .await?;
        for (rule, device_id, state) in states {
            match state {
                Some(state) => {
                    upsert
                        .execute(vec![text(rule), text(device_id), text(state)])
                        .await?;
                    upsert.reset();
                }
                None => {
                    delete.execute(vec![text(rule), text(device_id)]).await?;
                    delete.reset();
                }
            }
        }
        drop((upsert, delete));
        let webhook = if webhook {
            WEBHOOK_WAITING
        } else {
            WEBHOOK_NONE
        };
        for alert in alerts {
            transaction
                .execute(
                    "INSERT INTO alert_outbox (alert_id, status, device_id, payload, webhook) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                    vec![
                        text(alert.alert_id),
                        text(alert.status),
                        text(alert.device_id),
                        text(alert.payload),
                        Value::Integer(i64::from(webhook)),
                    ],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// The outbox rows matching `condition`, oldest first.
    pub(super) async fn outbox(&self, condition: &str, limit: u32) -> Result<Vec<OutboxEntry>> {
        let rows = self
            .query_rows(
                &format!(
                    "SELECT id, alert_id, status, device_id, payload, attempts, next_attempt_at \
                     FROM alert_outbox WHERE {condition} ORDER BY id LIMIT ?1"
                ),
                vec![Value::Integer(i64::from(limit))],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(OutboxEntry {
                    id: u64::try_from(integer(row, 0)?).unwrap_or(0),
                    alert_id: string(row, 1)?,
                    status: string(row, 2)?,
                    device_id: string(row, 3)?,
                    payload: string(row, 4)?,
                    attempts: u32::try_from(integer(row, 5)?).unwrap_or(u32::MAX),
                    next_attempt_at: utc(integer(row, 6)?),
                })
            })
            .collect()
    }

    /// See [`crate::Store::mark_alerts_produced`].
    pub(super) async fn alerts_produced(&self, ids: &[u64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let connection = self.writer.lock().await;
        let transaction = connection.transaction().await?;
        for id in ids {
            transaction
                .execute(
                    "UPDATE alert_outbox SET produced = 1 WHERE id = ?1",
                    vec![Value::Integer(i64::try_from(*id).unwrap_or(i64::MAX))],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// See [`crate::Store::webhook_attempted`].
    pub(super) async fn webhook_attempt(
        &self,
        id: u64,
        delivered: bool,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let (webhook, next) = webhook_after(delivered, retry_at);
        let next = next.map(|at| at.timestamp_millis());
        let connection = self.writer.lock().await;
        connection
            .execute(
                "UPDATE alert_outbox SET webhook = ?1, attempts = attempts + 1, \
                        next_attempt_at = COALESCE(?2, next_attempt_at) WHERE id = ?3",
                vec![
                    Value::Integer(i64::from(webhook)),
                    next.map_or(Value::Null, Value::Integer),
                    Value::Integer(i64::try_from(id).unwrap_or(i64::MAX)),
                ],
            )
            .await?;
        Ok(())
    }

    /// See [`crate::Store::recent_alerts`].
    pub(super) async fn latest_alerts(
        &self,
        device_id: Option<&str>,
        scope: &telemetry_core::DeviceScope,
        firing_only: bool,
        limit: u32,
    ) -> Result<Vec<AlertEntry>> {
        let mut sql = String::from(
            "SELECT fired.payload, resolved.payload \
             FROM alert_outbox fired \
             LEFT JOIN alert_outbox resolved \
                 ON resolved.alert_id = fired.alert_id AND resolved.status = 'resolved' \
             WHERE fired.status = 'firing'",
        );
        let mut params = Vec::new();
        if let Some(device_id) = device_id {
            params.push(text(device_id));
            sql.push_str(&format!(" AND fired.device_id = ?{}", params.len()));
        }
        push_scope(&mut sql, &mut params, "fired.device_id", scope);
        if firing_only {
            sql.push_str(" AND resolved.id IS NULL");
        }
        params.push(Value::Integer(i64::from(limit)));
        sql.push_str(&format!(" ORDER BY fired.id DESC LIMIT ?{}", params.len()));
        let rows = self.query_rows(&sql, params).await?;
        rows.iter()
            .map(|row| {
                Ok(AlertEntry {
                    fired: string(row, 0)?,
                    resolved: nullable_text(row, 1)?,
                })
            })
            .collect()
    }

    /// See [`crate::Store::prune_alert_outbox`].
    pub(super) async fn prune_outbox(&self, before: DateTime<Utc>) -> Result<u64> {
        let connection = self.writer.lock().await;
        let deleted = connection
            .execute(
                "DELETE FROM alert_outbox WHERE id IN \
                 (SELECT id FROM alert_outbox \
                  WHERE produced = 1 AND webhook <> 0 AND created_at < ?1 \
                    AND (status = 'resolved' OR alert_id IN \
                         (SELECT alert_id FROM alert_outbox WHERE status = 'resolved')) \
                  LIMIT ?2)",
                vec![
                    Value::Integer(before.timestamp_millis()),
                    Value::Integer(PRUNE_LIMIT),
                ],
            )
            .await?;
        Ok(deleted)
    }
}
