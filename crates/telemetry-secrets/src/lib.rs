//! Keeping secrets out of logs and error messages (URLs shown by their origin only, TOML errors
//! without the line they quote), and finding files of secrets that other users can read.

use std::path::Path;

/// `url` as logs may show it: scheme, host and port only (`https://hooks.example.com:8443`). The
/// user name, password, path, query and fragment are left out, since any of them can carry a
/// credential (a webhook's key in its path, a token in its query). `(not a URL)` when it does not
/// parse: the text itself may be a secret.
pub fn redact_url(url: &str) -> String {
    let Ok(parsed) = url::Url::parse(url) else {
        return String::from("(not a URL)");
    };
    match (parsed.host_str(), parsed.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}", parsed.scheme()),
        (Some(host), None) => format!("{}://{host}", parsed.scheme()),
        (None, _) => format!("{}:", parsed.scheme()),
    }
}

/// Whether `url` carries a password (`scheme://user:password@host`).
pub fn url_has_password(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|parsed| parsed.password().is_some_and(|p| !p.is_empty()))
}

/// A TOML error as `TOML parse error at line L, column C: MESSAGE`, without the excerpt of the
/// file that the error's own text quotes: that line may hold a password.
pub fn describe_toml_error(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return format!("TOML parse error: {message}");
    };
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|byte| **byte == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |index| index + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    format!("TOML parse error at line {line}, column {column}: {message}")
}

/// The permission bits of the file at `path` when its group or others have any access to it
/// (`mode & 0o077`: read, write or execute); `None` when they have none, when it cannot be read,
/// and where there are no Unix modes.
pub fn open_to_others(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_scheme_host_and_port_only() {
        let cases = [
            (
                "https://hooks.example.com/services/T000/B000/XXXX?token=abc#frag",
                "https://hooks.example.com",
            ),
            (
                "http://user:pass@127.0.0.1:9000/alerts?key=1",
                "http://127.0.0.1:9000",
            ),
            (
                "mysql://telemetry:secret@db:3306/telemetry",
                "mysql://db:3306",
            ),
            ("mqtt://[::1]:1883", "mqtt://[::1]:1883"),
            // The default port is not repeated.
            ("https://example.com:443/x", "https://example.com"),
            ("not a url with a secret", "(not a URL)"),
            ("mailto:someone@example.com", "mailto:"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn passwords_in_urls_are_found() {
        assert!(url_has_password("mysql://u:p@db/telemetry"));
        assert!(!url_has_password("mysql://u@db/telemetry"));
        assert!(!url_has_password("mysql://u:@db/telemetry"));
        assert!(!url_has_password("mysql://db/telemetry"));
        assert!(!url_has_password("not a url"));
    }

    #[cfg(unix)]
    #[test]
    fn files_open_to_group_or_others_are_found() {
        use std::os::unix::fs::PermissionsExt as _;
        let directory = std::env::temp_dir().join(format!("secrets-mode-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("file");
        std::fs::write(&path, "x").unwrap();
        for (mode, open) in [(0o600, false), (0o400, false), (0o640, true), (0o604, true)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(open_to_others(&path), open.then_some(mode), "{mode:o}");
        }
        assert_eq!(open_to_others(&directory.join("missing")), None);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn toml_errors_name_line_and_column_without_quoting_the_file() {
        let text = "a = 1\npassword = \"SECRET\n";
        let error = text.parse::<toml::Table>().unwrap_err();
        assert!(
            error.to_string().contains("SECRET"),
            "toml's own text quotes"
        );
        let described = describe_toml_error(&error, text);
        assert!(
            described.starts_with("TOML parse error at line 2, column "),
            "{described}"
        );
        assert!(!described.contains("SECRET"), "{described}");
    }
}
