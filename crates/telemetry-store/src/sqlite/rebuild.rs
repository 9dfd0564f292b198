//! Rebuilding the table on the SQLite store (`telemetry replay --into`, `replay swap`): a copy of
//! the live table's schema written from the raw history, then swapped in, as on MySQL
//! (`crate::Store::create_table_like_live`, `check_like_live`, `swap_into_live`).

use super::{integer, read_all, string, text, SqliteStore};
use crate::{Error, Result, Table};

impl SqliteStore {
    /// Creates `table` as a copy of the live table's schema (its indexes too) when it is missing,
    /// then checks that its columns are the live table's. A no-op for the live table.
    pub(super) async fn rebuild_into(&self, table: &Table) -> Result<()> {
        if table.is_live() {
            return Ok(());
        }
        let connection = self.writer.lock().await;
        let transaction = connection
            .transaction_with_behavior(libsql::TransactionBehavior::Immediate)
            .await?;
        let exists = !read_all(
            &transaction,
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            vec![text(table.name())],
        )
        .await?
        .is_empty();
        if !exists {
            // `sql` is the live table's CREATE statement; its body (from the first parenthesis)
            // is the schema to copy. A table's name is a checked identifier (`Table::new`).
            let schema = read_all(
                &transaction,
                "SELECT type, name, sql FROM sqlite_master \
                 WHERE tbl_name = 'telemetry' AND type IN ('table', 'index') AND sql IS NOT NULL \
                 ORDER BY type DESC, name",
                Vec::new(),
            )
            .await?;
            let mut taken: std::collections::HashSet<String> = read_all(
                &transaction,
                "SELECT name FROM sqlite_master WHERE type = 'index'",
                Vec::new(),
            )
            .await?
            .iter()
            .map(|row| string(row, 0))
            .collect::<Result<_>>()?;
            for row in &schema {
                let (kind, name, sql) = (string(row, 0)?, string(row, 1)?, string(row, 2)?);
                let statement = match kind.as_str() {
                    "table" => sql
                        .find('(')
                        .map(|body| format!("CREATE TABLE \"{}\" {}", table.name(), &sql[body..])),
                    // Named after the copy and the original, numbered when that name is taken:
                    // index names are database-wide, and tables swapped out keep theirs.
                    "index" => index_columns(&sql).map(|columns| {
                        let unique = if sql.starts_with("CREATE UNIQUE") {
                            "UNIQUE "
                        } else {
                            ""
                        };
                        let base = format!("{}_{}", table.name(), name.replace('"', ""));
                        let mut index = base.clone();
                        let mut number = 1;
                        while taken.contains(&index) {
                            number += 1;
                            index = format!("{base}_{number}");
                        }
                        taken.insert(index.clone());
                        format!(
                            "CREATE {unique}INDEX \"{index}\" ON \"{}\" {columns}",
                            table.name(),
                        )
                    }),
                    _ => None,
                };
                let Some(statement) = statement else {
                    return Err(Error::Sqlite(format!("cannot copy the schema entry {sql}")));
                };
                transaction.execute(&statement, ()).await?;
            }
        }
        transaction.commit().await?;
        drop(connection);
        self.check_like_live(table).await
    }

    /// Whether `table`'s columns (name, type, nullability, key) are the live table's.
    async fn check_like_live(&self, table: &Table) -> Result<()> {
        let columns = |name: String| async move {
            let connection = self.writer.lock().await;
            let rows = read_all(
                &connection,
                "SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1) ORDER BY cid",
                vec![text(&name)],
            )
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(format!(
                        "{} {} {} {}",
                        string(row, 0)?,
                        string(row, 1)?,
                        integer(row, 2)?,
                        integer(row, 3)?
                    ))
                })
                .collect::<Result<Vec<_>>>()
        };
        let live = columns(String::from("telemetry")).await?;
        let copy = columns(table.name().to_string()).await?;
        if copy == live {
            Ok(())
        } else {
            Err(Error::NotLikeLive(table.name().to_string()))
        }
    }

    /// Makes `table` the live table and keeps the live one as `keep_as`, in one transaction.
    pub(super) async fn swap_live(&self, table: &Table, keep_as: &Table) -> Result<()> {
        self.check_like_live(table).await?;
        let connection = self.writer.lock().await;
        let transaction = connection
            .transaction_with_behavior(libsql::TransactionBehavior::Immediate)
            .await?;
        transaction
            .execute(
                &format!("ALTER TABLE telemetry RENAME TO \"{}\"", keep_as.name()),
                (),
            )
            .await?;
        transaction
            .execute(
                &format!("ALTER TABLE \"{}\" RENAME TO telemetry", table.name()),
                (),
            )
            .await?;
        transaction.commit().await?;
        Ok(())
    }
}

/// What follows the table name in an index's `CREATE` statement (its columns, and a `WHERE` when
/// partial): from the first parenthesis after the `ON` keyword, however it is spaced or cased.
fn index_columns(sql: &str) -> Option<&str> {
    // ASCII lowercasing keeps byte offsets.
    let lower = sql.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let on = (1..bytes.len().saturating_sub(2)).find(|&at| {
        bytes[at - 1].is_ascii_whitespace()
            && &bytes[at..at + 2] == b"on"
            && (bytes[at + 2].is_ascii_whitespace() || bytes[at + 2] == b'"')
    })?;
    let columns = sql[on..].find('(')? + on;
    Some(&sql[columns..])
}

#[cfg(test)]
mod tests {
    use super::index_columns;

    #[test]
    fn an_index_is_read_however_its_on_is_written() {
        for sql in [
            "CREATE INDEX i ON telemetry (received_at)",
            "CREATE INDEX i on telemetry(received_at)",
            "CREATE INDEX \"i\"\n  ON \"telemetry\" (received_at)",
        ] {
            assert_eq!(index_columns(sql), Some("(received_at)"), "{sql}");
        }
        assert_eq!(
            index_columns("CREATE UNIQUE INDEX i ON telemetry (a) WHERE a > 0"),
            Some("(a) WHERE a > 0")
        );
        assert_eq!(index_columns("CREATE INDEX broken"), None);
    }
}
