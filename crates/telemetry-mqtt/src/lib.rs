//! How to reach the MQTT broker and who we are to it: the settings every MQTT client of ours
//! (the bridge, the simulator, the load harness) starts from, checked at start-up. A crate of its
//! own so that those clients share the settings without depending on one another.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};

/// Settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--mqtt-url` is not a usable MQTT URL.
    #[error("TELEMETRY_MQTT_URL / --mqtt-url `{url}` is not valid: {reason}")]
    InvalidMqttUrl {
        /// The URL as given, without its password.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is missing, unusable, or contradicts another.
    #[error("{setting} {problem}")]
    InvalidSetting {
        /// The setting's variable and flag.
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach the MQTT broker and who we are to it: shared by the bridge and the simulator.
#[derive(Clone, clap::Args)]
pub struct MqttConnectionConfig {
    /// MQTT broker URL: `mqtt://host[:port]` (port 1883 by default) or `mqtts://host[:port]` for
    /// TLS (port 8883 by default).
    #[arg(
        long,
        env = "TELEMETRY_MQTT_URL",
        hide_env_values = true,
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: String,

    /// MQTT user name (or give it in the URL, `mqtt://user:password@host`).
    #[arg(long, env = "TELEMETRY_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// MQTT password. Never logged; prefer the environment variable or the configuration file to
    /// the flag, which other users of the machine can read in the process list.
    #[arg(long, env = "TELEMETRY_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,

    /// PEM file of the CA certificates that sign the broker's certificate, with `mqtts://`.
    /// Without it, the system's CA store.
    #[arg(long, env = "TELEMETRY_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// PEM file of this client's certificate chain, for brokers that require client certificates
    /// (`require_certificate true` in Mosquitto); with `--mqtt-key-file`.
    #[arg(long, env = "TELEMETRY_MQTT_CERTIFICATE_FILE")]
    pub mqtt_certificate_file: Option<PathBuf>,

    /// PEM file of this client's private key (unencrypted), with `--mqtt-certificate-file`.
    #[arg(long, env = "TELEMETRY_MQTT_KEY_FILE")]
    pub mqtt_key_file: Option<PathBuf>,

    /// MQTT client option as key=value (repeatable; env: comma-separated), applied over our
    /// defaults: `keep_alive_secs` (30), `max_packet_bytes` (1000000), `inflight` (outgoing QoS 1
    /// messages awaiting their acknowledgement; 100, the simulator 1000), `pending_throttle_ms`
    /// (0). rumqttc has no option map of its own; these are the settings of its `MqttOptions`
    /// that are safe to change (the bridge's session and acknowledgement settings are not).
    #[arg(
        long = "mqtt-option",
        env = "TELEMETRY_MQTT_OPTIONS",
        value_delimiter = ','
    )]
    pub mqtt_options: Vec<String>,
}

/// The keys `--mqtt-option` takes.
const MQTT_OPTION_KEYS: &[&str] = &[
    "keep_alive_secs",
    "max_packet_bytes",
    "inflight",
    "pending_throttle_ms",
];

impl std::fmt::Debug for MqttConnectionConfig {
    // The password never reaches a log or an error message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConnectionConfig")
            .field("mqtt_url", &self.redacted_url())
            .field("mqtt_username", &self.mqtt_username)
            .field(
                "mqtt_password",
                &self.mqtt_password.as_ref().map(|_| "<redacted>"),
            )
            .field("mqtt_ca_file", &self.mqtt_ca_file)
            .field("mqtt_certificate_file", &self.mqtt_certificate_file)
            .field("mqtt_key_file", &self.mqtt_key_file)
            .field("mqtt_options", &self.mqtt_options)
            .finish()
    }
}

/// Where the MQTT broker is and who we are to it, from the settings.
#[derive(PartialEq, Eq)]
pub(crate) struct MqttAddress {
    host: String,
    port: u16,
    tls: bool,
    /// User name and password, when given.
    credentials: Option<(String, String)>,
}

impl std::fmt::Debug for MqttAddress {
    // The password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAddress")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

impl MqttConnectionConfig {
    /// Settings for the broker at `url`, without credentials or TLS files.
    pub fn new(url: impl Into<String>) -> Self {
        MqttConnectionConfig {
            mqtt_url: url.into(),
            mqtt_username: None,
            mqtt_password: None,
            mqtt_ca_file: None,
            mqtt_certificate_file: None,
            mqtt_key_file: None,
            mqtt_options: Vec::new(),
        }
    }

    /// The URL without its password, for logs.
    pub fn redacted_url(&self) -> String {
        match url::Url::parse(&self.mqtt_url) {
            Ok(mut url) if url.password().is_some() => {
                // Only fails for URLs that cannot have credentials, which this one has.
                let _ = url.set_password(Some("redacted"));
                url.to_string()
            }
            Ok(_) => self.mqtt_url.clone(),
            Err(_) => String::from("(not a URL)"),
        }
    }

    /// Checks the settings against each other; see [`MqttConnectionConfig::options`].
    pub(crate) fn address(&self) -> Result<MqttAddress> {
        let invalid = |reason: &str| Error::InvalidMqttUrl {
            url: self.redacted_url(),
            reason: reason.to_string(),
        };
        let url = url::Url::parse(&self.mqtt_url).map_err(|error| invalid(&error.to_string()))?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(invalid(&format!(
                    "scheme `{other}` is not supported, use mqtt:// or mqtts://"
                )))
            }
        };
        let host = url.host_str().ok_or_else(|| invalid("it has no host"))?;
        let from_url = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some((
                percent_decoded(user),
                percent_decoded(password.unwrap_or_default()),
            )),
        };
        let from_settings = match (&self.mqtt_username, &self.mqtt_password) {
            (None, None) => None,
            (Some(user), password) => Some((user.clone(), password.clone().unwrap_or_default())),
            (None, Some(_)) => {
                return Err(Error::InvalidSetting {
                    setting: "TELEMETRY_MQTT_USERNAME / --mqtt-username",
                    problem: "is required with a password".into(),
                })
            }
        };
        let credentials = match (from_url, from_settings) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "it carries credentials and --mqtt-username is set too: give them once",
                ))
            }
            (url, settings) => url.or(settings),
        };
        let files = [
            (
                "TELEMETRY_MQTT_CA_FILE / --mqtt-ca-file",
                &self.mqtt_ca_file,
            ),
            (
                "TELEMETRY_MQTT_CERTIFICATE_FILE / --mqtt-certificate-file",
                &self.mqtt_certificate_file,
            ),
            (
                "TELEMETRY_MQTT_KEY_FILE / --mqtt-key-file",
                &self.mqtt_key_file,
            ),
        ];
        for (setting, file) in files {
            if file.is_some() && !tls {
                return Err(Error::InvalidSetting {
                    setting,
                    problem: "is set, but the MQTT URL is not mqtts://".into(),
                });
            }
        }
        if self.mqtt_certificate_file.is_some() != self.mqtt_key_file.is_some() {
            return Err(Error::InvalidSetting {
                setting: "TELEMETRY_MQTT_KEY_FILE / --mqtt-key-file",
                problem: "a client certificate and its key are given together, or neither".into(),
            });
        }
        Ok(MqttAddress {
            host: host.to_string(),
            port: url.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
            credentials,
        })
    }

    /// MQTT client options for the configured broker, with its credentials and TLS: what every
    /// MQTT client of ours starts from. `defaults` sets the caller's own settings, which the
    /// `--mqtt-option`s then override. Certificate files are read here, so a bad one fails
    /// start-up naming its setting.
    pub fn options(
        &self,
        client_id: &str,
        defaults: impl FnOnce(&mut MqttOptions),
    ) -> Result<MqttOptions> {
        let address = self.address()?;
        let mut options = MqttOptions::new(client_id, address.host, address.port);
        defaults(&mut options);
        self.apply_pass_through(&mut options)?;
        if let Some((user, password)) = address.credentials {
            options.set_credentials(user, password);
        }
        if address.tls {
            let tls = self.tls_config()?;
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        }
        Ok(options)
    }

    /// A client and its event loop for `options`, with Nagle's algorithm off: each packet (a
    /// publish, an acknowledgement) goes out at once instead of waiting for the TCP
    /// acknowledgement of the previous one, up to 40 ms with Linux's delayed acknowledgements.
    pub fn client(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        (client, eventloop)
    }

    /// Applies the `--mqtt-option`s, each checked against its range.
    fn apply_pass_through(&self, options: &mut MqttOptions) -> Result<()> {
        for option in &self.mqtt_options {
            let invalid = |problem: String| Error::InvalidSetting {
                setting: "TELEMETRY_MQTT_OPTIONS / --mqtt-option",
                problem: format!("`{option}`: {problem}"),
            };
            let (key, value) = option
                .split_once('=')
                .map(|(key, value)| (key.trim(), value.trim()))
                .ok_or_else(|| invalid("is not of the form key=value".into()))?;
            let number = |low: u64, high: u64| {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|number| (low..=high).contains(number))
                    .ok_or_else(|| invalid(format!("must be a whole number from {low} to {high}")))
            };
            match key {
                "keep_alive_secs" => {
                    options.set_keep_alive(Duration::from_secs(number(1, 65_535)?));
                }
                "max_packet_bytes" => {
                    let bytes = usize::try_from(number(1, 268_435_455)?).unwrap_or(usize::MAX);
                    options.set_max_packet_size(bytes, bytes);
                }
                "inflight" => {
                    let inflight = u16::try_from(number(1, 65_535)?).unwrap_or(u16::MAX);
                    options.set_inflight(inflight);
                }
                "pending_throttle_ms" => {
                    options.set_pending_throttle(Duration::from_millis(number(0, 60_000)?));
                }
                other => {
                    return Err(invalid(format!(
                        "`{other}` is not an option; the options are {}",
                        MQTT_OPTION_KEYS.join(", ")
                    )))
                }
            }
        }
        Ok(())
    }

    /// The TLS client configuration: the CA file's certificates (or the system's), and the client
    /// certificate when one is set.
    fn tls_config(&self) -> Result<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;

        let mut roots = rustls::RootCertStore::empty();
        match &self.mqtt_ca_file {
            Some(path) => {
                let setting = "TELEMETRY_MQTT_CA_FILE / --mqtt-ca-file";
                let certificates = read_certificates(setting, path)?;
                for certificate in certificates {
                    roots
                        .add(certificate)
                        .map_err(|error| Error::InvalidSetting {
                            setting,
                            problem: format!("`{}`: {error}", path.display()),
                        })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    tracing::debug!(%error, "A system CA certificate could not be loaded.");
                }
                let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(Error::InvalidSetting {
                        setting: "TELEMETRY_MQTT_CA_FILE / --mqtt-ca-file",
                        problem: "is not set and the system has no CA certificates".into(),
                    });
                }
            }
        }
        // The provider is named rather than taken from the process default: more than one crate
        // in the binary enables rustls providers, so there is no single default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| Error::InvalidSetting {
                setting: "TELEMETRY_MQTT_URL / --mqtt-url",
                problem: format!("TLS cannot be set up: {error}"),
            })?
            .with_root_certificates(roots);
        match (&self.mqtt_certificate_file, &self.mqtt_key_file) {
            (Some(certificate_path), Some(key_path)) => {
                let chain = read_certificates(
                    "TELEMETRY_MQTT_CERTIFICATE_FILE / --mqtt-certificate-file",
                    certificate_path,
                )?;
                let key_setting = "TELEMETRY_MQTT_KEY_FILE / --mqtt-key-file";
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
                    Error::InvalidSetting {
                        setting: key_setting,
                        problem: format!(
                            "`{}` holds no usable private key: {error}",
                            key_path.display()
                        ),
                    }
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|error| Error::InvalidSetting {
                        setting: key_setting,
                        problem: format!("does not go with the certificate: {error}"),
                    })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// The certificates of the PEM file at `path`; at least one.
fn read_certificates(
    setting: &'static str,
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let problem = |reason: String| Error::InvalidSetting {
        setting,
        problem: format!("`{}` {reason}", path.display()),
    };
    let certificates = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|error| problem(format!("cannot be read: {error}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| problem(format!("is not valid PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(problem("holds no certificate".into()));
    }
    Ok(certificates)
}

/// A URL's user or password with its percent-escapes decoded (`p%40ss` is `p@ss`).
fn percent_decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address_of(url: &str) -> Result<MqttAddress> {
        MqttConnectionConfig::new(url).address()
    }

    #[test]
    fn mqtt_urls_are_checked() {
        let address = |host: &str, port, tls, credentials: Option<(&str, &str)>| MqttAddress {
            host: host.to_string(),
            port,
            tls,
            credentials: credentials
                .map(|(user, password)| (user.to_string(), password.to_string())),
        };
        assert_eq!(
            address_of("mqtt://127.0.0.1:1884").ok(),
            Some(address("127.0.0.1", 1884, false, None))
        );
        assert_eq!(
            address_of("mqtts://broker").ok(),
            Some(address("broker", 8883, true, None))
        );
        let with_credentials = address_of("mqtt://u:p%40ss+word@broker").ok();
        assert_eq!(
            with_credentials,
            Some(address("broker", 1883, false, Some(("u", "p@ss+word"))))
        );
        assert!(!format!("{with_credentials:?}").contains("p@ss"));
        assert!(address_of("http://x").is_err());
        assert!(address_of("not a url").is_err());
    }

    #[test]
    fn credentials_and_tls_files_are_checked_against_each_other() {
        let mut config = MqttConnectionConfig::new("mqtt://u:secret@broker");
        config.mqtt_username = Some("other".into());
        let error = config.address().err().map(|error| error.to_string());
        assert!(error
            .as_deref()
            .is_some_and(|text| text.contains("give them once")));
        assert!(!error.unwrap_or_default().contains("secret"));

        let mut config = MqttConnectionConfig::new("mqtt://broker");
        config.mqtt_password = Some("secret".into());
        assert!(config.address().is_err());
        config.mqtt_username = Some("user".into());
        assert!(config
            .address()
            .is_ok_and(|address| address.credentials == Some(("user".into(), "secret".into()))));
        assert!(!format!("{config:?}").contains("secret"));

        let mut config = MqttConnectionConfig::new("mqtt://broker");
        config.mqtt_ca_file = Some("ca.pem".into());
        let error = config.address().err().map(|error| error.to_string());
        assert!(
            error.is_some_and(|text| text.contains("--mqtt-ca-file") && text.contains("mqtts://"))
        );

        let mut config = MqttConnectionConfig::new("mqtts://broker");
        config.mqtt_certificate_file = Some("client.pem".into());
        assert!(config.address().is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_setting() {
        let path = std::env::temp_dir().join(format!("mqtt-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").ok();
        let mut config = MqttConnectionConfig::new("mqtts://broker");
        config.mqtt_ca_file = Some(path.clone());
        let error = config
            .options("client", |_| {})
            .err()
            .map(|error| error.to_string());
        std::fs::remove_file(&path).ok();
        assert!(error.is_some_and(|text| text.contains("--mqtt-ca-file")));
    }

    #[test]
    fn pass_through_options_override_defaults_and_are_checked() {
        let mut config = MqttConnectionConfig::new("mqtt://broker");
        config.mqtt_options = vec!["keep_alive_secs=60".into(), "inflight = 500".into()];
        let options = config
            .options("client", |options| {
                options.set_keep_alive(Duration::from_secs(30));
            })
            .ok();
        assert_eq!(
            options.map(|options| (options.keep_alive(), options.inflight())),
            Some((Duration::from_secs(60), 500))
        );
        for (bad, expected) in [
            ("inflight=0", "from 1 to 65535"),
            ("keep_alive_secs=0.5", "whole number"),
            ("clean_session=true", "the options are keep_alive_secs"),
            ("inflight", "key=value"),
        ] {
            config.mqtt_options = vec![bad.into()];
            let error = config
                .options("client", |_| {})
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default();
            assert!(
                error.contains(expected) && error.contains("--mqtt-option"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn redacted_urls_keep_everything_but_the_password() {
        assert_eq!(
            MqttConnectionConfig::new("mqtt://u:secret@broker:1884").redacted_url(),
            "mqtt://u:redacted@broker:1884"
        );
        assert_eq!(
            MqttConnectionConfig::new("mqtt://broker").redacted_url(),
            "mqtt://broker"
        );
    }
}
