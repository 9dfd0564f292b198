//! The alerter's tables: `alert_states` (where every rule stands for every device, as the
//! engine's JSON) and `alert_outbox` (alerts fired or resolved, until Kafka and the webhook have
//! them). Written only by `telemetry alert`.

use chrono::{DateTime, Utc};
use sqlx::{MySql, QueryBuilder, Row as _};

use crate::{Result, Store, ROWS_PER_STATEMENT};

/// One stored state: rule name, device, the engine's state as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertStateRow {
    /// The rule's name.
    pub rule: String,
    /// The device.
    pub device_id: String,
    /// The state, as the alerter wrote it (JSON).
    pub state: String,
}

/// Where the alerter's state stands in one partition: the next offset it has not seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertOffset {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset to evaluate.
    pub next_offset: i64,
}

/// An alert fired or resolved, to write to the outbox.
#[derive(Debug, Clone, Copy)]
pub struct NewAlert<'a> {
    /// `rule:device:start`.
    pub alert_id: &'a str,
    /// `firing` or `resolved`.
    pub status: &'a str,
    /// The device (the Kafka key).
    pub device_id: &'a str,
    /// The alert as JSON: the alerts topic's value and the webhook's body.
    pub payload: &'a str,
}

/// An alert in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Outbox order.
    pub id: u64,
    /// `rule:device:start`.
    pub alert_id: String,
    /// `firing` or `resolved`.
    pub status: String,
    /// The device.
    pub device_id: String,
    /// The alert as JSON.
    pub payload: String,
    /// Webhook attempts so far.
    pub attempts: u32,
    /// When the next webhook attempt is due.
    pub next_attempt_at: DateTime<Utc>,
}

/// An alert as the API lists it: the JSON written when it fired, and the one written when it
/// resolved, if it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertEntry {
    /// The alert as it fired (JSON).
    pub fired: String,
    /// The alert as it resolved (JSON), while it has not: `None`.
    pub resolved: Option<String>,
}

/// `alert_outbox.webhook`: waiting for delivery.
pub(crate) const WEBHOOK_WAITING: u8 = 0;
/// Delivered.
const WEBHOOK_DELIVERED: u8 = 1;
/// Given up after the last attempt.
const WEBHOOK_GIVEN_UP: u8 = 2;
/// No webhook configured when the alert was written.
pub(crate) const WEBHOOK_NONE: u8 = 3;

/// `alert_outbox.webhook` after an attempt, and the next attempt's time if there is one:
/// delivered, to be tried again at `retry_at`, or (`None`) given up.
pub(crate) fn webhook_after(
    delivered: bool,
    retry_at: Option<DateTime<Utc>>,
) -> (u8, Option<DateTime<Utc>>) {
    match (delivered, retry_at) {
        (true, _) => (WEBHOOK_DELIVERED, None),
        (false, Some(at)) => (WEBHOOK_WAITING, Some(at)),
        (false, None) => (WEBHOOK_GIVEN_UP, None),
    }
}

impl Store {
    /// Every stored alert state.
    pub async fn alert_states(&self) -> Result<Vec<AlertStateRow>> {
        let rows = sqlx::query(
            "SELECT CAST(rule AS CHAR) AS rule, CAST(device_id AS CHAR) AS device_id, \
                    CAST(state AS CHAR) AS state FROM alert_states",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AlertStateRow {
                    rule: row.try_get("rule")?,
                    device_id: row.try_get("device_id")?,
                    state: row.try_get("state")?,
                })
            })
            .collect()
    }

    /// The offsets `group_id`'s states reflect; empty before its first start.
    pub async fn alert_offsets(&self, group_id: &str) -> Result<Vec<AlertOffset>> {
        let rows = sqlx::query(
            "SELECT topic, kafka_partition, next_offset FROM alert_offsets WHERE group_id = ?",
        )
        .bind(group_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AlertOffset {
                    topic: row.try_get("topic")?,
                    partition: row.try_get("kafka_partition")?,
                    next_offset: row.try_get("next_offset")?,
                })
            })
            .collect()
    }

    /// In one transaction: stores the changed states (`Some`) and deletes the emptied ones
    /// (`None`), adds `alerts` to the outbox (an alert already there is left as it is), and moves
    /// `group_id`'s offsets forward to `offsets`. `webhook`: whether the alerts are to be POSTed.
    pub async fn save_alerts(
        &self,
        group_id: &str,
        offsets: &[AlertOffset],
        states: &[(&str, &str, Option<&str>)],
        alerts: &[NewAlert<'_>],
        webhook: bool,
    ) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        if !offsets.is_empty() {
            let mut upsert = QueryBuilder::<MySql>::new(
                "INSERT INTO alert_offsets (group_id, topic, kafka_partition, next_offset) ",
            );
            upsert.push_values(offsets, |mut values, offset| {
                values
                    .push_bind(group_id)
                    .push_bind(&offset.topic)
                    .push_bind(offset.partition)
                    .push_bind(offset.next_offset);
            });
            upsert.push(
                " ON DUPLICATE KEY UPDATE next_offset = GREATEST(next_offset, VALUES(next_offset))",
            );
            upsert
                .build()
                .persistent(false)
                .execute(&mut *transaction)
                .await?;
        }
        let (stored, emptied): (Vec<_>, Vec<_>) =
            states.iter().partition(|(_, _, state)| state.is_some());
        for chunk in stored.chunks(ROWS_PER_STATEMENT) {
            let mut upsert =
                QueryBuilder::<MySql>::new("INSERT INTO alert_states (rule, device_id, state) ");
            upsert.push_values(chunk, |mut values, (rule, device_id, state)| {
                values
                    .push_bind(*rule)
                    .push_bind(*device_id)
                    .push_bind(state.unwrap_or("{}"));
            });
            upsert.push(" ON DUPLICATE KEY UPDATE state = VALUES(state)");
            upsert
                .build()
                .persistent(false)
                .execute(&mut *transaction)
                .await?;
        }
        for chunk in emptied.chunks(ROWS_PER_STATEMENT) {
            let mut delete =
                QueryBuilder::<MySql>::new("DELETE FROM alert_states WHERE (rule, device_id) IN ");
            delete.push_tuples(chunk, |mut tuple, (rule, device_id, _)| {
                tuple.push_bind(*rule).push_bind(*device_id);
            });
            delete
                .build()
                .persistent(false)
                .execute(&mut *transaction)
                .await?;
        }
        let webhook = if webhook {
            WEBHOOK_WAITING
        } else {
            WEBHOOK_NONE
        };
        for chunk in alerts.chunks(ROWS_PER_STATEMENT) {
            let mut insert = QueryBuilder::<MySql>::new(
                "INSERT IGNORE INTO alert_outbox (alert_id, status, device_id, payload, webhook) ",
            );
            insert.push_values(chunk, |mut values, alert| {
                values
                    .push_bind(alert.alert_id)
                    .push_bind(alert.status)
                    .push_bind(alert.device_id)
                    .push_bind(alert.payload)
                    .push_bind(webhook);
            });
            insert
                .build()
                .persistent(false)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// The oldest alerts not yet acknowledged by Kafka, in outbox order.
    pub async fn unproduced_alerts(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        self.outbox("produced = FALSE", limit).await
    }

    /// Marks alerts as acknowledged by Kafka.
    pub async fn mark_alerts_produced(&self, ids: &[u64]) -> Result<()> {
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut update =
                QueryBuilder::<MySql>::new("UPDATE alert_outbox SET produced = TRUE WHERE id IN (");
            let mut separated = update.separated(", ");
            for id in chunk {
                separated.push_bind(*id);
            }
            update.push(")");
            update.build().persistent(false).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// The oldest alerts waiting for the webhook, in outbox order (due or not).
    pub async fn webhook_queue(&self, limit: u32) -> Result<Vec<OutboxEntry>> {
        self.outbox("webhook = 0", limit).await
    }

    /// Records a webhook attempt: delivered, to be tried again at `retry_at`, or (`None`) given
    /// up.
    pub async fn webhook_attempted(
        &self,
        id: u64,
        delivered: bool,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let (webhook, next) = webhook_after(delivered, retry_at);
        let next = next.map(|at| at.naive_utc());
        sqlx::query(
            "UPDATE alert_outbox SET webhook = ?, attempts = attempts + 1, \
                    next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
        )
        .bind(webhook)
        .bind(next)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest alerts (by when they fired), firing or resolved, of `device_id` or of all
    /// devices; from the outbox, so the last week of them.
    pub async fn recent_alerts(
        &self,
        device_id: Option<&str>,
        scope: &telemetry_core::DeviceScope,
        firing_only: bool,
        limit: u32,
    ) -> Result<Vec<AlertEntry>> {
        let mut query = sqlx::QueryBuilder::<sqlx::MySql>::new(
            "SELECT CAST(fired.payload AS CHAR) AS fired, CAST(resolved.payload AS CHAR) AS resolved \
             FROM alert_outbox fired \
             LEFT JOIN alert_outbox resolved \
                 ON resolved.alert_id = fired.alert_id AND resolved.status = 'resolved' \
             WHERE fired.status = 'firing'",
        );
        if let Some(device_id) = device_id {
            query.push(" AND ");
            crate::queries::push_device_is(&mut query, "fired.device_id", device_id);
        }
        crate::queries::push_scope(&mut query, "fired.device_id", scope);
        if firing_only {
            query.push(" AND resolved.id IS NULL");
        }
        query
            .push(" ORDER BY fired.id DESC LIMIT ")
            .push_bind(limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(AlertEntry {
                    fired: row.try_get("fired")?,
                    resolved: row.try_get("resolved")?,
                })
            })
            .collect()
    }

    /// Deletes outbox rows that are done (produced, webhook not waiting) and older than `before`.
    pub async fn prune_alert_outbox(&self, before: DateTime<Utc>) -> Result<u64> {
        // An alert still firing keeps its row: the API lists it.
        let done = sqlx::query(
            "DELETE FROM alert_outbox WHERE produced = TRUE AND webhook <> 0 AND created_at < ? \
                 AND (status = 'resolved' OR alert_id IN \
                     (SELECT alert_id FROM (SELECT alert_id FROM alert_outbox \
                                            WHERE status = 'resolved') AS done)) \
             LIMIT 10000",
        )
        .bind(before.naive_utc())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn outbox(&self, condition: &str, limit: u32) -> Result<Vec<OutboxEntry>> {
        let rows = sqlx::query(&format!(
            "SELECT id, CAST(alert_id AS CHAR) AS alert_id, status, \
                    CAST(device_id AS CHAR) AS device_id, CAST(payload AS CHAR) AS payload, \
                    attempts, next_attempt_at \
             FROM alert_outbox WHERE {condition} ORDER BY id LIMIT ?"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(OutboxEntry {
                    id: row.try_get("id")?,
                    alert_id: row.try_get("alert_id")?,
                    status: row.try_get("status")?,
                    device_id: row.try_get("device_id")?,
                    payload: row.try_get("payload")?,
                    attempts: row.try_get("attempts")?,
                    next_attempt_at: row
                        .try_get::<chrono::NaiveDateTime, _>("next_attempt_at")?
                        .and_utc(),
                })
            })
            .collect()
    }
}
