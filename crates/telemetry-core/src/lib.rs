//! The telemetry event model and the engine that decides, for every raw record, whether it is
//! accepted (and normalized) or rejected (with a stable reason code), following a declarative
//! contract that operators change without recompiling.
//!
//! Nothing here does I/O: the audit service feeds bytes in and acts on the [`Outcome`], so the
//! rules can be tested, fuzzed and benchmarked alone.
//!
//! # Layout
//! - [`names`]: Kafka topic names and record header keys, the one place they are spelled.
//! - [`contract`]: the [`Contract`], loaded from TOML or JSON Schema and exported as JSON Schema.
//! - [`validate`]: the [`Validator`] compiled from a contract, [`Outcome`], [`Rejection`], [`Code`].
//! - [`received`]: [`Received`], a raw record with what the bridge knows of it (the topic's
//!   device, whether it was cut), and [`TopicDevice`].
//! - [`sequence`]: per-device `seq` gap and regression flags.
//! - [`event`]: the normalized [`Event`] and its place in Kafka, [`SourcePosition`].
//! - [`scope`]: [`DeviceScope`], the devices an API token may see.

pub mod contract;
pub mod event;
mod json_reader;
pub mod names;
pub mod received;
pub mod scope;
pub mod sequence;
pub mod validate;

pub use contract::{Contract, ContractError};
pub use event::{Event, MetricName, Metrics, Quality, SequenceCheck, SourcePosition};
pub use received::{Cut, Received, TopicDevice, KEPT_PAYLOAD_BYTES, UNUSABLE_TOPIC_DEVICE};
pub use scope::{DevicePattern, DeviceScope};
pub use sequence::SequenceTracker;
pub use validate::{Code, Outcome, Rejection, Validator};
