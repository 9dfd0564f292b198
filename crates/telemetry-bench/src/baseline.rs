//! The infrastructure alone, with the pipeline's payloads: what the machine can do at most, for
//! the pipeline's figures to be read against.

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rumqttc::{Event, Packet, QoS};
use telemetry_core::event::CleanedRecord;
use telemetry_core::{Contract, Outcome, SourcePosition, Validator};
use telemetry_kafka::KafkaConfig;
use telemetry_store::{Store, Table};
use tokio_util::sync::CancellationToken;

use crate::load::{client_options, publish, Load};
use crate::{device_name, now_millis, payload, Baselines, BenchConfig, Error, Result};

/// Records Kafka may hold unacknowledged at once (librdkafka's queue holds 100,000).
const KAFKA_IN_FLIGHT: usize = 50_000;
/// Rows per INSERT transaction: the audit service's default batch.
const ROWS_PER_TRANSACTION: usize = 1_000;

/// Measures the four baselines, one after the other, each with `config.baseline_events`.
pub(crate) async fn measure(
    config: &BenchConfig,
    id: &str,
    shutdown: &CancellationToken,
) -> Result<Baselines> {
    let messages = config.baseline_events;
    let mqtt_qos1_per_second = mqtt(config, id, messages, shutdown).await?;
    let kafka = KafkaConfig {
        brokers: config.bench_kafka_brokers.clone(),
        ..KafkaConfig::default()
    };
    let topic = format!("{id}.baseline");
    let kafka_produce_per_second = kafka_produce(&kafka, &topic, config.devices, messages).await?;
    let kafka_consume_per_second = kafka_consume(&kafka, &topic, id, messages).await?;
    if !config.keep {
        crate::pipeline::delete_topics(&kafka, &[topic.as_str()]).await;
    }
    let mysql_insert_rows_per_second = mysql(config, id, messages).await?;
    Ok(Baselines {
        messages,
        mqtt_qos1_per_second,
        kafka_produce_per_second,
        kafka_consume_per_second,
        mysql_insert_rows_per_second,
    })
}

/// Mosquitto, QoS 1: the same publishers as the load, one subscriber; first publish to the last
/// message received.
async fn mqtt(
    config: &BenchConfig,
    id: &str,
    messages: u64,
    shutdown: &CancellationToken,
) -> Result<f64> {
    let topic_prefix = format!("{id}/baseline");
    let options = client_options(&config.bench_mqtt_url, &format!("{id}-baseline-subscriber"))?;
    let (client, mut eventloop) = telemetry_mqtt::MqttConnectionConfig::client(options, 10_000);
    client
        .subscribe(format!("{topic_prefix}/#"), QoS::AtLeastOnce)
        .await
        .map_err(|error| Error::Mqtt(error.to_string()))?;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(error) => return Err(Error::Mqtt(error.to_string())),
        }
    }
    let receive = async {
        let mut received = 0;
        while received < messages {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => received += 1,
                Ok(_) => {}
                Err(error) => return Err(Error::Mqtt(error.to_string())),
            }
        }
        Ok(Instant::now())
    };
    let load = Load {
        url: config.bench_mqtt_url.clone(),
        client_prefix: format!("{id}-baseline-publisher"),
        topic_prefix,
        devices: config.devices,
        events: messages,
        rate: 0,
        publishers: config.publishers,
        malformed_every: 0,
    };
    let started = Instant::now();
    let (last, _) = tokio::try_join!(receive, publish(&load, None, shutdown))?;
    let _ = client.disconnect().await;
    Ok(per_second(messages, last.duration_since(started)))
}

/// Kafka produce with our producer settings (acks=all, idempotent, lz4, linger 5 ms).
async fn kafka_produce(
    kafka: &KafkaConfig,
    topic: &str,
    devices: u32,
    messages: u64,
) -> Result<f64> {
    telemetry_kafka::ensure_topics(kafka, &[topic]).await?;
    let producer: FutureProducer = kafka.producer_config(&[])?.create()?;
    let records: Vec<(String, Vec<u8>)> = (0..messages)
        .map(|n| {
            let device = device_name(u32::try_from(n % u64::from(devices)).unwrap_or(0));
            let body = payload(&device, n / u64::from(devices), now_millis(), false);
            (device, body)
        })
        .collect();
    // One record first, so the clock starts with the producer connected and its id assigned.
    let warm_up = FutureRecord::to(topic).key("warm-up").payload("{}");
    let delivery = producer
        .send_result(warm_up)
        .map_err(|(error, _)| Error::KafkaClient(error))?;
    check_delivery(delivery.await)?;
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for (key, body) in &records {
        while in_flight.len() >= KAFKA_IN_FLIGHT {
            if let Some(delivery) = in_flight.next().await {
                check_delivery(delivery)?;
            }
        }
        let record = FutureRecord::to(topic)
            .key(key.as_str())
            .payload(body.as_slice());
        let delivery = producer
            .send_result(record)
            .map_err(|(error, _)| Error::KafkaClient(error))?;
        in_flight.push(delivery);
    }
    while let Some(delivery) = in_flight.next().await {
        check_delivery(delivery)?;
    }
    Ok(per_second(messages, started.elapsed()))
}

fn check_delivery(
    delivery: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<()> {
    match delivery {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(Error::KafkaClient(error)),
        Err(_) => Err(Error::Service(String::from(
            "a Kafka delivery was cancelled",
        ))),
    }
}

/// Kafka consume: a new group reads the topic from the start; first record to last.
async fn kafka_consume(kafka: &KafkaConfig, topic: &str, id: &str, messages: u64) -> Result<f64> {
    let group = format!("{id}-baseline");
    let consumer: BaseConsumer = kafka
        .client_config(&[
            ("group.id", group.as_str()),
            ("auto.offset.reset", "earliest"),
            ("enable.auto.commit", "false"),
        ])?
        .create()?;
    consumer.subscribe(&[topic])?;
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut first = None;
        let mut received = 0;
        // The produce baseline's warm-up record is read too.
        while received < messages + 1 {
            if Instant::now() > deadline {
                return Err(Error::Service(format!(
                    "the Kafka consume baseline read {received} of {messages} records in 300 s"
                )));
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => {
                    first.get_or_insert_with(Instant::now);
                    received += 1;
                }
                Some(Err(error)) => return Err(Error::KafkaClient(error)),
                None => {}
            }
        }
        let elapsed = first.map_or(Duration::ZERO, |first| first.elapsed());
        Ok(per_second(messages, elapsed))
    })
    .await
    .map_err(|error| Error::Service(format!("the Kafka consume baseline failed: {error}")))?
}

/// MariaDB: the rows the audit service would write for the same payloads, in multi-row INSERTs
/// of [`ROWS_PER_TRANSACTION`] rows, one transaction each, on one connection.
async fn mysql(config: &BenchConfig, id: &str, messages: u64) -> Result<f64> {
    let url = format!("{}/{id}", config.bench_mysql_server.trim_end_matches('/'));
    let store = Store::connect(&url, 1).await?;
    store.migrate().await?;
    let table = Table::new("bench_baseline")?;
    store.create_table_like_live(&table).await?;
    let validator = Validator::new(Contract::default())
        .map_err(|error| Error::Service(format!("the built-in contract: {error}")))?;
    let now = now_millis();
    let records: Vec<CleanedRecord> = (0..messages)
        .filter_map(|n| {
            let device = device_name(u32::try_from(n % u64::from(config.devices)).unwrap_or(0));
            let body = payload(&device, n / u64::from(config.devices), now, false);
            match validator.validate(&body, now) {
                Outcome::Accepted(event) => Some(CleanedRecord {
                    event,
                    source: SourcePosition {
                        topic: format!("{id}.raw"),
                        partition: 0,
                        offset: i64::try_from(n).unwrap_or(i64::MAX),
                    },
                }),
                Outcome::Rejected(_) => None,
            }
        })
        .collect();
    let started = Instant::now();
    for chunk in records.chunks(ROWS_PER_TRANSACTION) {
        store.insert_events_into(&table, chunk).await?;
    }
    let elapsed = started.elapsed();
    Ok(per_second(records.len() as u64, elapsed))
}

/// `count` over `elapsed`, per second.
pub(crate) fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = count as f64 / seconds;
    rate
}
