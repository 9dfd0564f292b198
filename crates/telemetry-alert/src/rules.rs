//! The alert rules file: TOML, read at start-up, every mistake named with its rule.
//!
//! ```toml
//! [[rules]]
//! name = "overheating"
//! when = "temperature_c > 40 for 2m"   # a metric, a comparison, a number, how long
//! severity = "critical"                # optional, default "warning"
//! clear_for = "1m"                     # optional: how long it must be false to resolve
//!
//! [[rules]]
//! name = "device-silent"
//! silent_for = "5m"                    # no event from the device for this long
//!
//! [[rules]]
//! name = "rejections"
//! dlq_above = 10                       # more than 10 rejected records from one device ...
//! window = "5m"                        # ... within 5 minutes
//!
//! [webhook]                            # optional
//! url = "http://127.0.0.1:9000/alerts"
//! max_attempts = 10                    # optional
//! timeout = "10s"                      # optional
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// A rules file that cannot be used, with what is wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("cannot read the alert rules {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("alert rules {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A rule or setting is wrong.
    #[error("alert rules {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the rule.
        message: String,
    },
}

/// How a reading compares with a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `>`
    Above,
    /// `>=`
    AtLeast,
    /// `<`
    Below,
    /// `<=`
    AtMost,
}

impl Comparison {
    /// Whether `value` meets the comparison with `threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Above => value > threshold,
            Comparison::AtLeast => value >= threshold,
            Comparison::Below => value < threshold,
            Comparison::AtMost => value <= threshold,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Comparison::Above => ">",
            Comparison::AtLeast => ">=",
            Comparison::Below => "<",
            Comparison::AtMost => "<=",
        }
    }
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// A metric compared with a threshold, by device time: fires when every reading for `hold`
    /// met it.
    Threshold {
        /// The metric's canonical name.
        metric: String,
        /// The comparison.
        comparison: Comparison,
        /// The threshold.
        threshold: f64,
    },
    /// No event from the device for this long (by arrival time, against the clock).
    Silent(Duration),
    /// More than `above` rejected records from the device within `window` (by arrival time).
    DlqRate {
        /// The limit.
        above: u32,
        /// The sliding window.
        window: Duration,
    },
}

/// One rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its name: unique, part of every alert's id.
    pub name: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// What it watches.
    pub condition: Condition,
    /// How long the condition must hold before the alert fires.
    pub hold: Duration,
    /// How long the condition must be false before a firing alert resolves.
    pub clear_for: Duration,
}

impl Rule {
    /// The rule in one line, as alerts and logs show it.
    pub fn describe(&self) -> String {
        match &self.condition {
            Condition::Threshold {
                metric,
                comparison,
                threshold,
            } => {
                let mut text = format!("{metric} {} {threshold}", comparison.symbol());
                if !self.hold.is_zero() {
                    text.push_str(&format!(" for {}", humantime::format_duration(self.hold)));
                }
                text
            }
            Condition::Silent(after) => {
                format!("no event for {}", humantime::format_duration(*after))
            }
            Condition::DlqRate { above, window } => format!(
                "more than {above} rejected records within {}",
                humantime::format_duration(*window)
            ),
        }
    }
}

/// Where alerts are also POSTed. Its `Debug` shows the URL's origin only.
#[derive(Clone, PartialEq)]
pub struct Webhook {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Attempts per alert before it is given up (logged and counted).
    pub max_attempts: u32,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &telemetry_secrets::redact_url(&self.url))
            .field("max_attempts", &self.max_attempts)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A loaded rules file.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// The rules, in file order.
    pub rules: Vec<Rule>,
    /// The webhook, if any.
    pub webhook: Option<Webhook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rules: Vec<RuleSpec>,
    webhook: Option<WebhookSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    severity: Option<String>,
    when: Option<String>,
    silent_for: Option<String>,
    dlq_above: Option<u32>,
    window: Option<String>,
    clear_for: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookSpec {
    url: String,
    max_attempts: Option<u32>,
    timeout: Option<String>,
}

/// Longest rule name: it is part of alert ids and a database key.
const MAX_NAME_CHARS: usize = 64;

impl Rules {
    /// Reads and checks the rules file at `path`.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|error| match error {
            RulesError::Parse { message, .. } => RulesError::Parse {
                path: shown.clone(),
                message,
            },
            RulesError::Invalid { message, .. } => RulesError::Invalid {
                path: shown.clone(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks rules from TOML text.
    pub fn parse(text: &str) -> Result<Self, RulesError> {
        // Without the quoted line, which may be the webhook's URL.
        let file: File = toml::from_str(text).map_err(|error| RulesError::Parse {
            path: String::new(),
            message: telemetry_secrets::describe_toml_error(&error, text),
        })?;
        let invalid = |message: String| RulesError::Invalid {
            path: String::new(),
            message,
        };
        let mut rules = Vec::with_capacity(file.rules.len());
        for spec in file.rules {
            let rule = rule(spec).map_err(invalid)?;
            if rules.iter().any(|other: &Rule| other.name == rule.name) {
                return Err(invalid(format!("two rules are named `{}`", rule.name)));
            }
            rules.push(rule);
        }
        let webhook = file.webhook.map(webhook).transpose().map_err(invalid)?;
        Ok(Rules { rules, webhook })
    }
}

fn rule(spec: RuleSpec) -> Result<Rule, String> {
    let name = spec.name;
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "rule name `{name}`: use 1 to {MAX_NAME_CHARS} ASCII letters, digits, `-`, `_` or `.`"
        ));
    }
    let at = |what: &str| format!("rule `{name}`: {what}");
    let severity = spec.severity.unwrap_or_else(|| "warning".to_string());
    if !matches!(severity.as_str(), "info" | "warning" | "critical") {
        return Err(at(&format!(
            "severity `{severity}` is not one of info, warning, critical"
        )));
    }
    let duration = |field: &str, text: &str| {
        humantime::parse_duration(text).map_err(|error| {
            at(&format!(
                "{field} = \"{text}\" is not a duration like \"90s\", \"2m\" or \"1h\" ({error})"
            ))
        })
    };
    let clear_for = spec
        .clear_for
        .as_deref()
        .map(|text| duration("clear_for", text))
        .transpose()?;
    let kinds = [
        spec.when.is_some(),
        spec.silent_for.is_some(),
        spec.dlq_above.is_some(),
    ];
    if kinds.iter().filter(|given| **given).count() != 1 {
        return Err(at(
            "give exactly one of `when`, `silent_for` and `dlq_above`",
        ));
    }
    if spec.window.is_some() && spec.dlq_above.is_none() {
        return Err(at("`window` goes with `dlq_above`"));
    }
    let (condition, hold) = if let Some(when) = spec.when {
        threshold(&when).map_err(|message| at(&message))?
    } else if let Some(text) = spec.silent_for {
        let after = duration("silent_for", &text)?;
        if after.is_zero() {
            return Err(at("silent_for must be longer than 0"));
        }
        (Condition::Silent(after), Duration::ZERO)
    } else {
        let above = spec.dlq_above.unwrap_or_default();
        let window = duration(
            "window",
            spec.window
                .as_deref()
                .ok_or_else(|| at("`dlq_above` needs a `window`, e.g. window = \"5m\""))?,
        )?;
        if window.is_zero() {
            return Err(at("window must be longer than 0"));
        }
        (Condition::DlqRate { above, window }, Duration::ZERO)
    };
    Ok(Rule {
        name,
        severity,
        condition,
        hold,
        // By default as long to resolve as to fire: a value hovering at the threshold neither
        // fires nor resolves on every reading.
        clear_for: clear_for.unwrap_or(hold),
    })
}

/// Parses `METRIC OP NUMBER [for DURATION]`.
fn threshold(when: &str) -> Result<(Condition, Duration), String> {
    let shape =
        || format!("when = \"{when}\" is not like \"temperature_c > 40 for 2m\" (>, >=, <, <=)");
    let words: Vec<&str> = when.split_whitespace().collect();
    let (metric, symbol, number, hold) = match words.as_slice() {
        [metric, symbol, number] => (*metric, *symbol, *number, None),
        [metric, symbol, number, "for", hold] => (*metric, *symbol, *number, Some(*hold)),
        _ => return Err(shape()),
    };
    let comparison = match symbol {
        ">" => Comparison::Above,
        ">=" => Comparison::AtLeast,
        "<" => Comparison::Below,
        "<=" => Comparison::AtMost,
        _ => return Err(shape()),
    };
    let threshold: f64 = number
        .parse()
        .ok()
        .filter(|value: &f64| value.is_finite())
        .ok_or_else(|| format!("when: `{number}` is not a number"))?;
    let hold = hold
        .map(|text| {
            humantime::parse_duration(text)
                .map_err(|error| format!("when: `{text}` is not a duration like \"2m\" ({error})"))
        })
        .transpose()?
        .unwrap_or(Duration::ZERO);
    Ok((
        Condition::Threshold {
            metric: metric.to_string(),
            comparison,
            threshold,
        },
        hold,
    ))
}

fn webhook(spec: WebhookSpec) -> Result<Webhook, String> {
    if !(spec.url.starts_with("http://") || spec.url.starts_with("https://"))
        || reqwest::Url::parse(&spec.url).is_err()
    {
        // Shown by its origin only: the rest may be the receiver's secret.
        return Err(format!(
            "webhook url `{}` is not an http:// or https:// URL",
            telemetry_secrets::redact_url(&spec.url)
        ));
    }
    let timeout = match spec.timeout {
        Some(text) => humantime::parse_duration(&text)
            .map_err(|error| format!("webhook timeout `{text}` is not a duration ({error})"))?,
        None => Duration::from_secs(10),
    };
    Ok(Webhook {
        url: spec.url,
        max_attempts: spec.max_attempts.unwrap_or(10).max(1),
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_kinds_of_rule_and_a_webhook_are_read() {
        let rules = Rules::parse(
            r#"
            [[rules]]
            name = "overheating"
            when = "temperature_c > 40 for 2m"
            severity = "critical"

            [[rules]]
            name = "silent"
            silent_for = "5m"

            [[rules]]
            name = "rejections"
            dlq_above = 10
            window = "5m"
            clear_for = "30s"

            [webhook]
            url = "http://127.0.0.1:9000/alerts"
            "#,
        )
        .unwrap();
        assert_eq!(rules.rules.len(), 3);
        let hot = &rules.rules[0];
        assert_eq!(
            hot.condition,
            Condition::Threshold {
                metric: "temperature_c".into(),
                comparison: Comparison::Above,
                threshold: 40.0
            }
        );
        assert_eq!(
            (hot.hold, hot.clear_for),
            (Duration::from_secs(120), Duration::from_secs(120))
        );
        assert_eq!(hot.describe(), "temperature_c > 40 for 2m");
        assert_eq!(
            rules.rules[1].condition,
            Condition::Silent(Duration::from_secs(300))
        );
        assert_eq!(rules.rules[2].clear_for, Duration::from_secs(30));
        let webhook = rules.webhook.unwrap();
        assert_eq!(
            (webhook.max_attempts, webhook.timeout),
            (10, Duration::from_secs(10))
        );
    }

    #[test]
    fn the_shipped_rules_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/alerts.toml");
        let rules = Rules::load(&path).unwrap();
        assert_eq!(rules.rules.len(), 4);
        assert_eq!(rules.webhook, None);
        assert!(Rules::load(Path::new("/nonexistent/alerts.toml"))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/alerts.toml"));
    }

    #[test]
    fn mistakes_are_named_with_their_rule() {
        let error = |text: &str| Rules::parse(text).unwrap_err().to_string();
        assert!(
            error("[[rules]]\nname = \"a\"\nwhen = \"temperature_c >> 40\"\n")
                .contains("rule `a`: when = \"temperature_c >> 40\" is not like")
        );
        assert!(error("[[rules]]\nname = \"a\"\nwhen = \"t > 4 for soon\"\n").contains("`soon`"));
        assert!(
            error("[[rules]]\nname = \"a\"\nsilent_for = \"5m\"\ndlq_above = 3\n")
                .contains("exactly one of")
        );
        assert!(error("[[rules]]\nname = \"a\"\ndlq_above = 3\n").contains("needs a `window`"));
        assert!(error("[[rules]]\nname = \"a b\"\nsilent_for = \"5m\"\n").contains("rule name"));
        assert!(
            error("[[rules]]\nname = \"a\"\nsilent_for = \"5m\"\nseverity = \"loud\"\n")
                .contains("severity `loud`")
        );
        assert!(error("[[rules]]\nname = \"a\"\nsilent_for = \"5m\"\n[[rules]]\nname = \"a\"\nsilent_for = \"1m\"\n")
            .contains("two rules are named `a`"));
        assert!(
            error("[[rules]]\nname = \"a\"\nsilent_for = \"5m\"\ncolour = 1\n").contains("colour")
        );
        assert!(error("[webhook]\nurl = \"ftp://x\"\n").contains("not an http"));
    }

    #[test]
    fn errors_and_debug_never_show_the_webhook_secret() {
        let error = |text: &str| Rules::parse(text).unwrap_err().to_string();
        for text in [
            "[webhook]\nurl = \"ftp://u:SECRET@hooks.example/SECRET?k=SECRET\"\n",
            "[webhook]\nurl = \"hooks.example/SECRET\"\n",
            "[webhook]\nurl = \"https://hooks.example/SECRET\n",
            "[webhook]\nurl = \"https://hooks.example/SECRET\"\nretries = 3\n",
        ] {
            let shown = error(text);
            assert!(!shown.contains("SECRET"), "{text:?}: {shown}");
        }
        let rules =
            Rules::parse("[webhook]\nurl = \"https://hooks.example:8443/SECRET?k=SECRET\"\n")
                .unwrap();
        let shown = format!("{rules:?}");
        assert!(shown.contains("https://hooks.example:8443"), "{shown}");
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
