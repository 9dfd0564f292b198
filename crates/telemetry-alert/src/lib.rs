//! `telemetry alert`: evaluates the rules of a rules file (`config/alerts.toml`) over the cleaned
//! topic (thresholds held for a while, silent devices) and the DLQ topic (rejection rates), and
//! sends each alert that fires or resolves to the `telemetry.alerts` topic and, optionally, a
//! webhook. A second consumer built like the rollup: its own consumer group and tables, no change
//! to the bridge or the audit service.
//!
//! Delivery: a batch's state changes, the offsets they reach and the alerts they raise are written
//! in one database transaction (`alert_states`, `alert_offsets`, `alert_outbox`), then the alerts
//! are produced to Kafka, then the batch's Kafka offsets are committed. A crash before the
//! transaction replays the batch into the same alerts (their ids come from the input); after it,
//! the records read again are below the stored offsets and skipped, and the outbox still holds
//! what Kafka has not acknowledged. So every alert fires once and resolves once, across restarts. The webhook is fed from the outbox in order, with retries and backoff,
//! on its own task: a webhook that is down delays its deliveries, never the stream.
//!
//! A group's first start begins at the end of the topics: alerts are about the present, not the
//! retained history.
//!
//! # Layout
//! - `rules`: the rules file. `engine`: the state machine (pure). `webhook`: delivery.
//! - [`run`]: serve `/healthz`, `/readyz`, `/metrics`; connect, restore the states; then batch
//!   (or clock tick) → evaluate (on the tick, also forget devices silent past
//!   `TELEMETRY_ALERT_FORGET_AFTER_SECONDS`) → save → produce → commit.

pub mod engine;
pub mod instruments;
pub mod rules;
mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use telemetry_consumer::{DatabaseConfig, Service, Started, Writes};
use telemetry_core::names::{headers, topics};
use telemetry_core::Event;
use telemetry_kafka::{BatchConsumer, KafkaConfig, Record, RenewableProducer};
use telemetry_metrics::series;
use telemetry_store::{AlertOffset, AlertStateRow, DynStore, NewAlert};
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Key, State, Transition};
use crate::rules::{Rule, Rules};

/// Errors that stop the alerter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rules file is missing or wrong.
    #[error(transparent)]
    Rules(#[from] rules::RulesError),
    /// Kafka set-up failed.
    #[error(transparent)]
    Kafka(#[from] telemetry_kafka::Error),
    /// The database could not be set up.
    #[error(transparent)]
    Store(#[from] telemetry_store::Error),
    /// The HTTP listener could not be bound or served.
    #[error(transparent)]
    Listen(#[from] telemetry_ops::ListenError),
    /// A blocking task failed.
    #[error("a background task failed: {0}")]
    Task(String),
    /// The forget window is too short for a rule.
    #[error(
        "TELEMETRY_ALERT_FORGET_AFTER_SECONDS (--forget-after-seconds) is {forget_after} s, not \
         longer than rule `{rule}`'s {setting} ({duration} s): devices would be forgotten before \
         the rule could judge them"
    )]
    ForgetTooSoon {
        /// The setting's value, in seconds.
        forget_after: u64,
        /// The rule.
        rule: String,
        /// `silent_for` or `window`.
        setting: &'static str,
        /// The rule's duration, in seconds.
        duration: u64,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the alerter reads its rules unless told otherwise (`TELEMETRY_ALERT_RULES`).
pub const DEFAULT_RULES: &str = "config/alerts.toml";

/// Alerter settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AlertConfig {
    /// The alert rules (TOML; see `config/alerts.toml`). Read at start-up: restart to apply
    /// changes.
    #[arg(
        long,
        env = "TELEMETRY_ALERT_RULES",
        default_value = DEFAULT_RULES
    )]
    pub rules: PathBuf,

    /// The database (its pool: 2 connections unless set).
    #[command(flatten)]
    pub database: DatabaseConfig,

    /// Kafka consumer group of the alerter. A new group starts at the end of the topics.
    #[arg(long, env = "TELEMETRY_ALERT_GROUP", default_value = "telemetry-alert")]
    pub group_id: String,

    /// Topic the alerts are produced to.
    #[arg(long, env = "TELEMETRY_ALERTS_TOPIC", default_value = topics::ALERTS)]
    pub alerts_topic: String,

    /// How often silences and DLQ rates are judged against the clock, in milliseconds.
    #[arg(long, env = "TELEMETRY_ALERT_TICK_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub tick_ms: u64,

    /// Forget a device that sent nothing (no event, no rejected record) for this long, in
    /// seconds: its alert states are dropped from memory and from `alert_states`, its firing
    /// alerts resolved first. Bounds the state a flood of made-up device ids can grow. Longer than
    /// every rule's `silent_for` and `window`.
    #[arg(long, env = "TELEMETRY_ALERT_FORGET_AFTER_SECONDS", default_value_t = 604_800,
          value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
    pub forget_after_seconds: u64,

    /// Most records evaluated per batch.
    #[arg(long, env = "TELEMETRY_ALERT_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Address of the HTTP server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long = "alert-listen",
        env = "TELEMETRY_ALERT_LISTEN",
        default_value = "127.0.0.1:8084"
    )]
    pub listen: String,

    /// Header-read and idle timeouts and the connection cap of the HTTP server.
    #[command(flatten)]
    pub http: telemetry_ops::HttpLimits,

    /// Kafka settings.
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

/// Runs the alerter until `shutdown` is cancelled.
pub async fn run(config: AlertConfig, shutdown: CancellationToken) -> Result<()> {
    // Rules that do not load stop the service before it touches anything.
    let rules = Rules::load(&config.rules)?;
    check_forget_window(&rules.rules, config.forget_after_seconds)?;
    // The webhook's origin only: its URL often carries a secret (a Slack or PagerDuty key).
    let webhook = rules.webhook.as_ref().map_or_else(
        || String::from("none"),
        |webhook| telemetry_secrets::redact_url(&webhook.url),
    );
    tracing::info!(
        path = %config.rules.display(),
        rules = rules.rules.len(),
        %webhook,
        "Loaded the alert rules."
    );
    if let Some(mode) = rules
        .webhook
        .as_ref()
        .and_then(|_| telemetry_secrets::open_to_others(&config.rules))
    {
        tracing::warn!(
            file = %config.rules.display(),
            mode = %format!("{mode:04o}"),
            settings = "webhook.url",
            "The alert rules file holds the webhook's URL, which may carry the receiver's key, and \
             users other than its owner can read it: run `chmod 600` on it."
        );
    }
    let kafka = &config.kafka;
    Service {
        service: instruments::SERVICE,
        listen: &config.listen,
        http: &config.http,
        database: &config.database,
        connections: 2,
        kafka,
        topics: &[&kafka.cleaned_topic, &kafka.dlq_topic, &config.alerts_topic],
    }
    .run(shutdown, |started| evaluate(&config, rules, started))
    .await
}

/// Restores the states, then batch (or clock tick) after batch until shutdown.
async fn evaluate(config: &AlertConfig, rules: Rules, started: Started) -> Result<()> {
    let Started {
        store,
        writes,
        shutdown,
    } = started;
    let shutdown = &shutdown;
    let kafka = &config.kafka;
    let topics = [kafka.cleaned_topic.as_str(), kafka.dlq_topic.as_str()];
    let Some(stored) = telemetry_retry::retry("Reading the alert states", shutdown, || {
        store.alert_states()
    })
    .await
    else {
        return Ok(());
    };
    let (restored, orphans) = restore(&rules.rules, stored);
    let forget_after = Duration::from_secs(config.forget_after_seconds);
    let mut engine = Engine::new(rules.rules.clone(), restored).forgetting_after(forget_after);
    held(&engine);
    let webhook = rules.webhook.is_some();
    let outbox = Outbox {
        forget_after,
        store: store.clone(),
        producer: RenewableProducer::new(kafka.producer_config(&[])?, "alert")?,
        topic: config.alerts_topic.clone(),
        group_id: config.group_id.clone(),
        writes: &writes,
        wake_webhook: Arc::new(tokio::sync::Notify::new()),
    };
    let Some(mut offsets) = start_offsets(config, &store, &topics, shutdown).await? else {
        return Ok(());
    };
    // Alerts of rules removed from the file resolve; then what an earlier run wrote but Kafka
    // never acknowledged goes first.
    if !outbox.retire(&orphans, webhook, shutdown).await || !outbox.produce_pending(shutdown).await
    {
        return Ok(());
    }
    // Stopped with this function, also when it is dropped half-way.
    let delivery = rules.webhook.clone().map(|hook| {
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(webhook::deliver(
            store.clone(),
            hook,
            outbox.wake_webhook.clone(),
            shutdown.clone(),
        )))
    });
    tokio::spawn(prune_outbox(store.clone(), shutdown.clone()));
    let consumer = BatchConsumer::with_options(
        kafka,
        &config.group_id,
        &topics,
        // Fresher lag for `is_caught_up`: silences are judged only when the alerter is at the end.
        &[("statistics.interval.ms", "1000")],
    )?;
    tracing::info!(group_id = %config.group_id, alerts_topic = %config.alerts_topic, "Alerter started.");

    let tick = Duration::from_millis(config.tick_ms);
    let batch_size = usize::try_from(config.batch_size).unwrap_or(usize::MAX);
    let slack = i64::from(config.batch_size);
    let mut last_tick = tokio::time::Instant::now();
    while let Some(batch) = consumer
        .next_batch_within(batch_size, Duration::from_millis(20), Some(tick), shutdown)
        .await
    {
        let mut transitions = Vec::new();
        let mut moved: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut observed = 0u64;
        for message in &batch {
            let position = (message.topic().to_string(), message.partition());
            // Evaluated before a crash, its offset not committed yet: the states have it.
            if message.offset() < offsets.get(&position).copied().unwrap_or(0) {
                instruments::counter(&instruments::RECORDS_SKIPPED).increment(1);
                continue;
            }
            observed += 1;
            transitions.extend(observe(&mut engine, message, kafka));
            offsets.insert(position.clone(), message.offset() + 1);
            moved.insert(position, message.offset() + 1);
        }
        instruments::counter(&telemetry_metrics::EVENTS_RECEIVED).increment(observed);
        if last_tick.elapsed() >= tick {
            last_tick = tokio::time::Instant::now();
            let now = Utc::now().timestamp_millis();
            let caught_up = consumer.is_caught_up(slack);
            transitions.extend(engine.tick(now, caught_up));
            let forgotten = engine.forget(now, caught_up);
            if forgotten.devices > 0 {
                instruments::counter(&instruments::DEVICES_FORGOTTEN)
                    .increment(forgotten.devices as u64);
                instruments::counter(&instruments::STATES_FORGOTTEN)
                    .increment(forgotten.states as u64);
                tracing::info!(
                    devices = forgotten.devices,
                    states = forgotten.states,
                    resolved = forgotten.transitions.len(),
                    forget_after_seconds = config.forget_after_seconds,
                    "Forgot devices that sent nothing for longer than the forget window; their firing alerts resolve."
                );
            }
            transitions.extend(forgotten.transitions);
            held(&engine);
        }
        let moved: Vec<AlertOffset> = moved
            .into_iter()
            .map(|((topic, partition), next_offset)| AlertOffset {
                topic,
                partition,
                next_offset,
            })
            .collect();
        if !outbox
            .save(&mut engine, &moved, &transitions, webhook, shutdown)
            .await
        {
            break;
        }
        if !transitions.is_empty() && !outbox.produce_pending(shutdown).await {
            break;
        }
        if !batch.is_empty() {
            consumer.store_offsets(&batch);
        }
    }
    consumer.close(Duration::from_secs(5)).await;
    if let Some(delivery) = delivery {
        // The webhook task ends at the shutdown too; its attempt in flight finishes first.
        let _ = delivery.await;
    }
    tracing::info!("Alerter stopped.");
    Ok(())
}

/// Where the states stand in each partition of `topics`. On the group's first start, the end of
/// every partition (alerts are about the present, not the retained history), stored and also
/// committed to Kafka for the group, so that partitions without traffic start there too.
/// `None` when shut down first.
async fn start_offsets(
    config: &AlertConfig,
    store: &DynStore,
    topics: &[&str],
    shutdown: &CancellationToken,
) -> Result<Option<HashMap<(String, i32), i64>>> {
    let Some(stored) = telemetry_retry::retry("Reading the alert offsets", shutdown, || {
        store.alert_offsets(&config.group_id)
    })
    .await
    else {
        return Ok(None);
    };
    if !stored.is_empty() {
        return Ok(Some(
            stored
                .into_iter()
                .map(|offset| ((offset.topic, offset.partition), offset.next_offset))
                .collect(),
        ));
    }
    let (kafka, names) = (
        config.kafka.clone(),
        topics
            .iter()
            .map(|topic| (*topic).to_string())
            .collect::<Vec<_>>(),
    );
    let ends = tokio::task::spawn_blocking(move || end_offsets(&kafka, &names))
        .await
        .map_err(|error| Error::Task(error.to_string()))??;
    let saved = telemetry_retry::retry("Saving the alert offsets", shutdown, || {
        store.save_alerts(&config.group_id, &ends, &[], &[], false)
    })
    .await;
    if saved.is_none() {
        return Ok(None);
    }
    // After the database: if this commit is lost, the next start reads from the beginning and
    // skips to the stored offsets.
    let (kafka, group_id, commit) = (config.kafka.clone(), config.group_id.clone(), ends.clone());
    match tokio::task::spawn_blocking(move || commit_offsets(&kafka, &group_id, &commit)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "Committing the start offsets to Kafka failed; the first read starts at the beginning and skips to them.")
        }
        Err(error) => tracing::warn!(%error, "Committing the start offsets did not finish."),
    }
    tracing::info!(
        partitions = ends.len(),
        "First start of this alerter group: it starts at the end of its topics."
    );
    Ok(Some(
        ends.into_iter()
            .map(|offset| ((offset.topic, offset.partition), offset.next_offset))
            .collect(),
    ))
}

/// The end (high watermark) of every partition of `topics`. Blocking.
fn end_offsets(kafka: &KafkaConfig, topics: &[String]) -> Result<Vec<AlertOffset>> {
    let client: BaseConsumer = kafka
        .client_config(&[])?
        .create()
        .map_err(telemetry_kafka::Error::from)?;
    let timeout = Duration::from_secs(30);
    let mut ends = Vec::new();
    for topic in topics {
        let metadata = client
            .fetch_metadata(Some(topic), timeout)
            .map_err(telemetry_kafka::Error::from)?;
        for partition in metadata
            .topics()
            .iter()
            .flat_map(|topic| topic.partitions())
        {
            let (_, high) = client
                .fetch_watermarks(topic, partition.id(), timeout)
                .map_err(telemetry_kafka::Error::from)?;
            ends.push(AlertOffset {
                topic: topic.clone(),
                partition: partition.id(),
                next_offset: high,
            });
        }
    }
    Ok(ends)
}

/// Commits `offsets` for `group_id` (a group with no member yet). Blocking.
fn commit_offsets(
    kafka: &KafkaConfig,
    group_id: &str,
    offsets: &[AlertOffset],
) -> Result<(), telemetry_kafka::Error> {
    let client: BaseConsumer = kafka.client_config(&[("group.id", group_id)])?.create()?;
    let mut list = TopicPartitionList::new();
    for offset in offsets {
        list.add_partition_offset(
            &offset.topic,
            offset.partition,
            Offset::Offset(offset.next_offset),
        )?;
    }
    client.commit(&list, CommitMode::Sync)?;
    Ok(())
}

/// The stored states of the rules still in the file, and the rows of rules no longer in it.
fn restore(rules: &[Rule], rows: Vec<AlertStateRow>) -> (Vec<(Key, State)>, Vec<AlertStateRow>) {
    let index: HashMap<&str, usize> = rules
        .iter()
        .enumerate()
        .map(|(index, rule)| (rule.name.as_str(), index))
        .collect();
    let mut restored = Vec::with_capacity(rows.len());
    let mut orphans = Vec::new();
    for row in rows {
        let Some(rule) = index.get(row.rule.as_str()) else {
            orphans.push(row);
            continue;
        };
        match serde_json::from_str::<State>(&row.state) {
            Ok(state) => restored.push(((*rule, row.device_id), state)),
            Err(error) => {
                tracing::warn!(%error, rule = %row.rule, device_id = %row.device_id, "A stored alert state does not parse; starting that one afresh.");
            }
        }
    }
    (restored, orphans)
}

/// Longest device id the alert tables hold (as the telemetry table).
const MAX_DEVICE_ID_CHARS: usize = 128;

/// Feeds one record to the engine: an event from the cleaned topic, a rejection from the DLQ.
/// Records that are neither are logged, counted and skipped.
fn observe(engine: &mut Engine, message: &OwnedMessage, kafka: &KafkaConfig) -> Vec<Transition> {
    let skip = |problem: &str| {
        instruments::counter(&instruments::RECORDS_INVALID).increment(1);
        tracing::warn!(
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            problem,
            "Skipped a record."
        );
        Vec::new()
    };
    if message.topic() == kafka.cleaned_topic {
        match serde_json::from_slice::<Event>(message.payload().unwrap_or_default()) {
            Ok(event)
                if event.device_id.is_empty()
                    || event.device_id.chars().count() > MAX_DEVICE_ID_CHARS =>
            {
                skip("device_id is empty or longer than 128 characters")
            }
            Ok(event) => {
                let arrival = event.received_at;
                engine.event(&event, arrival)
            }
            Err(error) => skip(&format!("not a cleaned event: {error}")),
        }
    } else {
        // A rejected record's device is the one the audit service counted it against
        // (`device.id`: its topic's, or `#unusable`), else, from older audit services, its key;
        // its arrival time is the bridge's header, kept on the DLQ record.
        let Some(device_id) = telemetry_kafka::header(message, headers::DEVICE_ID)
            .or_else(|| message.key())
            .and_then(|key| std::str::from_utf8(key).ok())
            .filter(|key| !key.is_empty() && key.chars().count() <= MAX_DEVICE_ID_CHARS)
        else {
            return skip("a rejected record without a usable device key");
        };
        let arrival = telemetry_kafka::received_at(message);
        engine.rejection(device_id, arrival)
    }
}

/// Fails when a rule needs a device remembered longer than `forget_after_seconds`: a silence
/// would never fire, a DLQ burst would be forgotten before its window passed.
fn check_forget_window(rules: &[Rule], forget_after_seconds: u64) -> Result<()> {
    for rule in rules {
        let (setting, duration) = match rule.condition {
            rules::Condition::Silent(after) => ("silent_for", after),
            rules::Condition::DlqRate { window, .. } => ("window", window),
            rules::Condition::Threshold { .. } => continue,
        };
        if Duration::from_secs(forget_after_seconds) <= duration {
            return Err(Error::ForgetTooSoon {
                forget_after: forget_after_seconds,
                rule: rule.name.clone(),
                setting,
                duration: duration.as_secs(),
            });
        }
    }
    Ok(())
}

/// Sets the gauges of what the engine holds.
fn held(engine: &Engine) {
    #[allow(clippy::cast_precision_loss)]
    {
        instruments::gauge(&instruments::DEVICES_TRACKED).set(engine.devices_tracked() as f64);
        instruments::gauge(&instruments::STATES_HELD).set(engine.states_held() as f64);
    }
}

/// Writes state changes and alerts, and hands the alerts to Kafka.
struct Outbox<'a> {
    /// The forget window, named in the alerts it resolves.
    forget_after: Duration,
    store: DynStore,
    producer: RenewableProducer,
    topic: String,
    group_id: String,
    writes: &'a Writes,
    wake_webhook: Arc<tokio::sync::Notify>,
}

impl Outbox<'_> {
    /// Saves the engine's changes and `transitions` in one transaction, retrying while the
    /// database is unavailable. False when shut down first.
    async fn save(
        &self,
        engine: &mut Engine,
        offsets: &[AlertOffset],
        transitions: &[Transition],
        webhook: bool,
        shutdown: &CancellationToken,
    ) -> bool {
        let changes = engine.take_changes();
        if changes.is_empty() && transitions.is_empty() && offsets.is_empty() {
            return true;
        }
        let rules = engine.rules();
        let mut states = Vec::with_capacity(changes.len());
        for ((rule, device_id), state) in &changes {
            let Some(rule) = rules.get(*rule) else {
                continue;
            };
            let json = match state.as_ref().map(serde_json::to_string).transpose() {
                Ok(json) => json,
                Err(error) => {
                    tracing::error!(%error, "Could not encode an alert state; it is not stored.");
                    continue;
                }
            };
            states.push((rule.name.clone(), device_id.clone(), json));
        }
        let payloads: Vec<String> = transitions
            .iter()
            .map(|transition| {
                payload(&rules[transition.rule], transition, self.forget_after).to_string()
            })
            .collect();
        for transition in transitions {
            let rule = &rules[transition.rule];
            let counter = match transition.status {
                engine::Status::Firing => instruments::ALERTS_FIRED,
                engine::Status::Resolved => instruments::ALERTS_RESOLVED,
            };
            counter
                .counter_of(series!(instruments::SERVICE, rule.name.clone()))
                .increment(1);
            tracing::info!(
                alert_id = %transition.alert_id,
                status = transition.status.name(),
                rule = %rule.name,
                device_id = %transition.device_id,
                condition = %condition(rule, transition, self.forget_after),
                "Alert {}.", transition.status.name()
            );
        }
        let saved = telemetry_retry::retry("Saving the alert states", shutdown, || async {
            let states: Vec<(&str, &str, Option<&str>)> = states
                .iter()
                .map(|(rule, device, json)| (rule.as_str(), device.as_str(), json.as_deref()))
                .collect();
            let alerts: Vec<NewAlert<'_>> = transitions
                .iter()
                .zip(&payloads)
                .map(|(transition, payload)| NewAlert {
                    alert_id: &transition.alert_id,
                    status: transition.status.name(),
                    device_id: &transition.device_id,
                    payload,
                })
                .collect();
            let save = self
                .store
                .save_alerts(&self.group_id, offsets, &states, &alerts, webhook);
            // Retried whole: a batch the database refuses holds the alerter up, and says so.
            self.writes.attempt_whole(save).await
        })
        .await
        .is_some();
        if saved && !transitions.is_empty() {
            self.wake_webhook.notify_one();
        }
        saved
    }

    /// Deletes the states of rules no longer in the file; their firing alerts resolve (condition
    /// "rule removed"), so no receiver keeps them open. False when shut down first.
    async fn retire(
        &self,
        orphans: &[AlertStateRow],
        webhook: bool,
        shutdown: &CancellationToken,
    ) -> bool {
        if orphans.is_empty() {
            return true;
        }
        let now = Utc::now().timestamp_millis();
        let mut resolved = Vec::new();
        for row in orphans {
            tracing::info!(rule = %row.rule, device_id = %row.device_id, "The rule is no longer in the file; its state is deleted and a firing alert resolves.");
            if let Ok(State {
                phase:
                    engine::Phase::Firing {
                        since, fired_at, ..
                    },
                value,
                ..
            }) = serde_json::from_str::<State>(&row.state)
            {
                let alert_id = format!("{}:{}:{since}", row.rule, row.device_id);
                let body = serde_json::json!({
                    "alert_id": alert_id,
                    "status": "resolved",
                    "rule": row.rule,
                    "severity": "info",
                    "condition": "(the rule was removed from the rules file)",
                    "device_id": row.device_id,
                    "started_at": rfc3339(since),
                    "fired_at": rfc3339(fired_at),
                    "resolved_at": rfc3339(now),
                    "value": value,
                });
                resolved.push((alert_id, row.device_id.clone(), body.to_string()));
            }
        }
        telemetry_retry::retry("Retiring removed rules", shutdown, || async {
            let states: Vec<(&str, &str, Option<&str>)> = orphans
                .iter()
                .map(|row| (row.rule.as_str(), row.device_id.as_str(), None))
                .collect();
            let alerts: Vec<NewAlert<'_>> = resolved
                .iter()
                .map(|(alert_id, device_id, payload)| NewAlert {
                    alert_id,
                    status: "resolved",
                    device_id,
                    payload,
                })
                .collect();
            self.store
                .save_alerts(&self.group_id, &[], &states, &alerts, webhook)
                .await
        })
        .await
        .is_some()
    }

    /// Produces every outbox alert Kafka has not acknowledged, in order, retrying until it has.
    /// False when shut down first.
    async fn produce_pending(&self, shutdown: &CancellationToken) -> bool {
        loop {
            let Some(pending) =
                telemetry_retry::retry("Reading the alert outbox", shutdown, || {
                    self.store.unproduced_alerts(500)
                })
                .await
            else {
                return false;
            };
            if pending.is_empty() {
                return true;
            }
            for entry in &pending {
                let produced = telemetry_retry::retry("Producing an alert", shutdown, || {
                    let record = Record {
                        topic: &self.topic,
                        key: Some(entry.device_id.as_bytes()),
                        payload: Some(entry.payload.as_bytes()),
                        headers: None,
                    };
                    async move {
                        let result = self.producer.send(record).await;
                        if let Err(error) = &result {
                            self.producer.delivery_failed(error);
                        }
                        result
                    }
                })
                .await;
                if produced.is_none() {
                    return false;
                }
                telemetry_metrics::RECORDS_PRODUCED
                    .counter_of(series!(instruments::SERVICE, "alerts"))
                    .increment(1);
            }
            let ids: Vec<u64> = pending.iter().map(|entry| entry.id).collect();
            if telemetry_retry::retry("Marking alerts produced", shutdown, || {
                self.store.mark_alerts_produced(&ids)
            })
            .await
            .is_none()
            {
                return false;
            }
        }
    }
}

/// The rule in one line; for an alert resolved because its device was forgotten, why.
fn condition(rule: &Rule, transition: &Transition, forget_after: Duration) -> String {
    if transition.forgotten {
        format!(
            "(the device sent nothing for {}: its alert state was forgotten)",
            humantime::format_duration(forget_after)
        )
    } else {
        rule.describe()
    }
}

/// The alert as JSON: the alerts topic's value and the webhook's body.
fn payload(rule: &Rule, transition: &Transition, forget_after: Duration) -> serde_json::Value {
    let time = rfc3339;
    serde_json::json!({
        "alert_id": transition.alert_id,
        "status": transition.status.name(),
        "rule": rule.name,
        "severity": rule.severity,
        "condition": condition(rule, transition, forget_after),
        "device_id": transition.device_id,
        "started_at": time(transition.started_at),
        "fired_at": time(transition.fired_at),
        "resolved_at": transition.resolved_at.map(time),
        "value": transition.value,
    })
}

/// `millis` as RFC 3339, UTC, milliseconds.
fn rfc3339(millis: i64) -> String {
    DateTime::from_timestamp_millis(millis)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Deletes delivered outbox rows older than a week, hourly.
async fn prune_outbox(store: DynStore, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let before = Utc::now() - chrono::Duration::days(7);
        match store.prune_alert_outbox(before).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "Pruned delivered alerts from the outbox."),
            Err(error) => {
                tracing::warn!(%error, "Pruning the alert outbox failed; trying again in an hour.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forget_window_not_longer_than_a_rule_needs_is_refused_naming_both() {
        let rules = Rules::parse(
            "[[rules]]\nname = \"quiet\"\nsilent_for = \"10m\"\n\
             [[rules]]\nname = \"bad\"\ndlq_above = 5\nwindow = \"1h\"\n",
        )
        .map(|rules| rules.rules)
        .unwrap_or_default();
        assert_eq!(rules.len(), 2);
        assert!(check_forget_window(&rules, 3_601).is_ok());
        let error = check_forget_window(&rules, 3_600)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("TELEMETRY_ALERT_FORGET_AFTER_SECONDS")
                && error.contains("`bad`'s window"),
            "{error}"
        );
        let error = check_forget_window(&rules, 600)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(error.contains("`quiet`'s silent_for (600 s)"), "{error}");
    }

    #[test]
    fn an_alert_resolved_by_forgetting_says_why() {
        let rules = Rules::parse("[[rules]]\nname = \"quiet\"\nsilent_for = \"5m\"\n")
            .map(|rules| rules.rules)
            .unwrap_or_default();
        let transition = Transition {
            alert_id: String::from("quiet:pico-1:0"),
            rule: 0,
            device_id: String::from("pico-1"),
            status: engine::Status::Resolved,
            started_at: 0,
            fired_at: 0,
            resolved_at: Some(1),
            value: None,
            forgotten: true,
        };
        let body = payload(&rules[0], &transition, Duration::from_secs(604_800));
        assert_eq!(
            body["condition"],
            "(the device sent nothing for 7days: its alert state was forgotten)"
        );
        assert_eq!(body["severity"], rules[0].severity.as_str());
    }
}
