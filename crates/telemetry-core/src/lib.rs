//! The telemetry event model and the rules that decide, for every raw record, whether it is
//! accepted (and normalized) or rejected (with a stable reason code).
//!
//! Nothing here does I/O: the bridge and the audit service feed bytes in and act on the
//! [`Outcome`], so the rules can be tested, fuzzed and benchmarked alone.
//!
//! # Layout
//! - [`names`]: Kafka topic names and record header keys, the one place they are spelled.
//! - [`event`]: the normalized [`Event`] and its place in Kafka, [`SourcePosition`].
//! - [`validate`]: [`validate()`], [`Outcome`] and [`Rejection`] with its reason codes.

pub mod event;
pub mod names;
pub mod validate;

pub use event::{Event, SourcePosition};
pub use validate::{validate, Limits, Outcome, Rejection};
