//! Query parameters, checked one by one, and the JSON error every refusal answers with. A bad
//! parameter is a 400 naming it; nothing a client sends turns into a 500.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde_json::json;

/// A refused request: its status, the parameter at fault (if one is), and why.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    parameter: Option<&'static str>,
    message: String,
}

impl ApiError {
    /// A 400 about `parameter`.
    pub fn bad(parameter: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            parameter: Some(parameter),
            message: message.into(),
        }
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            parameter: None,
            message: message.into(),
        }
    }

    /// A 403: the request's token may not read this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            parameter: None,
            message: message.into(),
        }
    }

    /// The answer to a failed query: a 504 when the statement timeout stopped it, else a 503
    /// (the database did not answer). The detail is logged, not sent.
    pub fn store(error: &telemetry_store::Error) -> Self {
        if error.is_statement_timeout() {
            tracing::warn!(%error, "A query ran into the statement timeout.");
            crate::instruments::counter(&crate::instruments::QUERIES_TIMED_OUT).increment(1);
            return ApiError {
                status: StatusCode::GATEWAY_TIMEOUT,
                parameter: None,
                message: "the query took longer than the statement timeout \
                          (TELEMETRY_API_STATEMENT_TIMEOUT_MS / --api-statement-timeout-ms) and \
                          was stopped; ask for a shorter range, or try again later"
                    .into(),
            };
        }
        tracing::warn!(%error, "A query failed.");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            parameter: None,
            message: "the telemetry database is unavailable or has no schema yet (the audit \
                      service creates it); try again later"
                .into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "parameter": self.parameter, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

/// The query string's parameters, each taken at most once; what is left over is refused.
pub struct Params {
    pairs: Vec<(String, String)>,
    allowed: &'static [&'static str],
}

impl Params {
    /// The parameters of a request to an endpoint that takes `allowed`.
    pub fn new(
        query: Result<Query<Vec<(String, String)>>, QueryRejection>,
        allowed: &'static [&'static str],
    ) -> Result<Self, ApiError> {
        let Query(pairs) = query.map_err(|rejection| {
            ApiError::bad(
                "query",
                format!("cannot be read: {}", rejection.body_text()),
            )
        })?;
        for (index, (name, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&name.as_str()) {
                let takes = if allowed.is_empty() {
                    String::from("no parameters")
                } else {
                    allowed.join(", ")
                };
                return Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    parameter: None,
                    message: format!(
                        "unknown parameter `{}`; this endpoint takes {takes}",
                        shorten(name)
                    ),
                });
            }
            if pairs[..index].iter().any(|(earlier, _)| earlier == name) {
                let parameter = allowed
                    .iter()
                    .find(|allowed| **allowed == name)
                    .copied()
                    .unwrap_or("query");
                return Err(ApiError::bad(parameter, "is given more than once"));
            }
        }
        Ok(Params { pairs, allowed })
    }

    /// The value of `name`, if given (an empty value counts as not given).
    pub fn get(&self, name: &'static str) -> Option<&str> {
        debug_assert!(self.allowed.contains(&name));
        self.pairs
            .iter()
            .find(|(key, value)| key == name && !value.is_empty())
            .map(|(_, value)| value.as_str())
    }

    /// An integer from `min` to `max`, or `default` when not given.
    pub fn integer(
        &self,
        name: &'static str,
        min: u32,
        max: u32,
        default: u32,
    ) -> Result<u32, ApiError> {
        let Some(text) = self.get(name) else {
            return Ok(default);
        };
        text.parse::<u32>()
            .ok()
            .filter(|value| (min..=max).contains(value))
            .ok_or_else(|| {
                ApiError::bad(
                    name,
                    format!(
                        "must be an integer from {min} to {max}, got `{}`",
                        shorten(text)
                    ),
                )
            })
    }

    /// A time: RFC 3339 (`2026-11-29T10:00:00Z`) or milliseconds since the Unix epoch.
    pub fn time(&self, name: &'static str) -> Result<Option<DateTime<Utc>>, ApiError> {
        let Some(text) = self.get(name) else {
            return Ok(None);
        };
        let parsed = match text.parse::<i64>() {
            Ok(millis) => DateTime::from_timestamp_millis(millis),
            Err(_) => DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|time| time.with_timezone(&Utc)),
        };
        // A leap second (`23:59:60`) parses, but no database time can hold it.
        let in_range = parsed.filter(|time| {
            (EARLIEST..=LATEST).contains(&time.timestamp())
                && chrono::Timelike::nanosecond(time) < 1_000_000_000
        });
        in_range.map(Some).ok_or_else(|| {
            ApiError::bad(
                name,
                format!(
                    "must be an RFC 3339 time with offset (2026-11-29T10:00:00Z) or milliseconds \
                     since the Unix epoch, from 1970 to 9999; got `{}`",
                    shorten(text)
                ),
            )
        })
    }

    /// A required or optional name-like value: 1 to `max_chars` characters, no control characters.
    pub fn name(&self, name: &'static str, max_chars: usize) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(text) => check_name(name, text, max_chars).map(Some),
        }
    }
}

/// `text` as a name: 1 to `max_chars` characters without control characters.
pub fn check_name<'a>(
    parameter: &'static str,
    text: &'a str,
    max_chars: usize,
) -> Result<&'a str, ApiError> {
    let length = text.chars().count();
    if length == 0 || length > max_chars || text.chars().any(char::is_control) {
        return Err(ApiError::bad(
            parameter,
            format!(
                "must be 1 to {max_chars} characters without control characters; got `{}`",
                shorten(text)
            ),
        ));
    }
    Ok(text)
}

/// 1970-01-01T00:00:00Z.
const EARLIEST: i64 = 0;
/// 9999-12-31T23:59:59Z, the end of SQL's DATETIME.
const LATEST: i64 = 253_402_300_799;

/// `text` cut to 64 characters, for messages.
pub fn shorten(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}
