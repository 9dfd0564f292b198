# Edit before copying to the board.
WIFI_SSID = "your-network"
WIFI_PASSWORD = "your-password"
# The machine running ./start-services.sh (Mosquitto listens on 1883; see the README about
# listening beyond 127.0.0.1).
MQTT_HOST = "192.168.1.10"
MQTT_PORT = 1883
# The broker takes no anonymous device: add this board's user on the broker's machine with
# `scripts/services.sh add-device pico-w-<its unique id>` (the id main.py prints at start), which
# prints the password. None for MQTT_USER: the device id, which the broker's ACL requires (a
# device may publish on devices/<its user>/telemetry only).
MQTT_USER = None
MQTT_PASSWORD = "the password add-device printed"
# Seconds between readings.
INTERVAL_SECONDS = 10
