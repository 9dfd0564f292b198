# The telemetry payload a Pico W sends, in the format of contracts/telemetry.toml.
# Plain Python that runs on MicroPython and on CPython alike (the repository's tests run it under
# CPython and check what it builds against the contract).
import json

# RP2040 on-board temperature sensor: 0.706 V at 27 C, -1.721 mV per degree (RP2040 datasheet,
# section 4.9.5), read through a 12-bit ADC scaled to 16 bits against the 3.3 V reference.
ADC_REFERENCE_VOLTS = 3.3
SENSOR_VOLTS_AT_27C = 0.706
SENSOR_VOLTS_PER_DEGREE = 0.001721


def adc_to_celsius(raw_u16):
    """Degrees Celsius from a read_u16() of ADC channel 4."""
    volts = raw_u16 * ADC_REFERENCE_VOLTS / 65535
    return 27 - (volts - SENSOR_VOLTS_AT_27C) / SENSOR_VOLTS_PER_DEGREE


def build_payload(device_id, seq, device_ts_ms, temperature_c, rssi_dbm=None, firmware=None):
    """The JSON bytes of one reading: canonical field names, device time in UTC milliseconds."""
    reading = {
        "device_id": device_id,
        "device_ts": int(device_ts_ms),
        "seq": int(seq),
        "temperature_c": round(temperature_c, 2),
    }
    if rssi_dbm is not None:
        reading["rssi_dbm"] = int(rssi_dbm)
    if firmware is not None:
        reading["firmware"] = firmware
    return json.dumps(reading).encode()


def topic_for(device_id, prefix="devices"):
    """The MQTT topic the bridge subscribes to: <prefix>/<device id>/telemetry."""
    return "%s/%s/telemetry" % (prefix, device_id)
