//! The DLQ index: recent rejected records with their reason and original bytes, so the API can
//! list them by device and code without reading the DLQ topic. Written by the audit service in
//! the same step that produces the records to the DLQ topic; bounded by [`Store::prune_dead_letters`].

use sqlx::{MySql, QueryBuilder};

use telemetry_core::event::CleanedRecord;

use crate::{
    is_duplicate_key, literal, utc_datetime, Error, Result, Seen, Sightings, Store, Table,
};

/// Longest part of the original payload kept in the index; the DLQ topic keeps it whole.
pub const MAX_INDEXED_PAYLOAD_BYTES: usize = 64 * 1024;

/// Longest `field` and `rule` kept (the columns' width); longer ones are cut.
pub(crate) const MAX_TEXT_COLUMN_CHARS: usize = 255;

/// Longest `message` kept: messages quote a field name and a value, and a name may be long.
pub(crate) const MAX_MESSAGE_CHARS: usize = 4_096;

/// Rows per INSERT: payloads may be up to 64 KiB each, so far fewer rows than for events keep a
/// statement with bound values under the server's packet limit (16 MiB by default on MariaDB).
/// A batch goes as text (one round trip) only when its payloads are small
/// ([`crate::TEXT_TRANSACTION_BYTES`]).
const DEAD_LETTERS_PER_STATEMENT: usize = 100;

/// The columns an index entry is written with, in the order both write paths give the values
/// (bound, `insert_letters`; literals, `Store::index_new_in_one_round_trip`).
const LETTER_COLUMNS: &str = "(source_topic, source_partition, source_offset, device_id, \
     received_at, code, message, field, rule, contract_version, payload, payload_bytes)";

/// Most rows one pruning statement deletes, so pruning never holds long locks.
const PRUNE_BATCH: u64 = 10_000;

/// A rejected record to index.
#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    /// The raw topic, partition and offset it was read from: its identity in the index.
    pub source_topic: &'a str,
    /// Partition in the raw topic.
    pub source_partition: i32,
    /// Offset in the raw topic.
    pub source_offset: i64,
    /// The device it was published for (the raw record's key), when known.
    pub device_id: Option<&'a str>,
    /// When the bridge received it, UTC milliseconds.
    pub received_at: i64,
    /// The stable reason code.
    pub code: &'a str,
    /// The human-readable reason.
    pub message: &'a str,
    /// The payload field at fault, when one is.
    pub field: Option<&'a str>,
    /// The contract rule that failed, when one did.
    pub rule: Option<&'a str>,
    /// The version of the contract it was checked against.
    pub contract_version: u32,
    /// The original bytes.
    pub payload: &'a [u8],
}

impl Store {
    /// Indexes rejected records, notes their devices as seen and counts them per minute of
    /// arrival. Idempotent: a record already indexed (same raw topic, partition and offset) is
    /// skipped and not counted again.
    pub async fn insert_dead_letters(&self, letters: &[NewDeadLetter<'_>]) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let received = letters
            .iter()
            .map(|letter| utc_datetime(letter.received_at))
            .collect::<Result<Vec<_>>>()?;
        let rows: Vec<_> = letters.iter().zip(received).collect();
        // Hexadecimal doubles the payloads: large ones go with bound values at once.
        let payload_bytes: usize = rows
            .iter()
            .map(|(letter, _)| letter.payload.len().min(MAX_INDEXED_PAYLOAD_BYTES))
            .sum();
        if rows.len() <= DEAD_LETTERS_PER_STATEMENT
            && payload_bytes * 2 < crate::TEXT_TRANSACTION_BYTES
            && self
                .index_new_in_one_round_trip(&rows, payload_bytes)
                .await?
        {
            return Ok(());
        }
        let mut sightings = Sightings::default();
        let mut transaction = self.pool.begin().await?;
        for chunk in rows.chunks(DEAD_LETTERS_PER_STATEMENT) {
            let all: Vec<_> = chunk.iter().collect();
            // As for events: one plain INSERT, and only when it meets an indexed record, find
            // which ones are new.
            let new = match insert_letters(&mut transaction, &all, false).await {
                Ok(()) => all,
                Err(error) if is_duplicate_key(&error) => {
                    let new = new_letters(&mut transaction, chunk).await?;
                    insert_letters(&mut transaction, &new, true).await?;
                    new
                }
                Err(error) => return Err(error.into()),
            };
            for (letter, received_at) in chunk {
                if let Some(device_id) = letter.device_id {
                    sightings.saw(device_id, *received_at, Seen::Rejected);
                }
            }
            for (letter, received_at) in new {
                if let Some(device_id) = letter.device_id {
                    sightings.count(device_id, *received_at, Seen::Rejected);
                }
            }
        }
        sightings.upsert(&mut transaction).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Indexes `rows` and notes their devices in one transaction sent as one text statement (as
    /// the rows of a small batch, `Store::insert_events_into`). `false`, with nothing written,
    /// when one of them is indexed already or repeats: the caller then sorts them.
    async fn index_new_in_one_round_trip(
        &self,
        rows: &[Letter<'_, '_>],
        payload_bytes: usize,
    ) -> Result<bool> {
        let mut sql = String::with_capacity(512 + rows.len() * 600 + payload_bytes * 2);
        sql.push_str("START TRANSACTION;INSERT INTO dlq_events ");
        sql.push_str(LETTER_COLUMNS);
        sql.push_str(" VALUES ");
        let mut sightings = Sightings::default();
        for (place, (letter, received_at)) in rows.iter().enumerate() {
            let kept = &letter.payload[..letter.payload.len().min(MAX_INDEXED_PAYLOAD_BYTES)];
            sql.push_str(if place == 0 { "(" } else { ",(" });
            literal::text(&mut sql, letter.source_topic);
            sql.push(',');
            literal::integer(&mut sql, letter.source_partition);
            sql.push(',');
            literal::integer(&mut sql, letter.source_offset);
            sql.push(',');
            literal::optional_text(&mut sql, letter.device_id);
            sql.push(',');
            literal::datetime(&mut sql, *received_at);
            sql.push(',');
            literal::text(&mut sql, letter.code);
            sql.push(',');
            literal::text(&mut sql, cut(letter.message, MAX_MESSAGE_CHARS));
            sql.push(',');
            literal::optional_text(
                &mut sql,
                letter.field.map(|field| cut(field, MAX_TEXT_COLUMN_CHARS)),
            );
            sql.push(',');
            literal::optional_text(
                &mut sql,
                letter.rule.map(|rule| cut(rule, MAX_TEXT_COLUMN_CHARS)),
            );
            sql.push(',');
            literal::integer(&mut sql, letter.contract_version);
            sql.push(',');
            literal::bytes(&mut sql, kept);
            sql.push(',');
            literal::integer(
                &mut sql,
                u32::try_from(letter.payload.len()).unwrap_or(u32::MAX),
            );
            sql.push(')');
            if let Some(device_id) = letter.device_id {
                sightings.saw(device_id, *received_at, Seen::Rejected);
                sightings.count(device_id, *received_at, Seen::Rejected);
            }
        }
        sql.push(';');
        sightings.push_upserts(&mut sql);
        sql.push_str("COMMIT");
        self.transaction_in_one_round_trip(&sql).await
    }

    /// Deletes index rows received before `older_than`, and the oldest rows beyond `keep_rows`.
    /// Returns how many it deleted. The DLQ topic is not touched.
    pub async fn prune_dead_letters(
        &self,
        older_than: chrono::DateTime<chrono::Utc>,
        keep_rows: u64,
    ) -> Result<u64> {
        let mut deleted = self
            .delete_in_batches(
                "DELETE FROM dlq_events WHERE received_at < ? LIMIT ?",
                older_than.naive_utc(),
            )
            .await?;
        // The newest `keep_rows` rows stay: find the id just below them.
        let cutoff: Option<u64> =
            sqlx::query_scalar("SELECT id FROM dlq_events ORDER BY id DESC LIMIT 1 OFFSET ?")
                .bind(keep_rows)
                .fetch_optional(&self.pool)
                .await?;
        if let Some(cutoff) = cutoff {
            deleted += self
                .delete_in_batches("DELETE FROM dlq_events WHERE id <= ? LIMIT ?", cutoff)
                .await?;
        }
        Ok(deleted)
    }

    /// Deletes per-minute device counts from before `older_than` (the API reads one day back).
    pub async fn prune_device_minutes(
        &self,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64> {
        self.delete_in_batches(
            "DELETE FROM device_minutes WHERE minute < ? LIMIT ?",
            older_than.naive_utc(),
        )
        .await
    }

    /// Runs `delete` (`... WHERE column < ? LIMIT ?`) with `bound` until it deletes fewer than a
    /// batch, so no single statement holds locks for long.
    async fn delete_in_batches<T>(&self, delete: &str, bound: T) -> Result<u64>
    where
        T: for<'q> sqlx::Encode<'q, MySql> + sqlx::Type<MySql> + Copy + Send,
    {
        let mut deleted = 0;
        loop {
            let done = sqlx::query(delete)
                .bind(bound)
                .bind(PRUNE_BATCH)
                .execute(&self.pool)
                .await?
                .rows_affected();
            deleted += done;
            if done < PRUNE_BATCH {
                return Ok(deleted);
            }
        }
    }
}

type Letter<'a, 'b> = (&'a NewDeadLetter<'b>, chrono::NaiveDateTime);

/// Indexes `letters` in one statement; with `skip_indexed`, those already indexed are skipped
/// instead of failing the statement.
async fn insert_letters(
    connection: &mut sqlx::MySqlConnection,
    letters: &[&Letter<'_, '_>],
    skip_indexed: bool,
) -> Result<(), sqlx::Error> {
    if letters.is_empty() {
        return Ok(());
    }
    let mut insert = QueryBuilder::<MySql>::new(if skip_indexed {
        "INSERT IGNORE INTO dlq_events "
    } else {
        "INSERT INTO dlq_events "
    });
    insert.push(LETTER_COLUMNS);
    insert.push(" ");
    insert.push_values(letters, |mut values, (letter, received_at)| {
        let kept = &letter.payload[..letter.payload.len().min(MAX_INDEXED_PAYLOAD_BYTES)];
        values
            .push_bind(letter.source_topic)
            .push_bind(letter.source_partition)
            .push_bind(letter.source_offset)
            .push_bind(letter.device_id)
            .push_bind(*received_at)
            .push_bind(letter.code)
            .push_bind(cut(letter.message, MAX_MESSAGE_CHARS))
            .push_bind(letter.field.map(|field| cut(field, MAX_TEXT_COLUMN_CHARS)))
            .push_bind(letter.rule.map(|rule| cut(rule, MAX_TEXT_COLUMN_CHARS)))
            .push_bind(letter.contract_version)
            .push_bind(kept)
            .push_bind(u32::try_from(letter.payload.len()).unwrap_or(u32::MAX));
    });
    insert
        .build()
        .persistent(false)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// The letters of `chunk` not indexed yet, each source position once.
async fn new_letters<'r, 'a, 'b>(
    connection: &mut sqlx::MySqlConnection,
    chunk: &'r [Letter<'a, 'b>],
) -> Result<Vec<&'r Letter<'a, 'b>>> {
    let mut query = QueryBuilder::<MySql>::new(
        "SELECT source_topic, source_partition, source_offset FROM dlq_events \
         WHERE (source_topic, source_partition, source_offset) IN ",
    );
    query.push_tuples(chunk, |mut tuple, (letter, _)| {
        tuple
            .push_bind(letter.source_topic)
            .push_bind(letter.source_partition)
            .push_bind(letter.source_offset);
    });
    query.push(" FOR UPDATE");
    let indexed: Vec<(String, i32, i64)> = query
        .build_query_as()
        .persistent(false)
        .fetch_all(&mut *connection)
        .await?;
    let mut known: std::collections::HashSet<(String, i32, i64)> = indexed.into_iter().collect();
    Ok(chunk
        .iter()
        .filter(|(letter, _)| {
            known.insert((
                letter.source_topic.to_string(),
                letter.source_partition,
                letter.source_offset,
            ))
        })
        .collect())
}

/// `text` cut to `max_chars` characters.
pub(crate) fn cut(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// Where a record is in the DLQ topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DlqPosition {
    /// The DLQ topic.
    pub topic: String,
    /// Partition in it.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
}

/// Held while a `telemetry dlq replay` runs (see [`crate::TelemetryStore::lock_dlq_replay`]):
/// dropping it releases the lock.
pub struct ReplayLock(#[allow(dead_code)] Box<dyn std::any::Any + Send>);

impl ReplayLock {
    /// A lock held as long as `held` lives.
    pub(crate) fn new(held: impl std::any::Any + Send) -> Self {
        ReplayLock(Box::new(held))
    }
}

impl std::fmt::Debug for ReplayLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayLock")
    }
}

/// What replaying one DLQ record into the table did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReplay {
    /// It had been replayed before: nothing done.
    AlreadyReplayed,
    /// Stored as a new row; its cleaned record waits to be produced.
    Stored,
    /// Its event was in the table already (sent again by the device and accepted): nothing to
    /// produce.
    AlreadyStored,
}

impl Store {
    /// Replays one accepted DLQ record: notes it in the replay ledger and inserts its row, in one
    /// transaction, so each DLQ record is stored once however often it is replayed. The
    /// `cleaned` JSON waits in the ledger until [`Store::mark_cleaned_produced`].
    pub async fn replay_dead_letter(
        &self,
        position: &DlqPosition,
        record: &CleanedRecord,
        cleaned: &str,
    ) -> Result<DeadLetterReplay> {
        let mut transaction = self.pool.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, device_id, cleaned) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&position.topic)
        .bind(position.partition)
        .bind(position.offset)
        .bind(&record.event.device_id)
        .bind(cleaned)
        .execute(&mut *transaction)
        .await;
        match claimed {
            Ok(_) => {}
            Err(error) if is_duplicate_key(&error) => return Ok(DeadLetterReplay::AlreadyReplayed),
            Err(error) => return Err(error.into()),
        }
        let rows = [crate::Row::new(record)?];
        let inserted = crate::insert_in(&mut transaction, &Table::live(), &rows, true).await?;
        let outcome = if inserted == 1 {
            DeadLetterReplay::Stored
        } else {
            // The event is stored. If the audit service stored it (the device sent it again), its
            // cleaned record went out then. If `telemetry replay` stored it from this very raw
            // record (same source), nothing produced it: it stays pending.
            let source: Option<(String, i32, i64)> = sqlx::query_as(
                "SELECT source_topic, source_partition, source_offset FROM telemetry \
                 WHERE device_id = ? AND device_ts = ? AND seq_key = ?",
            )
            .bind(&record.event.device_id)
            .bind(utc_datetime(record.event.device_ts)?)
            .bind(record.event.seq.unwrap_or(-1))
            .fetch_optional(&mut *transaction)
            .await?;
            let same_source = source.is_some_and(|(topic, partition, offset)| {
                topic == record.source.topic
                    && partition == record.source.partition
                    && offset == record.source.offset
            });
            if !same_source {
                mark_produced(&mut transaction, std::slice::from_ref(position)).await?;
            }
            DeadLetterReplay::AlreadyStored
        };
        transaction.commit().await?;
        Ok(outcome)
    }

    /// Holds the database-wide lock of `telemetry dlq replay` until the returned connection is
    /// dropped (closing it releases the lock, also when the process dies). Fails when another
    /// replay holds it.
    pub async fn lock_dlq_replay(&self) -> Result<sqlx::MySqlConnection> {
        let mut connection = self.pool.acquire().await?.detach();
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('telemetry_dlq_replay', 0)")
            .fetch_one(&mut connection)
            .await?;
        if locked == Some(1) {
            Ok(connection)
        } else {
            Err(Error::Busy("another `telemetry dlq replay` is running"))
        }
    }

    /// Replayed DLQ records whose cleaned record Kafka has not acknowledged yet, with that record.
    pub async fn pending_cleaned(&self) -> Result<Vec<(DlqPosition, String, String)>> {
        let rows: Vec<(String, i32, i64, String, Option<String>)> = sqlx::query_as(
            "SELECT dlq_topic, dlq_partition, dlq_offset, CAST(device_id AS CHAR), cleaned \
             FROM dlq_replays WHERE NOT produced ORDER BY replayed_at",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(topic, partition, offset, device_id, cleaned)| {
                cleaned.map(|cleaned| {
                    (
                        DlqPosition {
                            topic,
                            partition,
                            offset,
                        },
                        device_id,
                        cleaned,
                    )
                })
            })
            .collect())
    }

    /// Notes that Kafka acknowledged the cleaned records of `positions`.
    pub async fn mark_cleaned_produced(&self, positions: &[DlqPosition]) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        mark_produced(&mut transaction, positions).await?;
        transaction.commit().await?;
        Ok(())
    }
}

async fn mark_produced(
    connection: &mut sqlx::MySqlConnection,
    positions: &[DlqPosition],
) -> Result<()> {
    for position in positions {
        sqlx::query(
            "UPDATE dlq_replays SET produced = TRUE, cleaned = NULL \
             WHERE dlq_topic = ? AND dlq_partition = ? AND dlq_offset = ?",
        )
        .bind(&position.topic)
        .bind(position.partition)
        .bind(position.offset)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}
