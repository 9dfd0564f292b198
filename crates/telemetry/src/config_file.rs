//! The configuration file (`--config FILE` or `TELEMETRY_CONFIG`): one TOML file for every
//! setting of every service.
//!
//! Every setting already has an environment variable; a key of the file is that variable without
//! `TELEMETRY_`, in lower case (`kafka_brokers` for `TELEMETRY_KAFKA_BROKERS`), and a table joins
//! its name to its keys with `_` (`[kafka]` + `brokers`). So the file needs no schema of its own:
//! the keys, their checks and their documentation all come from the command-line definitions.
//! The file's values become the environment's defaults before the arguments are parsed: a
//! variable set in the environment overrides the file, a flag overrides both. Unknown keys and
//! values their setting refuses stop the program before it starts, naming file and key.
//!
//! Lists are written as TOML arrays (`kafka_options = ["security.protocol=SASL_SSL"]`), and
//! the pass-through options also as a table (`[kafka.options]` with `"security.protocol" =
//! "SASL_SSL"`).
//!
//! Settings that may hold a secret are those whose values `--help` hides (`hide_env_values`):
//! their values appear in no error message, and a file that holds one and that users other than
//! its owner can read gets a warning at start-up ([`exposed_secrets`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The variable naming the file, itself not a key of it.
pub const CONFIG_ENV: &str = "TELEMETRY_CONFIG";
const PREFIX: &str = "TELEMETRY_";

/// A setting as the command line defines it.
#[derive(Clone)]
pub struct Setting {
    /// Its environment variable.
    pub env: String,
    /// Its flag, e.g. `--kafka-brokers`.
    pub flag: String,
    /// Its help text.
    pub help: String,
    /// Its default, if it has one.
    pub default: Option<String>,
    /// The subcommands that take it, e.g. `audit`, `replay`.
    pub used_by: Vec<String>,
    /// Whether several values are given comma-separated.
    pub list: bool,
    /// Whether its value may be a secret (a password, a URL with credentials, options that may
    /// name a password): `--help` and error messages never show it.
    pub secret: bool,
    arg: clap::Arg,
}

/// Every setting with an environment variable, by file key.
pub fn settings(root: &clap::Command) -> BTreeMap<String, Setting> {
    let mut settings = BTreeMap::new();
    collect(root, "", &mut settings);
    settings
}

fn collect(command: &clap::Command, path: &str, settings: &mut BTreeMap<String, Setting>) {
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env().and_then(|env| env.to_str()) else {
            continue;
        };
        let Some(key) = key_of(env) else {
            continue;
        };
        let name = if path.is_empty() {
            "every command".to_string()
        } else {
            path.to_string()
        };
        settings
            .entry(key)
            .and_modify(|setting: &mut Setting| {
                if !setting.used_by.contains(&name) {
                    setting.used_by.push(name.clone());
                }
            })
            .or_insert_with(|| Setting {
                env: env.to_string(),
                flag: arg
                    .get_long()
                    .map_or_else(|| arg.get_id().to_string(), |long| format!("--{long}")),
                help: arg
                    .get_help()
                    .map(|help| help.to_string())
                    .unwrap_or_default(),
                default: arg
                    .get_default_values()
                    .first()
                    .and_then(|value| value.to_str())
                    .map(str::to_string),
                used_by: vec![name.clone()],
                list: arg.get_value_delimiter().is_some(),
                secret: arg.is_hide_env_values_set(),
                arg: arg.clone(),
            });
    }
    for sub in command.get_subcommands() {
        let path = if path.is_empty() {
            sub.get_name().to_string()
        } else {
            format!("{path} {}", sub.get_name())
        };
        collect(sub, &path, settings);
    }
}

/// The file key of environment variable `env`, or `None` for one that is not a setting's.
fn key_of(env: &str) -> Option<String> {
    (env != CONFIG_ENV)
        .then(|| env.strip_prefix(PREFIX))
        .flatten()
        .map(str::to_ascii_lowercase)
}

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("configuration file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key no setting has.
    #[error("configuration file {path}: `{key}` is not a setting{hint}; `telemetry config example` lists them all")]
    Unknown {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// A near key, as " (did you mean `...`?)", or nothing.
        hint: String,
    },
    /// A value its setting refuses.
    #[error("configuration file {path}: {key} = {value}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// The value, as the setting receives it; [`HIDDEN`] for a secret setting's.
        value: String,
        /// Why it is refused.
        message: String,
    },
}

/// What error messages show instead of a secret setting's value.
const HIDDEN: &str = "(value not shown: it may be a secret)";

/// The file's settings, checked: `(environment variable, value)` pairs.
pub fn load(path: &Path, root: &clap::Command) -> Result<Vec<(String, String)>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text, &shown, root)
}

/// [`load`] on text.
pub fn parse(
    text: &str,
    shown: &str,
    root: &clap::Command,
) -> Result<Vec<(String, String)>, ConfigError> {
    // Without the line the parser's own text quotes: it may hold a password.
    let table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| ConfigError::Parse {
            path: shown.to_string(),
            message: telemetry_secrets::describe_toml_error(&error, text),
        })?;
    let settings = settings(root);
    let mut values = Vec::new();
    flatten(&table, "", &settings, shown, &mut values)?;
    let mut checked = Vec::with_capacity(values.len());
    for (key, value) in values {
        let Some(setting) = settings.get(&key) else {
            return Err(ConfigError::Unknown {
                path: shown.to_string(),
                hint: nearest(&key, settings.keys())
                    .map(|near| format!(" (did you mean `{near}`?)"))
                    .unwrap_or_default(),
                key,
            });
        };
        check(setting, &key, &value, shown)?;
        checked.push((setting.env.clone(), value));
    }
    Ok(checked)
}

/// Flattens tables into `table_key` names; values become the strings the settings parse.
fn flatten(
    table: &toml::Table,
    prefix: &str,
    settings: &BTreeMap<String, Setting>,
    shown: &str,
    out: &mut Vec<(String, String)>,
) -> Result<(), ConfigError> {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.to_ascii_lowercase()
        } else {
            format!("{prefix}_{}", name.to_ascii_lowercase())
        };
        let setting = settings.get(&key);
        let list_setting = setting.is_some_and(|setting| setting.list);
        let secret = setting.is_some_and(|setting| setting.secret);
        match value {
            // A table for a list setting is its `key=value` pairs (pass-through options).
            toml::Value::Table(pairs) if list_setting => {
                let mut items = Vec::with_capacity(pairs.len());
                for (option, value) in pairs {
                    items.push(format!("{option}={}", scalar(value, &key, secret, shown)?));
                }
                out.push((key, items.join(",")));
            }
            toml::Value::Table(inner) => flatten(inner, &key, settings, shown, out)?,
            toml::Value::Array(items) => {
                let mut texts = Vec::with_capacity(items.len());
                for item in items {
                    texts.push(scalar(item, &key, secret, shown)?);
                }
                out.push((key, texts.join(",")));
            }
            scalar_value => out.push((key.clone(), scalar(scalar_value, &key, secret, shown)?)),
        }
    }
    Ok(())
}

fn scalar(
    value: &toml::Value,
    key: &str,
    secret: bool,
    shown: &str,
) -> Result<String, ConfigError> {
    match value {
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Float(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        toml::Value::Datetime(time) => Ok(time.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => Err(ConfigError::Invalid {
            path: shown.to_string(),
            key: key.to_string(),
            value: if secret {
                HIDDEN.to_string()
            } else {
                value.to_string()
            },
            message: "a list or table inside a list is not a setting's value".to_string(),
        }),
    }
}

/// Runs the setting's own value parser on `value`: the setting alone on a command of its own.
fn check(setting: &Setting, key: &str, value: &str, shown: &str) -> Result<(), ConfigError> {
    let arg = setting.arg.clone().required(false).global(false);
    let probe = clap::Command::new("telemetry")
        .no_binary_name(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(arg);
    let given = [format!("{}={value}", setting.flag)];
    if let Err(error) = probe.try_get_matches_from(given) {
        let message = error.to_string();
        let message = message
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_string();
        // clap's message quotes the value too.
        let (value, message) = if setting.secret {
            let message = if value.is_empty() {
                message
            } else {
                message.replace(value, "...")
            };
            (HIDDEN.to_string(), message)
        } else {
            (toml::Value::String(value.to_string()).to_string(), message)
        };
        return Err(ConfigError::Invalid {
            path: shown.to_string(),
            key: key.to_string(),
            value,
            message,
        });
    }
    Ok(())
}

/// The known key closest to `key` by edit distance, if one is close.
fn nearest<'a>(key: &str, known: impl Iterator<Item = &'a String>) -> Option<&'a String> {
    known
        .map(|candidate| (distance(key, candidate), candidate))
        .filter(|(distance, _)| *distance <= 3)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance.
fn distance(left: &str, right: &str) -> usize {
    let right: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right.len()).collect();
    for (i, a) in left.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, b) in right.iter().enumerate() {
            let substitution = previous[j] + usize::from(a != *b);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[right.len()]
}

/// The file named by `--config` in `args` or by `TELEMETRY_CONFIG`, if any.
pub fn path_from(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else {
            continue;
        };
        if text == "--" {
            break;
        }
        if text == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

/// Makes the file's values the environment's defaults: a variable already set is left alone.
/// Call before any thread starts (setting the environment is not thread-safe).
pub fn apply(values: &[(String, String)]) {
    for (env, value) in values {
        if std::env::var_os(env).is_none() {
            std::env::set_var(env, value);
        }
    }
}

/// A configuration file that holds secrets and that users other than its owner can read.
#[derive(Debug, PartialEq)]
pub struct ExposedSecrets {
    /// The file.
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    /// The keys of the settings in it that hold a secret (never their values).
    pub keys: Vec<String>,
}

impl ExposedSecrets {
    /// Logs the warning: the file, its mode and the keys, never a value.
    pub fn warn(&self) {
        tracing::warn!(
            file = %self.path.display(),
            mode = %format!("{:04o}", self.mode),
            settings = %self.keys.join(","),
            "The configuration file holds secrets and users other than its owner can read it: \
             run `chmod 600` on it."
        );
    }
}

/// The file at `path` if it holds a secret among `values` (as [`load`] returns them) and its
/// group or others may read it; `None` otherwise, and always where there are no Unix modes.
pub fn exposed_secrets(
    path: &Path,
    values: &[(String, String)],
    root: &clap::Command,
) -> Option<ExposedSecrets> {
    let settings = settings(root);
    let mut keys: Vec<String> = values
        .iter()
        .filter_map(|(env, value)| {
            let key = key_of(env)?;
            settings
                .get(&key)
                .is_some_and(|setting| holds_secret(setting, value))
                .then_some(key)
        })
        .collect();
    if keys.is_empty() {
        return None;
    }
    keys.sort();
    keys.dedup();
    let mode = telemetry_secrets::open_to_others(path)?;
    Some(ExposedSecrets {
        path: path.to_path_buf(),
        mode,
        keys,
    })
}

/// Whether `value` of a secret setting is one: a URL only when it has a password, an option list
/// only when an option names one (`sasl.password=...`), anything else when it is not empty.
fn holds_secret(setting: &Setting, value: &str) -> bool {
    if !setting.secret || value.is_empty() {
        return false;
    }
    if setting.list {
        value.split(',').any(|option| {
            option.split_once('=').is_some_and(|(key, value)| {
                !value.is_empty() && telemetry_kafka::is_secret_option(key.trim())
            })
        })
    } else if setting.env.ends_with("_URL") {
        telemetry_secrets::url_has_password(value)
    } else {
        true
    }
}

/// A complete, commented example file: every setting, its help, who uses it, and its default.
pub fn example(root: &clap::Command) -> String {
    let mut out = String::from(
        "# telemetry-pipeline configuration: `telemetry --config FILE ...` or TELEMETRY_CONFIG=FILE.\n\
         # Every key is a setting's environment variable without TELEMETRY_, in lower case; a [table]\n\
         # joins its name to its keys with `_` ([kafka] brokers = ... is kafka_brokers = ...).\n\
         # Environment variables override this file, flags override both. Unknown keys are refused;\n\
         # `telemetry config check --config FILE` checks a file. Uncomment what you change.\n",
    );
    let settings = settings(root);
    let mut by_users: BTreeMap<String, Vec<(&String, &Setting)>> = BTreeMap::new();
    for (key, setting) in &settings {
        let users = if setting.used_by.len() > 2 {
            "several commands".to_string()
        } else {
            setting.used_by.join(", ")
        };
        by_users.entry(users).or_default().push((key, setting));
    }
    for (users, entries) in by_users {
        out.push_str(&format!("\n# ---- {users} ----\n"));
        for (key, setting) in entries {
            out.push('\n');
            for line in wrap(&setting.help, 96) {
                out.push_str(&format!("# {line}\n"));
            }
            out.push_str(&format!(
                "# ({}, {}; used by {})\n",
                setting.env,
                setting.flag,
                setting.used_by.join(", ")
            ));
            match &setting.default {
                Some(default) => {
                    out.push_str(&format!("# {key} = {}\n", literal(default, setting.list)))
                }
                None => out.push_str(&format!("# {key} = (no default)\n")),
            }
        }
    }
    out
}

/// A default as a TOML literal.
fn literal(value: &str, list: bool) -> String {
    if list {
        let items: Vec<String> = value
            .split(',')
            .filter(|item| !item.is_empty())
            .map(|item| toml::Value::String(item.to_string()).to_string())
            .collect();
        return format!("[{}]", items.join(", "));
    }
    let bare = value.parse::<i64>().is_ok()
        || (value.parse::<f64>().is_ok_and(f64::is_finite) && value.contains('.'))
        || value == "true"
        || value == "false";
    if bare {
        value.to_string()
    } else {
        toml::Value::String(value.to_string()).to_string()
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> clap::Command {
        use clap::CommandFactory as _;
        crate::Cli::command()
    }

    #[test]
    fn keys_tables_arrays_and_option_tables_become_environment_values() {
        let values = parse(
            r#"
            kafka_brokers = "kafka-1:9092,kafka-2:9092"
            audit_batch_size = 2000

            [mysql]
            url = "mysql://u:p@db:3306/telemetry"

            [kafka.options]
            "security.protocol" = "SASL_SSL"
            "sasl.mechanism" = "SCRAM-SHA-512"

            [health]
            failing_dlq_ratio = 0.25
            "#,
            "test.toml",
            &root(),
        )
        .unwrap();
        let values: BTreeMap<String, String> = values.into_iter().collect();
        assert_eq!(
            values["TELEMETRY_KAFKA_BROKERS"],
            "kafka-1:9092,kafka-2:9092"
        );
        assert_eq!(values["TELEMETRY_AUDIT_BATCH_SIZE"], "2000");
        assert_eq!(
            values["TELEMETRY_MYSQL_URL"],
            "mysql://u:p@db:3306/telemetry"
        );
        assert_eq!(
            values["TELEMETRY_KAFKA_OPTIONS"],
            "sasl.mechanism=SCRAM-SHA-512,security.protocol=SASL_SSL"
        );
        assert_eq!(values["TELEMETRY_HEALTH_FAILING_DLQ_RATIO"], "0.25");
    }

    #[test]
    fn unknown_keys_and_refused_values_are_named() {
        let error = |text: &str| parse(text, "site.toml", &root()).unwrap_err().to_string();
        let unknown = error("kafka_broker = \"x:9092\"\n");
        assert!(
            unknown.contains(
                "site.toml: `kafka_broker` is not a setting (did you mean `kafka_brokers`?)"
            ),
            "{unknown}"
        );
        assert!(
            error("[audit]\nbatch_size = 0\n").contains("site.toml: audit_batch_size = \"0\": ")
        );
        assert!(error("audit_batch_size = \"many\"\n").contains("audit_batch_size"));
        assert!(error("log_format = \"xml\"\n").contains("log_format"));
        assert!(error("config = \"other.toml\"\n").contains("`config` is not a setting"));
        assert!(error("kafka_brokers = [[\"a\"]]\n").contains("kafka_brokers"));
        assert!(error("this is not toml").contains("site.toml: "));
    }

    #[test]
    fn the_example_lists_every_setting_and_its_defaults_check() {
        let example = example(&root());
        let settings = settings(&root());
        for key in settings.keys() {
            assert!(
                example.contains(&format!("# {key} = ")),
                "{key} is in the example"
            );
        }
        // Uncommented, every default is a valid file.
        let uncommented: String = example
            .lines()
            .filter(|line| {
                line.starts_with("# ") && line.contains(" = ") && !line.ends_with("(no default)")
            })
            .filter(|line| settings.contains_key(line[2..].split(' ').next().unwrap_or_default()))
            .map(|line| format!("{}\n", &line[2..]))
            .collect();
        let values = parse(&uncommented, "example.toml", &root()).unwrap();
        assert!(values.len() > 30, "{} settings with defaults", values.len());
    }

    #[test]
    fn secret_values_are_in_no_error() {
        let error = |text: &str| parse(text, "site.toml", &root()).unwrap_err().to_string();
        for text in [
            "kafka_options = [[\"sasl.password=SECRET\"]]\n",
            "kafka_sasl_password = [\"SECRET\", [\"SECRET\"]]\n",
            "mysql_url = \"mysql://u:SECRET@db/telemetry\n",
            "[mysql]\nurl = \"mysql://u:SECRET@db/telemetry\"\nurl = \"x\"\n",
        ] {
            let shown = error(text);
            assert!(shown.contains("site.toml"), "{shown}");
            assert!(!shown.contains("SECRET"), "{text:?}: {shown}");
        }
        // Values of other settings are shown, as they help.
        assert!(error("audit_batch_size = [[1]]\n").contains("audit_batch_size = [1]"));
    }

    #[test]
    fn secrets_are_settings_hidden_from_help_with_a_secret_value() {
        let settings = settings(&root());
        let holds = |key: &str, value: &str| holds_secret(&settings[key], value);
        assert!(holds("kafka_sasl_password", "p"));
        assert!(holds("mqtt_password", "p"));
        assert!(holds("mysql_url", "mysql://u:p@db/telemetry"));
        assert!(holds("mqtt_url", "mqtts://u:p@broker"));
        assert!(holds(
            "kafka_options",
            "socket.keepalive.enable=true,sasl.password=p"
        ));
        assert!(holds("kafka_options", "ssl.key.password=p"));
        assert!(!holds("kafka_sasl_password", ""));
        assert!(!holds("mysql_url", "mysql://u@db/telemetry"));
        assert!(!holds("mqtt_url", "mqtt://broker:1883"));
        assert!(!holds("kafka_options", "socket.keepalive.enable=true"));
        assert!(!holds("kafka_brokers", "kafka:9092"));
        assert!(!holds("kafka_sasl_username", "telemetry"));
    }

    #[test]
    fn the_path_comes_from_the_flag_before_the_environment() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            path_from(&args(&["telemetry", "audit", "--config", "a.toml"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            path_from(&args(&["telemetry", "--config=b.toml", "api"])),
            Some(PathBuf::from("b.toml"))
        );
    }
}
