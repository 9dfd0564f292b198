//! Bearer-token auth on the API and the live view, against the real services: a token sees the
//! devices of its allow-list and nothing else, a request without a valid token is refused, and a
//! service without tokens refuses to start on a public address unless told to.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use telemetry_api::Api;
use telemetry_auth::{token_digest, AuthConfig};
use telemetry_bridge::Bridge;
use telemetry_testkit::{eventually, http_get_with, publish_qos1, unique};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

mod common;
use common::{api_config, audit_config, base_ts, bridge_config, kafka_config, metric, stopped};

const GREENHOUSE_TOKEN: &str = "tp_greenhouse-test-token";
const OPERATIONS_TOKEN: &str = "tp_operations-test-token";

fn tokens_file(id: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{id}-tokens.toml"));
    std::fs::write(
        &path,
        format!(
            "[[token]]\nname = \"greenhouse\"\nsha256 = \"{}\"\ndevices = [\"greenhouse-*\"]\n\n\
             [[token]]\nname = \"operations\"\nsha256 = \"{}\"\ndevices = [\"*\"]\n",
            token_digest(GREENHOUSE_TOKEN),
            token_digest(OPERATIONS_TOKEN)
        ),
    )
    .unwrap();
    path
}

async fn get(
    address: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String, Value) {
    let authorization = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = authorization
        .as_deref()
        .map(|value| vec![("Authorization", value)])
        .unwrap_or_default();
    let (status, head, body) = http_get_with(address, path, &headers).await.unwrap();
    (
        status,
        head,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

fn device_ids(devices: &Value) -> Vec<String> {
    let mut ids: Vec<String> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| device["device_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Reads frames until `wanted` of them arrived or `within` passed; returns their device ids.
async fn frame_devices<S>(socket: &mut S, wanted: usize, within: Duration) -> Vec<String>
where
    S: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut devices = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while devices.len() < wanted {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                devices.push(frame["device_id"].as_str().unwrap_or("(none)").to_string());
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    devices
}

/// A bridge of the test's own with the test's tokens file: the file, its settings, the bridge's
/// address and task.
async fn bridge_with_tokens(
    id: &str,
    kafka: &telemetry_kafka::KafkaConfig,
    shutdown: &CancellationToken,
) -> (
    std::path::PathBuf,
    AuthConfig,
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<(), telemetry_bridge::Error>>,
) {
    let tokens = tokens_file(id);
    let auth = AuthConfig {
        auth_tokens: Some(tokens.clone()),
        allow_unauthenticated: false,
    };
    let mut bridge = bridge_config(id, kafka);
    bridge.auth = auth.clone();
    let bridge = Bridge::bind(bridge).await.unwrap();
    let bridge_address = bridge.local_addr().unwrap();
    let bridge_task = tokio::spawn(bridge.run(shutdown.clone()));
    (tokens, auth, bridge_address, bridge_task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_reads_only_its_devices_and_requests_without_one_are_refused() {
    let id = unique("auth");
    let kafka = kafka_config(&id);
    let shutdown = CancellationToken::new();
    let (tokens, auth, bridge_address, bridge_task) =
        bridge_with_tokens(&id, &kafka, &shutdown).await;
    let audit_task = tokio::spawn(telemetry_audit::run(
        audit_config(&id, &format!("{id}-audit"), &kafka),
        shutdown.clone(),
    ));
    let api = Api::bind(api_config(&id, "127.0.0.1:0", auth.clone()))
        .await
        .unwrap();
    let api_address = api.local_addr().unwrap();
    let api_task = tokio::spawn(api.run(shutdown.clone()));
    assert!(
        eventually(Duration::from_secs(30), || async {
            matches!(
                http_get_with(bridge_address, "/readyz", &[]).await,
                Ok((200, _, _))
            )
        })
        .await,
        "the bridge did not become ready"
    );

    // The live view: no token is refused at the upgrade; the greenhouse token comes as the
    // query parameter (as browsers send it), the operations token as a header.
    let url = format!("ws://{bridge_address}/ws");
    let refused = tokio_tungstenite::connect_async(url.as_str()).await;
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(response)) if response.status() == 401),
        "a WebSocket without a token must get 401, got {:?}",
        refused.as_ref().map(|_| "a connection")
    );
    let wrong = tokio_tungstenite::connect_async(format!("{url}?access_token=guess")).await;
    assert!(wrong.is_err(), "a wrong token must not open the live view");
    let (mut greenhouse_socket, _) =
        tokio_tungstenite::connect_async(format!("{url}?access_token={GREENHOUSE_TOKEN}"))
            .await
            .unwrap();
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {OPERATIONS_TOKEN}").parse().unwrap(),
    );
    let (mut operations_socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();

    // Two devices, each with a valid reading and a malformed payload.
    let ts = base_ts();
    let mut messages = Vec::new();
    for device in ["greenhouse-1", "pico-1"] {
        let topic = format!("{id}/devices/{device}/telemetry");
        messages.push((
            topic.clone(),
            format!(r#"{{"device_id":"{device}","device_ts":{ts},"seq":1,"temperature":21.5}}"#)
                .into_bytes(),
        ));
        messages.push((topic, b"temperature=oops".to_vec()));
    }
    publish_qos1(&format!("{id}-devices"), &messages).await;

    // The operations token sees every frame; the greenhouse token only its device's.
    let mut all = frame_devices(&mut operations_socket, 4, Duration::from_secs(30)).await;
    all.sort();
    assert_eq!(
        all,
        ["greenhouse-1", "greenhouse-1", "pico-1", "pico-1"],
        "the operations token sees every device live"
    );
    let greenhouse_frames = frame_devices(&mut greenhouse_socket, 3, Duration::from_secs(3)).await;
    assert_eq!(
        greenhouse_frames,
        ["greenhouse-1", "greenhouse-1"],
        "the greenhouse token sees its device live, and only it"
    );

    // History: wait until the audit service stored both devices and indexed both rejections.
    assert!(
        eventually(Duration::from_secs(60), || async {
            let (_, _, devices) = get(api_address, "/api/devices", Some(OPERATIONS_TOKEN)).await;
            let (_, _, dlq) = get(api_address, "/api/dlq", Some(OPERATIONS_TOKEN)).await;
            devices["devices"]
                .as_array()
                .is_some_and(|list| list.len() == 2)
                && dlq["entries"]
                    .as_array()
                    .is_some_and(|list| list.len() == 2)
        })
        .await,
        "both devices and both rejections should reach the API"
    );

    // Without a token, or with an unknown one: 401 with a Bearer challenge.
    for token in [None, Some("guess")] {
        for path in [
            "/api/devices",
            "/api/dlq",
            "/api/alerts",
            "/api/devices/pico-1/telemetry?metric=temperature_c",
        ] {
            let (status, head, body) = get(api_address, path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("www-authenticate: bearer"),
                "{head}"
            );
            assert!(body["error"]["message"].is_string(), "{body}");
        }
    }
    // A token in the API's query string does not count (only the WebSocket takes one there).
    let in_query = format!("/api/devices?access_token={OPERATIONS_TOKEN}");
    assert_eq!(get(api_address, &in_query, None).await.0, 401);
    // The page, its configuration and the OpenAPI document need no token.
    let (status, _, config) = get(api_address, "/api/config", None).await;
    assert_eq!(
        (status, config["auth_required"].as_bool()),
        (200, Some(true))
    );
    assert_eq!(get(api_address, "/api/openapi.json", None).await.0, 200);
    let (status, _, _) = http_get_with(api_address, "/", &[]).await.unwrap();
    assert_eq!(status, 200);

    // The greenhouse token: its device, not the other one, anywhere.
    let (status, _, devices) = get(api_address, "/api/devices", Some(GREENHOUSE_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(device_ids(&devices), ["greenhouse-1"]);
    let (status, _, series) = get(
        api_address,
        "/api/devices/greenhouse-1/telemetry?metric=temperature_c",
        Some(GREENHOUSE_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{series}");
    let (status, _, refusal) = get(
        api_address,
        "/api/devices/pico-1/telemetry?metric=temperature_c",
        Some(GREENHOUSE_TOKEN),
    )
    .await;
    assert_eq!(status, 403, "{refusal}");
    assert!(refusal["error"]["message"]
        .as_str()
        .unwrap()
        .contains("pico-1"));
    let (status, _, dlq) = get(api_address, "/api/dlq", Some(GREENHOUSE_TOKEN)).await;
    assert_eq!(status, 200);
    let dlq_devices: Vec<&str> = dlq["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["device_id"].as_str().unwrap_or("(none)"))
        .collect();
    assert_eq!(dlq_devices, ["greenhouse-1"]);
    assert_eq!(
        get(
            api_address,
            "/api/dlq?device=pico-1",
            Some(GREENHOUSE_TOKEN)
        )
        .await
        .0,
        403
    );
    assert_eq!(
        get(
            api_address,
            "/api/alerts?device=pico-1",
            Some(GREENHOUSE_TOKEN)
        )
        .await
        .0,
        403
    );
    // The operations token reads everything.
    let (_, _, devices) = get(api_address, "/api/devices", Some(OPERATIONS_TOKEN)).await;
    assert_eq!(device_ids(&devices), ["greenhouse-1", "pico-1"]);

    // Refusals are counted.
    let (_, metrics_body) = telemetry_testkit::http_get(api_address, "/metrics")
        .await
        .unwrap();
    let missing = metric(
        &metrics_body,
        "http_requests_unauthorized_total",
        &[("service", "api"), ("cause", "missing_token")],
    );
    assert!(missing.is_some_and(|count| count >= 4.0), "{missing:?}");

    shutdown.cancel();
    stopped(bridge_task).await;
    stopped(audit_task).await;
    stopped(api_task).await;
    std::fs::remove_file(tokens).ok();
}

#[tokio::test]
async fn without_tokens_a_public_address_is_refused_unless_allowed() {
    let id = unique("auth-exposed");
    let kafka = kafka_config(&id);

    let refused = Api::bind(api_config(&id, "0.0.0.0:0", AuthConfig::default())).await;
    let message = refused
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("TELEMETRY_API_LISTEN")
            && message.contains("TELEMETRY_ALLOW_UNAUTHENTICATED"),
        "{message}"
    );
    let mut bridge = bridge_config(&id, &kafka);
    bridge.listen = "0.0.0.0:0".into();
    let message = Bridge::bind(bridge.clone())
        .await
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(message.contains("TELEMETRY_BRIDGE_LISTEN"), "{message}");

    let allowed = AuthConfig {
        auth_tokens: None,
        allow_unauthenticated: true,
    };
    assert!(Api::bind(api_config(&id, "0.0.0.0:0", allowed.clone()))
        .await
        .is_ok());
    bridge.auth = allowed;
    assert!(Bridge::bind(bridge).await.is_ok());
    // With tokens, a public address is fine.
    let tokens = tokens_file(&id);
    let with_tokens = AuthConfig {
        auth_tokens: Some(tokens.clone()),
        allow_unauthenticated: false,
    };
    assert!(Api::bind(api_config(&id, "0.0.0.0:0", with_tokens))
        .await
        .is_ok());
    std::fs::remove_file(tokens).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tokens_file_is_reloaded_and_a_removed_tokens_live_view_is_closed_within_seconds() {
    let id = unique("revoke");
    let kafka = kafka_config(&id);
    let shutdown = CancellationToken::new();
    let (tokens, auth, bridge_address, bridge_task) =
        bridge_with_tokens(&id, &kafka, &shutdown).await;
    let api = Api::bind(api_config(&id, "127.0.0.1:0", auth))
        .await
        .unwrap();
    let api_address = api.local_addr().unwrap();
    let api_task = tokio::spawn(api.run(shutdown.clone()));

    let url = format!("ws://{bridge_address}/ws");
    let (mut greenhouse, _) =
        tokio_tungstenite::connect_async(format!("{url}?access_token={GREENHOUSE_TOKEN}"))
            .await
            .unwrap();
    let (mut operations, _) =
        tokio_tungstenite::connect_async(format!("{url}?access_token={OPERATIONS_TOKEN}"))
            .await
            .unwrap();

    // The greenhouse token is removed and a new one added; no restart.
    let new_token = "tp_new-test-token";
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"operations\"\nsha256 = \"{}\"\ndevices = [\"*\"]\n\n\
             [[token]]\nname = \"new\"\nsha256 = \"{}\"\ndevices = [\"*\"]\n",
            token_digest(OPERATIONS_TOKEN),
            token_digest(new_token)
        ),
    )
    .unwrap();

    // The removed token's live view is closed (1008) within seconds ...
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match greenhouse.next().await {
                Some(Ok(WsMessage::Close(frame))) => {
                    return frame.map(|frame| u16::from(frame.code))
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the removed token's WebSocket must be closed within 5 s");
    assert_eq!(closed, Some(1008));
    // ... the token is refused from now on, the new one works, and the kept one's live view is
    // still open: it gets the next frame. The API reads the file on its own clock (every
    // `RELOAD_CHECK`, 1 s), so it may learn of the change up to a second after the bridge.
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(api_address, "/api/devices", Some(GREENHOUSE_TOKEN))
                .await
                .0
                == 401
        })
        .await,
        "the API must refuse the removed token within seconds"
    );
    assert!(
        tokio_tungstenite::connect_async(format!("{url}?access_token={GREENHOUSE_TOKEN}"))
            .await
            .is_err()
    );
    // (Accepted: no 401. This test runs no audit service, so the database is not there: 503.)
    let (status, _, _) = get(api_address, "/api/devices", Some(new_token)).await;
    assert_ne!(
        status, 401,
        "the new token must be accepted without a restart"
    );
    let published = format!("{id}/devices/greenhouse-1/telemetry");
    let payload = format!(
        r#"{{"device_id":"greenhouse-1","device_ts":{},"seq":1,"temperature":20.5}}"#,
        base_ts()
    );
    publish_qos1(
        &format!("{id}-publisher"),
        &[(published, payload.into_bytes())],
    )
    .await;
    assert_eq!(
        frame_devices(&mut operations, 1, Duration::from_secs(10)).await,
        vec!["greenhouse-1".to_string()]
    );

    shutdown.cancel();
    stopped(bridge_task).await;
    stopped(api_task).await;
    std::fs::remove_file(&tokens).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_from_a_foreign_origin_cannot_open_the_live_view() {
    let id = unique("origin");
    let kafka = kafka_config(&id);
    let shutdown = CancellationToken::new();
    // The default: the dashboard's own origin at the API's default address.
    let bridge = Bridge::bind(bridge_config(&id, &kafka)).await.unwrap();
    let bridge_address = bridge.local_addr().unwrap();
    let bridge_task = tokio::spawn(bridge.run(shutdown.clone()));
    let url = format!("ws://{bridge_address}/ws");
    let with_origin = |origin: &str| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
        request
    };

    match tokio_tungstenite::connect_async(with_origin("http://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!("a foreign origin must get 403, got {:?}", other.map(|_| ())),
    }
    // The dashboard's origin, and a client that is no browser (no Origin), are let in.
    assert!(
        tokio_tungstenite::connect_async(with_origin("http://127.0.0.1:8082"))
            .await
            .is_ok()
    );
    assert!(tokio_tungstenite::connect_async(url.as_str()).await.is_ok());

    shutdown.cancel();
    stopped(bridge_task).await;
}
