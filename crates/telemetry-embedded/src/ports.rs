//! The ports of `telemetry up`: fixed offsets from a base, each checked free before anything starts,
//! so a collision is reported with the port's owner role and the flag that moves it.

use std::net::{SocketAddr, TcpListener};

/// The default base: 18830 keeps clear of the separately run services (1883 MQTT, 9092 Kafka,
/// 3306 MySQL, and the separately run services' own 8080, 8081 and up).
pub const DEFAULT_BASE: u16 = 18_830;

/// What `up` listens on, by offset from the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// Embedded MQTT broker: base + 0.
    pub mqtt: u16,
    /// Embedded Kafka-protocol broker: base + 1.
    pub kafka: u16,
    /// Dashboard and API: base + 2.
    pub api: u16,
    /// The bridge: live view (WebSocket), health and metrics: base + 3.
    pub bridge: u16,
    /// Audit service's health and metrics: base + 4.
    pub audit: u16,
    /// Rollup service's health and metrics: base + 5.
    pub rollup: u16,
    /// Alerter's health and metrics: base + 6.
    pub alert: u16,
}

/// A port that is not free.
#[derive(Debug, thiserror::Error)]
#[error("port {port} ({role}) is in use on 127.0.0.1 ({source}); stop what uses it, or move every port of `up` with --port-base N (ports N to N+6)")]
pub struct PortTaken {
    /// The port.
    pub port: u16,
    /// What `up` wanted it for.
    pub role: &'static str,
    /// The error from binding it.
    #[source]
    pub source: std::io::Error,
}

impl Ports {
    /// The ports from `base`; `None` when base + 6 overflows.
    pub fn from_base(base: u16) -> Option<Self> {
        Some(Ports {
            mqtt: base,
            kafka: base.checked_add(1)?,
            api: base.checked_add(2)?,
            bridge: base.checked_add(3)?,
            audit: base.checked_add(4)?,
            rollup: base.checked_add(5)?,
            alert: base.checked_add(6)?,
        })
    }

    /// Checks that each port `up` will listen on is free: `skip` names the roles replaced by
    /// external services (e.g. "MQTT broker" when `--mqtt-url` is given).
    pub fn check_free(&self, skip: &[&str]) -> Result<(), PortTaken> {
        for (port, role) in self.roles() {
            if skip.contains(&role) {
                continue;
            }
            TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
                .map(drop)
                .map_err(|source| PortTaken { port, role, source })?;
        }
        Ok(())
    }

    /// Each port with its role.
    pub fn roles(&self) -> [(u16, &'static str); 7] {
        [
            (self.mqtt, ROLE_MQTT),
            (self.kafka, ROLE_KAFKA),
            (self.api, "dashboard and API"),
            (self.bridge, "bridge: live view, health, metrics"),
            (self.audit, "audit service: health, metrics"),
            (self.rollup, "rollup service: health, metrics"),
            (self.alert, "alerter: health, metrics"),
        ]
    }
}

/// The role of the embedded MQTT broker's port.
pub const ROLE_MQTT: &str = "embedded MQTT broker";
/// The role of the embedded Kafka broker's port.
pub const ROLE_KAFKA: &str = "embedded Kafka broker";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_taken_port_is_named_with_its_role_and_the_flag() {
        // A taken port whose two ports below are free (another process may hold any port).
        let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
        let (_holder, base) = loop {
            let holder = TcpListener::bind("127.0.0.1:0").unwrap();
            let base = holder.local_addr().unwrap().port() - 2;
            if free(base) && free(base + 1) {
                break (holder, base);
            }
        };
        let ports = Ports::from_base(base).unwrap();
        let error = ports.check_free(&[]).unwrap_err();
        assert_eq!(error.port, base + 2);
        let text = error.to_string();
        assert!(text.contains("dashboard and API"), "{text}");
        assert!(text.contains("--port-base"), "{text}");
    }

    #[test]
    fn the_top_of_the_range_does_not_overflow() {
        assert!(Ports::from_base(u16::MAX - 5).is_none());
        assert_eq!(Ports::from_base(100).unwrap().audit, 104);
        assert_eq!(Ports::from_base(100).unwrap().alert, 106);
    }
}
