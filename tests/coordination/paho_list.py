"""A paho-mqtt 3.1.1 subscriber with a persistent session and a list of addresses, as an application would write one for several meshgate instances.

It connects to the first address; when the connection drops it goes to the next one (and
round again), with the same client id and clean_session False, and never subscribes again
after its first SUBACK: after a move it relies on the session (session present = 1).
Prints one JSON line per CONNACK (with the address), SUBACK and message.
Usage: paho_list.py HOST:PORT[,HOST:PORT...] CLIENT_ID TOPIC_FILTER
"""
import os
import sys
import time

import paho.mqtt.client as mqtt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from paho_callbacks import report  # noqa: E402

addresses = [a.rsplit(":", 1) for a in sys.argv[1].split(",")]
client_id, topic = sys.argv[2], sys.argv[3]
state = {"address": None}

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
report(c, topic, extra=lambda: {"address": state["address"]})
i = 0
while True:
    host, port = addresses[i % len(addresses)]
    state["address"] = f"{host}:{port}"
    try:
        c.connect(host, int(port), keepalive=5)
    except OSError:
        i += 1
        time.sleep(0.2)
        continue
    while c.loop(timeout=0.1) == mqtt.MQTT_ERR_SUCCESS:
        pass
    i += 1
