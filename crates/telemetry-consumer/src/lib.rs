//! The skeleton of a service that consumes Kafka and writes the database: the audit service, the
//! rollup and the alerter are each this plus their own work.
//!
//! [`Service::run`] serves `/healthz`, `/readyz` and `/metrics` on the service's address, opens
//! the store (migrated with the owner's account when given: [`DatabaseConfig`]), passes the
//! `database` readiness check, creates the topics it reads and writes, then hands the service's
//! work a [`Started`]: the store, its [`Writes`] and the shutdown token. When the work ends
//! (at shutdown, or on an error) the listener is stopped and joined. The work reads with
//! [`telemetry_kafka::BatchConsumer`] and writes through [`Writes::halving`]: retried while the
//! database is unavailable, split in halves around the records it refuses, timed, and followed by
//! `/readyz`.

use std::future::Future;
use std::sync::Arc;

use telemetry_kafka::KafkaConfig;
use telemetry_metrics::{series, DB_WRITE_DURATION, DB_WRITE_RETRIES};
use telemetry_ops::{HttpLimits, ListenError, Readiness};
use telemetry_retry::Halved;
pub use telemetry_store::DatabaseConfig;
use telemetry_store::DynStore;
use tokio_util::sync::CancellationToken;

/// The readiness check a consumer reports on `/readyz`: passing while the database answers.
pub const DATABASE: &str = "database";

/// A consumer service: its name, where it serves, its database and its topics.
#[derive(Debug, Clone, Copy)]
pub struct Service<'a> {
    /// The `service` label of its metrics, and its name in logs.
    pub service: &'static str,
    /// Address of its HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub listen: &'a str,
    /// That server's limits.
    pub http: &'a HttpLimits,
    /// Its database.
    pub database: &'a DatabaseConfig,
    /// Connections in its pool unless the configuration says otherwise.
    pub connections: u32,
    /// Its Kafka settings.
    pub kafka: &'a KafkaConfig,
    /// The topics it reads or writes, created when missing.
    pub topics: &'a [&'a str],
}

/// What a consumer's work is given once the service is set up.
pub struct Started {
    /// The store, opened and migrated.
    pub store: DynStore,
    /// Its database writes, as `/readyz` and the metrics see them.
    pub writes: Writes,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
}

impl Service<'_> {
    /// Runs the service until `shutdown` is cancelled or `work` ends: the work's result, or why
    /// the service could not be set up.
    pub async fn run<E, F, Fut>(self, shutdown: CancellationToken, work: F) -> Result<(), E>
    where
        E: From<ListenError> + From<telemetry_store::Error> + From<telemetry_kafka::Error>,
        F: FnOnce(Started) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let server = telemetry_ops::HttpServer::bind(self.listen).await?;
        let readiness = Readiness::new(&[DATABASE]);
        let server = server.spawn(
            telemetry_ops::router(readiness.clone()),
            self.service,
            self.http,
            shutdown.clone(),
        );
        let result = self.start(readiness, &shutdown, work).await;
        shutdown.cancel();
        telemetry_ops::join(server).await?;
        result
    }

    async fn start<E, F, Fut>(
        self,
        readiness: Arc<Readiness>,
        shutdown: &CancellationToken,
        work: F,
    ) -> Result<(), E>
    where
        E: From<telemetry_store::Error> + From<telemetry_kafka::Error>,
        F: FnOnce(Started) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let Some(store) = self
            .database
            .open_writer(self.connections, shutdown)
            .await?
        else {
            return Ok(()); // Stopped while the database was unreachable.
        };
        readiness.set(DATABASE, true);
        telemetry_kafka::ensure_topics(self.kafka, self.topics).await?;
        work(Started {
            store,
            writes: Writes::new(self.service, readiness),
            shutdown: shutdown.clone(),
        })
        .await
    }
}

/// A consumer's database writes as `/readyz` (the `database` check) and its metrics
/// (`db_write_duration_seconds`, `db_write_retries_total`) see them.
#[derive(Clone)]
pub struct Writes {
    readiness: Arc<Readiness>,
    duration: metrics::Histogram,
    retries: metrics::Counter,
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Writes {
    /// The writes of `service`, followed by `readiness` (which needs the [`DATABASE`] check).
    pub fn new(service: &'static str, readiness: Arc<Readiness>) -> Self {
        Writes {
            readiness,
            duration: DB_WRITE_DURATION.histogram_of(series!(service)),
            retries: DB_WRITE_RETRIES.counter_of(series!(service)),
        }
    }

    /// Whether the last write found the database answering.
    pub fn is_ready(&self) -> bool {
        self.readiness
            .snapshot()
            .get(DATABASE)
            .copied()
            .unwrap_or(false)
    }

    /// One write: timed when it succeeds. The database answered when it succeeded or refused
    /// the data itself ([`telemetry_store::Error::is_data_error`]): `/readyz` passes; otherwise
    /// it fails and the write counts as one to retry.
    pub async fn attempt<T>(
        &self,
        write: impl Future<Output = telemetry_store::Result<T>>,
    ) -> telemetry_store::Result<T> {
        let started = std::time::Instant::now();
        let result = write.await;
        match &result {
            Ok(_) => {
                self.duration.record(started.elapsed().as_secs_f64());
                self.readiness.set(DATABASE, true);
            }
            Err(error) if error.is_data_error() => self.readiness.set(DATABASE, true),
            Err(_) => {
                self.readiness.set(DATABASE, false);
                self.retries.increment(1);
            }
        }
        result
    }

    /// [`Writes::attempt`] for a write retried whole, never split around what the database
    /// refuses (the alerter's one transaction per batch): any failure holds the service up, so
    /// `/readyz` fails and the write counts as one to retry, a refusal of the data too.
    pub async fn attempt_whole<T>(
        &self,
        write: impl Future<Output = telemetry_store::Result<T>>,
    ) -> telemetry_store::Result<T> {
        let result = self.attempt(write).await;
        if matches!(&result, Err(error) if error.is_data_error()) {
            self.readiness.set(DATABASE, false);
            self.retries.increment(1);
        }
        result
    }

    /// Writes `items` with `write`, each call through [`Writes::attempt`]: retried while the
    /// database is unavailable, and split in halves around the items it refuses until each is
    /// alone ([`telemetry_retry::retry_halving`]). `None` when `shutdown` came first.
    pub async fn halving<'a, T, O, F, Fut>(
        &self,
        what: &str,
        items: &'a [T],
        shutdown: &CancellationToken,
        mut write: F,
    ) -> Option<Halved<O, telemetry_store::Error>>
    where
        F: FnMut(&'a [T]) -> Fut,
        Fut: Future<Output = telemetry_store::Result<O>>,
    {
        telemetry_retry::retry_halving(
            what,
            items,
            shutdown,
            telemetry_store::Error::is_data_error,
            |chunk| self.attempt(write(chunk)),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes() -> Writes {
        Writes::new("consumer-test", Readiness::new(&[DATABASE]))
    }

    #[tokio::test]
    async fn the_database_counts_as_answering_when_it_writes_or_refuses_the_data() {
        let writes = writes();
        assert!(!writes.is_ready());
        let written = writes.attempt(async { Ok(3) }).await;
        assert!(matches!(written, Ok(3)));
        assert!(writes.is_ready());
        let unreachable = writes
            .attempt(async { Err::<(), _>(telemetry_store::Error::Sqlite("gone".into())) })
            .await;
        assert!(unreachable.is_err());
        assert!(!writes.is_ready());
        let refused = writes
            .attempt(async { Err::<(), _>(telemetry_store::Error::SqliteData("CHECK".into())) })
            .await;
        assert!(refused.is_err());
        assert!(writes.is_ready());
        // Retried whole, a refusal holds the service up as an outage does.
        let refused = writes
            .attempt_whole(async {
                Err::<(), _>(telemetry_store::Error::SqliteData("CHECK".into()))
            })
            .await;
        assert!(refused.is_err());
        assert!(!writes.is_ready());
    }

    #[tokio::test]
    async fn refused_items_are_set_aside_and_the_others_written_once() {
        let writes = writes();
        let items: Vec<u32> = (0..10).collect();
        let calls = std::sync::Mutex::new(Vec::new());
        let halved = writes
            .halving("Writing", &items, &CancellationToken::new(), |chunk| {
                calls.lock().unwrap().push(chunk.to_vec());
                let refuse = chunk.contains(&7);
                let len = chunk.len();
                async move {
                    if refuse {
                        Err(telemetry_store::Error::SqliteData("no sevens".into()))
                    } else {
                        Ok(len)
                    }
                }
            })
            .await
            .unwrap();
        let refused: Vec<usize> = halved.refused.iter().map(|(index, _)| *index).collect();
        assert_eq!(refused, [7]);
        let written: usize = halved.done.iter().map(|(_, count)| count).sum();
        assert_eq!(written, 9);
        assert!(writes.is_ready());
    }
}
