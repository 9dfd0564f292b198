//! The configuration file, through the real binary: file < environment < flag; unknown keys and
//! refused values stop it before it starts, naming file and key; the committed example is what
//! `telemetry config example` prints, and checks; a file holding secrets that others may read gets
//! a warning naming its settings, never their values.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::telemetry;

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A copy of the default contract with `version = N`.
fn contract(directory: &Path, version: u32) -> PathBuf {
    let original = std::fs::read_to_string(repository().join("contracts/telemetry.toml")).unwrap();
    let changed = original.replacen("\nversion = 1\n", &format!("\nversion = {version}\n"), 1);
    assert_ne!(original, changed, "the default contract has `version = 1`");
    let path = directory.join(format!("contract-{version}.toml"));
    std::fs::write(&path, changed).unwrap();
    path
}

fn shown_version(command: &mut Command, flags: &[&std::ffi::OsStr]) -> String {
    let output = command
        .args(["contract", "show"])
        .args(flags)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    stdout
        .lines()
        .find(|line| line.starts_with("version = "))
        .unwrap_or_else(|| panic!("no version in {stdout}"))
        .to_string()
}

#[test]
fn the_environment_overrides_the_file_and_a_flag_overrides_both() {
    let directory = std::env::temp_dir().join(telemetry_testkit::unique("config"));
    std::fs::create_dir_all(&directory).unwrap();
    let config = directory.join("telemetry.toml");
    std::fs::write(
        &config,
        format!(
            "contract = {:?}\n",
            contract(&directory, 11).display().to_string()
        ),
    )
    .unwrap();
    let from_env = contract(&directory, 12);
    let from_flag = contract(&directory, 13);

    assert_eq!(
        shown_version(telemetry().arg("--config").arg(&config), &[]),
        "version = 11"
    );
    assert_eq!(
        shown_version(telemetry().env("TELEMETRY_CONFIG", &config), &[]),
        "version = 11",
        "the file named by TELEMETRY_CONFIG"
    );
    assert_eq!(
        shown_version(
            telemetry()
                .env("TELEMETRY_CONFIG", &config)
                .env("TELEMETRY_CONTRACT", &from_env),
            &[]
        ),
        "version = 12"
    );
    assert_eq!(
        shown_version(
            telemetry()
                .env("TELEMETRY_CONFIG", &config)
                .env("TELEMETRY_CONTRACT", &from_env),
            &["--contract".as_ref(), from_flag.as_os_str()]
        ),
        "version = 13"
    );
}

#[test]
fn a_bad_file_stops_every_command_naming_file_and_key() {
    let directory = std::env::temp_dir().join(telemetry_testkit::unique("config"));
    std::fs::create_dir_all(&directory).unwrap();
    let cases = [
        (
            "kafka_broker = \"kafka:9092\"\n",
            "`kafka_broker` is not a setting (did you mean `kafka_brokers`?)",
        ),
        (
            "[audit]\nbatch_size = 0\n",
            "audit_batch_size = \"0\": invalid value '0'",
        ),
        ("[api]\nlisten = [\"a\", [\"b\"]]\n", "api_listen"),
        ("mysql_url = \n", "TOML parse error"),
    ];
    for (index, (content, expected)) in cases.iter().enumerate() {
        let path = directory.join(format!("bad-{index}.toml"));
        std::fs::write(&path, content).unwrap();
        for args in [
            &["audit"][..],
            &["config", "check"][..],
            &["api", "--help"][..],
        ] {
            let output = telemetry()
                .arg("--config")
                .arg(&path)
                .args(args)
                .output()
                .unwrap();
            let (_, stderr) = text(&output);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(&path.display().to_string()), "{stderr}");
            assert!(
                stderr.contains(expected),
                "{args:?} with {content:?}: {stderr}"
            );
        }
    }
    let output = telemetry().args(["config", "check"]).output().unwrap();
    assert!(!output.status.success());
    assert!(text(&output).1.contains("--config FILE"));
}

#[test]
fn the_committed_example_is_current_complete_and_valid() {
    let output = telemetry().args(["config", "example"]).output().unwrap();
    assert!(output.status.success());
    let printed = text(&output).0;
    let committed_path = repository().join("config/telemetry.example.toml");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == printed,
        "config/telemetry.example.toml is out of date: run `telemetry config example > config/telemetry.example.toml`"
    );
    // Every default, uncommented, is a file `config check` accepts.
    let uncommented: String = printed
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| {
            line.split_once(" = ").is_some_and(|(key, value)| {
                !key.contains(' ') && !key.is_empty() && value != "(no default)"
            })
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let directory = std::env::temp_dir().join(telemetry_testkit::unique("config"));
    std::fs::create_dir_all(&directory).unwrap();
    let path = directory.join("defaults.toml");
    std::fs::write(&path, &uncommented).unwrap();
    let output = telemetry()
        .arg("--config")
        .arg(&path)
        .args(["config", "check"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("settings, all valid"), "{stdout}");
}

#[cfg(unix)]
#[test]
fn a_file_with_secrets_readable_by_others_gets_a_warning_naming_its_settings() {
    use std::os::unix::fs::PermissionsExt as _;
    let directory = tempfile::tempdir().unwrap();
    let check = |name: &str, content: &str, mode: u32| {
        let path = directory.path().join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let output = telemetry()
            .arg("--config")
            .arg(&path)
            .args(["contract", "check"])
            .output()
            .unwrap();
        let (_, stderr) = text(&output);
        assert!(output.status.success(), "{stderr}");
        assert!(
            !stderr.contains("SECRET-"),
            "the warning shows no value: {stderr}"
        );
        (path.display().to_string(), stderr)
    };
    let secrets = r#"
        kafka_brokers = "kafka-1:9092"
        kafka_sasl_password = "SECRET-SASL"
        mysql_url = "mysql://telemetry:SECRET-MYSQL@db:3306/telemetry"

        [kafka.options]
        "sasl.password" = "SECRET-OPTION"
        "socket.keepalive.enable" = "true"
    "#;
    for mode in [0o644, 0o640, 0o604] {
        let (path, stderr) = check(&format!("open-{mode:o}.toml"), secrets, mode);
        let warning = stderr
            .lines()
            .find(|line| line.contains("chmod 600"))
            .unwrap_or_else(|| panic!("mode {mode:o}: no warning in {stderr}"));
        assert!(warning.contains("WARN"), "{warning}");
        assert!(warning.contains(&path), "{warning}");
        for key in ["kafka_sasl_password", "mysql_url", "kafka_options"] {
            assert!(warning.contains(key), "the warning names {key}: {warning}");
        }
        assert!(!warning.contains("kafka_brokers"), "{warning}");
    }
    let (_, stderr) = check("private.toml", secrets, 0o600);
    assert!(!stderr.contains("chmod"), "0600: no warning: {stderr}");
    let (_, stderr) = check(
        "no-secrets.toml",
        r#"
            kafka_brokers = "kafka-1:9092"
            mysql_url = "mysql://telemetry@db:3306/telemetry"
            kafka_options = ["socket.keepalive.enable=true"]
        "#,
        0o644,
    );
    assert!(
        !stderr.contains("chmod"),
        "no secret in the file: no warning: {stderr}"
    );
}
