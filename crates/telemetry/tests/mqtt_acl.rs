//! Least privilege on MQTT (issue 21), against the development Mosquitto that
//! `scripts/services.sh` runs with the shipped `deploy/mosquitto/mosquitto.conf` and
//! `deploy/mosquitto/acl`: no anonymous client, and a device may publish on its own topic only
//! and read nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
};
use telemetry_testkit::{unique, MQTT_TEST_CREDENTIALS};

/// The two test devices of `scripts/services.sh`, and their password.
const DEVICE_A: &str = "telemetry-test-device-a";
const DEVICE_B: &str = "telemetry-test-device-b";
const DEVICE_PASSWORD: &str = "telemetry-test";

fn options(client: &str, credentials: Option<(&str, &str)>) -> MqttOptions {
    let mut options = MqttOptions::new(unique(client), "127.0.0.1", 1883);
    options.set_keep_alive(Duration::from_secs(10));
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    options
}

/// The broker's answer to a connection: `Ok` once connected, or the refusal.
async fn connect(options: MqttOptions) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
            .await
            .expect("the broker answers within 10 s")
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok((client, eventloop)),
            Ok(_) => {}
            Err(error) => return Err(error),
        }
    }
}

#[tokio::test]
async fn an_anonymous_client_or_a_wrong_password_is_refused() {
    let anonymous = connect(options("anonymous", None)).await;
    assert!(
        matches!(
            anonymous,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "an anonymous client must be refused: {:?}",
        anonymous.map(|_| ())
    );
    let wrong = connect(options("wrong", Some((DEVICE_A, "not-the-password")))).await;
    assert!(
        matches!(wrong, Err(ConnectionError::ConnectionRefused(_))),
        "a wrong password must be refused: {:?}",
        wrong.map(|_| ())
    );
}

#[tokio::test]
async fn a_device_publishes_on_its_own_topic_only_and_reads_nothing() {
    let marker = unique("acl");
    let own_topic = format!("devices/{DEVICE_A}/telemetry");
    let other_topic = format!("devices/{DEVICE_B}/telemetry");

    // A subscriber with the tests' user, which may read every topic.
    let (watcher, mut watcher_loop) = connect(options("watcher", Some(MQTT_TEST_CREDENTIALS)))
        .await
        .unwrap();
    watcher
        .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = watcher_loop.poll().await.unwrap() {
            break;
        }
    }

    // Device A subscribes to every device's telemetry (Mosquitto grants the subscription and
    // applies the ACL to each message it would deliver) ...
    let (reader, mut reader_loop) = connect(options(
        "device-a-reader",
        Some((DEVICE_A, DEVICE_PASSWORD)),
    ))
    .await
    .unwrap();
    reader
        .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = reader_loop.poll().await.unwrap() {
            break;
        }
    }
    // ... publishes as device B (Mosquitto 2.0.11 acknowledges and drops it, and closes the
    // connection when more packets follow), then, on a connection of its own, as itself.
    for (client, topic, payload) in [
        ("device-a-as-b", &other_topic, format!("{marker}-as-b")),
        ("device-a", &own_topic, format!("{marker}-as-a")),
    ] {
        let (device, mut device_loop) = connect(options(client, Some((DEVICE_A, DEVICE_PASSWORD))))
            .await
            .unwrap();
        device
            .publish(topic, QoS::AtLeastOnce, false, payload.into_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match device_loop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the broker answers the publish");
    }

    // The watcher sees the device's own message; the one on B's topic never arrived before it
    // (a client's messages are delivered in order), so the broker dropped it.
    let mut seen = Vec::new();
    let own = format!("{marker}-as-a");
    let arrived = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(publish))) = watcher_loop.poll().await {
                let payload = String::from_utf8_lossy(&publish.payload).to_string();
                if payload.starts_with(&marker) {
                    seen.push((publish.topic.clone(), payload.clone()));
                }
                if payload == own {
                    return;
                }
            }
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "the device's own message must arrive: {seen:?}"
    );
    assert_eq!(
        seen,
        vec![(own_topic, own)],
        "device A must not publish as B"
    );

    // The device read nothing, not even its own message.
    let mut device_received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(event) = reader_loop.poll().await {
            if let Event::Incoming(Packet::Publish(publish)) = event {
                device_received.push(publish.topic.clone());
            }
        }
    })
    .await;
    assert!(
        device_received.is_empty(),
        "a device must not read telemetry: it received {device_received:?}"
    );
}
