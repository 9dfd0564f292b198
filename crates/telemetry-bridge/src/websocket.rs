//! The bridge's HTTP server: live frames on `GET /ws`, plus the operational endpoints
//! (`/healthz`, `/readyz`, `/metrics`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::broadcast;

use telemetry_auth::{Access, Auth};
use telemetry_core::{Cut, Metrics, Outcome, Received, Validator};
use telemetry_ops::Readiness;

use crate::instruments::{self, SERVICE};
use crate::mqtt_source::Message;

/// The live-view channel: one JSON text frame per MQTT message, shared by every client, and the
/// contract that normalizes the frames' metrics.
#[derive(Clone)]
pub(crate) struct Frames {
    sender: broadcast::Sender<LiveFrame>,
    validator: Arc<Validator>,
    /// Most payload bytes a frame carries; beyond them the payload is cut and marked, so a
    /// client's queue of frames is bounded in bytes, not only in frames.
    max_payload_bytes: usize,
    /// Longest a write to a client may take before the client is dropped.
    write_timeout: Duration,
}

/// One encoded frame and the device it is about, so each client's device allow-list can be
/// applied without decoding it again.
#[derive(Clone)]
struct LiveFrame {
    device_id: Option<Arc<str>>,
    text: Utf8Bytes,
}

impl Frames {
    /// A channel keeping `capacity` frames per client, each with at most `max_payload_bytes` of
    /// its payload; a client whose write takes longer than `write_timeout` is dropped.
    pub(crate) fn new(
        capacity: usize,
        validator: Arc<Validator>,
        max_payload_bytes: usize,
        write_timeout: Duration,
    ) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        Frames {
            sender,
            validator,
            max_payload_bytes,
            write_timeout,
        }
    }
}

/// The JSON frame sent to WebSocket clients.
#[derive(Serialize)]
struct Frame<'a> {
    topic: &'a str,
    device_id: Option<&'a str>,
    received_at: i64,
    payload: Payload<'a>,
    /// Set when `payload` holds only the first bytes of the payload: its full size.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_cut: Option<u64>,
    /// The payload's metrics under their canonical names and units, when it passes the contract
    /// (so the live chart matches the history); the audit service still decides what is stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<&'a Metrics>,
    /// The reason code when the payload does not pass the contract.
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected: Option<&'static str>,
}

/// The payload as JSON when it is JSON, otherwise as (lossily decoded) text.
#[derive(Serialize)]
#[serde(untagged)]
enum Payload<'a> {
    Json(&'a RawValue),
    Text(Cow<'a, str>),
}

/// Sends `message` to every connected client. Costs nothing when no client is connected.
pub(crate) fn broadcast(frames: &Frames, message: &Message) {
    if frames.sender.receiver_count() == 0 {
        return;
    }
    let bytes = &message.payload[..];
    let received = Received {
        payload: bytes,
        received_at: message.received_at,
        topic_device: message.device_id.as_deref().map(str::as_bytes),
        cut: message.original_bytes.map(|original_bytes| Cut {
            original_bytes,
            reason: None,
            detail: None,
        }),
    };
    let outcome = frames.validator.validate_received(&received);
    let (metrics, rejected) = match &outcome {
        Outcome::Accepted(event) => (Some(&event.metrics), None),
        Outcome::Rejected(rejection) => (None, Some(rejection.code())),
    };
    // The device as the audit service will store it when the payload passes; else the topic's,
    // as the contract allows it (a placeholder when it does not).
    let device_id = match &outcome {
        Outcome::Accepted(event) => Some(event.device_id.as_str()),
        Outcome::Rejected(_) => frames.validator.topic_device(received.topic_device).name(),
    };
    let original = message.original_bytes.unwrap_or(bytes.len() as u64);
    let shown = &bytes[..bytes.len().min(frames.max_payload_bytes)];
    let payload_cut = (shown.len() as u64) < original;
    if payload_cut {
        instruments::counter(&instruments::WEBSOCKET_FRAMES_CUT).increment(1);
    }
    let payload = match serde_json::from_slice::<&RawValue>(shown) {
        Ok(json) if !payload_cut => Payload::Json(json),
        _ => Payload::Text(String::from_utf8_lossy(shown)),
    };
    let frame = Frame {
        topic: &message.topic,
        device_id,
        received_at: message.received_at,
        payload,
        payload_cut: payload_cut.then_some(original),
        metrics,
        rejected,
    };
    match serde_json::to_string(&frame) {
        // No receiver left between the check and the send is fine: nobody is watching.
        Ok(text) => drop(frames.sender.send(LiveFrame {
            device_id: device_id.map(Arc::from),
            text: Utf8Bytes::from(text),
        })),
        Err(error) => tracing::warn!(%error, "Could not encode a live-view frame."),
    }
}

/// The origins of the web pages allowed to open the live view (`--ws-allowed-origins`).
#[derive(Debug, Clone)]
pub(crate) struct AllowedOrigins {
    /// `None`: any (`*`).
    origins: Option<Arc<[String]>>,
}

impl AllowedOrigins {
    pub(crate) fn new(origins: &[String]) -> Self {
        let origins: Vec<String> = origins
            .iter()
            .map(|origin| origin.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|origin| !origin.is_empty())
            .collect();
        AllowedOrigins {
            origins: (!origins.iter().any(|origin| origin == "*")).then(|| origins.into()),
        }
    }

    /// Whether a request with this `Origin` header (none: not a browser) may upgrade.
    fn allows(&self, origin: Option<&axum::http::HeaderValue>) -> bool {
        let (Some(origins), Some(origin)) = (&self.origins, origin) else {
            return true;
        };
        origin.to_str().is_ok_and(|origin| {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            origins.contains(&origin)
        })
    }
}

/// Middleware: a browser page from an origin not allowed gets 403 before anything else.
async fn check_origin(
    State(allowed): State<AllowedOrigins>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if allowed.allows(request.headers().get(axum::http::header::ORIGIN)) {
        return next.run(request).await;
    }
    instruments::counter(&instruments::WEBSOCKET_ORIGINS_REFUSED).increment(1);
    (
        axum::http::StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({ "error": { "parameter": "Origin", "message": "this page's origin may not open the live view (TELEMETRY_WS_ALLOWED_ORIGINS)" } })),
    )
        .into_response()
}

/// The router, separate from the listener so handlers can be tested without a socket.
pub(crate) fn router(
    frames: Frames,
    readiness: Arc<Readiness>,
    auth: Auth,
    origins: AllowedOrigins,
) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route_layer(axum::middleware::from_fn_with_state(
            // Browsers cannot set headers on a WebSocket: the token may come in the query.
            auth.with_query_tokens(),
            telemetry_auth::require_token,
        ))
        // Outermost, so it runs first: a foreign page learns nothing, not even about tokens.
        .route_layer(axum::middleware::from_fn_with_state(origins, check_origin))
        .with_state(frames)
        .merge(telemetry_ops::router(readiness))
}

/// Largest message a live-view client may send. The live view takes nothing from its clients but
/// control frames; without a limit a client could make the bridge buffer 64 MiB (tungstenite's
/// default) per connection.
const MAX_CLIENT_MESSAGE_BYTES: usize = 4096;

/// Read buffer per live-view client: room for the largest message a client may send.
const CLIENT_READ_BUFFER_BYTES: usize = 8192;

/// Write buffer per live-view client. Frames waiting for a client are written together, up to
/// [`MAX_FRAMES_PER_WRITE`], instead of one system call per frame.
const CLIENT_WRITE_BUFFER_BYTES: usize = 8192;

/// Most frames written to one client at once: about 6 KiB of typical frames, within its write
/// buffer (larger frames are written as the buffer fills).
const MAX_FRAMES_PER_WRITE: usize = 16;

async fn upgrade(
    socket: WebSocketUpgrade,
    State(frames): State<Frames>,
    Extension(access): Extension<Access>,
) -> impl IntoResponse {
    let write_timeout = frames.write_timeout;
    let frames = frames.sender.subscribe();
    socket
        .max_message_size(MAX_CLIENT_MESSAGE_BYTES)
        .max_frame_size(MAX_CLIENT_MESSAGE_BYTES)
        // tungstenite's buffers default to 128 KiB each per connection: with 1,000 clients the
        // bridge held 151 MB (`telemetry bench --ws-clients 1000`). Clients send at most
        // MAX_CLIENT_MESSAGE_BYTES, and frames are flushed in small batches.
        .read_buffer_size(CLIENT_READ_BUFFER_BYTES)
        .write_buffer_size(CLIENT_WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| forward(socket, frames, access, write_timeout))
}

/// Forwards the frames of the devices in `scope` to one client until it goes away. A client that
/// falls behind by more than the buffer skips the oldest frames; the pipeline never waits for it.
/// A client whose socket takes longer than `write_timeout` to take a batch of frames is dropped:
/// it would hold its frames, and a connection, for as long as it likes. When the client's token
/// is removed from the tokens file (or its devices change), the connection is closed with 1008
/// (policy violation): a new connection gets the new access.
async fn forward(
    socket: WebSocket,
    mut frames: broadcast::Receiver<LiveFrame>,
    access: Access,
    write_timeout: Duration,
) {
    let scope = &access.scope;
    let revoked = access.revoked();
    tokio::pin!(revoked);
    let clients = instruments::gauge(&instruments::WEBSOCKET_CLIENTS);
    let skipped = instruments::counter(&instruments::WEBSOCKET_FRAMES_MISSED);
    clients.increment(1);
    let (mut sender, mut receiver) = socket.split();
    let visible = |frame: &LiveFrame| match &frame.device_id {
        Some(device_id) => scope.allows(device_id),
        None => scope.allows_unknown_devices(),
    };
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Ok(frame) => {
                    // This frame and those already waiting, written together.
                    let mut next = Some(frame);
                    let write = async {
                        let mut fed = 0;
                        while let Some(frame) = next.take() {
                            if visible(&frame) {
                                sender.feed(WsMessage::Text(frame.text)).await?;
                                fed += 1;
                            }
                            if fed < MAX_FRAMES_PER_WRITE {
                                next = waiting(&mut frames, &skipped);
                            }
                        }
                        sender.flush().await
                    };
                    match tokio::time::timeout(write_timeout, write).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break,
                        Err(_) => {
                            instruments::WEBSOCKET_CLIENTS_DROPPED.counter_of(telemetry_metrics::series!(SERVICE, "write_timeout"))
                                .increment(1);
                            tracing::info!(?write_timeout, "A live-view client did not take its frames in time; dropped it.");
                            break;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => lagged(missed, &skipped),
                Err(broadcast::error::RecvError::Closed) => break,
            },
            incoming = receiver.next() => match incoming {
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            () = &mut revoked => {
                instruments::WEBSOCKET_CLIENTS_DROPPED.counter_of(telemetry_metrics::series!(SERVICE, "token_revoked"))
                    .increment(1);
                tracing::info!(token = access.token.as_deref().unwrap_or(""), "A live-view client's token was revoked; closed its connection.");
                let close = WsMessage::Close(Some(axum::extract::ws::CloseFrame {
                    code: axum::extract::ws::close_code::POLICY,
                    reason: Utf8Bytes::from_static("token revoked"),
                }));
                let _ = tokio::time::timeout(write_timeout, sender.send(close)).await;
                break;
            }
        }
    }
    clients.decrement(1);
}

/// The next frame already waiting for this client, if any.
fn waiting(
    frames: &mut broadcast::Receiver<LiveFrame>,
    skipped: &metrics::Counter,
) -> Option<LiveFrame> {
    loop {
        match frames.try_recv() {
            Ok(frame) => return Some(frame),
            Err(broadcast::error::TryRecvError::Lagged(missed)) => lagged(missed, skipped),
            Err(_) => return None,
        }
    }
}

/// Counts the frames a client skipped because it fell behind by more than its buffer.
fn lagged(missed: u64, skipped: &metrics::Counter) {
    skipped.increment(missed);
    tracing::debug!(missed, "A WebSocket client fell behind and skipped frames.");
}
