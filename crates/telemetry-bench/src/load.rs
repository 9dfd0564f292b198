//! The simulated fleet: devices publishing QoS 1 over a few MQTT connections, paced or as fast as
//! the broker acknowledges.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::{device_name, now_millis, payload, Error, Result};

/// Publish instants of sampled events, by (device index, seq): what the live-view latency is
/// measured against.
pub(crate) type SentAt = Arc<Mutex<HashMap<(u32, u64), Instant>>>;

/// One load: who publishes what, where.
pub(crate) struct Load {
    /// `mqtt://host:port`.
    pub url: String,
    /// Client ids are `<client_prefix>-<n>`.
    pub client_prefix: String,
    /// Topics are `<topic_prefix>/<device>/telemetry`.
    pub topic_prefix: String,
    pub devices: u32,
    pub events: u64,
    /// Events per second, all publishers together; 0: as fast as acknowledged.
    pub rate: u64,
    pub publishers: u32,
    /// Every this-many-th event is malformed; 0: none.
    pub malformed_every: u64,
}

/// What a load published.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Published {
    pub valid: u64,
    pub malformed: u64,
    /// Wall clock of the first publish, ms since the epoch.
    pub first_publish_ms: i64,
    /// First publish to last acknowledgement.
    pub seconds: f64,
}

/// Every this-many-th event malformed, for a share of `malformed` (0 to 1).
pub(crate) fn malformed_every(malformed: f64) -> u64 {
    if malformed <= 0.0 {
        0
    } else {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let every = (1.0 / malformed).round().max(1.0) as u64;
        every
    }
}

/// Event `n` of a load: its device index, seq and whether it is malformed.
fn event(load: &Load, n: u64) -> (u32, u64, bool) {
    let devices = u64::from(load.devices);
    let device = u32::try_from(n % devices).unwrap_or(0);
    let malformed =
        load.malformed_every > 0 && n % load.malformed_every == load.malformed_every - 1;
    (device, n / devices, malformed)
}

/// Publishes the whole load and waits for every acknowledgement. `sent` records the publish
/// instant of every valid event whose seq is a multiple of ten.
pub(crate) async fn publish(
    load: &Load,
    sent: Option<SentAt>,
    shutdown: &CancellationToken,
) -> Result<Published> {
    let first_publish_ms = now_millis();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for publisher in 0..load.publishers {
        let mut options =
            client_options(&load.url, &format!("{}-{publisher}", load.client_prefix))?;
        options.set_inflight(1_000);
        let mine: Vec<u64> = (0..load.events)
            .filter(|n| event(load, *n).0 % load.publishers == publisher)
            .collect();
        // Topics and names are made before the clock starts; payloads (with their timestamps)
        // when published.
        let messages: Vec<Message> = mine
            .iter()
            .map(|n| {
                let (device, seq, malformed) = event(load, *n);
                let name = device_name(device);
                Message {
                    topic: format!("{}/{name}/telemetry", load.topic_prefix),
                    name,
                    device,
                    seq,
                    malformed,
                }
            })
            .collect();
        let per_second = if load.rate == 0 {
            0.0
        } else {
            #[allow(clippy::cast_precision_loss)]
            let share = load.rate as f64 / f64::from(load.publishers);
            share
        };
        let sent = sent.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(
            async move { run_publisher(options, messages, per_second, sent, shutdown).await },
        );
    }
    let (mut valid, mut malformed) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (publisher_valid, publisher_malformed) =
            joined.map_err(|error| Error::Mqtt(format!("a publisher task failed: {error}")))??;
        valid += publisher_valid;
        malformed += publisher_malformed;
    }
    Ok(Published {
        valid,
        malformed,
        first_publish_ms,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One message of a publisher's share.
struct Message {
    topic: String,
    name: String,
    device: u32,
    seq: u64,
    malformed: bool,
}

/// One connection's share.
async fn run_publisher(
    options: MqttOptions,
    messages: Vec<Message>,
    per_second: f64,
    sent: Option<SentAt>,
    shutdown: CancellationToken,
) -> Result<(u64, u64)> {
    let (client, mut eventloop) = telemetry_mqtt::MqttConnectionConfig::client(options, 10_000);
    let expected = messages.len();
    let poll = acknowledgements(&mut eventloop, expected);
    let publish = async {
        let started = Instant::now();
        let (mut valid, mut malformed_count) = (0_u64, 0_u64);
        for (index, message) in messages.into_iter().enumerate() {
            if per_second > 0.0 {
                #[allow(clippy::cast_precision_loss)]
                let due = Duration::from_secs_f64(index as f64 / per_second);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if message.malformed {
                malformed_count += 1;
            } else {
                valid += 1;
                if message.seq % 10 == 0 {
                    if let Some(sent) = &sent {
                        if let Ok(mut map) = sent.lock() {
                            map.insert((message.device, message.seq), Instant::now());
                        }
                    }
                }
            }
            let body = payload(&message.name, message.seq, now_millis(), message.malformed);
            client
                .publish(message.topic, QoS::AtLeastOnce, false, body)
                .await
                .map_err(|error| Error::Mqtt(error.to_string()))?;
        }
        Ok::<_, Error>((valid, malformed_count))
    };
    let outcome = tokio::select! {
        () = shutdown.cancelled() => return Err(Error::Stopped),
        outcome = async { tokio::try_join!(poll, publish) } => outcome,
    };
    let ((), counts) = outcome?;
    let _ = client.disconnect().await;
    Ok(counts)
}

/// Publishes `count` payloads of `bytes` bytes (not JSON, not compressible) with QoS 1 on one
/// connection, to `<topic_prefix>/burst/telemetry`, as fast as the broker acknowledges them;
/// returns how many it published. One payload is shared by every publish, and few are queued
/// at once, so the harness itself does not hold the burst in memory.
pub(crate) async fn publish_burst(
    url: &str,
    client_id: &str,
    topic_prefix: &str,
    count: u64,
    bytes: usize,
    shutdown: &CancellationToken,
) -> Result<u64> {
    let mut options = client_options(url, client_id)?;
    options
        .set_inflight(100)
        .set_max_packet_size(bytes + 1024, bytes + 1024);
    let (client, mut eventloop) = telemetry_mqtt::MqttConnectionConfig::client(options, 16);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let payload: bytes::Bytes = (0..bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // The top byte of a xorshift state: the truncation is the point.
            #[allow(clippy::cast_possible_truncation)]
            let byte = (state >> 56) as u8;
            byte
        })
        .collect();
    let topic = format!("{topic_prefix}/burst/telemetry");
    let expected = usize::try_from(count).unwrap_or(usize::MAX);
    let poll = acknowledgements(&mut eventloop, expected);
    let publish = async {
        for _ in 0..count {
            client
                .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .map_err(|error| Error::Mqtt(error.to_string()))?;
        }
        Ok::<_, Error>(())
    };
    tokio::select! {
        () = shutdown.cancelled() => return Err(Error::Stopped),
        outcome = async { tokio::try_join!(poll, publish) } => { outcome?; }
    }
    let _ = client.disconnect().await;
    Ok(count)
}

/// Client options for the broker at `url` (any URL the services take, `mqtts://` and
/// credentials included), as every bench client starts from.
pub(crate) fn client_options(url: &str, client_id: &str) -> Result<MqttOptions> {
    telemetry_mqtt::MqttConnectionConfig::new(url)
        .options(client_id, |options| {
            options
                .set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_max_packet_size(1 << 20, 1 << 20);
        })
        .map_err(|error| Error::Invalid(error.to_string()))
}

/// Drives a connection until the broker has acknowledged `expected` QoS 1 publishes.
async fn acknowledgements(eventloop: &mut rumqttc::EventLoop, expected: usize) -> Result<()> {
    let mut acknowledged = 0;
    while acknowledged < expected {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acknowledged += 1,
            Ok(_) => {}
            Err(error) => return Err(Error::Mqtt(error.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_spread_over_devices_and_malformed_ones_evenly() {
        let load = Load {
            url: String::new(),
            client_prefix: String::new(),
            topic_prefix: String::new(),
            devices: 3,
            events: 10,
            rate: 0,
            publishers: 2,
            malformed_every: malformed_every(0.25),
        };
        assert_eq!(event(&load, 0), (0, 0, false));
        assert_eq!(event(&load, 3), (0, 1, true));
        assert_eq!(event(&load, 7), (1, 2, true));
        let malformed = (0..100).filter(|n| event(&load, *n).2).count();
        assert_eq!(malformed, 25);
        assert_eq!(malformed_every(0.0), 0);
    }
}
