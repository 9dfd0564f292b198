# Edit before copying to the board.
WIFI_SSID = "your-network"
WIFI_PASSWORD = "your-password"
# The machine running ./start-services.sh (Mosquitto listens on 1883; see the README about
# listening beyond 127.0.0.1).
MQTT_HOST = "192.168.1.10"
MQTT_PORT = 1883
MQTT_USER = None
MQTT_PASSWORD = None
# Seconds between readings.
INTERVAL_SECONDS = 10
