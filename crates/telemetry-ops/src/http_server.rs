//! The HTTP listener every service serves on: HTTP/1.1 through hyper, with upgrades (the bridge's
//! `/ws`), and limits a client cannot get past by opening connections and saying nothing.
//!
//! - A request's headers must arrive within the header-read timeout, counted from the
//!   connection's start or from the first byte of its next request.
//! - A keep-alive connection with no request for the idle timeout is closed.
//! - Past the connection cap, a new connection is answered `503 Service Unavailable` and closed.
//!   An upgraded connection (a WebSocket) counts until it closes, and no timeout applies to it.
//!
//! hyper's own `header_read_timeout` is not used: its clock starts when a connection goes idle,
//! not when the next request begins, so it would close every keep-alive connection after the
//! header-read timeout and leave no room for a longer idle timeout. Both are kept here instead,
//! on the read side of the connection: while a connection waits for a request, its reads carry a
//! deadline; while a request is being handled, they do not.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default of [`HttpLimits::http_header_read_timeout_ms`].
const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Default of [`HttpLimits::http_idle_timeout_ms`].
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default of [`HttpLimits::http_max_connections`]: well above the ~1,000 live-view clients of
/// the bridge's benchmark, well below a default limit of open files.
const DEFAULT_MAX_CONNECTIONS: u32 = 4096;

/// What a connection past the cap is answered before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    Connection: close\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Length: 21\r\n\
    \r\n\
    too many connections\n";

/// How long a refused connection is given to take its answer and close, after which it is
/// dropped whatever its state.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Refused connections being answered at once; beyond them a refused connection is closed
/// without an answer, so a flood of connections cannot make refusing them expensive.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// Least time between two warnings that the cap is reached.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// How long the accept loop pauses after an error that is not the client's (out of file
/// descriptors), as `axum::serve` does.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Limits of a service's HTTP listener, the same settings for every service.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpLimits {
    /// How long a client may take to send a request's headers, in milliseconds, counted from the
    /// connection's start or from the first byte of its next request. A connection that has not
    /// sent them in time is closed.
    #[arg(long, env = "TELEMETRY_HTTP_HEADER_READ_TIMEOUT_MS",
          default_value_t = DEFAULT_HEADER_READ_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub http_header_read_timeout_ms: u64,

    /// How long a keep-alive connection may wait for its next request, in milliseconds, before
    /// it is closed. WebSocket connections are not idle: no timeout applies to them.
    #[arg(long, env = "TELEMETRY_HTTP_IDLE_TIMEOUT_MS",
          default_value_t = DEFAULT_IDLE_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub http_idle_timeout_ms: u64,

    /// Most HTTP connections open at once, WebSocket clients included. A connection past it is
    /// answered `503 Service Unavailable` and closed. Keep it below the process's limit of open
    /// files, which its broker and database connections share.
    #[arg(long, env = "TELEMETRY_HTTP_MAX_CONNECTIONS",
          default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            http_header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            http_idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            http_max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl HttpLimits {
    fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_read_timeout_ms)
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.http_idle_timeout_ms)
    }
}

/// A service's HTTP address could not be bound, or serving on it failed.
#[derive(Debug, thiserror::Error)]
#[error("HTTP listener on {address}: {source}")]
pub struct ListenError {
    /// The address as configured.
    pub address: String,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// A bound HTTP listener, not serving yet. Binding first lets a service fail fast on a taken
/// port, and tests ask for port 0 and read the port back.
pub struct HttpServer {
    listener: TcpListener,
    address: String,
    /// Set by [`HttpServer::with_tls`]: connections speak TLS (https://, wss://).
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HttpServer")
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// TLS for a listener that serves people and their browsers (the API and dashboard, the live
/// view): a certificate and its key, PEM files.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HttpTls {
    /// PEM file of the listener's certificate chain (its certificate first). With
    /// `--tls-key-file` the listener speaks only TLS: `https://` for the API and dashboard,
    /// `wss://` for the live view.
    #[arg(
        long,
        env = "TELEMETRY_TLS_CERTIFICATE_FILE",
        requires = "tls_key_file"
    )]
    pub tls_certificate_file: Option<std::path::PathBuf>,

    /// PEM file of the certificate's private key (keep it readable by the service's user only).
    #[arg(
        long,
        env = "TELEMETRY_TLS_KEY_FILE",
        requires = "tls_certificate_file"
    )]
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl HttpTls {
    /// The server configuration from the files; `None` when TLS is not configured.
    fn server_config(&self) -> Result<Option<rustls::ServerConfig>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (Some(certificate_file), Some(key_file)) =
            (&self.tls_certificate_file, &self.tls_key_file)
        else {
            return Ok(None);
        };
        let certificates = CertificateDer::pem_file_iter(certificate_file)
            .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
            .map_err(|error| {
                format!(
                    "TELEMETRY_TLS_CERTIFICATE_FILE / --tls-certificate-file `{}`: {error}",
                    certificate_file.display()
                )
            })?;
        if certificates.is_empty() {
            return Err(format!(
                "TELEMETRY_TLS_CERTIFICATE_FILE / --tls-certificate-file `{}` holds no certificate",
                certificate_file.display()
            ));
        }
        // The key's error names the file, never its contents.
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| {
            format!(
                "TELEMETRY_TLS_KEY_FILE / --tls-key-file `{}`: {error}",
                key_file.display()
            )
        })?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("TLS: {error}"))?
            .with_no_client_auth()
            .with_single_cert(certificates, key)
            .map_err(|error| {
                format!(
                    "TELEMETRY_TLS_CERTIFICATE_FILE and TELEMETRY_TLS_KEY_FILE do not make a \
                     usable pair: {error}"
                )
            })?;
        // HTTP/1.1 only, as the listener serves it (WebSocket upgrades included).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(config))
    }
}

impl HttpServer {
    /// Binds `address` (`host:port`).
    pub async fn bind(address: &str) -> Result<Self, ListenError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ListenError {
                address: address.to_string(),
                source,
            })?;
        Ok(HttpServer {
            listener,
            address: address.to_string(),
            tls: None,
        })
    }

    /// Serves TLS with the certificate and key of `tls`, when it names them; plain HTTP
    /// otherwise. Files that cannot be used are an error naming the setting.
    pub fn with_tls(mut self, tls: &HttpTls) -> Result<Self, ListenError> {
        let config = tls.server_config().map_err(|problem| ListenError {
            address: self.address.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, problem),
        })?;
        if let Some(config) = config {
            tracing::info!(address = %self.address, "The listener speaks TLS (https://, wss://).");
            self.tls = Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)));
        }
        Ok(self)
    }

    /// Whether the listener speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, ListenError> {
        self.listener.local_addr().map_err(|source| ListenError {
            address: self.address.clone(),
            source,
        })
    }

    /// Serves `router` within `limits` in a task until `shutdown`, then stops accepting, lets
    /// open requests finish and waits for their connections to close. `service` labels the
    /// metrics (`http_connections{service}`, ...).
    pub fn spawn(
        self,
        router: Router,
        service: &'static str,
        limits: &HttpLimits,
        shutdown: CancellationToken,
    ) -> JoinHandle<Result<(), ListenError>> {
        let limits = limits.clone();
        tokio::spawn(async move {
            serve(self.listener, self.tls, router, service, limits, shutdown).await;
            Ok(())
        })
    }
}

/// Waits for a server task from [`HttpServer::spawn`]; a panicked task is logged, not returned.
pub async fn join(server: JoinHandle<Result<(), ListenError>>) -> Result<(), ListenError> {
    match server.await {
        Ok(result) => result,
        Err(error) => {
            tracing::error!(%error, "The HTTP server task failed.");
            Ok(())
        }
    }
}

/// The listener's metrics, labelled with the service.
#[derive(Clone)]
struct ServerMetrics {
    connections: metrics::Gauge,
    refused: metrics::Counter,
    header_read_timed_out: metrics::Counter,
    idle_timed_out: metrics::Counter,
}

impl ServerMetrics {
    fn new(service: &'static str) -> Self {
        use crate::instruments::{
            HTTP_CONNECTIONS, HTTP_CONNECTIONS_REFUSED, HTTP_CONNECTIONS_TIMED_OUT,
        };
        let timed_out = |cause: &'static str| {
            HTTP_CONNECTIONS_TIMED_OUT.counter_of(telemetry_metrics::series!(service, cause))
        };
        ServerMetrics {
            connections: HTTP_CONNECTIONS.gauge_of(telemetry_metrics::series!(service)),
            refused: HTTP_CONNECTIONS_REFUSED.counter_of(telemetry_metrics::series!(service)),
            header_read_timed_out: timed_out("header_read"),
            idle_timed_out: timed_out("idle"),
        }
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    service: &'static str,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let metrics = ServerMetrics::new(service);
    let slots = Arc::new(Semaphore::new(limits.http_max_connections as usize));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Ours are kept by `GuardedStream` (see the module's documentation).
    http.header_read_timeout(None);
    let mut last_cap_warning: Option<Instant> = None;
    let mut refused_since_warning = 0u64;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                tracing::error!(%error, service, "Cannot accept HTTP connections; pausing 1 s.");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        // Live-view frames and API answers go out at once, not after the client's delayed TCP
        // acknowledgement of the previous segment (up to 40 ms).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "Could not set TCP_NODELAY on a connection.");
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.refused.increment(1);
            refused_since_warning += 1;
            if last_cap_warning.is_none_or(|at| at.elapsed() >= CAP_WARNING_INTERVAL) {
                tracing::warn!(
                    service,
                    max_connections = limits.http_max_connections,
                    refused = refused_since_warning,
                    "The HTTP connection cap is reached; refusing new connections with 503 \
                     (TELEMETRY_HTTP_MAX_CONNECTIONS)."
                );
                last_cap_warning = Some(Instant::now());
                refused_since_warning = 0;
            }
            refuse(stream, &refusals);
            continue;
        };
        let slot = Slot::new(permit, metrics.connections.clone());
        let stream = GuardedStream::new(stream, slot, &limits, metrics.clone());
        let exchanges = stream.exchanges.clone();
        let (http, router, shutdown) = (http.clone(), router.clone(), shutdown.clone());
        match &tls {
            None => {
                connections.spawn(serve_connection(
                    http, stream, exchanges, router, peer, shutdown,
                ));
            }
            Some(acceptor) => {
                // The handshake's reads are the guarded stream's: a client that stalls it is
                // cut off by the header-read timeout, as one that stalls its request.
                let handshake = acceptor.accept(stream);
                connections.spawn(async move {
                    let stream = tokio::select! {
                        handshake = handshake => match handshake {
                            Ok(stream) => stream,
                            Err(error) => {
                                tracing::debug!(%error, %peer, "A TLS handshake failed.");
                                return;
                            }
                        },
                        () = shutdown.cancelled() => return,
                    };
                    serve_connection(http, stream, exchanges, router, peer, shutdown).await;
                });
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Errors of one connection attempt, not of the listener (as `axum::serve` tells them apart).
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Answers a connection past the cap with 503 and closes it, within [`REFUSAL_TIMEOUT`]; or, with
/// [`MAX_REFUSALS_IN_FLIGHT`] refusals under way already, closes it at once.
fn refuse(mut stream: TcpStream, refusals: &Arc<Semaphore>) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        // After the answer, the client's request is read and thrown away until it closes: closing
        // with its bytes unread would reset the connection, and the client could lose the answer.
        let answer = async {
            stream.write_all(REFUSAL).await?;
            stream.shutdown().await?;
            let mut discard = [0u8; 1024];
            while stream.read(&mut discard).await? > 0 {}
            io::Result::Ok(())
        };
        if let Ok(Err(error)) = tokio::time::timeout(REFUSAL_TIMEOUT, answer).await {
            tracing::debug!(%error, "A refused HTTP connection failed.");
        }
    });
}

async fn serve_connection<S>(
    http: hyper::server::conn::http1::Builder,
    stream: S,
    exchanges: Arc<Exchanges>,
    router: Router,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TrackedService {
        router: TowerToHyperService::new(router),
        exchanges: exchanges.clone(),
    };
    let connection = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            // Finishes the request in hand, if any, and closes an idle connection.
            connection.as_mut().graceful_shutdown();
            if exchanges.started.load(Ordering::Relaxed) == 0 {
                // Nothing was asked or answered yet: nothing to finish or flush. A half-open
                // request would otherwise hold shutdown up until its header-read timeout.
                return;
            }
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "An HTTP connection ended with an error.");
    }
}

/// One of the cap's connections, held by the connection's stream so that it is released when the
/// socket closes, after an upgrade too.
struct Slot {
    _permit: OwnedSemaphorePermit,
    connections: metrics::Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, connections: metrics::Gauge) -> Self {
        connections.increment(1.0);
        Slot {
            _permit: permit,
            connections,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.decrement(1.0);
    }
}

/// Where a connection is in its exchanges, shared by its stream (which times the waits) and its
/// service (which sees requests start and responses end). Why atomics and a mutex: both live in
/// the connection's task, but hyper needs them `Send`, and after an upgrade the stream moves to
/// the WebSocket's task; nothing contends.
#[derive(Default)]
struct Exchanges {
    /// Requests handed to the router.
    started: AtomicU64,
    /// Responses whose body hyper has finished with. A connection with as many responses as
    /// requests waits for its next request.
    finished: AtomicU64,
    /// The connection was switched to another protocol (WebSocket): no more timeouts.
    upgraded: AtomicBool,
    /// The connection's reader, woken when a response finishes so its wait for the next request
    /// starts then: hyper may not read again before the client sends something.
    reader: Mutex<Option<Waker>>,
}

impl Exchanges {
    fn response_finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        if let Some(reader) = self.reader.lock().ok().and_then(|mut reader| reader.take()) {
            reader.wake();
        }
    }

    fn remember_reader(&self, waker: &Waker) {
        if let Ok(mut reader) = self.reader.lock() {
            if !reader.as_ref().is_some_and(|known| known.will_wake(waker)) {
                *reader = Some(waker.clone());
            }
        }
    }
}

/// What a connection's reads wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// A request is being handled, or the connection was upgraded: no deadline.
    None,
    /// The next request, after this many finished responses: until the idle timeout.
    NextRequest(u64),
    /// The rest of a request's headers, after this many finished responses: until the
    /// header-read timeout from its first byte (or from the connection's start).
    Headers(u64),
}

/// The connection's socket, whose reads fail with `TimedOut` when the client keeps the
/// connection waiting for a request or its headers past the limits.
struct GuardedStream {
    stream: TcpStream,
    exchanges: Arc<Exchanges>,
    wait: Wait,
    /// Why boxed: the stream must be `Unpin` for hyper; the sleep is reset, not re-allocated.
    deadline: Pin<Box<Sleep>>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    timed_out: bool,
    metrics: ServerMetrics,
    _slot: Slot,
}

impl GuardedStream {
    fn new(stream: TcpStream, slot: Slot, limits: &HttpLimits, metrics: ServerMetrics) -> Self {
        let header_read_timeout = limits.header_read_timeout();
        GuardedStream {
            stream,
            exchanges: Arc::default(),
            // A new connection owes its first request's headers at once.
            wait: Wait::Headers(0),
            deadline: Box::pin(tokio::time::sleep(header_read_timeout)),
            header_read_timeout,
            idle_timeout: limits.idle_timeout(),
            timed_out: false,
            metrics,
            _slot: slot,
        }
    }

    /// Brings [`Self::wait`] up to date with the exchanges; whether a deadline applies.
    fn follow_exchanges(&mut self) -> bool {
        let exchanges = &self.exchanges;
        if exchanges.upgraded.load(Ordering::Relaxed) {
            self.wait = Wait::None;
            return false;
        }
        let finished = exchanges.finished.load(Ordering::Relaxed);
        if exchanges.started.load(Ordering::Relaxed) != finished {
            self.wait = Wait::None;
            return false;
        }
        match self.wait {
            Wait::NextRequest(after) | Wait::Headers(after) if after == finished => {}
            _ => {
                self.wait = Wait::NextRequest(finished);
                self.deadline
                    .as_mut()
                    .reset(Instant::now() + self.idle_timeout);
            }
        }
        true
    }

    fn time_out(&mut self) -> io::Error {
        let headers = matches!(self.wait, Wait::Headers(_));
        if !self.timed_out {
            self.timed_out = true;
            if headers {
                self.metrics.header_read_timed_out.increment(1);
            } else {
                self.metrics.idle_timed_out.increment(1);
            }
            tracing::debug!(
                peer = ?self.stream.peer_addr().ok(),
                headers,
                "Closing an HTTP connection that kept us waiting."
            );
        }
        let what = if headers {
            "request headers not received within TELEMETRY_HTTP_HEADER_READ_TIMEOUT_MS"
        } else {
            "no request within TELEMETRY_HTTP_IDLE_TIMEOUT_MS"
        };
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let timed = this.follow_exchanges();
        if !timed && !this.exchanges.upgraded.load(Ordering::Relaxed) {
            this.exchanges.remember_reader(cx.waker());
        }
        // Checked before reading too, so a client trickling a byte at a time is not let through.
        if timed && (this.timed_out || this.deadline.as_mut().poll(cx).is_ready()) {
            return Poll::Ready(Err(this.time_out()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Wait::NextRequest(after), Poll::Ready(Ok(()))) = (this.wait, &read) {
            if buf.filled().len() > before {
                this.wait = Wait::Headers(after);
                this.deadline
                    .as_mut()
                    .reset(Instant::now() + this.header_read_timeout);
            }
        }
        read
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The router, telling the connection's [`Exchanges`] when a request starts and its response
/// ends.
struct TrackedService {
    router: TowerToHyperService<Router>,
    exchanges: Arc<Exchanges>,
}

impl hyper::service::Service<Request<Incoming>> for TrackedService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.exchanges.started.fetch_add(1, Ordering::Relaxed);
        let response = hyper::service::Service::call(&self.router, request);
        let exchanges = self.exchanges.clone();
        Box::pin(async move {
            let response = response.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                exchanges.upgraded.store(true, Ordering::Relaxed);
                return Ok(response.map(|body| TrackedBody { body, _end: None }));
            }
            Ok(response.map(|body| TrackedBody {
                body,
                _end: Some(ResponseEnd(exchanges)),
            }))
        })
    }
}

/// Marks the response finished when hyper drops its body (written, or abandoned).
struct ResponseEnd(Arc<Exchanges>);

impl Drop for ResponseEnd {
    fn drop(&mut self) {
        self.0.response_finished();
    }
}

/// A response body that tells the connection when hyper is done with it.
struct TrackedBody {
    body: Body,
    /// Held for its `Drop`; none for an upgrade's response.
    _end: Option<ResponseEnd>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant as StdInstant;

    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::routing::get;
    use futures::{SinkExt, StreamExt};

    use super::*;

    /// A router with a quick answer, a slow one and a WebSocket echo, as the services have.
    fn router() -> Router {
        Router::new()
            .route("/hello", get(|| async { "hello" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "slow"
                }),
            )
            .route(
                "/ws",
                get(|upgrade: WebSocketUpgrade| async move {
                    upgrade.on_upgrade(|mut socket| async move {
                        while let Some(Ok(message)) = socket.recv().await {
                            if let Message::Text(text) = message {
                                if socket.send(Message::Text(text)).await.is_err() {
                                    break;
                                }
                            }
                        }
                    })
                }),
            )
    }

    struct Running {
        address: SocketAddr,
        shutdown: CancellationToken,
        task: JoinHandle<Result<(), ListenError>>,
    }

    async fn start(service: &'static str, limits: HttpLimits) -> Running {
        crate::install_metrics();
        let server = HttpServer::bind("127.0.0.1:0").await.unwrap();
        let address = server.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = server.spawn(router(), service, &limits, shutdown.clone());
        Running {
            address,
            shutdown,
            task,
        }
    }

    fn limits(header_read_ms: u64, idle_ms: u64, max_connections: u32) -> HttpLimits {
        HttpLimits {
            http_header_read_timeout_ms: header_read_ms,
            http_idle_timeout_ms: idle_ms,
            http_max_connections: max_connections,
        }
    }

    /// Sends a GET on `stream` and reads its answer: status, head and body.
    async fn request(stream: &mut TcpStream, path: &str) -> (u16, String, String) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        read_response(stream).await
    }

    async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the connection closed before the answer's head");
            received.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8(received[..head_end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().unwrap())
            })
            .expect("a Content-Length");
        while received.len() < head_end + length {
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the connection closed before the answer's body");
            received.extend_from_slice(&chunk[..read]);
        }
        let status = head[9..12].parse().unwrap();
        let body = String::from_utf8(received[head_end..].to_vec()).unwrap();
        (status, head, body)
    }

    /// Reads until the server closes the connection (end of stream or reset); `None` if it is
    /// still open after `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = StdInstant::now();
        let mut chunk = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
    }

    use crate::instruments::{
        HTTP_CONNECTIONS, HTTP_CONNECTIONS_REFUSED, HTTP_CONNECTIONS_TIMED_OUT,
    };

    fn metric(metric: &telemetry_metrics::Metric, labels: &[(&str, &str)]) -> f64 {
        metric
            .total_in(&crate::install_metrics().render(), labels)
            .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn a_request_without_its_headers_is_closed_after_the_header_read_timeout() {
        let server = start("ops-test-headers", limits(400, 30_000, 100)).await;

        let mut half_open = TcpStream::connect(server.address).await.unwrap();
        half_open
            .write_all(b"GET /hello HTTP/1.1\r\n")
            .await
            .unwrap();
        // A client trickling its headers a byte at a time is closed just the same.
        let mut trickling = TcpStream::connect(server.address).await.unwrap();
        let trickle = async {
            for byte in b"GET /hello HTTP/1.1\r\nHost: slowly-slowly-slowly\r\n" {
                if trickling.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let (closed, ()) = tokio::join!(
            closed_within(&mut half_open, Duration::from_secs(5)),
            trickle
        );
        let closed = closed.expect("the half-open request was closed");
        assert!(closed >= Duration::from_millis(300), "{closed:?}");
        let closed = closed_within(&mut trickling, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "the trickling request was closed");

        // A request whose headers arrive in time is answered.
        let mut prompt = TcpStream::connect(server.address).await.unwrap();
        assert_eq!(request(&mut prompt, "/hello").await.0, 200);
        let labels = [("service", "ops-test-headers"), ("cause", "header_read")];
        assert!(metric(&HTTP_CONNECTIONS_TIMED_OUT, &labels) >= 2.0);
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
        // The idle timeout is longer than the header-read timeout: waiting for the next request
        // is not waiting for headers.
        let server = start("ops-test-idle", limits(200, 1_000, 100)).await;
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        assert_eq!(request(&mut stream, "/hello").await.2, "hello");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, _, body) = request(&mut stream, "/hello").await;
        assert_eq!((status, body.as_str()), (200, "hello"), "kept alive");
        let slow = request(&mut stream, "/slow").await;
        assert_eq!(slow.0, 200, "a slow answer is not a timeout");

        let closed = closed_within(&mut stream, Duration::from_secs(5))
            .await
            .expect("the idle connection was closed");
        assert!(closed >= Duration::from_millis(900), "{closed:?}");
        let labels = [("service", "ops-test-idle"), ("cause", "idle")];
        assert_eq!(metric(&HTTP_CONNECTIONS_TIMED_OUT, &labels), 1.0);
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn past_the_cap_a_connection_gets_503_and_a_freed_slot_is_served() {
        let service = "ops-test-cap";
        let server = start(service, limits(10_000, 30_000, 2)).await;
        let mut first = TcpStream::connect(server.address).await.unwrap();
        let mut second = TcpStream::connect(server.address).await.unwrap();
        assert_eq!(request(&mut first, "/hello").await.0, 200);
        assert_eq!(request(&mut second, "/hello").await.0, 200);
        let labels = [("service", "ops-test-cap")];
        assert_eq!(metric(&HTTP_CONNECTIONS, &labels), 2.0);

        let mut third = TcpStream::connect(server.address).await.unwrap();
        let (status, head, body) = request(&mut third, "/hello").await;
        assert_eq!(status, 503, "{head}");
        assert!(head.contains("connection: close") || head.contains("Connection: close"));
        assert_eq!(body, "too many connections\n");
        assert!(closed_within(&mut third, Duration::from_secs(3))
            .await
            .is_some());
        assert_eq!(metric(&HTTP_CONNECTIONS_REFUSED, &labels), 1.0);

        drop(first);
        let deadline = StdInstant::now() + Duration::from_secs(5);
        loop {
            let mut next = TcpStream::connect(server.address).await.unwrap();
            let (status, _, _) = request(&mut next, "/hello").await;
            if status == 200 {
                break;
            }
            assert!(
                StdInstant::now() < deadline,
                "the freed slot was not reused"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(request(&mut second, "/hello").await.0, 200, "still served");
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
        assert_eq!(metric(&HTTP_CONNECTIONS, &labels), 0.0);
    }

    #[tokio::test]
    async fn a_websocket_upgrade_works_has_no_timeout_and_counts_toward_the_cap() {
        let server = start("ops-test-ws", limits(200, 300, 1)).await;
        let url = format!("ws://{}/ws", server.address);
        let (mut socket, response) = tokio_tungstenite::connect_async(&url).await.unwrap();
        assert_eq!(response.status(), 101);
        for round in 0..2 {
            let text = format!("round {round}");
            socket
                .send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
                .await
                .unwrap();
            let echo = socket.next().await.unwrap().unwrap();
            assert_eq!(echo.into_text().unwrap().as_str(), text);
            // Longer than both timeouts: a quiet WebSocket is not an idle HTTP connection.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }

        let mut plain = TcpStream::connect(server.address).await.unwrap();
        assert_eq!(
            request(&mut plain, "/hello").await.0,
            503,
            "the socket holds the slot"
        );
        socket.close(None).await.unwrap();
        drop(socket);
        let deadline = StdInstant::now() + Duration::from_secs(5);
        loop {
            let mut next = TcpStream::connect(server.address).await.unwrap();
            if request(&mut next, "/hello").await.0 == 200 {
                break;
            }
            assert!(
                StdInstant::now() < deadline,
                "the socket's slot was not freed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_lets_a_request_finish_and_does_not_wait_for_half_open_ones() {
        let server = start("ops-test-shutdown", limits(30_000, 30_000, 100)).await;
        let mut half_open = TcpStream::connect(server.address).await.unwrap();
        half_open
            .write_all(b"GET /hello HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut busy = TcpStream::connect(server.address).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = StdInstant::now();
        server.shutdown.cancel();

        let (status, head, body) = read_response(&mut busy).await;
        assert_eq!((status, body.as_str()), (200, "slow"), "{head}");
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .expect("the server stopped without waiting for the half-open request")
            .unwrap()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(closed_within(&mut half_open, Duration::from_secs(1))
            .await
            .is_some());
        assert!(
            TcpStream::connect(server.address).await.is_err(),
            "not listening"
        );
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            limits: HttpLimits,
        }
        let parsed = <Flags as clap::Parser>::try_parse_from(["test"])
            .unwrap()
            .limits;
        let default = HttpLimits::default();
        assert_eq!(
            (
                parsed.http_header_read_timeout_ms,
                parsed.http_idle_timeout_ms,
                parsed.http_max_connections
            ),
            (10_000, 60_000, 4096)
        );
        assert_eq!(
            (
                default.http_header_read_timeout_ms,
                default.http_idle_timeout_ms,
                default.http_max_connections
            ),
            (10_000, 60_000, 4096)
        );
        assert!(
            <Flags as clap::Parser>::try_parse_from(["test", "--http-max-connections", "0"])
                .is_err()
        );
    }
}
