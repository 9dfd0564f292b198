//! Records and a store for the stages' unit tests.

use rdkafka::message::{OwnedMessage, Timestamp};
use telemetry_core::{Contract, Validator};

/// The raw topic of the tests' records.
pub const RAW_TOPIC: &str = "telemetry.raw";

/// A raw record as the bridge produces it: keyed by the device its MQTT topic names, stamped with
/// the receive time. `"ts":"now"` in `payload` stands for that time in epoch milliseconds.
pub fn raw(offset: i64, topic_device: &str, payload: &[u8]) -> OwnedMessage {
    let now = chrono::Utc::now().timestamp_millis();
    let payload = String::from_utf8_lossy(payload)
        .replace(r#""ts":"now""#, &format!(r#""ts":{now}"#))
        .into_bytes();
    OwnedMessage::new(
        Some(payload),
        Some(topic_device.as_bytes().to_vec()),
        RAW_TOPIC.to_string(),
        Timestamp::CreateTime(now),
        0,
        offset,
        None,
    )
}

/// The validator of the contract compiled into the binary.
pub fn validator() -> Validator {
    Validator::new(Contract::load_or_builtin(None).expect("the built-in contract loads"))
        .expect("the built-in contract is valid")
}

/// A fresh SQLite store in its own directory (kept while the directory lives).
pub async fn sqlite_store() -> (tempfile::TempDir, telemetry_store::SqliteStore) {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let url = format!(
        "sqlite://{}",
        directory.path().join("telemetry.db").display()
    );
    let store = telemetry_store::SqliteStore::open(&url)
        .await
        .expect("the SQLite store opens");
    (directory, store)
}

/// Makes the store's database refuse the events of `device` as an operator's rule would (a
/// trigger raising a constraint error), through a connection of its own to the same file.
pub async fn refuse_device(directory: &tempfile::TempDir, device: &str) {
    let database = libsql::Builder::new_local(directory.path().join("telemetry.db"))
        .build()
        .await
        .expect("the database file opens");
    let connection = database.connect().expect("a connection");
    connection
        .execute_batch(&format!(
            "CREATE TRIGGER refuse_device BEFORE INSERT ON telemetry \
             WHEN NEW.device_id = '{device}' \
             BEGIN SELECT RAISE(ABORT, 'refused by an operator rule'); END;"
        ))
        .await
        .expect("the trigger is created");
}

/// The value of header `key` in `headers`.
pub fn header<'a>(headers: &'a [(String, String)], key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.as_str())
}
