//! The embedded defaults of `telemetry up`: what stands in for the separately run infrastructure
//! when a newcomer has installed nothing.
//!
//! - [`mqtt`]: an MQTT broker (rumqttd) inside the `up` process, on 127.0.0.1.
//! - [`kafka`] (feature `kafka`, on by default): a Kafka-protocol broker (nisshi) with durable SQLite
//!   storage, run as a child process of the same executable so that a SIGTERM gives it nisshi's own
//!   clean shutdown after the services that use it have stopped.
//!
//! Both speak the real protocols over loopback: the bridge, the audit service and the API use them
//! exactly as they use Mosquitto and Apache Kafka.

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod mqtt;
pub mod ports;
