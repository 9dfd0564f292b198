#!/usr/bin/env python3
"""How many QoS 1 messages an MQTT broker sends a subscriber that never acknowledges.

A broker that keeps its in-flight window (Mosquitto's `max_inflight_messages`) stops at the window;
the bridge relies on the broker for that bound (docs/architecture.md, "Delivery guarantees").

Usage: scripts/mqtt-window-check.py [--host 127.0.0.1] [--port 1883] [--messages 5000]
Subscribes with a persistent session (MQTT 3.1.1, clean session off, QoS 1), publishes
`--messages` QoS 1 messages with `mosquitto_pub -l`, counts the PUBLISH packets received without
ever sending a PUBACK, then removes the session (reconnects with clean session on).
Standard library only, plus `mosquitto_pub` (Debian's mosquitto-clients).
"""

import argparse
import os
import socket
import struct
import subprocess
import sys


def utf8(text):
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def packet(kind, body):
    length, encoded = len(body), b""
    while True:
        digit, length = length % 128, length // 128
        encoded += bytes([digit | (128 if length else 0)])
        if not length:
            return bytes([kind]) + encoded + body


def connect(host, port, client_id, clean):
    sock = socket.create_connection((host, port), timeout=5)
    flags = 0x02 if clean else 0x00
    sock.sendall(packet(0x10, utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + utf8(client_id)))
    connack = sock.recv(4)
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        sys.exit(f"the broker refused the connection: {connack!r}")
    return sock


def count_publishes(data):
    """PUBLISH packets in `data`, a stream of whole MQTT packets (a cut last one is ignored)."""
    count, position = 0, 0
    while position < len(data):
        kind, cursor, multiplier, length = data[position], position + 1, 1, 0
        while cursor < len(data):
            digit = data[cursor]
            length += (digit & 127) * multiplier
            multiplier *= 128
            cursor += 1
            if not digit & 128:
                break
        if cursor + length > len(data):
            break
        count += kind >> 4 == 3
        position = cursor + length
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()

    client_id = f"window-check-{os.getpid()}"
    topic = f"window-check/{os.getpid()}"
    sock = connect(args.host, args.port, client_id, clean=False)
    sock.sendall(packet(0x82, struct.pack("!H", 1) + utf8(topic) + bytes([1])))
    suback = sock.recv(5)
    if len(suback) < 5 or suback[4] != 1:
        sys.exit(f"the broker did not grant QoS 1: {suback!r}")
    lines = "".join(f"message {number}\n" for number in range(args.messages))
    subprocess.run(
        ["mosquitto_pub", "-h", args.host, "-p", str(args.port), "-t", topic, "-q", "1", "-l"],
        input=lines.encode(),
        check=True,
    )
    sock.settimeout(2)
    received = b""
    try:
        while chunk := sock.recv(1 << 20):
            received += chunk
    except socket.timeout:
        pass
    sock.close()
    connect(args.host, args.port, client_id, clean=True).close()
    print(f"published {args.messages}, received without acknowledging: {count_publishes(received)}")


if __name__ == "__main__":
    main()
