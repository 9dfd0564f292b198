//! Least privilege in the database (issue 21): the accounts `scripts/services.sh` makes hold
//! their role and nothing more, the server cannot be made to write files, and the services run
//! with those roles: `telemetry migrate` with the owner's account, the audit service with DML
//! alone, the API with SELECT alone. Against the real MariaDB; each test has its own database.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use clap::Parser;
use sqlx::{Connection, MySqlConnection};
use telemetry_api::{Api, ApiConfig};
use telemetry_testkit::{
    database_url, database_url_as, eventually, http_get, produce, unique, TestRecord,
};
use tokio_util::sync::CancellationToken;

mod common;
use common::{api_config, audit_config, base_ts, kafka_config, stopped};

/// The development accounts of `scripts/services.sh`, by role, with what each may do on the
/// `telemetry` database.
const DEVELOPMENT_ACCOUNTS: [(&str, &str); 3] = [
    (telemetry_store::DEFAULT_OWNER_URL, "ALL PRIVILEGES"),
    (
        telemetry_store::DEFAULT_MYSQL_URL,
        "SELECT, INSERT, UPDATE, DELETE",
    ),
    (telemetry_store::DEFAULT_READER_URL, "SELECT"),
];

/// MySQL's error number of a failed statement; `None` when it succeeded.
async fn refusal(connection: &mut MySqlConnection, statement: &str) -> Option<u16> {
    match sqlx::query(statement).execute(&mut *connection).await {
        Ok(_) => None,
        Err(error) => Some(
            error
                .as_database_error()
                .and_then(|error| error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
                .map_or(0, sqlx::mysql::MySqlDatabaseError::number),
        ),
    }
}

async fn grants(connection: &mut MySqlConnection) -> Vec<String> {
    sqlx::query_scalar("SHOW GRANTS")
        .fetch_all(&mut *connection)
        .await
        .unwrap()
}

#[tokio::test]
async fn each_development_account_holds_its_role_on_the_telemetry_database_and_nothing_else() {
    for (url, privileges) in DEVELOPMENT_ACCOUNTS {
        let user = url.split_once("//").unwrap().1.split(':').next().unwrap();
        let mut connection = MySqlConnection::connect(url).await.unwrap();
        let grants = grants(&mut connection).await;
        // USAGE on *.* (the right to log in) and the role on `telemetry`.*: nothing global, no
        // GRANT OPTION, no other database.
        assert_eq!(grants.len(), 2, "{user}: {grants:?}");
        assert!(
            grants[0].starts_with(&format!("GRANT USAGE ON *.* TO `{user}`")),
            "{user}: {grants:?}"
        );
        assert_eq!(
            grants[1],
            format!("GRANT {privileges} ON `telemetry`.* TO `{user}`@`127.0.0.1`"),
            "{user}"
        );
        assert!(!grants
            .iter()
            .any(|grant| grant.contains("WITH GRANT OPTION")));
        // FILE: no account can write a file through the server (ER_ACCESS_DENIED / 1045 or
        // ER_SPECIFIC_ACCESS_DENIED / 1227).
        let path = format!("/tmp/{}.out", unique("dumpfile"));
        let dump = refusal(
            &mut connection,
            &format!("SELECT 'x' INTO DUMPFILE '{path}'"),
        )
        .await;
        assert!(matches!(dump, Some(1045 | 1227)), "{user}: {dump:?}");
        assert!(!std::path::Path::new(&path).exists());
    }

    // The reader may not write, the writer may not change the schema (ER_TABLEACCESS_DENIED).
    let mut reader = MySqlConnection::connect(telemetry_store::DEFAULT_READER_URL)
        .await
        .unwrap();
    let insert = refusal(
        &mut reader,
        "INSERT INTO telemetry.devices (device_id) VALUES ('intruder')",
    )
    .await;
    assert_eq!(insert, Some(1142), "the reader must not INSERT");
    let mut writer = MySqlConnection::connect(telemetry_store::DEFAULT_MYSQL_URL)
        .await
        .unwrap();
    let create = refusal(&mut writer, "CREATE TABLE telemetry.intruder (a INT)").await;
    assert_eq!(create, Some(1142), "the writer must not CREATE");
    let drop = refusal(&mut writer, "DROP TABLE telemetry.telemetry").await;
    assert_eq!(drop, Some(1142), "the writer must not DROP");
}

#[tokio::test]
async fn the_api_reads_with_the_reader_account_unless_told_otherwise() {
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        api: ApiConfig,
    }
    let api = Flags::try_parse_from(["api"]).unwrap().api;
    if std::env::var_os("TELEMETRY_API_MYSQL_URL").is_none()
        && std::env::var_os("TELEMETRY_MYSQL_URL").is_none()
    {
        assert_eq!(api.database_url(), telemetry_store::DEFAULT_READER_URL);
    }
    let flags = Flags::try_parse_from(["api", "--mysql-url", "mysql://r:p@db:3306/telemetry"])
        .unwrap()
        .api;
    assert_eq!(flags.database_url(), "mysql://r:p@db:3306/telemetry");
}

#[tokio::test]
async fn the_database_server_cannot_touch_files_outside_its_own() {
    let mut owner = MySqlConnection::connect(telemetry_store::DEFAULT_OWNER_URL)
        .await
        .unwrap();
    let priv_dir: Option<String> = sqlx::query_scalar("SELECT @@secure_file_priv")
        .fetch_one(&mut owner)
        .await
        .unwrap();
    let priv_dir = priv_dir.expect("secure_file_priv must be set (NULL disables file access)");
    assert!(!priv_dir.is_empty(), "secure_file_priv must not be empty");
    assert_ne!(
        priv_dir, "/",
        "secure_file_priv must not be the root directory"
    );
    // The server's process does not run as root.
    let state_dir = std::env::var_os("TELEMETRY_STATE_DIR").map_or_else(
        || std::path::PathBuf::from("/var/lib/telemetry-pipeline"),
        std::path::PathBuf::from,
    );
    let pid = std::fs::read_to_string(state_dir.join("mariadb/mariadb.pid")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .unwrap();
    assert_ne!(uid, "0", "MariaDB must not run as root");
}

/// Makes the test's database, empty, as an operator does; the server connection that made it.
async fn empty_database(id: &str) -> MySqlConnection {
    let server = database_url(id).replace(&format!("/test_{id}"), "");
    let mut owner = MySqlConnection::connect(&server).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE `test_{id}`"))
        .execute(&mut owner)
        .await
        .unwrap();
    owner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_services_run_with_their_roles_after_telemetry_migrate() {
    let id = unique("roles");
    let kafka = kafka_config(&id);
    let writer_url = database_url_as("telemetry_test_writer", &id);

    // An empty database, as an operator makes it.
    let mut owner = empty_database(&id).await;

    // The audit service with the writer's account alone cannot make the schema: it stops at
    // once, saying what to do (it does not retry for ever).
    let mut audit = audit_config(&id, &format!("{id}-audit"), &kafka);
    audit.database.mysql_url = writer_url.clone();
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        telemetry_audit::run(audit.clone(), CancellationToken::new()),
    )
    .await
    .expect("the audit service must stop, not retry")
    .unwrap_err();
    let refused = format!("{refused:#}");
    assert!(refused.contains("telemetry migrate"), "{refused}");

    // `telemetry migrate` with the owner's account.
    let migrate = std::process::Command::new(env!("CARGO_BIN_EXE_telemetry"))
        .arg("migrate")
        .env("TELEMETRY_MYSQL_OWNER_URL", database_url(&id))
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    // Now the audit service writes with DML alone, and the API reads with SELECT alone.
    let shutdown = CancellationToken::new();
    let audit_task = tokio::spawn(telemetry_audit::run(audit, shutdown.clone()));
    let api = Api::bind(api_config(&id, "127.0.0.1:0", Default::default()))
        .await
        .unwrap();
    let api_address = api.local_addr().unwrap();
    let api_task = tokio::spawn(api.run(shutdown.clone()));

    let device = format!("{id}-pico");
    let event = serde_json::json!({
        "device_id": device,
        "device_ts": base_ts(),
        "seq": 1,
        "temperature": 21.5,
        "battery_v": 3.7,
    });
    produce(
        &kafka.raw_topic,
        &[TestRecord {
            key: Some(device.clone().into_bytes()),
            payload: event.to_string().into_bytes(),
            headers: vec![(
                "mqtt.topic".into(),
                format!("devices/{device}/telemetry").into_bytes(),
            )],
        }],
    )
    .await;
    let listed = eventually(Duration::from_secs(30), || async {
        http_get(api_address, "/api/devices")
            .await
            .is_ok_and(|(status, body)| status == 200 && body.contains(&device))
    })
    .await;
    assert!(listed, "the event must be stored and listed by the API");
    let rows: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `test_{id}`.telemetry WHERE device_id = ?"
    ))
    .bind(&device)
    .fetch_one(&mut owner)
    .await
    .unwrap();
    assert_eq!(rows, 1);

    shutdown.cancel();
    stopped(audit_task).await;
    stopped(api_task).await;
}

/// `telemetry rollup` and `telemetry alert` on an empty database, given the owner's account for
/// the schema and the writer's for their work, as the audit service is: each migrates with the
/// owner's, then becomes ready. Before the shared database settings they knew only the writer's,
/// which may not make the schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rollup_and_the_alerter_migrate_with_the_owners_account_and_work_with_the_writers() {
    let id = unique("roles_consumers");
    let mut owner = empty_database(&id).await;
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/alerts.toml");
    for (service, listen, table) in [
        ("rollup", "TELEMETRY_ROLLUP_LISTEN", "rollup_1m"),
        ("alert", "TELEMETRY_ALERT_LISTEN", "alert_states"),
    ] {
        let port = telemetry_testkit::free_port();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_telemetry"))
            .arg(service)
            .env(
                "TELEMETRY_MYSQL_URL",
                database_url_as("telemetry_test_writer", &id),
            )
            .env("TELEMETRY_MYSQL_OWNER_URL", database_url(&id))
            .env(listen, format!("127.0.0.1:{port}"))
            .env("TELEMETRY_CLEANED_TOPIC", format!("{id}.cleaned"))
            .env("TELEMETRY_DLQ_TOPIC", format!("{id}.dlq"))
            .env("TELEMETRY_ALERTS_TOPIC", format!("{id}.alerts"))
            .env("TELEMETRY_ALERT_RULES", &rules)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let ready = eventually(Duration::from_secs(60), || async {
            matches!(http_get(address, "/readyz").await, Ok((200, _)))
        })
        .await;
        let exited = child.try_wait().unwrap();
        assert!(
            ready,
            "telemetry {service} did not become ready (exited: {exited:?})"
        );
        let tables: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'test_{id}'"
        ))
        .fetch_all(&mut owner)
        .await
        .unwrap();
        assert!(tables.iter().any(|name| name == table), "{tables:?}");
        child.kill().await.unwrap();
    }
}
