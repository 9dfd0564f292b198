//! The API and the dashboard: reads the telemetry store (never writes it) and serves
//! `GET /api/devices`, `GET /api/devices/{id}/telemetry`, `GET /api/dlq`, `GET /api/alerts`, `GET /api/config`, the
//! OpenAPI document at `GET /api/openapi.json`, and the dashboard at `/`, whose assets are
//! embedded in the binary. Live data reaches the dashboard straight from the bridge's WebSocket.
//!
//! # Layout
//! - [`ApiConfig`]: every setting, with its flag and environment variable.
//! - [`app`]: the router, separate from the listener so handlers are tested with `oneshot`.
//! - `handlers`: one function per endpoint; `params`: query checking and the JSON error;
//!   `health`: how a device's health is judged; `assets`: the embedded dashboard; `series`:
//!   whether a series is read from the rows or from the rollups.
//! - [`run`]: serve until shutdown, with `/healthz`, `/readyz` (database reachable), `/metrics`.

mod assets;
mod handlers;
mod health;
pub mod instruments;
mod params;
mod series;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use telemetry_auth::{Auth, AuthConfig};
use telemetry_store::DynStore;
use tokio_util::sync::CancellationToken;

pub use health::{Health, HealthThresholds};

/// Errors that stop the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database URL is not usable.
    #[error(transparent)]
    Store(#[from] telemetry_store::Error),
    /// The HTTP listener could not be bound or served.
    #[error(transparent)]
    Listen(#[from] telemetry_ops::ListenError),
    /// The tokens file is unusable, or the API would serve everyone on a public address.
    #[error(transparent)]
    Auth(#[from] telemetry_auth::AuthError),
    /// A setting is out of its range.
    #[error("{setting} {problem}")]
    Invalid {
        /// The setting's variable and flag.
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// API settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiConfig {
    /// MySQL/MariaDB URL of the telemetry database with a read-only account (the API only
    /// reads: give it an account with SELECT alone); `sqlite://<file>` for the embedded SQLite
    /// store of `telemetry up`. Default: the development reader account of
    /// `scripts/services.sh`; where only TELEMETRY_MYSQL_URL (the writers' account) is set, that,
    /// with a warning.
    #[arg(long, env = "TELEMETRY_API_MYSQL_URL", hide_env_values = true)]
    pub mysql_url: Option<String>,

    /// Database connections in the API's pool.
    #[arg(long, env = "TELEMETRY_API_MYSQL_MAX_CONNECTIONS", default_value_t = 4)]
    pub mysql_max_connections: u32,

    /// Longest a database query of the API may run, in milliseconds (0: no limit, at most
    /// 3600000); a longer one is stopped, so a few costly requests cannot hold the pool, and is
    /// answered 504. Set per connection as MariaDB's `max_statement_time` (MySQL's
    /// `max_execution_time`); the SQLite store interrupts the statement.
    #[arg(
        long = "api-statement-timeout-ms",
        env = "TELEMETRY_API_STATEMENT_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub statement_timeout_ms: u64,

    /// Most bytes of each rejected record's payload in a `/api/dlq` answer (0 to 65536, what the
    /// index keeps): cut by the query and marked `payload_truncated`, `payload_bytes` keeping the
    /// original length; so 1,000 entries stay within a few MB.
    #[arg(
        long = "api-dlq-payload-bytes",
        env = "TELEMETRY_API_DLQ_PAYLOAD_BYTES",
        default_value_t = 4_096
    )]
    pub dlq_payload_bytes: u32,

    /// Address of the API and dashboard (plus `/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long = "api-listen",
        env = "TELEMETRY_API_LISTEN",
        default_value = "127.0.0.1:8082"
    )]
    pub listen: String,

    /// The bridge's WebSocket URL the dashboard's live view connects to. Without it, the
    /// dashboard uses `ws://<the host it was loaded from>:8080/ws`.
    #[arg(long, env = "TELEMETRY_API_LIVE_URL")]
    pub live_url: Option<String>,

    /// A device is `stale` when nothing (accepted or rejected) arrived from it for this long, in
    /// seconds.
    #[arg(
        long,
        env = "TELEMETRY_HEALTH_STALE_AFTER_SECONDS",
        default_value_t = 300
    )]
    pub stale_after_seconds: u64,

    /// A device is `failing` when at least this share (0 to 1) of its records in the last hour
    /// went to the DLQ...
    #[arg(
        long,
        env = "TELEMETRY_HEALTH_FAILING_DLQ_RATIO",
        default_value_t = 0.5
    )]
    pub failing_dlq_ratio: f64,

    /// ... and there were at least this many of them.
    #[arg(
        long,
        env = "TELEMETRY_HEALTH_FAILING_MIN_REJECTIONS",
        default_value_t = 3
    )]
    pub failing_min_rejections: u64,

    /// Bearer tokens and their device allow-lists.
    #[command(flatten)]
    pub auth: AuthConfig,

    /// Header-read and idle timeouts and the connection cap of the HTTP server.
    #[command(flatten)]
    pub http: telemetry_ops::HttpLimits,

    /// TLS of the HTTP server: a certificate and its key.
    #[command(flatten)]
    pub tls: telemetry_ops::HttpTls,
}

impl ApiConfig {
    /// The health thresholds, checked.
    pub fn thresholds(&self) -> Result<HealthThresholds> {
        if !(0.0..=1.0).contains(&self.failing_dlq_ratio) {
            return Err(Error::Invalid {
                setting: "TELEMETRY_HEALTH_FAILING_DLQ_RATIO / --failing-dlq-ratio",
                problem: format!("is {}, must be from 0 to 1", self.failing_dlq_ratio),
            });
        }
        Ok(HealthThresholds {
            stale_after: Duration::from_secs(self.stale_after_seconds),
            failing_dlq_ratio: self.failing_dlq_ratio,
            failing_min_rejections: self.failing_min_rejections,
        })
    }

    /// The database URL the API reads with: `--mysql-url` (`TELEMETRY_API_MYSQL_URL`); else the
    /// writers' `TELEMETRY_MYSQL_URL`, with a warning that the API then holds more privilege than
    /// it needs; else the development reader account.
    pub fn database_url(&self) -> String {
        if let Some(url) = &self.mysql_url {
            return url.clone();
        }
        match std::env::var("TELEMETRY_MYSQL_URL") {
            Ok(url) if !url.is_empty() => {
                tracing::warn!(
                    "TELEMETRY_API_MYSQL_URL is not set: the API reads with TELEMETRY_MYSQL_URL, \
                     the writers' account, which may change the data. Give the API an account \
                     that may only SELECT (docs/operations.md, \"Database accounts\")."
                );
                url
            }
            _ => telemetry_store::DEFAULT_READER_URL.to_string(),
        }
    }

    /// The statement timeout, checked; `None` for no limit.
    pub fn statement_timeout(&self) -> Result<Option<Duration>> {
        if self.statement_timeout_ms > MAX_STATEMENT_TIMEOUT_MS {
            return Err(Error::Invalid {
                setting: "TELEMETRY_API_STATEMENT_TIMEOUT_MS / --api-statement-timeout-ms",
                problem: format!(
                    "is {}, must be from 0 (no limit) to {MAX_STATEMENT_TIMEOUT_MS} (an hour)",
                    self.statement_timeout_ms
                ),
            });
        }
        Ok((self.statement_timeout_ms > 0)
            .then(|| Duration::from_millis(self.statement_timeout_ms)))
    }

    /// The DLQ payload bound, checked.
    pub fn dlq_payload_bytes(&self) -> Result<u32> {
        let most = u32::try_from(telemetry_store::MAX_INDEXED_PAYLOAD_BYTES).unwrap_or(u32::MAX);
        if self.dlq_payload_bytes > most {
            return Err(Error::Invalid {
                setting: "TELEMETRY_API_DLQ_PAYLOAD_BYTES / --api-dlq-payload-bytes",
                problem: format!(
                    "is {}, must be from 0 to {most} (the DLQ index keeps no more)",
                    self.dlq_payload_bytes
                ),
            });
        }
        Ok(self.dlq_payload_bytes)
    }
}

/// The longest statement timeout accepted: an hour.
const MAX_STATEMENT_TIMEOUT_MS: u64 = 3_600_000;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The telemetry store (read only): MySQL, or SQLite under `telemetry up`.
    pub store: DynStore,
    /// How device health is judged.
    pub thresholds: HealthThresholds,
    /// The live-view WebSocket URL for the dashboard, when configured.
    pub live_url: Option<String>,
    /// Who may read what (off: everyone everything).
    pub auth: Auth,
    /// Most bytes of each payload in a `/api/dlq` answer.
    pub dlq_payload_bytes: u32,
}

/// The readiness check `/readyz` reports: passing while the database answers.
const DATABASE: &str = "database";

/// How often readiness pings the database.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// The API and dashboard routes.
pub fn app(state: AppState) -> Router {
    // The data endpoints need a token when auth is on; the page, its assets, the OpenAPI
    // document and `/api/config` (which tells the page whether to ask for a token) do not.
    let data = Router::new()
        .route("/api/devices", get(handlers::devices))
        .route("/api/devices/{id}/telemetry", get(handlers::telemetry))
        .route("/api/dlq", get(handlers::dlq))
        .route("/api/alerts", get(handlers::alerts))
        .route_layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            telemetry_auth::require_token,
        ));
    Router::new()
        .merge(data)
        .route("/api/config", get(handlers::config))
        .route("/api/openapi.json", get(handlers::openapi))
        .route("/api/{*rest}", get(handlers::not_found))
        .route("/", get(assets::index))
        .route("/assets/{*path}", get(assets::asset))
        .with_state(Arc::new(state))
}

/// The API with its listener bound, not serving yet.
pub struct Api {
    state: AppState,
    server: telemetry_ops::HttpServer,
    http: telemetry_ops::HttpLimits,
}

impl Api {
    /// Checks the settings and binds the listener.
    pub async fn bind(config: ApiConfig) -> Result<Self> {
        let thresholds = config.thresholds()?;
        let statement_timeout = config.statement_timeout()?;
        let dlq_payload_bytes = config.dlq_payload_bytes()?;
        let store = telemetry_store::open_bounded_reader(
            &config.database_url(),
            config.mysql_max_connections,
            statement_timeout,
        )
        .await?;
        let server = telemetry_ops::HttpServer::bind(&config.listen)
            .await?
            .with_tls(&config.tls)?;
        let auth = Auth::from_config(
            &config.auth,
            "api",
            "TELEMETRY_API_LISTEN / --api-listen",
            server.local_addr()?,
        )?;
        Ok(Api {
            state: AppState {
                store,
                thresholds,
                live_url: config.live_url,
                auth,
                dlq_payload_bytes,
            },
            server,
            http: config.http,
        })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.server.local_addr()?)
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Api {
            state,
            server,
            http,
        } = self;
        let store = state.store.clone();
        let readiness = telemetry_ops::Readiness::new(&[DATABASE]);
        tracing::info!(listen = %server.local_addr()?, "API and dashboard started.");
        let router = app(state).merge(telemetry_ops::router(readiness.clone()));
        let server = server.spawn(router, "api", &http, shutdown.clone());
        loop {
            let reachable = store.ping().await;
            if let Err(error) = &reachable {
                tracing::warn!(%error, "The database does not answer.");
            }
            readiness.set(DATABASE, reachable.is_ok());
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(PING_INTERVAL) => {}
            }
        }
        telemetry_ops::join(server).await?;
        tracing::info!("API stopped.");
        Ok(())
    }
}

/// Runs the API until `shutdown` is cancelled.
pub async fn run(config: ApiConfig, shutdown: CancellationToken) -> Result<()> {
    Api::bind(config).await?.run(shutdown).await
}
