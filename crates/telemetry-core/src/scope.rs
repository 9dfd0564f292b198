//! Which devices a client may see: the device allow-list of an API token, as patterns that the
//! API turns into SQL filters and the live view applies to each frame.

use std::fmt;

/// One entry of an allow-list: a device id, or a prefix when it ends in `*` (`greenhouse-*`;
/// `*` alone is every device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePattern {
    /// Exactly this device.
    Exact(String),
    /// Every device whose id starts with this (empty: every device).
    Prefix(String),
}

impl DevicePattern {
    /// Parses `pattern`: an id, or a prefix followed by one `*` at the end.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let (stem, prefix) = match pattern.strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (pattern, false),
        };
        if stem.contains('*') {
            return Err(format!(
                "`{pattern}`: `*` may only end a pattern (`greenhouse-*`)"
            ));
        }
        if stem.is_empty() && !prefix {
            return Err(String::from("an empty device pattern matches nothing"));
        }
        if stem.chars().any(char::is_control) {
            return Err(format!(
                "`{}` holds control characters",
                pattern.escape_debug()
            ));
        }
        Ok(if prefix {
            DevicePattern::Prefix(stem.to_string())
        } else {
            DevicePattern::Exact(stem.to_string())
        })
    }

    /// Whether `device_id` matches.
    pub fn matches(&self, device_id: &str) -> bool {
        match self {
            DevicePattern::Exact(id) => id == device_id,
            DevicePattern::Prefix(prefix) => device_id.starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for DevicePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevicePattern::Exact(id) => f.write_str(id),
            DevicePattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// The devices a client may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceScope {
    /// Every device, and records without a device (no auth, or a token allowed `*`).
    All,
    /// Only devices matching one of these patterns (never empty, never containing `*` alone).
    Only(Vec<DevicePattern>),
}

impl DeviceScope {
    /// The scope of an allow-list: [`DeviceScope::All`] when it holds `*`.
    pub fn from_patterns(patterns: Vec<DevicePattern>) -> Self {
        if patterns
            .iter()
            .any(|pattern| matches!(pattern, DevicePattern::Prefix(prefix) if prefix.is_empty()))
        {
            DeviceScope::All
        } else {
            DeviceScope::Only(patterns)
        }
    }

    /// Whether the client may see `device_id`.
    pub fn allows(&self, device_id: &str) -> bool {
        match self {
            DeviceScope::All => true,
            DeviceScope::Only(patterns) => {
                patterns.iter().any(|pattern| pattern.matches(device_id))
            }
        }
    }

    /// Whether the client may see a record whose device is unknown (a payload that names no
    /// device): only with [`DeviceScope::All`].
    pub fn allows_unknown_devices(&self) -> bool {
        matches!(self, DeviceScope::All)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(patterns: &[&str]) -> DeviceScope {
        DeviceScope::from_patterns(
            patterns
                .iter()
                .map(|pattern| {
                    DevicePattern::parse(pattern).unwrap_or_else(|error| panic!("{error}"))
                })
                .collect(),
        )
    }

    #[test]
    fn patterns_are_ids_or_prefixes() {
        let greenhouse = scope(&["greenhouse-*", "pico-7"]);
        assert!(greenhouse.allows("greenhouse-1"));
        assert!(greenhouse.allows("greenhouse-"));
        assert!(greenhouse.allows("pico-7"));
        assert!(!greenhouse.allows("pico-70"));
        assert!(!greenhouse.allows("pico-"));
        assert!(!greenhouse.allows("Greenhouse-1"));
        assert!(!greenhouse.allows_unknown_devices());
        assert_eq!(scope(&["pico-7", "*"]), DeviceScope::All);
        assert!(DeviceScope::All.allows_unknown_devices());
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(DevicePattern::parse("").is_err());
        assert!(DevicePattern::parse("a*b").is_err());
        assert!(DevicePattern::parse("**").is_err());
        assert!(DevicePattern::parse("a\nb").is_err());
        assert_eq!(
            DevicePattern::parse("lab-*").map(|pattern| pattern.to_string()),
            Ok(String::from("lab-*"))
        );
    }
}
