# Raspberry Pi Pico W: reads the on-board temperature sensor and publishes it over MQTT (QoS 1)
# in the pipeline's payload format, with a sequence number and NTP time; reconnects Wi-Fi and
# MQTT when they drop. MicroPython 1.20 or later (umqtt.simple: `mpremote mip install umqtt.simple`).
import time

import machine
import network
import ntptime
import ubinascii
from umqtt.simple import MQTTClient

import config
from payload import adc_to_celsius, build_payload, topic_for

FIRMWARE = "pico-w-example-1.0"
DEVICE_ID = "pico-w-" + ubinascii.hexlify(machine.unique_id()).decode()
TOPIC = topic_for(DEVICE_ID)
# Seconds from the board's epoch to the Unix epoch: 0 on ports counting from 1970, 946684800 on
# those counting from 2000.
EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0

sensor = machine.ADC(4)
led = machine.Pin("LED", machine.Pin.OUT)
wlan = network.WLAN(network.STA_IF)


def connect_wifi():
    wlan.active(True)
    if wlan.isconnected():
        return
    wlan.connect(config.WIFI_SSID, config.WIFI_PASSWORD)
    for _ in range(30):
        if wlan.isconnected():
            return
        time.sleep(1)
    raise OSError("Wi-Fi did not connect")


def sync_clock():
    # The device time is what the pipeline checks for clock skew: set it from NTP.
    for _ in range(5):
        try:
            ntptime.settime()
            return
        except OSError:
            time.sleep(2)


def connect_mqtt():
    client = MQTTClient(
        DEVICE_ID,
        config.MQTT_HOST,
        port=config.MQTT_PORT,
        user=config.MQTT_USER or DEVICE_ID,
        password=config.MQTT_PASSWORD,
        keepalive=60,
    )
    client.connect()
    return client


def now_ms():
    return (time.time() + EPOCH_OFFSET) * 1000


def main():
    print("device id (its MQTT user):", DEVICE_ID)
    seq = 0
    client = None
    while True:
        try:
            connect_wifi()
            if client is None:
                sync_clock()
                client = connect_mqtt()
            seq += 1
            payload = build_payload(
                DEVICE_ID,
                seq,
                now_ms(),
                adc_to_celsius(sensor.read_u16()),
                rssi_dbm=wlan.status("rssi"),
                firmware=FIRMWARE,
            )
            # QoS 1: umqtt.simple waits for the broker's PUBACK.
            client.publish(TOPIC, payload, qos=1)
            led.toggle()
            time.sleep(config.INTERVAL_SECONDS)
        except OSError as error:
            print("connection lost, reconnecting:", error)
            try:
                if client is not None:
                    client.disconnect()
            except OSError:
                pass
            client = None
            time.sleep(5)


main()
