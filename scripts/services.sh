#!/usr/bin/env bash
# Installs (when missing) and runs the infrastructure telemetry-pipeline needs, on 127.0.0.1 only:
#   Apache Kafka (KRaft, single node), MariaDB and Mosquitto.
#
#   scripts/services.sh start [SERVICE...]   install what is missing, start what is not running,
#                                            wait until ready
#   scripts/services.sh stop [SERVICE...]    stop what this script started (SIGTERM, then wait)
#   scripts/services.sh status               one line per service
#   scripts/services.sh add-device ID        an MQTT user for device ID (may publish on
#                                            devices/ID/telemetry only); prints its password
# SERVICE is kafka, mariadb or mosquitto; without any, all three.
#
# Idempotent: running `start` twice starts nothing twice. Downloads are cached outside the clone.
#
# Besides the plaintext ports, Kafka and MariaDB also offer TLS, for the tests that prove our
# services connect securely: Kafka a SASL_SSL listener (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; the
# users below), MariaDB TLS on its usual port (available, not required). The certificates come
# from a development CA generated once into $TELEMETRY_STATE_DIR/tls (clients trust tls/ca.pem).
# Kafka's SASL_SSL listener is governed by ACLs (the production recipe, docs/operations.md "Kafka
# ACLs"): one user per role, each allowed its own topics and groups and nothing else. The
# plaintext listener is the development back door: loopback only, every client on it a super user
# (the tests and the services run there). A production broker has no such listener.
#
# Environment (all optional):
#   TELEMETRY_CACHE_DIR          downloads (Kafka jars)       default /var/cache/telemetry-pipeline
#   TELEMETRY_STATE_DIR          data, logs, pid files, TLS   default /var/lib/telemetry-pipeline
#   TELEMETRY_KAFKA_PORT         Kafka client port            default 9092 (controller: port + 1)
#   TELEMETRY_KAFKA_SECURE_PORT  Kafka SASL_SSL client port   default Kafka client port + 2 (9094)
#   TELEMETRY_MYSQL_PORT         MariaDB port (plain and TLS) default 3306
#   TELEMETRY_MQTT_PORT          Mosquitto port               default 1883
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_dir=${TELEMETRY_CACHE_DIR:-/var/cache/telemetry-pipeline}
state_dir=${TELEMETRY_STATE_DIR:-/var/lib/telemetry-pipeline}
kafka_port=${TELEMETRY_KAFKA_PORT:-9092}
kafka_controller_port=$((kafka_port + 1))
kafka_secure_port=${TELEMETRY_KAFKA_SECURE_PORT:-$((kafka_port + 2))}
mysql_port=${TELEMETRY_MYSQL_PORT:-3306}
mqtt_port=${TELEMETRY_MQTT_PORT:-1883}
kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$repo/deploy/kafka/pom.xml")
kafka_libs="$cache_dir/kafka-$kafka_version/libs"
tls_dir="$state_dir/tls"

# The accounts of the development database, one per role (docs/operations.md, "Database
# accounts", has the production recipe). None holds a global privilege, FILE or GRANT OPTION:
#   telemetry_owner   migrations (`telemetry migrate`): every privilege on the telemetry database only
#   telemetry         the writer: the audit service, rollup, alert, replay of DLQ records (DML only)
#   telemetry_reader  the API (SELECT only)
# The tests have accounts of their own, on the databases they make (test_...; the benchmarks
# bench_...): telemetry_test (owner), telemetry_test_writer, telemetry_test_reader, and
# telemetry_test_tls, which the server refuses without TLS. Production deployments use their own
# server and credentials.
mysql_database=telemetry
mysql_accounts=(
  "telemetry_owner:telemetry-owner:ALL PRIVILEGES:telemetry"
  "telemetry:telemetry:SELECT, INSERT, UPDATE, DELETE:telemetry"
  "telemetry_reader:telemetry-reader:SELECT:telemetry"
  "telemetry_test:telemetry-test:ALL PRIVILEGES:test\\_% bench\\_%"
  "telemetry_test_writer:telemetry-test:SELECT, INSERT, UPDATE, DELETE:test\\_%"
  "telemetry_test_reader:telemetry-test:SELECT:test\\_%"
  "telemetry_test_tls:telemetry-test:ALL PRIVILEGES:test\\_%"
)

# The users of the development Kafka's SASL_SSL listener and what its ACLs (start_kafka) let each
# do; all have SCRAM-SHA-256 and SCRAM-SHA-512 credentials, `telemetry` is PLAIN's one user too.
#   telemetry-bridge    the bridge: writes telemetry.raw
#   telemetry-audit     the audit service: reads telemetry.raw in group telemetry-audit, writes
#                       telemetry.cleaned and telemetry.dlq
#   telemetry-consumer  downstream consumers: read telemetry.cleaned in groups telemetry-...,
#                       except telemetry-audit
#   telemetry           the tests' user (crates/telemetry/tests/secure.rs runs the whole pipeline
#                       with it on topics of its own): every topic and group except the pipeline's
#                       (telemetry. topics, telemetry- groups), which only the role users reach
# Production deployments use their own brokers and credentials.
kafka_sasl_user=telemetry
kafka_sasl_password=telemetry-secret
kafka_sasl_users=(
  "$kafka_sasl_user:$kafka_sasl_password"
  "telemetry-bridge:telemetry-bridge-secret"
  "telemetry-audit:telemetry-audit-secret"
  "telemetry-consumer:telemetry-consumer-secret"
)
# The pipeline's topics (crates/telemetry-core/src/names.rs), created here because the role users
# may not create topics; with the services' default partition count.
kafka_topics=(telemetry.raw telemetry.cleaned telemetry.dlq)
kafka_topic_partitions=3

say() { printf 'services: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local name=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      return 1
    fi
    sleep 0.5
  done
  say "$name is ready"
}

apt_updated=false
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found; install these packages by hand: $*"
  if [ "$apt_updated" = false ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=true
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_missing() {
  local packages=()
  command -v mariadbd >/dev/null || packages+=(mariadb-server mariadb-client)
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || packages+=(mosquitto)
  command -v mosquitto_pub >/dev/null || packages+=(mosquitto-clients)
  if [ ${#packages[@]} -gt 0 ]; then
    apt_install "${packages[@]}"
  fi
  command -v java >/dev/null || die "java (17 or newer) is required to run Apache Kafka"
  if [ ! -f "$kafka_libs/kafka_2.13-$kafka_version.jar" ]; then
    command -v mvn >/dev/null || die "mvn is required to fetch the Apache Kafka jars from Maven Central"
    say "fetching Apache Kafka $kafka_version jars into $kafka_libs"
    mkdir -p "$kafka_libs.partial"
    mvn -q -B -Dstyle.color=never -f "$repo/deploy/kafka/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$kafka_libs.partial"
    rm -rf "$kafka_libs"
    mv "$kafka_libs.partial" "$kafka_libs"
  fi
  # Kafka's command-line tools (ConfigCommand, which creates the SCRAM credentials; the console
  # producer and consumer) are not a dependency of the broker artifact. Only the jar itself: the
  # tools we use need nothing the broker does not (its other dependency, Kafka Connect, is large).
  if [ ! -f "$kafka_libs/kafka-tools-$kafka_version.jar" ]; then
    command -v mvn >/dev/null || die "mvn is required to fetch the Apache Kafka jars from Maven Central"
    say "fetching the Apache Kafka $kafka_version tools jar into $kafka_libs"
    rm -rf "$kafka_libs.tools.partial"
    mvn -q -B -Dstyle.color=never -f "$repo/deploy/kafka/pom.xml" dependency:copy \
      -Dartifact="org.apache.kafka:kafka-tools:$kafka_version" -DoutputDirectory="$kafka_libs.tools.partial"
    mv "$kafka_libs.tools.partial/kafka-tools-$kafka_version.jar" "$kafka_libs/"
    rm -rf "$kafka_libs.tools.partial"
  fi
}

# --- TLS -----------------------------------------------------------------------------------
# A development CA and a server certificate for 127.0.0.1 and localhost, generated once (10 years)
# and reused: ca.pem (what clients trust), server.pem + server.key (MariaDB) and server-bundle.pem
# (key, certificate, CA: Kafka's PEM keystore). Everything runs as root, so the keys are 0600.
tls_generate_ca() {
  say "generating the development CA in $tls_dir"
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -keyout "$tls_dir/ca.key.partial" -out "$tls_dir/ca.pem.partial" \
    -config <(printf '%s\n' '[req]' 'distinguished_name = dn' 'x509_extensions = ext' '[dn]' '[ext]' \
      'basicConstraints = critical, CA:TRUE' 'keyUsage = critical, keyCertSign, cRLSign' \
      'subjectKeyIdentifier = hash') \
    -subj '/O=telemetry-pipeline/CN=telemetry-pipeline development CA' 2>>"$tls_dir/openssl.log" ||
    die "generating the development CA failed; see $tls_dir/openssl.log"
  mv "$tls_dir/ca.key.partial" "$tls_dir/ca.key"
  mv "$tls_dir/ca.pem.partial" "$tls_dir/ca.pem"
}

tls_generate_server() {
  say "generating the server certificate (127.0.0.1, localhost) in $tls_dir"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tls_dir/server.key.partial" \
    2>>"$tls_dir/openssl.log" || die "generating the server key failed; see $tls_dir/openssl.log"
  openssl req -new -key "$tls_dir/server.key.partial" -subj '/O=telemetry-pipeline/CN=localhost' \
    -config <(printf '%s\n' '[req]' 'distinguished_name = dn' '[dn]') 2>>"$tls_dir/openssl.log" |
    openssl x509 -req -CA "$tls_dir/ca.pem" -CAkey "$tls_dir/ca.key" -sha256 -days 3650 \
      -set_serial "0x$(openssl rand -hex 16)" -out "$tls_dir/server.pem.partial" \
      -extfile <(printf '%s\n' 'basicConstraints = critical, CA:FALSE' \
        'keyUsage = critical, digitalSignature, keyEncipherment' 'extendedKeyUsage = serverAuth' \
        'subjectAltName = IP:127.0.0.1, DNS:localhost' 'subjectKeyIdentifier = hash' \
        'authorityKeyIdentifier = keyid, issuer') 2>>"$tls_dir/openssl.log" ||
    die "signing the server certificate failed; see $tls_dir/openssl.log"
  mv "$tls_dir/server.key.partial" "$tls_dir/server.key"
  mv "$tls_dir/server.pem.partial" "$tls_dir/server.pem"
}

ensure_tls() {
  mkdir -p "$tls_dir"
  chmod 755 "$tls_dir"
  local previous_umask
  previous_umask=$(umask)
  umask 077
  if ! openssl x509 -checkend 86400 -noout -in "$tls_dir/ca.pem" >/dev/null 2>&1 ||
    [ ! -s "$tls_dir/ca.key" ]; then
    tls_generate_ca
    rm -f "$tls_dir/server.pem"
  fi
  # A certificate that no longer verifies (expired, or signed by a CA since replaced) is replaced.
  if ! openssl verify -CAfile "$tls_dir/ca.pem" "$tls_dir/server.pem" >/dev/null 2>&1 ||
    [ ! -s "$tls_dir/server.key" ]; then
    tls_generate_server
    rm -f "$tls_dir/server-bundle.pem"
  fi
  if [ ! -s "$tls_dir/server-bundle.pem" ]; then
    cat "$tls_dir/server.key" "$tls_dir/server.pem" "$tls_dir/ca.pem" >"$tls_dir/server-bundle.pem.partial"
    mv "$tls_dir/server-bundle.pem.partial" "$tls_dir/server-bundle.pem"
  fi
  umask "$previous_umask"
  # Certificates are public; clients running as another user must be able to read ca.pem.
  chmod 644 "$tls_dir/ca.pem" "$tls_dir/server.pem"
  chmod 600 "$tls_dir/ca.key" "$tls_dir/server.key" "$tls_dir/server-bundle.pem"
}

# --- MariaDB -------------------------------------------------------------------------------
mysql_dir="$state_dir/mariadb"
mysql_socket="$mysql_dir/mariadb.sock"
mysql_pid="$mysql_dir/mariadb.pid"

mysql_root() { mariadb --no-defaults --socket="$mysql_socket" -uroot "$@"; }

mysql_ready() { mysql_root -e 'SELECT 1' >/dev/null 2>&1; }

mysql_has_tls() {
  [ "$(mysql_root -N -B -e "SHOW VARIABLES LIKE 'have_ssl'" 2>/dev/null | cut -f 2)" = YES ]
}

# The server runs as the `mysql` system user (when this script runs as root) with LOAD DATA and
# SELECT ... INTO OUTFILE confined to a directory of its own: no account can read or write other
# files through it (and none holds FILE anyway).
mysql_files="$mysql_dir/files"
mysql_system_user() { if [ "$(id -u)" = 0 ] && id mysql >/dev/null 2>&1; then echo mysql; else id -un; fi; }

# Whether the running server is as this script now starts it: as the system user above, with
# secure_file_priv set. One started by an older configuration (as root, secure_file_priv empty)
# is restarted.
mysql_confined() {
  local user priv
  user=$(ps -o user= -p "$(cat "$mysql_pid")" 2>/dev/null | tr -d ' ')
  priv=$(mysql_root -N -B -e 'SELECT @@secure_file_priv' 2>/dev/null)
  [ "$user" = "$(mysql_system_user)" ] && [ -n "$priv" ] && [ "$priv" != NULL ]
}

start_mysql() {
  if pid_alive "$mysql_pid" && mysql_ready; then
    if mysql_has_tls && mysql_confined; then
      say "MariaDB already running on 127.0.0.1:$mysql_port"
      mysql_grant_accounts
      return
    fi
    say "MariaDB was started by an older configuration of this script (as root, or without TLS" \
      "or secure_file_priv); restarting it"
    stop_mysql
  fi
  port_open "$mysql_port" && die "port $mysql_port is taken by another process; set TELEMETRY_MYSQL_PORT"
  local user
  user=$(mysql_system_user)
  mkdir -p "$mysql_dir" "$mysql_files"
  if [ ! -d "$mysql_dir/data/mysql" ]; then
    say "initialising MariaDB data directory"
    mariadb-install-db --no-defaults --user="$user" --datadir="$mysql_dir/data" \
      --auth-root-authentication-method=socket >"$mysql_dir/install.log" 2>&1 ||
      die "mariadb-install-db failed; see $mysql_dir/install.log"
  fi
  ensure_tls
  # The server's own copy of the TLS key, readable by its user only.
  install -m 600 "$tls_dir/server.key" "$mysql_dir/server.key"
  if [ "$user" != "$(id -un)" ]; then
    chown -R "$user:" "$mysql_dir"
  fi
  chmod 750 "$mysql_dir"
  chmod 700 "$mysql_files"
  say "starting MariaDB on 127.0.0.1:$mysql_port as user $user (TLS available)"
  nohup mariadbd --no-defaults --user="$user" --datadir="$mysql_dir/data" \
    --bind-address=127.0.0.1 --port="$mysql_port" --socket="$mysql_socket" --pid-file="$mysql_pid" \
    --secure-file-priv="$mysql_files" \
    --ssl-ca="$tls_dir/ca.pem" --ssl-cert="$tls_dir/server.pem" --ssl-key="$mysql_dir/server.key" \
    --log-error="$mysql_dir/error.log" --default-time-zone=+00:00 \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
    --innodb-buffer-pool-size=512M --innodb-log-file-size=256M --innodb-flush-log-at-trx-commit=1 \
    --max-connections=500 --skip-name-resolve >/dev/null 2>&1 &
  wait_for MariaDB 60 mysql_ready || die "MariaDB did not start; see $mysql_dir/error.log"
  mysql_has_tls || die "MariaDB started without TLS; see $mysql_dir/error.log"
  mysql_grant_accounts
}

# Creates the accounts above, or brings existing ones back to exactly their role: every privilege
# they hold beyond it (an older version of this script granted ALL ON *.*) is revoked.
mysql_grant_accounts() {
  local sql="CREATE DATABASE IF NOT EXISTS \`$mysql_database\`;" account name password privileges databases database
  # Accounts of older versions of this script; mariadb-install-db's anonymous accounts and its
  # grants to every account (PUBLIC) on the test and test_ databases, as mysql_secure_installation
  # removes them: else every account, the readers too, could write the tests' databases.
  sql+="DROP USER IF EXISTS 'telemetry'@'localhost';"
  sql+="DELETE FROM mysql.global_priv WHERE User = '';"
  sql+="DELETE FROM mysql.db WHERE User IN ('', 'PUBLIC');FLUSH PRIVILEGES;"
  for account in "${mysql_accounts[@]}"; do
    IFS=: read -r name password privileges databases <<<"$account"
    sql+="CREATE USER IF NOT EXISTS '$name'@'127.0.0.1' IDENTIFIED BY '$password';"
    sql+="ALTER USER '$name'@'127.0.0.1' IDENTIFIED BY '$password'"
    if [ "$name" = telemetry_test_tls ]; then sql+=" REQUIRE SSL;"; else sql+=" REQUIRE NONE;"; fi
    sql+="REVOKE ALL PRIVILEGES, GRANT OPTION FROM '$name'@'127.0.0.1';"
    for database in $databases; do
      sql+="GRANT $privileges ON \`$database\`.* TO '$name'@'127.0.0.1';"
    done
  done
  # Through standard input: the passwords stay off every command line.
  mysql_root <<<"$sql" || die "creating the database accounts failed"
  say "MariaDB accounts by role are in place (telemetry_owner, telemetry, telemetry_reader; tests' own)"
}

stop_mysql() { stop_pid MariaDB "$mysql_pid" 60; }

# --- Mosquitto -----------------------------------------------------------------------------
mqtt_dir="$state_dir/mosquitto"
mqtt_pid="$mqtt_dir/mosquitto.pid"

# The development MQTT users (user:password), on top of deploy/mosquitto/acl: the bridge, the
# simulator, and the tests' own (telemetry-test, on the topics of their own prefixes; two devices
# for the ACL's test). Production: a user per device (docs/operations.md, "Device identity").
mqtt_users=(
  "telemetry-bridge:telemetry-bridge"
  "telemetry-simulator:telemetry-simulator"
  "telemetry-test:telemetry-test"
  "telemetry-test-device-a:telemetry-test"
  "telemetry-test-device-b:telemetry-test"
)

# The password file (hashed by mosquitto_passwd from a file: the passwords stay off command
# lines), the ACL, and the configuration, all readable by the broker's user only.
mqtt_write_files() {
  local previous_umask user_password
  previous_umask=$(umask)
  umask 077
  mkdir -p "$mqtt_dir"
  : >"$mqtt_dir/passwords.partial"
  for user_password in "${mqtt_users[@]}"; do
    printf '%s\n' "$user_password" >>"$mqtt_dir/passwords.partial"
  done
  mosquitto_passwd -U "$mqtt_dir/passwords.partial" >/dev/null ||
    die "mosquitto_passwd could not hash the development MQTT passwords"
  # The devices added with `add-device`, already hashed.
  if [ -f "$mqtt_dir/devices" ]; then
    cat "$mqtt_dir/devices" >>"$mqtt_dir/passwords.partial"
  fi
  mv "$mqtt_dir/passwords.partial" "$mqtt_dir/passwords"
  {
    cat "$repo/deploy/mosquitto/acl"
    printf '\n%s\n' "# Development only (scripts/services.sh): the tests' own user, on the topics of" \
      "# their own prefixes (<test id>/devices/+/telemetry)." "user telemetry-test" "topic readwrite #"
  } >"$mqtt_dir/acl"
  sed -e "s:@STATE_DIR@:$state_dir:g" -e "s:@MQTT_PORT@:$mqtt_port:g" \
    "$repo/deploy/mosquitto/mosquitto.conf" >"$mqtt_dir/mosquitto.conf.new"
  umask "$previous_umask"
  # Started as root, Mosquitto drops to its own user, which must be able to read these and write
  # its state.
  if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown -R mosquitto "$mqtt_dir"
  fi
  chmod 700 "$mqtt_dir"
}

start_mqtt() {
  command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (package mosquitto)"
  if pid_alive "$mqtt_pid" && port_open "$mqtt_port"; then
    mqtt_write_files
    if cmp -s "$mqtt_dir/mosquitto.conf.new" "$mqtt_dir/mosquitto.conf"; then
      rm -f "$mqtt_dir/mosquitto.conf.new"
      # Mosquitto reads the password file and the ACL again on SIGHUP.
      kill -HUP "$(cat "$mqtt_pid")"
      say "Mosquitto already running on 127.0.0.1:$mqtt_port (users and ACL reloaded)"
      return
    fi
    say "Mosquitto was started with an older configuration (anonymous access); restarting it"
    stop_mqtt
  fi
  port_open "$mqtt_port" && die "port $mqtt_port is taken by another process; set TELEMETRY_MQTT_PORT"
  mqtt_write_files
  mv "$mqtt_dir/mosquitto.conf.new" "$mqtt_dir/mosquitto.conf"
  say "starting Mosquitto on 127.0.0.1:$mqtt_port (logins and ACL required)"
  local binary
  binary=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  "$binary" -c "$mqtt_dir/mosquitto.conf" -d
  wait_for Mosquitto 30 port_open "$mqtt_port" || die "Mosquitto did not start; see $mqtt_dir/mosquitto.log"
}

# add-device NAME: a device's MQTT user (named as the device: the ACL lets it publish on
# devices/NAME/telemetry only) with a new random password, printed once; Mosquitto reloads.
add_device() {
  local name=${1:-}
  [[ "$name" =~ ^[A-Za-z0-9._-]{1,128}$ ]] ||
    die "add-device takes a device id: 1 to 128 of A-Z a-z 0-9 . _ - (the contract's characters)"
  mkdir -p "$mqtt_dir"
  local password previous_umask
  password=$(openssl rand -hex 16)
  previous_umask=$(umask)
  umask 077
  printf '%s:%s\n' "$name" "$password" >"$mqtt_dir/device.partial"
  mosquitto_passwd -U "$mqtt_dir/device.partial" >/dev/null || die "mosquitto_passwd failed"
  { grep -v "^$name:" "$mqtt_dir/devices" 2>/dev/null || true; cat "$mqtt_dir/device.partial"; } \
    >"$mqtt_dir/devices.partial"
  mv "$mqtt_dir/devices.partial" "$mqtt_dir/devices"
  rm -f "$mqtt_dir/device.partial"
  umask "$previous_umask"
  start_mqtt
  printf 'MQTT user %s, password %s (shown once; publish on devices/%s/telemetry)\n' \
    "$name" "$password" "$name"
}

stop_mqtt() { stop_pid Mosquitto "$mqtt_pid" 30; }

# --- Apache Kafka --------------------------------------------------------------------------
kafka_dir="$state_dir/kafka"
kafka_pid="$kafka_dir/kafka.pid"

kafka_java_options=(-Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$repo/deploy/kafka/log4j2.properties" -cp "$kafka_libs/*")

kafka_java() { java "${kafka_java_options[@]}" "$@"; }

# Kafka's command-line tools: short-lived, so without the server's optimizing compiler and
# collector (about 1 s per call instead of 2.5 s; start_kafka makes some twenty calls).
kafka_tool() {
  java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$repo/deploy/kafka/log4j2.properties" -cp "$kafka_libs/*" "$@"
}

# private_file FILE TEXT: writes TEXT to FILE readable by its owner only (0600, also when FILE
# existed with another mode), in bash alone: the text is on no command line.
private_file() {
  (umask 077 && printf '%s\n' "$2" >"$1.partial") && mv -f "$1.partial" "$1"
}

# The broker's configuration from deploy/kafka/server.properties. It holds the SASL PLAIN password
# (the listener's JAAS configuration), so it is written 0600, the placeholders filled in by bash
# (a quoted replacement is taken literally) rather than on sed's command line.
write_kafka_properties() {
  local text
  text=$(<"$repo/deploy/kafka/server.properties")
  text=${text//@STATE_DIR@/"$state_dir"}
  text=${text//@KAFKA_PORT@/"$kafka_port"}
  text=${text//@KAFKA_CONTROLLER_PORT@/"$kafka_controller_port"}
  text=${text//@KAFKA_SECURE_PORT@/"$kafka_secure_port"}
  text=${text//@KAFKA_SASL_USER@/"$kafka_sasl_user"}
  text=${text//@KAFKA_SASL_PASSWORD@/"$kafka_sasl_password"}
  private_file "$kafka_dir/server.properties" "$text"
}

start_kafka() {
  if pid_alive "$kafka_pid" && port_open "$kafka_port"; then
    # Written world-readable by older versions of this script.
    [ ! -f "$kafka_dir/server.properties" ] || chmod 600 "$kafka_dir/server.properties"
    # The file it was started with (written at every start) says whether it has the SASL_SSL
    # listener's ACLs; one started by an older configuration of this script is restarted, as
    # MariaDB and Mosquitto are.
    if port_open "$kafka_secure_port" &&
      grep -q '^authorizer.class.name=' "$kafka_dir/server.properties" 2>/dev/null; then
      say "Kafka already running on 127.0.0.1:$kafka_port"
      return
    fi
    say "Kafka was started by an older configuration of this script (no SASL_SSL listener, or" \
      "no ACLs on it); restarting it"
    stop_kafka
  fi
  port_open "$kafka_port" && die "port $kafka_port is taken by another process; set TELEMETRY_KAFKA_PORT"
  port_open "$kafka_secure_port" &&
    die "port $kafka_secure_port is taken by another process; set TELEMETRY_KAFKA_SECURE_PORT"
  ensure_tls
  mkdir -p "$kafka_dir"
  write_kafka_properties
  if [ ! -f "$kafka_dir/data/meta.properties" ]; then
    say "formatting Kafka storage"
    local cluster_id
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$kafka_dir/server.properties" \
      >"$kafka_dir/format.log" 2>&1 || die "formatting Kafka storage failed; see $kafka_dir/format.log"
  fi
  say "starting Apache Kafka $kafka_version on 127.0.0.1:$kafka_port (SASL_SSL: $kafka_secure_port)"
  nohup java "${kafka_java_options[@]}" kafka.Kafka "$kafka_dir/server.properties" \
    >"$kafka_dir/kafka.log" 2>&1 &
  echo $! >"$kafka_pid"
  wait_for Kafka 90 kafka_ready || die "Kafka did not start; see $kafka_dir/kafka.log"
  kafka_scram_credentials
  kafka_topics_and_acls
}

# The SCRAM credentials live in the cluster metadata, not in server.properties; upserting them on
# every start (through the plaintext listener) keeps them in step with kafka_sasl_users. One
# mechanism per call: KRaft refuses to alter one user's credentials twice in one request. The
# password goes in a 0600 file (--add-config-file, a properties file: no brackets around the value,
# and a `,` or `\` in the password would need escaping), not on java's command line, which every
# user of the machine can read in the process list. The log is 0600 too: ConfigCommand quotes a
# setting it refuses.
kafka_scram_credentials() {
  local entry user password mechanism scram_file="$kafka_dir/scram.properties"
  rm -f "$kafka_dir/scram.log"
  (umask 077 && : >"$kafka_dir/scram.log")
  for entry in "${kafka_sasl_users[@]}"; do
    user=${entry%%:*}
    password=${entry#*:}
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
      private_file "$scram_file" "$mechanism=password=$password"
      kafka_tool org.apache.kafka.tools.ConfigCommand --bootstrap-server "127.0.0.1:$kafka_port" \
        --alter --entity-type users --entity-name "$user" \
        --add-config-file "$scram_file" >>"$kafka_dir/scram.log" 2>&1 ||
        { rm -f "$scram_file"; die "creating the $mechanism credentials of $user failed; see $kafka_dir/scram.log"; }
    done
  done
  rm -f "$scram_file"
  say "Kafka SCRAM-SHA-256 and SCRAM-SHA-512 credentials of ${#kafka_sasl_users[@]} users are in place"
}

# kafka_acl ARGS...: one AclCommand call through the plaintext listener (a super user). Adding an
# ACL that exists already changes nothing, so this runs on every start. ACLs this script no longer
# adds are not removed: `AclCommand --remove` (or a fresh state directory) does that.
kafka_acl() {
  kafka_tool org.apache.kafka.tools.AclCommand --bootstrap-server "127.0.0.1:$kafka_port" \
    --add "$@" >>"$kafka_dir/acl.log" 2>&1 || die "adding Kafka ACLs failed; see $kafka_dir/acl.log"
}

# The pipeline's topics and the ACLs of kafka_sasl_users (docs/operations.md, "Kafka ACLs", has the
# same as kafka-acls.sh commands). Not granted, because not needed: Create (the topics are made
# here; the services' start-up check accepts an existing topic it may not create) and
# IdempotentWrite on the cluster (since Kafka 3.0, Write on any topic lets an idempotent producer
# start, KIP-679). DescribeConfigs lets a producer read its topic's max.message.bytes.
kafka_topics_and_acls() {
  rm -f "$kafka_dir/acl.log"
  local topic existing
  existing=$(kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$kafka_port" \
    --list 2>>"$kafka_dir/acl.log") || die "listing Kafka topics failed; see $kafka_dir/acl.log"
  for topic in "${kafka_topics[@]}"; do
    grep -qx -- "$topic" <<<"$existing" && continue
    kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$kafka_port" \
      --create --if-not-exists --topic "$topic" --partitions "$kafka_topic_partitions" \
      --replication-factor 1 >>"$kafka_dir/acl.log" 2>&1 ||
      die "creating Kafka topic $topic failed; see $kafka_dir/acl.log"
  done
  kafka_acl --allow-principal User:telemetry-bridge \
    --operation Write --operation Describe --operation DescribeConfigs --topic telemetry.raw
  kafka_acl --allow-principal User:telemetry-audit \
    --operation Read --operation Describe --topic telemetry.raw --group telemetry-audit
  kafka_acl --allow-principal User:telemetry-audit \
    --operation Write --operation Describe --operation DescribeConfigs \
    --topic telemetry.cleaned --topic telemetry.dlq
  kafka_acl --allow-principal User:telemetry-consumer \
    --operation Read --operation Describe --topic telemetry.cleaned
  kafka_acl --allow-principal User:telemetry-consumer \
    --operation Read --resource-pattern-type prefixed --group telemetry-
  # The prefix takes in the audit's group, which a consumer must not join (it would take part in
  # the audit's rebalances). A DENY outweighs any ALLOW.
  kafka_acl --deny-principal User:telemetry-consumer --operation All --group telemetry-audit
  kafka_acl --allow-principal "User:$kafka_sasl_user" --operation All --topic '*' --group '*'
  kafka_acl --deny-principal "User:$kafka_sasl_user" --operation All \
    --resource-pattern-type prefixed --topic telemetry. --group telemetry-
  say "Kafka topics ${kafka_topics[*]} and the ACLs of the SASL_SSL users are in place"
}

# The port opens before the broker has registered with its controller; the log line is the signal.
kafka_ready() {
  port_open "$kafka_port" && port_open "$kafka_secure_port" &&
    grep -q 'Kafka Server started' "$kafka_dir/kafka.log"
}

stop_kafka() { stop_pid Kafka "$kafka_pid" 60; }

# --- common --------------------------------------------------------------------------------
stop_pid() {
  local name=$1 pid_file=$2 seconds=$3
  if ! pid_alive "$pid_file"; then
    say "$name is not running"
    return
  fi
  local pid
  pid=$(cat "$pid_file")
  say "stopping $name (pid $pid)"
  kill -TERM "$pid"
  local deadline=$((SECONDS + seconds))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "$name did not stop within ${seconds}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.5
  done
  rm -f "$pid_file"
}

status_line() {
  local name=$1 pid_file=$2 port=$3
  if pid_alive "$pid_file" && port_open "$port"; then
    echo "$name: running (pid $(cat "$pid_file")) on 127.0.0.1:$port"
  else
    echo "$name: stopped"
  fi
}

command=${1:-}
shift || true
services=("$@")
if [ ${#services[@]} -eq 0 ]; then
  services=(mariadb mosquitto kafka)
fi
for service in "${services[@]}"; do
  [ "$command" = add-device ] && break
  case "$service" in
  kafka | mariadb | mosquitto) ;;
  *) die "unknown service '$service' (kafka, mariadb or mosquitto)" ;;
  esac
done

case "$command" in
add-device)
  mkdir -p "$state_dir"
  add_device "${services[0]:-}"
  ;;
start)
  mkdir -p "$cache_dir" "$state_dir"
  install_missing
  for service in "${services[@]}"; do
    case "$service" in
    mariadb) start_mysql ;;
    mosquitto) start_mqtt ;;
    kafka) start_kafka ;;
    esac
  done
  ;;
stop)
  # Kafka first: it holds the most in-flight state.
  for service in kafka mosquitto mariadb; do
    case " ${services[*]} " in
    *" $service "*) ;;
    *) continue ;;
    esac
    case "$service" in
    mariadb) stop_mysql ;;
    mosquitto) stop_mqtt ;;
    kafka) stop_kafka ;;
    esac
  done
  ;;
status)
  status_line MariaDB "$mysql_pid" "$mysql_port"
  status_line Mosquitto "$mqtt_pid" "$mqtt_port"
  status_line Kafka "$kafka_pid" "$kafka_port"
  status_line "Kafka SASL_SSL" "$kafka_pid" "$kafka_secure_port"
  ;;
*)
  echo "usage: $0 start|stop|status [kafka|mariadb|mosquitto ...] | add-device DEVICE_ID" >&2
  exit 2
  ;;
esac
