//! `telemetry simulate`: a fleet of virtual devices publishing realistic telemetry over MQTT
//! (QoS 1): metrics that drift as a random walk, batteries that drain, sequence numbers, and at
//! configurable rates the faults real fleets show: malformed payloads, repeated messages, clocks
//! ahead of time, devices that go silent.
//!
//! # Layout
//! - [`Fleet`]: the devices and what they send next. Pure and seedable, so tests know exactly
//!   what was sent.
//! - [`SimulateConfig`] and [`run`]: publish the fleet's messages at a rate until a duration
//!   passed or shutdown, and report what was sent.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// Errors that stop the simulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MQTT URL is not usable.
    #[error(transparent)]
    Mqtt(#[from] telemetry_mqtt::Error),
    /// A setting is out of its range.
    #[error("{0}")]
    Invalid(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Simulator settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateConfig {
    /// The MQTT broker and how to authenticate to it.
    #[command(flatten)]
    pub mqtt: telemetry_mqtt::MqttConnectionConfig,

    /// Topics are `<prefix>/<device id>/telemetry`.
    #[arg(long, default_value = "devices")]
    pub topic_prefix: String,

    /// Number of devices.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,

    /// Messages per second, all devices together.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,

    /// Stop after this many seconds; without it, run until Ctrl-C.
    #[arg(long)]
    pub duration_seconds: Option<f64>,

    /// Share of messages that are malformed (not JSON, a bad timestamp, a metric out of range).
    #[arg(long, default_value_t = 0.02)]
    pub malformed: f64,

    /// Share of messages sent twice, as a device does when it misses an acknowledgement.
    #[arg(long, default_value_t = 0.01)]
    pub duplicates: f64,

    /// Share of messages whose device clock is ten minutes ahead (rejected as in the future).
    #[arg(long, default_value_t = 0.01)]
    pub clock_skew: f64,

    /// Share of devices that go silent halfway through a run with a duration.
    #[arg(long, default_value_t = 0.0)]
    pub silent: f64,

    /// Seed of the random generator, for a run that can be repeated exactly.
    #[arg(long)]
    pub seed: Option<u64>,

    /// MQTT client id of the simulator.
    #[arg(long, default_value = "telemetry-simulator")]
    pub client_id: String,
}

/// What one message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A valid reading.
    Valid,
    /// A valid reading sent again, byte for byte.
    Duplicate,
    /// A payload the contract rejects.
    Malformed,
    /// A reading whose device time is ten minutes ahead of the clock.
    Skewed,
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The MQTT topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// What it is.
    pub kind: Kind,
}

/// One virtual device.
#[derive(Debug, Clone)]
struct Device {
    id: String,
    topic: String,
    seq: u64,
    temperature: f64,
    humidity: f64,
    battery: f64,
    /// Uses the aliases and units older firmware sends (`deviceId`, `ts` in seconds, `temp`,
    /// `battery_mv`), which the contract normalizes.
    legacy: bool,
    /// The last valid payload, to send again as a duplicate.
    last: Option<Vec<u8>>,
}

/// The devices and the faults they show.
#[derive(Debug)]
pub struct Fleet {
    devices: Vec<Device>,
    rng: StdRng,
    next: usize,
    malformed: f64,
    duplicates: f64,
    clock_skew: f64,
}

/// How far ahead a skewed clock is.
const SKEW_MS: i64 = 600_000;

impl Fleet {
    /// `devices` devices publishing under `<prefix>/<id>/telemetry`.
    pub fn new(config: &SimulateConfig) -> Result<Self> {
        for (name, share) in [
            ("--malformed", config.malformed),
            ("--duplicates", config.duplicates),
            ("--clock-skew", config.clock_skew),
            ("--silent", config.silent),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(Error::Invalid(format!(
                    "{name} is {share}, must be from 0 to 1"
                )));
            }
        }
        let mut rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let devices = (0..config.devices)
            .map(|index| {
                let id = format!("sim-{index:04}");
                Device {
                    topic: format!("{}/{id}/telemetry", config.topic_prefix),
                    id,
                    seq: 0,
                    temperature: rng.random_range(5.0..30.0),
                    humidity: rng.random_range(30.0..70.0),
                    battery: rng.random_range(3.7..4.2),
                    legacy: index % 5 == 4,
                    last: None,
                }
            })
            .collect();
        Ok(Fleet {
            devices,
            rng,
            next: 0,
            malformed: config.malformed,
            duplicates: config.duplicates,
            clock_skew: config.clock_skew,
        })
    }

    /// The device ids.
    pub fn device_ids(&self) -> impl Iterator<Item = &str> {
        self.devices.iter().map(|device| device.id.as_str())
    }

    /// Drops the last `count` devices (they go silent).
    pub fn silence(&mut self, count: usize) {
        let keep = self.devices.len().saturating_sub(count).max(1);
        self.devices.truncate(keep);
        self.next %= self.devices.len();
    }

    /// The next message, from the devices in turn, sent at `now` (UTC milliseconds).
    pub fn next_message(&mut self, now: i64) -> Message {
        let index = self.next;
        self.next = (self.next + 1) % self.devices.len();
        let roll: f64 = self.rng.random();
        let device = &mut self.devices[index];
        if roll < self.duplicates {
            if let Some(last) = &device.last {
                return Message {
                    topic: device.topic.clone(),
                    payload: last.clone(),
                    kind: Kind::Duplicate,
                };
            }
        }
        if roll < self.duplicates + self.malformed {
            let payload = match self.rng.random_range(0..3) {
                0 => format!("temperature={:.1};battery=low", device.temperature).into_bytes(),
                1 => format!(
                    r#"{{"device_id":"{}","device_ts":"yesterday","temperature_c":20}}"#,
                    device.id
                )
                .into_bytes(),
                _ => format!(
                    r#"{{"device_id":"{}","device_ts":{now},"temperature_c":900}}"#,
                    device.id
                )
                .into_bytes(),
            };
            return Message {
                topic: device.topic.clone(),
                payload,
                kind: Kind::Malformed,
            };
        }
        let skewed = roll < self.duplicates + self.malformed + self.clock_skew;
        // A random walk within plausible bounds, and a battery that drains.
        device.temperature =
            (device.temperature + self.rng.random_range(-0.3..0.3)).clamp(-20.0, 60.0);
        device.humidity = (device.humidity + self.rng.random_range(-1.0..1.0)).clamp(5.0, 95.0);
        device.battery = (device.battery - 0.0002).max(3.0);
        device.seq += 1;
        let rssi = -55 - self.rng.random_range(0..30);
        let device_ts = if skewed { now + SKEW_MS } else { now };
        let payload = if device.legacy {
            serde_json::json!({
                "deviceId": device.id, "ts": device_ts / 1_000, "seq": device.seq,
                "temp": round(device.temperature, 2), "humidity": round(device.humidity, 1),
                "battery_mv": (device.battery * 1_000.0).round(), "rssi": rssi,
            })
        } else {
            serde_json::json!({
                "device_id": device.id, "device_ts": device_ts, "seq": device.seq,
                "temperature_c": round(device.temperature, 2), "humidity_pct": round(device.humidity, 1),
                "battery_v": round(device.battery, 3), "rssi_dbm": rssi, "firmware": "sim-1.0",
            })
        };
        let payload = payload.to_string().into_bytes();
        if skewed {
            return Message {
                topic: device.topic.clone(),
                payload,
                kind: Kind::Skewed,
            };
        }
        device.last = Some(payload.clone());
        Message {
            topic: device.topic.clone(),
            payload,
            kind: Kind::Valid,
        }
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// What a run sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Valid readings (each a distinct event).
    pub valid: u64,
    /// Valid readings sent again.
    pub duplicates: u64,
    /// Malformed payloads.
    pub malformed: u64,
    /// Readings with a clock ten minutes ahead.
    pub skewed: u64,
    /// Messages the broker acknowledged.
    pub acknowledged: u64,
}

impl Summary {
    /// Every message sent.
    pub fn sent(&self) -> u64 {
        self.valid + self.duplicates + self.malformed + self.skewed
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "sent {} messages ({} acknowledged): {} valid, {} duplicates, {} malformed, {} with the clock ahead",
            self.sent(),
            self.acknowledged,
            self.valid,
            self.duplicates,
            self.malformed,
            self.skewed
        )
    }
}

/// How often the publisher wakes to send what the rate allows.
const TICK: Duration = Duration::from_millis(10);
/// How long the end of a run waits for the broker's outstanding acknowledgements.
const ACK_WAIT: Duration = Duration::from_secs(10);

/// Publishes the fleet's messages at `config.rate` until the duration passed or `shutdown`, then
/// waits for the broker's acknowledgements and reports what was sent.
pub async fn run(config: SimulateConfig, shutdown: CancellationToken) -> Result<Summary> {
    if !(config.rate > 0.0 && config.rate.is_finite()) {
        return Err(Error::Invalid(format!(
            "--rate is {}, must be above 0",
            config.rate
        )));
    }
    let mut fleet = Fleet::new(&config)?;
    let options = config.mqtt.options(&config.client_id, |options| {
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(1_000);
    })?;
    let (client, mut eventloop) = telemetry_mqtt::MqttConnectionConfig::client(options, 10_000);
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop_polling = CancellationToken::new();
    // Set before the DISCONNECT: the broker closing the connection after it is expected.
    let disconnecting = CancellationToken::new();
    let poller = tokio::spawn({
        let (acknowledged, stop) = (acknowledged.clone(), stop_polling.clone());
        let disconnecting = disconnecting.clone();
        async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    event = eventloop.poll() => match event {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acknowledged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) if disconnecting.is_cancelled() => return,
                        Err(error) => {
                            tracing::warn!(%error, "MQTT connection failed; reconnecting.");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    },
                }
            }
        }
    });
    tracing::info!(
        devices = config.devices,
        rate = config.rate,
        "Simulated devices started."
    );
    let started = tokio::time::Instant::now();
    let duration = config.duration_seconds.map(Duration::from_secs_f64);
    let mut silenced = false;
    let mut summary = Summary::default();
    let mut due = 0.0;
    let mut ticker = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let elapsed = started.elapsed();
        if duration.is_some_and(|duration| elapsed >= duration) {
            break;
        }
        if !silenced
            && config.silent > 0.0
            && duration.is_some_and(|duration| elapsed * 2 >= duration)
        {
            silenced = true;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            fleet.silence((f64::from(config.devices) * config.silent).round() as usize);
        }
        due += config.rate * TICK.as_secs_f64();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| {
                i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
            });
        while due >= 1.0 {
            due -= 1.0;
            let message = fleet.next_message(now);
            if client
                .publish(&message.topic, QoS::AtLeastOnce, false, message.payload)
                .await
                .is_err()
            {
                tracing::warn!("The MQTT client stopped; ending the run.");
                break;
            }
            match message.kind {
                Kind::Valid => summary.valid += 1,
                Kind::Duplicate => summary.duplicates += 1,
                Kind::Malformed => summary.malformed += 1,
                Kind::Skewed => summary.skewed += 1,
            }
        }
    }
    let deadline = tokio::time::Instant::now() + ACK_WAIT;
    while acknowledged.load(std::sync::atomic::Ordering::Relaxed) < summary.sent()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    summary.acknowledged = acknowledged.load(std::sync::atomic::Ordering::Relaxed);
    disconnecting.cancel();
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_polling.cancel();
    let _ = poller.await;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_core::{Contract, Outcome, Validator};

    fn config(seed: u64) -> SimulateConfig {
        SimulateConfig {
            mqtt: telemetry_mqtt::MqttConnectionConfig::new("mqtt://127.0.0.1:1883"),
            topic_prefix: "devices".into(),
            devices: 10,
            rate: 10.0,
            duration_seconds: None,
            malformed: 0.1,
            duplicates: 0.05,
            clock_skew: 0.05,
            silent: 0.0,
            seed: Some(seed),
            client_id: "test".into(),
        }
    }

    #[test]
    fn every_message_meets_the_contract_as_its_kind_says() {
        let validator = Validator::new(Contract::default()).unwrap();
        let mut fleet = Fleet::new(&config(7)).unwrap();
        let now = 1_795_946_400_000;
        let mut kinds = std::collections::BTreeMap::new();
        let mut events = std::collections::HashSet::new();
        for step in 0..5_000 {
            let message = fleet.next_message(now + step * 100);
            *kinds.entry(format!("{:?}", message.kind)).or_insert(0) += 1;
            let outcome = validator.validate(&message.payload, now + step * 100 + 50);
            match (message.kind, outcome) {
                (Kind::Valid, Outcome::Accepted(event)) => {
                    assert!(event.device_id.starts_with("sim-"));
                    assert!(event.metrics.get("temperature_c").is_some());
                    assert!(
                        events.insert((event.device_id, event.device_ts, event.seq)),
                        "a valid event is new"
                    );
                }
                (Kind::Duplicate, Outcome::Accepted(event)) => {
                    assert!(
                        events.contains(&(event.device_id, event.device_ts, event.seq)),
                        "a duplicate repeats an event"
                    );
                }
                (Kind::Malformed, Outcome::Rejected(_)) => {}
                (Kind::Skewed, Outcome::Rejected(rejection)) => {
                    assert_eq!(rejection.code(), "device_ts_in_future");
                }
                (kind, outcome) => panic!(
                    "{kind:?} gave {outcome:?}: {:?}",
                    String::from_utf8_lossy(&message.payload)
                ),
            }
        }
        // Roughly the configured shares.
        assert!((350..=650).contains(&kinds["Malformed"]), "{kinds:?}");
        assert!((150..=350).contains(&kinds["Skewed"]), "{kinds:?}");
        assert!((150..=350).contains(&kinds["Duplicate"]), "{kinds:?}");
    }

    #[test]
    fn a_seed_repeats_a_run_exactly_and_silence_drops_devices() {
        let mut first = Fleet::new(&config(3)).unwrap();
        let mut second = Fleet::new(&config(3)).unwrap();
        for step in 0..100 {
            assert_eq!(first.next_message(step), second.next_message(step));
        }
        first.silence(4);
        assert_eq!(first.device_ids().count(), 6);
        let bad = SimulateConfig {
            malformed: 1.5,
            ..config(3)
        };
        assert!(Fleet::new(&bad).is_err());
    }
}
