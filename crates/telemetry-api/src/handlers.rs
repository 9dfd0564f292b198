//! One function per endpoint. The JSON shapes are documented in `openapi.json`.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use telemetry_auth::Access;
use telemetry_core::validate::Code;
use telemetry_store::{DeadLetterFilter, DevicePage};

use crate::health::{dlq_rate, Health};
use crate::params::{check_name, shorten, ApiError, Params};
use crate::AppState;

/// The OpenAPI document, embedded.
const OPENAPI: &str = include_str!("../openapi.json");

/// The longest device id (as the contract allows and the table stores).
const MAX_DEVICE_ID_CHARS: usize = 128;
/// The longest metric name accepted in a query.
const MAX_METRIC_CHARS: usize = 128;
/// Most buckets a series may be cut into.
const MAX_POINTS: u32 = 10_000;
/// Buckets when `max_points` is not given.
const DEFAULT_POINTS: u32 = 500;
/// The range when `from` is not given: the day before `to`.
const DEFAULT_RANGE: chrono::Duration = chrono::Duration::days(1);
/// The widest range one series query may cover.
const MAX_RANGE_DAYS: i64 = 366;
/// Most devices per page, and the number when `limit` is not given.
const MAX_DEVICES_LIMIT: u32 = 1_000;
const DEFAULT_DEVICES_LIMIT: u32 = 100;
/// The longest cursor accepted: the base64url of a device id of 128 characters of 4 bytes.
const MAX_CURSOR_CHARS: usize = 684;
/// Most DLQ entries per request, and the number when `limit` is not given.
const MAX_DLQ_LIMIT: u32 = 1_000;
const DEFAULT_DLQ_LIMIT: u32 = 50;
/// `error.code` of records the database refused (the audit service's, not a contract code).
const DB_REJECTED: &str = "db_rejected";

/// RFC 3339 in UTC with milliseconds: `2026-11-29T10:00:00.123Z`.
fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Serialize)]
struct DevicesBody {
    generated_at: String,
    thresholds: ThresholdsBody,
    devices: Vec<DeviceBody>,
    /// Where the next page starts; `None` on the last page.
    next_cursor: Option<String>,
}

#[derive(Serialize)]
struct ThresholdsBody {
    stale_after_seconds: u64,
    failing_dlq_ratio: f64,
    failing_min_rejections: u64,
}

#[derive(Serialize)]
struct DeviceBody {
    device_id: String,
    first_seen: String,
    last_seen: String,
    last_accepted: Option<String>,
    last_rejected: Option<String>,
    events_last_hour: u64,
    events_last_day: u64,
    dlq_last_hour: u64,
    dlq_last_day: u64,
    dlq_rate_last_hour: f64,
    metrics: Vec<String>,
    health: Health,
}

/// `GET /api/devices?limit=&cursor=`: a page of the devices (those the token may see) in id
/// order, with their counts and health, and the cursor of the next page.
pub async fn devices(
    State(state): State<Arc<AppState>>,
    Extension(access): Extension<Access>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let params = Params::new(query, &["limit", "cursor"])?;
    let limit = params.integer("limit", 1, MAX_DEVICES_LIMIT, DEFAULT_DEVICES_LIMIT)?;
    let after = params.get("cursor").map(decode_cursor).transpose()?;
    let now = Utc::now();
    // One more than the page: whether it exists says whether there is a next page.
    let mut devices = state
        .store
        .devices(
            now,
            &DevicePage {
                after: after.as_deref(),
                scope: &access.scope,
                limit: limit + 1,
            },
        )
        .await
        .map_err(|error| ApiError::store(&error))?;
    let next_cursor = if devices.len() > limit as usize {
        devices.truncate(limit as usize);
        devices
            .last()
            .map(|device| encode_cursor(&device.device_id))
    } else {
        None
    };
    let thresholds = &state.thresholds;
    let devices = devices
        .into_iter()
        // The query filtered already; the scope is checked again on what it returned.
        .filter(|device| access.scope.allows(&device.device_id))
        .map(|device| DeviceBody {
            health: thresholds.judge(&device, now),
            dlq_rate_last_hour: dlq_rate(&device),
            first_seen: rfc3339(device.first_seen),
            last_seen: rfc3339(device.last_seen),
            last_accepted: device.last_accepted.map(rfc3339),
            last_rejected: device.last_rejected.map(rfc3339),
            events_last_hour: device.events_last_hour,
            events_last_day: device.events_last_day,
            dlq_last_hour: device.dlq_last_hour,
            dlq_last_day: device.dlq_last_day,
            metrics: device.metrics,
            device_id: device.device_id,
        })
        .collect();
    Ok(Json(DevicesBody {
        generated_at: rfc3339(now),
        thresholds: ThresholdsBody {
            stale_after_seconds: thresholds.stale_after.as_secs(),
            failing_dlq_ratio: thresholds.failing_dlq_ratio,
            failing_min_rejections: thresholds.failing_min_rejections,
        },
        devices,
        next_cursor,
    }))
}

/// The cursor after `device_id`: its base64url. Opaque to clients; only this API reads it.
fn encode_cursor(device_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(device_id)
}

/// The device id a cursor of [`encode_cursor`] holds, or a 400 naming `cursor`.
fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    let refused = || {
        ApiError::bad(
            "cursor",
            format!(
                "`{}` is not a cursor this API gave out (take `next_cursor` from the previous page as \
                 it is, or leave it out for the first page)",
                shorten(cursor)
            ),
        )
    };
    if cursor.len() > MAX_CURSOR_CHARS {
        return Err(refused());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| refused())?;
    let device_id = String::from_utf8(bytes).map_err(|_| refused())?;
    let length = device_id.chars().count();
    if length == 0 || length > MAX_DEVICE_ID_CHARS {
        return Err(refused());
    }
    Ok(device_id)
}

#[derive(Serialize)]
struct SeriesBody {
    device_id: String,
    metric: String,
    from: String,
    to: String,
    bucket_ms: i64,
    source: &'static str,
    points: Vec<PointBody>,
}

#[derive(Serialize)]
struct PointBody {
    t: i64,
    count: u64,
    min: f64,
    avg: f64,
    max: f64,
}

/// `GET /api/devices/{id}/telemetry?metric=&from=&to=&max_points=`: one metric over a range,
/// downsampled by the database to at most `max_points` buckets (min/avg/max per bucket); from the
/// rollup tables when buckets are a minute or wider and the rollup covers the range (`source`).
pub async fn telemetry(
    State(state): State<Arc<AppState>>,
    Extension(access): Extension<Access>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(device_id) = path.map_err(|rejection| {
        ApiError::bad("id", format!("cannot be read: {}", rejection.body_text()))
    })?;
    check_name("id", &device_id, MAX_DEVICE_ID_CHARS)?;
    allowed(&access, &device_id)?;
    let params = Params::new(query, &["metric", "from", "to", "max_points"])?;
    let metric = params
        .name("metric", MAX_METRIC_CHARS)?
        .ok_or_else(|| ApiError::bad("metric", "is required, e.g. metric=temperature_c"))?;
    let max_points = params.integer("max_points", 1, MAX_POINTS, DEFAULT_POINTS)?;
    let to = params.time("to")?.unwrap_or_else(Utc::now);
    let from = match params.time("from")? {
        Some(from) => from,
        None => to - DEFAULT_RANGE,
    };
    if from >= to {
        return Err(ApiError::bad("from", "must be before `to`"));
    }
    if to - from > chrono::Duration::days(MAX_RANGE_DAYS) {
        return Err(ApiError::bad(
            "from",
            format!("the range may cover at most {MAX_RANGE_DAYS} days"),
        ));
    }
    let store = &state.store;
    let known = store
        .device_exists(&device_id)
        .await
        .map_err(|error| ApiError::store(&error))?;
    if !known {
        return Err(ApiError::not_found(format!(
            "no device `{}` has been seen",
            shorten(&device_id)
        )));
    }
    let series = crate::series::read(
        store.as_ref(),
        &device_id,
        metric,
        from.timestamp_millis(),
        to.timestamp_millis(),
        max_points,
    )
    .await
    .map_err(|error| ApiError::store(&error))?;
    let time = |millis: i64| rfc3339(DateTime::from_timestamp_millis(millis).unwrap_or_default());
    Ok(Json(SeriesBody {
        metric: metric.to_string(),
        device_id,
        from: time(series.from),
        to: time(series.to),
        bucket_ms: series.bucket_ms,
        source: series.source.name(),
        points: series
            .buckets
            .into_iter()
            .map(|bucket| PointBody {
                t: bucket.start,
                count: bucket.count,
                min: bucket.min,
                avg: bucket.avg,
                max: bucket.max,
            })
            .collect(),
    }))
}

#[derive(Serialize)]
struct DlqBody {
    entries: Vec<DlqEntryBody>,
}

#[derive(Serialize)]
struct DlqEntryBody {
    id: u64,
    received_at: String,
    device_id: Option<String>,
    code: String,
    message: String,
    field: Option<String>,
    rule: Option<String>,
    contract_version: u32,
    source: SourceBody,
    payload: String,
    payload_encoding: &'static str,
    payload_bytes: u32,
    payload_truncated: bool,
}

#[derive(Serialize)]
struct SourceBody {
    topic: String,
    partition: i32,
    offset: i64,
}

/// `GET /api/dlq?device=&code=&limit=`: the newest rejected records, from the DLQ index.
pub async fn dlq(
    State(state): State<Arc<AppState>>,
    Extension(access): Extension<Access>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let params = Params::new(query, &["device", "code", "limit"])?;
    let device_id = params.name("device", MAX_DEVICE_ID_CHARS)?;
    if let Some(device_id) = device_id {
        allowed(&access, device_id)?;
    }
    let code = params.get("code");
    if let Some(code) = code {
        let known = Code::ALL.iter().any(|known| known.as_str() == code) || code == DB_REJECTED;
        if !known {
            let mut codes: Vec<&str> = Code::ALL.iter().map(|code| code.as_str()).collect();
            codes.push(DB_REJECTED);
            return Err(ApiError::bad(
                "code",
                format!(
                    "`{}` is not a reason code; the codes are {}",
                    shorten(code),
                    codes.join(", ")
                ),
            ));
        }
    }
    let limit = params.integer("limit", 1, MAX_DLQ_LIMIT, DEFAULT_DLQ_LIMIT)?;
    let entries = state
        .store
        .dead_letters(&DeadLetterFilter {
            device_id,
            code,
            scope: &access.scope,
            limit,
            max_payload_bytes: state.dlq_payload_bytes,
        })
        .await
        .map_err(|error| ApiError::store(&error))?;
    let entries = entries
        .into_iter()
        // The query filtered already; the scope is checked again on what it returned.
        .filter(|entry| {
            entry.device_id.as_deref().map_or_else(
                || access.scope.allows_unknown_devices(),
                |device_id| access.scope.allows(device_id),
            )
        })
        .map(|entry| {
            let truncated = entry.payload.len() < entry.payload_bytes as usize;
            if truncated {
                crate::instruments::counter(&crate::instruments::DLQ_PAYLOADS_CUT).increment(1);
            }
            let (payload, payload_encoding) = payload_text(entry.payload, truncated);
            DlqEntryBody {
                id: entry.id,
                received_at: rfc3339(entry.received_at),
                device_id: entry.device_id,
                code: entry.code,
                message: entry.message,
                field: entry.field,
                rule: entry.rule,
                contract_version: entry.contract_version,
                source: SourceBody {
                    topic: entry.source_topic,
                    partition: entry.source_partition,
                    offset: entry.source_offset,
                },
                payload,
                payload_encoding,
                payload_bytes: entry.payload_bytes,
                payload_truncated: truncated,
            }
        })
        .collect();
    Ok(Json(DlqBody { entries }))
}

/// A DLQ payload as a JSON string and its encoding: the text when it is UTF-8, else base64.
/// Text cut inside a character (by the query's cut or the index's 64 KiB) is still text, without
/// the partial character. Text that JSON escaping would more than double (each control character
/// becomes six bytes) is sent as base64 too, so an entry's payload is at most about twice the
/// bytes read, whatever a device sent.
fn payload_text(bytes: Vec<u8>, truncated: bool) -> (String, &'static str) {
    let base64 = |bytes: &[u8]| {
        (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            "base64",
        )
    };
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) if truncated && error.utf8_error().error_len().is_none() => {
            let valid = error.utf8_error().valid_up_to();
            let mut bytes = error.into_bytes();
            bytes.truncate(valid);
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(error) => return base64(error.as_bytes()),
    };
    if json_escaped_len(&text) > 2 * text.len() {
        return base64(text.as_bytes());
    }
    (text, "utf8")
}

/// The length of `text` inside a JSON string, as serde_json escapes it.
fn json_escaped_len(text: &str) -> usize {
    text.chars()
        .map(|character| match character {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            control if u32::from(control) < 0x20 => 6,
            other => other.len_utf8(),
        })
        .sum()
}

#[derive(Serialize)]
struct ConfigBody<'a> {
    live_url: Option<&'a str>,
    /// Whether the data endpoints (and the live view) need a bearer token.
    auth_required: bool,
}

/// Most alerts per request, and the number when `limit` is not given.
const MAX_ALERTS_LIMIT: u32 = 1_000;
const DEFAULT_ALERTS_LIMIT: u32 = 50;

#[derive(Serialize)]
struct AlertsBody {
    alerts: Vec<serde_json::Value>,
}

/// `GET /api/alerts?device=&state=firing|all&limit=`: the newest alerts of `telemetry alert`
/// (the last week of them), each as it was produced to the alerts topic, with `status` and
/// `resolved_at` from its resolution once it resolved.
pub async fn alerts(
    State(state): State<Arc<AppState>>,
    Extension(access): Extension<Access>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let params = Params::new(query, &["device", "state", "limit"])?;
    let device_id = params.name("device", MAX_DEVICE_ID_CHARS)?;
    if let Some(device_id) = device_id {
        allowed(&access, device_id)?;
    }
    let firing_only = match params.get("state") {
        None | Some("all") => false,
        Some("firing") => true,
        Some(other) => {
            return Err(ApiError::bad(
                "state",
                format!("`{}` is not `firing` or `all`", shorten(other)),
            ))
        }
    };
    let limit = params.integer("limit", 1, MAX_ALERTS_LIMIT, DEFAULT_ALERTS_LIMIT)?;
    let entries = state
        .store
        .recent_alerts(device_id, &access.scope, firing_only, limit)
        .await
        .map_err(|error| ApiError::store(&error))?;
    let mut alerts = Vec::with_capacity(entries.len());
    for entry in entries {
        // Written by the alerter; one that does not parse is left out, not a failed request.
        let Ok(serde_json::Value::Object(mut alert)) = serde_json::from_str(&entry.fired) else {
            tracing::warn!("An alert in the outbox is not a JSON object; left out.");
            continue;
        };
        // The query filtered already; the scope is checked again on what it returned.
        let visible = match alert.get("device_id").and_then(serde_json::Value::as_str) {
            Some(device_id) => access.scope.allows(device_id),
            None => access.scope.allows_unknown_devices(),
        };
        if !visible {
            continue;
        }
        if let Some(resolved) = entry
            .resolved
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        {
            for field in ["status", "resolved_at"] {
                if let Some(value) = resolved.get(field) {
                    alert.insert(field.to_string(), value.clone());
                }
            }
        }
        alerts.push(serde_json::Value::Object(alert));
    }
    Ok(Json(AlertsBody { alerts }))
}

/// `GET /api/config`: what the dashboard needs to know about this deployment.
pub async fn config(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    Json(ConfigBody {
        live_url: state.live_url.as_deref(),
        auth_required: state.auth.is_enabled(),
    })
    .into_response()
}

/// `GET /api/openapi.json`.
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// A 403 unless the request's token may see `device_id`.
fn allowed(access: &Access, device_id: &str) -> Result<(), ApiError> {
    if access.scope.allows(device_id) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this token may not read device `{}`",
            shorten(device_id)
        )))
    }
}

/// Any other `/api/...` path: a JSON 404 rather than the dashboard.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see /api/openapi.json")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{decode_cursor, encode_cursor, json_escaped_len, payload_text};

    #[test]
    fn cursors_hold_any_device_id_and_refuse_the_rest() {
        for id in [
            "pico-1",
            "pico-7 ",
            "é:ü.x_y-z",
            &"x".repeat(128),
            &"€".repeat(128),
        ] {
            assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        }
        for cursor in [
            "!!".to_string(),
            "_w".to_string(), // 0xff: not UTF-8
            "A".to_string(),  // not base64 of whole bytes
            encode_cursor(&"x".repeat(129)),
            "A".repeat(685),
        ] {
            assert!(decode_cursor(&cursor).is_err(), "{cursor}");
        }
    }

    #[test]
    fn payloads_are_text_unless_not_utf8_or_mostly_escapes() {
        assert_eq!(
            payload_text(b"oops".to_vec(), false),
            ("oops".into(), "utf8")
        );
        // Quotes double at most: JSON stays text.
        assert_eq!(
            payload_text(br#"["a","b","c"]"#.to_vec(), false),
            (r#"["a","b","c"]"#.into(), "utf8")
        );
        assert_eq!(
            payload_text(vec![0xff, 0x00], false),
            ("/wA=".into(), "base64")
        );
        // Control characters would be six bytes each.
        assert_eq!(payload_text(vec![1; 3], false), ("AQEB".into(), "base64"));
        assert_eq!(payload_text(b"a\nb\tc".to_vec(), false).1, "utf8");
        // Cut inside a character: the partial character is left out.
        assert_eq!(
            payload_text("éé".as_bytes()[..3].to_vec(), true),
            ("é".into(), "utf8")
        );
        // The same bytes, not cut: not UTF-8.
        assert_eq!(
            payload_text("éé".as_bytes()[..3].to_vec(), false).1,
            "base64"
        );
    }

    #[test]
    fn escaped_lengths_are_serde_jsons() {
        for text in [
            "plain",
            "a\"b\\c",
            "\u{1}\u{1f}\n\r\t\u{8}\u{c}",
            "é€😀",
            "\u{7f}",
        ] {
            assert_eq!(
                json_escaped_len(text) + 2,
                serde_json::to_string(text).unwrap().len(),
                "{text:?}"
            );
        }
    }
}
