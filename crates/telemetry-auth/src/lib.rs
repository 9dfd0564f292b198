//! Bearer-token authentication for the API and the live view, with a device allow-list per
//! token.
//!
//! Tokens live in a TOML file as SHA-256 digests, never as themselves, so the file (and any
//! backup of it) does not hand out access:
//!
//! ```toml
//! [[token]]
//! name = "greenhouse-dashboard"   # shown in logs, never the token
//! sha256 = "9f86d081884c7d65..."  # `telemetry token new` prints a token and this entry
//! devices = ["greenhouse-*", "pico-7"]
//! ```
//!
//! A request carries the token as `Authorization: Bearer <token>`, or, where a browser cannot set
//! headers (WebSocket), as the `access_token` query parameter.
//!
//! The file is read again when it changes (checked every [`RELOAD_CHECK`]): a new token works at
//! once, a removed one is refused at once, and a connection that outlives its request (the live
//! view's WebSocket) watches [`Access::revoked`] and closes when its token is removed or its
//! devices change. A file that no longer parses keeps the tokens in force, with an error logged.

pub mod instruments;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use telemetry_core::{DevicePattern, DeviceScope};

/// The query parameter a WebSocket client (which cannot set headers) passes its token in.
pub const ACCESS_TOKEN_PARAMETER: &str = "access_token";

/// The digests of `config/tokens.example.toml`, whose tokens are public: refused, so a copy of
/// the example never grants anything.
const EXAMPLE_DIGESTS: &[&str] = &[
    "5563c97b2c39a8edb8e3c53cf080168d84431a42986f1c5f11caa972b93dc214",
    "427d102a9097d342f744b211e1248e0435ddbc0a7c5c0a3a73611d6fa8377eaa",
];

/// Largest tokens file read; a bigger one is refused rather than read into memory.
const MAX_TOKENS_FILE_BYTES: u64 = 1 << 20;

/// Authentication settings of a service that serves telemetry over HTTP.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthConfig {
    /// TOML file of the bearer tokens allowed to read telemetry, each with its device allow-list
    /// (see `config/tokens.example.toml`; `telemetry token new` makes entries). Without it,
    /// anyone who reaches the port reads everything, which is only allowed on a loopback
    /// address unless `--allow-unauthenticated` is set.
    #[arg(long, env = "TELEMETRY_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// Serve without tokens on a non-loopback address (behind a proxy that authenticates, or on a
    /// trusted network).
    #[arg(long, env = "TELEMETRY_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
}

/// Why the tokens file or the listen address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("TELEMETRY_AUTH_TOKENS / --auth-tokens `{path}` cannot be read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid tokens file.
    #[error("TELEMETRY_AUTH_TOKENS / --auth-tokens `{path}`: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the token entry.
        problem: String,
    },
    /// Serving without tokens on an address others can reach.
    #[error(
        "{listen_setting} is {address}, which is not a loopback address, and no \
         TELEMETRY_AUTH_TOKENS / --auth-tokens is set: anyone who reaches it would read every \
         device's telemetry. Set tokens, listen on 127.0.0.1, or set \
         TELEMETRY_ALLOW_UNAUTHENTICATED=true / --allow-unauthenticated to accept that"
    )]
    Exposed {
        /// The listen setting's variable and flag.
        listen_setting: &'static str,
        /// The bound address.
        address: SocketAddr,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    devices: Vec<String>,
}

/// What a request with a valid token may do.
#[derive(Debug, Clone)]
pub struct Access {
    /// The token's name, for logs; `None` when authentication is off.
    pub token: Option<Arc<str>>,
    /// The devices it may see.
    pub scope: DeviceScope,
    /// Where the grant came from, to notice its revocation; `None` when authentication is off.
    grant: Option<Grant>,
}

/// A token's entry in the tokens in force, watched for changes.
#[derive(Debug, Clone)]
struct Grant {
    tokens: Arc<Tokens>,
    digest: [u8; 32],
    fingerprint: Arc<str>,
}

impl Access {
    /// Full access: what every request gets when authentication is off.
    pub fn everything() -> Self {
        Access {
            token: None,
            scope: DeviceScope::All,
            grant: None,
        }
    }

    /// Resolves when this access ends: its token was removed from the tokens file, or its
    /// devices changed (the holder should then close what it serves; a new request gets the new
    /// access). Never, when authentication is off.
    pub async fn revoked(&self) {
        let Some(grant) = &self.grant else {
            return std::future::pending().await;
        };
        // Subscribed before the first check: a reload between the two is not missed.
        let mut changes = grant.tokens.changes.subscribe();
        loop {
            if !grant.tokens.grants(&grant.digest, &grant.fingerprint) {
                return;
            }
            if changes.changed().await.is_err() {
                // The tokens are gone with their service: nothing changes any more.
                return std::future::pending().await;
            }
        }
    }
}

/// How often the tokens file is checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The tokens in force, by digest, and the file they come from.
#[derive(Debug)]
struct Tokens {
    path: PathBuf,
    table: RwLock<Arc<TokenTable>>,
    /// The file's modification time and length when last read.
    version: RwLock<Option<(SystemTime, u64)>>,
    /// Bumped on every reload.
    changes: tokio::sync::watch::Sender<u64>,
}

/// Each token's access, and a fingerprint of its entry (name and devices) to tell a change.
type TokenTable = HashMap<[u8; 32], (Access, Arc<str>)>;

impl Tokens {
    fn current(&self) -> Arc<TokenTable> {
        match self.table.read() {
            Ok(table) => Arc::clone(&table),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Whether `digest` is still in force with the entry `fingerprint` names.
    fn grants(&self, digest: &[u8; 32], fingerprint: &str) -> bool {
        self.current()
            .get(digest)
            .is_some_and(|(_, current)| &**current == fingerprint)
    }

    /// Reads the file again if it changed since the last read; `Ok(true)` when the tokens in
    /// force changed.
    fn reload_if_changed(&self) -> Result<bool, AuthError> {
        let version = file_version(&self.path);
        let previous = match self.version.read() {
            Ok(version) => *version,
            Err(poisoned) => *poisoned.into_inner(),
        };
        if version == previous {
            return Ok(false);
        }
        let table = load_tokens(&self.path)?;
        let count = table.len();
        match self.table.write() {
            Ok(mut current) => *current = Arc::new(table),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(table),
        }
        match self.version.write() {
            Ok(mut current) => *current = version,
            Err(poisoned) => *poisoned.into_inner() = version,
        }
        self.changes.send_modify(|generation| *generation += 1);
        tracing::info!(tokens = count, file = %self.path.display(), "The tokens file changed; its tokens are now in force.");
        Ok(true)
    }
}

/// A file's modification time and length; `None` when it cannot be read.
fn file_version(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Checks the tokens file every [`RELOAD_CHECK`] until the service's tokens are dropped.
async fn watch_tokens_file(tokens: std::sync::Weak<Tokens>, service: &'static str) {
    let mut ticks = tokio::time::interval(RELOAD_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(tokens) = tokens.upgrade() else {
            return;
        };
        let path = tokens.path.clone();
        // Reading a file blocks: off the runtime's workers.
        match tokio::task::spawn_blocking(move || tokens.reload_if_changed()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                instruments::TOKENS_RELOAD_FAILURES
                    .counter_of(telemetry_metrics::series!(service))
                    .increment(1);
                tracing::error!(%error, file = %path.display(), "The tokens file changed but cannot be used; the tokens read before stay in force.");
            }
            Err(_) => return,
        }
    }
}

/// A service's authentication: off, or the tokens it accepts.
#[derive(Debug, Clone)]
pub struct Auth {
    /// `None`: off, every request has full access.
    tokens: Option<Arc<Tokens>>,
    /// Whether a token may come as the `access_token` query parameter (the WebSocket only: a URL
    /// ends up in proxies' logs and browsers' history, so only where there is no other way).
    query_tokens: bool,
    /// The `service` label of the refusal counter.
    service: &'static str,
}

impl Auth {
    /// Loads the tokens (if configured) and checks that a service listening on `address`
    /// (`listen_setting` names its setting) without tokens is on a loopback address or was
    /// explicitly allowed.
    pub fn from_config(
        config: &AuthConfig,
        service: &'static str,
        listen_setting: &'static str,
        address: SocketAddr,
    ) -> Result<Self, AuthError> {
        let Some(path) = &config.auth_tokens else {
            if !address.ip().is_loopback() {
                if !config.allow_unauthenticated {
                    return Err(AuthError::Exposed {
                        listen_setting,
                        address,
                    });
                }
                tracing::warn!(%address, "Serving telemetry without authentication on a non-loopback address, as allowed by TELEMETRY_ALLOW_UNAUTHENTICATED.");
            }
            return Ok(Auth {
                tokens: None,
                query_tokens: false,
                service,
            });
        };
        let version = file_version(path);
        let table = load_tokens(path)?;
        tracing::info!(tokens = table.len(), file = %path.display(), "Bearer-token authentication is on.");
        let tokens = Arc::new(Tokens {
            path: path.clone(),
            table: RwLock::new(Arc::new(table)),
            version: RwLock::new(version),
            changes: tokio::sync::watch::channel(0).0,
        });
        // Outside a runtime (a unit test) the file is read once.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watch_tokens_file(Arc::downgrade(&tokens), service));
        }
        Ok(Auth {
            tokens: Some(tokens),
            query_tokens: false,
            service,
        })
    }

    /// Authentication off: every request has full access.
    pub fn disabled(service: &'static str) -> Self {
        Auth {
            tokens: None,
            query_tokens: false,
            service,
        }
    }

    /// The same tokens, also taken from the `access_token` query parameter: for WebSocket
    /// upgrades, whose browser API cannot set headers.
    pub fn with_query_tokens(mut self) -> Self {
        self.query_tokens = true;
        self
    }

    /// Whether requests need a token.
    pub fn is_enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// The access the request's token grants, or why it has none.
    pub fn authorize(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Access, Refusal> {
        let Some(tokens) = &self.tokens else {
            return Ok(Access::everything());
        };
        let token = bearer_token(headers)
            .map(str::to_string)
            .or_else(|| query.filter(|_| self.query_tokens).and_then(query_token))
            .ok_or(Refusal::Missing)?;
        // Looked up by digest: the table holds no token, and timing reveals at most how a
        // digest of the guess compares, which says nothing about a valid token.
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let table = tokens.current();
        let (access, fingerprint) = table.get(&digest).ok_or(Refusal::Unknown)?;
        Ok(Access {
            grant: Some(Grant {
                tokens: Arc::clone(tokens),
                digest,
                fingerprint: Arc::clone(fingerprint),
            }),
            ..access.clone()
        })
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It carried no token.
    Missing,
    /// Its token is not in the tokens file.
    Unknown,
}

impl Refusal {
    /// The label of the refusal counter.
    fn cause(self) -> &'static str {
        match self {
            Refusal::Missing => "missing_token",
            Refusal::Unknown => "unknown_token",
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let message = match self {
            Refusal::Missing => "this endpoint needs a token: send `Authorization: Bearer <token>`",
            Refusal::Unknown => "the token is not valid",
        };
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(serde_json::json!({ "error": { "parameter": null, "message": message } })),
        )
            .into_response()
    }
}

/// Middleware: refuses requests without a valid token (401), and hands the [`Access`] of the
/// others to their handlers as a request extension.
pub async fn require_token(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    match auth.authorize(request.headers(), request.uri().query()) {
        Ok(access) => {
            request.extensions_mut().insert(access);
            next.run(request).await
        }
        Err(refusal) => {
            instruments::HTTP_REQUESTS_UNAUTHORIZED
                .counter_of(telemetry_metrics::series!(auth.service, refusal.cause()))
                .increment(1);
            refusal.into_response()
        }
    }
}

/// The digest a tokens file stores for `token`: lowercase hex SHA-256.
pub fn token_digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == ACCESS_TOKEN_PARAMETER)
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.is_empty())
}

fn load_tokens(path: &Path) -> Result<TokenTable, AuthError> {
    let read = |source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |problem: String| AuthError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_TOKENS_FILE_BYTES {
        return Err(invalid(format!(
            "is {size} bytes, more than the {MAX_TOKENS_FILE_BYTES} a tokens file may have"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let file: TokensFile = toml::from_str(&text).map_err(|error| invalid(error.to_string()))?;
    if file.token.is_empty() {
        return Err(invalid(String::from(
            "has no [[token]] entry, so it would refuse every request; remove the setting to turn authentication off",
        )));
    }
    let mut tokens = HashMap::new();
    let mut names = std::collections::HashSet::new();
    for (index, entry) in file.token.into_iter().enumerate() {
        let which = format!("token {} (`{}`)", index + 1, entry.name);
        if entry.name.trim().is_empty() {
            return Err(invalid(format!("token {} has an empty name", index + 1)));
        }
        if !names.insert(entry.name.clone()) {
            return Err(invalid(format!("{which}: the name is used twice")));
        }
        if EXAMPLE_DIGESTS.contains(&entry.sha256.trim().to_ascii_lowercase().as_str()) {
            return Err(invalid(format!(
                "{which} is an example from config/tokens.example.toml, whose token is public; make your own with `telemetry token new`"
            )));
        }
        let digest = parse_digest(&entry.sha256).ok_or_else(|| {
            invalid(format!(
                "{which}: sha256 must be 64 hex digits (the token's SHA-256, as `telemetry token new` prints it)"
            ))
        })?;
        if entry.devices.is_empty() {
            return Err(invalid(format!(
                "{which}: devices is empty; list the devices it may see, or [\"*\"] for all"
            )));
        }
        let patterns = entry
            .devices
            .iter()
            .map(|pattern| DevicePattern::parse(pattern))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|problem| invalid(format!("{which}: devices: {problem}")))?;
        let access = Access {
            token: Some(Arc::from(entry.name.as_str())),
            scope: DeviceScope::from_patterns(patterns),
            grant: None,
        };
        let fingerprint: Arc<str> =
            Arc::from(format!("{}\n{}", entry.name, entry.devices.join("\n")));
        if tokens.insert(digest, (access, fingerprint)).is_some() {
            return Err(invalid(format!("{which}: the same token is listed twice")));
        }
    }
    Ok(tokens)
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0_u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn tokens_file(text: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tokens-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).ok();
        path
    }

    fn config(path: &Path) -> AuthConfig {
        AuthConfig {
            auth_tokens: Some(path.to_path_buf()),
            allow_unauthenticated: false,
        }
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8082))
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
            headers.insert(header::AUTHORIZATION, value);
        }
        headers
    }

    #[test]
    fn a_token_grants_its_devices_and_nothing_else_is_accepted() {
        let path = tokens_file(&format!(
            "[[token]]\nname = \"greenhouse\"\nsha256 = \"{}\"\ndevices = [\"greenhouse-*\"]\n\n\
             [[token]]\nname = \"ops\"\nsha256 = \"{}\"\ndevices = [\"*\"]\n",
            token_digest("green-secret"),
            token_digest("ops-secret").to_uppercase(),
        ));
        let auth = Auth::from_config(&config(&path), "test", "LISTEN", loopback());
        std::fs::remove_file(&path).ok();
        let auth = auth.unwrap_or_else(|error| panic!("{error}"));
        // Tokens in the query string count only where allowed (the WebSocket).
        assert_eq!(
            auth.authorize(&HeaderMap::new(), Some("access_token=ops-secret"))
                .err(),
            Some(Refusal::Missing)
        );
        let auth = auth.with_query_tokens();
        let green = auth.authorize(&bearer("green-secret"), None);
        assert!(green
            .as_ref()
            .is_ok_and(|access| access.scope.allows("greenhouse-3")
                && !access.scope.allows("pico-1")
                && access.token.as_deref() == Some("greenhouse")));
        let ops = auth.authorize(&HeaderMap::new(), Some("x=1&access_token=ops-secret"));
        assert!(ops.is_ok_and(|access| access.scope == DeviceScope::All));
        assert_eq!(
            auth.authorize(&HeaderMap::new(), None).err(),
            Some(Refusal::Missing)
        );
        assert_eq!(
            auth.authorize(&bearer("guess"), None).err(),
            Some(Refusal::Unknown)
        );
        assert_eq!(
            auth.authorize(&bearer("GREEN-SECRET"), None).err(),
            Some(Refusal::Unknown)
        );
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Z3JlZW4tc2VjcmV0"),
        );
        assert_eq!(auth.authorize(&basic, None).err(), Some(Refusal::Missing));
    }

    #[test]
    fn mistakes_in_the_tokens_file_are_named() {
        let digest = token_digest("t");
        let cases = [
            (String::from("[[token]]\nname = \"a\"\nsha256 = \"abc\"\ndevices = [\"*\"]\n"), "64 hex digits"),
            (format!("[[token]]\nname = \"a\"\nsha256 = \"{digest}\"\ndevices = []\n"), "devices is empty"),
            (format!("[[token]]\nname = \"a\"\nsha256 = \"{digest}\"\ndevices = [\"a*b\"]\n"), "`*` may only end"),
            (format!("[[token]]\nname = \"a\"\nsha256 = \"{digest}\"\ndevices = [\"*\"]\nexpires = 1\n"), "unknown field"),
            (format!("[[token]]\nname = \"a\"\nsha256 = \"{digest}\"\ndevices = [\"*\"]\n[[token]]\nname = \"b\"\nsha256 = \"{digest}\"\ndevices = [\"*\"]\n"), "listed twice"),
            (String::new(), "no [[token]]"),
        ];
        for (text, expected) in cases {
            let path = tokens_file(&text);
            let error = Auth::from_config(&config(&path), "test", "LISTEN", loopback())
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default();
            std::fs::remove_file(&path).ok();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("--auth-tokens"), "{error}");
        }
    }

    #[test]
    fn no_tokens_on_a_public_address_needs_explicit_permission() {
        let public = SocketAddr::from(([0, 0, 0, 0], 8082));
        let off = AuthConfig::default();
        let refused =
            Auth::from_config(&off, "test", "TELEMETRY_API_LISTEN / --api-listen", public);
        assert!(refused.is_err_and(|error| error.to_string().contains("TELEMETRY_API_LISTEN")));
        assert!(Auth::from_config(&off, "test", "LISTEN", loopback())
            .is_ok_and(|auth| !auth.is_enabled()));
        let allowed = AuthConfig {
            auth_tokens: None,
            allow_unauthenticated: true,
        };
        assert!(Auth::from_config(&allowed, "test", "LISTEN", public).is_ok());
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 8082));
        assert!(Auth::from_config(&off, "test", "LISTEN", v6).is_ok());
    }

    #[test]
    fn the_example_tokens_file_is_well_formed_but_never_grants_anything() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/tokens.example.toml");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let file: Result<TokensFile, _> = toml::from_str(&text);
        assert!(file.is_ok_and(|file| file.token.len() == 2
            && file
                .token
                .iter()
                .all(|entry| parse_digest(&entry.sha256).is_some()
                    && entry
                        .devices
                        .iter()
                        .all(|device| DevicePattern::parse(device).is_ok()))));
        let refused = Auth::from_config(&config(&path), "test", "LISTEN", loopback())
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(refused.contains("example"), "{refused}");
        assert_eq!(
            EXAMPLE_DIGESTS,
            [
                token_digest("tp_example-operations"),
                token_digest("tp_example-greenhouse")
            ]
        );
    }

    #[test]
    fn query_tokens_are_percent_decoded() {
        assert_eq!(
            query_token("access_token=a%2Bb%3D"),
            Some(String::from("a+b="))
        );
        assert_eq!(query_token("access_token="), None);
        assert_eq!(query_token("other=1"), None);
    }
}
